"""What every protocol shares: the setting type, record fields, the AGW gallery draw, checks.

A setting never copies images or features: its trials are index arrays into the dataset's two
record lists (``dataset.query`` = every IR/thermal/NIR test image, ``dataset.gallery`` = every
visible test image, each sorted by (pid, cam, file name)), so features and distances are computed
once for the whole test set and every trial is a slice (datasets_and_protocols.md §4).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..rules import CMC_MODES, DIRECTIONS, REMOVALS

__all__ = ['EvalSetting', 'agw_seed_gallery', 'record_fields', 'FolderGroups', 'agw_seed_indices',
           'announce', 'key_suffix', 'check_choice', 'check_subset', 'check_num_trials',
           'full_trial']


def announce(message: str) -> None:
    """One line to the run's log (settings choices the user should see)."""
    print(f'[torchreid_vi] {message}', flush=True)


def check_choice(value, allowed: Sequence, key: str) -> None:
    """``ValueError`` naming ``key`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f'{key}={value!r}; expected one of {tuple(allowed)}')


def check_subset(values, allowed: Sequence, key: str) -> None:
    """``ValueError`` naming ``key`` unless ``values`` is a non-empty list/tuple drawn from
    ``allowed``."""
    if isinstance(values, str) or not values or not set(values) <= set(allowed):
        raise ValueError(f'{key}={values!r}; expected a non-empty subset of {tuple(allowed)}')


def check_num_trials(n, key: str) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f'{key}={n!r}; expected a positive int')


def key_suffix(semantics: str) -> str:
    """What a non-default semantics appends to a setting key (``'/idkl'``, ``'/torchreid'``)."""
    return '' if semantics == 'vireid' else f'/{semantics}'


def _index_array(x, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in 'iu'):
        raise ValueError(f'{what} must be a 1-D integer index array, got shape {arr.shape} '
                         f'dtype {arr.dtype}')
    arr = arr.astype(np.int64, copy=True)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)      # eq=False: index arrays have no truth value
class EvalSetting:
    """One evaluation setting: a direction, the rules and one (queries, gallery) pair per trial.

    Attributes:
        key: unique id, e.g. 'sysu_mm01/all/single/official_perm', 'regdb/trial1/t2v'.
        direction: 'ir2vis' (query_idx indexes ``dataset.query`` = IR records, gallery_idx
            indexes ``dataset.gallery`` = VIS records) or 'vis2ir' (the other way round; the
            engine uses the transposed IR x VIS distance matrix).
        trials: tuple of (query_idx, gallery_idx) read-only np.int64 arrays, one pair per trial.
        removal: 'location' | 'same_pid_cam' | 'none'.
        cmc_mode: 'identity' | 'image'.
        sampler: how galleries were drawn: 'official_perm', 'agw_seed' or 'all'.
        semantics: 'vireid' (default), 'torchreid', 'idkl' or 'generic'.
    """
    key: str
    direction: str
    trials: Tuple[Tuple[np.ndarray, np.ndarray], ...]
    removal: str
    cmc_mode: str
    sampler: str
    semantics: str = 'vireid'

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f'setting {self.key!r}: direction must be one of {DIRECTIONS}, '
                             f'got {self.direction!r}')
        if self.removal not in REMOVALS:
            raise ValueError(f'setting {self.key!r}: removal must be one of {REMOVALS}, '
                             f'got {self.removal!r}')
        if self.cmc_mode not in CMC_MODES:
            raise ValueError(f'setting {self.key!r}: cmc_mode must be one of {CMC_MODES}, '
                             f'got {self.cmc_mode!r}')
        trials = tuple(self.trials)
        if not trials:
            raise ValueError(f'setting {self.key!r} has no trials')
        clean = []
        for t, pair in enumerate(trials):
            if len(pair) != 2:
                raise ValueError(f'setting {self.key!r} trial {t}: expected (query_idx, '
                                 f'gallery_idx), got {len(pair)} items')
            clean.append((_index_array(pair[0], f'setting {self.key!r} trial {t} query_idx'),
                          _index_array(pair[1], f'setting {self.key!r} trial {t} gallery_idx')))
        object.__setattr__(self, 'trials', tuple(clean))

    @property
    def num_trials(self) -> int:
        return len(self.trials)


def record_fields(records: Sequence, what: str) -> Tuple[np.ndarray, np.ndarray]:
    """(pids, camids) int64 arrays of torchreid records (path, pid, camid, dsetid)."""
    if len(records) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    try:
        pids = np.fromiter((r[1] for r in records), np.int64, len(records))
        cams = np.fromiter((r[2] for r in records), np.int64, len(records))
    except (TypeError, IndexError, ValueError) as exc:
        raise ValueError(f'{what} must be torchreid records (img_path, pid, camid, dsetid) with '
                         f'integer pid and camid; first record: {records[0]!r}') from exc
    return pids, cams



def agw_seed_gallery(records: Sequence, seed: int, pids: Optional[Iterable[int]] = None,
                     cams: Optional[Sequence[int]] = None) -> np.ndarray:
    """Gallery drawn like AGW's ``random.seed(t); random.choice`` (``agw_seed``, §2.1, §2.3).

    ``random.Random(seed)`` (a private generator: the global ``random`` state is never touched)
    makes one ``choice`` per existing (pid, cam) group, pids ascending and cameras in the listed
    order, over the group's file names (basenames) sorted. Identical picks to the reference.

    Args:
        records: candidate pool, torchreid records (path, pid, camid, dsetid).
        seed: trial number t (0..9).
        pids: pids to draw (default: every pid in ``records``); iterated ascending.
        cams: cameras in draw order (default: every camera in ``records``, ascending).

    Returns:
        ascending np.int64 indices into ``records``, one per existing (pid, cam) group.
    """
    return agw_seed_indices(FolderGroups(records), seed, pids, cams)


class FolderGroups:
    """Records grouped like image folders: (pid, cam) -> sorted [(file name, record index)]."""

    def __init__(self, records: Sequence):
        self.pids, self.cams = record_fields(records, 'records')
        groups: Dict[Tuple[int, int], List[Tuple[str, int]]] = {}
        for i, (path, pid, cam) in enumerate(zip((r[0] for r in records), self.pids.tolist(),
                                                 self.cams.tolist())):
            groups.setdefault((pid, cam), []).append((os.path.basename(path), i))
        # sorting (name, index) pairs orders by name, like the reference's sorted listing
        self.groups = {k: sorted(v) for k, v in groups.items()}


def agw_seed_indices(folders: FolderGroups, seed: int, pids, cams) -> np.ndarray:
    id_list = sorted(set(folders.pids.tolist()) if pids is None else set(int(p) for p in pids))
    cam_list = sorted(set(folders.cams.tolist())) if cams is None else [int(c) for c in cams]
    rng = random.Random(seed)
    picks = []
    for pid in id_list:
        for cam in cam_list:
            group = folders.groups.get((pid, cam))
            if group:
                picks.append(rng.choice(group)[1])
    return np.sort(np.asarray(picks, np.int64))


def full_trial(direction: str, query_records: Sequence, gallery_records: Sequence) -> tuple:
    """The one trial of "every image against every image" in ``direction`` (no sampling)."""
    n_rows, n_cols = ((len(query_records), len(gallery_records)) if direction == 'ir2vis'
                      else (len(gallery_records), len(query_records)))
    return ((np.arange(n_rows, dtype=np.int64), np.arange(n_cols, dtype=np.int64)),)
