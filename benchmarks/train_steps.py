"""Training steps of a registered engine on one synthetic global batch, for the benchmarks.

Shared by ``bench_ddp.py`` and ``gpu_check.py``: the engine is built exactly as the command line
builds it (``torchreid_vi.cli.build_model`` / ``build_engine``, DDP wrapping under
``torch.distributed``), fed a fixed modality-balanced batch ``[visible(P ids × K),
infrared(P ids × K)]`` and stepped with SGD at lr 0, so every timed step does the same work and
the first step's loss is comparable across precisions and process counts.
"""
from __future__ import annotations

import os.path as osp
import sys
import time
from types import SimpleNamespace
from typing import Dict, Optional, Tuple

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..'))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

__all__ = ['engine_config', 'global_batch', 'rank_slice', 'StepRunner']


def engine_config(method: str, config_file: Optional[str] = None, opts=()):
    """The config of ``method`` (``'xiv'``, ``'idkl'`` or ``'triplet'``, torchreid's stock
    engine on ``resnet18``): the packaged ``config_file`` when given, then ``opts`` (a flat
    ``[key, value, ...]`` list). No ImageNet weights (benchmark machines are offline)."""
    from torchreid_vi.config import get_default_config, resolve_config_file
    cfg = get_default_config()
    if config_file:
        cfg.merge_from_file(resolve_config_file(config_file))
    elif method == 'triplet':
        cfg.model.name, cfg.loss.name = 'resnet18', 'triplet'
        cfg.loss.triplet.weight_x = 1.0
    else:
        cfg.engine.name, cfg.model.name, cfg.loss.name = method, f'{method}_resnet18', 'triplet'
    cfg.merge_from_list(['model.pretrained', 'False', *opts])
    return cfg


def global_batch(ids: int, per_id: int, height: int, width: int, seed: int = 0) -> dict:
    """``[visible(id 1..P), infrared(id 1..P)]``, ``per_id`` images per id and modality."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * ids * per_id
    pids = torch.arange(ids).repeat_interleave(per_id).repeat(2)
    modality = torch.cat([torch.zeros(n // 2), torch.ones(n // 2)]).long()
    return {'img': torch.randn(n, 3, height, width, generator=g), 'pid': pids,
            'modality': modality, 'camid': modality + 1, 'dsetid': modality,
            'impath': [''] * n}


def rank_slice(batch: dict, ids: int, per_id: int, rank: int, world: int) -> dict:
    """This rank's part of the global batch, as the distributed train loader slices it."""
    from torchreid_vi.data.sampler import ModalityBalancedSampler
    records = [(f'{m}{p}_{k}', p, 1, m) for p in range(ids) for m in (0, 1)
               for k in range(per_id)]
    positions = ModalityBalancedSampler(records, 2 * ids * per_id, per_id).rank_positions(
        rank, world)
    idx = torch.as_tensor(positions)
    return {k: (v[idx] if torch.is_tensor(v) else [v[i] for i in idx]) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class StepRunner:
    """An engine of ``cfg`` on ``device`` (DDP-wrapped when a process group is up).

    Args:
        cfg: a full config (:func:`engine_config`); ``train.batch_size`` and
            ``sampler.num_instances`` are set from ``ids``/``per_id``.
        ids, per_id: P and K of the global batch (2·P·K images).
        device: where the model runs.
        dtype: parameter dtype (``float64`` isolates an implementation from rounding).
        no_dropout: set dropout to 0 (masks cannot agree across process counts).
    """

    def __init__(self, cfg, ids: int, per_id: int, device: torch.device,
                 dtype: torch.dtype = torch.float32, no_dropout: bool = False, seed: int = 0):
        from torchreid_vi.cli import _wrap_distributed, build_engine, build_model
        from torchreid_vi.registration import register_all
        register_all()
        cfg.merge_from_list(['train.batch_size', str(2 * ids * per_id),
                             'sampler.num_instances', str(per_id)])
        cfg.use_gpu = device.type == 'cuda'  # what the command line derives from the machine
        self.device, self.ids, self.per_id = device, ids, per_id
        torch.manual_seed(seed)
        model = build_model(cfg, ids)
        if no_dropout:
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
        model = model.to(device=device, dtype=dtype)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        self.distributed = dist.is_available() and dist.is_initialized()
        if self.distributed:
            model = _wrap_distributed(cfg, model, device)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        dm = SimpleNamespace(train_loader=None, test_loader={}, num_train_pids=ids,
                             height=cfg.data.height, width=cfg.data.width)
        self.engine = build_engine(cfg, dm, model, optimizer, None)
        self.engine.set_model_mode('train')
        self.dtype = dtype

    def batch(self, seed: int = 0) -> dict:
        cfg_h, cfg_w = self.engine.datamanager.height, self.engine.datamanager.width
        batch = global_batch(self.ids, self.per_id, cfg_h, cfg_w, seed)
        batch['img'] = batch['img'].to(self.dtype)
        if self.distributed:
            batch = rank_slice(batch, self.ids, self.per_id, dist.get_rank(),
                               dist.get_world_size())
        return batch

    def step(self, batch: dict) -> Dict[str, float]:
        """One forward/backward/optimizer step; its loss terms (floats)."""
        return self.engine.forward_backward(batch)

    def gradients(self) -> Dict[str, torch.Tensor]:
        params = dict(self.engine.eval_model.named_parameters())
        return {n: params[n].grad.detach().float().cpu().clone() for n in self.trainable
                if params[n].grad is not None}

    def time_steps(self, batch: dict, warmup: int, steps: int) -> Tuple[float, Dict]:
        """``(seconds per step over ``steps`` after ``warmup``, loss terms of the first step)``."""
        first = self.step(batch)
        for _ in range(max(0, warmup - 1)):
            self.step(batch)
        _sync(self.device)
        if self.distributed:
            dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            self.step(batch)
        _sync(self.device)
        if self.distributed:
            dist.barrier()
        return (time.perf_counter() - start) / max(1, steps), first


def max_relative_difference(reference: Dict[str, torch.Tensor],
                            other: Dict[str, torch.Tensor]) -> float:
    """Largest gradient difference relative to each tensor's largest gradient; tensors that are
    zero in exact arithmetic are measured against 1e-5 of the model's largest gradient."""
    floor = 1e-5 * max(g.abs().max().item() for g in reference.values())
    return max((other[n] - g).abs().max().item() / max(g.abs().max().item(), floor)
               for n, g in reference.items())
