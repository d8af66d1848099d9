"""Model wrappers and distributed-training helpers.

Example::

    >>> import torch
    >>> from torchreid_vi.utils.distributed import unwrap_model
    >>> net = torch.nn.Linear(2, 2)
    >>> unwrap_model(torch.nn.DataParallel(net)) is net
    True
"""
from __future__ import annotations

from torch import nn

__all__ = ['unwrap_model']


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers (any depth)."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model
