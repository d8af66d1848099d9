"""``results.json``: the config, the environment and every evaluation of a run, in one file.

The file is rewritten atomically after each evaluation (temporary file + rename), so a killed run
never leaves a half-written JSON behind, and results can be compared without parsing logs.

Example::

    >>> import json, os, tempfile
    >>> from torchreid_vi.results import ResultsFile
    >>> path = os.path.join(tempfile.mkdtemp(), 'results.json')
    >>> rf = ResultsFile(path, config={'model': {'name': 'x'}})
    >>> rf.add_evaluation(epoch=1, dataset='toy', metrics={'toy/all': {'mean': {'rank1': 0.5}}})
    >>> json.load(open(path))['evaluations'][0]['metrics']['toy/all']['mean']['rank1']
    0.5
"""
from __future__ import annotations

import datetime
import platform
from typing import Any, Optional

import numpy as np

from .utils.fileio import write_json_atomic

__all__ = ['ResultsFile', 'environment_info']


def environment_info(device: Optional[str] = None) -> dict:
    """torch / torchvision / torchreid (layout and version) / python / platform / device."""
    import torch
    import torchvision

    from . import __version__
    from ._torchreid import tr
    dev = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    info = {
        'torchreid_vi': __version__,
        'torch': torch.__version__,
        'torchvision': torchvision.__version__,
        'torchreid_layout': tr.layout,
        'torchreid_version': tr.version,
        'torchreid_package_version': tr.package_version,
        'python': platform.python_version(),
        'platform': platform.platform(),
        'device': dev,
        'num_threads': torch.get_num_threads(),
    }
    if dev.startswith('cuda') and torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name(0)
    return info


def _jsonable(obj: Any):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, 'as_dict'):
        return _jsonable(obj.as_dict())
    return obj


class ResultsFile:
    """Accumulates a run's evaluations and keeps ``path`` up to date.

    Args:
        path: the JSON file (``<save_dir>/results.json``).
        config: the run's configuration (a yacs CfgNode or a dict).
        environment: :func:`environment_info` output (computed when omitted).
    """

    def __init__(self, path: str, config: Any = None, environment: Optional[dict] = None):
        self.path = path
        self.data = {
            'created': datetime.datetime.now().isoformat(timespec='seconds'),
            'config': _jsonable(config if config is not None else {}),
            'environment': environment if environment is not None else environment_info(),
            'evaluations': [],
        }
        write_json_atomic(self.path, _jsonable(self.data))

    def add_evaluation(self, epoch: int, dataset: str, metrics: dict, **extra) -> None:
        """Append one evaluation (``metrics``: setting key -> result dict) and rewrite the file."""
        entry = {'epoch': int(epoch), 'dataset': dataset, 'metrics': _jsonable(metrics)}
        entry.update(_jsonable(extra))
        self.data['evaluations'].append(entry)
        write_json_atomic(self.path, _jsonable(self.data))

    def set(self, key: str, value: Any) -> None:
        self.data[key] = _jsonable(value)
        write_json_atomic(self.path, _jsonable(self.data))
