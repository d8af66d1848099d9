"""Modality-balanced identity sampling for visible-infrared training.

Example::

    >>> from torchreid_vi.data.sampler import ModalityBalancedSampler, batch_layout
    >>> data = [(f'{m}{p}_{k}.jpg', p, 1, m) for p in range(4) for m in (0, 1) for k in range(3)]
    >>> s = ModalityBalancedSampler(data, batch_size=8, num_instances=2, seed=0)
    >>> batch_layout(8, 2)
    (2, 2)
    >>> idx = list(s)[:8]                      # one batch: v(p1) v(p1) v(p2) v(p2) r(p1) r(p1) r(p2) r(p2)
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

EPOCH_MODES = ('agw', 'cover')
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

    Per identity and modality, K images are drawn without replacement when it has at least K,
    else with replacement (duplicates in the batch; documented, not a crash). ``replace='always'``
    always draws with replacement (AGW's ``IdentitySampler`` distribution).

    Epochs (``epoch_mode``):
        * ``'agw'``: ``floor(max(n_vis, n_ir) / (P·K)) + 1`` batches (n_* = images of eligible
          identities), each with P distinct identities drawn uniformly.
        * ``'cover'``: the eligible identities shuffled into groups of P, the last group topped up
          with other identities, so every identity appears at least once per epoch.

    Determinism: epoch ``e`` uses ``np.random.default_rng((seed, e))`` only (no global RNG, no
    dependence on the number of workers). ``__iter__`` uses the current epoch then increments it;
    ``set_epoch(e)`` sets it (resume). ``len(sampler)`` is the exact number of indices yielded.

    Args:
        data_source: torchreid 4-tuples ``(path, pid, camid, modality)``; dsetid is the modality
            (0 visible, 1 infrared). pids need not be contiguous.
        batch_size: 2·P·K.
        num_instances: K, images per identity per modality.
        seed: base seed.
        epoch_mode: ``'agw'`` or ``'cover'``.
        replace: ``'auto'`` or ``'always'``.
    """

    requires_modality = True  # the datamanager refuses train sets without per-image modality

    def __init__(self, data_source: Sequence[tuple], batch_size: int, num_instances: int,
                 seed: int = 0, epoch_mode: str = 'agw', replace: str = 'auto'):
        self.num_pids_per_batch, self.num_instances = batch_layout(batch_size, num_instances)
        if epoch_mode not in EPOCH_MODES:
            raise ValueError(f'sampler epoch_mode={epoch_mode!r}; expected one of {EPOCH_MODES}')
        if replace not in REPLACE_MODES:
            raise ValueError(f'sampler replace={replace!r}; expected one of {REPLACE_MODES}')
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
        if epoch_mode == 'agw':
            self.num_batches = int(n_images.max()) // (p * self.num_instances) + 1
        else:
            self.num_batches = math.ceil(len(eligible) / p)

    # ------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Make the next ``__iter__`` produce epoch ``epoch`` (e.g. when resuming)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        self.epoch += 1
        return iter(self._epoch_indices(rng).tolist())

    def _epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        p, k = self.num_pids_per_batch, self.num_instances
        ids = self._draw_identities(rng)                          # (batches, P) rows of tables
        flat = ids.reshape(-1)
        halves = [self._draw_images(rng, m, flat).reshape(self.num_batches, p * k)
                  for m in (VISIBLE, INFRARED)]
        return np.concatenate(halves, axis=1).reshape(-1)

    def _draw_identities(self, rng: np.random.Generator) -> np.ndarray:
        n, p = self._counts.shape[1], self.num_pids_per_batch
        if self.epoch_mode == 'agw':
            # P distinct ids per batch: the first P columns of a per-row random permutation.
            keys = rng.random((self.num_batches, n))
            return np.argpartition(keys, p - 1, axis=1)[:, :p] if p < n else \
                np.argsort(keys, axis=1)
        order = rng.permutation(n)
        short = self.num_batches * p - n
        if short:
            # Top the last group up with distinct ids not already in it.
            last = order[(self.num_batches - 1) * p:]
            others = np.setdiff1d(np.arange(n), last)
            order = np.concatenate([order, rng.choice(others, short, replace=False)])
        return order.reshape(self.num_batches, p)

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
