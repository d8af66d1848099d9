"""``results.json``: every run in a save_dir and every evaluation it made, in one growing file.

Format (``format_version`` 2)::

    {"format_version": 2,
     "runs": [{"run_id", "kind": "train" | "evaluate", "started", "command", "config",
               "environment"}, ...],
     "evaluations": [{"run_id", "epoch", "checkpoint", "dataset", "final", "metrics"}, ...]}

A resumed run, an evaluation-only run or a second evaluation **appends**: nothing earlier is ever
removed (a file of the first format is converted, keeping everything). Each evaluation names the
epoch it evaluated (the checkpoint's, for evaluation-only runs), the checkpoint it came from and the
run that made it. Every write is atomic (temporary file + rename) and re-reads the file first, so
a killed run never leaves a half-written JSON behind and runs sharing a folder on purpose
(``vi.train.share_save_dir``) keep each other's entries. An unreadable file is not overwritten: it
is moved aside (``results.json.unreadable-<time>``) with a warning.

Example::

    >>> import json, os, tempfile
    >>> from torchreid_vi.results import ResultsFile
    >>> path = os.path.join(tempfile.mkdtemp(), 'results.json')
    >>> rf = ResultsFile(path, config={'model': {'name': 'x'}}, environment={})
    >>> rf.add_evaluation(epoch=1, dataset='toy', metrics={'toy/all': {'mean': {'rank1': 0.5}}})
    >>> _ = ResultsFile(path, config={}, environment={}, kind='evaluate')  # a later run appends
    >>> data = json.load(open(path))
    >>> len(data['runs']), data['evaluations'][0]['metrics']['toy/all']['mean']['rank1']
    (2, 0.5)
"""
from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
import sys
import warnings
from typing import Any, List, Optional

import numpy as np

from .utils.fileio import write_json_atomic

__all__ = ['ResultsFile', 'environment_info', 'FORMAT_VERSION', 'new_run_id', 'read_results',
           'run_config']

FORMAT_VERSION = 2
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


_runs_in_this_process = itertools.count(1)


def new_run_id() -> str:
    """``<date>-<time>-<pid>-<n>``: unique per run on a host (n counts the runs of one process, as
    in tests or notebooks), sortable by start time."""
    return (datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
            + f'-{os.getpid()}-{next(_runs_in_this_process)}')


def _upgrade(data: dict) -> dict:
    """A file of the first format (one run: ``config``, ``environment``, ``evaluations``)."""
    if data.get('format_version') == FORMAT_VERSION:
        return data
    run = {'run_id': 'run-1', 'kind': 'train', 'started': data.get('created'),
           'command': None, 'config': data.get('config'),
           'environment': data.get('environment')}
    evaluations = [dict(e, run_id='run-1') for e in data.get('evaluations', [])]
    return {'format_version': FORMAT_VERSION, 'runs': [run], 'evaluations': evaluations}


def read_results(path: str) -> dict:
    """``results.json`` at ``path`` in the current format (a first-format file is converted in
    memory, the file is left as it is). Raises ``OSError`` / ``ValueError`` naming ``path``."""
    with open(path, encoding='utf-8') as f:
        try:
            data = json.load(f)
        except ValueError as exc:
            raise ValueError(f'{path}: not JSON ({exc})') from None
    if not isinstance(data, dict):
        raise ValueError(f'{path}: top level is a {type(data).__name__}, expected an object')
    return _upgrade(data)


def run_config(data: dict, run_id: Optional[str] = None) -> dict:
    """The config (a dict) of run ``run_id`` in ``data`` (:func:`read_results`); by default of the
    run that made the last evaluation, else of the last run; ``{}`` when there is none."""
    runs = data.get('runs') or []
    if run_id is None and data.get('evaluations'):
        run_id = data['evaluations'][-1].get('run_id')
    chosen = [r for r in runs if r.get('run_id') == run_id] or runs[-1:]
    return (chosen[0].get('config') or {}) if chosen else {}


class ResultsFile:
    """The ``results.json`` of a save_dir, with this run registered in it.

    Args:
        path: the JSON file (``<save_dir>/results.json``).
        config: the run's configuration (a yacs CfgNode or a dict).
        environment: :func:`environment_info` output (computed when omitted).
        kind: ``'train'`` or ``'evaluate'``.
        command: the command line (default ``sys.argv``).
    """

    def __init__(self, path: str, config: Any = None, environment: Optional[dict] = None, *,
                 kind: str = 'train', command: Optional[List[str]] = None):
        self.path = path
        self.run_id = new_run_id()
        self._append('runs', {
            'run_id': self.run_id, 'kind': kind,
            'started': datetime.datetime.now().isoformat(timespec='seconds'),
            'command': list(sys.argv if command is None else command),
            'config': _jsonable(config if config is not None else {}),
            'environment': environment if environment is not None else environment_info()})

    def _load(self) -> dict:
        if not os.path.exists(self.path):
            return {'format_version': FORMAT_VERSION, 'runs': [], 'evaluations': []}
        try:
            return read_results(self.path)
        except (OSError, ValueError) as exc:
            aside = f'{self.path}.unreadable-{datetime.datetime.now():%Y%m%d-%H%M%S}'
            os.replace(self.path, aside)
            warnings.warn(f'{self.path} could not be read ({exc}); moved it to {aside} and '
                          f'started a new file', stacklevel=3)
            return {'format_version': FORMAT_VERSION, 'runs': [], 'evaluations': []}

    def _append(self, key: str, entry: dict) -> None:
        data = self._load()
        data[key].append(_jsonable(entry))
        write_json_atomic(self.path, data)

    def add_evaluation(self, epoch: int, dataset: str, metrics: dict, *,
                       checkpoint: Optional[str] = None, final: bool = False, **extra) -> None:
        """Append one evaluation (``metrics``: setting key -> result) of the weights of ``epoch``
        (finished epochs) from ``checkpoint``."""
        entry = {'run_id': self.run_id, 'epoch': int(epoch), 'checkpoint': checkpoint,
                 'dataset': dataset, 'final': bool(final), 'metrics': metrics}
        entry.update(extra)
        self._append('evaluations', entry)

    def data(self) -> dict:
        """The whole file as it is now."""
        return self._load()
