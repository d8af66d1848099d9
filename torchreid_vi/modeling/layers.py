"""Layers shared by the methods' networks: GeM pooling, the BNNeck and gradient reversal.

Example::

    >>> import torch
    >>> from torchreid_vi.modeling.layers import GeM, BNNeck
    >>> x = torch.rand(4, 2048, 16, 8)
    >>> f = GeM(p=3)(x)                  # (4, 2048)
    >>> neck = BNNeck(2048)
    >>> neck.bn.bias.requires_grad
    False
    >>> tuple(neck(f).shape)
    (4, 2048)
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ['GeM', 'BNNeck', 'grad_reverse']


class GeM(nn.Module):
    """Generalised-mean pooling: ``(mean_hw clamp(x, eps)^p)^(1/p)``, flattened to ``(B, C)``.

    Args:
        p: the exponent (3 in IDKL); fixed unless ``learnable``.
        eps: lower clamp; it also discards negative activations (relevant after InstanceNorm).
        learnable: make ``p`` a trainable parameter.

    Shapes: ``(B, C, H, W) -> (B, C)``. With p = 1 this is average pooling of the clamped map.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = False):
        super().__init__()
        p_tensor = torch.tensor(float(p))
        if learnable:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer('p', p_tensor, persistent=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.to(x.dtype)
        # flatten(1), not squeeze(): a batch of one must stay (1, C) (IDKL released-code bug 1).
        return x.clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p).flatten(1)

    def extra_repr(self) -> str:
        return f'p={float(self.p):.2f}, eps={self.eps}'


class BNNeck(nn.Module):
    """BatchNorm1d whose bias is frozen at zero (the "bag of tricks" BNNeck).

    Weight starts at 1, bias at 0 with ``requires_grad=False`` so optimisers skip it.
    Shapes: ``(B, D) -> (B, D)``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.bn.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha):
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.alpha * grad, None


def grad_reverse(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-alpha`` in the backward pass."""
    return _GradReverse.apply(x, alpha)

