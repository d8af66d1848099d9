"""XIV engine: training with the X modality (Eq. 11) and the fused test distance (Eq. 2).

Training step (spec ``xiv.md`` §4–5). The loader yields the ModalityBalancedSampler's 2PK
images; the visible block (``data['modality'] == 0``) and the infrared block (``== 1``) are
found from the batch itself, never from positions. The X block is made *in the forward pass* from
the visible block, ``X = g(V)`` with the labels of V, and the learner sees one batch of 3M images
``[I, X, V]`` (M = PK; the loader's 96 images become 144, the paper's batch). Loss
``L = L_M + λ·L_C`` (:class:`torchreid_vi.losses.xiv.XIVLoss`); every term is returned
separately, so torchreid's loop logs them to the console and tensorboard.

Test (Eq. 2). Visible images contribute ``f(V)`` and, with fusion on, ``f(g(V))``; infrared
images ``f(I)``. The one IR×VIS matrix is ``d(I, V) = D(f(I), f(V)) + D(f(I), f(g(V)))``; the
base engine transposes it for visible→infrared settings, where the visible query is the one
contributing ``f(V)`` and ``f(g(V))``.

Options (``cfg.xiv``, see :func:`add_xiv_config`). Ablations of the paper's Tables 4 and 5:

=========================  =================================================================
``baseline``               ``xiv.use_x False xiv.use_cmg False`` (= L_V + L_I, fusion off)
``baseline+X``             ``xiv.use_cmg False``
``baseline+X+CMG``         the defaults (full Eq. 11)
``baseline+<fixed>``       ``xiv.generator mean|gray|hsv_v|ycbcr_y xiv.use_cmg False``
=========================  =================================================================

``xiv.generator none`` is the same as ``xiv.use_x False``: no X images, no ``L_X``, no I↔X term,
no fusion.
"""
from __future__ import annotations

from typing import Dict, Union

import torch
from torch import nn
from yacs.config import CfgNode as CN

from ..data.base import INFRARED, VISIBLE
from ..losses.xiv import XIVLoss
from ..models.xiv import GENERATOR_KINDS, TEST_FEATURES, XIVNet, register_models
from .cross_modal import CrossModalEngine

__all__ = ['XIVEngine', 'build_xiv_engine', 'add_xiv_config', 'register', 'unwrap_model']


def add_xiv_config(cfg: CN) -> None:
    """Add ``cfg.xiv`` (the paper's values as defaults)."""
    cfg.xiv = CN()
    cfg.xiv.generator = 'learned'  # 'learned' | 'mean' | 'gray' | 'hsv_v' | 'ycbcr_y' | 'none'
    cfg.xiv.use_x = True  # train with the X block (False = no X at all, like generator 'none')
    cfg.xiv.use_cmg = True  # cross-modality gap L_C (I<->X, I<->V hard-mined triplets)
    cfg.xiv.lambda_cmg = 0.1  # λ of Eq. 11
    cfg.xiv.margin_cross = 0.5  # α1: margin of the cross-modality triplets
    cfg.xiv.margin_intra = 0.3  # α2: margin of the per-modality triplets
    cfg.xiv.label_smoothing = 0.0  # ε of the ID loss (paper: plain cross entropy)
    cfg.xiv.fusion = True  # test: d(I,V) = D(I,V) + D(I,g(V)) (needs X)
    cfg.xiv.test_feature = 'bn'  # 'bn' (BNNeck output) | 'pre_bn' (pooled t)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


class XIVEngine(CrossModalEngine):
    """Cross-modal engine of XIV (see the module docstring).

    Args:
        datamanager, model, optimizer, scheduler, use_gpu, cfg: as :class:`CrossModalEngine`;
            ``model`` must be an :class:`~torchreid_vi.models.xiv.XIVNet` (``xiv_*`` models).
        generator, use_x, use_cmg, lambda_cmg, margin_cross, margin_intra, label_smoothing,
            fusion, test_feature: the ``cfg.xiv`` options (:func:`add_xiv_config`).

    The engine sets the network's generator kind, test feature and normalisation (from
    ``cfg.data.norm_mean/norm_std``): the config, not the checkpoint, decides them.
    """

    def __init__(self, datamanager, model, optimizer=None, scheduler=None, use_gpu=False,
                 cfg=None, generator='learned', use_x=True, use_cmg=True, lambda_cmg=0.1,
                 margin_cross=0.5, margin_intra=0.3, label_smoothing=0.0, fusion=True,
                 test_feature='bn'):
        super().__init__(datamanager, model, optimizer, scheduler, use_gpu, cfg)
        net = unwrap_model(model)
        if not isinstance(net, XIVNet):
            raise TypeError(f'engine "xiv" needs an XIV network (model.name xiv_resnet50, '
                            f'xiv_densenet121, xiv_resnet18, ...), got {type(net).__name__}')
        if generator not in GENERATOR_KINDS:
            raise ValueError(f'xiv.generator must be one of {GENERATOR_KINDS}, got {generator!r}')
        if test_feature not in TEST_FEATURES:
            raise ValueError(f'xiv.test_feature must be one of {TEST_FEATURES}, got '
                             f'{test_feature!r}')
        net.generator.kind = generator
        net.generator.set_normalization(self.cfg.data.norm_mean, self.cfg.data.norm_std)
        net.test_feature = test_feature
        net.loss = 'triplet'  # train mode must return (logits, t)
        self.net = net
        self.use_x = bool(use_x) and generator != 'none'
        self.fusion = bool(fusion) and self.use_x
        if fusion and not self.use_x:
            print('XIV: no X modality (xiv.use_x False or xiv.generator none): test-time '
                  'fusion is off')
        self.criterion = XIVLoss(margin_intra=margin_intra, margin_cross=margin_cross,
                                 lambda_cmg=lambda_cmg, use_cmg=use_cmg,
                                 label_smoothing=label_smoothing)
        print(f'XIV: generator={generator}, X={"on" if self.use_x else "off"}, '
              f'CMG={"on (lambda=%g)" % lambda_cmg if use_cmg else "off"}, '
              f'fusion={"on" if self.fusion else "off"}, test feature={test_feature}')

    # ------------------------------------------------------------------ training
    def split_batch(self, data):
        """Infrared and visible rows of a training batch, from ``data['modality']``.

        Returns ``(ir_imgs, ir_pids, vis_imgs, vis_pids)`` on ``self.device``.
        Raises ``ValueError`` when a modality is missing or a code is neither 0 nor 1.
        """
        imgs, pids, _ = self.parse_train_batch(data)
        modality = torch.as_tensor(data['modality']).cpu()  # index on the host: no device sync
        vis = torch.nonzero(modality == VISIBLE).flatten()
        ir = torch.nonzero(modality == INFRARED).flatten()
        if len(vis) == 0 or len(ir) == 0 or len(vis) + len(ir) != len(modality):
            raise ValueError(
                f'XIV needs every training batch to hold visible (modality {VISIBLE}) and '
                f'infrared (modality {INFRARED}) images and nothing else; got modality codes '
                f'{sorted(set(modality.tolist()))} ({len(vis)} visible, {len(ir)} infrared). Use '
                f'sampler.train_sampler ModalityBalancedSampler with a cross-modal dataset.')
        vis, ir = vis.to(imgs.device, non_blocking=True), ir.to(imgs.device, non_blocking=True)
        return imgs[ir], pids[ir], imgs[vis], pids[vis]

    def forward_backward(self, data) -> Dict[str, float]:
        ir, ir_pids, vis, vis_pids = self.split_batch(data)
        n_ir, n_vis = len(ir_pids), len(vis_pids)
        if self.use_x:
            # One forward of [I, X, V]: X = g(V) is made here, so L_X and L_C train g through f.
            batch = torch.cat([ir, self.net.make_x(vis), vis])
            labels = torch.cat([ir_pids, vis_pids, vis_pids])
            blocks = {'I': slice(0, n_ir), 'X': slice(n_ir, n_ir + n_vis),
                      'V': slice(n_ir + n_vis, n_ir + 2 * n_vis)}
        else:
            batch = torch.cat([ir, vis])
            labels = torch.cat([ir_pids, vis_pids])
            blocks = {'I': slice(0, n_ir), 'V': slice(n_ir, n_ir + n_vis)}
        logits, feats = self.model(batch)
        terms = self.criterion(logits, feats, labels, blocks)
        self.optimizer.zero_grad()
        terms['loss'].backward()
        self.optimizer.step()
        names = list(terms)
        values = torch.stack([terms[k].detach().float() for k in names]).tolist()  # one sync
        return dict(zip(names, values))

    # ------------------------------------------------------------------ test
    def extract_features(self, imgs: torch.Tensor, modality: int = VISIBLE
                         ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """``f(I)`` for infrared; ``{'feat': f(V), 'feat_x': f(g(V))}`` for visible with fusion."""
        feat = self.model(imgs)
        if modality == VISIBLE and self.fusion:
            return {'feat': feat, 'feat_x': self.model(imgs, x_view=True)}
        return {'feat': feat}

    def pairwise_distance(self, ir: Dict[str, torch.Tensor], vis: Dict[str, torch.Tensor]
                          ) -> torch.Tensor:
        """Eq. 2: ``D(f(I), f(V)) + D(f(I), f(g(V)))`` (fusion on) or ``D(f(I), f(V))``."""
        dist = self.feature_distance(ir['feat'], vis['feat'])
        if self.fusion:
            dist = dist + self.feature_distance(ir['feat'], vis['feat_x'])
        return dist


def build_xiv_engine(cfg, datamanager, model, optimizer, scheduler, use_gpu) -> XIVEngine:
    """Engine builder registered as ``'xiv'`` (reads ``cfg.xiv``)."""
    x = cfg.xiv
    return XIVEngine(datamanager, model, optimizer, scheduler, use_gpu, cfg,
                     generator=x.generator, use_x=x.use_x, use_cmg=x.use_cmg,
                     lambda_cmg=x.lambda_cmg, margin_cross=x.margin_cross,
                     margin_intra=x.margin_intra, label_smoothing=x.label_smoothing,
                     fusion=x.fusion, test_feature=x.test_feature)


def register() -> None:
    """Register the ``xiv_*`` models and the ``xiv`` engine (idempotent)."""
    from ..registry import register_engine
    register_models()
    register_engine('xiv', build_xiv_engine, config=add_xiv_config)
