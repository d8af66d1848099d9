"""Optimizers and learning-rate schedules from the config, including the schedule torchreid lacks.

torchreid steps schedulers once per epoch. ``WarmupMultiStepLR`` is the "bag of tricks" schedule
XIV uses: linear warm-up from ``warmup_factor * lr`` over ``warmup_epochs`` epochs, then ×gamma
at each milestone. Being a proper ``LRScheduler``, its ``state_dict`` resumes exactly.

Example::

    >>> import torch
    >>> from torchreid_vi.optim import WarmupMultiStepLR
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> sched = WarmupMultiStepLR(opt, milestones=[4], warmup_epochs=2, warmup_factor=0.1)
    >>> lrs = []
    >>> for _ in range(6):
    ...     lrs.append(round(opt.param_groups[0]['lr'], 3)); opt.step(); sched.step()
    >>> lrs
    [0.1, 0.55, 1.0, 1.0, 0.1, 0.1]
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

import torch

from ._torchreid import tr

__all__ = ['WarmupMultiStepLR', 'build_lr_scheduler', 'optimizer_from_config',
           'scheduler_from_config']


class WarmupMultiStepLR(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up then step decay, stepped once per epoch.

    Epoch ``e`` (0-based) gets ``base_lr * w(e) * gamma ** (#milestones <= e)`` with
    ``w(e) = warmup_factor + (1 - warmup_factor) * e / warmup_epochs`` for ``e < warmup_epochs``
    and 1 afterwards. Milestones are epoch numbers, as in torchreid's ``multi_step``.
    """

    def __init__(self, optimizer, milestones: Sequence[int], gamma: float = 0.1,
                 warmup_epochs: int = 10, warmup_factor: float = 0.1, last_epoch: int = -1):
        if list(milestones) != sorted(milestones):
            raise ValueError(f'milestones must be increasing, got {list(milestones)}')
        if warmup_epochs < 0 or not 0.0 < warmup_factor <= 1.0:
            raise ValueError(f'need warmup_epochs >= 0 and 0 < warmup_factor <= 1, got '
                             f'{warmup_epochs}, {warmup_factor}')
        self.milestones = list(milestones)
        self.gamma = gamma
        self.warmup_epochs = warmup_epochs
        self.warmup_factor = warmup_factor
        super().__init__(optimizer, last_epoch)

    def _factor(self, epoch: int) -> float:
        warm = 1.0
        if epoch < self.warmup_epochs:
            warm = self.warmup_factor + (1.0 - self.warmup_factor) * epoch / self.warmup_epochs
        return warm * self.gamma ** bisect_right(self.milestones, epoch)

    def get_lr(self):
        return [base * self._factor(self.last_epoch) for base in self.base_lrs]


def build_lr_scheduler(optimizer, lr_scheduler='single_step', stepsize=1, gamma=0.1, max_epoch=1,
                       warmup_epochs=10, warmup_factor=0.1):
    """torchreid's ``build_lr_scheduler`` plus ``'warmup_multi_step'`` (and ``'none'``)."""
    if lr_scheduler == 'none':
        return None
    if lr_scheduler == 'warmup_multi_step':
        steps = [stepsize] if isinstance(stepsize, int) else list(stepsize)
        return WarmupMultiStepLR(optimizer, steps, gamma, warmup_epochs, warmup_factor)
    return tr.optim.build_lr_scheduler(optimizer, lr_scheduler=lr_scheduler, stepsize=stepsize,
                                       gamma=gamma, max_epoch=max_epoch)


def optimizer_from_config(cfg, model):
    """torchreid's ``build_optimizer`` with ``train.*``, ``sgd.*``, ``rmsprop.*``, ``adam.*``."""
    return tr.optim.build_optimizer(
        model, optim=cfg.train.optim, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
        momentum=cfg.sgd.momentum, sgd_dampening=cfg.sgd.dampening,
        sgd_nesterov=cfg.sgd.nesterov, rmsprop_alpha=cfg.rmsprop.alpha,
        adam_beta1=cfg.adam.beta1, adam_beta2=cfg.adam.beta2, staged_lr=cfg.train.staged_lr,
        new_layers=cfg.train.new_layers, base_lr_mult=cfg.train.base_lr_mult)


def scheduler_from_config(cfg, optimizer):
    """:func:`build_lr_scheduler` with ``train.lr_scheduler/stepsize/gamma/max_epoch`` and
    ``vi.train.warmup_epochs/warmup_factor``."""
    return build_lr_scheduler(optimizer, lr_scheduler=cfg.train.lr_scheduler,
                              stepsize=cfg.train.stepsize, gamma=cfg.train.gamma,
                              max_epoch=cfg.train.max_epoch,
                              warmup_epochs=cfg.vi.train.warmup_epochs,
                              warmup_factor=cfg.vi.train.warmup_factor)
