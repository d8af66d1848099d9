"""The IDKL engine: one training step of spec ``idkl.md`` §3 on a
:class:`~torchreid_vi.engine.base.CrossModalEngine`.

Choose it with ``engine.name idkl`` and ``model.name idkl_resnet50`` (or ``idkl_resnet18`` for a
CPU demo). Loss weights and the paper-vs-code switches live in ``cfg.idkl``
(:mod:`torchreid_vi.methods.idkl.config`); ``configs/idkl/*.yaml`` hold the released code's
per-dataset values.

Batch: ``train.batch_size = 2·P·m`` with ``sampler.num_instances = m`` images per identity **per
modality** and ``sampler.train_sampler ModalityBalancedSampler`` (the official 12 identities ×
10 images = 12 × (5 visible + 5 infrared) is ``train.batch_size 120``, ``sampler.num_instances 5``).
The loss rebuilds its visible/infrared pairing from ``data['pid']`` and ``data['modality']`` (spec
§5), so it does not depend on how the sampler orders the batch.

Mixed precision: ``train.amp`` of the base engine (``fp16`` = autocast + dynamic GradScaler, what
the released apex O1 run did; ``bf16``; ``none``). All loss maths runs in float32.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ...engine.base import CrossModalEngine
from ...utils.distributed import unwrap_model
from .loss import IDKLLoss
from .model import IDKLNet

__all__ = ['IDKLEngine']


class IDKLEngine(CrossModalEngine):
    """Trains :class:`~torchreid_vi.methods.idkl.model.IDKLNet` with :class:`IDKLLoss`.

    Args: as :class:`~torchreid_vi.engine.base.CrossModalEngine` (``**engine_options``), plus
        criterion: the :class:`IDKLLoss` (default: the default config's ``cfg.idkl``). Its
            confuser mode must be the model's (``idkl.confuser.mode`` reaches both through
            :meth:`from_config` and the model factory); a mismatch is an error.

    ``forward_backward`` returns every term as a Python float (names of the released code's log:
    tri, ce, id_pl, unad, pse, F_p, IN_p, soft_dt, bg_kl, sm_kl, plus tri_sh, tri_sp, tgsa_dist,
    tgsa_mdr, the total ``loss`` and ``acc`` in percent); see :class:`IDKLLoss`.
    Evaluation uses the eval-mode output of the model, the BN'd shared feature.
    """

    def __init__(self, datamanager, model, optimizer=None, scheduler=None, use_gpu=False, *,
                 criterion: Optional[IDKLLoss] = None, **engine_options):
        super().__init__(datamanager, model, optimizer, scheduler, use_gpu, **engine_options)
        net = unwrap_model(model)
        if not isinstance(net, IDKLNet):
            raise TypeError(f'engine "idkl" needs an IDKL model (model.name idkl_resnet50 or '
                            f'idkl_resnet18), got {type(net).__name__}')
        if criterion is None:
            from ...config import get_default_config
            criterion = IDKLLoss.from_config(get_default_config())
        if criterion.confuser_mode != net.confuser_mode:
            raise ValueError(
                f'idkl.confuser.mode: the loss uses {criterion.confuser_mode!r} but the model was '
                f'built with {net.confuser_mode!r}; build both from the same config (the model '
                f'factory takes confuser_mode=...)')
        self.criterion = criterion
        sampler = getattr(datamanager, 'train_sampler', None)
        if sampler is not None and not getattr(type(sampler), 'requires_modality', False):
            print(f'IDKL: the train sampler is {type(sampler).__name__}; IDKL needs batches of '
                  f'P identities x (m visible + m infrared) images (sampler.train_sampler '
                  f'ModalityBalancedSampler). Other samplers fail the batch-layout check unless '
                  f'they produce that.')

    @classmethod
    def engine_options(cls, cfg) -> dict:
        from ...data.sampler import batch_layout
        batch_layout(cfg.train.batch_size, cfg.sampler.num_instances)  # 2·P·m, checked up front
        return dict(super().engine_options(cfg), criterion=IDKLLoss.from_config(cfg))

    def forward_backward(self, data) -> Dict[str, float]:
        imgs, pids, modalities = self.parse_train_batch(data)
        with self.autocast():
            outputs = self.model(imgs)
        # the losses see the global batch under torchrun (every rank's slice, in rank order)
        outputs = {k: self.gather(v) for k, v in outputs.items()}
        pids, modalities = self.gather(pids), self.gather(modalities)
        terms = self.criterion(outputs, pids, modalities)  # float32, outside autocast
        self.backward_and_step(terms['loss'])
        names = list(terms)
        # One device->host transfer for all logged values.
        values = torch.stack([terms[n].detach().float() for n in names]).tolist()
        return dict(zip(names, values))

    def extract_features(self, imgs: torch.Tensor, modality: int = 0) -> torch.Tensor:
        """``(B, D)`` BN'd shared features (float32), under autocast when ``amp`` is on."""
        with self.autocast():
            return self.eval_model(imgs).float()
