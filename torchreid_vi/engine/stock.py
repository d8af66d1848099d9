"""torchreid's stock softmax and triplet engines with the cross-modal evaluation and resume.

Reached by ``engine.name softmax|triplet`` (or ``loss.name`` when ``engine.name`` is empty).
Their training step is torchreid's own; evaluation, checkpoints and ``run()`` come from
:class:`~torchreid_vi.engine.base.CrossModalEngine`.
"""
from __future__ import annotations

from .._torchreid import tr
from .base import CrossModalEngine

__all__ = ['CrossModalSoftmaxEngine', 'CrossModalTripletEngine']


class CrossModalSoftmaxEngine(CrossModalEngine, tr.engine.ImageSoftmaxEngine):
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


class CrossModalTripletEngine(CrossModalEngine, tr.engine.ImageTripletEngine):
    """torchreid's ``ImageTripletEngine`` training with the cross-modal evaluation and resume.

    Args: as :class:`CrossModalEngine` (``**engine_options``), plus ``margin``, ``weight_t``,
    ``weight_x``
    (``loss.triplet.*``) and ``label_smooth`` (``loss.softmax.label_smooth``).
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
