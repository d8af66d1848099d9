"""torchreid's stock softmax and triplet engines with the cross-modal evaluation and resume.

Reached by ``engine.name softmax|triplet`` (or ``loss.name`` when ``engine.name`` is empty).
Their losses are torchreid's own (``CrossEntropyLoss`` with optional label smoothing,
``TripletLoss``); the step adds what the base engine offers every engine: mixed precision
(``train.amp``) and, under ``torchrun``, losses on the global batch (``vi.dist.global_loss``).
Evaluation, checkpoints and ``run()`` come from
:class:`~torchreid_vi.engine.base.CrossModalEngine`.
"""
from __future__ import annotations

from typing import Dict

import torch

from .._torchreid import tr
from .base import CrossModalEngine

__all__ = ['CrossModalSoftmaxEngine', 'CrossModalTripletEngine']


def _float(outputs):
    return tuple(o.float() for o in outputs) if isinstance(outputs, (tuple, list)) \
        else outputs.float()


class _StockStep:
    """The stock engines' shared step: inputs, autocast forward, global gather."""

    def _forward(self, data):
        imgs, pids = self.parse_data_for_train(data)
        imgs, pids = imgs.to(self.device, non_blocking=True), pids.to(self.device,
                                                                       non_blocking=True)
        if self.channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            outputs = self.model(imgs)
        return outputs, pids

    def _gather(self, x):
        return tuple(self.gather(o) for o in x) if isinstance(x, (tuple, list)) \
            else self.gather(x)


class CrossModalSoftmaxEngine(_StockStep, CrossModalEngine, tr.engine.ImageSoftmaxEngine):
    """torchreid's ``ImageSoftmaxEngine`` training with the cross-modal evaluation and resume.

    Args: as :class:`CrossModalEngine` (``**engine_options``), plus ``label_smooth``
    (``loss.softmax.label_smooth``).
    """

    def __init__(self, datamanager, model, optimizer, scheduler=None, use_gpu=False, *,
                 label_smooth: bool, **engine_options):
        tr.engine.ImageSoftmaxEngine.__init__(self, datamanager, model, optimizer,
                                              scheduler=scheduler, use_gpu=use_gpu,
                                              label_smooth=label_smooth)
        self.setup_cross_modal(**engine_options)

    @classmethod
    def engine_options(cls, cfg) -> dict:
        return dict(super().engine_options(cfg), label_smooth=cfg.loss.softmax.label_smooth)

    def forward_backward(self, data) -> Dict[str, float]:
        outputs, pids = self._forward(data)
        outputs, pids = self._gather(_float(outputs)), self.gather(pids)
        loss = self.compute_loss(self.criterion, outputs, pids)
        self.backward_and_step(loss)
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        acc = tr.metrics.accuracy(logits.detach(), pids)[0]
        values = torch.stack([loss.detach(), acc.float().reshape(())]).tolist()  # one sync
        return dict(zip(('loss', 'acc'), values))


class CrossModalTripletEngine(_StockStep, CrossModalEngine, tr.engine.ImageTripletEngine):
    """torchreid's ``ImageTripletEngine`` training with the cross-modal evaluation and resume.

    Args: as :class:`CrossModalEngine` (``**engine_options``), plus ``margin``, ``weight_t``,
    ``weight_x`` (``loss.triplet.*``) and ``label_smooth`` (``loss.softmax.label_smooth``).
    """

    def __init__(self, datamanager, model, optimizer, scheduler=None, use_gpu=False, *,
                 margin: float, weight_t: float, weight_x: float, label_smooth: bool,
                 **engine_options):
        tr.engine.ImageTripletEngine.__init__(self, datamanager, model, optimizer, margin=margin,
                                              weight_t=weight_t, weight_x=weight_x,
                                              scheduler=scheduler, use_gpu=use_gpu,
                                              label_smooth=label_smooth)
        self.setup_cross_modal(**engine_options)

    @classmethod
    def engine_options(cls, cfg) -> dict:
        t = cfg.loss.triplet
        return dict(super().engine_options(cfg), margin=t.margin, weight_t=t.weight_t,
                    weight_x=t.weight_x, label_smooth=cfg.loss.softmax.label_smooth)

    def forward_backward(self, data) -> Dict[str, float]:
        (outputs, features), pids = self._forward(data)
        outputs, features = self._gather(_float(outputs)), self._gather(_float(features))
        pids = self.gather(pids)
        loss, names, values = 0, [], []
        if self.weight_t > 0:
            loss_t = self.compute_loss(self.criterion_t, features, pids)
            loss = loss + self.weight_t * loss_t
            names.append('loss_t')
            values.append(loss_t.detach())
        if self.weight_x > 0:
            loss_x = self.compute_loss(self.criterion_x, outputs, pids)
            loss = loss + self.weight_x * loss_x
            logits = outputs[0] if isinstance(outputs, tuple) else outputs
            names += ['loss_x', 'acc']
            values += [loss_x.detach(),
                       tr.metrics.accuracy(logits.detach(), pids)[0].float().reshape(())]
        if not names:
            raise ValueError('loss.triplet.weight_t and loss.triplet.weight_x are both 0: nothing '
                             'to train')
        self.backward_and_step(loss)
        return dict(zip(names, torch.stack(values).tolist()))
