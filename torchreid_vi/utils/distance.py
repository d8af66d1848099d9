"""Distance matrices between feature rows: the one implementation used by the losses, the
evaluation and the re-ranking.

``metric``:

* ``'euclidean'``: ``sqrt(max(|a|² + |b|² − 2 a·b, eps))``; the true Euclidean distance, so sums
  of distances (XIV's fused Eq. 2) mean what the papers write. ``eps`` keeps the gradient finite
  at zero distance in losses (``1e-12``: a sample is ``1e-6`` from itself, as in the reference
  codes); evaluation uses ``eps=0``.
* ``'sqeuclidean'``: the squared distance ``max(|a|² + |b|² − 2 a·b, eps)`` (torchreid's
  ``compute_distance_matrix('euclidean')``; same ranking as ``'euclidean'``).
* ``'cosine'``: ``1 − cos(a, b)``.

Half-precision inputs are computed in float32; float64 stays float64.

Example::

    >>> import torch
    >>> from torchreid_vi.utils.distance import pairwise_distance
    >>> a = torch.tensor([[0., 0.], [3., 4.]])
    >>> pairwise_distance(a, a).tolist()
    [[0.0, 5.0], [5.0, 0.0]]
    >>> pairwise_distance(a, a, 'sqeuclidean')[0, 1].item()
    25.0
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ['pairwise_distance', 'METRICS']

METRICS = ('euclidean', 'sqeuclidean', 'cosine')


def pairwise_distance(a: torch.Tensor, b: torch.Tensor, metric: str = 'euclidean', *,
                      normalize: bool = False, eps: float = 0.0) -> torch.Tensor:
    """``(n, d)`` × ``(m, d)`` → ``(n, m)`` distances (lower = closer).

    Args:
        a, b: feature rows on the same device.
        metric: ``'euclidean'``, ``'sqeuclidean'`` or ``'cosine'`` (see the module docstring).
        normalize: L2-normalise the rows first.
        eps: lower clamp of the squared distance (Euclidean metrics).
    """
    if a.dtype in (torch.float16, torch.bfloat16):
        a = a.float()
    if b.dtype in (torch.float16, torch.bfloat16):
        b = b.float()
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    if metric == 'cosine':
        return 1.0 - F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()
    if metric not in METRICS:
        raise ValueError(f'distance metric must be one of {METRICS}, got {metric!r}')
    sq = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2.0 * (a @ b.t())
    sq = sq.clamp(min=eps)
    return sq.sqrt() if metric == 'euclidean' else sq
