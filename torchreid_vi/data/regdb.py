"""RegDB (Nguyen et al., Sensors 2017): 412 ids × 10 visible + 10 thermal images, 10 trials.

Trial ``t`` (1..10) is one random 206/206 id split given by ``idx/{train,test}_{visible,thermal}_t
.txt``; the 10 trials are 10 separately trained models, so one dataset object serves one trial
(option ``trial``). Pids come from the **folder** (``Visible/<pid>/...``), never from the label
column; the label column must nevertheless map one-to-one onto folder pids across the visible and
thermal files of a split (AGW evaluates with labels, IDKL with folder pids; they agree only then),
and a conflict raises naming file and line.

``query`` = all thermal test images (modality INFRARED, camid 2), ``gallery`` = all visible test
images (VISIBLE, camid 1).
"""
from __future__ import annotations

import os.path as osp
from typing import Dict, Tuple

from .base import INFRARED, VISIBLE, CrossModalDataset
from .io import DataFormatError, parse_idx_file, safe_join

__all__ = ['RegDB']

VISIBLE_CAMID = 1
THERMAL_CAMID = 2
_FOLDERS = {VISIBLE: 'visible', INFRARED: 'thermal'}   # idx file word and (lower-case) folder


class RegDB(CrossModalDataset):
    """RegDB, one trial.

    Options:
        trial: 1..10, which idx files (and hence which trained model) this is.
        directions: ``('t2v', 'v2t')`` or a subset (thermal→visible, visible→thermal).
        semantics: ``'vireid'`` (default), ``'torchreid'`` or ``'idkl'``.
    """

    name = 'regdb'
    dataset_dir = 'RegDB'
    layout = (
        'RegDB/\n'
        '  Visible/<pid>/<sex>_<view>_v_<frame5>_<pid>.bmp   pid folders 1..412, not padded\n'
        '  Thermal/<pid>/<sex>_<view>_t_<frame5>_<pid>.bmp\n'
        '  idx/{train,test}_{visible,thermal}_<trial>.txt    lines "<relative path> <label>", '
        'trial 1..10'
    )
    layout_markers = ('idx', 'Visible', 'Thermal')
    default_options = {'trial': 1, 'directions': ('t2v', 'v2t'), 'semantics': 'vireid'}
    parse_options = ('trial',)
    protocol = 'regdb'

    def validate_options(self, options):
        t = options['trial']
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 10:
            raise ValueError(f'regdb: trial={t!r}; expected an int in 1..10 (the idx file suffix)')
        from ..evaluation.protocols.regdb import validate_options
        validate_options(options, self.name)

    def load_records(self, dataset_root):
        trial = self.protocol_options['trial']
        idx_dir = self.require(osp.join(dataset_root, 'idx'), 'index folder')
        splits = {}
        for split in ('train', 'test'):
            records = []
            label_owner: Dict[int, Tuple[int, str, int]] = {}   # label -> (pid, file, line)
            pid_owner: Dict[int, Tuple[int, str, int]] = {}     # pid -> (label, file, line)
            for modality in (VISIBLE, INFRARED):
                fname = f'{split}_{_FOLDERS[modality]}_{trial}.txt'
                path = self.require(osp.join(idx_dir, fname), f'{split} index file')
                for line in parse_idx_file(path):
                    where = f'{path}, line {line.line_no}'
                    img = safe_join(dataset_root, line.rel_path, source=where)
                    pid = _folder_pid(line.rel_path, modality, where)
                    _check_bijection(label_owner, pid_owner, line.label, pid, path, line.line_no)
                    camid = VISIBLE_CAMID if modality == VISIBLE else THERMAL_CAMID
                    records.append((img, pid, camid, modality))
            splits[split] = records
        self.require_files([r[0] for rows in splits.values() for r in rows])
        leak = sorted({r[1] for r in splits['train']} & {r[1] for r in splits['test']})
        if leak:
            raise DataFormatError(f'regdb trial {trial}: {len(leak)} pids are in both the train '
                                  f'and the test idx files (first: {leak[:5]})')
        test = splits['test']
        return (splits['train'], [r for r in test if r[3] == INFRARED],
                [r for r in test if r[3] == VISIBLE])


def _folder_pid(rel_path: str, modality: int, where: str) -> int:
    parts = rel_path.replace('\\', '/').split('/')
    if len(parts) < 3 or not parts[-2].isdigit():
        raise DataFormatError(f'{where}: "{rel_path}" is not <Visible|Thermal>/<pid>/<file>')
    if parts[-3].lower() != _FOLDERS[modality]:
        raise DataFormatError(f'{where}: "{rel_path}" is listed as {_FOLDERS[modality]} but lies '
                              f'in folder "{parts[-3]}"')
    return int(parts[-2])


def _check_bijection(label_owner, pid_owner, label: int, pid: int, path: str, line_no: int):
    """Raise if ``label`` already belongs to another pid or ``pid`` to another label."""
    prev = label_owner.setdefault(label, (pid, path, line_no))
    if prev[0] != pid:
        raise DataFormatError(
            f'{path}, line {line_no}: label {label} is given to folder pid {pid}, but {prev[1]}, '
            f'line {prev[2]} gives label {label} to folder pid {prev[0]}; RegDB labels must map '
            f'one-to-one onto folder pids across the visible and thermal files of a split')
    prev = pid_owner.setdefault(pid, (label, path, line_no))
    if prev[0] != label:
        raise DataFormatError(
            f'{path}, line {line_no}: folder pid {pid} has label {label}, but {prev[1]}, line '
            f'{prev[2]} gives it label {prev[0]}; RegDB labels must map one-to-one onto folder '
            f'pids across the visible and thermal files of a split')

