"""The cross-modal engine: torchreid's training loop with the standard VI-ReID evaluation.

:class:`CrossModalEngine` subclasses torchreid's ``Engine`` and keeps its ``train()`` loop
(console + tensorboard logging of every loss term a ``forward_backward`` returns). It replaces:

* ``run()``: the same epoch loop and torchreid's arguments, plus atomic checkpoints with RNG
  state (exact resume), the sampler's epoch (``set_epoch``), evaluation-only runs, and rank
  visualisation of the final evaluation (torchreid allows it only in evaluation-only runs);
* ``test()``: a cross-modal target is evaluated by a
  :class:`~torchreid_vi.evaluation.evaluator.CrossModalEvaluator` (features of every test image
  once, one IR×VIS distance matrix, every protocol setting × trial); the table is printed and the
  results go to tensorboard (``Test/<setting>/{rank1,mAP,mINP}``) and to the results sink
  (``results.json``). Other targets fall back to torchreid's own evaluation.

The engine reads no config: evaluation options live in its evaluator, the rest are constructor
arguments; ``from_config(cfg, datamanager, model, optimizer, scheduler)`` maps a config onto them.
Subclasses (XIV, IDKL) implement ``forward_backward`` and may override the feature hooks
``extract_features(imgs, modality) -> Tensor | dict`` and ``pairwise_distance(ir, vis)``.
torchreid's stock softmax / triplet engines get the same evaluation in :mod:`.stock`.
"""
from __future__ import annotations

import contextlib
import os.path as osp
import time
from typing import Dict, Optional, Union

import torch

from .._torchreid import tr
from ..checkpoint import (resume_from_checkpoint, rng_state, save_checkpoint, set_rng_state,
                          training_state)
from ..data.base import VISIBLE, CrossModalDataset
from ..evaluation.evaluator import CrossModalEvaluator, FeatureDict

__all__ = ['CrossModalEngine', 'AMP_MODES']

AMP_MODES = ('none', 'fp16', 'bf16')
_AMP_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}


def _default_config():
    from ..config import get_default_config
    return get_default_config()


class CrossModalEngine(tr.engine.Engine):
    """Base engine for cross-modal methods.

    Args:
        datamanager: a torchreid ``ImageDataManager`` (``CrossModalImageDataManager`` for plugin
            dataset options) whose targets may be cross-modal datasets.
        model: the network; in eval mode it must return ``(B, D)`` features.
        optimizer, scheduler: as in torchreid (scheduler may be ``None``).
        use_gpu: use CUDA when available.
        evaluator: the :class:`CrossModalEvaluator` (default: the default config's options).
        checkpoint_freq: save a checkpoint every N epochs (``vi.train.checkpoint_freq``; 0: only
            the final one and those after evaluations). Default: the default config's value.
        results: where evaluations are recorded (a :class:`~torchreid_vi.results.ResultsFile`
            or anything with its ``add_evaluation``), or ``None``.
        amp: mixed precision of the forward passes (``train.amp``): ``'none'``, ``'fp16'``
            (autocast + dynamic GradScaler, CUDA only) or ``'bf16'`` (autocast, no scaler; CPU
            autocast on a CPU). Loss maths stays float32. Default: the default config's value.

    A training batch ``data`` carries ``img``, ``pid`` and ``modality`` (0 visible, 1 infrared);
    :meth:`parse_train_batch` moves them to ``self.device``.
    """

    def __init__(self, datamanager, model, optimizer=None, scheduler=None, use_gpu=False, *,
                 evaluator: Optional[CrossModalEvaluator] = None,
                 checkpoint_freq: Optional[int] = None, results=None, amp: Optional[str] = None):
        super().__init__(datamanager, use_gpu)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.register_model('model', model, optimizer, scheduler)
        self.setup_cross_modal(evaluator=evaluator, checkpoint_freq=checkpoint_freq,
                               results=results, amp=amp)

    @classmethod
    def engine_options(cls, cfg) -> dict:
        """The constructor's keyword arguments that come from the config (subclasses add theirs)."""
        return {'evaluator': CrossModalEvaluator.from_config(cfg),
                'checkpoint_freq': cfg.vi.train.checkpoint_freq, 'amp': cfg.train.amp}

    @classmethod
    def from_config(cls, cfg, datamanager, model, optimizer=None, scheduler=None, **overrides):
        """The engine of ``cfg`` (the builder registered in the engine registry)."""
        kwargs = cls.engine_options(cfg)
        kwargs.update(overrides)
        use_gpu = bool(cfg.get('use_gpu', torch.cuda.is_available()))
        engine = cls(datamanager, model, optimizer, scheduler, use_gpu=use_gpu, **kwargs)
        engine.config_dump = cfg.dump()
        return engine

    # ------------------------------------------------------------------ setup
    def setup_cross_modal(self, *, evaluator=None, checkpoint_freq=None, results=None,
                          amp=None) -> None:
        """Attach the evaluation, checkpoint and precision state (also used by the stock-engine
        mixins)."""
        if evaluator is None or checkpoint_freq is None or amp is None:
            defaults = _default_config()
            evaluator = evaluator or CrossModalEvaluator.from_config(defaults)
            checkpoint_freq = (defaults.vi.train.checkpoint_freq if checkpoint_freq is None
                               else checkpoint_freq)
            amp = defaults.train.amp if amp is None else amp
        if isinstance(checkpoint_freq, bool) or not isinstance(checkpoint_freq, int) \
                or checkpoint_freq < 0:
            raise ValueError(f'vi.train.checkpoint_freq={checkpoint_freq!r}; expected an int >= 0')
        self.evaluator = evaluator
        self.checkpoint_freq = checkpoint_freq
        self.results = results
        self.device = torch.device('cuda' if self.use_gpu else 'cpu')
        self.epoch = 0
        self.last_results: Dict[str, dict] = {}
        self.config_dump = None  # the run's config as yaml text, stored in checkpoints
        self._setup_amp(amp)

    def _setup_amp(self, amp: str) -> None:
        if amp not in AMP_MODES:
            raise ValueError(f'train.amp={amp!r}; expected one of {AMP_MODES}')
        if amp == 'fp16' and self.device.type != 'cuda':
            raise ValueError(f'train.amp fp16 needs a CUDA device (this run uses '
                             f'{self.device.type}); use train.amp bf16 (CPU autocast) or none')
        self.amp = amp
        self.amp_dtype = _AMP_DTYPES.get(amp)
        self.scaler = torch.amp.GradScaler('cuda') if amp == 'fp16' else None

    def autocast(self):
        """The autocast context of the network's forward pass (a no-op with ``amp='none'``)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """Zero the gradients, back-propagate ``loss`` and step the optimizer (through the
        GradScaler under fp16)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

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
            open_layers=None, start_eval=0, eval_freq=-1, test_only=False, dist_metric=None,
            normalize_feature=None, visrank=None, visrank_topk=None, use_metric_cuhk03=None,
            ranks=None, rerank=None):
        """torchreid's ``Engine.run`` with exact-resume checkpoints and final-evaluation visrank.

        ``start_epoch`` is the number of finished epochs (a resumed checkpoint's ``epoch``).
        torchreid's evaluation arguments (``dist_metric``, ``normalize_feature``, ``visrank``,
        ``visrank_topk``, ``use_metric_cuhk03``, ``ranks``, ``rerank``) override the evaluator's
        options for this run when given (``rerank=True`` is torchreid's k-reciprocal re-ranking);
        ``None`` keeps them. They apply to periodic evaluations too.
        """
        self._override_eval_options(dist_metric=dist_metric, normalize_feature=normalize_feature,
                                    visrank=visrank, visrank_topk=visrank_topk,
                                    use_metric_cuhk03=use_metric_cuhk03, ranks=ranks,
                                    rerank=rerank)
        self.save_dir = save_dir
        if test_only:
            self.epoch = start_epoch - 1  # evaluations are labelled with finished epochs
            self.test(final=True)
            return
        from torch.utils.tensorboard import SummaryWriter
        if self.writer is None:
            self.writer = SummaryWriter(log_dir=save_dir)
        self.start_epoch, self.max_epoch = start_epoch, max_epoch
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
            if final or rank1 is not None or (self.checkpoint_freq > 0
                                              and done % self.checkpoint_freq == 0):
                self.save_model(self.epoch, rank1, save_dir)
        print(f'Elapsed {time.strftime("%H:%M:%S", time.gmtime(time.time() - time_start))}')
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _override_eval_options(self, *, dist_metric, normalize_feature, visrank, visrank_topk,
                               use_metric_cuhk03, ranks, rerank) -> None:
        changes = {k: v for k, v in (('dist_metric', dist_metric),
                                     ('normalize_feature', normalize_feature),
                                     ('visrank', visrank), ('visrank_topk', visrank_topk),
                                     ('use_metric_cuhk03', use_metric_cuhk03)) if v is not None}
        if ranks is not None:
            changes['ranks'] = tuple(ranks)
        if rerank is not None:
            changes['rerank'] = rerank if isinstance(rerank, str) else (
                'k_reciprocal' if rerank else 'none')
        if changes:
            self.evaluator.options = self.evaluator.options.replace(**changes)

    def save_model(self, epoch, rank1, save_dir, is_best=False):
        """Atomic checkpoint ``<save_dir>/model/model.pth.tar-<epoch+1>`` with RNG state (and the
        GradScaler's under fp16)."""
        extra = {}
        if self.config_dump is not None:
            extra['config'] = self.config_dump
        if self.scaler is not None:
            extra['scaler'] = self.scaler.state_dict()
        for name in self.get_model_names():
            state = training_state(self._models[name], self._optims[name], self._scheds[name],
                                   epoch=epoch + 1, rank1=rank1, extra=extra)
            path = osp.join(save_dir, name, f'model.pth.tar-{epoch + 1}')
            save_checkpoint(state, path)
            print(f'Checkpoint saved to "{path}"')

    def resume(self, path: str) -> int:
        """Restore model, optimizer, scheduler, GradScaler and RNG states from checkpoint
        ``path``; returns its number of finished epochs (the ``start_epoch`` of ``run``)."""
        ckpt = resume_from_checkpoint(path, self.model, self.optimizer, self.scheduler)
        if self.scaler is not None and ckpt.get('scaler') is not None:
            self.scaler.load_state_dict(ckpt['scaler'])
        return int(ckpt['epoch'])

    # ------------------------------------------------------------------ features
    def extract_features(self, imgs: torch.Tensor, modality: int = VISIBLE
                         ) -> Union[torch.Tensor, FeatureDict]:
        """Eval-mode features of a batch of one modality: ``(B, D)`` or a dict of them."""
        return self.model(imgs)

    def _extract_on_device(self, imgs: torch.Tensor, modality: int):
        return self.extract_features(imgs.to(self.device, non_blocking=True), modality)

    def feature_distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The evaluator's configured distance (``test.dist_metric``, normalisation)."""
        return self.evaluator.feature_distance(a, b)

    def pairwise_distance(self, ir: FeatureDict, vis: FeatureDict) -> torch.Tensor:
        """``(n_ir, n_vis)`` distances of infrared rows to visible columns (lower = closer)."""
        return self.evaluator.default_distance(ir, vis)

    # ------------------------------------------------------------------ evaluation
    def test(self, final: bool = False):
        """Evaluate every target; returns the headline rank-1 (fraction) of the last target."""
        self.set_model_mode('eval')
        rank1 = 0.0
        for name in self.test_loader:
            if isinstance(self.test_loader[name]['query'].dataset, CrossModalDataset):
                rank1 = self.evaluate_cross_modal_target(name, final=final)
            else:
                rank1 = self._evaluate_torchreid_target(name, final=final)
        return rank1

    def _evaluate_torchreid_target(self, name, final):
        # torchreid's own rule for single-modality targets (e.g. market1501).
        print(f'##### Evaluating {name} (torchreid protocol) #####')
        o = self.evaluator.options
        rank1, mAP = tr.engine.Engine._evaluate(
            self, dataset_name=name, query_loader=self.test_loader[name]['query'],
            gallery_loader=self.test_loader[name]['gallery'], dist_metric=o.dist_metric,
            normalize_feature=o.normalize_feature, visrank=bool(o.visrank and final),
            visrank_topk=o.visrank_topk, save_dir=getattr(self, 'save_dir', ''),
            use_metric_cuhk03=o.use_metric_cuhk03, ranks=list(o.ranks),
            rerank=o.rerank != 'none')
        self._log_scalars(f'Test/{name}', {'rank1': rank1, 'mAP': mAP})
        if self.results is not None:
            self.results.add_evaluation(self.epoch, name, {f'{name}/torchreid': {
                'mean': {'rank1': float(rank1), 'mAP': float(mAP)}}}, protocol='torchreid')
        return float(rank1)

    @torch.no_grad()
    def evaluate_cross_modal_target(self, name: str, final: bool = False) -> float:
        """One feature pass, one distance matrix, every setting × trial of the dataset."""
        qloader, gloader = self.test_loader[name]['query'], self.test_loader[name]['gallery']
        results, dist = self.evaluator.evaluate(
            name, qloader, gloader, self._extract_on_device, self.pairwise_distance,
            title=f'{name} (epoch {self.epoch + 1})')
        for key, res in results.items():
            self._log_scalars(f'Test/{key}', {m: res.mean[m] for m in ('rank1', 'mAP', 'mINP')})
        if self.results is not None:
            self.results.add_evaluation(self.epoch + 1, name, results, final=bool(final))
        self.last_results[name] = results
        if final and self.evaluator.options.visrank:
            self.evaluator.visualize(name, qloader.dataset, gloader.dataset, dist,
                                     getattr(self, 'save_dir', 'log'), self.datamanager.height,
                                     self.datamanager.width)
        headline = next(iter(results.values()))
        self._log_scalars(f'Test/{name}', {'rank1': headline.mean['rank1'],
                                           'mAP': headline.mean['mAP']})
        return float(headline.mean['rank1'])

    def _log_scalars(self, prefix: str, values: Dict[str, float]) -> None:
        if self.writer is not None:
            for metric, value in values.items():
                self.writer.add_scalar(f'{prefix}/{metric}', value, self.epoch)

    def prepare_evaluation(self) -> None:
        """Pre-flight: build and check every cross-modal target's settings now (seconds), so a
        bad option or a missing file stops the run before the first training step."""
        for name in self.test_loader:
            dataset = self.test_loader[name]['query'].dataset
            if isinstance(dataset, CrossModalDataset):
                self.evaluator.prepare(name, dataset)
