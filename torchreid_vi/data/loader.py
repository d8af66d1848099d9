"""The training loader: whole-batch epochs, per-sample augmentation seeds, resumable mid-epoch,
sliced across ranks.

:class:`EpochBatchSampler` turns any train sampler (the ``ModalityBalancedSampler`` or one of
torchreid's) into batches of ``(dataset index, augmentation seed)`` pairs:

* an epoch is the base sampler's index sequence cut into global batches of ``batch_size``
  (``drop_last``, as torchreid's loaders); the sequence of the current epoch is materialised once
  and kept in the checkpoint state, so a resumed run replays exactly the same epoch;
* every sample gets a seed that is a function of (seed, epoch, position in the epoch) only;
  :class:`SeededDataset` seeds Python's ``random`` and torch's CPU generator with it around the
  item's augmentation (and restores them after). Augmentation therefore does not depend on the
  number of data workers, on persistent workers, on the world size, or on where a run was
  interrupted: mid-epoch resume skips the finished batches without loading them;
* under ``torchrun`` each rank takes a disjoint slice of every global batch (the
  ``ModalityBalancedSampler``'s ``rank_positions``: P / world identities with their K visible + K
  infrared images; other samplers: a contiguous block), so the union over ranks is the
  single-process batch and the epoch length does not depend on the world size.

Example::

    >>> from torch.utils.data import SequentialSampler
    >>> s = EpochBatchSampler(SequentialSampler(range(10)), batch_size=4, seed=0)
    >>> [[i for i, _ in b] for b in s]                # 2 full batches, the rest dropped
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    >>> s.set_epoch(0); s.set_position(1)              # resume at the second batch of epoch 0
    >>> [[i for i, _ in b] for b in s]
    [[4, 5, 6, 7]]
"""
from __future__ import annotations

import random
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ['EpochBatchSampler', 'SeededDataset', 'sample_seeds']

_MASK64 = (1 << 64) - 1


def sample_seeds(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """Per-sample augmentation seeds, ``(n,)`` uint32: a splitmix64 hash of
    (seed, epoch, position in the epoch). Pure, vectorised."""
    base = np.uint64((int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9) & _MASK64)
    x = positions.astype(np.uint64) + base
    with np.errstate(over='ignore'):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x & np.uint64(0xFFFFFFFF)).astype(np.uint32)


class EpochBatchSampler(Sampler):
    """Batches of ``(index, seed)`` from a base sampler (see the module docstring).

    Args:
        sampler: the base train sampler (yields dataset indices; ``set_epoch(e)`` is called when
            it has one).
        batch_size: the **global** batch (``train.batch_size``), split across ranks.
        seed: the augmentation seed base.
        rank, world_size: this process's share (``0, 1``: everything).

    ``len(self)`` is the number of batches of the current epoch.
    """

    def __init__(self, sampler, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f'train.batch_size={batch_size}; expected >= 1')
        if not 0 <= rank < world_size:
            raise ValueError(f'rank {rank} is not in 0..{world_size - 1}')
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.columns = self._rank_columns()
        self.epoch = 0
        self.position = 0           # the batch of the current epoch the next iteration starts at
        self._order: Optional[np.ndarray] = None      # (num_batches, batch_size) of the epoch

    def _rank_columns(self) -> np.ndarray:
        w = self.world_size
        if hasattr(self.sampler, 'rank_positions'):
            return np.asarray(self.sampler.rank_positions(self.rank, w), dtype=np.int64)
        if self.batch_size % w:
            raise ValueError(f'train.batch_size={self.batch_size} is the global batch; it must '
                             f'divide by the {w} processes (each takes batch_size / world_size)')
        per = self.batch_size // w
        return np.arange(self.rank * per, (self.rank + 1) * per, dtype=np.int64)

    @property
    def local_batch_size(self) -> int:
        return len(self.columns)

    # ------------------------------------------------------------------ epoch state
    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch (its order is drawn on first use)."""
        if epoch != self.epoch or self._order is None:
            self._order = None
        self.epoch, self.position = int(epoch), 0

    def set_position(self, position: int) -> None:
        """Skip the first ``position`` batches of the current epoch (mid-epoch resume)."""
        self.position = int(position)

    def epoch_order(self) -> np.ndarray:
        """``(num_batches, batch_size)`` global index batches of the current epoch (drawn from
        the base sampler once per epoch)."""
        if self._order is None:
            if hasattr(self.sampler, 'set_epoch'):
                self.sampler.set_epoch(self.epoch)
            flat = np.fromiter(iter(self.sampler), dtype=np.int64)
            n = len(flat) // self.batch_size
            self._order = flat[:n * self.batch_size].reshape(n, self.batch_size)
        return self._order

    def state_dict(self, position: int) -> dict:
        """What a mid-epoch checkpoint needs to replay this epoch: the epoch, its order and
        ``position``, the number of batches already trained on (the loader prefetches, so the
        sampler's own pointer runs ahead of the training step)."""
        return {'epoch': self.epoch, 'position': int(position), 'seed': self.seed,
                'batch_size': self.batch_size,
                'order': torch.from_numpy(np.ascontiguousarray(self.epoch_order()))}

    def load_state_dict(self, state: dict) -> None:
        if int(state['batch_size']) != self.batch_size:
            raise ValueError(f'the checkpoint was taken with train.batch_size '
                             f'{state["batch_size"]}, this run uses {self.batch_size}')
        self.epoch, self.position = int(state['epoch']), int(state['position'])
        self.seed = int(state['seed'])
        self._order = state['order'].numpy().astype(np.int64)

    # ------------------------------------------------------------------ iteration
    def __len__(self) -> int:
        return len(self.epoch_order())

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        order = self.epoch_order()
        n, b = order.shape
        seeds = sample_seeds(self.seed, self.epoch, np.arange(n * b)).reshape(n, b)
        for i in range(self.position, n):
            idx, sd = order[i, self.columns], seeds[i, self.columns]
            yield list(zip(idx.tolist(), sd.tolist()))


class SeededDataset(Dataset):
    """Wraps a dataset so that ``dataset[(index, seed)]`` augments item ``index`` with ``seed``.

    Python's ``random`` (torchreid's transforms) and torch's CPU generator (torchvision's) are
    seeded for the item and restored afterwards, so the main process's RNG streams (dropout,
    say) are untouched when loading in-process (``data.workers 0``).
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        py_state = random.getstate()
        torch_state = torch.default_generator.get_state()
        random.seed(seed)
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            torch.default_generator.set_state(torch_state)

    def __getattr__(self, name):
        # The wrapped dataset's attributes (num_train_pids, train, ...), as torchreid reads them.
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)

