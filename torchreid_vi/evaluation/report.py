"""Evaluate every setting and trial from ONE distance matrix, and format the results.

The engine extracts features once for ``dataset.query`` (IR test images) and ``dataset.gallery``
(VIS test images), computes the IR x VIS distance matrix once, and calls
:func:`evaluate_settings`; every trial is a slice of that matrix (datasets_and_protocols.md §4),
'vis2ir' settings use its transpose. Methods whose distances depend on the trial's gallery
(k-reciprocal re-ranking) pass a function instead of the matrix.

Example:
    >>> import numpy as np
    >>> from torchreid_vi.evaluation.protocols import generic_settings
    >>> ir = [('ir/a.jpg', 1, 2, 1), ('ir/b.jpg', 2, 2, 1)]
    >>> vis = [('v/a.jpg', 1, 1, 0), ('v/b.jpg', 2, 1, 0)]
    >>> dist = np.array([[0.1, 0.9], [0.8, 0.2]])
    >>> res = evaluate_settings(dist, ir, vis, generic_settings(ir, vis, dataset_name='toy'),
    ...                         max_rank=2)
    >>> res['toy/ir2vis'].mean['rank1'], res['toy/vis2ir'].mean['mAP']
    (1.0, 1.0)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .metrics import (
    DEFAULT_REPORT_RANKS,
    CrossModalResult,
    _as_distance_matrix,
    _as_distance_tensor,
    _default_threads,
    _evaluate_group,
    _resolve_backend,
    _RowReader,
    _torch_result,
    evaluate_cross_modal,
)
from .protocols.common import EvalSetting, record_fields

__all__ = ['SettingResult', 'evaluate_settings', 'format_table']

DistFn = Callable[[np.ndarray, np.ndarray, str], Union[np.ndarray, torch.Tensor]]
_METRICS = ('mAP', 'mINP')


@dataclass
class SettingResult:
    """All trials of one setting plus their mean and std (population std, ddof=0).

    ``mean``/``std`` hold 'rank1', 'rank5', 'rank10', 'rank20' (those <= max_rank), 'mAP' and
    'mINP' as fractions; ``mean_cmc`` is the mean CMC vector (§3.3: mean of per-trial values,
    never pooled over queries).
    """
    key: str
    direction: str
    per_trial: List[CrossModalResult]
    mean: Dict[str, float]
    std: Dict[str, float]
    mean_cmc: np.ndarray
    num_trials: int
    sampler: str
    semantics: str
    removal: str
    cmc_mode: str
    num_query: List[int] = field(default_factory=list)
    num_valid: List[int] = field(default_factory=list)
    num_gallery: List[int] = field(default_factory=list)

    @classmethod
    def from_trials(cls, setting: EvalSetting, per_trial: List[CrossModalResult],
                    ranks: Sequence[int] = DEFAULT_REPORT_RANKS) -> 'SettingResult':
        max_rank = per_trial[0].max_rank
        ranks = [int(k) for k in ranks if int(k) <= max_rank]
        table = {f'rank{k}': np.array([r.cmc[k - 1] for r in per_trial]) for k in ranks}
        table.update({m: np.array([getattr(r, m) for r in per_trial]) for m in _METRICS})
        return cls(key=setting.key, direction=setting.direction, per_trial=list(per_trial),
                   mean={k: float(v.mean()) for k, v in table.items()},
                   std={k: float(v.std()) for k, v in table.items()},
                   mean_cmc=np.mean([r.cmc for r in per_trial], axis=0),
                   num_trials=len(per_trial), sampler=setting.sampler,
                   semantics=setting.semantics, removal=setting.removal,
                   cmc_mode=setting.cmc_mode,
                   num_query=[r.num_query for r in per_trial],
                   num_valid=[r.num_valid for r in per_trial],
                   num_gallery=[r.num_gallery for r in per_trial])

    def as_dict(self) -> dict:
        """JSON-ready: unrounded fractions, the mean CMC and every trial's values."""
        ranks = [int(k[4:]) for k in self.mean if k.startswith('rank')]
        return {
            'key': self.key, 'direction': self.direction, 'sampler': self.sampler,
            'semantics': self.semantics, 'removal': self.removal, 'cmc_mode': self.cmc_mode,
            'num_trials': self.num_trials, 'mean': dict(self.mean), 'std': dict(self.std),
            'mean_cmc': [float(v) for v in self.mean_cmc],
            'num_query': list(self.num_query), 'num_valid': list(self.num_valid),
            'num_gallery': list(self.num_gallery),
            'per_trial': [r.as_dict(ranks) for r in self.per_trial],
        }


def _checked_fields(records: Sequence, what: str):
    """(pids, camids) of a non-empty record list (the parsing lives in protocols)."""
    if len(records) == 0:
        raise ValueError(f'{what} is empty')
    return record_fields(records, what)


def _check_indices(idx: np.ndarray, size: int, what: str) -> None:
    if len(idx) and (idx.min() < 0 or idx.max() >= size):
        raise IndexError(f'{what} holds indices outside 0..{size - 1}: min {idx.min()}, '
                         f'max {idx.max()}')


def evaluate_settings(dist_ir_vis: Union[np.ndarray, torch.Tensor, DistFn],
                      query_records: Sequence, gallery_records: Sequence,
                      settings: Sequence[EvalSetting], max_rank: int = 20, *,
                      chunk_size: Optional[int] = None,
                      backend: Optional[str] = None) -> Dict[str, SettingResult]:
    """Evaluate every setting (every trial) against one IR x VIS distance matrix.

    Args:
        dist_ir_vis: (len(query_records), len(gallery_records)) distances, lower = closer: rows =
            ``dataset.query`` (IR), columns = ``dataset.gallery`` (VIS); numpy or torch. Or a
            callable ``dist_fn(query_idx, gallery_idx, direction) -> (len(query_idx),
            len(gallery_idx))`` distances for trial-dependent distances (re-ranking); its indices
            follow the setting's direction (for 'vis2ir', query_idx indexes ``gallery_records``).
        query_records, gallery_records: ``dataset.query`` and ``dataset.gallery`` records
            (path, pid, camid, dsetid); native cameras are used by the removal rules.
        settings: from :mod:`torchreid_vi.evaluation.protocols`; keys must be unique.
        max_rank: CMC length.
        chunk_size: at most this many queries per block (default: sized to the caches; the
            extra memory is bounded by the block sizes, see :func:`evaluate_cross_modal`:
            ~4 MB of matrix rows per worker thread plus ~40 bytes per pool item on the compiled
            kernel (~5-16 MB of scratch on the numpy engines), and per-query results of ~25
            bytes per query and trial).
        backend: 'numpy', 'torch' or None (default: torch when ``dist_ir_vis`` is a tensor on a
            GPU: the matrix stays on its device and every metric is computed there; numpy
            otherwise). Both give the same results (the torch path to ~1e-16 in mAP/mINP).

    Returns:
        ``{setting.key: SettingResult}`` in the order of ``settings``.

    Re-ranking per trial (``q_feats`` rows = ``dataset.query``, ``g_feats`` = ``dataset.gallery``)::

        def dist_fn(q_idx, g_idx, direction):
            rows, cols = (q_feats, g_feats) if direction == 'ir2vis' else (g_feats, q_feats)
            return query_only_rerank(rows[q_idx], cols[g_idx])      # or k_reciprocal_distances

        results = evaluate_settings(dist_fn, dataset.query, dataset.gallery, settings)
    """
    keys = [s.key for s in settings]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f'duplicate setting keys: {dup}')
    ir_pids, ir_cams = _checked_fields(query_records, 'query_records')
    vis_pids, vis_cams = _checked_fields(gallery_records, 'gallery_records')
    dist_fn = dist_ir_vis if callable(dist_ir_vis) else None
    backend = None if dist_fn is not None else _resolve_backend(dist_ir_vis, backend)
    readers = {}
    if dist_fn is None:
        dist = (_as_distance_tensor(dist_ir_vis) if backend == 'torch'
                else _as_distance_matrix(dist_ir_vis))
        if tuple(dist.shape) != (len(query_records), len(gallery_records)):
            raise ValueError(f'dist_ir_vis must have shape (len(query_records), '
                             f'len(gallery_records)) = ({len(query_records)}, '
                             f'{len(gallery_records)}), got {tuple(dist.shape)}')
        if backend == 'torch':       # 'vis2ir' reads the transposed view on the same device
            readers = {'ir2vis': dist, 'vis2ir': dist.T}
        else:                        # 'vis2ir' reads it column-wise, in tiles (no full copy)
            readers = {'ir2vis': _RowReader(dist), 'vis2ir': _RowReader(dist.T)}
    threads = _default_threads()

    def sides(direction):
        if direction == 'ir2vis':
            return ir_pids, ir_cams, vis_pids, vis_cams
        return vis_pids, vis_cams, ir_pids, ir_cams

    per_trial: Dict[str, List[CrossModalResult]] = {s.key: [None] * s.num_trials for s in settings}
    groups: Dict[tuple, list] = {}         # (direction, query rows) -> trials of any setting
    for setting in settings:
        q_pids, _, g_pids, _ = sides(setting.direction)
        for t, (q_idx, g_idx) in enumerate(setting.trials):
            where = f'setting {setting.key!r} trial {t}'
            _check_indices(q_idx, len(q_pids), f'{where} query_idx')
            _check_indices(g_idx, len(g_pids), f'{where} gallery_idx')
            if backend == 'torch':
                q_pids, q_cams, g_pids, g_cams = sides(setting.direction)
                if len(q_idx) == 0 or len(g_idx) == 0:
                    raise ValueError(f'{where}: empty evaluation: {len(q_idx)} queries x '
                                     f'{len(g_idx)} gallery items')
                try:
                    per_trial[setting.key][t] = _torch_result(
                        readers[setting.direction], q_idx, g_idx, q_pids[q_idx], q_cams[q_idx],
                        g_pids[g_idx], g_cams[g_idx], setting.removal, setting.cmc_mode,
                        max_rank, f'(removal={setting.removal!r}, '
                        f'cmc_mode={setting.cmc_mode!r})', chunk_size)
                except ValueError as exc:
                    raise ValueError(f'{where}: {exc}') from exc
            elif dist_fn is None:
                groups.setdefault((setting.direction, q_idx.tobytes()), []).append(
                    (setting, t, where))
            else:
                d = _as_distance_matrix(dist_fn(q_idx, g_idx, setting.direction))
                if d.shape != (len(q_idx), len(g_idx)):
                    raise ValueError(f'{where}: dist_fn returned shape {d.shape}, expected '
                                     f'({len(q_idx)}, {len(g_idx)})')
                q_pids, q_cams, g_pids, g_cams = sides(setting.direction)
                try:
                    per_trial[setting.key][t] = evaluate_cross_modal(
                        d, q_pids[q_idx], g_pids[g_idx], q_cams[q_idx], g_cams[g_idx],
                        max_rank=max_rank, removal=setting.removal, cmc_mode=setting.cmc_mode,
                        chunk_size=chunk_size)
                except ValueError as exc:
                    raise ValueError(f'{where}: {exc}') from exc
    # trials against the same queries (any setting): one pass over their rows serves them all
    for (direction, _), members in groups.items():
        q_pids, q_cams, g_pids, g_cams = sides(direction)
        reader = readers[direction]
        q_idx = members[0][0].trials[members[0][1]][0]
        if len(q_idx) == 0:
            raise ValueError(f'{members[0][2]}: empty evaluation: 0 queries')
        q_index = None if (len(q_idx) == reader.shape[0] and np.array_equal(
            q_idx, np.arange(reader.shape[0]))) else q_idx
        trials = []
        for setting, t, where in members:
            g_idx = setting.trials[t][1]
            if len(g_idx) == 0:
                raise ValueError(f'{where}: empty evaluation: 0 gallery items')
            trials.append((g_idx, g_pids[g_idx], g_cams[g_idx], setting.removal,
                           setting.cmc_mode))
        res = _evaluate_group(reader, q_index, q_pids[q_idx], q_cams[q_idx], trials, max_rank,
                              threads, chunk_size, [w for _, _, w in members], stacklevel=3)
        for (setting, t, _), r in zip(members, res):
            per_trial[setting.key][t] = r
    return {s.key: SettingResult.from_trials(s, per_trial[s.key]) for s in settings}


def _pm(mean: float, std: float, num_trials: int) -> str:
    text = f'{100 * mean:6.2f}'
    return text + (f' ± {100 * std:5.2f}' if num_trials > 1 else '')


def _span(values: Sequence[int]) -> str:
    lo, hi = min(values), max(values)
    return f'{lo}' if lo == hi else f'{lo}-{hi}'


def format_table(results: Dict[str, SettingResult], title: str = '') -> str:
    """Plain-text table, one row per setting: CMC rank-1/5/10/20, mAP, mINP in percent (mean ±
    std over trials, 2 decimals), trials, valid/total queries and gallery size per trial."""
    metric_names = []
    for res in results.values():
        for k in res.mean:
            if k not in metric_names:
                metric_names.append(k)
    order = [k for k in metric_names if k.startswith('rank')] + [m for m in _METRICS
                                                                  if m in metric_names]
    header = ['setting'] + [('R' + k[4:]) if k.startswith('rank') else k for k in order] + [
        'trials', 'valid/query', 'gallery']
    rows = []
    for key, res in results.items():
        cells = [key]
        for k in order:
            cells.append(_pm(res.mean[k], res.std[k], res.num_trials) if k in res.mean else '-')
        cells += [str(res.num_trials), f'{_span(res.num_valid)}/{_span(res.num_query)}',
                  _span(res.num_gallery)]
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: '  '.join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [title] if title else []
    out += [line(header), '  '.join('-' * w for w in widths)] + [line(r) for r in rows]
    return '\n'.join(out)
