"""The compiled evaluation kernel (numba): every trial of a pool from one pass over each row.

Trials whose galleries are ascending subsets of one pool of matrix columns (a whole SYSU report:
40 galleries of the 6,775 VIS images; an LLCM direction: 10 of the 8,680) are evaluated together,
one query row at a time, and no row is sorted:

1. *thresholds*: the query's true matches in the pool (its pid, minus what its rule removes),
   sorted by (distance, column). Exact ties rank by the lower column, i.e. the lower gallery
   position, since galleries are ascending (the stable order of datasets_and_protocols.md §1.5);
2. *bins*: every other item up to the last threshold falls in the bin "number of thresholds
   before it". ``x = (d - lo) * scale + 1`` is monotone in d under IEEE rounding, so bucketing
   the distance range by ``x`` (one multiply, one table look-up) places an item after every
   threshold of a lower bucket and before every one of a higher bucket; only the ~2 % of items
   that share a bucket with a threshold are compared with it, exactly. Items past the last
   threshold cost one comparison;
3. *counts*: each binned item adds its trial membership (one byte per trial, 8 trials per
   uint64 word; a bin widens its bytes to 16-bit fields before 255 items could overflow one) to
   its bin. Running sums over the bins then give, for every threshold and every trial it belongs
   to, the trial's kept items before it: its kept rank. AP, mINP and the image CMC follow;
4. *identity CMC*: an item binned before a trial's first true match is a person ranked before
   the true one; each trial marks the distinct persons of those items.

AP is summed in numpy's order (``np.add.reduceat``: the first term, then numpy's pairwise sum of
the rest), so every number equals the numpy engines' of :mod:`.metrics` to the bit. The kernel
releases the GIL: the evaluator's thread pool runs blocks of rows on it in parallel.

It needs numba (``available()``); without it (not installed, Python < 3.10, or
``NUMBA_DISABLE_JIT=1``) the numpy engines compute the same numbers, ~6x slower on a SYSU
report. The first call of a process loads the machine code from numba's cache (~0.3 s); after an
install or upgrade it compiles once, ~5 s for both distance dtypes (``make install`` runs
``python -m torchreid_vi.evaluation.compiled``, which does it then).

Example:
    >>> import numpy as np
    >>> from torchreid_vi.evaluation import evaluate_cross_modal
    >>> d = np.array([[0.1, 0.5, 0.9], [0.8, 0.2, 0.3]], np.float32)
    >>> r = evaluate_cross_modal(d, [1, 2], [1, 2, 2], [3, 6], [1, 2, 4], 'sysu', max_rank=2)
    >>> r.mAP                   # the compiled kernel when numba is installed, else numpy
    1.0
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np

from .rules import LOCATION_GALLERY_CAM, LOCATION_QUERY_CAM

try:  # optional: the numpy engines are the fallback
    import numba
    _IMPORT_ERROR = None
except ImportError as _exc:  # pragma: no cover - depends on the environment
    numba, _IMPORT_ERROR = None, _exc

__all__ = ['available', 'unavailable_reason', 'warm_up', 'NotCompilable', 'PoolTables',
           'CompiledEngine', 'MAX_TRIALS', 'MAX_GALLERY']

MAX_TRIALS = 64          # trials per pool: one uint64 of trial bits
MAX_GALLERY = 1 << 16    # running counts are 16-bit fields: trial galleries < 65,536 items
FIELD_BITS = 8           # one trial's counter in an item's packed word (8 trials per uint64)
_BYTES = np.uint64(0x00FF00FF00FF00FF)
_BUCKETS = 32            # distance buckets per threshold (more: fewer exact comparisons)
_NO_CAMERA = np.iinfo(np.int64).min     # gallery cameras are checked to be exact int64
_DEBRUIJN = 0x03F79D71B4CB0A89
_CTZ = np.zeros(64, np.int64)   # trailing zeros of a power of two, by (x * _DEBRUIJN) >> 58
for _i in range(64):
    _CTZ[((1 << _i) * _DEBRUIJN % (1 << 64)) >> 58] = _i


def unavailable_reason() -> Optional[str]:
    """None when the kernel can run (numba imports, JIT compilation on), else why not."""
    if numba is None:
        if isinstance(_IMPORT_ERROR, ModuleNotFoundError) and _IMPORT_ERROR.name == 'numba':
            return 'numba is not installed'
        return f'numba failed to import ({_IMPORT_ERROR})'
    if numba.config.DISABLE_JIT:
        return 'NUMBA_DISABLE_JIT is set'
    return None


def available() -> bool:
    """True when the compiled kernel can run."""
    return unavailable_reason() is None


class NotCompilable(ValueError):
    """These trials do not fit the kernel's tables (the numpy engines take them)."""


class PoolTables:
    """The kernel's tables for trials whose galleries are ascending subsets of one column pool.

    Args:
        galleries: per trial ``(g_index, g_pids, g_cams)``: ``g_index`` strictly ascending matrix
            columns, ``g_pids``/``g_cams`` theirs; a column's pid and camera must agree across
            trials.
        removals, cmc_modes: per trial ('location' | 'same_pid_cam' | 'none',
            'identity' | 'image').

    Raises:
        NotCompilable: no trial or more than ``MAX_TRIALS``, a gallery of ``MAX_GALLERY`` items
            or more, or a column with different pids or cameras in two trials.

    Memory: ~(16 + W * 8) bytes per pool column and kind of query (W = ceil(trials / 8)).
    """

    def __init__(self, galleries, removals: Sequence[str], cmc_modes: Sequence[str]):
        T = self.T = len(galleries)
        if not 1 <= T <= MAX_TRIALS:
            raise NotCompilable(f'{T} trials (the kernel takes 1..{MAX_TRIALS})')
        if max(len(g) for g, _, _ in galleries) >= MAX_GALLERY:
            raise NotCompilable(f'a trial gallery of {MAX_GALLERY} items or more')
        U = np.unique(np.concatenate([np.asarray(g, np.int64) for g, _, _ in galleries]))
        n = len(U)
        pids, cams = np.zeros(n, np.int64), np.zeros(n, np.int64)
        positions = []
        for g, gp, gc in galleries:                               # a loop over trials
            p = np.searchsorted(U, g)
            pids[p], cams[p] = gp, gc
            positions.append(p)
        for p, (_, gp, gc) in zip(positions, galleries):
            if not (np.array_equal(pids[p], gp) and np.array_equal(cams[p], gc)):
                raise NotCompilable('a column has different pids or cameras in two trials')
        self.vocab = np.unique(pids)
        V = len(self.vocab)
        pv = np.searchsorted(self.vocab, pids)
        self.location = bool(any(r == 'location' for r in removals))
        kinds = 2 if self.location else 1
        member = np.zeros((kinds, n, T), bool)
        for t, p in enumerate(positions):
            member[:, p, t] = True
        if kinds == 2:             # kind 1: cam-3 queries, whose location trials drop cam 2
            member[1][np.ix_(cams == LOCATION_GALLERY_CAM,
                             np.array([r == 'location' for r in removals]))] = False
        bit = np.uint64(1) << np.arange(T, dtype=np.uint64)
        per_word = 64 // FIELD_BITS
        field = np.uint64(1) << ((np.arange(T) % per_word) * FIELD_BITS).astype(np.uint64)
        words = np.zeros((kinds, n, -(-T // per_word)), np.uint64)
        for t in range(T):                                         # a loop over trials
            words[:, :, t // per_word] += member[:, :, t].astype(np.uint64) * field[t]
        bits = (member.astype(np.uint64) * bit).sum(2, dtype=np.uint64)      # (kinds, n)
        active = [np.flatnonzero(bits[kind]) for kind in range(kinds)]   # items of each kind
        item_kind = np.concatenate([np.full(len(x), kind) for kind, x in enumerate(active)])
        items = np.concatenate(active)
        mask = lambda flags: np.uint64((bit * np.asarray(flags)).sum(dtype=np.uint64))  # noqa
        self.arrays = dict(
            cols=U, cams=cams, member=bits,
            own_ptr=np.r_[0, np.cumsum(np.bincount(pv, minlength=V)), n].astype(np.int64),
            own=np.argsort(pv, kind='stable').astype(np.int64),
            act_ptr=np.r_[0, np.cumsum([len(x) for x in active])].astype(np.int64),
            kcol=U[items], kpv=pv[items].astype(np.int64), kmem=bits[item_kind, items],
            kwords=np.ascontiguousarray(words[item_kind, items]),
            spc_mask=mask([r == 'same_pid_cam' for r in removals]),
            ident_mask=mask([c == 'identity' for c in cmc_modes]))

    def vocab_index(self, q_pids: np.ndarray) -> np.ndarray:
        """(nq,) int64 index of each query pid in the vocabulary; V when no gallery has it."""
        V = len(self.vocab)
        idx = np.minimum(np.searchsorted(self.vocab, q_pids), V - 1)
        return np.where(self.vocab[idx] == q_pids, idx, V).astype(np.int64)


class CompiledEngine:
    """The kernel on blocks of query rows, with per-query outputs ``first``, ``ap``, ``inp``,
    ``valid`` (each (nq, T)), the interface of the engines in :mod:`.metrics`.

    ``first`` is the kept rank of the first true match (image CMC) or the true person's rank
    among distinct persons (identity CMC), exact. Extra memory per block: scratch of a few
    arrays of the pool's size and (T, vocabulary) int64 stamps.

    Args:
        tables: the pool's :class:`PoolTables`. q_pids, q_cams: (nq,) of the queries.

    Blocks reach the kernel C-contiguous and writable (others are copied), so float32 and
    float64 are its only two machine codes, both built by :func:`warm_up` before any worker
    thread runs them.
    """

    def __init__(self, tables: PoolTables, q_pids, q_cams):
        nq, T = len(q_pids), tables.T
        self.tables = tables
        self.qv = tables.vocab_index(np.asarray(q_pids))
        cams = np.asarray(q_cams)
        as_int = cams.astype(np.int64)           # a camera that is no integer matches none
        self.qc = np.ascontiguousarray(np.where(as_int == cams, as_int, _NO_CAMERA))
        self.kind = ((cams == LOCATION_QUERY_CAM) & tables.location).astype(np.int64)
        self.first, self.ap = np.zeros((nq, T), np.int64), np.zeros((nq, T))
        self.inp, self.valid = np.zeros((nq, T)), np.zeros((nq, T), bool)

    def process(self, block: np.ndarray, a: int) -> None:
        """Evaluate the queries a .. a + len(block) from their distance rows ``block``."""
        if not (block.flags.c_contiguous and block.flags.writeable):
            block = np.array(block, order='C')   # one machine code per dtype
        bad = self._run(block, a)
        if bad >= 0:
            raise ValueError(f'distmat contains NaN in the distances of query {a + bad}; '
                             f'distances must be real numbers')

    def _run(self, block, a):
        b, t = a + len(block), self.tables.arrays
        return _kernel(block, t['cols'], self.qv[a:b], self.qc[a:b], self.kind[a:b], t['cams'],
                       t['member'], t['own_ptr'], t['own'], t['act_ptr'], t['kcol'], t['kpv'],
                       t['kmem'], t['kwords'], t['spc_mask'], t['ident_mask'], self.tables.T,
                       self.first[a:b], self.ap[a:b], self.inp[a:b], self.valid[a:b])


def warm_up() -> float:
    """Load the kernel's machine code for float32 and float64 distances into this process, or
    compile it into numba's cache when it is not there yet (once per install: ``make install``
    does it, so that no evaluation waits for it). Returns the seconds it took."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f'the compiled evaluation kernel is unavailable: {reason}')
    t0 = time.perf_counter()
    tables = PoolTables([(np.arange(2), np.arange(2), np.ones(2, np.int64))], ['location'],
                        ['identity'])
    engine = CompiledEngine(tables, np.arange(2), np.full(2, LOCATION_QUERY_CAM))
    for dtype in (np.float32, np.float64):
        engine.process(np.zeros((0, 2), dtype), 0)
    return time.perf_counter() - t0


if numba is not None:
    _jit = numba.njit(nogil=True, cache=True)

    @_jit
    def _block_sum(a, lo, n):
        """numpy's pairwise float64 sum of ``a[lo:lo + n]`` for n <= 128 (one unrolled block)."""
        if n < 8:
            res = -0.0
            for i in range(n):
                res += a[lo + i]
            return res
        r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
        r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
        i = 8
        end = n - n % 8
        while i < end:
            r0 += a[lo + i]
            r1 += a[lo + i + 1]
            r2 += a[lo + i + 2]
            r3 += a[lo + i + 3]
            r4 += a[lo + i + 4]
            r5 += a[lo + i + 5]
            r6 += a[lo + i + 6]
            r7 += a[lo + i + 7]
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res += a[lo + i]
            i += 1
        return res

    @_jit
    def _pairwise_sum(a, lo, n):
        """numpy's pairwise float64 sum of ``a[lo:lo + n]`` (``DOUBLE_pairwise_sum``: blocks of
        <= 128, else the sum of two halves cut at a multiple of 8). The recursion runs on an
        explicit stack (numba's cache cannot hold recursive functions)."""
        if n <= 128:
            return _block_sum(a, lo, n)
        slo = np.empty(64, np.int64)
        sn = np.empty(64, np.int64)
        right = np.zeros(64, np.bool_)
        left = np.empty(64, np.float64)
        depth = 0
        slo[0], sn[0], right[0] = lo, n, False
        while True:
            m = sn[depth]
            if m > 128:                                    # descend into the left half
                half = m // 2 - (m // 2) % 8
                slo[depth + 1], sn[depth + 1], right[depth + 1] = slo[depth], half, False
                depth += 1
                continue
            ret = _block_sum(a, slo[depth], m)
            depth -= 1
            while depth >= 0 and right[depth]:             # both halves done: left + right
                ret = left[depth] + ret
                depth -= 1
            if depth < 0:
                return ret
            left[depth], right[depth] = ret, True          # left done: the right half next
            m = sn[depth]
            half = m // 2 - (m // 2) % 8
            slo[depth + 1], sn[depth + 1], right[depth + 1] = slo[depth] + half, m - half, False
            depth += 1

    @_jit
    def _ctz(low):
        """Index of the single set bit of the uint64 ``low``."""
        return _CTZ[(low * np.uint64(_DEBRUIJN)) >> np.uint64(58)]

    @_jit
    def _kernel(block, cols, qv, qcam, kind_of, cams, member, own_ptr, own, act_ptr, kcol, kpv,
                kmem, kwords, spc_mask, ident_mask, T, first, ap, inp, valid):
        """Metrics of the k query rows of ``block`` against the pool's T trials.

        Args:
            block: (k, num_columns) float32/float64 distance rows.
            cols, cams: (n,) matrix column (ascending) and camera of each pool position.
            qv: (k,) vocabulary index of each query's pid (V: in no gallery).
            qcam: (k,) query camera. kind_of: (k,) 0, or 1 for queries that the location rule
                applies to (their tables drop the cam-2 items of location trials).
            member: (kinds, n) uint64 trial bits of each pool position.
            own_ptr, own: per vocabulary pid, its pool positions, ascending (CSR; V + 1 rows).
            act_ptr: (kinds + 1,) each kind's slice of the item tables: the pool positions with
                a member bit for that kind, ascending: ``kcol`` matrix column, ``kpv``
                vocabulary pid, ``kmem`` trial bits, ``kwords`` (items, W) the same bits as
                byte counters, 8 trials per uint64 word.
            spc_mask: trials of the same_pid_cam rule. ident_mask: trials of the identity CMC.
            first, ap, inp, valid: (k, T) outputs, written.

        Returns:
            -1, or the first row holding a NaN among the pool's distances.
        """
        k = block.shape[0]
        W = kwords.shape[1]
        V = own_ptr.shape[0] - 2
        wide16 = np.uint64(0xFFFF)
        max_own = 1
        for v in range(V + 1):
            max_own = max(max_own, own_ptr[v + 1] - own_ptr[v])
        max_items = 1
        for kd in range(act_ptr.shape[0] - 1):
            max_items = max(max_items, act_ptr[kd + 1] - act_ptr[kd])
        # per bin: packed 8-bit counters (flushed before they can overflow: at 255 items) and
        # the flushed sums as 16-bit fields, even and odd trials of each word apart
        hist = np.zeros((max_own + 1, W), np.uint64)
        filled = np.zeros(max_own + 1, np.int64)
        flushed = np.zeros((max_own + 1, 2 * W), np.uint64)
        running = np.zeros(2 * W, np.uint64)
        pd = np.empty(max_own, np.float64)           # thresholds: distance, column, trials
        pc = np.empty(max_own, np.int64)
        pe = np.empty(max_own, np.uint64)
        pend = np.zeros(max_own + 1, np.uint64)
        below = np.zeros(_BUCKETS * max_own + 3, np.int32)
        item = np.empty(max_items, np.int64)         # the items up to the last threshold
        dist = np.empty(max_items, block.dtype)      # ... their distances
        pending = np.empty(max_items, np.uint64)     # items that count for identity trials
        pbin = np.empty(max_items, np.uint64)        # ... and their bins
        seen = np.zeros((T, V + 2), np.int64)
        persons = np.zeros(T, np.int64)
        count = np.zeros(T, np.int64)
        last = np.zeros(T, np.int64)
        rank1 = np.zeros(T, np.int64)
        prec = np.empty((T, max_own), np.float64)
        one = np.uint64(1)
        for r in range(k):
            row = block[r]
            v = qv[r]
            kd = kind_of[r]
            qc = qcam[r]
            a0, a1 = act_ptr[kd], act_ptr[kd + 1]
            # 1. thresholds: the kept true matches, sorted by (distance, column)
            npos = 0
            for a in range(own_ptr[v], own_ptr[v + 1]):
                j = own[a]
                e = member[kd, j]
                if cams[j] == qc:
                    e &= ~spc_mask
                if e == 0:
                    continue
                d = np.float64(row[cols[j]])
                if d != d:
                    return r
                i = npos                       # columns ascend: ties stay behind (stable)
                while i > 0 and pd[i - 1] > d:
                    pd[i], pc[i], pe[i] = pd[i - 1], pc[i - 1], pe[i - 1]
                    i -= 1
                pd[i], pc[i], pe[i] = d, cols[j], e
                npos += 1
            for t in range(T):
                count[t] = 0
                persons[t] = 0
                first[r, t] = 0
                ap[r, t] = 0.0
                inp[r, t] = 0.0
                valid[r, t] = False
            if npos == 0:                      # invalid for every trial; NaN still rejected
                bad = False
                for a in range(a0, a1):
                    x = row[kcol[a]]
                    bad |= x != x
                if bad:
                    return r
                continue
            # the first threshold of each trial; pend[s]: identity trials whose first true
            # match is threshold s or later (an item of bin s precedes it)
            got = np.uint64(0)
            for i in range(npos):
                pend[i] = pe[i] & ~got & ident_mask
                got |= pe[i]
            pend[npos] = 0
            for i in range(npos - 2, -1, -1):
                pend[i] |= pend[i + 1]
            # 2. buckets: x = (d - lo) * scale + 1 is monotone in d (IEEE rounding is), so an
            # item's bin is the thresholds of lower buckets plus those of its own bucket that
            # precede it (compared exactly); any positive finite scale is exact
            lo = pd[0]
            hi = pd[npos - 1]
            Q = _BUCKETS * npos
            scale = Q / (hi - lo) if hi > lo else 1.0
            if not (scale > 0.0 and scale < np.inf):
                scale = 1.0
            top = np.float64(Q + 1)
            for b in range(Q + 3):
                below[b] = 0
            for i in range(npos):
                x = (pd[i] - lo) * scale + 1.0
                x = x if x > 0.0 else 0.0      # NaN (-inf - -inf) -> 0: still monotone
                x = x if x < top else top
                below[np.int64(x) + 1] += 1
            for b in range(1, Q + 3):          # below[b]: thresholds of buckets < b
                below[b] += below[b - 1]
            # 3. the other persons' items up to the last threshold (one branch-free pass);
            # NaN flagged
            bad = False
            m = 0
            for a in range(a0, a1):
                ua = np.uint64(a)
                d = row[kcol[ua]]
                bad |= d != d
                item[np.uint64(m)] = a
                dist[np.uint64(m)] = d
                m += (d <= hi) & (kpv[ua] != v)  # own pid: thresholds, or removed
            if bad:
                return r
            for i in range(npos + 1):
                filled[i] = 0
                for w in range(W):
                    hist[i, w] = 0
                    flushed[i, 2 * w] = 0
                    flushed[i, 2 * w + 1] = 0
            stamp = r + 1
            unpos = np.uint64(npos)
            # 4. each one's bin: the thresholds of lower buckets, plus those of its own bucket
            # that precede it (a later bucket's never do); its trial counters into the bin
            npend = 0
            for x in range(m):
                a = np.uint64(item[np.uint64(x)])
                d = np.float64(dist[np.uint64(x)])
                y = (d - lo) * scale + 1.0
                y = y if y > 0.0 else 0.0
                y = y if y < top else top
                b = np.uint64(y)
                s = np.uint64(below[b])
                end = np.uint64(below[b + np.uint64(1)])
                if end > s:                    # shares its bucket with thresholds (~2 %)
                    c = kcol[a]
                    while s < end and (pd[s] < d or (pd[s] == d and pc[s] < c)):
                        s += np.uint64(1)
                if s >= unpos:
                    continue
                # identity trials still before their first true match: this item's person
                # counts for them (listed without a branch, counted in step 5)
                pending[np.uint64(npend)] = a
                pbin[np.uint64(npend)] = s
                npend += (kmem[a] & pend[s]) != 0
                for w in range(W):
                    hist[s, w] += kwords[a, w]
                filled[s] += 1
                if filled[s] == 255:           # before a byte could overflow: widen
                    filled[s] = 0
                    for w in range(W):
                        packed = hist[s, w]
                        flushed[s, 2 * w] += packed & _BYTES
                        flushed[s, 2 * w + 1] += (packed >> np.uint64(8)) & _BYTES
                        hist[s, w] = 0
            # 5. the persons before each identity trial's first true match
            for x in range(npend):
                a = pending[x]
                s = pbin[x]
                e = kmem[a] & pend[s]
                g = kpv[a]
                while e != 0:
                    low = e & (~e + one)
                    t = _ctz(low)
                    if seen[t, g] != stamp:
                        seen[t, g] = stamp
                        persons[t] += 1
                    e ^= low
            # running sums over the bins (16-bit fields): a threshold's kept rank in a trial
            # is that trial's count through its bin, plus the trial's thresholds up to it
            for w in range(2 * W):
                running[w] = 0
            for i in range(npos):
                for w in range(W):
                    x = hist[i, w]
                    running[2 * w] += (x & _BYTES) + flushed[i, 2 * w]
                    running[2 * w + 1] += ((x >> np.uint64(8)) & _BYTES) + flushed[i, 2 * w + 1]
                e = pe[i]
                while e != 0:
                    low = e & (~e + one)
                    t = _ctz(low)
                    e ^= low
                    c = count[t] + 1
                    count[t] = c
                    f = t % 8
                    rank = np.int64((running[2 * (t // 8) + f % 2] >> np.uint64(16 * (f // 2)))
                                    & wide16) + c
                    prec[t, c - 1] = c / rank
                    last[t] = rank
                    if c == 1:
                        rank1[t] = rank
            for t in range(T):
                c = count[t]
                if c == 0:
                    continue
                valid[r, t] = True
                ap[r, t] = (prec[t, 0] + _pairwise_sum(prec[t], 1, c - 1)) / c
                inp[r, t] = c / last[t]
                first[r, t] = persons[t] + 1 if (ident_mask >> np.uint64(t)) & one else rank1[t]
        return -1


if __name__ == '__main__':       # python -m torchreid_vi.evaluation.compiled (make install)
    if available():
        print(f'compiled evaluation kernel: ready (numba {numba.__version__}; machine code for '
              f'float32 and float64 in {warm_up():.1f} s)')
    else:
        print(f'compiled evaluation kernel: unavailable ({unavailable_reason()}); the numpy '
              f'engines evaluate instead (the same numbers)')
