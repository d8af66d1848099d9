"""SYSU-MM01 protocol: all/indoor search × single/multi-shot galleries × 10 trials (§2.1).

Settings (keys carry the gallery sampler, so samplers never mix in a table):

=====================================================  =======================================
``sysu_mm01/{all,indoor}/{single,multi}/official_perm``  the dataset's 10 fixed permutations
``sysu_mm01/{all,indoor}/single/agw_seed``               AGW-family ``random.seed(t)`` galleries
=====================================================  =======================================

A non-default semantics (``'torchreid'``, ``'idkl'``, §3.2) appends ``/<semantics>`` to the key.
Returned gallery index arrays are ascending, i.e. in the pool's list order, which is the order that
breaks exact distance ties (§1.5).
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ...data.sysu_mm01 import GALLERY_SAMPLERS, INFRARED_CAMERAS
from ..rules import SEMANTICS, protocol_rules
from .common import (
    EvalSetting,
    FolderGroups,
    agw_seed_indices,
    announce,
    check_choice,
    check_num_trials,
    check_subset,
    key_suffix,
    record_fields,
)

__all__ = ['SysuPermutation', 'read_sysu_perm', 'find_sysu_perm_file', 'sysu_gallery_official_perm',
           'sysu_settings', 'validate_options', 'settings_for', 'SEARCH_MODE_CAMERAS',
           'SHOT_NAMES', 'SYSU_PERM_SOURCE']

# Visible cameras of each search mode; queries are the infrared cameras 3 and 6 in both.
SEARCH_MODE_CAMERAS = {'all': (1, 2, 4, 5), 'indoor': (1, 2)}
SHOT_NAMES = {1: 'single', 10: 'multi'}
SYSU_PERM_SOURCE = ('the official repository wuancong/SYSU-MM01, file '
                    'evaluation/data_split/rand_perm_cam.mat (297,740 bytes)')


def _stem_index(path: str) -> int:
    stem = os.path.splitext(os.path.basename(path))[0]
    try:
        return int(stem)
    except ValueError:
        raise ValueError(f'SYSU-MM01 image {path!r}: file name must be the image number '
                         f'(e.g. 0001.jpg) to match rand_perm_cam.mat entries') from None


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

    An explicit ``perm_file`` that does not exist is an error (``FileNotFoundError`` naming it),
    never silently replaced by the dataset's copy.

    Returns (the first existing path or None, every path looked at).
    """
    if perm_file:
        path = os.fspath(perm_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'vi.sysu_mm01.perm_file "{path}" does not exist; give the '
                                    f'path of rand_perm_cam.mat (distributed in '
                                    f'{SYSU_PERM_SOURCE}) or leave it empty to use '
                                    f'<root>/exp/rand_perm_cam.mat')
        return path, [path]
    looked = []
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
        pids, cams = record_fields(records, 'gallery_records')
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


def validate_options(options: dict, dataset: str = 'sysu_mm01') -> None:
    """Check SYSU-MM01 protocol options (the ``vi.sysu_mm01`` keys); ``ValueError`` names the key.

    Keys: ``search_modes`` (subset of all/indoor), ``shots`` (subset of 1, 10),
    ``gallery_sampler``, ``num_trials``, ``semantics``.
    """
    check_subset(options['search_modes'], tuple(SEARCH_MODE_CAMERAS), f'{dataset}: search_modes')
    check_subset(options['shots'], tuple(SHOT_NAMES), f'{dataset}: shots')
    check_choice(options['gallery_sampler'], GALLERY_SAMPLERS, f'{dataset}: gallery_sampler')
    check_num_trials(options['num_trials'], f'{dataset}: num_trials')
    check_choice(options['semantics'], SEMANTICS, f'{dataset}: semantics')


def sysu_settings(query_records: Sequence, gallery_records: Sequence, *,
                  dataset_name: str = 'sysu_mm01', search_modes: Sequence[str] = ('all', 'indoor'),
                  shots: Sequence[int] = (1, 10), gallery_sampler: str = 'auto', perm_file=None,
                  root=None, num_trials: int = 10, semantics: str = 'vireid') -> List[EvalSetting]:
    """SYSU-MM01 settings: search mode x shots, ``num_trials`` galleries each (§2.1, §2.5).

    Queries are every query record (IR cams 3 and 6) in every setting, direction 'ir2vis'.
    Gallery sampler:

    * ``'official_perm'``: the dataset's ``rand_perm_cam.mat``, looked up as ``perm_file`` then
      ``<root>/exp/rand_perm_cam.mat``; missing -> ``FileNotFoundError`` naming the places and
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
    shots = tuple(int(s) for s in shots)
    validate_options({'search_modes': tuple(search_modes), 'shots': shots,
                      'gallery_sampler': gallery_sampler, 'num_trials': num_trials,
                      'semantics': semantics}, dataset_name)
    removal, cmc_mode = protocol_rules('sysu', semantics)

    q_pids, q_cams = record_fields(query_records, 'query_records')
    g_pids, g_cams = record_fields(gallery_records, 'gallery_records')
    bad = sorted(set(q_cams.tolist()) - set(INFRARED_CAMERAS))
    if bad:
        raise ValueError(f'SYSU-MM01 query records must come from IR cameras {INFRARED_CAMERAS}; '
                         f'found cameras {bad}')
    test_ids = np.union1d(np.unique(q_pids), np.unique(g_pids))

    sampler, perm = gallery_sampler, None
    if gallery_sampler in ('auto', 'official_perm'):
        found, looked = find_sysu_perm_file(perm_file, root)
        if found is not None:
            sampler, perm = 'official_perm', read_sysu_perm_cached(found)
            if gallery_sampler == 'auto':
                announce(f'{dataset_name}: gallery sampler official_perm ({found})')
        elif gallery_sampler == 'official_perm':
            where = ', '.join(looked) if looked else 'nowhere (give perm_file= or root=)'
            raise FileNotFoundError(f'gallery_sampler official_perm needs rand_perm_cam.mat; '
                                    f'looked in: {where}. It is distributed in '
                                    f'{SYSU_PERM_SOURCE}; copy it to <root>/exp/ or pass '
                                    f'perm_file=')
        else:
            sampler = 'agw_seed'
            where = ', '.join(looked) if looked else 'no perm_file/root given'
            announce(f'{dataset_name}: no rand_perm_cam.mat ({where}); gallery sampler agw_seed '
                      f'(AGW-style random.Random(t) galleries, single-shot only)')
    if sampler == 'official_perm' and num_trials > perm.num_trials:
        raise ValueError(f'num_trials={num_trials} but {perm.source} has only '
                         f'{perm.num_trials} permutation rows')
    if sampler == 'agw_seed' and 10 in shots:
        if shots == (10,):
            raise ValueError('agw_seed galleries are single-shot only (no reference multi-shot '
                             'protocol exists); use gallery_sampler official_perm for multi-shot')
        announce(f'{dataset_name}: agw_seed is single-shot only: multi-shot settings skipped')
        shots = tuple(s for s in shots if s != 10)

    query_idx = np.arange(len(query_records), dtype=np.int64)
    pool = _ImagePool(gallery_records) if sampler == 'official_perm' else None
    folders = FolderGroups(gallery_records) if sampler == 'agw_seed' else None
    settings = []
    for mode in search_modes:
        cams = SEARCH_MODE_CAMERAS[mode]
        for s in shots:
            trials = []
            for t in range(int(num_trials)):
                if sampler == 'official_perm':
                    g = _official_perm_indices(pool, perm, t, cams, s, test_ids)
                else:
                    g = agw_seed_indices(folders, t, test_ids, cams)
                trials.append((query_idx, g))
            key = f'{dataset_name}/{mode}/{SHOT_NAMES[s]}/{sampler}{key_suffix(semantics)}'
            settings.append(EvalSetting(key, 'ir2vis', tuple(trials), removal, cmc_mode, sampler,
                                        semantics))
    return settings


@functools.lru_cache(maxsize=8)
def _read_perm_at(path: str, mtime_ns: int, size: int) -> SysuPermutation:
    return read_sysu_perm(path)


def read_sysu_perm_cached(path) -> SysuPermutation:
    """:func:`read_sysu_perm`, read once per (file, modification time) in a process."""
    st = os.stat(path)
    return _read_perm_at(os.path.abspath(os.fspath(path)), st.st_mtime_ns, st.st_size)


def settings_for(dataset) -> List[EvalSetting]:
    """The settings of a :class:`~torchreid_vi.data.sysu_mm01.SYSUMM01` test set."""
    o = dataset.protocol_options
    return sysu_settings(
        dataset.query, dataset.gallery, dataset_name=dataset.dataset_name,
        search_modes=tuple(o['search_modes']), shots=tuple(o['shots']),
        gallery_sampler=o['gallery_sampler'], perm_file=o['perm_file'] or None,
        root=dataset.dataset_root, num_trials=o['num_trials'], semantics=o['semantics'])
