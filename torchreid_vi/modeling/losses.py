"""Loss building blocks shared by every method: batch-hard triplet, symmetric KL, cross entropy.

All functions are vectorised (no Python loop over samples or identities) and free of host-device
synchronisation, so they are safe in the training step.

Example::

    >>> import torch
    >>> from torchreid_vi.modeling.losses import batch_hard_triplet, symmetric_kl
    >>> from torchreid_vi.utils.distance import pairwise_distance
    >>> f = torch.tensor([[0., 0.], [0., 1.], [3., 0.], [3., 1.]])
    >>> y = torch.tensor([0, 0, 1, 1])
    >>> d = pairwise_distance(f, f, eps=1e-12)
    >>> batch_hard_triplet(d, y, y, margin=0.3).tolist()   # hardest pos 1, hardest neg 3
    [0.0, 0.0, 0.0, 0.0]
    >>> float(symmetric_kl(torch.zeros(2, 5), torch.zeros(2, 5)))
    0.0
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ['batch_hard_triplet', 'symmetric_kl', 'cross_entropy', 'TRIPLET_EPS']

# Clamp of the squared distance in batch-hard triplets: a sample is sqrt(1e-12) = 1e-6 from
# itself, as in the reference implementations (keeps the gradient finite).
TRIPLET_EPS = 1e-12


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
        raise ValueError(
            f'symmetric_kl needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}')
    la, lb = F.log_softmax(a.float(), dim=-1), F.log_softmax(b.float(), dim=-1)
    return ((la.exp() - lb.exp()) * (la - lb)).sum(-1).mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0):
    """Mean cross entropy in float32 (device-agnostic; torchreid's default needs CUDA)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
