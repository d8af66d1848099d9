"""The cross-modal engine: torchreid's training loop, made safe for multi-day runs, with the
standard VI-ReID evaluation.

:class:`CrossModalEngine` subclasses torchreid's ``Engine`` (its model registry, ``test`` of
single-modality targets, the console and tensorboard log format) and replaces ``run``/``train``:

* **epochs** come from the plugin's train loader (:mod:`torchreid_vi.data.loader`): global
  batches with per-sample augmentation seeds, sliced across ranks under ``torchrun``, resumable
  mid-epoch;
* **weights first**: a checkpoint is written before every evaluation (the final one included); if
  an evaluation fails, :class:`EvaluationFailed` names the checkpoint that holds the weights; a
  run resumed from a checkpoint whose due evaluation is missing from ``results.json`` (it was
  killed during it) makes that evaluation first;
* **checkpoints** are atomic, hold everything a resume needs (model, optimizer, scheduler,
  GradScaler, every rank's RNG states, the loader's position in the epoch) and are pruned to the
  last ``keep_last`` periodic ones only after the new one is on disk;
* **preemption**: SIGTERM or SIGINT (what clusters send before they take a node) finishes the
  current step, writes ``model/model.pth.tar-interrupted`` (resumable mid-epoch) and raises
  :class:`Preempted`; ``model.resume`` of it continues the same trajectory;
* **divergence**: a non-finite loss term stops the run at that step (:class:`NonFiniteLoss`,
  naming the terms and the last good checkpoint);
* **disk space**: :meth:`check_disk_space` (the pre-flight) refuses a save_dir whose disk cannot
  hold the checkpoints the run keeps; if the disk fills anyway, tensorboard events stop with a
  warning, and a checkpoint or ``results.json`` write is retried for ``save_retry_minutes``
  before the run stops;
* **mixed precision** (``amp``: none / fp16 with a dynamic GradScaler / bf16) for every engine;
* **distributed**: rank 0 alone writes checkpoints, tensorboard events and results, and
  evaluates (the other ranks wait); :meth:`gather` gives losses the global batch;
* **evaluation**: a cross-modal target is evaluated by a
  :class:`~torchreid_vi.evaluation.evaluator.CrossModalEvaluator` (features once, one IR×VIS
  distance matrix, every protocol setting × trial), recorded in tensorboard
  (``Test/<setting>/{rank1,mAP,mINP}``) and the results sink (``results.json``); other targets use
  torchreid's own evaluation.

The engine reads no config: ``from_config(cfg, datamanager, model, optimizer, scheduler)`` maps
one onto the constructor's arguments. Subclasses (XIV, IDKL, torchreid's stock engines)
implement ``forward_backward`` and may override ``extract_features(imgs, modality)`` and
``pairwise_distance(ir, vis)``.
"""
from __future__ import annotations

import contextlib
import datetime
import glob
import math
import os
import os.path as osp
import signal
import time
from typing import Dict, List, Optional, Union

import torch

from .._torchreid import tr
from ..checkpoint import (
    CheckpointError,
    NotEnoughDiskSpace,
    checkpoint_bytes,
    load_checkpoint,
    resume_from_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    training_state,
)
from ..data.base import VISIBLE, CrossModalDataset
from ..data.loader import EpochBatchSampler
from ..evaluation.evaluator import CrossModalEvaluator, FeatureDict
from ..utils import distributed as dist_utils
from ..utils.distributed import unwrap_model
from ..utils.fileio import free_bytes

__all__ = ['CrossModalEngine', 'AMP_MODES', 'EvaluationFailed', 'Preempted', 'NonFiniteLoss',
           'NothingToTrain', 'INTERRUPTED_SUFFIX', 'latest_checkpoint', 'SAVE_RETRY_POLL_SECONDS']

# how often a checkpoint or results.json write that failed is tried again
# (for vi.train.save_retry_minutes)
SAVE_RETRY_POLL_SECONDS = 15.0

AMP_MODES = ('none', 'fp16', 'bf16')
_AMP_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}
INTERRUPTED_SUFFIX = 'interrupted'
_CKPT_PREFIX = 'model.pth.tar-'


class EvaluationFailed(RuntimeError):
    """An evaluation failed after its checkpoint was written; ``checkpoint`` holds the weights."""

    def __init__(self, message: str, checkpoint: Optional[str], epoch: int):
        super().__init__(message)
        self.checkpoint, self.epoch = checkpoint, epoch


class Preempted(RuntimeError):
    """SIGTERM/SIGINT stopped the run after a step; ``checkpoint`` resumes it mid-epoch."""

    def __init__(self, message: str, checkpoint: Optional[str], signum: int):
        super().__init__(message)
        self.checkpoint, self.signum = checkpoint, signum


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite; ``checkpoint`` is the last good one (or ``None``)."""

    def __init__(self, message: str, checkpoint: Optional[str]):
        super().__init__(message)
        self.checkpoint = checkpoint


class NothingToTrain(ValueError):
    """The run would not train a single step (``train.max_epoch`` at or below the start)."""


def _default_config():
    from ..config import get_default_config
    return get_default_config()


def latest_checkpoint(save_dir: str, name: str = 'model') -> Optional[str]:
    """The newest checkpoint of ``<save_dir>/<name>/`` (periodic, final or interrupted), by
    modification time; ``None`` when there is none (``model.resume auto``)."""
    paths = [p for p in glob.glob(osp.join(save_dir, name, _CKPT_PREFIX + '*'))
             if not osp.basename(p).startswith('.')]
    return max(paths, key=osp.getmtime) if paths else None


class CrossModalEngine(tr.engine.Engine):
    """Base engine for cross-modal methods.

    Args:
        datamanager: a torchreid ``ImageDataManager`` (``CrossModalImageDataManager`` for plugin
            dataset options and the resumable, rank-sliced train loader) whose targets may be
            cross-modal datasets.
        model: the network (possibly ``DistributedDataParallel``-wrapped); in eval mode it must
            return ``(B, D)`` features.
        optimizer, scheduler: as in torchreid (scheduler may be ``None``).
        use_gpu: use CUDA when available.
        evaluator: the :class:`CrossModalEvaluator` (default: the default config's options).
        checkpoint_freq: save a checkpoint every N epochs (``vi.train.checkpoint_freq``; 0: only
            the final one and those before evaluations).
        keep_last: keep the newest N periodic checkpoints (``vi.train.keep_last``; 0: all); the
            final checkpoint and the ones evaluations came from are kept.
        save_retry_minutes: how long a checkpoint or ``results.json`` write that fails (a full
            disk, a quota) is retried, every ``SAVE_RETRY_POLL_SECONDS``, before the run stops
            (``vi.train.save_retry_minutes``; 0: stop at once).
        results: where evaluations are recorded (a :class:`~torchreid_vi.results.ResultsFile`
            or anything with its ``add_evaluation``), or ``None``.
        amp: mixed precision of the forward passes (``train.amp``): ``'none'``, ``'fp16'``
            (autocast + dynamic GradScaler, CUDA only) or ``'bf16'`` (autocast, no scaler; CPU
            autocast on a CPU). Loss maths stays float32.
        global_loss: under ``torchrun``, compute each loss on the global batch gathered from all
            ranks (``vi.dist.global_loss``), so the method's batch-global losses are unchanged.
        channels_last: feed images in channels-last memory format (``train.channels_last``).

    Arguments left ``None`` take the default config's value. A training batch ``data`` carries
    ``img``, ``pid`` and ``modality`` (0 visible, 1 infrared); :meth:`parse_train_batch` moves them
    to ``self.device``.
    """

    def __init__(self, datamanager, model, optimizer=None, scheduler=None, use_gpu=False,
                 **engine_options):
        super().__init__(datamanager, use_gpu)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.register_model('model', model, optimizer, scheduler)
        self.setup_cross_modal(**engine_options)

    @classmethod
    def engine_options(cls, cfg) -> dict:
        """The constructor's keyword arguments that come from the config (subclasses add theirs)."""
        return {'evaluator': CrossModalEvaluator.from_config(cfg),
                'checkpoint_freq': cfg.vi.train.checkpoint_freq,
                'keep_last': cfg.vi.train.keep_last,
                'save_retry_minutes': cfg.vi.train.save_retry_minutes, 'amp': cfg.train.amp,
                'global_loss': cfg.vi.dist.global_loss,
                'channels_last': cfg.train.channels_last}

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
    def setup_cross_modal(self, *, evaluator=None, checkpoint_freq=None, keep_last=None,
                          save_retry_minutes=None, results=None, amp=None, global_loss=None,
                          channels_last=None) -> None:
        """Attach the evaluation, checkpoint, precision and distribution state (also used by the
        stock-engine mixins)."""
        given = dict(checkpoint_freq=checkpoint_freq, keep_last=keep_last,
                     save_retry_minutes=save_retry_minutes, amp=amp, global_loss=global_loss,
                     channels_last=channels_last)
        if evaluator is None or any(v is None for v in given.values()):
            d = _default_config()
            defaults = dict(checkpoint_freq=d.vi.train.checkpoint_freq,
                            keep_last=d.vi.train.keep_last,
                            save_retry_minutes=d.vi.train.save_retry_minutes, amp=d.train.amp,
                            global_loss=d.vi.dist.global_loss,
                            channels_last=d.train.channels_last)
            given = {k: defaults[k] if v is None else v for k, v in given.items()}
            evaluator = evaluator or CrossModalEvaluator.from_config(d)
        for key, cfg_key in (('checkpoint_freq', 'vi.train.checkpoint_freq'),
                             ('keep_last', 'vi.train.keep_last'),
                             ('save_retry_minutes', 'vi.train.save_retry_minutes')):
            value = given[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f'{cfg_key}={value!r}; expected an int >= 0')
        self.evaluator = evaluator
        self.checkpoint_freq = given['checkpoint_freq']
        self.keep_last = given['keep_last']
        self.save_retry_minutes = given['save_retry_minutes']
        self.global_loss = bool(given['global_loss'])
        self.channels_last = bool(given['channels_last'])
        self.results = results
        self.device = next(iter(unwrap_model(self.model).parameters()), torch.empty(0)).device \
            if self.model is not None else torch.device('cpu')
        if self.use_gpu and self.device.type != 'cuda':
            self.device = torch.device('cuda')
        self.epoch = 0
        self.batch_idx = 0
        self.last_results: Dict[str, dict] = {}
        self.config_dump = None  # the run's config as yaml text, stored in checkpoints
        self.last_checkpoint: Optional[str] = None
        self._resume_loader_state = None
        self._resumed_end_of_epoch = None  # set by resume(): its evaluation may be missing
        self._stop_signal: Optional[int] = None
        self._events_stopped = False  # tensorboard events failed (a full disk): not reopened
        self._trainable = ({id(p): p.requires_grad for p in self.model.parameters()}
                           if self.model is not None else {})
        self._setup_amp(given['amp'])

    def _setup_amp(self, amp: str) -> None:
        if amp not in AMP_MODES:
            raise ValueError(f'train.amp={amp!r}; expected one of {AMP_MODES}')
        if amp == 'fp16' and self.device.type != 'cuda':
            raise ValueError(f'train.amp fp16 needs a CUDA device (this run uses '
                             f'{self.device.type}); use train.amp bf16 (CPU autocast) or none')
        self.amp = amp
        self.amp_dtype = _AMP_DTYPES.get(amp)
        self.scaler = torch.amp.GradScaler('cuda') if amp == 'fp16' else None

    @property
    def eval_model(self) -> torch.nn.Module:
        """The network without its DDP wrapper: evaluation runs on rank 0 only, and a wrapped
        forward would wait for the other ranks."""
        return unwrap_model(self.model)

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

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` of the global batch (all ranks' slices, in rank order, with gradient) when
        the run is distributed with ``global_loss``; ``tensor`` itself otherwise."""
        if self.global_loss and dist_utils.is_distributed():
            return dist_utils.gather_batch(tensor)
        return tensor

    # ------------------------------------------------------------------ training
    def parse_train_batch(self, data):
        """``(imgs, pids, modalities)`` on ``self.device``; modality from ``data['modality']``."""
        if 'modality' not in data:
            raise KeyError(
                'the training batch has no "modality": cross-modal engines need a cross-modal '
                'train set (a torchreid_vi CrossModalDataset); multi-source training that mixes '
                'in a single-modality dataset loses it')
        dev = self.device
        imgs = data['img'].to(dev, non_blocking=True)
        if self.channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        return (imgs, data['pid'].to(dev, non_blocking=True),
                data['modality'].to(dev, non_blocking=True))

    def run(self, save_dir='log', max_epoch=0, start_epoch=0, print_freq=10, fixbase_epoch=0,
            open_layers=None, start_eval=0, eval_freq=-1, test_only=False, dist_metric=None,
            normalize_feature=None, visrank=None, visrank_topk=None, use_metric_cuhk03=None,
            ranks=None, rerank=None):
        """torchreid's ``Engine.run`` (same arguments) with the guarantees of the module docstring.

        ``start_epoch`` is the number of finished epochs (a resumed checkpoint's ``epoch``; a
        mid-epoch checkpoint also restores the position inside that epoch). torchreid's
        evaluation arguments (``dist_metric``, ``normalize_feature``, ``visrank``,
        ``visrank_topk``, ``use_metric_cuhk03``, ``ranks``, ``rerank``) override the evaluator's
        options for this run when given (``rerank=True`` is torchreid's k-reciprocal re-ranking);
        ``None`` keeps them. They apply to periodic evaluations too.

        Raises:
            NothingToTrain: ``max_epoch <= start_epoch`` (and not ``test_only``).
            EvaluationFailed, Preempted, NonFiniteLoss: see the module docstring.
        """
        self._override_eval_options(dist_metric=dist_metric, normalize_feature=normalize_feature,
                                    visrank=visrank, visrank_topk=visrank_topk,
                                    use_metric_cuhk03=use_metric_cuhk03, ranks=ranks,
                                    rerank=rerank)
        self.save_dir = save_dir
        try:
            self._run(max_epoch, start_epoch, print_freq, fixbase_epoch, open_layers, start_eval,
                      eval_freq, test_only)
        finally:
            self._close_writer()

    def _open_writer(self) -> None:
        """Tensorboard events of every run, evaluation-only ones too (rank 0 writes them)."""
        if self.writer is None and not self._events_stopped and dist_utils.is_main_process():
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=self.save_dir)

    def _write_events(self, scalars: Dict[str, float], step: int) -> None:
        """Tensorboard scalars ``{tag: value}`` at ``step``. Events are a by-product: when they
        cannot be written (a full disk), they stop with one warning and the run goes on; the
        checkpoints, whose writes wait for space, are what must not be lost."""
        if self.writer is None:
            return
        try:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        except OSError as exc:
            self._events_stopped = True
            print(f'Warning: tensorboard events in {self.save_dir} stopped ({exc}); the run goes '
                  f'on without them', flush=True)
            self._close_writer()

    def _close_writer(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError:  # already reported, or nothing left to lose: never masks an error
                pass

    def _run(self, max_epoch, start_epoch, print_freq, fixbase_epoch, open_layers, start_eval,
             eval_freq, test_only):
        if test_only:
            self.epoch = start_epoch - 1  # evaluations are labelled with finished epochs
            self._open_writer()
            self._evaluate(final=True, checkpoint=self.last_checkpoint)
            return
        if self._resumed_evaluation_missing(start_epoch, max_epoch, start_eval, eval_freq):
            # the previous run stopped during this evaluation: its weights are on disk, so the
            # evaluation is made now, before training continues (or instead, after the last epoch)
            final = start_epoch == max_epoch
            print(f'=> results.json has no evaluation of {self.last_checkpoint} (epoch '
                  f'{start_epoch}); the previous run stopped during it: evaluating it now')
            self.epoch = start_epoch - 1
            self._open_writer()
            with self._stop_signals():  # SIGTERM: finish it, then stop after the next step
                self._evaluate(final=final, checkpoint=self.last_checkpoint)
            if final:
                return
        if max_epoch <= start_epoch:
            raise NothingToTrain(
                f'nothing to train: train.max_epoch={max_epoch} and the run starts after '
                f'{start_epoch} finished epochs' + (
                    ' (the resumed checkpoint is at or past train.max_epoch)' if start_epoch
                    else '') + '; raise train.max_epoch, or evaluate with test.evaluate True')
        if fixbase_epoch and dist_utils.is_distributed():
            raise ValueError('train.fixbase_epoch is not supported with torchrun: DDP needs the '
                             'same trainable parameters at every step; use fixbase_epoch 0')
        self.start_epoch, self.max_epoch = start_epoch, max_epoch
        self._open_writer()
        time_start = time.time()
        print('=> Start training')
        with self._stop_signals():
            for self.epoch in range(start_epoch, max_epoch):
                self.train(print_freq=print_freq, fixbase_epoch=fixbase_epoch,
                           open_layers=open_layers)
                done = self.epoch + 1
                final = done == max_epoch
                evaluate, periodic = self._saves_after(done, max_epoch, start_eval, eval_freq)
                if evaluate or periodic:
                    # weights first: the checkpoint is on disk before anything that can fail
                    path = self.save_model(self.epoch, None, self.save_dir, keep=final or evaluate)
                if evaluate:
                    if final:
                        print('=> Final test')
                    self._evaluate(final=final, checkpoint=path)
        print(f'Elapsed {time.strftime("%H:%M:%S", time.gmtime(time.time() - time_start))}')

    def _resumed_evaluation_missing(self, start_epoch: int, max_epoch: int, start_eval: int,
                                    eval_freq: int) -> bool:
        """Whether the end-of-epoch checkpoint this run resumed from, one of this save_dir's
        own, was due an evaluation (the final one, or the ``eval_freq`` schedule) that
        ``results.json`` lacks for some target. Decided on rank 0 and broadcast."""
        path = self._resumed_end_of_epoch
        # only this save_dir's own checkpoints: another run's weights were evaluated there
        folder = osp.join(self.save_dir, 'model')
        own = bool(path) and osp.isdir(folder) and osp.samefile(osp.dirname(osp.abspath(path)),
                                                                folder)
        due = own and start_epoch > 0 and (start_epoch == max_epoch or (
            eval_freq > 0 and start_epoch >= start_eval and start_epoch % eval_freq == 0))
        missing = False
        if due and dist_utils.is_main_process() and self.results is not None:
            done = {e.get('dataset') for e in self.results.data()['evaluations']
                    if e.get('epoch') == start_epoch and e.get('checkpoint')
                    and osp.basename(e['checkpoint']) == osp.basename(path)}
            missing = not set(self.test_loader) <= done
        return bool(dist_utils.broadcast_object(missing)) if due else False

    def _evaluate(self, final: bool, checkpoint: Optional[str]) -> None:
        """Evaluate on rank 0 (the others wait); a failure becomes :class:`EvaluationFailed`."""
        error = None
        if dist_utils.is_main_process():
            # Evaluation must not move the training trajectory: data loaders and torchreid's
            # evaluation may draw from the global RNGs, so they are restored afterwards.
            state = rng_state()
            try:
                self.test(final=final, checkpoint=checkpoint)
            except Exception as exc:  # noqa: BLE001 - re-raised below with the checkpoint
                error = f'{type(exc).__name__}: {exc}'
                cause = exc
            finally:
                set_rng_state(state)
        error = dist_utils.broadcast_object(error)
        if error is not None:
            what = ('the final evaluation' if final
                    else f'the evaluation after epoch {self.epoch + 1}')
            raise EvaluationFailed(f'{what} failed: {error}', checkpoint,
                                   self.epoch + 1) from (cause if dist_utils.is_main_process()
                                                         else None)
        dist_utils.barrier()

    @contextlib.contextmanager
    def _stop_signals(self):
        """SIGTERM/SIGINT set a flag that the step loop honours; a second SIGINT aborts."""
        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum
            print(f'\n=> {signal.Signals(signum).name} received: finishing the current step, '
                  f'then writing a resumable checkpoint (send SIGINT again to abort now)',
                  flush=True)
        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: the caller handles signals
            previous = {}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _should_stop(self) -> Optional[int]:
        """The signal that asks every rank to stop (all ranks agree after each step)."""
        flag = self._stop_signal or 0
        if dist_utils.is_distributed():
            t = torch.tensor([flag], dtype=torch.int64, device=self.device
                             if torch.distributed.get_backend() == 'nccl' else 'cpu')
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = int(t.item())
        return flag or None

    def _set_trainable(self, fixbase_epoch: int, open_layers) -> None:
        # torchreid's open_all_layers would set requires_grad on every parameter (a BNNeck's
        # frozen bias too); the flags the model was built with are restored instead.
        model = unwrap_model(self.model)
        if fixbase_epoch and self.epoch + 1 <= fixbase_epoch and open_layers is not None:
            print(f'* Only train {open_layers} (epoch: {self.epoch + 1}/{fixbase_epoch})')
            tr.utils.open_specified_layers(model, open_layers)
        else:
            for p in model.parameters():
                p.requires_grad_(self._trainable.get(id(p), p.requires_grad))

    def _batch_sampler(self) -> Optional[EpochBatchSampler]:
        bs = getattr(self.train_loader, 'batch_sampler', None)
        return bs if isinstance(bs, EpochBatchSampler) else None

    def train(self, print_freq=10, fixbase_epoch=0, open_layers=None):
        """One epoch (``self.epoch``): torchreid's loop and log lines, plus the stop checks."""
        losses = tr.utils.MetricMeter()
        batch_time, data_time = tr.utils.AverageMeter(), tr.utils.AverageMeter()
        self.set_model_mode('train')
        self._set_trainable(fixbase_epoch, open_layers)
        batches = self._batch_sampler()
        first = 0
        if batches is not None:
            if self._resume_loader_state is not None and \
                    int(self._resume_loader_state['epoch']) == self.epoch:
                batches.load_state_dict(self._resume_loader_state)
                first = batches.position
                print(f'=> Resuming epoch {self.epoch + 1} at step {first + 1}')
            else:
                batches.set_epoch(self.epoch)
            self._resume_loader_state = None
        else:
            sampler = getattr(self.train_loader, 'sampler', None)
            if hasattr(sampler, 'set_epoch'):
                sampler.set_epoch(self.epoch)
        self.num_batches = len(self.train_loader)
        end = time.time()
        for self.batch_idx, data in enumerate(self.train_loader, start=first):
            data_time.update(time.time() - end)
            summary = self.forward_backward(data)
            batch_time.update(time.time() - end)
            self._check_finite(summary)
            losses.update(summary)
            if (self.batch_idx + 1) % print_freq == 0:
                remaining = (self.num_batches - self.batch_idx - 1
                             + (self.max_epoch - self.epoch - 1) * self.num_batches)
                eta = str(datetime.timedelta(seconds=int(batch_time.avg * remaining)))
                print(f'epoch: [{self.epoch + 1}/{self.max_epoch}]'
                      f'[{self.batch_idx + 1}/{self.num_batches}]\t'
                      f'time {batch_time.val:.3f} ({batch_time.avg:.3f})\t'
                      f'data {data_time.val:.3f} ({data_time.avg:.3f})\t'
                      f'eta {eta}\t{losses}\tlr {self.get_current_lr():.6f}')
            if self.writer is not None:
                self._write_events({**{f'Train/{name}': v for name, v in summary.items()},
                                    'Train/lr': self.get_current_lr(),
                                    'Train/time': batch_time.val, 'Train/data': data_time.val},
                                   self.epoch * self.num_batches + self.batch_idx)
            signum = self._should_stop()
            if signum is not None:
                self._preempt(signum)
            end = time.time()
        self.update_lr()

    def _check_finite(self, summary: Dict[str, float]) -> None:
        bad = {k: v for k, v in summary.items() if not math.isfinite(v)}
        if bad:
            terms = ', '.join(f'{k}={v}' for k, v in bad.items())
            last = self.last_checkpoint
            raise NonFiniteLoss(
                f'training diverged at epoch {self.epoch + 1}, step {self.batch_idx + 1}: '
                f'{terms}. ' + (f'The last good checkpoint is {last}; resume from it with a lower '
                                f'train.lr' if last else 'No checkpoint was written yet; lower '
                                                         'train.lr') + ' (the weights in memory '
                'are not saved)', last)

    def _preempt(self, signum: int) -> None:
        path = self.save_interrupted(self.save_dir)
        name = signal.Signals(signum).name
        raise Preempted(f'stopped by {name} at epoch {self.epoch + 1}, step '
                        f'{self.batch_idx + 1}/{self.num_batches}; resumable checkpoint {path}',
                        path, signum)

    # ------------------------------------------------------------------ checkpoints
    def _training_state(self, epoch: int, rank1=None, **extra) -> dict:
        rngs = dist_utils.all_gather_objects(rng_state())  # every rank's streams
        state = training_state(self.model, self.optimizer, self.scheduler, epoch=epoch,
                               rank1=rank1, extra={'rng_per_rank': rngs,
                                                   'world_size': dist_utils.world_size(), **extra})
        if self.config_dump is not None:
            state['config'] = self.config_dump
        if self.scaler is not None:
            state['scaler'] = self.scaler.state_dict()
        return state

    def _saves_after(self, done: int, max_epoch: int, start_eval: int, eval_freq: int) -> tuple:
        """``(evaluate, periodic)`` after ``done`` finished epochs: an evaluation is due (the
        final one, or ``eval_freq``'s from ``start_eval`` on), a ``checkpoint_freq`` checkpoint
        is due. Either writes a checkpoint; an evaluated one is never pruned."""
        evaluate = done == max_epoch or (eval_freq > 0 and done >= start_eval
                                         and done % eval_freq == 0)
        periodic = self.checkpoint_freq > 0 and done % self.checkpoint_freq == 0
        return evaluate, periodic

    def checkpoint_schedule(self, start_epoch: int, max_epoch: int, start_eval: int = 0,
                            eval_freq: int = -1) -> Dict[str, int]:
        """The checkpoints that training epochs ``start_epoch + 1 .. max_epoch`` write.

        Returns: ``evaluated`` (kept for good: the final one and those evaluations come from),
        ``periodic`` (the other ``checkpoint_freq`` ones), ``retained`` (the periodic ones that
        ``keep_last`` lets stay) and ``peak``, the most files the run adds to its save_dir at
        one time: ``evaluated + retained + 1``, the one being the newest periodic checkpoint
        before pruning or a mid-epoch (interrupted) one.

        Example::

            >>> from torchreid_vi.engine.base import CrossModalEngine
            >>> e = CrossModalEngine.__new__(CrossModalEngine)
            >>> e.checkpoint_freq, e.keep_last = 1, 2
            >>> e.checkpoint_schedule(0, 120, start_eval=0, eval_freq=40)
            {'evaluated': 3, 'periodic': 117, 'retained': 2, 'peak': 6}
        """
        evaluated = periodic = 0
        for done in range(start_epoch + 1, max_epoch + 1):
            evaluate, is_periodic = self._saves_after(done, max_epoch, start_eval, eval_freq)
            evaluated += evaluate
            periodic += is_periodic and not evaluate
        retained = min(periodic, self.keep_last) if self.keep_last else periodic
        return {'evaluated': evaluated, 'periodic': periodic, 'retained': retained,
                'peak': evaluated + retained + 1}

    def check_disk_space(self, save_dir: str, start_epoch: int, max_epoch: int,
                         start_eval: int = 0, eval_freq: int = -1) -> str:
        """Pre-flight: the disk of ``save_dir`` must hold the checkpoints this run keeps at its
        peak (:meth:`checkpoint_schedule`, each :func:`~torchreid_vi.checkpoint.checkpoint_bytes`
        large), or a long run fails at the first save it cannot make. Rank 0 measures, every
        rank gets its verdict. Returns the plan as one line.

        Raises:
            NotEnoughDiskSpace: with the sizes, the free space and what to change.
        """
        verdict = None
        if dist_utils.is_main_process():
            plan = self.checkpoint_schedule(start_epoch, max_epoch, start_eval, eval_freq)
            size = checkpoint_bytes(self.model, self.optimizer)
            free = free_bytes(save_dir)  # the save_dir may not exist yet
            need = size * plan['peak']
            line = (f'data.save_dir {save_dir} keeps up to {plan["peak"]} checkpoints of about '
                    f'{size / 2**20:,.0f} MiB, {need / 2**30:,.2f} GiB ({plan["evaluated"]} '
                    f'evaluated, the final one included; {plan["retained"]} of '
                    f'{plan["periodic"]} periodic; 1 written before pruning or at a '
                    f'preemption); its disk has {free / 2**30:,.2f} GiB free')
            verdict = (need <= free, line)
        ok, line = dist_utils.broadcast_object(verdict)
        if not ok:
            raise NotEnoughDiskSpace(
                f'not enough disk space for this run: {line}. Free space there, choose another '
                f'data.save_dir, keep fewer periodic checkpoints (vi.train.keep_last, now '
                f'{self.keep_last}: 0 keeps all), write fewer (vi.train.checkpoint_freq, now '
                f'{self.checkpoint_freq}; test.eval_freq), or skip this check with '
                f'vi.train.check_disk_space False')
        return line

    def _waiting_for_space(self, write, what: str, errors: tuple, give_up) -> None:
        """``write()``, retried while it raises one of ``errors`` (a full disk, a quota) every
        ``SAVE_RETRY_POLL_SECONDS`` for ``save_retry_minutes``, so that freeing space saves what
        is in memory; a stop signal (preemption) ends the wait. Then raises
        ``give_up(last_error, note)``, ``note`` saying how long it retried ('' if it did not)."""
        deadline = time.monotonic() + 60.0 * self.save_retry_minutes
        waited = False
        while True:
            try:
                write()
                if waited:
                    print(f'=> {what} written after waiting for disk space', flush=True)
                return
            except errors as exc:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop_signal is not None:
                    note = (f' (retried for {self.save_retry_minutes} min, '
                            f'vi.train.save_retry_minutes)' if waited else '')
                    raise give_up(exc, note) from exc
                if not waited:
                    print(f'=> cannot write {what} ({exc}). Retrying every '
                          f'{SAVE_RETRY_POLL_SECONDS:g} s for {self.save_retry_minutes} min '
                          f'(vi.train.save_retry_minutes): free disk space now', flush=True)
                    waited = True
                end = time.monotonic() + min(SAVE_RETRY_POLL_SECONDS, left)
                while time.monotonic() < end and self._stop_signal is None:
                    time.sleep(min(1.0, SAVE_RETRY_POLL_SECONDS))

    def _write_checkpoint(self, state: dict, path: str) -> None:
        """:func:`save_checkpoint`, waiting for space (:meth:`_waiting_for_space`).

        Raises:
            CheckpointError: still failing when the time is up; names the newest checkpoint on
                disk and how to resume from it.
        """
        last = self.last_checkpoint
        self._waiting_for_space(
            lambda: save_checkpoint(state, path), path, (CheckpointError,),
            lambda exc, note: CheckpointError(
                f'{exc}{note}. The weights of this epoch are lost; ' + (
                    f'the newest checkpoint on disk is {last}: free space, then resume from it '
                    f'with model.resume auto' if last else 'no checkpoint was written yet')))

    def _record_evaluation(self, *args, **kwargs) -> None:
        """``results.add_evaluation``, waiting for space like a checkpoint: the evaluation's
        numbers are in memory only until ``results.json`` holds them."""
        if self.results is None:
            return
        path = getattr(self.results, 'path', 'results.json')
        self._waiting_for_space(lambda: self.results.add_evaluation(*args, **kwargs), path,
                                (OSError,),
                                lambda exc, note: OSError(f'cannot write {path} ({exc}){note}'))

    def save_model(self, epoch, rank1, save_dir, is_best=False, keep: bool = False) -> str:
        """Atomic checkpoint ``<save_dir>/model/model.pth.tar-<epoch+1>`` (rank 0 writes it), then
        the retention rule (``keep_last``); returns its path. ``keep`` exempts it from pruning
        (the final one, those evaluations came from)."""
        path = osp.join(save_dir, 'model', f'{_CKPT_PREFIX}{epoch + 1}')
        state = self._training_state(epoch + 1, rank1)
        if dist_utils.is_main_process():
            self._write_checkpoint(state, path)
            print(f'Checkpoint saved to "{path}"')
            if keep:
                self._kept = getattr(self, '_kept', set()) | {path}
            self._prune(osp.dirname(path), newest=path)
        dist_utils.barrier()
        self.last_checkpoint = path
        return path

    def save_interrupted(self, save_dir: str) -> Optional[str]:
        """A resumable mid-epoch checkpoint ``model/model.pth.tar-interrupted`` (after
        ``self.batch_idx + 1`` steps of epoch ``self.epoch``)."""
        batches = self._batch_sampler()
        loader = batches.state_dict(self.batch_idx + 1) if batches is not None else None
        state = self._training_state(self.epoch, step=self.batch_idx + 1, loader=loader)
        path = osp.join(save_dir, 'model', f'{_CKPT_PREFIX}{INTERRUPTED_SUFFIX}')
        if dist_utils.is_main_process():
            self._write_checkpoint(state, path)
            print(f'Resumable checkpoint saved to "{path}"')
        dist_utils.barrier()
        return path

    def _prune(self, folder: str, newest: str) -> None:
        """Remove periodic checkpoints beyond the newest ``keep_last`` (kept ones exempt), and an
        interrupted one that a newer full checkpoint supersedes."""
        interrupted = osp.join(folder, f'{_CKPT_PREFIX}{INTERRUPTED_SUFFIX}')
        if osp.exists(interrupted) and osp.getmtime(interrupted) <= osp.getmtime(newest):
            os.unlink(interrupted)
        if not self.keep_last:
            return
        # kept: the ones evaluations came from, this run's and (after a resume) earlier runs'
        kept = getattr(self, '_kept', set())
        if self.results is not None:
            kept = kept | {osp.join(folder, osp.basename(e['checkpoint']))
                           for e in self.results.data()['evaluations'] if e.get('checkpoint')}
        numbered = []
        for p in glob.glob(osp.join(folder, _CKPT_PREFIX + '*')):
            suffix = p.rsplit('-', 1)[1]
            if suffix.isdigit() and p not in kept:
                numbered.append((int(suffix), p))
        for _, p in sorted(numbered)[:-self.keep_last]:
            os.unlink(p)
            print(f'Removed old checkpoint "{p}" (vi.train.keep_last {self.keep_last})')

    def resume(self, path: str) -> int:
        """Restore model, optimizer, scheduler, GradScaler, this rank's RNG states and (for a
        mid-epoch checkpoint) the loader's position from ``path``; returns the number of finished
        epochs (the ``start_epoch`` of ``run``)."""
        ckpt = resume_from_checkpoint(path, self.model, self.optimizer, self.scheduler,
                                      restore_rng=False)
        rngs = ckpt.get('rng_per_rank')
        if rngs is not None:
            if int(ckpt.get('world_size', 1)) != dist_utils.world_size():
                print(f'Note: {path} was written by {ckpt.get("world_size")} processes, this run '
                      f'has {dist_utils.world_size()}: RNG streams restart from rank 0\'s')
            set_rng_state(rngs[min(dist_utils.rank(), len(rngs) - 1)])
        elif ckpt.get('rng') is not None:
            set_rng_state(ckpt['rng'])
        if self.scaler is not None and ckpt.get('scaler') is not None:
            self.scaler.load_state_dict(ckpt['scaler'])
        if ckpt.get('loader') is not None:
            self._resume_loader_state = ckpt['loader']
            if self._batch_sampler() is None:
                print(f'Note: the train loader cannot resume mid-epoch; epoch '
                      f'{int(ckpt["epoch"]) + 1} restarts from its first step')
        self.last_checkpoint = path
        self._resumed_end_of_epoch = path if ckpt.get('step') is None else None
        return int(ckpt['epoch'])

    def checkpoint_epoch(self, path: str) -> int:
        """The finished epochs of checkpoint ``path`` (0 for a bare state dict)."""
        try:
            return int(load_checkpoint(path).get('epoch', 0))
        except Exception:  # noqa: BLE001 - only a label; loading errors surface elsewhere
            return 0

    # ------------------------------------------------------------------ features
    def extract_features(self, imgs: torch.Tensor, modality: int = VISIBLE
                         ) -> Union[torch.Tensor, FeatureDict]:
        """Eval-mode features of a batch of one modality: ``(B, D)`` or a dict of them."""
        with self.autocast():
            return self.eval_model(imgs).float()

    def _extract_on_device(self, imgs: torch.Tensor, modality: int):
        imgs = imgs.to(self.device, non_blocking=True)
        if self.channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        return self.extract_features(imgs, modality)

    def feature_distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The evaluator's configured distance (``test.dist_metric``, normalisation)."""
        return self.evaluator.feature_distance(a, b)

    def pairwise_distance(self, ir: FeatureDict, vis: FeatureDict) -> torch.Tensor:
        """``(n_ir, n_vis)`` distances of infrared rows to visible columns (lower = closer)."""
        return self.evaluator.default_distance(ir, vis)

    # ------------------------------------------------------------------ evaluation
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

    def test(self, final: bool = False, checkpoint: Optional[str] = None):
        """Evaluate every target; returns the headline rank-1 (fraction) of the last target."""
        self.set_model_mode('eval')
        rank1 = 0.0
        for name in self.test_loader:
            if isinstance(self.test_loader[name]['query'].dataset, CrossModalDataset):
                rank1 = self.evaluate_cross_modal_target(name, final=final,
                                                         checkpoint=checkpoint)
            else:
                rank1 = self._evaluate_torchreid_target(name, final=final, checkpoint=checkpoint)
        return rank1

    def _evaluate_torchreid_target(self, name, final, checkpoint=None):
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
        self._record_evaluation(self.epoch + 1, name, {f'{name}/torchreid': {
            'mean': {'rank1': float(rank1), 'mAP': float(mAP)}}}, checkpoint=checkpoint,
            final=bool(final), protocol='torchreid')
        return float(rank1)

    @torch.no_grad()
    def evaluate_cross_modal_target(self, name: str, final: bool = False,
                                    checkpoint: Optional[str] = None) -> float:
        """One feature pass, one distance matrix, every setting × trial of the dataset."""
        qloader, gloader = self.test_loader[name]['query'], self.test_loader[name]['gallery']
        results, dist = self.evaluator.evaluate(
            name, qloader, gloader, self._extract_on_device, self.pairwise_distance,
            title=f'{name} (epoch {self.epoch + 1})')
        for key, res in results.items():
            self._log_scalars(f'Test/{key}', {m: res.mean[m] for m in ('rank1', 'mAP', 'mINP')})
        self._record_evaluation(self.epoch + 1, name, results, checkpoint=checkpoint,
                                final=bool(final))
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
        self._write_events({f'{prefix}/{metric}': v for metric, v in values.items()},
                           self.epoch + 1)

    def prepare_evaluation(self) -> List[str]:
        """Pre-flight: build and check every cross-modal target's settings now (seconds), so a
        bad option or a missing file stops the run before the first training step. Returns the
        target names checked."""
        checked = []
        for name in self.test_loader:
            dataset = self.test_loader[name]['query'].dataset
            if isinstance(dataset, CrossModalDataset):
                self.evaluator.prepare(name, dataset)
                checked.append(name)
        return checked
