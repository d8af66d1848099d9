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
~20 s for one SYSU multi-shot trial). Every trial that shares a query set (a whole SYSU report:
40 trials) is evaluated in one pass over the query rows of the distance matrix, block by block
(``_drive``). With numba installed, every trial with an ascending gallery (all of the built-in
protocols') goes to the compiled kernel of :mod:`.compiled`, which sorts nothing: it bins each
row's items between the query's true matches and counts every trial's members per bin, all
trials at once (a SYSU report: ~0.07 s, 0.2x the distance matmul). Without numba, each block
goes to two kinds of numpy engines, which give the same numbers to the bit:

* **trial batches** (``_BatchEngine``; sparse galleries such as single-shot ones, LLCM): the
  galleries of all trials of a rule are gathered side by side and every row is sorted once
  (numpy's SIMD sort of *values*, no argsort); the kept rank of each true match is a batched
  binary search into its sorted row. Removed items are overwritten with +inf (under the location
  rule the cam-2 columns are ordered last, so a cam-3 query overwrites one slice). The identity
  CMC counts the distinct persons among the few items below the best true match
  (``np.flatnonzero`` of one comparison). Rows where a true match ties *exactly* with another
  value (only there does the stable order decide) are redone on stable integer keys.
* **the pooled engine** (``_Pool``; dense galleries that are ascending subsets of one pool of
  columns, e.g. SYSU's multi-shot ones): each query's pool row is sorted once, exactly, on int64
  keys (float bits | column: no ties left), and each trial's kept ranks are prefix sums of the
  trial's membership along that order, all trials at once in packed bit fields
  (``np.add.reduceat`` between the query's own-pid positions). Identity ranks are read off a
  window of the sorted row (exact, or capped past ``max_rank``); the rare rest is recomputed.

Both engines give the same numbers to the bit (one shared AP/INP reduction); a dispatch cost
model calibrated on ``benchmarks/bench_eval.py`` picks one per trial. Blocks run on a small
thread pool (numpy and the compiled kernel release the GIL); results do not depend on the
blocking.

On a GPU (``backend='torch'``, the default for a CUDA tensor) the same definitions run in torch
on the device: one stable sort per row, cumulative sums, ``scatter_reduce('amin')``.
"""
from __future__ import annotations

import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .rules import (  # noqa: F401
    CMC_MODES,
    LOCATION_GALLERY_CAM,
    LOCATION_QUERY_CAM,
    PRESETS,
    REMOVALS,
    resolve_rules,
)

__all__ = ['CrossModalResult', 'evaluate_cross_modal', 'DEFAULT_REPORT_RANKS', 'BACKENDS']

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
    # float32/float64 stay as they are: never downcast before sorting (§3.1.10). Any memory
    # layout is accepted: _RowReader reads rows of it efficiently.
    return dist


def _as_vector(x, name: str, length: int, what: str) -> np.ndarray:
    arr = _to_numpy(x, name)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise ValueError(f'{name} must have shape ({what},) = ({length},) to match distmat, '
                         f'got shape {arr.shape}')
    if arr.dtype.kind not in 'iuf' or (arr.dtype.kind == 'f' and np.isnan(arr).any()):
        raise TypeError(f'{name} must hold integer ids, got dtype {arr.dtype}')
    return arr


# ------------------------------------------------------------------------------------------------
# reading rows of the distance matrix

class _RowReader:
    """C-contiguous ``(k, num_columns)`` blocks of rows of a 2-D distance matrix, any layout.

    A row-major matrix is read in place (a slice of rows is a view). A column-major one (e.g. the
    IR x VIS matrix read as VIS x IR) is transposed block by block, ``_TILE`` source rows at a
    time: a whole-matrix transpose of the LLCM matrix takes ~0.6 s (one TLB miss per element),
    tiles that fit the TLB ~1 ns per element. Any other layout is copied once.
    """
    _TILE = 512

    def __init__(self, dist: np.ndarray):
        self.shape = dist.shape
        self.dtype = dist.dtype
        self.major = None
        if dist.shape[1] <= 1 or dist.strides[1] == dist.itemsize:
            self.rows = dist
        elif dist.shape[0] <= 1 or dist.strides[0] == dist.itemsize:
            self.rows, self.major = None, dist.T              # (num_columns, num_rows), C order
        else:
            self.rows = np.ascontiguousarray(dist)

    def __call__(self, rows) -> np.ndarray:
        """Rows ``rows`` (slice or int64 index array) as a C-contiguous array; a view if it can."""
        if self.major is None:
            return self.rows[rows] if isinstance(rows, slice) else np.take(self.rows, rows, axis=0)
        src = self.major
        count = len(range(*rows.indices(self.shape[0]))) if isinstance(rows, slice) else len(rows)
        out = np.empty((count, src.shape[0]), src.dtype)
        for a in range(0, src.shape[0], self._TILE):
            tile = src[a:a + self._TILE]
            out[:, a:a + self._TILE] = (tile[:, rows] if isinstance(rows, slice)
                                        else np.take(tile, rows, axis=1)).T
        return out


# ------------------------------------------------------------------------------------------------
# galleries: T trials of one setting in one padded layout

@dataclass
class _Kind:
    """The gallery columns of each trial, padded to one width.

    Columns are in gallery order, except that under the location rule the cam-2 columns come
    last, so a cam-3 query removes them by overwriting one slice with +inf. Each pid's columns
    are listed in ``own`` (a query's true matches are gathered through it).
    Shapes: T trials, M = the largest gallery, V = pids in the union of the galleries.

    Attributes:
        cols: (T * M,) int64 matrix columns to read, trial after trial (pads repeat a real one).
        M: columns per trial (padded).
        gpos: (T, M) int64 gallery position of each column (exact ties rank by it; pads -1).
        cams: (T, M) camera of each column.
        group: (T, M) vocabulary index of each column's pid (pads: V).
        own: (T, M) columns (0..M-1) listed pid after pid.
        start, size: (T, V + 1) where each pid's list starts in ``own`` and its length (index
            V = "pid not in the gallery": size 0).
        pad: (T, M) bool, True on padding columns; None when every trial has M columns.
        kept: (T,) columns per trial.
        room: (T, 2) [first, end) of the cam-2 columns (location rule only, else None).
    """
    cols: np.ndarray
    M: int
    gpos: np.ndarray
    cams: np.ndarray
    group: np.ndarray
    own: np.ndarray
    start: np.ndarray
    size: np.ndarray
    pad: Optional[np.ndarray]
    kept: np.ndarray
    room: Optional[np.ndarray]


class _Batch:
    """T galleries (trials) evaluated against the same queries with the same rules.

    Args:
        galleries: one ``(g_index, g_pids, g_cams)`` per trial: matrix columns (None = all, in
            order) and the (m_t,) pids/cams of the trial's gallery in gallery order.
        removal: 'location' | 'same_pid_cam' | 'none'.
    """

    def __init__(self, galleries, removal: str):
        self.T = len(galleries)
        self.g_index = [g for g, _, _ in galleries]
        self.m = [len(p) for _, p, _ in galleries]
        self.vocab = np.unique(np.concatenate([p for _, p, _ in galleries]))
        self.n_ids = [len(np.unique(p)) for _, p, _ in galleries]
        self.removal = removal
        self.kind = self._kind(galleries, location=removal == 'location')

    def _kind(self, galleries, location: bool) -> _Kind:
        if location:   # cam-2 columns last (stable)
            orders = [np.argsort(cams == LOCATION_GALLERY_CAM, kind='stable')
                      for _, _, cams in galleries]
        else:
            orders = [np.arange(len(pids)) for _, pids, _ in galleries]
        T, V = self.T, len(self.vocab)
        M = max(1, max(len(o) for o in orders))
        cols = np.zeros((T, M), np.int64)
        gpos = np.full((T, M), -1, np.int64)
        cams = np.zeros((T, M), np.int64)
        group = np.full((T, M), V, np.int64)
        own = np.zeros((T, M), np.int64)
        start = np.zeros((T, V + 1), np.int64)
        size = np.zeros((T, V + 1), np.int64)
        pad = np.ones((T, M), bool)
        room = np.zeros((T, 2), np.int64)
        for t, (order, (g_index, pids, g_cams)) in enumerate(zip(orders, galleries)):  # trials
            n = len(order)
            if n == 0:
                continue
            vi = np.searchsorted(self.vocab, pids[order])
            cols[t, :n] = order if g_index is None else g_index[order]
            cols[t, n:] = cols[t, 0]
            gpos[t, :n], cams[t, :n], group[t, :n], pad[t, :n] = order, g_cams[order], vi, False
            by_pid = np.argsort(vi, kind='stable')
            own[t, :n] = by_pid
            sv = vi[by_pid]
            b = np.flatnonzero(np.r_[True, sv[1:] != sv[:-1]])
            start[t, sv[b]] = b
            size[t, sv[b]] = np.diff(np.r_[b, n])
            room[t] = (n - int((g_cams == LOCATION_GALLERY_CAM).sum()), n)
        return _Kind(cols=cols.ravel(), M=M, gpos=gpos, cams=cams, group=group, own=own,
                     start=start, size=size, pad=pad if pad.any() else None,
                     kept=(~pad).sum(1), room=room if location else None)

    def vocab_index(self, q_pids: np.ndarray) -> np.ndarray:
        """(nq,) index of each query pid in the vocabulary; V when no gallery has it."""
        V = len(self.vocab)
        if V == 0:
            return np.zeros(len(q_pids), np.int64)
        idx = np.minimum(np.searchsorted(self.vocab, q_pids), V - 1)
        return np.where(self.vocab[idx] == q_pids, idx, V)


# ------------------------------------------------------------------------------------------------
# metrics of (query, trial) rows

class _NaNRow(Exception):
    def __init__(self, row: int):
        self.row = row


def _searchsorted_rows(sorted_rows: np.ndarray, values: np.ndarray,
                       side: str = 'left') -> np.ndarray:
    """Row-wise ``searchsorted``: (n, m) ascending rows, (n, k) values -> (n, k) positions."""
    return torch.searchsorted(torch.from_numpy(np.ascontiguousarray(sorted_rows)),
                              torch.from_numpy(np.ascontiguousarray(values)),
                              right=side == 'right').numpy()


def _ap_inp(ranks: np.ndarray, npos: np.ndarray):
    """(ap, inp, first) of R rows from the kept ranks of their true matches.

    Args:
        ranks: (sum(npos),) 1-based kept ranks, row after row, ascending within a row.
        npos: (R,) true matches per row.

    Every path calls this on the same numbers, so their results agree to the bit (AP sums go
    through one ``np.add.reduceat``). Rows without a true match get 0.
    """
    R = len(npos)
    ap, inp, first = np.zeros(R), np.zeros(R), np.zeros(R, np.int64)
    some = np.flatnonzero(npos > 0)
    if len(some) == 0:
        return ap, inp, first
    starts = np.cumsum(npos) - npos
    index = np.arange(1, len(ranks) + 1) - np.repeat(starts, npos)   # 1-based, per row
    precision = index / ranks
    n = npos[some]
    ap[some] = np.add.reduceat(precision, starts[some]) / n
    inp[some] = n / ranks[starts[some] + n - 1]
    first[some] = ranks[starts[some]]
    return ap, inp, first


def _groups_below(mask: np.ndarray, group: np.ndarray, t_of: np.ndarray, V: int) -> np.ndarray:
    """(R,) number of distinct pids among each row's True items (mask (R, M): the items
    strictly below the row's best true match).

    Only the items below a query's best true match are visited (``np.flatnonzero``):
    with a useful model they are few, so this is ~one comparison pass instead of a per-pid
    reduction over the whole row (``np.minimum.reduceat`` costs ~1.4 ns per item).
    """
    flat = np.flatnonzero(mask)                    # 1-D: ~12x faster than 2-D nonzero
    r, c = np.divmod(flat, mask.shape[1])
    seen = np.zeros((mask.shape[0], V + 1), bool)
    seen[r, group[t_of[r], c]] = True
    return seen[:, :V].sum(1)


def _fill_room(sub, in_room, t_of, room, big):
    """Overwrite the cam-2 slice of each cam-3 row (location rule) with ``big``."""
    rows = np.flatnonzero(in_room)
    spans = room[t_of[rows]]
    if (spans == spans[0]).all():                                  # usual: one slice for all
        sub[rows, spans[0, 0]:spans[0, 1]] = big
        return
    for t in np.unique(t_of[rows]):                                # else a loop over trials
        r = rows[t_of[rows] == t]
        sub[r, room[t, 0]:room[t, 1]] = big


def _batch_metrics(sub, t_of, qv, qc, kind: _Kind, removal: str, identity: bool, V: int):
    """Metrics of R (query, trial) rows.

    Args:
        sub: (R, M) our own copy of the rows' distances in ``kind``'s column order of their
            trial, pads +inf (or the integer maximum); overwritten (removed items, sorted).
        t_of: (R,) trial of each row. qv: (R,) vocabulary index of the query's pid (V = absent).
        qc: (R,) query camera. removal: the rule.

    Returns:
        ``(first, ap, inp, valid, tied)`` per row: ``first`` is the kept rank of the first true
        match (image CMC) or the true person's rank in the de-duplicated kept list (identity
        CMC); ``tied`` marks valid rows whose result depends on an exact tie (only there does the
        stable order decide: they are redone on stable keys).

    Removed items are overwritten with +inf, so they rank after every real distance and are
    never counted. The kept rank of a true match is then 1 + the number of items strictly
    below it: the row is sorted (numpy's SIMD sort of values; comparison passes per true match,
    ``<`` plus ``<=`` to see ties, cost more even for 2-4 matches) and the matches are looked up
    in it.
    """
    R, M = sub.shape
    is_float = sub.dtype.kind == 'f'
    big = np.inf if is_float else np.iinfo(sub.dtype).max
    size = kind.size[t_of, qv]
    width = max(int(size.max()) if R else 0, 1)
    slot = np.arange(width)
    in_group = slot[None, :] < size[:, None]
    at = kind.own[t_of[:, None], np.minimum(kind.start[t_of, qv][:, None] + slot[None, :],
                                            M - 1)]
    cand = np.take_along_axis(sub, at, axis=1)                     # own-pid items
    is_pos = in_group
    if removal == 'location':
        in_room = qc == LOCATION_QUERY_CAM
        if in_room.any():                  # every cam-2 item of a cam-3 query is removed
            _fill_room(sub, in_room, t_of, kind.room, big)
            is_pos = in_group & ~(in_room[:, None] & (kind.cams[t_of[:, None], at] ==
                                                      LOCATION_GALLERY_CAM))
    elif removal == 'same_pid_cam':
        removed = in_group & (kind.cams[t_of[:, None], at] == qc[:, None])
        rr, ss = np.nonzero(removed)
        sub[rr, at[rr, ss]] = big
        is_pos = in_group & ~removed
    npos = is_pos.sum(1)
    valid = npos > 0
    pos = np.where(is_pos, cand, big)
    pos.sort(axis=1)                                               # true matches, ascending
    in_row = slot[None, :] < npos[:, None]
    low = -np.inf if is_float else np.iinfo(sub.dtype).min
    best = np.where(valid, pos[:, 0], low)[:, None]                # invalid rows: nothing below
    if identity:
        closer = _groups_below(sub < best, kind.group, t_of, V)
    sub.sort(axis=1)                                               # numpy's SIMD sort of values
    if is_float:
        nan = np.isnan(sub[:, -1])                                 # NaN sorts last
        if nan.any():
            raise _NaNRow(int(np.flatnonzero(nan)[0]))
    below = _searchsorted_rows(sub, pos)                           # items strictly closer
    # the match itself sits at `below`; an equal value right after it is an exact tie
    after = np.take_along_axis(sub, np.minimum(below + 1, M - 1), axis=1)
    tied = ((below + 1 < M) & (after == pos) & in_row).any(1)
    ap, inp, first = _ap_inp(below[in_row] + 1, npos)
    if identity:
        first = closer + 1
    return first, ap, inp, valid, tied & valid


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


def _exact_rows(block, q_row, t_of, qv, qc, batch: _Batch, identity: bool):
    """``_batch_metrics`` of rows with exact ties, on stable keys built in gallery order.

    block: the chunk's (k, num_columns) distances; q_row, t_of: (r,) row of ``block`` and trial
    of each row to redo.
    """
    kind = batch.kind
    out = [np.zeros(len(q_row), np.int64), np.zeros(len(q_row)), np.zeros(len(q_row)),
           np.zeros(len(q_row), bool)]
    for t in np.unique(t_of):                                      # a loop over trials
        sel = np.flatnonzero(t_of == t)
        rows = block[q_row[sel]]
        g_index = batch.g_index[t]
        vals = rows if g_index is None else np.take(rows, g_index, axis=1)
        keys = _stable_keys(vals)
        n = int(kind.kept[t])
        sub = np.full((len(sel), kind.M), np.iinfo(keys.dtype).max, keys.dtype)
        sub[:, :n] = np.take(keys, kind.gpos[t, :n], axis=1)
        res = _batch_metrics(sub, np.full(len(sel), t), qv[sel], qc[sel], kind, batch.removal,
                             identity, len(batch.vocab))
        assert not res[4].any(), 'stable keys cannot tie'
        for o, v in zip(out, res[:4]):
            o[sel] = v
    return out


# ------------------------------------------------------------------------------------------------
# the driver: query chunks x trials

_BLOCK_ELEMS = 1 << 19   # distances gathered per block (~2 MB float32: stays in L2)


def _default_threads() -> int:
    # torch's intra-op setting is the user's thread budget (torch.set_num_threads)
    return max(1, min(int(torch.get_num_threads()), os.cpu_count() or 1))


def _rows_per_step(step: int, chunk_size: Optional[int]) -> int:
    """Query rows per numpy call sequence: ``step``, at most ``chunk_size`` when given."""
    return step if chunk_size is None else min(step, chunk_size)


def _per_query_outputs(nq: int, T: int):
    """Zeroed (nq, T) outputs of an engine: first-match rank, AP, INP, valid flag."""
    return (np.zeros((nq, T), np.int64), np.zeros((nq, T)), np.zeros((nq, T)),
            np.zeros((nq, T), bool))


class _BatchEngine:
    """A trial batch evaluated on blocks of query rows; per-query outputs (nq, T).

    Each block's rows get every trial's gallery gathered side by side (one array, one numpy
    call sequence for all T trials), ``step`` rows at a time so that the gathered distances
    stay in the L2 cache. Peak extra memory: ~ (13 + 8 * w) * step * T * M bytes (gathered
    distances, a mask, per-row scratch; w = true matches per row), step = min(chunk_size,
    max(8, _BLOCK_ELEMS // (T * M))).
    """

    def __init__(self, batch: _Batch, cmc_mode: str, qp, qc, chunk_size: Optional[int]):
        nq, T = len(qp), batch.T
        self.batch, self.identity = batch, cmc_mode == 'identity'
        self.qv, self.qc = batch.vocab_index(qp), qc
        self.step = _rows_per_step(max(8, _BLOCK_ELEMS // (T * batch.kind.M)), chunk_size)
        self.first, self.ap, self.inp, self.valid = _per_query_outputs(nq, T)

    def process(self, block: np.ndarray, a: int) -> None:
        """Evaluate the queries a .. a + len(block) from their distance rows ``block``."""
        for lo in range(0, len(block), self.step):
            self._rows(block[lo:lo + self.step], a + lo)

    def _rows(self, block, a):
        batch, kind = self.batch, self.batch.kind
        k, T = len(block), batch.T
        b = a + k
        sub = np.take(block, kind.cols, axis=1, mode='clip').reshape(k * T, kind.M)
        if kind.pad is not None:
            sub.reshape(k, T, kind.M)[:, kind.pad] = np.inf if sub.dtype.kind == 'f' else \
                np.iinfo(sub.dtype).max
        t_of = np.tile(np.arange(T), k)
        q_row = np.repeat(np.arange(k), T)
        qv, qc = self.qv[a:b][q_row], self.qc[a:b][q_row]
        try:
            f, p, i, v, tied = _batch_metrics(sub, t_of, qv, qc, kind, batch.removal,
                                              self.identity, len(batch.vocab))
        except _NaNRow as bad:
            raise ValueError(f'distmat contains NaN in the distances of query '
                             f'{a + bad.row // T}; distances must be real numbers') from None
        del sub
        if tied.any():
            r = np.flatnonzero(tied)
            redo = _exact_rows(block, q_row[r], t_of[r], qv[r], qc[r], batch, self.identity)
            for o, val in zip((f, p, i, v), redo):
                o[r] = val
        self.first[a:b], self.ap[a:b], self.inp[a:b], self.valid[a:b] = (
            x.reshape(k, T) for x in (f, p, i, v))


_BLOCK_BYTES = 4 << 20         # query rows read per block (shared by every engine of a group)


def _drive(reader: _RowReader, q_index: Optional[np.ndarray], nq: int, engines, threads: int,
           chunk_size: Optional[int]) -> None:
    """Read the queries' rows block by block, once, and hand each block to every engine.

    Blocks hold ~_BLOCK_BYTES of matrix rows (at most ``chunk_size`` queries, at least 8, and
    enough blocks for ``threads`` workers); each engine cuts them to its own cache-sized steps.
    Blocks run on a thread pool (numpy releases the GIL); engines write per-query outputs, so
    results do not depend on the blocking.
    """
    step = max(8, _BLOCK_BYTES // max(1, reader.shape[1] * reader.dtype.itemsize))
    if chunk_size is not None:
        step = min(step, chunk_size)
    step = max(1, min(step, -(-nq // threads)))
    bounds = [(a, min(a + step, nq)) for a in range(0, nq, step)]

    def run(bound):
        a, b = bound
        block = reader(slice(a, b) if q_index is None else q_index[a:b])
        for engine in engines:
            engine.process(block, a)

    if threads > 1 and len(bounds) > 1:
        with ThreadPoolExecutor(min(threads, len(bounds))) as pool:
            for _ in pool.map(run, bounds):
                pass
    else:
        for bd in bounds:
            run(bd)


# ------------------------------------------------------------------------------------------------
# pooled engine: one exact sort of each query's pool row serves every trial

_POOL_BYTES = 16 << 20         # working set of one pooled step (keys + gathered words):
#                                smaller steps pay more per-call overhead (4 MB: +15 %)
_IDENTITY_WINDOW = 128         # sorted pool positions inspected for the identity CMC
_DENSE = 8                     # pooled trials hold at least 1/_DENSE of the pool's columns


def _ordered_int32(vals: np.ndarray) -> np.ndarray:
    """Order-preserving int32 of float32 values (-0.0 equals +0.0; NaN sorts outside +-inf).

    A view of the bits when no value is negative (the usual distances)."""
    bits = vals.view(np.int32)
    if bits.size == 0 or bits.min() >= 0:
        return bits
    bits = (vals + np.float32(0)).view(np.int32)                 # -0.0 -> +0.0
    # negative floats: larger magnitude = smaller value, so mirror their integer order
    return np.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits).astype(np.int32)


class _Pool:
    """Trials whose galleries are ascending subsets of one pool of matrix columns.

    Each query's row over the pool is sorted once, exactly: int64 keys hold the order-preserving
    float32 bits in the high half and the pool position in the low half, so exact ties go to the
    lower column, i.e. the lower gallery position (galleries are ascending). A trial's kept rank
    of a true match is then 1 + the number of the trial's kept items before it in that order, a
    prefix sum of the trial's membership over the sorted row. Every trial is counted at once:
    each pool column owns a few packed uint64 words (one bit field per trial, 10 per word for
    SYSU's 20 pooled trials), gathered in sorted order and summed per segment
    (``np.add.reduceat``; segments are cut at the own-pid items and every ``grid`` positions, so
    a field never overflows: ``_kept_before``). The query's own-pid items carry a flag in the
    lowest key byte (below the column, so it never decides an order), which finds them in the
    sorted row without a search.

    The identity CMC needs the number of distinct other persons before the first true match:
    it is read off the first ``L`` sorted positions (exact when the match lies there; capped at
    ``max_rank + 1`` when that many persons already precede it); the rare other (query, trial)
    pairs are recomputed on the trial's own gallery.

    Args:
        galleries: per trial ``(g_index, g_pids, g_cams)``, ``g_index`` strictly ascending matrix
            columns; a column's pid and camera must agree across trials.
        removals, cmc_modes: per trial.
        ncols: columns of the matrix (a pool covering most of them reads every column).
    """

    def __init__(self, galleries, removals, cmc_modes, max_rank: int, ncols: int):
        T = self.T = len(galleries)
        self.galleries, self.removals, self.cmc_modes = galleries, removals, cmc_modes
        self.max_rank = max_rank
        U = np.unique(np.concatenate([g for g, _, _ in galleries]))
        if len(U) * 10 >= 9 * ncols:
            U = np.arange(ncols)          # read rows as they are: no gather of the pool
        self.U, self.all_columns = U, len(U) == ncols
        n = self.n = len(U)
        if 2 * n + 2 >= 1 << 23:               # (table index << 8) must fit the low int32 half
            raise _NotPoolable(f'{n} pool columns')
        pids, cams = np.zeros(n, np.int64), np.zeros(n, np.int64)
        known = np.zeros(n, bool)
        positions = []
        for g, gp, gc in galleries:                               # a loop over trials
            p = np.searchsorted(U, g)
            pids[p], cams[p], known[p] = gp, gc, True
            positions.append(p)
        for p, (_, gp, gc) in zip(positions, galleries):
            if not (np.array_equal(pids[p], gp) and np.array_equal(cams[p], gc)):
                raise _NotPoolable('a column has different pids or cameras in two trials')
        self.vocab = np.unique(pids[known])
        V = len(self.vocab)
        pv = np.where(known, np.searchsorted(self.vocab, pids), V)  # V: in no gallery
        # own-pid columns of each vocabulary pid (index V: none)
        sizes = np.bincount(pv, minlength=V + 1)[:V]
        self.own = np.argsort(pv, kind='stable')[:int(known.sum())]
        self.own_start = np.r_[np.cumsum(sizes) - sizes, 0]
        self.own_size = np.r_[sizes, 0]
        self.room = any(r == 'location' for r in removals)
        kinds = 2 if self.room else 1
        # table index = 1 + kind * n + pool position (kind 1: cam-3 queries); index 0 = nothing
        member = np.zeros((kinds, n, T), bool)
        for t, p in enumerate(positions):
            member[:, p, t] = True
            if self.room and removals[t] == 'location':
                member[1, cams == LOCATION_GALLERY_CAM, t] = False
        member = np.concatenate([np.zeros((1, T), bool), member.reshape(kinds * n, T)])
        self.m = [len(p) for p in positions]
        # low key half: (table index << 1) | own flag, per kind of query
        # (the flag fills the lowest byte, so that byte read as bool finds the own items)
        self.low = [((1 + kind * n + np.arange(n)) << 8).astype(np.int32) for kind in
                    range(kinds)]
        # bit fields: as few words as fields of >= 6 bits allow (10 trials per word); a field
        # of b bits counts up to 2**b - 1 items, so segments are cut every `grid` positions
        # After the segment sums, each word is spread into `spread` words whose fields are
        # `spread * bits` apart (every spread-th field), wide enough for whole-row counts, so
        # the running sums over segments stay packed.
        self.W = -(-T // 10)
        per_word = -(-T // self.W)
        need = max(int(m).bit_length() for m in self.m)
        bits = min(64 // per_word, need)
        self.grid = (1 << bits) - 1
        spread = -(-need // bits)
        while (-(-per_word // spread) - 1) * spread * bits + need > 64:   # room at the top
            spread += 1
        self.bits, self.spread = bits, spread
        field = np.arange(T) % per_word
        self.word = np.arange(T, dtype=np.int64) // per_word        # packed word of trial t
        self.shift = (field * bits).astype(np.uint64)
        stride = self.spread * bits
        self.spread_mask = np.uint64(sum(((1 << bits) - 1) << (i * stride)
                                         for i in range(-(-per_word // self.spread))
                                         if i * stride < 64))
        self.out_word = self.word * self.spread + field % self.spread
        self.out_shift = ((field // self.spread) * stride).astype(np.uint64)
        self.out_mask = np.uint64((1 << need) - 1)
        self.P = np.zeros((self.W, len(member)), np.uint64)
        bit = np.uint64(1) << np.arange(T, dtype=np.uint64)
        for t in range(T):
            self.P[self.word[t]] |= member[:, t].astype(np.uint64) << self.shift[t]
        self.member_bits = (member.astype(np.uint64) * bit).sum(1, dtype=np.uint64)  # T <= 64
        self.pv_ext = np.r_[V, np.tile(pv, kinds)]
        self.cam_ext = np.r_[np.iinfo(np.int64).min, np.tile(cams, kinds)]
        self.spc = np.array([r == 'same_pid_cam' for r in removals])
        self.ident = np.array([c == 'identity' for c in cmc_modes])
        self.ident_bits = np.uint64((bit * self.ident).sum(dtype=np.uint64))
        self.L = min(n, max(_IDENTITY_WINDOW, 3 * max_rank))
        self._batches = {}

    def row_bytes(self) -> int:
        return (self.n + 1) * 8 * (2 + self.W) + 64 * self.L + 16 * self.T * (
            self.n // self.grid + 128)

    def chunk(self, block: np.ndarray, qp: np.ndarray, qc: np.ndarray):
        """(first, ap, inp, valid), each (T, k), for the k queries whose distance rows over the
        matrix columns are ``block`` (float32)."""
        T, n = self.T, self.n
        k = block.shape[0]
        vals = block if self.all_columns else np.take(block, self.U, axis=1, mode='clip')
        ordered = _ordered_int32(vals)
        qv = np.minimum(np.searchsorted(self.vocab, qp), len(self.vocab) - 1)
        qv = np.where(self.vocab[qv] == qp, qv, len(self.vocab))
        room = (qc == LOCATION_QUERY_CAM) if self.room else np.zeros(k, bool)
        keys = np.empty((k, n + 1), np.int64)
        if sys.byteorder == 'little':                              # write the two int32 halves
            halves = keys.view(np.int32).reshape(k, n + 1, 2)
            halves[:, 1:, 1] = ordered
            halves[~room, 1:, 0] = self.low[0]
            if room.any():
                halves[room, 1:, 0] = self.low[1]
        else:
            keys[:, 1:] = ordered.astype(np.int64) << 32
            keys[:, 1:] |= np.where(room[:, None], self.low[-1], self.low[0])
        keys[:, 0] = np.iinfo(np.int64).min                       # sentinel: position 0
        # flag each query's own-pid items
        size = self.own_size[qv]
        wo = max(int(size.max()), 1)
        in_own = np.arange(wo)[None, :] < size[:, None]
        rr, jj = np.nonzero(in_own)
        keys[rr, 1 + self.own[self.own_start[qv][rr] + jj]] |= 1
        keys.sort(axis=1)
        # NaN sorts outside +-inf (keys[:, 0] is the sentinel)
        bad = ((keys[:, -1] >> 32) > 0x7F800000) | ((keys[:, 1] >> 32) < -0x7F800000 - 1)
        if bad.any():
            raise _NaNRow(int(np.flatnonzero(bad)[0]))
        s = np.full((k, wo), n + 1, np.int64)                      # sorted positions of own items
        flag = keys.view(np.uint8).reshape(k, n + 1, 8)[:, :, 0 if sys.byteorder == 'little'
                                                         else 7].view(bool)
        s[in_own] = np.flatnonzero(flag) % (n + 1)                 # row-major: ascending per row
        np.bitwise_and(keys, 0xFFFFFFFF, out=keys)
        np.right_shift(keys, 8, out=keys)                          # -> table index, sorted
        tab = np.where(in_own, np.take_along_axis(keys, np.minimum(s, n), axis=1), 0)
        cnt = self._kept_before(keys, s, in_own)                   # (T, k, wo)
        tbit = np.arange(T, dtype=np.uint64)[:, None, None]
        member = ((self.member_bits[tab][None] >> tbit) & np.uint64(1)).astype(bool) & in_own[None]
        is_pos = member
        if self.spc.any():
            gone = member & ((self.cam_ext[tab] == qc[:, None]) & in_own)[None] & (
                self.spc[:, None, None])
            is_pos = member & ~gone
            cnt -= (np.cumsum(gone, axis=2, dtype=np.int32) - gone)   # removed: not counted
        npos = is_pos.sum(2)
        valid = npos > 0
        flat = np.flatnonzero(is_pos)                              # (t, query) after (t, query)
        ranks = cnt.ravel()[flat] + 1
        ap, inp, first = (x.reshape(T, k) for x in _ap_inp(ranks, npos.ravel()))
        if self.ident.any():
            # sorted position of each (trial, query)'s first true match (n + 2: none)
            first_pos = np.full(T * k, n + 2, np.int64)
            some = np.flatnonzero(valid.ravel())
            heads = flat[(np.cumsum(npos.ravel()) - npos.ravel())[some]]
            first_pos[some] = s.ravel()[heads % (k * wo)]            # flat (t, query, slot)
            first_id, unresolved = self._identity(keys, first_pos.reshape(T, k), qv, valid)
            first = np.where(self.ident[:, None], first_id, first)
            if unresolved.any():                                   # rare
                t, r = np.nonzero(unresolved)
                first[t, r] = self._recompute_first(block, r, t, qp, qc)
        return first, ap, inp, valid

    def _kept_before(self, table_idx, s, in_own):
        """(T, k, wo) int32: each trial's kept items before each own item of each query.

        The packed membership words are gathered in sorted order and summed per segment
        (``np.add.reduceat``); segments start at position 0, at every own item and every
        ``grid`` positions (so a field never overflows), merged per row: own item j sits at
        merged index 1 + j + #grid points before it (an own item on a grid point comes first;
        that grid point is then dropped). The unpacked segment sums, cumulated, give the
        exclusive prefix before each own item.
        """
        n, W, B = self.n, self.W, self.grid
        k, wo = s.shape
        G = np.take(self.P, table_idx, axis=1, mode='clip').reshape(W, -1)
        grid = np.arange(B, n + 1, B, dtype=np.int64)              # padded positions
        ng = len(grid)
        C = 1 + wo + ng
        at_own = 1 + np.arange(wo)[None, :] + (s - 1) // B         # merged index of own items
        starts = np.zeros((k, C), np.int64)
        use = np.zeros((k, C), bool)
        use[:, 0] = True
        np.put_along_axis(starts, at_own, s, axis=1)
        np.put_along_axis(use, at_own, in_own, axis=1)
        if ng:
            # own items at or before / strictly before grid point i (= i * B): per-row
            # cumulative counts of (s - 1) // B and s // B (pads fall past the last point)
            rows = np.arange(k)[:, None] * (ng + 1)
            le = np.cumsum(np.bincount((rows + np.minimum((s - 1) // B, ng))[in_own],
                                       minlength=k * (ng + 1)).reshape(k, ng + 1), axis=1)
            lt = np.cumsum(np.bincount((rows + np.minimum(s // B, ng))[in_own],
                                       minlength=k * (ng + 1)).reshape(k, ng + 1), axis=1)
            le, lt = le[:, :ng], lt[:, :ng]
            at_grid = 1 + np.arange(ng)[None, :] + le
            np.put_along_axis(starts, at_grid, np.broadcast_to(grid, (k, ng)), axis=1)
            np.put_along_axis(use, at_grid, le == lt, axis=1)      # not on an own item
        starts += np.arange(k, dtype=np.int64)[:, None] * (n + 1)
        seg = np.zeros((W, k, C), np.uint64)
        seg[:, use] = np.add.reduceat(G, starts[use], axis=1)
        del G
        R = self.spread
        wide = np.empty((W * R, k, C), np.uint64)
        for i in range(R):                                         # spread-th fields, apart
            np.bitwise_and(seg >> np.uint64(i * self.bits), self.spread_mask, out=wide[i::R])
        np.cumsum(wide, axis=2, out=wide)                          # through each segment
        before = np.take_along_axis(wide, np.broadcast_to(at_own - 1, (W * R, k, wo)), axis=2)
        cnt = (before[self.out_word] >> self.out_shift[:, None, None]) & self.out_mask
        return np.where(in_own[None], cnt.astype(np.int32), 0)

    def _identity(self, table_idx, first_pos, qv, valid):
        """Identity ranks from the first L sorted positions; (first (T, k), unresolved (T, k)).

        first_pos: (T, k) sorted position of each trial's first true match. Per query, a window
        item counts for the trials whose first match comes later: those bits are the complement
        of a cumulative OR of the trials taken by increasing first-match position. The window's
        items are then grouped by pid (a small sort) and an OR-scan within each pid's run keeps,
        per trial bit, only the person's first kept item: counting those bits counts the
        distinct persons before the true match.
        """
        T, L, k = self.T, self.L, len(qv)
        window = table_idx[:, 1:L + 1]
        pid = self.pv_ext[window]
        bits = self.member_bits[window] & self.ident_bits
        bits[pid == qv[:, None]] = 0                               # the own person is not "other"
        tbit = np.arange(T, dtype=np.uint64)[:, None, None]
        by_pos = np.argsort(first_pos.T, axis=1, kind='stable')    # (k, T) trials by first match
        done = np.zeros((k, T + 1), np.uint64)                     # trials matched at or before
        done[:, 1:] = np.bitwise_or.accumulate(np.uint64(1) << by_pos.astype(np.uint64), axis=1)
        ends = np.take_along_axis(first_pos.T, by_pos, axis=1)     # ascending per query
        passed = _searchsorted_rows(ends, np.tile(np.arange(1, L + 1), (k, 1)), 'right')
        bits &= ~np.take_along_axis(done, passed, axis=1)
        order = np.argsort(pid * L + np.arange(L)[None, :], axis=1)   # by pid, then position
        pid = np.take_along_axis(pid, order, axis=1)
        bits = np.take_along_axis(bits, order, axis=1)
        seen = bits.copy()                                         # inclusive OR within a run
        d = 1
        while d < L:
            step = seen.copy()
            step[:, d:] |= np.where(pid[:, d:] == pid[:, :-d], seen[:, :-d], np.uint64(0))
            seen, d = step, 2 * d
        earlier_same = np.zeros_like(seen)
        earlier_same[:, 1:] = np.where(pid[:, 1:] == pid[:, :-1], seen[:, :-1], np.uint64(0))
        persons = ((bits & ~earlier_same)[None] >> tbit & np.uint64(1)).sum(2)   # (T, k)
        exact = first_pos <= L + 1
        first = np.where(exact, persons + 1, self.max_rank + 1)
        unresolved = valid & self.ident[:, None] & ~exact & (persons < self.max_rank)
        return first, unresolved

    def _recompute_first(self, block, rows, trials, qp, qc):
        """Identity ``first`` of (query ``rows[i]``, trial ``trials[i]``) pairs on each trial's own
        gallery (one batched call per removal rule)."""
        first = np.zeros(len(rows), np.int64)
        for removal in set(self.removals[t] for t in np.unique(trials)):
            if removal not in self._batches:
                ts = [t for t in range(self.T) if self.removals[t] == removal]
                pos = np.full(self.T, -1)
                pos[ts] = np.arange(len(ts))
                self._batches[removal] = (_Batch([self.galleries[t] for t in ts], removal), pos)
            batch, pos = self._batches[removal]
            kind = batch.kind
            pick = np.flatnonzero(np.array([self.removals[t] == removal for t in trials]))
            ri, ti = rows[pick], pos[trials[pick]]
            sub = np.take_along_axis(block[ri], kind.cols.reshape(batch.T, kind.M)[ti], axis=1)
            if kind.pad is not None:
                sub[kind.pad[ti]] = np.inf
            qv = batch.vocab_index(qp[ri])
            f, _, _, _, tied = _batch_metrics(sub, ti, qv, qc[ri], kind, removal, True,
                                              len(batch.vocab))
            if tied.any():
                z = np.flatnonzero(tied)
                f[z] = _exact_rows(block, ri[z], ti[z], qv[z], qc[ri][z], batch, True)[0]
            first[pick] = f
        return first


class _NotPoolable(Exception):
    pass


class _PoolEngine:
    """The pooled engine on blocks of query rows; per-query outputs (nq, T).

    ``room``: when every pooled trial uses the location rule, cam-3 queries run on a second
    pool of the same trials without their cam-2 columns (removed for them anyway), so their
    rows are 23 % shorter on SYSU. Peak extra memory: ``step * pool.row_bytes()`` (~ 8 * (2 +
    W) bytes per pool column per query plus the identity window), step = ``_POOL_BYTES //
    pool.row_bytes()`` (at least 4, at most ``chunk_size``).
    """

    def __init__(self, pool: _Pool, qp, qc, chunk_size: Optional[int],
                 room: Optional[_Pool] = None):
        nq, T = len(qp), pool.T
        self.pool, self.room, self.qp, self.qc = pool, room, qp, qc
        self.in_room = (qc == LOCATION_QUERY_CAM) if room is not None else None
        self.step = _rows_per_step(max(4, _POOL_BYTES // pool.row_bytes()), chunk_size)
        self.first, self.ap, self.inp, self.valid = _per_query_outputs(nq, T)

    def process(self, block: np.ndarray, a: int) -> None:
        if self.room is None:
            parts = [(self.pool, np.arange(len(block)))]
        else:
            in_room = self.in_room[a:a + len(block)]
            parts = [(self.pool, np.flatnonzero(~in_room)), (self.room, np.flatnonzero(in_room))]
        for pool, sel in parts:
            for lo in range(0, len(sel), self.step):
                r = sel[lo:lo + self.step]
                rows = block[r[0]:r[-1] + 1] if r[-1] - r[0] + 1 == len(r) else block[r]
                q = a + r
                try:
                    f, p, i, v = pool.chunk(rows, self.qp[q], self.qc[q])
                except _NaNRow as bad:
                    raise ValueError(f'distmat contains NaN in the distances of query '
                                     f'{q[bad.row]}; distances must be real numbers') from None
                self.first[q], self.ap[q], self.inp[q], self.valid[q] = f.T, p.T, i.T, v.T


_STRATEGY = 'auto'             # engines for trial groups: see _evaluate_group
_COMPILED: list = []           # [the compiled kernel module, or None], once resolved


def _compiled():
    """The compiled kernel (:mod:`.compiled`), ready to run, or None: without numba (or with
    ``NUMBA_DISABLE_JIT=1``), or where its machine code cannot be built. Resolved once per
    process, on first use (importing numba takes ~0.2 s, loading the code ~0.3 s). A numba that
    is installed but fails warns once; the numpy engines then give the same numbers."""
    if not _COMPILED:
        from . import compiled
        reason = compiled.unavailable_reason()
        if reason is None:
            try:
                compiled.warm_up()
            except Exception as exc:      # numba imports but cannot compile on this machine
                reason = f'numba failed to compile it ({type(exc).__name__}: {exc})'
        if reason is not None and reason.startswith('numba failed'):
            warnings.warn(f'the compiled evaluator is unavailable: {reason}; using the numpy '
                          f'engines (the same numbers, 4-6x slower)', stacklevel=4)
        _COMPILED.append(compiled if reason is None else None)
    return _COMPILED[0]


def _evaluate_group(reader: _RowReader, q_index, qp, qc, trials, max_rank: int, threads: int,
                    chunk_size: Optional[int], wheres: Sequence[str], stacklevel: int = 2,
                    strategy: Optional[str] = None, labels: Optional[Sequence[str]] = None):
    """One CrossModalResult per trial, every trial against the same queries.

    trials: per trial ``(g_index, g_pids, g_cams, removal, cmc_mode)``. With numba, every trial
    whose gallery is ascending runs on the compiled kernel (:mod:`.compiled`; 64 trials per
    pool). Otherwise dense trials sharing a pool (e.g. SYSU's multi-shot galleries: 44 % and
    17 % of the 6,775 columns) run on the numpy pooled engine when that is cheaper, and the
    others as batches of trials with the same rules. ``strategy``: 'auto' | 'numpy' (auto without
    the kernel) | 'compiled' | 'pool' (every trial that can be pooled, numpy) | 'batch' (the
    last four for tests and benchmarks). Each block of query rows is read once and evaluated by
    every engine. ``wheres``: per trial a prefix for error messages ('' = none); ``labels``: per
    trial the rule's name in them.
    """
    strategy = _STRATEGY if strategy is None else strategy
    T = len(trials)
    galleries = [(np.arange(reader.shape[1]) if g is None else g, gp, gc)
                 for g, gp, gc, _, _ in trials]
    ascending = [t for t, (g, _, _) in enumerate(galleries) if len(g) and np.all(np.diff(g) > 0)]
    engines, members = [], []
    compiled = _compiled() if strategy in ('auto', 'compiled') else None
    if compiled is not None and reader.dtype in (np.float32, np.float64):
        fit = [t for t in ascending if len(galleries[t][0]) < compiled.MAX_GALLERY]
        for c in range(0, len(fit), compiled.MAX_TRIALS):
            ts = fit[c:c + compiled.MAX_TRIALS]
            try:
                tables = compiled.PoolTables([galleries[t] for t in ts],
                                             [trials[t][3] for t in ts], [trials[t][4] for t in ts])
            except compiled.NotCompilable:
                continue
            engines.append(compiled.CompiledEngine(tables, qp, qc))
            members.append(ts)
    done = {t for ts in members for t in ts}
    pooled: List[int] = []
    if strategy in ('auto', 'numpy', 'pool') and reader.dtype == np.float32:
        ok = [t for t in ascending if t not in done]
        if strategy != 'pool' and ok:
            # pool only trials that cover a good part of the pool: sparse ones (single-shot)
            # would each add packed words over the whole pool for a few positives
            n_union = len(np.unique(np.concatenate([galleries[t][0] for t in ok])))
            ok = [t for t in ok if len(galleries[t][0]) * _DENSE >= n_union]
        pooled = ok[:64]                                     # one uint64 of trial bits
    pool = None
    if len(pooled) >= 2:
        try:
            pool = _Pool([galleries[t] for t in pooled], [trials[t][3] for t in pooled],
                         [trials[t][4] for t in pooled], max_rank, reader.shape[1])
        except _NotPoolable:
            pool = None
        # measured per-query CPU costs (ns, benchmarks/bench_eval.py data, SYSU and LLCM):
        # the pool ~6.9 per pool column + 1.3 per packed word and column + 0.3 per trial and
        # column (own-item and identity work); batches ~3.5 per gallery item plus ~0.1 per
        # item and true match (the look-ups in the sorted row)
        batch_cost = sum(len(g) * (3.5 + 0.1 * len(g) / max(1, len(np.unique(gp))))
                         for g, gp, _ in pool.galleries) if pool is not None else 0
        if pool is not None and strategy != 'pool' and (
                pool.n * (6.9 + 1.3 * pool.W + 0.3 * pool.T) > batch_cost):
            pool = None
    # the others: batches of trials with the same rules and similar gallery sizes (padding a
    # 112-column gallery to 301 columns costs 2.7x)
    groups: Dict[Tuple[str, str], list] = {}
    for t, tr in enumerate(trials):
        if t not in done and (pool is None or t not in pooled):
            groups.setdefault((tr[3], tr[4]), []).append(t)
    batches = []
    for (removal, cmc_mode), ts in groups.items():
        ts = sorted(ts, key=lambda t: -len(galleries[t][0]))
        cut = [0]
        for i in range(1, len(ts)):
            if 4 * len(galleries[ts[i]][0]) < 3 * len(galleries[ts[cut[-1]]][0]):
                cut.append(i)
        cut.append(len(ts))
        batches += [(removal, cmc_mode, sorted(ts[a:b])) for a, b in zip(cut[:-1], cut[1:])]

    if pool is not None:
        room = None
        if all(trials[t][3] == 'location' for t in pooled) and (
                qc == LOCATION_QUERY_CAM).any():
            keep = [gc != LOCATION_GALLERY_CAM for _, _, gc in pool.galleries]
            try:
                room = _Pool([(g[k], gp[k], gc[k]) for (g, gp, gc), k in
                              zip(pool.galleries, keep)], ['none'] * len(pooled),
                             pool.cmc_modes, max_rank, reader.shape[1])
            except _NotPoolable:
                room = None
        engines.append(_PoolEngine(pool, qp, qc, chunk_size, room))
        members.append(pooled)
    for removal, cmc_mode, ts in batches:
        engines.append(_BatchEngine(_Batch([galleries[t] for t in ts], removal), cmc_mode, qp,
                                    qc, chunk_size))
        members.append(ts)
    n_ids = [len(np.unique(gp)) for _, gp, _ in galleries]
    for n in sorted(set(n_ids)):
        if max_rank > n:
            warnings.warn(f'max_rank={max_rank} exceeds the {n} distinct gallery ids: the CMC '
                          f'tail saturates (carried forward)', stacklevel=stacklevel)
    if len(qp) * sum(len(g) for g, _, _ in galleries) < 1_000_000:
        threads = 1                                            # not worth a thread pool
    try:
        _drive(reader, q_index, len(qp), engines, threads, chunk_size)
    except ValueError as exc:
        raise ValueError(f'{wheres[0]}: {exc}' if wheres[0] else str(exc)) from exc
    out: List[Optional[CrossModalResult]] = [None] * T
    for engine, ts in zip(engines, members):
        for j, t in enumerate(ts):
            g, (_, _, _, removal, cmc_mode) = galleries[t][0], trials[t]
            label = f'(removal={removal!r}, cmc_mode={cmc_mode!r})' if labels is None else \
                labels[t]
            try:
                out[t] = _summarise(engine.first[:, j], engine.ap[:, j], engine.inp[:, j],
                                    engine.valid[:, j], max_rank, len(qp), len(g), n_ids[t],
                                    removal, cmc_mode, label)
            except ValueError as exc:
                raise ValueError(f'{wheres[t]}: {exc}' if wheres[t] else str(exc)) from exc
    return out


def _per_query(distmat, q_pids, g_pids, q_camids, g_camids, removal: str, cmc_mode: str, *,
               engine: str, max_rank: int = 20, query_index=None, gallery_index=None,
               chunk_size: Optional[int] = None):
    """Per-query ``(first, ap, inp, valid)`` numpy arrays of one trial from one engine:
    'batch', 'pool' (needs float32 and an ascending ``gallery_index``), 'compiled' (needs numba
    and an ascending ``gallery_index``) or 'torch'. For tests: they compare the engines'
    rankings query by query. The pool caps identity ranks above ``max_rank`` at
    ``max_rank + 1`` (all the CMC needs)."""
    if engine == 'torch':
        dist = _as_distance_tensor(distmat)
        return _torch_per_query(dist, query_index, gallery_index, np.asarray(q_pids),
                                np.asarray(q_camids), np.asarray(g_pids), np.asarray(g_camids),
                                removal, cmc_mode, chunk_size)
    dist = _as_distance_matrix(distmat)
    q_index = None if query_index is None else np.asarray(query_index, np.int64)
    g_index = None if gallery_index is None else np.asarray(gallery_index, np.int64)
    gallery = (g_index, np.asarray(g_pids), np.asarray(g_camids))
    qp, qc = np.asarray(q_pids), np.asarray(q_camids)
    if engine == 'pool':
        g = np.arange(dist.shape[1]) if g_index is None else g_index
        pool = _Pool([(g, gallery[1], gallery[2])], [removal], [cmc_mode], max_rank,
                     dist.shape[1])
        eng = _PoolEngine(pool, qp, qc, chunk_size)
    elif engine == 'compiled':
        compiled = _compiled()
        if compiled is None:
            raise RuntimeError('the compiled engine needs numba')
        g = np.arange(dist.shape[1]) if g_index is None else g_index
        tables = compiled.PoolTables([(g, gallery[1], gallery[2])], [removal], [cmc_mode])
        eng = compiled.CompiledEngine(tables, qp, qc)
    else:
        eng = _BatchEngine(_Batch([gallery], removal), cmc_mode, qp, qc, chunk_size)
    _drive(_RowReader(dist), q_index, len(qp), [eng], 1, chunk_size)
    out = (eng.first, eng.ap, eng.inp, eng.valid)
    return tuple(x[:, 0] for x in out)


def _summarise(first, ap, inp, valid, max_rank: int, nq: int, ng: int, n_ids: int,
               removal: str, cmc_mode: str, label: str) -> CrossModalResult:
    """CrossModalResult of one trial from its (nq,) per-query values (query order: the sums do
    not depend on the chunking)."""
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(f'no valid query under {label}: 0 of {nq} queries have a kept true match '
                         f'among {ng} gallery items ({n_ids} gallery ids)')
    hits = np.bincount(np.minimum(first[valid], max_rank + 1), minlength=max_rank + 2)
    cmc = np.cumsum(hits[1:max_rank + 1]) / num_valid
    cmc.setflags(write=False)
    return CrossModalResult(cmc=cmc, mAP=float(ap[valid].sum()) / num_valid,
                            mINP=float(inp[valid].sum()) / num_valid, num_valid=num_valid,
                            num_query=nq, num_gallery=ng, removal=removal, cmc_mode=cmc_mode)


# ------------------------------------------------------------------------------------------------
# torch path: the same definitions, on the matrix's device (CUDA)

BACKENDS = ('numpy', 'torch')
_TORCH_BYTES = 1 << 28         # working set of one torch chunk (~48 bytes per distance)


def _resolve_backend(distmat, backend: Optional[str]) -> str:
    """'torch' for a tensor that lives off the CPU (default), else 'numpy'; or as asked."""
    if backend is None:
        on_device = isinstance(distmat, torch.Tensor) and distmat.device.type != 'cpu'
        return 'torch' if on_device else 'numpy'
    if backend not in BACKENDS:
        raise ValueError(f'unknown backend {backend!r}; expected one of {BACKENDS} or None '
                         f'(torch for a tensor on a GPU, else numpy)')
    return backend


def _as_distance_tensor(distmat) -> torch.Tensor:
    """The distances as a 2-D floating tensor on their own device (no copy to the host)."""
    if isinstance(distmat, torch.Tensor):
        dist = distmat.detach()
    else:
        dist = torch.from_numpy(np.ascontiguousarray(_to_numpy(distmat, 'distmat')))
    if dist.ndim != 2:
        raise ValueError(f'distmat must have shape (num_query, num_gallery), '
                         f'got shape {tuple(dist.shape)}')
    if dist.dtype in (torch.float16, torch.bfloat16):
        dist = dist.float()                  # exact
    elif dist.dtype in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32,
                        torch.int64):
        dist = dist.double()                 # exact for |values| < 2**53
    elif dist.dtype not in (torch.float32, torch.float64):
        raise TypeError(f'distmat must hold real numbers, got dtype {dist.dtype}')
    return dist


def _torch_rows(sub, qp, qc, gp, gc, gid, own, n_ids: int, removal: str, identity: bool):
    """Per-query (first, ap, inp, valid) of k queries from their (k, m) distances ``sub``.

    The §3.4 reference semantics in torch, on ``sub``'s device: one stable sort per row
    (exact ties go to the lower gallery column), removal masks, cumulative sums for kept ranks,
    ``scatter_reduce('amin')`` for each person's best kept position (identity CMC).
    qp, qc: (k,) query pids/cams; gp, gc, gid: (m,) gallery pids/cams/pid group (0..n_ids-1);
    own: (k,) group of each query's pid (-1: absent).
    """
    k, m = sub.shape
    dev = sub.device
    vals, order = torch.sort(sub, dim=1, stable=True)
    if sub.is_floating_point():
        nan = torch.isnan(vals[:, -1])                            # NaN sorts last
        if bool(nan.any()):
            raise _NaNRow(int(torch.nonzero(nan)[0, 0]))
    del vals
    gp_o, gc_o = gp[order], gc[order]
    match = gp_o == qp[:, None]
    if removal == 'location':
        removed = (qc == LOCATION_QUERY_CAM)[:, None] & (gc_o == LOCATION_GALLERY_CAM)
    elif removal == 'same_pid_cam':
        removed = match & (gc_o == qc[:, None])
    else:
        removed = torch.zeros_like(match)
    kept = ~removed
    pos = match & kept
    krank = kept.cumsum(1)                                        # 1-based kept rank
    ncum = pos.cumsum(1)
    npos = ncum[:, -1]
    valid = npos > 0
    precision = torch.where(pos, ncum.double() / krank.clamp_min(1).double(), 0.0)
    ap = precision.sum(1) / npos.clamp_min(1).double()
    inp = npos.double() / torch.where(pos, krank, 0).amax(1).clamp_min(1).double()
    if identity:
        where = torch.where(kept, torch.arange(m, device=dev).expand(k, m), m)
        position = torch.empty((k, m), dtype=torch.int64, device=dev)
        position.scatter_(1, order, where)                        # kept sorted position per column
        best = torch.full((k, max(n_ids, 1)), m, dtype=torch.int64, device=dev)
        best.scatter_reduce_(1, gid.expand(k, m), position, 'amin')
        own_best = best.gather(1, own.clamp_min(0)[:, None])
        first = (best < own_best).sum(1) + 1
    else:
        first = torch.where(pos, krank, m + 1).amin(1)
    return first, ap, inp, valid


def _torch_per_query(dist: torch.Tensor, q_index, g_index, qp, qc, gp, gc, removal: str,
                     cmc_mode: str, chunk_size: Optional[int]):
    """(first, ap, inp, valid) numpy arrays (nq,) of one trial, computed on ``dist``'s device.

    ``dist[q_index][:, g_index]`` is gathered chunk by chunk (None = all rows/columns); only the
    per-query results come back to the host. Peak extra device memory ~ 48 bytes x rows x m,
    rows = chunk_size or _TORCH_BYTES // (48 m).
    """
    dev = dist.device
    as_t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.int64, device=dev)  # noqa: E731
    qp_t, qc_t, gp_t, gc_t = as_t(qp), as_t(qc), as_t(gp), as_t(gc)
    qi = None if q_index is None else as_t(q_index)
    gi = None if g_index is None else as_t(g_index)
    vocab = torch.unique(gp_t)
    gid = torch.searchsorted(vocab, gp_t)
    own = torch.searchsorted(vocab, qp_t).clamp_max(len(vocab) - 1)
    own = torch.where(vocab[own] == qp_t, own, -1)
    nq, m = len(qp), len(gp)
    step = chunk_size or max(1, _TORCH_BYTES // (48 * m))
    parts = []
    for a in range(0, nq, step):                                   # chunks, not queries
        b = min(a + step, nq)
        sub = dist[a:b] if qi is None else dist.index_select(0, qi[a:b])
        if gi is not None:
            sub = sub.index_select(1, gi)
        try:
            parts.append(_torch_rows(sub, qp_t[a:b], qc_t[a:b], gp_t, gc_t, gid, own[a:b],
                                     len(vocab), removal, cmc_mode == 'identity'))
        except _NaNRow as bad:
            raise ValueError(f'distmat contains NaN in the distances of query {a + bad.row}; '
                             f'distances must be real numbers') from None
    return tuple(torch.cat(p).cpu().numpy() for p in zip(*parts))


def _torch_result(dist, q_index, g_index, qp, qc, gp, gc, removal, cmc_mode, max_rank, label,
                  chunk_size, stacklevel: int = 3) -> CrossModalResult:
    n_ids = len(np.unique(gp))
    if max_rank > n_ids:
        warnings.warn(f'max_rank={max_rank} exceeds the {n_ids} distinct gallery ids: the CMC '
                      f'tail saturates (carried forward)', stacklevel=stacklevel)
    first, ap, inp, valid = _torch_per_query(dist, q_index, g_index, qp, qc, gp, gc, removal,
                                             cmc_mode, chunk_size)
    return _summarise(first, ap, inp, valid, max_rank, len(qp), len(gp), n_ids, removal,
                      cmc_mode, label)


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


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')
    return int(value)


def evaluate_cross_modal(distmat, q_pids, g_pids, q_camids, g_camids,
                         protocol: Optional[str] = None, max_rank: int = 20, *,
                         removal: Optional[str] = None, cmc_mode: Optional[str] = None,
                         chunk_size: Optional[int] = None,
                         query_index=None, gallery_index=None,
                         num_threads: Optional[int] = None,
                         backend: Optional[str] = None) -> CrossModalResult:
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
        chunk_size: at most this many queries per block (default: sized to the caches).
            Memory: queries are processed in blocks, so the extra memory is bounded whatever
            the matrix size: per worker thread, one block of matrix rows (~4 MB, a view when
            the rows are contiguous) plus, on the compiled kernel, ~40 bytes per gallery item
            (tables and scratch); on the numpy engines, scratch of ~10 bytes per gathered
            distance for max(2**19, 8 x num_gallery) distances (~5 MB unless a gallery exceeds
            65k items), the pooled one (evaluate_settings) ~16 MB. The torch backend uses
            ~48 bytes per distance of a chunk of rows, at most 256 MB of device memory per
            chunk (``chunk_size`` rows when given).
        query_index, gallery_index: optional 1-D index arrays: evaluate
            ``distmat[np.ix_(query_index, gallery_index)]`` without materialising it (a trial of
            a pooled distance matrix); the pids/cams then describe the selected rows/columns.
            Exact ties rank by position in ``gallery_index``.
        num_threads: worker threads over query chunks (the compiled kernel and numpy release
            the GIL); default ``torch.get_num_threads()``. Results do not depend on it.
        backend: 'numpy' (the host engines: the compiled kernel where numba is installed, the
            numpy engines otherwise; the same numbers), 'torch' (every step in torch on the matrix's
            device: stable sort, cumulative sums, scatter_reduce; same definitions and tie
            rule) or None: torch for a tensor on a GPU (it stays there), numpy otherwise.

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
    backend = _resolve_backend(distmat, backend)
    dist = _as_distance_tensor(distmat) if backend == 'torch' else _as_distance_matrix(distmat)
    q_index = _index(query_index, 'query_index', dist.shape[0], 'rows')
    g_index = _index(gallery_index, 'gallery_index', dist.shape[1], 'columns')
    nq = dist.shape[0] if q_index is None else len(q_index)
    ng = dist.shape[1] if g_index is None else len(g_index)
    qp = _as_vector(q_pids, 'q_pids', nq, 'num_query')
    gp = _as_vector(g_pids, 'g_pids', ng, 'num_gallery')
    qc = _as_vector(q_camids, 'q_camids', nq, 'num_query')
    gc = _as_vector(g_camids, 'g_camids', ng, 'num_gallery')
    max_rank = _check_positive_int(max_rank, 'max_rank')
    if chunk_size is not None:
        chunk_size = _check_positive_int(chunk_size, 'chunk_size')
    threads = _default_threads() if num_threads is None else int(num_threads)
    if threads < 1:
        raise ValueError(f'num_threads must be >= 1, got {num_threads!r}')
    if nq == 0 or ng == 0:
        raise ValueError(f'empty evaluation under {label}: {nq} queries x {ng} gallery items')
    if backend == 'torch':
        return _torch_result(dist, q_index, g_index, qp, qc, gp, gc, removal, cmc_mode,
                             max_rank, label, chunk_size)
    return _evaluate_group(_RowReader(dist), q_index, qp, qc,
                           [(g_index, gp, gc, removal, cmc_mode)], max_rank, threads, chunk_size,
                           [''], stacklevel=3, labels=[label])[0]
