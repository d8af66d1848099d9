"""SYSU-MM01 (Wu et al., ICCV 2017): 6 cameras, 4 visible (1, 2, 4, 5) and 2 infrared (3, 6).

Splits follow every reference code base: train = ``train_id`` ∪ ``val_id`` (395 ids on the real
data), test = ``test_id`` (96 ids). ``query`` = every cam3 and cam6 image of the test ids (the IR
side); ``gallery`` = every cam1, 2, 4 and 5 image of the test ids (the visible candidate pool that
the single/multi-shot protocols sample per trial, see
``torchreid_vi.evaluation.protocols.sysu_mm01``).

Paths are parsed by components (``cam<c>/<pid>/<n>.jpg``), never by character offsets, and only
``*.jpg`` files are taken.

Example (on a synthetic tree)::

    >>> from torchreid_vi.data.sysu_mm01 import SYSUMM01
    >>> ds = SYSUMM01(root='reid-data', mode='query', search_modes=('all',),
    ...               shots=(1,))                                           # doctest: +SKIP
    >>> ds.summary()['query']['ir']['cams']                                 # doctest: +SKIP
    [3, 6]
"""
from __future__ import annotations

import os
import os.path as osp
import warnings
from typing import List, Set

from .base import INFRARED, VISIBLE, CrossModalDataset
from .io import DataFormatError, note_read, parse_id_list

__all__ = ['SYSUMM01', 'CAMERAS', 'INFRARED_CAMERAS', 'GALLERY_SAMPLERS']

CAMERAS = (1, 2, 3, 4, 5, 6)
INFRARED_CAMERAS = (3, 6)  # the query side of every protocol; cams 1, 2, 4, 5 are visible
GALLERY_SAMPLERS = ('auto', 'official_perm', 'agw_seed')


class SYSUMM01(CrossModalDataset):
    """SYSU-MM01 with the official splits; modality = infrared iff camera ∈ {3, 6}.

    Options (constructor keywords; config keys of the same names):
        search_modes: ``('all', 'indoor')`` or a subset.
        shots: gallery images per (pid, camera): ``(1, 10)`` or a subset (1 = single-shot).
        gallery_sampler: ``'auto'`` (official permutation file when found, else ``agw_seed``),
            ``'official_perm'`` or ``'agw_seed'``.
        perm_file: explicit ``rand_perm_cam.mat``; default ``<dataset>/exp/rand_perm_cam.mat``.
        num_trials: gallery draws averaged per setting (10).
        semantics: ``'vireid'`` (default), ``'torchreid'`` or ``'idkl'``.
    """

    name = 'sysu_mm01'
    dataset_dir = 'SYSU-MM01'
    layout = (
        'SYSU-MM01/\n'
        '  cam1/ ... cam6/           cam3, cam6 infrared; others visible\n'
        '    0001/ ... 0533/         4-digit pid folders\n'
        '      0001.jpg 0002.jpg ...\n'
        '  exp/\n'
        '    train_id.txt val_id.txt test_id.txt   one line "1,2,4,..."\n'
        '    rand_perm_cam.mat                     optional: official gallery permutations'
    )
    layout_markers = ('exp', 'cam1')
    default_options = {
        'search_modes': ('all', 'indoor'),
        'shots': (1, 10),
        'gallery_sampler': 'auto',
        'perm_file': '',
        'num_trials': 10,
        'semantics': 'vireid',
    }
    parse_options = ()  # all options only affect evaluation

    protocol = 'sysu_mm01'

    def validate_options(self, options):
        from ..evaluation.protocols.sysu_mm01 import validate_options
        validate_options(options, self.name)

    # ------------------------------------------------------------------------------------------
    def _read_ids(self, exp_dir: str, split: str) -> List[int]:
        txt = osp.join(exp_dir, f'{split}_id.txt')
        if osp.exists(txt):
            return parse_id_list(txt)
        mat = osp.join(exp_dir, f'{split}_id.mat')
        if osp.exists(mat):  # the official release also ships .mat twins {'id': (1, N)}
            import scipy.io
            note_read(mat)
            return [int(v) for v in scipy.io.loadmat(mat)['id'].ravel()]
        raise self.layout_error(f'{split} id list not found', txt)

    def load_records(self, dataset_root):
        exp_dir = self.require(osp.join(dataset_root, 'exp'), 'split folder')
        ids = {s: self._read_ids(exp_dir, s) for s in ('train', 'val', 'test')}
        train_ids: Set[int] = set(ids['train']) | set(ids['val'])
        test_ids: Set[int] = set(ids['test'])
        leak = sorted(train_ids & test_ids)
        if leak:
            raise DataFormatError(
                f'sysu_mm01: {len(leak)} ids are in both train/val and test id lists of '
                f'{exp_dir} (first: {leak[:5]}); the splits must be disjoint')

        train, query, gallery = [], [], []
        for cam in CAMERAS:
            modality = INFRARED if cam in INFRARED_CAMERAS else VISIBLE
            cam_dir = self.require(osp.join(dataset_root, f'cam{cam}'), 'camera folder')
            note_read(cam_dir)
            for pid, pid_dir in _pid_folders(cam_dir):
                if pid in train_ids:
                    target = train
                elif pid in test_ids:
                    target = query if cam in INFRARED_CAMERAS else gallery
                else:
                    continue
                target.extend((path, pid, cam, modality) for path in _jpg_paths(pid_dir))
        for split, ids, records in (('train/val', train_ids, train),
                                    ('test', test_ids, query + gallery)):
            empty = sorted(ids - {r[1] for r in records})
            if empty:
                warnings.warn(f'sysu_mm01: {len(empty)} {split} id(s) listed in {exp_dir} have '
                              f'no images under cam1..cam6 (first: {empty[0]}); they are left '
                              f'out', stacklevel=2)
        # The base sorts by (pid, camera, file name): 4-digit names make that numeric order.
        return train, query, gallery


def _pid_folders(cam_dir: str):
    """``(pid, folder)`` for every pid folder of a camera folder (names must be integers)."""
    out = []
    with os.scandir(cam_dir) as it:
        for entry in it:
            if not entry.is_dir():
                continue
            if not entry.name.isdigit():
                raise DataFormatError(f'sysu_mm01: folder {entry.path} is not a pid folder; '
                                      f'expected cam<c>/<4-digit pid>/<n>.jpg')
            out.append((int(entry.name), entry.path))
    return out


def _jpg_paths(pid_dir: str) -> List[str]:
    paths = []
    with os.scandir(pid_dir) as it:
        for entry in it:
            if entry.name.endswith('.jpg'):
                if not entry.name[:-4].isdigit():
                    raise DataFormatError(f'sysu_mm01: image {entry.path} is not named '
                                          f'<n>.jpg with a numeric n (e.g. 0001.jpg)')
                paths.append(entry.path)
    return paths

