"""LLCM protocol (DEEN, CVPR 2023): both directions × 10 sampled galleries (§2.3).

Keys ``llcm/{ir2vis,vis2ir}`` (and ``llcm/legacy_deen_vis2ir`` on request: DEEN's double-swapped
"VIS to IR"); semantics 'idkl' gives IDKL's unsampled, no-removal evaluation
(``llcm/{direction}/idkl``).
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np

from ...data.llcm import TEST_NIR_CAMERAS, TEST_VIS_CAMERAS
from ..rules import DIRECTIONS, SEMANTICS, protocol_rules
from .common import (
    EvalSetting,
    FolderGroups,
    agw_seed_indices,
    check_choice,
    check_num_trials,
    check_subset,
    key_suffix,
    record_fields,
)

__all__ = ['llcm_settings', 'validate_options', 'settings_for']


def validate_options(options: dict, dataset: str = 'llcm') -> None:
    """Check the ``vi.llcm`` protocol options; ``ValueError`` names the key."""
    check_subset(options['directions'], DIRECTIONS, f'{dataset}: directions')
    check_num_trials(options['num_trials'], f'{dataset}: num_trials')
    if not isinstance(options['legacy_deen_vis2ir'], bool):
        raise ValueError(f'{dataset}: legacy_deen_vis2ir={options["legacy_deen_vis2ir"]!r}; '
                         f'expected True or False')
    check_choice(options['semantics'], SEMANTICS, f'{dataset}: semantics')


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
    validate_options({'directions': tuple(directions), 'num_trials': num_trials,
                      'legacy_deen_vis2ir': legacy_deen_vis2ir, 'semantics': semantics},
                     dataset_name)
    removal, cmc_mode = protocol_rules('llcm', semantics)
    nir_pids, nir_cams = record_fields(query_records, 'query_records')
    vis_pids, vis_cams = record_fields(gallery_records, 'gallery_records')
    nir_pool = np.flatnonzero(np.isin(nir_cams, TEST_NIR_CAMERAS))
    vis_pool = np.flatnonzero(np.isin(vis_cams, TEST_VIS_CAMERAS))
    test_ids = np.union1d(np.unique(nir_pids), np.unique(vis_pids))
    if semantics == 'idkl':
        all_nir = np.arange(len(query_records), dtype=np.int64)
        all_vis = np.arange(len(gallery_records), dtype=np.int64)
        return [EvalSetting(f'{dataset_name}/{d}/idkl', d,
                            ((all_nir, all_vis) if d == 'ir2vis' else (all_vis, all_nir),),
                            removal, cmc_mode, 'all', semantics) for d in directions]

    trials = range(int(num_trials))
    nir_folders, vis_folders = FolderGroups(query_records), FolderGroups(gallery_records)
    settings = []
    for d in directions:
        if d == 'ir2vis':
            pairs = tuple((nir_pool, agw_seed_indices(vis_folders, t, test_ids, TEST_VIS_CAMERAS))
                          for t in trials)
        else:
            pairs = tuple((vis_pool, agw_seed_indices(nir_folders, t, test_ids, TEST_NIR_CAMERAS))
                          for t in trials)
        settings.append(EvalSetting(f'{dataset_name}/{d}{key_suffix(semantics)}', d, pairs, removal,
                                    cmc_mode, 'agw_seed', semantics))
    if legacy_deen_vis2ir:
        pairs = tuple((agw_seed_indices(nir_folders, t, test_ids, TEST_NIR_CAMERAS), vis_pool)
                      for t in trials)
        settings.append(EvalSetting(f'{dataset_name}/legacy_deen_vis2ir{key_suffix(semantics)}',
                                    'ir2vis', pairs, removal, cmc_mode, 'agw_seed', semantics))
    return settings


def settings_for(dataset) -> List[EvalSetting]:
    """The settings of an :class:`~torchreid_vi.data.llcm.LLCM` test set."""
    o = dataset.protocol_options
    return llcm_settings(dataset.query, dataset.gallery, dataset_name=dataset.dataset_name,
                         directions=tuple(o['directions']), num_trials=o['num_trials'],
                         legacy_deen_vis2ir=o['legacy_deen_vis2ir'], semantics=o['semantics'])
