"""Evaluation settings: which queries meet which gallery, per trial (datasets_and_protocols.md §2).

Everything here is a pure function over torchreid record lists ``(img_path, pid, camid, modality)``
(contract: ``dataset.query`` = every IR/thermal/NIR test image, ``dataset.gallery`` = every visible
test image, each sorted by (pid, cam, file name)). A setting never copies images or features: its
trials are index arrays into those two lists, so features and distances are computed once for the
whole test set and every trial is a slice (§4).

Settings produced (keys are unique ids that carry the sampler, so samplers never mix in a table):

=====================================================  =======================================
key                                                    what
=====================================================  =======================================
``sysu_mm01/{all,indoor}/{single,multi}/official_perm``  the dataset's 10 fixed permutations
``sysu_mm01/{all,indoor}/single/agw_seed``               AGW-family ``random.seed(t)`` galleries
``regdb/trial{t}/{t2v,v2t}``                             all test images of trial t's split
``llcm/{ir2vis,vis2ir}``                                 DEEN protocol, ``agw_seed`` galleries
``llcm/legacy_deen_vis2ir``                              DEEN's double-swapped "VIS to IR"
``<name>/{ir2vis,vis2ir}``                               generic: all images, one trial
=====================================================  =======================================

A non-default semantics (``'torchreid'``, ``'idkl'``, §3.2) appends ``/<semantics>`` to the key.
Returned gallery index arrays are ascending, i.e. in the pool's list order, which is the order that
breaks exact distance ties (§1.5).
"""
from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .rank import CMC_MODES, REMOVALS, SEMANTICS, protocol_rules

__all__ = [
    'EvalSetting', 'SysuPermutation', 'read_sysu_perm', 'sysu_gallery_official_perm',
    'agw_seed_gallery', 'sysu_settings', 'regdb_settings', 'llcm_settings', 'generic_settings',
    'find_sysu_perm_file', 'SYSU_GALLERY_CAMS', 'SYSU_QUERY_CAMS', 'LLCM_VIS_CAMS',
    'LLCM_NIR_CAMS', 'SYSU_PERM_SOURCE',
]

DIRECTIONS = ('ir2vis', 'vis2ir')
SYSU_QUERY_CAMS = (3, 6)
SYSU_GALLERY_CAMS = {'all': (1, 2, 4, 5), 'indoor': (1, 2)}
SYSU_SHOT_NAMES = {1: 'single', 10: 'multi'}
LLCM_VIS_CAMS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
LLCM_NIR_CAMS = (1, 2, 4, 5, 6, 7, 8, 9)          # there is no test_nir/cam3
SYSU_PERM_SOURCE = ('the official repository wuancong/SYSU-MM01, file '
                    'evaluation/data_split/rand_perm_cam.mat (297,740 bytes)')


def _announce(message: str) -> None:
    print(f'[torchreid_vi] {message}', flush=True)


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


# ------------------------------------------------------------------------------------------------
# record helpers

def _fields(records: Sequence, what: str) -> Tuple[np.ndarray, np.ndarray]:
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


def _stem_index(path: str) -> int:
    stem = os.path.splitext(os.path.basename(path))[0]
    try:
        return int(stem)
    except ValueError:
        raise ValueError(f'SYSU-MM01 image {path!r}: file name must be the image number '
                         f'(e.g. 0001.jpg) to match rand_perm_cam.mat entries') from None


# ------------------------------------------------------------------------------------------------
# SYSU-MM01 permutation file

class SysuPermutation(dict):
    """``{(cam, pid): (num_trials, n) int array}`` read from ``rand_perm_cam.mat``.

    Row t is trial t's permutation of 1..n; value k means file ``cam{cam}/{pid:04d}/{k:04d}.jpg``.
    Absent pids (n = 0) are not keys. ``source`` names the file; ``num_trials`` the row count.
    """
    source: str = '<rand_perm_cam>'
    num_trials: int = 0


def read_sysu_perm(path) -> SysuPermutation:
    """Read the official SYSU-MM01 ``rand_perm_cam.mat`` (structure of §1.1).

    Expected (``scipy.io.loadmat`` defaults): key 'rand_perm_cam', object array (n_cams, 1)
    (official: 6); camera c at [c-1, 0] is an object array (N_c, 1); pid p at [p-1, 0] is an
    integer array (num_trials, n) whose rows are permutations of 1..n (official: 10 rows, uint8).

    Returns:
        :class:`SysuPermutation` mapping (cam, pid) -> (num_trials, n) int64 array.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable .mat or does not have that structure (the message
            names the file, the cell and what was expected).
    """
    import scipy.io

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'SYSU-MM01 permutation file not found: {path}')
    try:
        mat = scipy.io.loadmat(path)
    except Exception as exc:
        raise ValueError(f'{path}: cannot read as a MATLAB .mat file ({exc})') from exc
    if 'rand_perm_cam' not in mat:
        keys = sorted(k for k in mat if not k.startswith('__'))
        raise ValueError(f"{path}: expected the key 'rand_perm_cam' (official SYSU-MM01 "
                         f'permutation file), found keys {keys}')
    outer = mat['rand_perm_cam']
    if outer.dtype != object or outer.ndim != 2 or outer.shape[1] != 1:
        raise ValueError(f"{path}: 'rand_perm_cam' must be an object array of shape (n_cams, 1) "
                         f'(official: (6, 1)), got dtype {outer.dtype} shape {outer.shape}')
    perm = SysuPermutation()
    perm.source = path
    num_trials = None
    for c in range(outer.shape[0]):
        cell = outer[c, 0]
        if not isinstance(cell, np.ndarray) or cell.dtype != object or cell.ndim != 2 \
                or cell.shape[1] != 1:
            raise ValueError(f'{path}: camera {c + 1} cell must be an object array of shape '
                             f'(N_c, 1), got {getattr(cell, "dtype", type(cell))} '
                             f'shape {getattr(cell, "shape", None)}')
        for p in range(cell.shape[0]):
            entry = np.asarray(cell[p, 0])
            where = f'{path}: camera {c + 1} pid {p + 1}'
            if entry.size == 0:
                continue
            if entry.ndim != 2 or entry.dtype.kind not in 'iuf':
                raise ValueError(f'{where}: expected a 2-D integer array (num_trials, n), got '
                                 f'dtype {entry.dtype} shape {entry.shape}')
            n = entry.shape[1]
            if num_trials is None:
                num_trials = entry.shape[0]
            elif entry.shape[0] != num_trials:
                raise ValueError(f'{where}: {entry.shape[0]} trial rows, other cells have '
                                 f'{num_trials}')
            rows = entry.astype(np.int64)
            if not np.array_equal(rows, entry) or not (
                    np.sort(rows, axis=1) == np.arange(1, n + 1)).all():
                raise ValueError(f'{where}: every row must be a permutation of 1..{n}')
            rows.setflags(write=False)
            perm[(c + 1, p + 1)] = rows
    if num_trials is None:
        raise ValueError(f'{path}: no camera has any permutation entry')
    perm.num_trials = int(num_trials)
    return perm


def find_sysu_perm_file(perm_file=None, root=None) -> Tuple[Optional[str], List[str]]:
    """Lookup order of §1.1: ``perm_file``, then ``<root>/exp/rand_perm_cam.mat``.

    Returns (the first existing path or None, every path looked at).
    """
    looked = []
    if perm_file is not None:
        looked.append(os.fspath(perm_file))
    if root is not None:
        looked.append(os.path.join(os.fspath(root), 'exp', 'rand_perm_cam.mat'))
    for path in looked:
        if os.path.isfile(path):
            return path, looked
    return None, looked


def sysu_gallery_official_perm(gallery_records: Sequence, perm: Dict, trial: int,
                               cams: Sequence[int], shots: int,
                               test_ids: Optional[Iterable[int]] = None) -> np.ndarray:
    """Gallery of one trial drawn with the official permutation (``official_perm``, §2.1).

    For every test pid (ascending) and camera in ``cams``: the first ``shots`` entries of row
    ``trial`` of the pid's permutation, value k meaning image ``{k:04d}.jpg`` of that cell. A cell
    with fewer than ``shots`` images gives all of them (with a warning).

    Args:
        gallery_records: the VIS pool (``dataset.gallery``), torchreid records; a record's cell is
            (camid, pid) and its image number is its file name (``0007.jpg`` -> 7).
        perm: from :func:`read_sysu_perm`.
        trial: 0-based trial = permutation row.
        cams: gallery cameras, e.g. (1, 2, 4, 5) all-search or (1, 2) indoor.
        shots: images per (pid, cam): 1 single-shot, 10 multi-shot.
        test_ids: pids to draw; default every pid of ``gallery_records``.

    Returns:
        ascending np.int64 indices into ``gallery_records``.

    Raises:
        ValueError: trial out of range, or a selected image is not in the pool (the perm file does
            not match the data; the message names the file and the image).
    """
    return _official_perm_indices(_ImagePool(gallery_records), perm, trial, cams, shots, test_ids)


def _image_key(cam, pid, number):
    """One int64 per SYSU image: camera, pid (< 10**6), image number (< 10**6)."""
    return (np.asarray(cam, np.int64) * 10 ** 6 + pid) * 10 ** 6 + number


class _ImagePool:
    """Gallery records indexed by (cam, pid, image number), built once per record list."""

    def __init__(self, records: Sequence):
        self.size = len(records)
        pids, cams = _fields(records, 'gallery_records')
        numbers = np.fromiter((_stem_index(r[0]) for r in records), np.int64, len(records))
        keys = _image_key(cams, pids, numbers)
        self.order = np.argsort(keys, kind='stable')
        self.sorted_keys = keys[self.order]
        self.pids = pids

    def find(self, keys: np.ndarray):
        """(record index of each key, whether it exists)."""
        if self.size == 0:
            return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
        at = np.minimum(np.searchsorted(self.sorted_keys, keys), self.size - 1)
        return self.order[at], self.sorted_keys[at] == keys


def _official_perm_indices(pool: _ImagePool, perm: Dict, trial: int, cams: Sequence[int],
                           shots: int, test_ids) -> np.ndarray:
    num_trials = getattr(perm, 'num_trials', None) or min(
        (e.shape[0] for e in perm.values()), default=0)
    source = getattr(perm, 'source', '<perm>')
    if not 0 <= int(trial) < num_trials:
        raise ValueError(f'trial {trial} out of range: {source} has {num_trials} trial rows')
    if int(shots) < 1:
        raise ValueError(f'shots must be >= 1, got {shots}')
    ids = np.unique(pool.pids) if test_ids is None else np.unique(
        np.asarray(list(test_ids), np.int64))
    wanted_cams, wanted_ids = set(int(c) for c in cams), set(ids.tolist())
    cells = sorted(k for k in perm if k[0] in wanted_cams and k[1] in wanted_ids)
    short = [(c, p, perm[(c, p)].shape[1]) for c, p in cells if perm[(c, p)].shape[1] < shots]
    if short:
        warnings.warn(f'{source}: {len(short)} (cam, pid) cells have fewer than {shots} images '
                      f'and give all they have, e.g. cam{short[0][0]}/{short[0][1]:04d} with '
                      f'{short[0][2]}', stacklevel=3)
    if not cells:
        return np.zeros(0, np.int64)
    counts = [min(shots, perm[k].shape[1]) for k in cells]
    sel_cam = np.repeat([k[0] for k in cells], counts)
    sel_pid = np.repeat([k[1] for k in cells], counts)
    sel_num = np.concatenate([perm[k][int(trial), :shots] for k in cells])
    index, found = pool.find(_image_key(sel_cam, sel_pid, sel_num))
    if not found.all():
        i = int(np.flatnonzero(~found)[0])
        raise ValueError(f'{source} trial {trial} selects cam{sel_cam[i]}/{sel_pid[i]:04d}/'
                         f'{sel_num[i]:04d}.jpg, which is not among the {pool.size} gallery '
                         f'records ({int((~found).sum())} selected images missing): the '
                         f'permutation file does not match the data')
    return np.sort(index).astype(np.int64)


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
    return _agw_seed_indices(_FolderGroups(records), seed, pids, cams)


class _FolderGroups:
    """Records grouped like image folders: (pid, cam) -> sorted [(file name, record index)]."""

    def __init__(self, records: Sequence):
        self.pids, self.cams = _fields(records, 'records')
        groups: Dict[Tuple[int, int], List[Tuple[str, int]]] = {}
        for i, (path, pid, cam) in enumerate(zip((r[0] for r in records), self.pids.tolist(),
                                                 self.cams.tolist())):
            groups.setdefault((pid, cam), []).append((os.path.basename(path), i))
        # sorting (name, index) pairs orders by name, like the reference's sorted listing
        self.groups = {k: sorted(v) for k, v in groups.items()}


def _agw_seed_indices(folders: _FolderGroups, seed: int, pids, cams) -> np.ndarray:
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


# ------------------------------------------------------------------------------------------------
# settings builders

def _suffix(semantics: str) -> str:
    return '' if semantics == 'vireid' else f'/{semantics}'


def _check_semantics(semantics: str) -> None:
    if semantics not in SEMANTICS:
        raise ValueError(f'unknown semantics {semantics!r}; expected one of {SEMANTICS}')


def sysu_settings(query_records: Sequence, gallery_records: Sequence, *,
                  dataset_name: str = 'sysu_mm01', search_modes: Sequence[str] = ('all', 'indoor'),
                  shots: Sequence[int] = (1, 10), gallery_sampler: str = 'auto', perm_file=None,
                  root=None, num_trials: int = 10, semantics: str = 'vireid') -> List[EvalSetting]:
    """SYSU-MM01 settings: search mode x shots, ``num_trials`` galleries each (§2.1, §2.5).

    Queries are every query record (IR cams 3 and 6) in every setting, direction 'ir2vis'.
    Gallery sampler:

    * ``'official_perm'``: the dataset's ``rand_perm_cam.mat``, looked up as ``perm_file`` then
      ``<root>/exp/rand_perm_cam.mat``; missing -> ``FileNotFoundError`` naming both places and
      where the file is distributed. Supports 1 and 10 shots.
    * ``'agw_seed'``: ``random.Random(t)`` picks as in AGW; single-shot only. Multi-shot entries
      of ``shots`` are skipped with a printed notice; asking for multi-shot only raises
      ``ValueError`` (no reference protocol exists for it).
    * ``'auto'`` (default): ``official_perm`` when the file is found, else ``agw_seed``; the choice
      is printed in one line and is part of every key.

    Args:
        query_records, gallery_records: ``dataset.query`` (IR test images) and
            ``dataset.gallery`` (the VIS pool: every RGB test image of cams 1, 2, 4, 5).
        semantics: 'vireid' (location rule + identity CMC), 'torchreid' (same pid & cam + per-image
            CMC) or 'idkl' (same rules as vireid, key suffix '/idkl'; IDKL also re-ranks, which is
            the caller's distance function's business).

    Returns:
        list of :class:`EvalSetting` with keys ``{dataset_name}/{mode}/{single|multi}/{sampler}``.
    """
    _check_semantics(semantics)
    removal, cmc_mode = protocol_rules('sysu', semantics)
    for mode in search_modes:
        if mode not in SYSU_GALLERY_CAMS:
            raise ValueError(f'unknown SYSU-MM01 search mode {mode!r}; expected one of '
                             f'{tuple(SYSU_GALLERY_CAMS)}')
    shots = tuple(int(s) for s in shots)
    for s in shots:
        if s not in SYSU_SHOT_NAMES:
            raise ValueError(f'SYSU-MM01 shots must be 1 (single) or 10 (multi), got {s}')
    if gallery_sampler not in ('auto', 'official_perm', 'agw_seed'):
        raise ValueError(f"gallery_sampler must be 'auto', 'official_perm' or 'agw_seed', got "
                         f'{gallery_sampler!r}')
    if not isinstance(num_trials, (int, np.integer)) or num_trials < 1:
        raise ValueError(f'num_trials must be a positive int, got {num_trials!r}')

    q_pids, q_cams = _fields(query_records, 'query_records')
    g_pids, g_cams = _fields(gallery_records, 'gallery_records')
    bad = sorted(set(q_cams.tolist()) - set(SYSU_QUERY_CAMS))
    if bad:
        raise ValueError(f'SYSU-MM01 query records must come from IR cameras {SYSU_QUERY_CAMS}; '
                         f'found cameras {bad}')
    test_ids = np.union1d(np.unique(q_pids), np.unique(g_pids))

    sampler, perm = gallery_sampler, None
    if gallery_sampler in ('auto', 'official_perm'):
        found, looked = find_sysu_perm_file(perm_file, root)
        if found is not None:
            sampler, perm = 'official_perm', read_sysu_perm(found)
            if gallery_sampler == 'auto':
                _announce(f'{dataset_name}: gallery sampler official_perm ({found})')
        elif gallery_sampler == 'official_perm':
            where = ', '.join(looked) if looked else 'nowhere (give perm_file= or root=)'
            raise FileNotFoundError(f'gallery_sampler official_perm needs rand_perm_cam.mat; '
                                    f'looked in: {where}. It is distributed in '
                                    f'{SYSU_PERM_SOURCE}; copy it to <root>/exp/ or pass '
                                    f'perm_file=')
        else:
            sampler = 'agw_seed'
            where = ', '.join(looked) if looked else 'no perm_file/root given'
            _announce(f'{dataset_name}: no rand_perm_cam.mat ({where}); gallery sampler agw_seed '
                      f'(AGW-style random.Random(t) galleries, single-shot only)')
    if sampler == 'official_perm' and num_trials > perm.num_trials:
        raise ValueError(f'num_trials={num_trials} but {perm.source} has only '
                         f'{perm.num_trials} permutation rows')
    if sampler == 'agw_seed' and 10 in shots:
        if shots == (10,):
            raise ValueError('agw_seed galleries are single-shot only (no reference multi-shot '
                             'protocol exists); use gallery_sampler official_perm for multi-shot')
        _announce(f'{dataset_name}: agw_seed is single-shot only: multi-shot settings skipped')
        shots = tuple(s for s in shots if s != 10)

    query_idx = np.arange(len(query_records), dtype=np.int64)
    pool = _ImagePool(gallery_records) if sampler == 'official_perm' else None
    folders = _FolderGroups(gallery_records) if sampler == 'agw_seed' else None
    settings = []
    for mode in search_modes:
        cams = SYSU_GALLERY_CAMS[mode]
        for s in shots:
            trials = []
            for t in range(int(num_trials)):
                if sampler == 'official_perm':
                    g = _official_perm_indices(pool, perm, t, cams, s, test_ids)
                else:
                    g = _agw_seed_indices(folders, t, test_ids, cams)
                trials.append((query_idx, g))
            key = f'{dataset_name}/{mode}/{SYSU_SHOT_NAMES[s]}/{sampler}{_suffix(semantics)}'
            settings.append(EvalSetting(key, 'ir2vis', tuple(trials), removal, cmc_mode, sampler,
                                        semantics))
    return settings


_REGDB_DIRECTIONS = {'t2v': 'ir2vis', 'v2t': 'vis2ir'}


def regdb_settings(query_records: Sequence, gallery_records: Sequence, *,
                   dataset_name: str = 'regdb', trial: int = 1,
                   directions: Sequence[str] = ('t2v', 'v2t'),
                   semantics: str = 'vireid') -> List[EvalSetting]:
    """RegDB settings of one split: all test images, no sampling, one trial each (§2.2).

    ``query_records`` = thermal test images of split ``trial`` (1..10), ``gallery_records`` =
    visible ones. 't2v' = thermal queries ('ir2vis'), 'v2t' = visible queries ('vis2ir'). The 10
    splits are 10 models: average the per-split results yourself (the key carries the split).
    Keys ``{dataset_name}/trial{t}/{t2v|v2t}``.
    """
    _check_semantics(semantics)
    removal, cmc_mode = protocol_rules('regdb', semantics)
    settings = []
    for d in directions:
        if d not in _REGDB_DIRECTIONS:
            raise ValueError(f'unknown RegDB direction {d!r}; expected one of '
                             f'{tuple(_REGDB_DIRECTIONS)}')
        direction = _REGDB_DIRECTIONS[d]
        n_rows, n_cols = ((len(query_records), len(gallery_records)) if direction == 'ir2vis'
                          else (len(gallery_records), len(query_records)))
        trials = ((np.arange(n_rows, dtype=np.int64), np.arange(n_cols, dtype=np.int64)),)
        settings.append(EvalSetting(f'{dataset_name}/trial{trial}/{d}{_suffix(semantics)}',
                                    direction, trials, removal, cmc_mode, 'all', semantics))
    return settings


def llcm_settings(query_records: Sequence, gallery_records: Sequence, *,
                  dataset_name: str = 'llcm', directions: Sequence[str] = ('ir2vis', 'vis2ir'),
                  num_trials: int = 10, legacy_deen_vis2ir: bool = False,
                  semantics: str = 'vireid') -> List[EvalSetting]:
    """LLCM settings (DEEN protocol, §2.3).

    * 'ir2vis': queries = every NIR test image (cams 1,2,4..9), gallery of trial t = one VIS image
      per (pid, cam) drawn with :func:`agw_seed_gallery` (seed t, cams 1..9).
    * 'vis2ir': queries = every VIS test image, gallery = the NIR sample of seed t.
    * ``legacy_deen_vis2ir=True`` adds ``{name}/legacy_deen_vis2ir``: what DEEN's test script
      reports as "VIS to IR", i.e. the NIR sample of seed t as queries against all VIS images
      (direction 'ir2vis').
    * semantics 'idkl': IDKL's evaluation: every NIR image against every VIS image (and swapped),
      one trial, nothing removed, identity CMC; keys ``{name}/{direction}/idkl``.

    Records outside the camera lists are not used (as DEEN builds its lists from those trees).
    """
    _check_semantics(semantics)
    removal, cmc_mode = protocol_rules('llcm', semantics)
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f'unknown LLCM direction {d!r}; expected one of {DIRECTIONS}')
    if not isinstance(num_trials, (int, np.integer)) or num_trials < 1:
        raise ValueError(f'num_trials must be a positive int, got {num_trials!r}')
    nir_pids, nir_cams = _fields(query_records, 'query_records')
    vis_pids, vis_cams = _fields(gallery_records, 'gallery_records')
    nir_pool = np.flatnonzero(np.isin(nir_cams, LLCM_NIR_CAMS))
    vis_pool = np.flatnonzero(np.isin(vis_cams, LLCM_VIS_CAMS))
    test_ids = np.union1d(np.unique(nir_pids), np.unique(vis_pids))
    if semantics == 'idkl':
        all_nir = np.arange(len(query_records), dtype=np.int64)
        all_vis = np.arange(len(gallery_records), dtype=np.int64)
        return [EvalSetting(f'{dataset_name}/{d}/idkl', d,
                            ((all_nir, all_vis) if d == 'ir2vis' else (all_vis, all_nir),),
                            removal, cmc_mode, 'all', semantics) for d in directions]

    trials = range(int(num_trials))
    nir_folders, vis_folders = _FolderGroups(query_records), _FolderGroups(gallery_records)
    settings = []
    for d in directions:
        if d == 'ir2vis':
            pairs = tuple((nir_pool, _agw_seed_indices(vis_folders, t, test_ids, LLCM_VIS_CAMS))
                          for t in trials)
        else:
            pairs = tuple((vis_pool, _agw_seed_indices(nir_folders, t, test_ids, LLCM_NIR_CAMS))
                          for t in trials)
        settings.append(EvalSetting(f'{dataset_name}/{d}{_suffix(semantics)}', d, pairs, removal,
                                    cmc_mode, 'agw_seed', semantics))
    if legacy_deen_vis2ir:
        pairs = tuple((_agw_seed_indices(nir_folders, t, test_ids, LLCM_NIR_CAMS), vis_pool)
                      for t in trials)
        settings.append(EvalSetting(f'{dataset_name}/legacy_deen_vis2ir{_suffix(semantics)}',
                                    'ir2vis', pairs, removal, cmc_mode, 'agw_seed', semantics))
    return settings


def generic_settings(query_records: Sequence, gallery_records: Sequence, *, dataset_name: str,
                     directions: Sequence[str] = ('ir2vis', 'vis2ir'),
                     removal: str = 'same_pid_cam', cmc_mode: str = 'image') -> List[EvalSetting]:
    """Settings for a user dataset: every IR image against every VIS image, one trial.

    Defaults to torchreid's rule (same pid and camera removed, per-image CMC). Keys
    ``{dataset_name}/{direction}``.
    """
    settings = []
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f'unknown direction {d!r}; expected one of {DIRECTIONS}')
        n_rows, n_cols = ((len(query_records), len(gallery_records)) if d == 'ir2vis'
                          else (len(gallery_records), len(query_records)))
        trials = ((np.arange(n_rows, dtype=np.int64), np.arange(n_cols, dtype=np.int64)),)
        settings.append(EvalSetting(f'{dataset_name}/{d}', d, trials, removal, cmc_mode, 'all',
                                    'generic'))
    return settings
