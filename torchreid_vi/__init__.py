"""torchreid_vi: visible-infrared cross-modal person re-identification for torchreid.

Importing the package registers its datasets (``sysu_mm01``, ``regdb``, ``llcm``), models
(``xiv_*``, ``idkl_*``), the ``ModalityBalancedSampler`` and the ``xiv`` / ``idkl`` engines in
torchreid's and the plugin's registries (idempotent: importing or calling
:func:`register_all` again is harmless)::

    >>> import torchreid_vi
    >>> 'sysu_mm01' in torchreid_vi.list_datasets()
    True
"""
__version__ = '0.1.0'

from .registration import register_all  # noqa: E402
from .registry import (  # noqa: E402
                       list_datasets,
                       list_engines,
                       list_models,
                       list_samplers,
                       register_dataset,
                       register_engine,
                       register_model,
                       register_sampler,
)

register_all()

__all__ = ['register_all', 'register_dataset', 'register_model', 'register_sampler',
           'register_engine', 'list_datasets', 'list_models', 'list_samplers', 'list_engines']
