"""LLCM (Zhang & Wang, CVPR 2023): 1,064 ids, 9 cameras each recording visible (day) and
near-infrared (night) images; one fixed split (713 train ids / 351 test ids).

* train: ``idx/train_vis.txt`` and ``idx/train_nir.txt`` (``<relative path> <label>``); the pid is
  the **folder** (``vis/<pid4>/...``) and is relabelled here, the label column is not used.
* test: the ``test_vis/cam<k>/<pid4>/*.jpg`` and ``test_nir/cam<k>/<pid4>/*.jpg`` trees (the DEEN
  protocol samples its galleries from these folders); when ``idx/test_vis.txt`` /
  ``idx/test_nir.txt`` / ``idx/test_id.txt`` exist they are cross-checked and a mismatch is warned
  about (whether they list exactly the tree images is not documented).
* camera: the ``_c<k>_`` token of the file name (``0351_c06_s200656_f4830_nir.jpg`` → 6). Paths are
  parsed by components, so a data root whose name contains "cam" (``/data/webcam/LLCM``) parses
  like any other (DEEN takes the first "cam" anywhere in the absolute path).

``query`` = all NIR test images (INFRARED), ``gallery`` = all visible test images (VISIBLE).
"""
from __future__ import annotations

import os
import os.path as osp
import re
import warnings
from collections import Counter
from typing import List

from .base import INFRARED, VISIBLE, CrossModalDataset
from .io import DataFormatError, note_read, parse_id_list, parse_idx_file, safe_join

__all__ = ['LLCM', 'camera_of', 'TEST_VIS_CAMERAS', 'TEST_NIR_CAMERAS']

_CAM_TOKEN = re.compile(r'_c(\d+)_')
# Cameras of the test trees the DEEN protocol samples from; there is no test_nir/cam3.
TEST_VIS_CAMERAS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
TEST_NIR_CAMERAS = (1, 2, 4, 5, 6, 7, 8, 9)
_WORD = {VISIBLE: 'vis', INFRARED: 'nir'}


def camera_of(file_name: str, where: str = '') -> int:
    """The camera of an LLCM file name: the number in its first ``_c<k>_`` token.

    >>> camera_of('0351_c06_s200656_f4830_nir.jpg')
    6
    """
    m = _CAM_TOKEN.search(file_name)
    if m is None:
        raise DataFormatError(f'llcm: {where or file_name}: no "_c<camera>_" token in the file '
                              f'name; expected <pid4>_c<cam2>_s<seq>_f<frame>_<vis|nir>.jpg')
    return int(m.group(1))


class LLCM(CrossModalDataset):
    """LLCM with the DEEN protocol's test trees.

    Options:
        directions: ``('ir2vis', 'vis2ir')`` or a subset.
        num_trials: gallery draws (seeds 0..n-1) averaged per direction (10).
        legacy_deen_vis2ir: also report DEEN's double-swapped "VIS→IR" numbers (off).
        semantics: ``'vireid'`` (default), ``'torchreid'`` or ``'idkl'``.
    """

    name = 'llcm'
    dataset_dir = 'LLCM'
    layout = (
        'LLCM/\n'
        '  idx/train_vis.txt train_nir.txt   lines "<relative path> <label>"\n'
        '  idx/test_vis.txt test_nir.txt test_id.txt   optional, cross-checked\n'
        '  vis/<pid4>/<pid4>_c<cam2>_s<seq>_f<frame>_vis.jpg\n'
        '  nir/<pid4>/<pid4>_c<cam2>_s<seq>_f<frame>_nir.jpg\n'
        '  test_vis/cam1 ... cam9/<pid4>/*.jpg\n'
        '  test_nir/cam1 ... cam9/<pid4>/*.jpg   (no cam3)'
    )
    layout_markers = ('idx', 'test_vis', 'test_nir')
    default_options = {'directions': ('ir2vis', 'vis2ir'), 'num_trials': 10,
                       'legacy_deen_vis2ir': False, 'semantics': 'vireid'}
    parse_options = ()

    protocol = 'llcm'

    def validate_options(self, options):
        from ..evaluation.protocols.llcm import validate_options
        validate_options(options, self.name)

    # ------------------------------------------------------------------------------------------
    def load_records(self, dataset_root):
        idx_dir = self.require(osp.join(dataset_root, 'idx'), 'index folder')
        train = []
        for modality in (VISIBLE, INFRARED):
            path = self.require(osp.join(idx_dir, f'train_{_WORD[modality]}.txt'),
                                'train index file')
            for line in parse_idx_file(path):
                where = f'{path}, line {line.line_no}'
                img = safe_join(dataset_root, line.rel_path, source=where)
                parts = line.rel_path.replace('\\', '/').split('/')
                if len(parts) < 3 or not parts[-2].isdigit():
                    raise DataFormatError(f'{where}: "{line.rel_path}" is not '
                                          f'<vis|nir>/<pid4>/<file>.jpg')
                if parts[-3] == _WORD[1 - modality]:
                    raise DataFormatError(f'{where}: "{line.rel_path}" is listed as '
                                          f'{_WORD[modality]} but lies in "{parts[-3]}/"')
                train.append((img, int(parts[-2]), camera_of(parts[-1], where), modality))
        self.require_files([r[0] for r in train])

        test = []
        for modality in (VISIBLE, INFRARED):
            tree = self.require(osp.join(dataset_root, f'test_{_WORD[modality]}'), 'test folder')
            test += self._walk_test_tree(tree, modality)
            self._cross_check(idx_dir, modality, test)
        self._cross_check_ids(idx_dir, {r[1] for r in test})

        leak = sorted({r[1] for r in train} & {r[1] for r in test})
        if leak:
            raise DataFormatError(f'llcm: {len(leak)} pids are both in the train index files and '
                                  f'in the test trees (first: {leak[:5]})')
        return (train, [r for r in test if r[3] == INFRARED],
                [r for r in test if r[3] == VISIBLE])

    def _walk_test_tree(self, tree: str, modality: int) -> List[tuple]:
        """Records ``(path, pid, cam, modality)`` of ``test_<m>/cam<k>/<pid4>/*.jpg``."""
        out, disagree = [], []
        note_read(tree)
        with os.scandir(tree) as cams:
            cam_dirs = sorted((e for e in cams if e.is_dir()), key=lambda e: e.name)
        for cam_entry in cam_dirs:
            m = re.fullmatch(r'cam(\d+)', cam_entry.name)
            if m is None:
                raise DataFormatError(f'llcm: folder {cam_entry.path} is not cam<k>; expected '
                                      f'test_{_WORD[modality]}/cam<k>/<pid4>/*.jpg')
            folder_cam = int(m.group(1))
            with os.scandir(cam_entry.path) as pids:
                pid_dirs = [e for e in pids if e.is_dir()]
            for pid_entry in pid_dirs:
                if not pid_entry.name.isdigit():
                    raise DataFormatError(f'llcm: folder {pid_entry.path} is not a pid folder '
                                          f'(<pid4>)')
                pid = int(pid_entry.name)
                with os.scandir(pid_entry.path) as files:
                    for f in files:
                        if not f.name.endswith('.jpg'):
                            continue
                        cam = camera_of(f.name, f.path)
                        if cam != folder_cam:
                            disagree.append(f.path)
                        out.append((f.path, pid, cam, modality))
        if disagree:
            warnings.warn(f'llcm: {len(disagree)} test images lie in a cam<k> folder other than '
                          f'their file name\'s _c<k>_ camera (first: {disagree[0]}); the file '
                          f'name camera is used', stacklevel=2)
        return out

    def _cross_check(self, idx_dir: str, modality: int, test: List[tuple]) -> None:
        """Warn when ``idx/test_<m>.txt`` exists and lists other file names than the tree."""
        path = osp.join(idx_dir, f'test_{_WORD[modality]}.txt')
        if not osp.exists(path):
            return
        listed = Counter(osp.basename(line.rel_path.replace('\\', '/'))
                         for line in parse_idx_file(path))
        found = Counter(osp.basename(r[0]) for r in test if r[3] == modality)
        if listed != found:
            only_idx, only_tree = listed - found, found - listed
            warnings.warn(
                f'llcm: {path} and the test_{_WORD[modality]}/ tree disagree: '
                f'{sum(only_idx.values())} file names only in the index file, '
                f'{sum(only_tree.values())} only in the tree; the tree is used', stacklevel=2)

    def _cross_check_ids(self, idx_dir: str, tree_pids) -> None:
        path = osp.join(idx_dir, 'test_id.txt')
        if not osp.exists(path):
            return
        listed = set(parse_id_list(path))
        if listed != set(tree_pids):
            warnings.warn(f'llcm: {path} lists {len(listed)} test ids, the test trees hold '
                          f'{len(set(tree_pids))} ({len(listed ^ set(tree_pids))} differ); the '
                          f'trees are used', stacklevel=2)
