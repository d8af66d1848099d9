"""Cross-modal ranking metrics: CMC (per image or per identity), mAP and mINP.

One function, :func:`evaluate_cross_modal`, implements the definitions of the VI-ReID protocols
(datasets_and_protocols.md §3.1) for one query set against one gallery:

* **order**: each distance row is ranked ascending with a *stable* rule, so exact ties go to the
  lower gallery column (the §1.5 list order);
* **removal** (which gallery items a query ignores):

  - ``'location'`` (SYSU-MM01): a query from cam 3 ignores *every* cam-2 gallery image, whatever
    its pid (cam 3 is the IR camera in the room of cam 2);
  - ``'same_pid_cam'`` (LLCM, torchreid): a query ignores gallery images with its own pid *and*
    camera;
  - ``'none'`` (RegDB);

* **CMC**: ``'image'`` counts the kept rank of the first true match; ``'identity'`` first
  de-duplicates the kept list by pid (the official "max similarity per person"), so rank k means
  "the true person is among the first k distinct persons";
* **mAP / mINP**: always on the full kept list (never de-duplicated);
* queries without a kept true match are *invalid*: excluded from every mean and counted.

Protocol presets (``protocol=``):

=============  ================  ==========  =========================================
protocol       removal           CMC         equals
=============  ================  ==========  =========================================
``sysu``       ``location``      identity    official MATLAB, AGW ``eval_sysu``, IDKL
``regdb``      ``none``          image       AGW ``eval_regdb``
``llcm``       ``same_pid_cam``  identity    DEEN ``eval_llcm``
``torchreid``  ``same_pid_cam``  image       torchreid ``evaluate_rank`` (market1501)
=============  ================  ==========  =========================================

How it is fast (the references loop over queries in Python; torchreid's pure-Python path needs
~20 s for one SYSU multi-shot trial): for each chunk of queries the gallery columns are gathered
once, grouped by pid (location-removed items are overwritten with +inf; same-pid-cam removals,
all inside the query's own pid group, are counted out afterwards), and every row is sorted once
(numpy's SIMD sort of *values*, no argsort). The kept rank of each true match is then a batched
binary search into its sorted row, and the identity CMC compares the true person's best distance
with every other person's best distance (``np.minimum.reduceat`` over the pid groups). Rows where
a true match or the true person's best distance ties *exactly* with another value (only there
does the stable order decide) are redone on their stable ranks (one argsort of those rows), so the
result is always the stable-order definition. Chunks run on a small thread pool (numpy releases
the GIL); the result does not depend on the chunking.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .rules import (CMC_MODES, LOCATION_GALLERY_CAM, LOCATION_QUERY_CAM, PRESETS,  # noqa: F401
                    REMOVALS, resolve_rules)

__all__ = ['CrossModalResult', 'evaluate_cross_modal', 'DEFAULT_REPORT_RANKS']

DEFAULT_REPORT_RANKS = (1, 5, 10, 20)


@dataclass(frozen=True, eq=False)
class CrossModalResult:
    """Metrics of one query set against one gallery. All fractions in [0, 1], float64.

    Attributes:
        cmc: (max_rank,) float64; ``cmc[k-1]`` = fraction of valid queries whose true match (or
            true person, identity CMC) is within the first k. Read-only.
        mAP: mean average precision over valid queries.
        mINP: mean inverse negative penalty (#positives / kept rank of the last positive).
        num_valid: queries with at least one kept true match.
        num_query: all queries, valid or not.
        num_gallery: gallery size (before per-query removal).
        removal, cmc_mode: the rules used.
    """
    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid: int
    num_query: int
    num_gallery: int
    removal: str = ''
    cmc_mode: str = ''

    @property
    def num_invalid(self) -> int:
        return self.num_query - self.num_valid

    @property
    def max_rank(self) -> int:
        return int(len(self.cmc))

    def rank(self, k: int) -> float:
        """CMC at rank k (1-based); k must be <= max_rank."""
        if not 1 <= k <= self.max_rank:
            raise ValueError(f'rank {k} is outside the computed CMC (1..max_rank={self.max_rank}); '
                             f'evaluate with a larger max_rank')
        return float(self.cmc[k - 1])

    def as_dict(self, ranks: Sequence[int] = DEFAULT_REPORT_RANKS) -> dict:
        """JSON-ready dict: 'rank1', 'rank5', ... (fractions), 'mAP', 'mINP', counts and 'cmc'.

        Raises ValueError if a requested rank exceeds max_rank (§3.1.9).
        """
        out = {f'rank{k}': self.rank(int(k)) for k in ranks}
        out.update(mAP=float(self.mAP), mINP=float(self.mINP), num_valid=int(self.num_valid),
                   num_query=int(self.num_query), num_invalid=int(self.num_invalid),
                   num_gallery=int(self.num_gallery), removal=self.removal, cmc_mode=self.cmc_mode,
                   cmc=[float(v) for v in self.cmc])
        return out


# ------------------------------------------------------------------------------------------------
# input handling

def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()  # numpy has no bfloat16; float32 holds it exactly
        return x.cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(f'{name} must be a numpy array or torch tensor, '
                        f'got {type(x).__name__}') from exc


def _as_distance_matrix(distmat) -> np.ndarray:
    dist = _to_numpy(distmat, 'distmat')
    if dist.ndim != 2:
        raise ValueError(f'distmat must have shape (num_query, num_gallery), '
                         f'got shape {dist.shape}')
    if dist.dtype == np.float16:
        dist = dist.astype(np.float32)  # exact; keeps sorting in a native SIMD dtype
    elif dist.dtype.kind in 'iub':
        dist = dist.astype(np.float64)  # exact for |values| < 2**53
    elif dist.dtype not in (np.float32, np.float64):
        raise TypeError(f'distmat must hold real numbers, got dtype {dist.dtype}')
    # float32/float64 stay as they are: never downcast before sorting (§3.1.10).
    return _rows_contiguous(dist)


def _rows_contiguous(dist: np.ndarray) -> np.ndarray:
    """``dist`` itself if each row is contiguous in memory (every gather here reads rows), else
    a row-major copy. A transposed (column-major) matrix is copied with torch's tiled transpose:
    numpy's element-by-element copy of a large transposed view can take minutes (one TLB miss
    per element)."""
    if dist.shape[1] <= 1 or dist.strides[1] == dist.itemsize:
        return dist
    if dist.flags.f_contiguous and dist.flags.writeable:
        return torch.from_numpy(dist.T).t().contiguous().numpy()
    return np.ascontiguousarray(dist)


def _as_vector(x, name: str, length: int, what: str) -> np.ndarray:
    arr = _to_numpy(x, name)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise ValueError(f'{name} must have shape ({what},) = ({length},) to match distmat, '
                         f'got shape {arr.shape}')
    if arr.dtype.kind not in 'iuf' or (arr.dtype.kind == 'f' and np.isnan(arr).any()):
        raise TypeError(f'{name} must hold integer ids, got dtype {arr.dtype}')
    return arr


# ------------------------------------------------------------------------------------------------
# core

class _Gallery:
    """Gallery metadata shared by every query chunk of one call.

    Columns are read grouped by pid (stable), so each query's true matches are one contiguous
    range and the best distance per person is one ``np.minimum.reduceat``. ``full_cols`` index
    the caller's matrix (through ``gallery_index``; None = all columns in order), ``local_cols``
    index a block whose columns are in the caller's gallery order (used for rows with exact
    ties). ``room`` = grouped positions of the cam-2 columns (location rule).
    """

    def __init__(self, g_pids: np.ndarray, g_cams: np.ndarray, removal: str,
                 g_index: Optional[np.ndarray]):
        order = np.argsort(g_pids, kind='stable')
        group_order = None if np.array_equal(order, np.arange(len(g_pids))) else order
        self.pids, self.cams = g_pids[order], g_cams[order]
        self.g_index = g_index
        self.local_cols = group_order
        if g_index is None:
            self.full_cols = group_order
        else:
            self.full_cols = g_index if group_order is None else g_index[group_order]
        self.starts = np.flatnonzero(np.r_[True, self.pids[1:] != self.pids[:-1]])
        self.ids = self.pids[self.starts]
        self.sizes = np.diff(np.r_[self.starts, len(self.pids)])
        self.room = np.flatnonzero(self.cams == LOCATION_GALLERY_CAM) if removal == 'location' \
            else np.zeros(0, np.int64)


def _gather(full: np.ndarray, rows, cols: Optional[np.ndarray]) -> np.ndarray:
    """A fresh C-contiguous copy of ``full[rows][:, cols]`` (rows: slice or index array)."""
    if cols is None:
        return full[rows].copy() if isinstance(rows, slice) else full[rows]
    if isinstance(rows, slice):
        return np.take(full[rows], cols, axis=1)        # ~2x faster than np.ix_ indexing
    return full[np.ix_(rows, cols)]


def _searchsorted_rows(sorted_rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Row-wise ``searchsorted(side='left')``: (n, m) ascending rows, (n, k) values -> (n, k)."""
    return torch.searchsorted(torch.from_numpy(np.ascontiguousarray(sorted_rows)),
                              torch.from_numpy(np.ascontiguousarray(values))).numpy()


def _lookup(ids: np.ndarray, keys: np.ndarray):
    """(index of each key in sorted ``ids`` clipped to range, whether it is there)."""
    if len(ids) == 0:
        return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
    idx = np.minimum(np.searchsorted(ids, keys), len(ids) - 1)
    return idx, ids[idx] == keys


class _NaNRow(Exception):
    def __init__(self, row: int):
        self.row = row


def _block_metrics(sub, q_pids, q_cams, gal: _Gallery, removal, cmc_mode):
    """Metrics of k queries against the gallery; ``sub`` (k, m) is our own copy of their
    distances in the grouped column order, overwritten (removed items, then sorted in place).

    Returns per row (first, ap, inp, valid, tied).
    """
    k, m = sub.shape
    big = np.asarray(np.inf if sub.dtype.kind == 'f' else np.iinfo(sub.dtype).max, sub.dtype)
    in_room = (q_cams == LOCATION_QUERY_CAM) if len(gal.room) else np.zeros(k, bool)
    if in_room.any():
        # location rule: every cam-2 item of a cam-3 query ranks last and counts as removed
        sub[np.ix_(np.flatnonzero(in_room), gal.room)] = big

    # each query's own-pid columns -> (k, width) candidate true matches
    gid, has_id = _lookup(gal.ids, q_pids)
    size = np.where(has_id, gal.sizes[gid], 0)
    width = max(int(size.max()), 1)
    slot = np.arange(width)
    in_group = slot[None, :] < size[:, None]
    at = np.minimum(gal.starts[gid][:, None] + slot[None, :], m - 1)
    cand = np.take_along_axis(sub, at, axis=1)
    cand_cam = gal.cams[at]
    if removal == 'same_pid_cam':
        removed = (cand_cam == q_cams[:, None]) & in_group
    elif removal == 'location':
        removed = (cand_cam == LOCATION_GALLERY_CAM) & in_room[:, None] & in_group
    else:
        removed = None
    is_pos = in_group if removed is None else in_group & ~removed
    npos = is_pos.sum(1)
    valid = npos > 0
    pos_dist = np.where(is_pos, cand, big)
    pos_dist.sort(axis=1)                     # ascending true-match distances, padded
    in_row = slot[None, :] < npos[:, None]

    if cmc_mode == 'identity':
        best = np.minimum.reduceat(sub, gal.starts, axis=1)               # (k, n_ids)
        own = pos_dist[:, :1]
        own_col = best[np.arange(k), gid]
        # the own person's column is not "another person" (with same_pid_cam it may hold a
        # removed, closer item)
        closer = (best < own).sum(1) - (has_id & (own_col < own[:, 0]))
        same = (best == own).sum(1) - (has_id & (own_col == own[:, 0]))
    sub.sort(axis=1)
    if sub.dtype.kind == 'f' and np.isnan(sub[:, -1]).any():     # NaN sorts last
        raise _NaNRow(int(np.flatnonzero(np.isnan(sub[:, -1]))[0]))
    below = _searchsorted_rows(sub, pos_dist)                     # items strictly closer
    # the match itself sits at `below`; an equal value right after it is an exact tie
    after = np.take_along_axis(sub, np.minimum(below + 1, m - 1), axis=1)
    tied = ((below + 1 < m) & (after == pos_dist) & in_row).any(1)
    if removal == 'same_pid_cam':
        # removed items are same-pid columns counted in `below`: take them out (a removed item
        # equal to a match already marked the row tied); location-removed items sit at `big`
        below = below - _searchsorted_rows(np.sort(np.where(removed, cand, big), axis=1),
                                           pos_dist)
    kept_rank = below + 1                                         # (k, width), 1-based
    # sequential sum (cumsum): a row's AP must not depend on the chunk's padding width
    precision = np.where(in_row, (slot + 1)[None, :] / kept_rank, 0.0)
    ap = np.cumsum(precision, axis=1)[:, -1] / np.maximum(npos, 1)
    inp = npos / kept_rank[np.arange(k), np.maximum(npos - 1, 0)]
    if cmc_mode == 'image':
        first = kept_rank[:, 0].copy()
    else:
        first = closer + 1
        tied |= same > 0
    return first, ap, inp, valid, tied & valid


def _chunk_metrics(full, rows, q_pids, q_cams, gal: _Gallery, removal, cmc_mode,
                   local: bool = False):
    """Per-row (first, ap, inp, valid) of one chunk of queries (module docstring).

    ``full[rows]`` are the chunk's distance rows (``rows``: slice or index array); ``first`` is
    the kept rank of the first true match (image CMC) or the true person's rank in the
    de-duplicated kept list (identity CMC). Rows whose outcome depends on an exact tie are redone
    on their stable ranks (unique integers, so no tie is left).
    """
    sub = _gather(full, rows, gal.local_cols if local else gal.full_cols)
    first, ap, inp, valid, tied = _block_metrics(sub, q_pids, q_cams, gal, removal, cmc_mode)
    del sub
    if tied.any():
        r = np.flatnonzero(tied)
        row_ids = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
        block = _gather(full, row_ids[r], None if local else gal.g_index)   # caller's order
        f_r, ap_r, inp_r, _ = _chunk_metrics(_stable_keys(block), slice(0, len(r)), q_pids[r],
                                             q_cams[r], gal, removal, cmc_mode, local=True)
        first[r], ap[r], inp[r] = f_r, ap_r, inp_r
    return first, ap, inp, valid


def _stable_keys(block: np.ndarray) -> np.ndarray:
    """Integer keys, unique per row, that order each row exactly like a stable sort.

    float32: the value's order-preserving 32-bit integer in the high half and the column in the
    low half of an int64 (no sort needed); other dtypes: the stable rank of each column.
    """
    m = block.shape[1]
    if block.dtype == np.float32 and m < 2 ** 31:
        bits = (block + np.float32(0)).view(np.int32).astype(np.int64)   # -0.0 -> +0.0
        # negative floats: larger magnitude = smaller value, so mirror their integer order
        ordered = np.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)
        return (ordered << 32) | np.arange(m, dtype=np.int64)[None, :]
    ranks = np.empty(block.shape, np.int32 if m < 2 ** 31 - 1 else np.int64)
    np.put_along_axis(ranks, np.argsort(block, axis=1, kind='stable'),
                      np.arange(m, dtype=ranks.dtype)[None, :], axis=1)
    return ranks


def _default_threads() -> int:
    # torch's intra-op setting is the user's thread budget (torch.set_num_threads)
    return max(1, min(int(torch.get_num_threads()), os.cpu_count() or 1))


def _index(x, name: str, size: int, what: str) -> Optional[np.ndarray]:
    if x is None:
        return None
    idx = _to_numpy(x, name)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in 'iu'):
        raise ValueError(f'{name} must be a 1-D integer index array, got shape {idx.shape} '
                         f'dtype {idx.dtype}')
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        raise IndexError(f'{name} indexes {what} of distmat (size {size}); got values '
                         f'{idx.min()}..{idx.max()}')
    return idx


def evaluate_cross_modal(distmat, q_pids, g_pids, q_camids, g_camids,
                         protocol: Optional[str] = None, max_rank: int = 20, *,
                         removal: Optional[str] = None, cmc_mode: Optional[str] = None,
                         chunk_size: int = 2048,
                         query_index=None, gallery_index=None,
                         num_threads: Optional[int] = None) -> CrossModalResult:
    """Cross-modal CMC / mAP / mINP of one query set against one gallery (§3.1 definitions).

    Args:
        distmat: (num_query, num_gallery) distances, lower = closer (pass ``-similarity``);
            numpy array or torch tensor (any device), float32/float64 kept as they are, never
            downcast. NaN is rejected. Never modified.
        q_pids, g_pids: (num_query,), (num_gallery,) integer person ids.
        q_camids, g_camids: native camera ids (SYSU 1..6, LLCM 1..9, RegDB pseudo 1/2).
        protocol: 'sysu' | 'regdb' | 'llcm' | 'torchreid' preset (table in the module docstring),
            or None with explicit ``removal`` and ``cmc_mode``.
        max_rank: CMC length (always exactly this long; ranks past a query's list carry forward).
        removal: 'location' | 'same_pid_cam' | 'none'; overrides the preset.
        cmc_mode: 'identity' | 'image'; overrides the preset.
        chunk_size: queries processed per block (memory ~ 20 bytes x chunk_size x num_gallery
            per thread).
        query_index, gallery_index: optional 1-D index arrays: evaluate
            ``distmat[np.ix_(query_index, gallery_index)]`` without materialising it (a trial of
            a pooled distance matrix); the pids/cams then describe the selected rows/columns.
            Exact ties rank by position in ``gallery_index``.
        num_threads: worker threads over query chunks (numpy releases the GIL); default
            ``torch.get_num_threads()``. Results do not depend on it.

    Returns:
        :class:`CrossModalResult` (fractions, float64).

    Raises:
        ValueError: bad shapes, unknown rules, NaN distances, or no valid query (message names the
            rule and the counts).

    Example:
        >>> import numpy as np
        >>> d = np.array([[0.1, 0.5, 0.9], [0.8, 0.2, 0.3]])
        >>> r = evaluate_cross_modal(d, [1, 2], [1, 2, 2], [3, 6], [1, 2, 4], 'sysu', max_rank=2)
        >>> r.cmc.tolist(), round(r.mAP, 4), r.num_valid
        ([1.0, 1.0], 1.0, 2)
    """
    removal, cmc_mode, label = resolve_rules(protocol, removal, cmc_mode)
    dist = _as_distance_matrix(distmat)
    q_index = _index(query_index, 'query_index', dist.shape[0], 'rows')
    g_index = _index(gallery_index, 'gallery_index', dist.shape[1], 'columns')
    nq = dist.shape[0] if q_index is None else len(q_index)
    ng = dist.shape[1] if g_index is None else len(g_index)
    qp = _as_vector(q_pids, 'q_pids', nq, 'num_query')
    gp = _as_vector(g_pids, 'g_pids', ng, 'num_gallery')
    qc = _as_vector(q_camids, 'q_camids', nq, 'num_query')
    gc = _as_vector(g_camids, 'g_camids', ng, 'num_gallery')
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f'max_rank must be a positive int, got {max_rank!r}')
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f'chunk_size must be a positive int, got {chunk_size!r}')
    threads = _default_threads() if num_threads is None else int(num_threads)
    if threads < 1:
        raise ValueError(f'num_threads must be >= 1, got {num_threads!r}')
    max_rank = int(max_rank)
    if nq == 0 or ng == 0:
        raise ValueError(f'empty evaluation under {label}: {nq} queries x {ng} gallery items')

    gal = _Gallery(gp, gc, removal, g_index)
    if max_rank > len(gal.ids):
        warnings.warn(f'max_rank={max_rank} exceeds the {len(gal.ids)} distinct gallery ids: '
                      f'the CMC tail saturates (carried forward)', stacklevel=2)

    if nq * ng < 1_000_000:
        threads = 1                             # not worth a thread pool
    step = max(1, min(int(chunk_size), -(-nq // threads)))
    bounds = [(a, min(a + step, nq)) for a in range(0, nq, step)]

    def run(bound):
        a, b = bound
        rows = slice(a, b) if q_index is None else q_index[a:b]
        try:
            return _chunk_metrics(dist, rows, qp[a:b], qc[a:b], gal, removal, cmc_mode)
        except _NaNRow as bad:
            raise ValueError(f'distmat contains NaN in the distances of query {a + bad.row}; '
                             f'distances must be real numbers') from None

    if threads > 1 and len(bounds) > 1:
        with ThreadPoolExecutor(min(threads, len(bounds))) as pool:
            outputs = list(pool.map(run, bounds))      # ordered: sums below are deterministic
    else:
        outputs = [run(bd) for bd in bounds]

    # concatenated per-query values, summed once: the result does not depend on the chunking
    first, ap, inp, valid = (np.concatenate(parts) for parts in zip(*outputs))
    num_valid = int(valid.sum())
    hits = np.bincount(np.minimum(first[valid], max_rank + 1), minlength=max_rank + 2)
    ap_sum, inp_sum = float(ap[valid].sum()), float(inp[valid].sum())
    if num_valid == 0:
        raise ValueError(f'no valid query under {label}: 0 of {nq} queries have a kept true match '
                         f'among {ng} gallery items ({len(gal.ids)} gallery ids)')
    cmc = np.cumsum(hits[1:max_rank + 1]) / num_valid
    cmc.setflags(write=False)
    return CrossModalResult(cmc=cmc, mAP=ap_sum / num_valid, mINP=inp_sum / num_valid,
                            num_valid=num_valid, num_query=nq, num_gallery=ng,
                            removal=removal, cmc_mode=cmc_mode)
