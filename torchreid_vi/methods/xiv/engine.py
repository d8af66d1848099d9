"""XIV engine: training with the X modality (Eq. 11) and the fused test distance (Eq. 2).

Training step (spec ``xiv.md`` §4–5). The loader yields the ModalityBalancedSampler's 2PK
images; the visible block (``data['modality'] == 0``) and the infrared block (``== 1``) are
found from the batch itself, never from positions. The network's training forward
``model(ir, visible=vis)`` makes the X block ``X = g(V)`` (labels of V) and runs the learner
once over ``[I, X, V]`` (M = PK; the loader's 96 images become 144, the paper's batch). Loss
``L = L_M + λ·L_C`` (:class:`~torchreid_vi.methods.xiv.loss.XIVLoss`); every term is returned
separately, so torchreid's loop logs them to the console and tensorboard.

Test (Eq. 2). Visible images contribute ``f(V)`` and, with fusion on, ``f(g(V))``; infrared
images ``f(I)``. The one IR×VIS matrix is ``d(I, V) = D(f(I), f(V)) + D(f(I), f(g(V)))``; the
evaluator transposes it for visible→infrared settings, where the visible query is the one
contributing ``f(V)`` and ``f(g(V))``.

Options: ``cfg.xiv`` (:mod:`torchreid_vi.methods.xiv.config`).
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from ...data.base import INFRARED, VISIBLE
from ...engine.base import CrossModalEngine
from ...utils.distributed import unwrap_model
from .loss import XIVLoss
from .model import XIVNet

__all__ = ['XIVEngine']


class XIVEngine(CrossModalEngine):
    """Cross-modal engine of XIV (see the module docstring).

    Args:
        datamanager, model, optimizer, scheduler, use_gpu, **engine_options: as
            :class:`~torchreid_vi.engine.base.CrossModalEngine`; ``model`` must be an
            :class:`~torchreid_vi.methods.xiv.model.XIVNet` (``xiv_*`` models, whose generator
            kind, test feature and normalisation come from the model factory).
        criterion: the :class:`XIVLoss` (default: the default config's ``cfg.xiv``).
        use_x: train with the X block (``xiv.use_x``; off by itself when the generator is
            ``'none'``).
        fusion: Eq. 2 at test time (``xiv.fusion``; needs X).

    Example (the config path, as the command line does it)::

        engine = XIVEngine.from_config(cfg, datamanager, model, optimizer, scheduler)
    """

    def __init__(self, datamanager, model, optimizer=None, scheduler=None, use_gpu=False, *,
                 criterion: Optional[XIVLoss] = None, use_x: Optional[bool] = None,
                 fusion: Optional[bool] = None, **engine_options):
        super().__init__(datamanager, model, optimizer, scheduler, use_gpu, **engine_options)
        net = unwrap_model(model)
        if not isinstance(net, XIVNet):
            raise TypeError(f'engine "xiv" needs an XIV network (model.name xiv_resnet50, '
                            f'xiv_densenet121, xiv_resnet18, ...), got {type(net).__name__}')
        if criterion is None or use_x is None or fusion is None:
            from ...config import get_default_config
            defaults = get_default_config()
            criterion = criterion or XIVLoss.from_config(defaults)
            use_x = defaults.xiv.use_x if use_x is None else use_x
            fusion = defaults.xiv.fusion if fusion is None else fusion
        self.net = net
        self.criterion = criterion
        self.use_x = bool(use_x) and net.generator.kind != 'none'
        self.fusion = bool(fusion) and self.use_x
        if fusion and not self.use_x:
            print('XIV: no X modality (xiv.use_x False or xiv.generator none): test-time '
                  'fusion is off')
        c = criterion
        print(f'XIV: generator={net.generator.kind}, X={"on" if self.use_x else "off"}, '
              f'CMG={"on (lambda=%g)" % c.lambda_cmg if c.use_cmg else "off"}, '
              f'fusion={"on" if self.fusion else "off"}, test feature={net.test_feature}')

    @classmethod
    def engine_options(cls, cfg) -> dict:
        return dict(super().engine_options(cfg), criterion=XIVLoss.from_config(cfg),
                    use_x=cfg.xiv.use_x, fusion=cfg.xiv.fusion)

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
            labels = torch.cat([ir_pids, vis_pids, vis_pids])
            blocks = {'I': slice(0, n_ir), 'X': slice(n_ir, n_ir + n_vis),
                      'V': slice(n_ir + n_vis, n_ir + 2 * n_vis)}
        else:
            labels = torch.cat([ir_pids, vis_pids])
            blocks = {'I': slice(0, n_ir), 'V': slice(n_ir, n_ir + n_vis)}
        # One forward of [I, X, V]: X = g(V) is made inside, so L_X and L_C train g through f.
        with self.autocast():
            logits, feats = self.model(ir, visible=vis, use_x=self.use_x)
        logits, feats = logits.float(), feats.float()
        gathered = self.gather(labels)
        if gathered is not labels:
            # the global batch is every rank's [I, X, V] in rank order: each block's rows are
            # that block's local rows, offset per rank (identities keep the sampler's order)
            n, world = len(labels), len(gathered) // len(labels)
            offsets = torch.arange(world, device=labels.device).view(-1, 1) * n
            blocks = {k: (offsets + torch.arange(s.start, s.stop, device=labels.device)).view(-1)
                      for k, s in blocks.items()}
            logits, feats, labels = self.gather(logits), self.gather(feats), gathered
        terms = self.criterion(logits, feats, labels, blocks)
        self.backward_and_step(terms['loss'])
        names = list(terms)
        values = torch.stack([terms[k].detach().float() for k in names]).tolist()  # one sync
        return dict(zip(names, values))

    # ------------------------------------------------------------------ test
    def extract_features(self, imgs: torch.Tensor, modality: int = VISIBLE
                         ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """``f(I)`` for infrared; ``{'feat': f(V), 'feat_x': f(g(V))}`` for visible with fusion."""
        with self.autocast():
            feat = self.eval_model(imgs).float()
            if modality == VISIBLE and self.fusion:
                return {'feat': feat, 'feat_x': self.eval_model(imgs, x_view=True).float()}
        return {'feat': feat}

    def pairwise_distance(self, ir: Dict[str, torch.Tensor], vis: Dict[str, torch.Tensor]
                          ) -> torch.Tensor:
        """Eq. 2: ``D(f(I), f(V)) + D(f(I), f(g(V)))`` (fusion on) or ``D(f(I), f(V))``."""
        dist = self.feature_distance(ir['feat'], vis['feat'])
        if self.fusion:
            dist = dist + self.feature_distance(ir['feat'], vis['feat_x'])
        return dist
