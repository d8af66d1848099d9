"""Modality-balanced identity sampling for visible-infrared training.

Example::

    >>> from torchreid_vi.data.sampler import ModalityBalancedSampler, batch_layout
    >>> data = [(f'{m}{p}_{k}.jpg', p, 1, m) for p in range(4) for m in (0, 1) for k in range(3)]
    >>> s = ModalityBalancedSampler(data, batch_size=8, num_instances=2, seed=0)
    >>> batch_layout(8, 2)
    (2, 2)
    >>> # one batch: v(p1) v(p1) v(p2) v(p2) r(p1) r(p1) r(p2) r(p2)
    >>> idx = list(s)[:8]
    >>> [data[i][3] for i in idx]
    [0, 0, 0, 0, 1, 1, 1, 1]
    >>> [data[i][1] for i in idx[:4]] == [data[i][1] for i in idx[4:]]
    True
"""
from __future__ import annotations

import logging
import math
from typing import Sequence, Tuple

import numpy as np
from torch.utils.data import Sampler

from .base import INFRARED, VISIBLE

__all__ = ['ModalityBalancedSampler', 'batch_layout']

logger = logging.getLogger(__name__)

EPOCH_MODES = ('agw', 'cover', 'idkl')
REPLACE_MODES = ('auto', 'always')
# Rows of the (chosen ids × images of the largest id) random-key matrix built per chunk when
# drawing without replacement; bounds memory at ~32 MB whatever the dataset.
_KEY_BUDGET = 4_000_000


def batch_layout(batch_size: int, num_instances: int) -> Tuple[int, int]:
    """``(P, K)`` for a modality-balanced batch of ``batch_size = 2·P·K`` images.

    Args:
        batch_size: ``train.batch_size`` (images per batch, both modalities).
        num_instances: ``sampler.num_instances`` = K, images per identity **per modality**.

    Raises:
        ValueError: ``batch_size`` is not a positive multiple of ``2·K``.

    >>> batch_layout(64, 4)
    (8, 4)
    """
    k = num_instances
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f'sampler.num_instances={num_instances!r} must be a positive int '
                         f'(K = images per identity per modality)')
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2 * k \
            or batch_size % (2 * k):
        raise ValueError(
            f'train.batch_size={batch_size} must be 2·P·K for the modality-balanced sampler, with '
            f'sampler.num_instances = K = {k} images per identity per modality and P identities '
            f'per batch (e.g. P=8, K={k}: batch_size={16 * k})')
    return batch_size // (2 * k), k


def _distinct_subsets(rng: np.random.Generator, ids: np.ndarray, p: int, rows: int) -> np.ndarray:
    """``rows`` independent uniform P-subsets of ``ids`` (distinct within a row) -> (rows, P)."""
    # The P smallest of uniform keys per row (argpartition: O(len(ids)) per row).
    keys = rng.random((rows, len(ids)))
    cols = np.argpartition(keys, p - 1, axis=1)[:, :p] if p < len(ids) else np.argsort(keys, axis=1)
    return ids[cols]


class ModalityBalancedSampler(Sampler):
    """P identities × K visible + K infrared images per batch (batch size 2·P·K).

    Each batch is ``2PK`` flat dataset indices::

        [v(p1,1..K), v(p2,1..K), ..., v(pP,1..K), r(p1,1..K), r(p2,1..K), ..., r(pP,1..K)]

    first half visible, second half infrared, K-blocks per identity, the same identity order in
    both halves: **position j and position PK + j share the identity and the k slot**. Build the
    DataLoader with ``batch_size = 2PK`` and ``drop_last=True`` (torchreid's datamanager does).
    Methods should still derive views from ``data['pid']`` / ``data['modality']``.

    Eligibility: an identity is drawn only if it has at least one image of each modality; the
    others are logged once with their count. Fewer than P eligible identities raise.

    In ``'agw'`` and ``'cover'`` epochs, per identity and modality, K images are drawn without
    replacement when it has at least K, else with replacement (duplicates in the batch;
    documented, not a crash). ``replace='always'`` always draws with replacement (AGW's
    ``IdentitySampler`` distribution).

    Epochs (``epoch_mode``):
        * ``'agw'``: ``floor(max(n_vis, n_ir) / (P·K)) + 1`` batches (n_* = images of eligible
          identities), each with P distinct identities drawn uniformly.
        * ``'cover'``: the eligible identities shuffled into groups of P, the last group topped up
          with other identities, so every identity appears at least once per epoch.
        * ``'idkl'``: the released IDKL sampler's epoch (spec idkl.md §6). Per identity,
          L = max(K, min(n_vis, n_ir)) images of each modality: a modality with fewer than K
          images draws K with replacement, the others a random L-subset without replacement,
          in random order; the k-th visible and k-th infrared image form a pair, and the pairs
          are cut into ``L // K`` chunks of K (the remainder is dropped). Then, while at least P
          identities have chunks left, P distinct such identities are drawn uniformly and each
          gives its next chunk. No image repeats within an epoch except through the
          with-replacement draws; the number of batches depends on the draw (at most
          ``sum(L // K) // P``: <= ~198 on SYSU-MM01 with P=12, K=5, against 371 for ``'agw'``).
          The official code crashes for an identity with one modality below K; here that
          modality is drawn with replacement (spec's fix).

    Determinism: epoch ``e`` uses ``np.random.default_rng((seed, e))`` only (no global RNG, no
    dependence on the number of workers). ``__iter__`` uses the current epoch then increments it;
    ``set_epoch(e)`` sets it (resume). ``len(sampler)`` is the exact number of indices the next
    ``__iter__`` yields (it varies per epoch in ``'idkl'`` mode: the epoch is planned once from
    ``(seed, epoch)`` and cached, so ``len`` and ``__iter__`` agree).

    Whole epochs as arrays (mid-epoch resume, distributed slicing): ``epoch_batches(e)`` is the
    ``(num_batches, 2PK)`` array ``__iter__`` yields for epoch ``e``, ``num_batches_in_epoch(e)``
    its first dimension, ``rank_positions(r, W)`` the batch columns of rank ``r`` of ``W`` when the
    P identities of each batch are split evenly across ranks::

        >>> data = [(f'{m}{p}_{k}.jpg', p, 1, m)
        ...         for p in range(4) for m in (0, 1) for k in range(9)]
        >>> s = ModalityBalancedSampler(data, batch_size=16, num_instances=2, epoch_mode='idkl')
        >>> s.epoch_batches(0).shape              # P = all 4 ids, 9 // 2 = 4 chunks each
        (4, 16)
        >>> len(s) == s.epoch_batches(0).size == len(list(s))
        True
        >>> s.rank_positions(1, 2)                # ids 3-4 of each batch: v v v v, r r r r
        array([ 4,  5,  6,  7, 12, 13, 14, 15])
        >>> s.epoch_batches(1)[:, s.rank_positions(1, 2)].shape    # rank 1's share of epoch 1
        (4, 8)

    Args:
        data_source: torchreid 4-tuples ``(path, pid, camid, modality)``; dsetid is the modality
            (0 visible, 1 infrared). pids need not be contiguous.
        batch_size: 2·P·K.
        num_instances: K, images per identity per modality.
        seed: base seed.
        epoch_mode: ``'agw'``, ``'cover'`` or ``'idkl'`` (``vi.sampler.epoch_mode``).
        replace: ``'auto'`` or ``'always'`` (``vi.sampler.replace``; ``'idkl'`` needs ``'auto'``).
    """

    requires_modality = True  # the datamanager refuses train sets without per-image modality

    def __init__(self, data_source: Sequence[tuple], batch_size: int, num_instances: int,
                 seed: int = 0, epoch_mode: str = 'agw', replace: str = 'auto'):
        self.num_pids_per_batch, self.num_instances = batch_layout(batch_size, num_instances)
        if epoch_mode not in EPOCH_MODES:
            raise ValueError(f'vi.sampler.epoch_mode={epoch_mode!r}; expected one of {EPOCH_MODES}')
        if replace not in REPLACE_MODES:
            raise ValueError(f'vi.sampler.replace={replace!r}; expected one of {REPLACE_MODES}')
        if epoch_mode == 'idkl' and replace != 'auto':
            raise ValueError(
                f"vi.sampler.replace={replace!r} cannot be combined with vi.sampler.epoch_mode="
                f"'idkl'; expected 'auto' (the released IDKL sampler draws with replacement only "
                f"where an identity has fewer than sampler.num_instances images of a modality)")
        self.batch_size = batch_size
        self.seed = int(seed)
        self.epoch_mode = epoch_mode
        self.replace = replace
        self.epoch = 0

        if len(data_source) == 0:
            raise ValueError('ModalityBalancedSampler: the training set is empty')
        pids = np.asarray([item[1] for item in data_source])
        modality = np.asarray([item[3] for item in data_source])
        bad = ~np.isin(modality, (VISIBLE, INFRARED))
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f'ModalityBalancedSampler: item {first} has dsetid {data_source[first][3]!r}; '
                f'it must be the modality (0 visible, 1 infrared). Was the '
                f'train set a sum with a dataset that has no modality?')
        # Per modality: a (num identities, max images) table of dataset indices, padded with -1.
        self.pids, pid_index = np.unique(pids, return_inverse=True)
        counts = np.zeros((2, len(self.pids)), dtype=np.int64)
        np.add.at(counts, (modality, pid_index), 1)
        has_both = (counts > 0).all(0)
        n_lack_vis = int((counts[VISIBLE] == 0).sum())
        n_lack_ir = int((counts[INFRARED] == 0).sum())
        p = self.num_pids_per_batch
        if has_both.sum() < p:
            raise ValueError(
                f'ModalityBalancedSampler: need >= P={p} ids with both modalities, found '
                f'{int(has_both.sum())} ({n_lack_ir} ids lack IR, {n_lack_vis} lack visible)')
        msg = (f'ModalityBalancedSampler: {int(has_both.sum())} of {len(self.pids)} ids have both '
               f'modalities and are drawn; {n_lack_ir} lack IR, {n_lack_vis} lack visible')
        (logger.warning if has_both.sum() < len(self.pids) else logger.info)(msg)

        eligible = np.flatnonzero(has_both)
        self.eligible_pids = self.pids[eligible]
        self._counts = counts[:, eligible]                       # (2, E)
        remap = np.full(len(self.pids), -1)
        remap[eligible] = np.arange(len(eligible))
        self._tables = []
        for m in (VISIBLE, INFRARED):
            sel = np.flatnonzero((modality == m) & (remap[pid_index] >= 0))
            rows = remap[pid_index[sel]]
            order = np.argsort(rows, kind='stable')             # keeps dataset order within an id
            sel, rows = sel[order], rows[order]
            starts = np.r_[0, np.cumsum(self._counts[m])[:-1]]
            cols = np.arange(len(sel)) - starts[rows]
            table = np.full((len(eligible), int(self._counts[m].max())), -1, dtype=np.int64)
            table[rows, cols] = sel
            self._tables.append(table)
        n_images = self._counts.sum(1)                           # (n_vis, n_ir) of eligible ids
        # Batches per epoch for the modes where it does not depend on the draw.
        if epoch_mode == 'agw':
            self._fixed_num_batches = int(n_images.max()) // (p * self.num_instances) + 1
        elif epoch_mode == 'cover':
            self._fixed_num_batches = math.ceil(len(eligible) / p)
        else:
            self._fixed_num_batches = None
        self._plans = {}                                         # epoch -> (batches, 2PK) array

    # ------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Make the next ``__iter__`` produce epoch ``epoch`` (e.g. when resuming)."""
        self.epoch = int(epoch)

    @property
    def num_batches(self) -> int:
        """Batches in the epoch the next ``__iter__`` produces (``self.epoch``)."""
        return self.num_batches_in_epoch(self.epoch)

    def num_batches_in_epoch(self, epoch: int) -> int:
        """Number of batches of epoch ``epoch`` (plans and caches that epoch in ``'idkl'`` mode)."""
        if self._fixed_num_batches is not None:
            return self._fixed_num_batches
        return len(self.epoch_batches(epoch))

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        return iter(self.epoch_batches(epoch).reshape(-1).tolist())

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """The whole of epoch ``epoch``: what ``__iter__`` yields for it, one batch per row.

        Pure: depends on ``(seed, epoch)`` only and leaves ``self.epoch`` alone.

        Returns:
            read-only int64 array ``(num_batches_in_epoch(epoch), 2·P·K)`` of dataset indices,
            each row in the layout ``[v(p1,1..K), ..., v(pP,1..K), r(p1,1..K), ..., r(pP,1..K)]``.
        """
        epoch = int(epoch)
        plan = self._plans.get(epoch)
        if plan is None:
            rng = np.random.default_rng((self.seed, epoch))
            plan = self._plan_idkl(rng) if self.epoch_mode == 'idkl' else self._plan_fixed(rng)
            plan.setflags(write=False)
            # len() plans the epoch that __iter__ then yields; keep a few recent epochs only.
            while len(self._plans) >= 4:
                self._plans.pop(next(iter(self._plans)))
            self._plans[epoch] = plan
        return plan

    def rank_positions(self, rank: int, world_size: int) -> np.ndarray:
        """Batch positions of rank ``rank`` of ``world_size`` when each batch's P identities are
        split into ``world_size`` contiguous groups of P / world_size.

        ``batch[rank_positions(r, W)]`` is a modality-balanced batch of P/W identities in this
        sampler's layout (2·P·K/W indices), and the positions of ranks 0..W-1 partition
        ``0..2PK-1``; ``epoch_batches(e)[:, rank_positions(r, W)]`` is rank r's share of epoch e.

        Raises:
            ValueError: P is not divisible by ``world_size``, or ``rank`` not in ``0..W-1``.

        >>> data = [(f'{m}{p}_{k}.jpg', p, 1, m)
        ...         for p in range(4) for m in (0, 1) for k in range(3)]
        >>> ModalityBalancedSampler(data, batch_size=16, num_instances=2).rank_positions(0, 2)
        array([ 0,  1,  2,  3,  8,  9, 10, 11])
        """
        p, k = self.num_pids_per_batch, self.num_instances
        if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) \
                or world_size < 1 or p % world_size:
            raise ValueError(
                f'world_size={world_size!r}: the P={p} identities per batch '
                f'(train.batch_size={self.batch_size} / (2 x sampler.num_instances={k})) must be '
                f'split evenly across ranks; expected a positive divisor of {p}')
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) \
                or not 0 <= rank < world_size:
            raise ValueError(f'rank={rank!r}; expected an int in 0..{world_size - 1} '
                             f'(world_size={world_size})')
        share = p // world_size * k
        vis = np.arange(rank * share, (rank + 1) * share)
        return np.concatenate([vis, vis + p * k])

    # ------------------------------------------------------------------------------------------
    def _plan_fixed(self, rng: np.random.Generator) -> np.ndarray:
        """'agw' / 'cover' epoch: (batches, 2PK)."""
        p, k = self.num_pids_per_batch, self.num_instances
        ids = self._draw_identities(rng)                          # (batches, P) rows of tables
        flat = ids.reshape(-1)
        halves = [self._draw_images(rng, m, flat).reshape(len(ids), p * k)
                  for m in (VISIBLE, INFRARED)]
        return np.concatenate(halves, axis=1)

    def _draw_identities(self, rng: np.random.Generator) -> np.ndarray:
        n, p, num_batches = self._counts.shape[1], self.num_pids_per_batch, self._fixed_num_batches
        if self.epoch_mode == 'agw':
            return _distinct_subsets(rng, np.arange(n), p, num_batches)
        order = rng.permutation(n)
        short = num_batches * p - n
        if short:
            # Top the last group up with distinct ids not already in it.
            last = order[(num_batches - 1) * p:]
            others = np.setdiff1d(np.arange(n), last)
            order = np.concatenate([order, rng.choice(others, short, replace=False)])
        return order.reshape(num_batches, p)

    def _plan_idkl(self, rng: np.random.Generator) -> np.ndarray:
        """'idkl' epoch (spec idkl.md §6): (batches, 2PK), batches depending on the draw."""
        p, k = self.num_pids_per_batch, self.num_instances
        n = self._counts.shape[1]
        # Pairs per identity: both modalities cut to the shorter, at least K (with replacement).
        length = np.maximum(k, self._counts.min(0))                     # (E,)
        slots = [self._random_slots(rng, m, length) for m in (VISIBLE, INFRARED)]  # (E, max L)

        # Rounds of P distinct ids among those with chunks left. While the active set cannot
        # change (every active id has >= r chunks left), the next r rounds are independent
        # uniform P-subsets of it: draw them at once. One loop pass per exhaustion event.
        remaining = length // k
        rounds = []
        while True:
            active = np.flatnonzero(remaining)
            if len(active) < p:
                break
            r = int(remaining[active].min())
            picked = _distinct_subsets(rng, active, p, r)             # (r, P)
            remaining -= np.bincount(picked.reshape(-1), minlength=n)
            rounds.append(picked)
        ids = np.concatenate(rounds)                                   # (batches, P)

        # Chunk number of each (batch, slot): how many times the id was picked before it.
        flat = ids.reshape(-1)
        order = np.argsort(flat, kind='stable')
        sorted_ids = flat[order]
        first = np.searchsorted(sorted_ids, sorted_ids)                # start of each id's run
        chunk = np.empty_like(flat)
        chunk[order] = np.arange(len(flat)) - first
        cols = chunk[:, None] * k + np.arange(k)                       # (B·P, K) pair positions
        halves = [self._tables[m][flat[:, None], slots[m][flat[:, None], cols]]
                  .reshape(len(ids), p * k) for m in (VISIBLE, INFRARED)]
        return np.concatenate(halves, axis=1)

    def _random_slots(self, rng: np.random.Generator, modality: int,
                      length: np.ndarray) -> np.ndarray:
        """Per identity, ``length[i]`` random slots (columns of the modality's table) in random
        order -> (E, length.max()); without replacement where the identity has >= K images (then
        ``length[i]`` <= its count), else with replacement. Entries past ``length[i]`` are junk."""
        k = self.num_instances
        counts = self._counts[modality]
        width = int(length.max())
        out = rng.integers(0, counts[:, None], size=(len(counts), width))   # with replacement
        enough = np.flatnonzero(counts >= k)
        table_width = self._tables[modality].shape[1]
        step = max(1, _KEY_BUDGET // max(table_width, 1))
        for start in range(0, len(enough), step):
            rows = enough[start:start + step]
            # Sorting uniform keys (padding slots last) = a random permutation of the id's slots.
            keys = rng.random((len(rows), table_width))
            keys[np.arange(table_width)[None, :] >= counts[rows, None]] = 2.0
            perm = np.argsort(keys, axis=1)[:, :width]
            out[rows, :perm.shape[1]] = perm
        return out

    def _draw_images(self, rng: np.random.Generator, modality: int, rows: np.ndarray) -> np.ndarray:
        """K dataset indices of ``modality`` for each identity row in ``rows`` -> (len(rows), K)."""
        k = self.num_instances
        table, counts = self._tables[modality], self._counts[modality][rows]
        # With replacement: uniform slots 0..count-1 (used for ids with < K images, or always).
        slots = rng.integers(0, counts[:, None], size=(len(rows), k))
        if self.replace == 'auto':
            enough = np.flatnonzero(counts >= k)
            width = table.shape[1]
            step = max(1, _KEY_BUDGET // max(width, 1))
            for start in range(0, len(enough), step):
                chunk = enough[start:start + step]
                # K smallest of uniform keys over the id's valid slots = a uniform K-subset
                # in random order; padding slots get key 2 so they are never chosen.
                keys = rng.random((len(chunk), width))
                keys[np.arange(width)[None, :] >= counts[chunk, None]] = 2.0
                part = np.argpartition(keys, k - 1, axis=1)[:, :k] if k < width else \
                    np.argsort(keys, axis=1)[:, :k]
                picked = np.take_along_axis(keys, part, axis=1).argsort(axis=1)
                slots[chunk] = np.take_along_axis(part, picked, axis=1)
        return table[rows[:, None], slots]
