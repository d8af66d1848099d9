"""Load a state dict by name and shape: the one implementation behind checkpoints, ImageNet
weights and the XIV figures tool.

Example::

    >>> import torch
    >>> from torchreid_vi.utils.state_dict import load_matching
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> state = {'module.0.weight': torch.ones(3, 2), '1.weight': torch.ones(2, 2)}
    >>> report = load_matching(net, state)
    >>> report.loaded, [k for k, _ in report.skipped]
    (['0.weight'], ['1.weight'])
    >>> float(net[0].weight.detach().sum())
    6.0
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import nn

__all__ = ['MatchReport', 'strip_prefix', 'sub_state_dict', 'match_state_dict', 'load_matching']

DATA_PARALLEL_PREFIX = 'module.'


class MatchReport(NamedTuple):
    """What :func:`load_matching` did: ``loaded`` keys, ``skipped`` ``(key, reason)`` pairs of
    the given state, ``missing`` keys of the module that received nothing."""
    loaded: List[str]
    skipped: List[Tuple[str, str]]
    missing: List[str]


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = DATA_PARALLEL_PREFIX
                 ) -> Dict[str, torch.Tensor]:
    """``state`` with ``prefix`` removed from the keys that have it (DataParallel/DDP's
    ``module.``)."""
    n = len(prefix)
    return {(k[n:] if k.startswith(prefix) else k): v for k, v in state.items()}


def sub_state_dict(state: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The entries below ``prefix`` (e.g. ``'generator.'``), with the prefix removed; a leading
    ``module.`` is ignored."""
    state = strip_prefix(state)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def match_state_dict(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                     rename: Optional[Callable[[str], str]] = None
                     ) -> Tuple[Dict[str, torch.Tensor], List[Tuple[str, str]]]:
    """Split ``state`` into the entries ``own`` accepts (same name, same shape) and the rest.

    Args:
        own: the target's ``state_dict()``.
        state: tensors to load; ``module.`` prefixes are removed first.
        rename: optional key translation applied after that (e.g. old torchvision names).

    Returns: ``(matched, skipped)`` with ``skipped`` a list of ``(key, reason)``.
    """
    matched, skipped = {}, []
    for key, value in strip_prefix(state).items():
        key = rename(key) if rename is not None else key
        if key not in own:
            skipped.append((key, 'not in the model'))
        elif not torch.is_tensor(value):
            skipped.append((key, f'not a tensor ({type(value).__name__})'))
        elif own[key].shape != value.shape:
            skipped.append((key, f'shape {tuple(value.shape)} in the file, '
                                 f'{tuple(own[key].shape)} in the model'))
        else:
            matched[key] = value
    return matched, skipped


def load_matching(module: nn.Module, state: Mapping[str, torch.Tensor],
                  rename: Optional[Callable[[str], str]] = None) -> MatchReport:
    """Copy the entries of ``state`` that match ``module`` by name and shape into it.

    Nothing is loaded partially: a tensor either matches and is copied, or is reported in
    ``skipped``. The caller decides what is acceptable (e.g. "at least 90 % of the backbone", or
    "everything but the classifier") from the returned :class:`MatchReport`.
    """
    own = module.state_dict()
    matched, skipped = match_state_dict(own, state, rename)
    module.load_state_dict(matched, strict=False)
    missing = [k for k in own if k not in matched and not k.endswith('num_batches_tracked')]
    return MatchReport(list(matched), skipped, missing)
