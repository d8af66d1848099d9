"""Loss building blocks shared by every method: distances, batch-hard triplet, symmetric KL.

All functions are vectorised (no Python loop over samples or identities) and free of host-device
synchronisation, so they are safe in the training step.

Example::

    >>> import torch
    >>> from torchreid_vi.losses.common import pairwise_euclidean, batch_hard_triplet, symmetric_kl
    >>> f = torch.tensor([[0., 0.], [0., 1.], [3., 0.], [3., 1.]])
    >>> y = torch.tensor([0, 0, 1, 1])
    >>> d = pairwise_euclidean(f, f)
    >>> batch_hard_triplet(d, y, y, margin=0.3).tolist()   # hardest pos 1, hardest neg 3
    [0.0, 0.0, 0.0, 0.0]
    >>> float(symmetric_kl(torch.zeros(2, 5), torch.zeros(2, 5)))
    0.0
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ['pairwise_euclidean', 'batch_hard_triplet', 'symmetric_kl', 'cross_entropy']


def pairwise_euclidean(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances ``sqrt(max(|x_i|^2 + |y_j|^2 - 2 x_i.y_j, eps))``.

    Args:
        x: ``(n, d)``; y: ``(m, d)``; computed in float32 or wider.
        eps: clamp before the square root; keeps the gradient finite at zero distance
            (``sqrt(1e-12) = 1e-6`` is the distance of a sample to itself).

    Returns: ``(n, m)`` distances.
    """
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = y.float() if y.dtype in (torch.float16, torch.bfloat16) else y
    sq = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * (x @ y.t())
    return sq.clamp(min=eps).sqrt()


def batch_hard_triplet(dist: torch.Tensor, anchor_labels: torch.Tensor,
                       candidate_labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-anchor batch-hard triplet loss ``[margin + max_pos d - min_neg d]_+``.

    Args:
        dist: ``(n_a, n_c)`` distances from each anchor to each candidate. Pass a cross-modal
            block (anchors from one modality, candidates from another) to mine across modalities
            only; pass a square same-set matrix for ordinary batch-hard mining (the anchor is then
            its own positive at distance ~1e-6, as in the reference implementations).
        anchor_labels: ``(n_a,)`` int labels; candidate_labels: ``(n_c,)``.
        margin: the triplet margin (same unit as ``dist``).

    Returns:
        ``(n_a,)`` losses; an anchor without any positive or any negative candidate gets 0.
        Reduce with ``.mean()`` (the usual (1/n) sum).
    """
    same = anchor_labels.view(-1, 1) == candidate_labels.view(1, -1)
    neg_inf = torch.finfo(dist.dtype).min
    pos_inf = torch.finfo(dist.dtype).max
    hardest_pos = dist.masked_fill(~same, neg_inf).amax(dim=1)
    hardest_neg = dist.masked_fill(same, pos_inf).amin(dim=1)
    usable = same.any(dim=1) & (~same).any(dim=1)
    loss = F.relu(hardest_pos - hardest_neg + margin)
    return torch.where(usable, loss, torch.zeros_like(loss))


def symmetric_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Symmetric KL of row softmaxes, mean over rows.

    ``J(a, b) = (1/n) sum_i sum_c (s(a_i)_c - s(b_i)_c)(log s(a_i)_c - log s(b_i)_c)``,
    with ``s`` the softmax over the last dim (raw logits, no temperature). ``J(a,b) = J(b,a) >= 0``,
    ``J(a, a) = 0``, and both arguments receive gradients (no detach). Computed in float32.

    Args: a, b: ``(n, c)`` logits of the same shape. Returns: a scalar.
    """
    if a.shape != b.shape:
        raise ValueError(f'symmetric_kl needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}')
    la, lb = F.log_softmax(a.float(), dim=-1), F.log_softmax(b.float(), dim=-1)
    return ((la.exp() - lb.exp()) * (la - lb)).sum(-1).mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0):
    """Mean cross entropy in float32 (device-agnostic; torchreid's default needs CUDA)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
