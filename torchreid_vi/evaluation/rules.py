"""The protocols' rules in one place: which gallery items a query ignores, which CMC counts.

* removal rules: ``'location'`` (SYSU-MM01: a cam-3 query ignores every cam-2 gallery image),
  ``'same_pid_cam'`` (LLCM, torchreid: a query ignores its own pid in its own camera),
  ``'none'`` (RegDB);
* CMC modes: ``'identity'`` (de-duplicated by pid: SYSU, LLCM) and ``'image'`` (RegDB,
  torchreid);
* presets per dataset protocol and semantics (datasets_and_protocols.md §3.2):
  :func:`protocol_rules`; presets of :func:`~torchreid_vi.evaluation.metrics.evaluate_cross_modal`:
  :data:`PRESETS`;
* :func:`removed_mask` — the removal rule for one query, for code that draws ranked lists
  (visualisation) rather than scoring them.

Example::

    >>> import numpy as np
    >>> removed_mask('location', 1, 3, np.array([1, 2, 2]), np.array([1, 2, 4])).tolist()
    [False, True, False]
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

__all__ = ['REMOVALS', 'CMC_MODES', 'SEMANTICS', 'PRESETS', 'DIRECTIONS', 'LOCATION_QUERY_CAM',
           'LOCATION_GALLERY_CAM', 'protocol_rules', 'resolve_rules', 'removed_mask',
           'valid_queries']

REMOVALS = ('location', 'same_pid_cam', 'none')
CMC_MODES = ('identity', 'image')
SEMANTICS = ('vireid', 'torchreid', 'idkl')

# protocol name -> (removal, cmc_mode)
PRESETS: Dict[str, Tuple[str, str]] = {
    'sysu': ('location', 'identity'),
    'regdb': ('none', 'image'),
    'llcm': ('same_pid_cam', 'identity'),
    'torchreid': ('same_pid_cam', 'image'),
}

# §3.2: (dataset protocol, semantics) -> (removal, cmc_mode)
_SEMANTICS_TABLE: Dict[Tuple[str, str], Tuple[str, str]] = {
    ('sysu', 'vireid'): ('location', 'identity'),
    ('sysu', 'torchreid'): ('same_pid_cam', 'image'),
    ('sysu', 'idkl'): ('location', 'identity'),
    ('regdb', 'vireid'): ('none', 'image'),
    ('regdb', 'torchreid'): ('same_pid_cam', 'image'),
    ('regdb', 'idkl'): ('none', 'identity'),
    ('llcm', 'vireid'): ('same_pid_cam', 'identity'),
    ('llcm', 'torchreid'): ('same_pid_cam', 'image'),
    ('llcm', 'idkl'): ('none', 'identity'),
}
_DATASET_ALIASES = {'sysu': 'sysu', 'sysu_mm01': 'sysu', 'sysu-mm01': 'sysu', 'sysumm01': 'sysu',
                    'regdb': 'regdb', 'llcm': 'llcm'}

# SYSU-MM01 location rule: IR cam 3 films the room of VIS cam 2 (datasets_and_protocols.md §1.4).
LOCATION_QUERY_CAM = 3
LOCATION_GALLERY_CAM = 2
DIRECTIONS = ('ir2vis', 'vis2ir')


def protocol_rules(dataset_protocol: str, semantics: str = 'vireid') -> Tuple[str, str]:
    """(removal, cmc_mode) of a dataset protocol under a semantics (§3.2 table).

    Args:
        dataset_protocol: 'sysu' (also 'sysu_mm01'), 'regdb' or 'llcm'.
        semantics: 'vireid' (the standard VI-ReID protocols, default), 'torchreid' (torchreid's
            same-pid-same-cam rule with per-image CMC) or 'idkl' (IDKL's released evaluation).

    Example:
        >>> protocol_rules('sysu')
        ('location', 'identity')
        >>> protocol_rules('llcm', 'idkl')
        ('none', 'identity')
    """
    dataset = _DATASET_ALIASES.get(str(dataset_protocol).lower())
    if dataset is None:
        raise ValueError(f'unknown dataset protocol {dataset_protocol!r}; expected one of '
                         f'{sorted(set(_DATASET_ALIASES))}')
    if semantics not in SEMANTICS:
        raise ValueError(f'unknown semantics {semantics!r}; expected one of {SEMANTICS}')
    return _SEMANTICS_TABLE[(dataset, semantics)]


def resolve_rules(protocol: Optional[str], removal: Optional[str],
                  cmc_mode: Optional[str]) -> Tuple[str, str, str]:
    """(removal, cmc_mode, label) from a protocol preset and/or explicit keywords.

    Explicit ``removal``/``cmc_mode`` override the preset; without a preset both are required.
    ``label`` names the rule in error messages, e.g. ``"protocol 'sysu' (removal='location',
    cmc_mode='identity')"``.
    """
    if protocol is not None:
        if protocol not in PRESETS:
            raise ValueError(f'unknown protocol {protocol!r}; expected one of {sorted(PRESETS)} '
                             f'or None with explicit removal= and cmc_mode=')
        base_removal, base_cmc = PRESETS[protocol]
        removal = base_removal if removal is None else removal
        cmc_mode = base_cmc if cmc_mode is None else cmc_mode
    elif removal is None or cmc_mode is None:
        raise ValueError('give protocol= (one of %s) or both removal= %s and cmc_mode= %s'
                         % (sorted(PRESETS), REMOVALS, CMC_MODES))
    if removal not in REMOVALS:
        raise ValueError(f'unknown removal {removal!r}; expected one of {REMOVALS}')
    if cmc_mode not in CMC_MODES:
        raise ValueError(f'unknown cmc_mode {cmc_mode!r}; expected one of {CMC_MODES}')
    head = f'protocol {protocol!r} ' if protocol is not None else ''
    return removal, cmc_mode, f'{head}(removal={removal!r}, cmc_mode={cmc_mode!r})'


def removed_mask(removal: str, q_pid: int, q_cam: int, g_pids: np.ndarray,
                 g_cams: np.ndarray) -> np.ndarray:
    """``(n_gallery,)`` bool: which gallery items query ``(q_pid, q_cam)`` ignores under
    ``removal``."""
    if removal == 'location':
        return (g_cams == LOCATION_GALLERY_CAM) & (q_cam == LOCATION_QUERY_CAM)
    if removal == 'same_pid_cam':
        return (g_pids == q_pid) & (g_cams == q_cam)
    if removal == 'none':
        return np.zeros(len(g_pids), dtype=bool)
    raise ValueError(f'unknown removal {removal!r}; expected one of {REMOVALS}')


def valid_queries(removal: str, q_pids: np.ndarray, q_cams: np.ndarray, g_pids: np.ndarray,
                  g_cams: np.ndarray) -> np.ndarray:
    """``(n_query,)`` bool: which queries keep at least one true match in the gallery.

    Counts, per query, the gallery items of its pid and subtracts those the rule removes, without
    a distance matrix (validity depends on pids and cameras only).
    """
    q_pids, q_cams = np.asarray(q_pids, np.int64), np.asarray(q_cams, np.int64)
    g_pids, g_cams = np.asarray(g_pids, np.int64), np.asarray(g_cams, np.int64)
    ids, per_id = np.unique(g_pids, return_counts=True)
    at = np.minimum(np.searchsorted(ids, q_pids), max(len(ids) - 1, 0))
    kept = np.where(ids[at] == q_pids, per_id[at], 0) if len(ids) else np.zeros(len(q_pids))
    if removal == 'none':
        return kept > 0
    if removal == 'same_pid_cam':
        removed_cam = q_cams
    elif removal == 'location':
        removed_cam = np.where(q_cams == LOCATION_QUERY_CAM, LOCATION_GALLERY_CAM, -1)
    else:
        raise ValueError(f'unknown removal {removal!r}; expected one of {REMOVALS}')
    # items of the query's own pid in the removed camera: (pid, cam) pair counts
    cells, per_cell = np.unique(np.stack([g_pids, g_cams], 1), axis=0, return_counts=True)
    keys = cells[:, 0] * (1 << 20) + cells[:, 1]
    order = np.argsort(keys)
    keys, per_cell = keys[order], per_cell[order]
    wanted = q_pids * (1 << 20) + removed_cam
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    gone = np.where((keys[at] == wanted) & (removed_cam >= 0), per_cell[at], 0)
    return kept - gone > 0
