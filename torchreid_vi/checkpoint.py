"""Checkpoints that save atomically, load safely and resume exactly.

* Saving writes to a temporary file in the same folder, fsyncs it and renames it over the final
  name: a killed run leaves either the old checkpoint or the new one, never a truncated file.
* Loading uses ``torch.load(weights_only=True)`` (no arbitrary unpickling); the only extra
  globals allowed are the numpy scalar types that older torchreid checkpoints contain (their
  ``rank1`` is a numpy float). torchreid's own loader fails on torch >= 2.6 for that reason.
* Resuming restores model, optimizer, scheduler, epoch and the Python / numpy / torch (and CUDA)
  RNG states, so a resumed run continues the same trajectory as an uninterrupted one.

Example::

    >>> import os, tempfile, torch
    >>> from torchreid_vi.checkpoint import save_checkpoint, load_checkpoint
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt.pth')
    >>> _ = save_checkpoint({'state_dict': torch.nn.Linear(2, 1).state_dict(), 'epoch': 3}, path)
    >>> load_checkpoint(path)['epoch']
    3
"""
from __future__ import annotations

import os
import pickle
import random
import warnings
from typing import Optional

import numpy as np
import torch

from .utils.distributed import unwrap_model
from .utils.fileio import atomic_write
from .utils.state_dict import load_matching

__all__ = ['save_checkpoint', 'load_checkpoint', 'rng_state', 'set_rng_state',
           'training_state', 'resume_from_checkpoint', 'load_model_weights', 'CheckpointError',
           'NotEnoughDiskSpace', 'checkpoint_bytes']


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or not what was expected."""


class NotEnoughDiskSpace(CheckpointError):
    """The save_dir's disk cannot hold the checkpoints a run is going to write."""


# what a training checkpoint holds besides tensors: RNG states, the config's yaml, the
# scheduler, the zip entries' headers (~0.1 MB measured for resnet18; 1 MiB is generous)
_CHECKPOINT_OVERHEAD_BYTES = 1 << 20
_PROBE_NUMEL = 7  # a probe parameter whose state buffers are told apart from scalars by size


def _optimizer_state_per_parameter(optimizer, group: dict):
    """``(buffer bytes per parameter byte, scalar bytes per parameter)`` that ``optimizer``'s
    class keeps for a parameter of ``group`` once it has stepped (SGD with momentum: (1, 0);
    Adam: (2, 4), its two moments and a step count). Measured by one step of a fresh optimizer
    of the same class and options on a probe parameter: any optimizer class works, also ones
    whose state torchreid does not know."""
    first = group['params'][0]
    probe = torch.zeros(_PROBE_NUMEL, dtype=first.dtype, device=first.device, requires_grad=True)
    probe.grad = torch.zeros_like(probe)
    options = {k: v for k, v in group.items() if k != 'params'}
    try:
        with warnings.catch_warnings():  # e.g. torchreid's RAdam: a deprecated torch overload
            warnings.simplefilter('ignore')
            twin = type(optimizer)([{'params': [probe], **options}])
            twin.step()
    except Exception:  # noqa: BLE001 - a class that cannot be rebuilt this way: assume Adam's
        return 2.0, 8
    tensors = [t for t in twin.state[probe].values() if torch.is_tensor(t)]
    buffers = sum(t.numel() * t.element_size() for t in tensors if t.numel() == _PROBE_NUMEL)
    scalars = sum(t.numel() * t.element_size() for t in tensors if t.numel() != _PROBE_NUMEL)
    return buffers / (_PROBE_NUMEL * probe.element_size()), scalars


def checkpoint_bytes(model, optimizer=None) -> int:
    """About how many bytes a training checkpoint of ``model`` and ``optimizer`` takes on disk
    once the optimizer has stepped (its state buffers are then full size): the model's state
    dict, the optimizer's per-parameter state and a fixed allowance for the rest. It errs on
    the large side (parameters sharing storage are counted twice).

    Example::

        >>> import torch
        >>> from torchreid_vi.checkpoint import checkpoint_bytes
        >>> net = torch.nn.Linear(1000, 1000)  # 1,001,000 float32: 4.0 MB
        >>> sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)  # + a momentum copy
        >>> round((checkpoint_bytes(net, sgd) - (1 << 20)) / 1e6, 2)
        8.01
    """
    total = _CHECKPOINT_OVERHEAD_BYTES + sum(
        t.numel() * t.element_size() for t in unwrap_model(model).state_dict().values()
        if torch.is_tensor(t))
    for group in (optimizer.param_groups if optimizer is not None else []):
        if not group['params']:
            continue
        per_byte, scalars = _optimizer_state_per_parameter(optimizer, group)
        nbytes = sum(p.numel() * p.element_size() for p in group['params'])
        total += int(per_byte * nbytes) + scalars * len(group['params'])
    return total


def _numpy_safe_globals():
    # Just enough to read torchreid's `rank1` numpy scalar (and its dtype) in old checkpoints.
    allowed = [np.dtype]
    try:
        from numpy.core.multiarray import scalar  # numpy < 2 path, still importable in 2.x
        allowed.append(scalar)
    except ImportError:  # pragma: no cover
        pass
    try:
        from numpy._core.multiarray import scalar as scalar2
        allowed.append(scalar2)
    except ImportError:  # pragma: no cover
        pass
    allowed += [type(np.dtype(t)) for t in ('float64', 'float32', 'int64')]
    return allowed


def save_checkpoint(state: dict, path: str) -> str:
    """Atomically write ``state`` (tensors, numbers, strings, lists, dicts) to ``path``.

    Raises:
        CheckpointError: the file could not be written (a full disk, a read-only folder); any
            earlier file at ``path`` is left as it was.
    """
    try:
        return atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f'cannot write checkpoint "{path}" ({type(exc).__name__}: {exc}); '
                              f'is the disk full or the folder read-only? Earlier checkpoints '
                              f'are intact') from exc


def load_checkpoint(path: str, map_location='cpu') -> dict:
    """Load a checkpoint safely (``weights_only=True`` + numpy scalar allow-list).

    Raises:
        CheckpointError: missing file, truncated/corrupt file, or a file that needs unpickling of
            arbitrary objects (the message names the file and the offending type).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint "{path}" does not exist')
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if 'Weights only load failed' in str(exc):
            detail = next((line.strip() for line in str(exc).splitlines()
                           if 'GLOBAL' in line.upper()), str(exc).splitlines()[0])
            raise CheckpointError(
                f'refusing to load "{path}": it contains objects outside the safe allow-list '
                f'({detail[:300]}). Re-save it with plain tensors/numbers, or load it yourself '
                f'if you trust it.') from exc
        raise CheckpointError(f'cannot read checkpoint "{path}": not a torch checkpoint '
                              f'({str(exc).splitlines()[0][:200]})') from exc
    except Exception as exc:  # torch.load fails in many ways on a file that is not its own
        raise CheckpointError(f'cannot read checkpoint "{path}" (truncated or not a torch '
                              f'checkpoint?): {type(exc).__name__}: {exc}') from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'"{path}" holds a {type(ckpt).__name__}, not a checkpoint dict')
    return ckpt


def rng_state() -> dict:
    """Python, numpy, torch and CUDA RNG states as plain lists/tensors (weights_only-safe)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        'python': [py[0], list(py[1]), py[2]],
        'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state['numpy']
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def training_state(model, optimizer=None, scheduler=None, epoch: int = 0,
                   rank1: Optional[float] = None, extra: Optional[dict] = None) -> dict:
    """Everything needed to resume: ``epoch`` is the number of finished epochs."""
    state = {
        'state_dict': unwrap_model(model).state_dict(),
        'epoch': int(epoch),
        'rank1': None if rank1 is None else float(rank1),
        'optimizer': optimizer.state_dict() if optimizer is not None else None,
        'optimizer_class': type(optimizer).__name__ if optimizer is not None else None,
        'scheduler': scheduler.state_dict() if scheduler is not None else None,
        'rng': rng_state(),
    }
    state.update(extra or {})
    return state


def resume_from_checkpoint(path: str, model, optimizer=None, scheduler=None,
                           restore_rng: bool = True) -> dict:
    """Restore model, optimizer, scheduler (and RNG states) from ``path``; return the checkpoint.

    The caller starts at ``ckpt['epoch']`` (finished epochs).

    Raises:
        CheckpointError: the file is not a training checkpoint of this model and optimizer (the
            message says what differs: the tensors whose shapes differ, e.g. another number of
            training identities; the optimizer class).
    """
    ckpt = load_checkpoint(path)
    for key in ('state_dict', 'epoch'):
        if key not in ckpt:
            raise CheckpointError(f'"{path}" is not a training checkpoint: no "{key}" entry '
                                  f'(keys: {sorted(ckpt)})')
    net = unwrap_model(model)
    own = net.state_dict()
    state = ckpt['state_dict']
    mismatched = [f'{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model'
                  for k, v in state.items() if k in own and torch.is_tensor(v)
                  and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        why = []
        if mismatched:
            why.append(f'{len(mismatched)} tensors differ in shape ({"; ".join(mismatched[:3])}; '
                       f'a classifier of another size means another number of training '
                       f'identities: another dataset or split)')
        if missing:
            why.append(f'{len(missing)} model tensors are not in the file (first: {missing[:3]})')
        if unexpected:
            why.append(f'{len(unexpected)} file tensors are not in the model (first: '
                       f'{unexpected[:3]})')
        raise CheckpointError(f'cannot resume from "{path}": it is not a checkpoint of this '
                              f'model ({"; ".join(why)}). To start from its weights without its '
                              f'training state use model.load_weights')
    net.load_state_dict(state)
    if optimizer is not None and ckpt.get('optimizer') is not None:
        saved = ckpt.get('optimizer_class')
        if saved is not None and saved != type(optimizer).__name__:
            raise CheckpointError(
                f'cannot resume from "{path}": it was trained with the {saved} optimizer and '
                f'this run uses {type(optimizer).__name__} (train.optim); resume with the same '
                f'train.optim, or start from its weights with model.load_weights')
        try:
            optimizer.load_state_dict(ckpt['optimizer'])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f'cannot resume the optimizer state of "{path}" '
                                  f'({type(exc).__name__}: {exc}): another optimizer or other '
                                  f'parameter groups (train.optim, train.staged_lr)') from exc
    if scheduler is not None and ckpt.get('scheduler') is not None:
        scheduler.load_state_dict(ckpt['scheduler'])
    if restore_rng and ckpt.get('rng') is not None:
        set_rng_state(ckpt['rng'])
    print(f'Resumed from "{path}" (finished epochs: {ckpt["epoch"]})')
    return ckpt


def load_model_weights(model, path: str) -> tuple:
    """Load matching weights (a checkpoint's ``state_dict`` or a bare state dict) into ``model``.

    Keys with a ``module.`` prefix (DataParallel/DDP) are accepted; entries whose name or shape
    does not match are skipped and reported (like torchreid's ``load_pretrained_weights``).

    Returns: ``(loaded_keys, skipped_keys)``. Raises :class:`CheckpointError` if nothing matches.
    """
    ckpt = load_checkpoint(path)
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict):
        raise CheckpointError(f'"{path}" holds a {type(state).__name__}, not a state dict')
    report = load_matching(unwrap_model(model), state)
    if not report.loaded:
        raise CheckpointError(f'no weight in "{path}" matches the model (first keys: '
                              f'{list(state)[:5]})')
    skipped = [k for k, _ in report.skipped]
    print(f'Loaded weights from "{path}" ({len(report.loaded)} tensors'
          + (f'; skipped {len(skipped)}: {skipped[:8]}' if skipped else '') + ')')
    return report.loaded, skipped
