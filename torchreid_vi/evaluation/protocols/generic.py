"""The generic protocol of a user dataset: every IR image against every VIS image, one trial.

Defaults to torchreid's rule (same pid and camera removed, per-image CMC); a dataset may declare
``directions``, ``removal`` and ``cmc_mode`` among its options to change that. Keys
``{dataset_name}/{direction}``.
"""
from __future__ import annotations

from typing import List, Sequence

from ..rules import CMC_MODES, DIRECTIONS, REMOVALS
from .common import EvalSetting, check_choice, check_subset, full_trial

__all__ = ['generic_settings', 'settings_for', 'OPTION_NAMES']

# Dataset options this protocol reads (when the dataset declares them).
OPTION_NAMES = ('directions', 'removal', 'cmc_mode')


def generic_settings(query_records: Sequence, gallery_records: Sequence, *, dataset_name: str,
                     directions: Sequence[str] = DIRECTIONS, removal: str = 'same_pid_cam',
                     cmc_mode: str = 'image') -> List[EvalSetting]:
    """One all-images trial per direction under ``removal`` / ``cmc_mode``."""
    check_subset(directions, DIRECTIONS, f'{dataset_name}: directions')
    check_choice(removal, REMOVALS, f'{dataset_name}: removal')
    check_choice(cmc_mode, CMC_MODES, f'{dataset_name}: cmc_mode')
    return [EvalSetting(f'{dataset_name}/{d}', d, full_trial(d, query_records, gallery_records),
                        removal, cmc_mode, 'all', 'generic') for d in directions]


def settings_for(dataset) -> List[EvalSetting]:
    """Settings of any cross-modal dataset without a protocol of its own."""
    opts = {k: v for k, v in dataset.protocol_options.items() if k in OPTION_NAMES}
    return generic_settings(dataset.query, dataset.gallery, dataset_name=dataset.dataset_name,
                            **opts)
