"""RegDB protocol: one split per trial, all test images, both directions (§2.2).

Keys ``regdb/trial{t}/{t2v,v2t}``: 't2v' = thermal queries against the visible gallery
('ir2vis'), 'v2t' the other way round. The 10 splits are 10 models: average the per-split results
(the key carries the split).
"""
from __future__ import annotations

from typing import List, Sequence

from ..rules import SEMANTICS, protocol_rules
from .common import EvalSetting, check_choice, check_subset, full_trial, key_suffix

__all__ = ['regdb_settings', 'validate_options', 'settings_for', 'DIRECTION_NAMES']

# RegDB's direction names -> the evaluator's
DIRECTION_NAMES = {'t2v': 'ir2vis', 'v2t': 'vis2ir'}


def validate_options(options: dict, dataset: str = 'regdb') -> None:
    """Check the ``directions`` and ``semantics`` of ``vi.regdb``; ``ValueError`` names the key."""
    check_subset(options['directions'], tuple(DIRECTION_NAMES), f'{dataset}: directions')
    check_choice(options['semantics'], SEMANTICS, f'{dataset}: semantics')


def regdb_settings(query_records: Sequence, gallery_records: Sequence, *,
                   dataset_name: str = 'regdb', trial: int = 1,
                   directions: Sequence[str] = ('t2v', 'v2t'),
                   semantics: str = 'vireid') -> List[EvalSetting]:
    """RegDB settings of one split: all test images, no sampling, one trial each.

    ``query_records`` = thermal test images of split ``trial`` (1..10), ``gallery_records`` =
    visible ones. Keys ``{dataset_name}/trial{t}/{t2v|v2t}``.
    """
    validate_options({'directions': tuple(directions), 'semantics': semantics}, dataset_name)
    removal, cmc_mode = protocol_rules('regdb', semantics)
    return [EvalSetting(f'{dataset_name}/trial{trial}/{d}{key_suffix(semantics)}',
                        DIRECTION_NAMES[d],
                        full_trial(DIRECTION_NAMES[d], query_records, gallery_records),
                        removal, cmc_mode, 'all', semantics)
            for d in directions]


def settings_for(dataset) -> List[EvalSetting]:
    """The settings of a :class:`~torchreid_vi.data.regdb.RegDB` test set (one trial)."""
    o = dataset.protocol_options
    return regdb_settings(dataset.query, dataset.gallery, dataset_name=dataset.dataset_name,
                          trial=o['trial'], directions=tuple(o['directions']),
                          semantics=o['semantics'])
