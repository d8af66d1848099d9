"""Cross-modal evaluation: metrics, protocol settings, multi-trial reports and re-ranking.

* :func:`evaluate_cross_modal` — CMC (per image / per identity), mAP, mINP for one gallery.
* :mod:`.protocols` — SYSU-MM01 / RegDB / LLCM / generic settings (galleries as index arrays).
* :func:`evaluate_settings`, :func:`format_table` — every setting and trial from one distance
  matrix.
* :func:`k_reciprocal_distances`, :func:`query_only_rerank` — k-reciprocal re-ranking.
"""
from .protocols import (EvalSetting, SysuPermutation, agw_seed_gallery, find_sysu_perm_file,
                        generic_settings, llcm_settings, read_sysu_perm, regdb_settings,
                        sysu_gallery_official_perm, sysu_settings)
from .rank import (CMC_MODES, PROTOCOLS, REMOVALS, SEMANTICS, CrossModalResult,
                   evaluate_cross_modal, protocol_rules)
from .report import SettingResult, evaluate_settings, format_table
from .rerank import k_reciprocal_distances, query_only_rerank

__all__ = [
    'CrossModalResult', 'evaluate_cross_modal', 'protocol_rules', 'PROTOCOLS', 'REMOVALS',
    'CMC_MODES', 'SEMANTICS',
    'EvalSetting', 'SysuPermutation', 'read_sysu_perm', 'find_sysu_perm_file',
    'sysu_gallery_official_perm', 'agw_seed_gallery', 'sysu_settings', 'regdb_settings',
    'llcm_settings', 'generic_settings',
    'SettingResult', 'evaluate_settings', 'format_table',
    'k_reciprocal_distances', 'query_only_rerank',
]
