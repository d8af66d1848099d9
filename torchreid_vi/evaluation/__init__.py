"""Cross-modal evaluation: metrics, protocol rules, settings, reports, re-ranking, the evaluator.

* :mod:`.rules` — removal rules, CMC modes, the per-dataset/semantics table (one place).
* :func:`evaluate_cross_modal` — CMC (per image / per identity), mAP, mINP for one gallery.
* :mod:`.protocols` — one module per dataset protocol (SYSU-MM01, RegDB, LLCM, generic); settings
  are index arrays into one test set.
* :func:`evaluate_settings`, :func:`format_table` — every setting and trial from one distance
  matrix.
* :class:`CrossModalEvaluator` — features once, one distance matrix, every setting; no engine
  needed.
* :func:`k_reciprocal_distances`, :func:`query_only_rerank` — k-reciprocal re-ranking.
"""
from .evaluator import CrossModalEvaluator, EvalOptions
from .metrics import CrossModalResult, evaluate_cross_modal
from .protocols import (
                        PROTOCOLS,
                        EvalSetting,
                        SysuPermutation,
                        agw_seed_gallery,
                        find_sysu_perm_file,
                        generic_settings,
                        llcm_settings,
                        read_sysu_perm,
                        regdb_settings,
                        register_protocol,
                        settings_for,
                        sysu_gallery_official_perm,
                        sysu_settings,
)
from .report import SettingResult, evaluate_settings, format_table
from .rerank import k_reciprocal_distances, query_only_rerank
from .rules import CMC_MODES, REMOVALS, SEMANTICS, protocol_rules

__all__ = [
    'CrossModalResult', 'evaluate_cross_modal', 'protocol_rules', 'REMOVALS', 'CMC_MODES',
    'SEMANTICS', 'EvalSetting', 'PROTOCOLS', 'register_protocol', 'settings_for',
    'SysuPermutation', 'read_sysu_perm', 'find_sysu_perm_file', 'sysu_gallery_official_perm',
    'agw_seed_gallery', 'sysu_settings', 'regdb_settings', 'llcm_settings', 'generic_settings',
    'SettingResult', 'evaluate_settings', 'format_table', 'k_reciprocal_distances',
    'query_only_rerank', 'CrossModalEvaluator', 'EvalOptions',
]
