"""The IDKL engine: one training step of spec ``idkl.md`` §3 on a :class:`CrossModalEngine`.

Choose it with ``engine.name idkl`` and ``model.name idkl_resnet50`` (or ``idkl_resnet18`` for a
CPU demo). Loss weights and the paper-vs-code switches live in ``cfg.idkl`` (see
:func:`add_idkl_config`); ``configs/idkl/*.yaml`` hold the released code's per-dataset values.

Batch: ``train.batch_size = 2·P·m`` with ``sampler.num_instances = m`` images per identity **per
modality** and ``sampler.train_sampler ModalityBalancedSampler`` (the official 12 identities ×
10 images = 12 × (5 visible + 5 infrared) is ``train.batch_size 120``, ``sampler.num_instances 5``).
The loss rebuilds its visible/infrared pairing from ``data['pid']`` and ``data['modality']`` (spec
§5), so it does not depend on how the sampler orders the batch.

Mixed precision (``idkl.amp``): ``'fp16'`` (autocast + dynamic GradScaler, what the released apex
O1 run did), ``'bf16'`` (autocast, no scaler) or ``'none'``. All loss maths runs in float32. On a
machine without CUDA, ``amp`` is ignored with a one-line notice.

``register()`` puts the models (``idkl_resnet50``, ``idkl_resnet18``) and the engine (``idkl``,
config node ``idkl``) in the registries; it is idempotent.
"""
from __future__ import annotations

import contextlib
from typing import Dict

import torch
from yacs.config import CfgNode as CN

from ..losses.idkl import IDKLLoss
from ..models.idkl import IDKLNet, register_models
from ..registry import register_engine
from .cross_modal import CrossModalEngine

__all__ = ['IDKLEngine', 'add_idkl_config', 'build_idkl_engine', 'build_idkl_loss', 'register',
           'AMP_MODES']

AMP_MODES = ('none', 'fp16', 'bf16')


def add_idkl_config(cfg: CN) -> None:
    """Add ``cfg.idkl``; defaults are the released code's SYSU-MM01 values (spec §3.7)."""
    cfg.idkl = CN()
    cfg.idkl.amp = 'none'  # 'none' | 'fp16' (autocast + GradScaler, released run) | 'bf16'; CUDA only
    cfg.idkl.check_batch_layout = True  # validate P ids x (m vis + m ir) every step (one host sync)

    cfg.idkl.triplet = CN()
    cfg.idkl.triplet.margin = 1.3  # batch-hard triplet on pre-BN f_sh and f_sp, whole mixed batch

    cfg.idkl.ip = CN()  # information purifier
    cfg.idkl.ip.weight = 0.1  # lambda1, weight of L_e + L_r
    cfg.idkl.ip.mask_mode = 'pixel'  # 'pixel' (code: per-position masks) | 'se' (paper: channel masks)
    cfg.idkl.ip.loss_form = 'code'  # 'code' (exp-hinge / ReLU hinge) | 'paper' (softplus)

    cfg.idkl.tgsa = CN()  # feature-level distillation + MDR feature part
    cfg.idkl.tgsa.enabled = True  # False on RegDB in the released configs
    cfg.idkl.tgsa.distill_weight = 0.6  # lambda2, weight of T_dist = J(A_sh, A_sp) per modality
    cfg.idkl.tgsa.mdr_weights = [1.0, 1.0, 1.0]  # w1..w3 of J(A_V,A_I), J(A_V,A_X), J(A_X,A_I)
    cfg.idkl.tgsa.cross_mode = 'mixed_set'  # A_X: 'mixed_set' (code) | 'cross_modal' (paper A(V;I))

    cfg.idkl.csa = CN()  # logit-level distillation
    cfg.idkl.csa.weight = 0.8  # lambda3 (RegDB: 0.3)
    cfg.idkl.csa.set_level = True  # add the set-level S terms (code; not in the paper)

    cfg.idkl.mdr = CN()
    cfg.idkl.mdr.logit_weight = 1.0  # weight of J and S between z_sh[V] and z_sh[I]

    cfg.idkl.discriminator = CN()
    cfg.idkl.discriminator.weight = 1.0  # CE of D(b_sp) with the true modality

    cfg.idkl.confuser = CN()
    cfg.idkl.confuser.weight = 1.0  # CE of the confuser Q on b_sh
    cfg.idkl.confuser.mode = 'pseudo'  # 'pseudo' (code: balanced pseudo labels) | 'grl' (paper)
    cfg.idkl.confuser.grl_alpha = 1.0  # gradient-reversal factor in 'grl' mode


def build_idkl_loss(cfg: CN) -> IDKLLoss:
    """:class:`IDKLLoss` from ``cfg.idkl`` and ``sampler.num_instances`` (m)."""
    c = cfg.idkl
    return IDKLLoss(
        num_instances=cfg.sampler.num_instances, margin=c.triplet.margin,
        ip_weight=c.ip.weight, ip_loss_form=c.ip.loss_form,
        tgsa_enabled=c.tgsa.enabled, tgsa_distill_weight=c.tgsa.distill_weight,
        tgsa_mdr_weights=tuple(c.tgsa.mdr_weights), tgsa_cross_mode=c.tgsa.cross_mode,
        csa_weight=c.csa.weight, csa_set_level=c.csa.set_level,
        mdr_logit_weight=c.mdr.logit_weight, discriminator_weight=c.discriminator.weight,
        confuser_weight=c.confuser.weight, confuser_mode=c.confuser.mode,
        check_batch_layout=c.check_batch_layout)


class IDKLEngine(CrossModalEngine):
    """Trains :class:`~torchreid_vi.models.idkl.IDKLNet` with :class:`IDKLLoss`.

    Args: as :class:`CrossModalEngine`, plus
        criterion: the :class:`IDKLLoss` (default: built from ``cfg``).
        amp: ``'none'`` | ``'fp16'`` | ``'bf16'`` (default ``cfg.idkl.amp``).

    ``forward_backward`` returns every term as a Python float (names of the released code's log:
    tri, ce, id_pl, unad, pse, F_p, IN_p, soft_dt, bg_kl, sm_kl, plus tri_sh, tri_sp, tgsa_dist,
    tgsa_mdr, the total ``loss`` and ``acc`` in percent); see :class:`IDKLLoss`.
    Evaluation uses the eval-mode output of the model, the BN'd shared feature.
    """

    def __init__(self, datamanager, model, optimizer=None, scheduler=None, use_gpu=False,
                 cfg=None, criterion: IDKLLoss = None, amp: str = None):
        super().__init__(datamanager, model, optimizer, scheduler, use_gpu, cfg)
        self.criterion = criterion if criterion is not None else build_idkl_loss(self.cfg)
        amp = self.cfg.idkl.amp if amp is None else amp
        if amp not in AMP_MODES:
            raise ValueError(f'idkl.amp must be one of {AMP_MODES}, got {amp!r}')
        if amp != 'none' and self.device.type != 'cuda':
            print(f'IDKL: idkl.amp {amp} needs CUDA; training in float32 on {self.device.type}')
            amp = 'none'
        self.amp = amp
        self.amp_dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(amp)
        self.scaler = torch.amp.GradScaler('cuda') if amp == 'fp16' else None

    def autocast(self):
        """The autocast context of the network's forward pass (a no-op without amp)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def forward_backward(self, data) -> Dict[str, float]:
        imgs, pids, modalities = self.parse_train_batch(data)
        with self.autocast():
            outputs = self.model(imgs)
        terms = self.criterion(outputs, pids, modalities)  # float32, outside autocast
        loss = terms['loss']
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        names = list(terms)
        # One device->host transfer for all logged values.
        values = torch.stack([terms[n].detach().float() for n in names]).tolist()
        return dict(zip(names, values))

    def extract_features(self, imgs: torch.Tensor, modality: int = 0) -> torch.Tensor:
        """``(B, D)`` BN'd shared features (float32), under autocast when ``amp`` is on."""
        with self.autocast():
            return self.model(imgs).float()


def build_idkl_engine(cfg, datamanager, model, optimizer, scheduler, use_gpu) -> IDKLEngine:
    """Engine builder registered as ``'idkl'``: checks the pairing of config and model, applies
    the model-side switches (``idkl.ip.mask_mode``, ``idkl.confuser.mode/grl_alpha``)."""
    net = getattr(model, 'module', model)  # DataParallel
    if not isinstance(net, IDKLNet):
        raise ValueError(f'engine.name idkl needs an IDKL model (model.name idkl_resnet50 or '
                         f'idkl_resnet18), got model.name {cfg.model.name} '
                         f'({type(net).__name__})')
    m, batch = cfg.sampler.num_instances, cfg.train.batch_size
    if m < 1 or batch % (2 * m):
        raise ValueError(
            f'IDKL: train.batch_size {batch} must be 2·P·m with m = sampler.num_instances {m} '
            f'(images per identity per modality); the released code uses 120 = 2·12·5 (SYSU-MM01, '
            f'LLCM) and 60 = 2·6·5 (RegDB)')
    if cfg.sampler.train_sampler != 'ModalityBalancedSampler':
        print(f'IDKL: sampler.train_sampler is {cfg.sampler.train_sampler}; IDKL needs batches '
              f'of P identities x (m visible + m infrared) images (ModalityBalancedSampler). '
              f'Other samplers fail the batch-layout check unless they produce that.')
    net.purifier.mask_mode = cfg.idkl.ip.mask_mode
    net.confuser_mode = cfg.idkl.confuser.mode
    net.grl_alpha = float(cfg.idkl.confuser.grl_alpha)
    return IDKLEngine(datamanager, model, optimizer, scheduler, use_gpu, cfg)


def register() -> None:
    """Register the IDKL models and the ``idkl`` engine with its config node (idempotent)."""
    register_models()
    register_engine('idkl', build_idkl_engine, config=add_idkl_config)
