"""Model wrappers and distributed-training helpers (PyTorch's own ``torch.distributed``).

Runs started by ``torchrun`` (the ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` environment) train with
``DistributedDataParallel``: NCCL on GPUs, gloo on CPUs. Everything here is a no-op, or the
identity, in a plain single-process run.

* :func:`unwrap_model` — the network inside ``DataParallel``/``DistributedDataParallel``.
* :func:`init_from_environment`, :func:`rank`, :func:`world_size`, :func:`is_main_process`,
  :func:`barrier`, :func:`broadcast_object`, :func:`all_gather_objects`.
* :func:`gather_batch` — concatenate a tensor's per-rank slices with gradient
  (``torch.distributed.nn.functional.all_gather``), so a batch-global loss (batch-hard triplet,
  IDKL's affinities) sees the global batch on every rank.
* :func:`convert_sync_batchnorm` — torch's ``SyncBatchNorm`` on CUDA, :class:`CPUSyncBatchNorm`
  (built from the autograd-aware ``all_reduce``) for gloo on CPUs.

Example::

    >>> import torch
    >>> from torchreid_vi.utils.distributed import unwrap_model, gather_batch, world_size
    >>> net = torch.nn.Linear(2, 2)
    >>> unwrap_model(torch.nn.DataParallel(net)) is net
    True
    >>> world_size(), gather_batch(torch.ones(3)).shape    # not distributed: the identity
    (1, torch.Size([3]))
"""
from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ['unwrap_model', 'init_from_environment', 'is_distributed', 'rank', 'local_rank',
           'world_size', 'is_main_process', 'barrier', 'broadcast_object', 'all_gather_objects',
           'gather_batch', 'CPUSyncBatchNorm', 'convert_sync_batchnorm', 'launched_by_torchrun']


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers (any depth)."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


# ------------------------------------------------------------------------------------------------
# process group

def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get('LOCAL_RANK', '0'))


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that writes logs, checkpoints and results."""
    return rank() == 0


def init_from_environment(use_gpu: bool, timeout_minutes: float = 120.0) -> Optional[torch.device]:
    """Join the process group ``torchrun`` describes; returns this rank's device, or ``None``
    when the run is not distributed.

    NCCL with one GPU per process (``cuda:LOCAL_RANK``) when ``use_gpu``; gloo on CPUs. The
    timeout bounds how long ranks wait for each other (rank 0 evaluates alone while the others
    wait at a barrier, so it must cover a full evaluation).
    """
    if not launched_by_torchrun():
        return None
    if not dist.is_initialized():
        backend = 'nccl' if use_gpu else 'gloo'
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    if use_gpu:
        device = torch.device('cuda', local_rank())
        torch.cuda.set_device(device)
        return device
    return torch.device('cpu')


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; for small things such as an error)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def _public_autograd_collectives():
    """Silence the FutureWarning of ``torch.distributed.nn.functional`` (torch >= 2.14): the
    replacement it names lives in the private ``torch.distributed._functional_collectives``, and
    the public functions still work on every supported torch."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=FutureWarning,
                                message=r'torch\.distributed\.nn\.functional\.')
        yield


def gather_batch(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order, **with gradient**.

    Each rank must pass a tensor of the same shape. The backward pass sums, for the local slice,
    the gradients every rank's copy receives; since every rank computes the same global loss,
    each local gradient is ``world_size ×`` the true one, which is exactly what
    ``DistributedDataParallel``'s gradient *averaging* undoes: parameters get the gradient of
    the global loss. Tensors without gradient (labels) are gathered the same way.
    """
    if not is_distributed():
        return tensor
    if tensor.requires_grad:
        from torch.distributed.nn.functional import all_gather
        with _public_autograd_collectives():
            return torch.cat(all_gather(tensor))
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------
# synchronised batch normalisation

class CPUSyncBatchNorm(_BatchNorm):
    """A BatchNorm whose training statistics are those of the global batch on a gloo (CPU)
    process group; torch's ``nn.SyncBatchNorm`` has CUDA kernels only (and DDP refuses it on
    CPU modules).

    The per-channel sum, sum of squares and count are summed over ranks with the autograd-aware
    ``torch.distributed.nn.functional.all_reduce`` (in float64), giving the batch mean and biased
    variance of the whole global batch for the normalisation and the unbiased variance for the
    running statistics, as ``nn.BatchNorm`` computes them on one process holding the whole batch.
    In eval mode, or outside a process group, it is a plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f'expected at least 2-D input (got {input.dim()}-D)')

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce
        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        x = input.double()
        count = torch.tensor([float(input.numel() // input.size(1))], dtype=torch.float64,
                             device=input.device)
        with _public_autograd_collectives():
            stats = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        c = input.size(1)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        shape = [1, c] + [1] * (input.dim() - 2)
        out = ((x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)).to(input.dtype)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every ``BatchNorm*d`` of ``module`` synchronised over the process group: torch's
    ``nn.SyncBatchNorm`` on CUDA, :class:`CPUSyncBatchNorm` on CPU (parameters, buffers and
    ``requires_grad`` kept: a BNNeck's frozen bias stays frozen)."""
    if device.type != 'cpu':
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        new = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
