"""Cross-modal engines: torchreid's training loop with the standard VI-ReID evaluation.

:class:`CrossModalEngine` subclasses torchreid's ``Engine`` and keeps its ``train()`` loop
(console + tensorboard logging of every loss term a ``forward_backward`` returns). It replaces:

* ``run()``: the same epoch loop, plus atomic checkpoints with RNG state (exact resume), the
  sampler's epoch (``set_epoch``), evaluation-only runs, and rank visualisation of the final
  evaluation (torchreid allows it only in evaluation-only runs);
* ``test()``: for a cross-modal target, features of every test image are extracted **once** (IR
  side and VIS side), one IR×VIS distance matrix is computed, and every protocol setting × trial
  of the dataset (``dataset.evaluation_settings()``) selects rows/columns from it. A printed table,
  tensorboard scalars ``Test/<setting>/{rank1,mAP,mINP}`` and ``results.json`` follow. Other
  targets fall back to torchreid's own evaluation.

Subclasses (XIV, IDKL) implement ``forward_backward`` and may override the feature hooks
``extract_features(imgs, modality) -> Tensor | dict`` and ``pairwise_distance(ir, vis)``.
torchreid's stock softmax / triplet engines get the same evaluation through
:class:`CrossModalSoftmaxEngine` / :class:`CrossModalTripletEngine`.
"""
from __future__ import annotations

import os
import os.path as osp
import time
from typing import Dict, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from .._torchreid import tr
from ..checkpoint import rng_state, save_checkpoint, set_rng_state, training_state
from ..data.base import INFRARED, VISIBLE, CrossModalDataset

__all__ = ['CrossModalEngine', 'CrossModalSoftmaxEngine', 'CrossModalTripletEngine',
           'feature_distance']

FeatureDict = Dict[str, torch.Tensor]


def feature_distance(a: torch.Tensor, b: torch.Tensor, metric: str = 'euclidean',
                     normalize: bool = False) -> torch.Tensor:
    """Distance matrix between feature rows (lower = closer), float32.

    Args:
        a: ``(n, d)``; b: ``(m, d)``.
        metric: ``'euclidean'`` (the true Euclidean distance, so that sums of distances such as
            XIV's fused distance mean what the papers write; rankings equal torchreid's squared
            distance) or ``'cosine'`` (``1 - cos``).
        normalize: L2-normalise rows first.

    Returns: ``(n, m)`` tensor on ``a``'s device.
    """
    a, b = a.float(), b.float()
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    if metric == 'euclidean':
        sq = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None] - 2.0 * (a @ b.t())
        return sq.clamp_(min=0).sqrt_()
    if metric == 'cosine':
        return 1.0 - F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()
    raise ValueError(f'test.dist_metric must be "euclidean" or "cosine", got "{metric}"')


class CrossModalEngine(tr.engine.Engine):
    """Base engine for cross-modal methods.

    Args:
        datamanager: a torchreid ``ImageDataManager`` (``CrossModalImageDataManager`` for plugin
            dataset options) whose targets may be cross-modal datasets.
        model: the network; in eval mode it must return ``(B, D)`` features.
        optimizer, scheduler: as in torchreid (scheduler may be ``None``).
        use_gpu: use CUDA when available.
        cfg: the run's config (``torchreid_vi.config.get_default_config()`` when omitted); read
            for evaluation (``test.*``, ``vi.eval.*``) and checkpoints (``vi.train.*``).

    A training batch ``data`` carries ``img``, ``pid`` and ``modality`` (0 visible, 1 infrared);
    :meth:`parse_train_batch` moves them to ``self.device``.
    """

    def __init__(self, datamanager, model, optimizer=None, scheduler=None, use_gpu=False,
                 cfg=None):
        super().__init__(datamanager, use_gpu)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.register_model('model', model, optimizer, scheduler)
        self.setup_cross_modal(cfg)

    # ------------------------------------------------------------------ setup
    def setup_cross_modal(self, cfg=None) -> None:
        """Attach the config-driven evaluation state (also used by the stock-engine mixins)."""
        if cfg is None:
            from ..config import get_default_config
            cfg = get_default_config()
        self.cfg = cfg
        self.device = torch.device('cuda' if self.use_gpu else 'cpu')
        self.results = None  # a ResultsFile, attached by the command line
        self.max_epoch = cfg.train.max_epoch
        self.last_results: Dict[str, dict] = {}

    # ------------------------------------------------------------------ training
    def parse_train_batch(self, data):
        """``(imgs, pids, modalities)`` on ``self.device``; modality from ``data['modality']``."""
        if 'modality' not in data:
            raise KeyError(
                'the training batch has no "modality": cross-modal engines need a cross-modal '
                'train set (a torchreid_vi CrossModalDataset); multi-source training that mixes '
                'in a single-modality dataset loses it')
        dev = self.device
        return (data['img'].to(dev, non_blocking=True), data['pid'].to(dev, non_blocking=True),
                data['modality'].to(dev, non_blocking=True))

    def run(self, save_dir='log', max_epoch=0, start_epoch=0, print_freq=10, fixbase_epoch=0,
            open_layers=None, start_eval=0, eval_freq=-1, test_only=False, **unused):
        """torchreid's loop with exact-resume checkpoints and final-evaluation visrank.

        ``start_epoch`` is the number of finished epochs (a resumed checkpoint's ``epoch``).
        Evaluation options come from ``self.cfg``, not from arguments, so they also apply to
        periodic evaluations (torchreid forwards ``rerank``/``visrank`` only when testing only).
        """
        self.save_dir = save_dir
        if test_only:
            self.epoch = start_epoch - 1  # evaluations are labelled with finished epochs
            self.test(final=True)
            return
        from torch.utils.tensorboard import SummaryWriter
        if self.writer is None:
            self.writer = SummaryWriter(log_dir=save_dir)
        self.start_epoch, self.max_epoch = start_epoch, max_epoch
        ckpt_freq = self.cfg.vi.train.checkpoint_freq
        time_start = time.time()
        print('=> Start training')
        for self.epoch in range(start_epoch, max_epoch):
            sampler = getattr(self.train_loader, 'sampler', None)
            if hasattr(sampler, 'set_epoch'):
                sampler.set_epoch(self.epoch)
            self.train(print_freq=print_freq, fixbase_epoch=fixbase_epoch,
                       open_layers=open_layers)
            done = self.epoch + 1
            final = done == max_epoch
            rank1 = None
            if final or (eval_freq > 0 and done >= start_eval and done % eval_freq == 0):
                if final:
                    print('=> Final test')
                # Evaluation must not move the training trajectory: its data loaders draw from
                # the global RNGs, so they are restored afterwards (a run that evaluates every
                # epoch trains exactly like one that does not, and resumes stay exact).
                state = rng_state()
                rank1 = self.test(final=final)
                set_rng_state(state)
            if final or rank1 is not None or (ckpt_freq > 0 and done % ckpt_freq == 0):
                self.save_model(self.epoch, rank1, save_dir)
        print(f'Elapsed {time.strftime("%H:%M:%S", time.gmtime(time.time() - time_start))}')
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def save_model(self, epoch, rank1, save_dir, is_best=False):
        """Atomic checkpoint ``<save_dir>/model/model.pth.tar-<epoch+1>`` with RNG state."""
        for name in self.get_model_names():
            state = training_state(self._models[name], self._optims[name], self._scheds[name],
                                   epoch=epoch + 1, rank1=rank1,
                                   extra={'config': self.cfg.dump()})
            path = osp.join(save_dir, name, f'model.pth.tar-{epoch + 1}')
            save_checkpoint(state, path)
            print(f'Checkpoint saved to "{path}"')

    # ------------------------------------------------------------------ features
    def extract_features(self, imgs: torch.Tensor, modality: int = VISIBLE
                         ) -> Union[torch.Tensor, FeatureDict]:
        """Eval-mode features of a batch of one modality: ``(B, D)`` or a dict of them."""
        return self.model(imgs)

    def _features(self, imgs, modality) -> FeatureDict:
        out = self.extract_features(imgs, modality)
        return out if isinstance(out, dict) else {'feat': out}

    @torch.no_grad()
    def extract_loader(self, loader, modality: int) -> FeatureDict:
        """Features of every image of ``loader`` (in loader order), on ``self.device``."""
        flip = self.cfg.vi.eval.flip
        chunks: Dict[str, list] = {}
        for data in loader:
            imgs = data['img'].to(self.device, non_blocking=True)
            feats = self._features(imgs, modality)
            if flip:  # average with the mirrored image (DEEN/CAJ test-time fusion)
                flipped = self._features(torch.flip(imgs, dims=[3]), modality)
                feats = {k: (v + flipped[k]) / 2 for k, v in feats.items()}
            for k, v in feats.items():
                chunks.setdefault(k, []).append(v.float())
        return {k: torch.cat(v) for k, v in chunks.items()}

    def feature_distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return feature_distance(a, b, self.cfg.test.dist_metric, self.cfg.test.normalize_feature)

    def pairwise_distance(self, ir: FeatureDict, vis: FeatureDict) -> torch.Tensor:
        """``(n_ir, n_vis)`` distances of infrared rows to visible columns (lower = closer)."""
        return self.feature_distance(ir['feat'], vis['feat'])

    # ------------------------------------------------------------------ evaluation
    def test(self, final: bool = False, **unused):
        """Evaluate every target; returns the headline rank-1 (fraction) of the last target."""
        self.set_model_mode('eval')
        rank1 = 0.0
        for name in self.test_loader:
            qloader = self.test_loader[name]['query']
            dataset = qloader.dataset
            if isinstance(dataset, CrossModalDataset):
                rank1 = self.evaluate_cross_modal_target(name, final=final)
            else:
                rank1 = self._evaluate_torchreid_target(name, final=final)
        return rank1

    def _evaluate_torchreid_target(self, name, final):
        # torchreid's own rule for single-modality targets (e.g. market1501).
        print(f'##### Evaluating {name} (torchreid protocol) #####')
        visrank = bool(self.cfg.test.visrank and final)
        rank1, mAP = tr.engine.Engine._evaluate(
            self, dataset_name=name, query_loader=self.test_loader[name]['query'],
            gallery_loader=self.test_loader[name]['gallery'],
            dist_metric=self.cfg.test.dist_metric,
            normalize_feature=self.cfg.test.normalize_feature, visrank=visrank,
            visrank_topk=self.cfg.test.visrank_topk, save_dir=getattr(self, 'save_dir', ''),
            use_metric_cuhk03=self.cfg.cuhk03.use_metric_cuhk03, ranks=self.cfg.test.ranks,
            rerank=self.cfg.test.rerank)
        if self.writer is not None:
            self.writer.add_scalar(f'Test/{name}/rank1', rank1, self.epoch)
            self.writer.add_scalar(f'Test/{name}/mAP', mAP, self.epoch)
        if self.results is not None:
            self.results.add_evaluation(self.epoch, name, {f'{name}/torchreid': {
                'mean': {'rank1': float(rank1), 'mAP': float(mAP)}}}, protocol='torchreid')
        return float(rank1)

    def _distance_function(self, ir: FeatureDict, vis: FeatureDict):
        """Per-trial re-ranked distances, or ``None`` for the plain shared distance matrix.

        Re-ranking needs each trial's own gallery (its neighbourhoods depend on it), so it is
        recomputed per trial from the main features (``'feat'``; fused distances such as XIV's
        are not re-ranked). ``test.normalize_feature`` applies; the base distance is torchreid's
        (squared Euclidean or cosine), as in torchreid's and IDKL's re-ranking.
        """
        method = self.cfg.vi.eval.rerank
        if method in ('none', '') and self.cfg.test.rerank:
            method = 'k_reciprocal'  # torchreid's switch
        if method in ('none', ''):
            return None
        if method not in ('k_reciprocal', 'query_only'):
            raise ValueError(f'vi.eval.rerank must be none, k_reciprocal or query_only, '
                             f'got "{method}"')
        from ..metrics.rerank import k_reciprocal_distances, query_only_rerank
        ev = self.cfg.vi.eval
        feats = {'ir2vis': (ir['feat'], vis['feat']), 'vis2ir': (vis['feat'], ir['feat'])}
        if self.cfg.test.normalize_feature:
            feats = {k: (F.normalize(a, dim=1), F.normalize(b, dim=1)) for k, (a, b) in
                     feats.items()}

        def dist_fn(query_idx, gallery_idx, direction):
            qf, gf = feats[direction]
            qf = qf[torch.as_tensor(query_idx, device=qf.device)].cpu()
            gf = gf[torch.as_tensor(gallery_idx, device=gf.device)].cpu()
            if method == 'k_reciprocal':
                return k_reciprocal_distances(qf, gf, ev.rerank_k1, ev.rerank_k2,
                                              ev.rerank_lambda, self.cfg.test.dist_metric)
            return query_only_rerank(qf, gf, ev.rerank_k1, ev.rerank_k2, ev.rerank_lambda)
        print(f'Re-ranking: {method} (k1={ev.rerank_k1}, k2={ev.rerank_k2}, '
              f'lambda={ev.rerank_lambda}), recomputed per trial')
        return dist_fn

    @torch.no_grad()
    def evaluate_cross_modal_target(self, name: str, final: bool = False) -> float:
        """One feature pass, one distance matrix, every setting × trial of the dataset."""
        from ..metrics.report import evaluate_settings, format_table
        qloader, gloader = self.test_loader[name]['query'], self.test_loader[name]['gallery']
        dataset = qloader.dataset
        settings = dataset.evaluation_settings()
        print(f'##### Evaluating {name}: {len(settings)} settings, '
              f'{len(qloader.dataset)} IR + {len(gloader.dataset)} VIS test images #####')
        t0 = time.time()
        ir = self.extract_loader(qloader, INFRARED)
        vis = self.extract_loader(gloader, VISIBLE)
        t1 = time.time()
        dist = self.pairwise_distance(ir, vis)
        dist_fn = self._distance_function(ir, vis)
        dist_np = dist.cpu().numpy()  # float32: ties are resolved exactly by the evaluator
        results = evaluate_settings(dist_np if dist_fn is None else dist_fn, dataset.query,
                                    gloader.dataset.gallery, settings,
                                    max_rank=self.cfg.vi.eval.max_rank)
        t2 = time.time()
        print(format_table(results, title=f'{name} (epoch {self.epoch + 1})'))
        print(f'features {t1 - t0:.1f}s, metrics {t2 - t1:.1f}s')
        if self.writer is not None:
            for key, res in results.items():
                for metric in ('rank1', 'mAP', 'mINP'):
                    self.writer.add_scalar(f'Test/{key}/{metric}', res.mean[metric], self.epoch)
        if self.results is not None:
            self.results.add_evaluation(self.epoch + 1, name, results, final=bool(final))
        self.last_results[name] = results
        if final and self.cfg.test.visrank:
            self.visualize_ranks(name, dataset, gloader.dataset, dist_np, settings)
        headline = next(iter(results.values()))
        if self.writer is not None:
            self.writer.add_scalar(f'Test/{name}/rank1', headline.mean['rank1'], self.epoch)
            self.writer.add_scalar(f'Test/{name}/mAP', headline.mean['mAP'], self.epoch)
        return float(headline.mean['rank1'])

    def visualize_ranks(self, name, qset, gset, dist_ir_vis, settings) -> None:
        """Ranked-result images of trial 0 of every setting (see ``torchreid_vi.visrank``)."""
        from ..visrank import visualize_setting
        root = osp.join(getattr(self, 'save_dir', 'log'), 'visrank', name)
        for setting in settings:
            folder = osp.join(root, setting.key.replace('/', '_'))
            n = visualize_setting(dist_ir_vis, qset.query, gset.gallery, setting, folder,
                                  topk=self.cfg.test.visrank_topk,
                                  max_queries=self.cfg.vi.eval.visrank_max_queries,
                                  height=self.datamanager.height, width=self.datamanager.width)
            print(f'Ranked results of {setting.key} (trial 0, {n} queries) -> {folder}')


class CrossModalSoftmaxEngine(CrossModalEngine, tr.engine.ImageSoftmaxEngine):
    """torchreid's ``ImageSoftmaxEngine`` training with the cross-modal evaluation and resume."""

    def __init__(self, datamanager, model, optimizer, scheduler=None, use_gpu=False, cfg=None,
                 label_smooth=True):
        tr.engine.ImageSoftmaxEngine.__init__(self, datamanager, model, optimizer,
                                              scheduler=scheduler, use_gpu=use_gpu,
                                              label_smooth=label_smooth)
        self.setup_cross_modal(cfg)


class CrossModalTripletEngine(CrossModalEngine, tr.engine.ImageTripletEngine):
    """torchreid's ``ImageTripletEngine`` training with the cross-modal evaluation and resume."""

    def __init__(self, datamanager, model, optimizer, scheduler=None, use_gpu=False, cfg=None,
                 margin=0.3, weight_t=1.0, weight_x=1.0, label_smooth=True):
        tr.engine.ImageTripletEngine.__init__(self, datamanager, model, optimizer, margin=margin,
                                              weight_t=weight_t, weight_x=weight_x,
                                              scheduler=scheduler, use_gpu=use_gpu,
                                              label_smooth=label_smooth)
        self.setup_cross_modal(cfg)


def build_softmax_engine(cfg, datamanager, model, optimizer, scheduler, use_gpu):
    return CrossModalSoftmaxEngine(datamanager, model, optimizer, scheduler, use_gpu, cfg,
                                   label_smooth=cfg.loss.softmax.label_smooth)


def build_triplet_engine(cfg, datamanager, model, optimizer, scheduler, use_gpu):
    t = cfg.loss.triplet
    return CrossModalTripletEngine(datamanager, model, optimizer, scheduler, use_gpu, cfg,
                                   margin=t.margin, weight_t=t.weight_t, weight_x=t.weight_x,
                                   label_smooth=cfg.loss.softmax.label_smooth)
