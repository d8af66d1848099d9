"""Cross-modal datasets (SYSU-MM01, RegDB, LLCM), the modality-balanced sampler and their
integration with torchreid's datamanager.

``register_all()`` (idempotent) installs the sampler hook and registers the datasets
``'sysu_mm01'``, ``'regdb'``, ``'llcm'`` and the sampler ``'ModalityBalancedSampler'``::

    >>> from torchreid_vi.data import register_all
    >>> register_all()
    >>> from torchreid_vi.registry import list_samplers
    >>> 'ModalityBalancedSampler' in list_samplers()
    True
"""
from .base import (
    INFRARED,
    MODALITY_NAMES,
    VISIBLE,
    CrossModalDataset,
    DatasetLayoutError,
    clear_parse_cache,
    parse_cache_info,
)
from .datamanager import CrossModalImageDataManager, install
from .io import DataFormatError, ImageReadError, read_image
from .llcm import LLCM
from .regdb import RegDB
from .sampler import ModalityBalancedSampler, batch_layout
from .sysu_mm01 import SYSUMM01

__all__ = [
    'VISIBLE', 'INFRARED', 'MODALITY_NAMES', 'CrossModalDataset', 'DatasetLayoutError',
    'DataFormatError', 'ImageReadError', 'read_image', 'parse_cache_info', 'clear_parse_cache',
    'SYSUMM01', 'RegDB', 'LLCM', 'ModalityBalancedSampler', 'batch_layout',
    'CrossModalImageDataManager', 'install', 'register_all',
    'DATASET_CLASSES',
]

DATASET_CLASSES = {'sysu_mm01': SYSUMM01, 'regdb': RegDB, 'llcm': LLCM}


def register_all() -> None:
    """Install the sampler hook and register the plugin's datasets and sampler (idempotent)."""
    from ..registry import register_dataset, register_sampler
    install()
    for name, cls in DATASET_CLASSES.items():
        register_dataset(name, cls)
    register_sampler('ModalityBalancedSampler', ModalityBalancedSampler)
