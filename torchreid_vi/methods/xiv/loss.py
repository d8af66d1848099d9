"""XIV losses (spec ``xiv.md`` §5): modality respective gap (MRG) + λ · cross modality gap (CMG).

A training batch is split into modality blocks, named ``'I'`` (infrared), ``'X'`` (generated) and
``'V'`` (visible); each block holds M images of the same P identities. ``D`` is the Euclidean
distance on the pre-BN feature ``t``.

* MRG, Eq. 7–10: ``L_M = Σ_m L_m``, ``L_m = mean_i CE(p_i, y_i) + mean_i tri_i`` with batch-hard
  mining *within* block m (margin α2 = ``margin_intra``).
* CMG, Eq. 3–6: ``L_C = L_cross^{I,X} + L_cross^{I,V}``,
  ``L_cross^{I,B} = mean_{i∈I} tri(I_i → B) + mean_{j∈B} tri(B_j → I)`` where anchors come from one
  block and positives/negatives *only* from the other (margin α1 = ``margin_cross``).
* Total, Eq. 11: ``L = L_M + λ · L_C``.

With M anchors per block, ``mean`` equals the paper's ``(1/M) Σ``.

Example::

    >>> import torch
    >>> from torchreid_vi.methods.xiv.loss import cross_modality_gap
    >>> ir, vis = torch.tensor([[0.], [4.]]), torch.tensor([[1.], [3.]])
    >>> y = torch.tensor([0, 1])
    >>> # each anchor: positive at 1, negative at 3 -> [0.5 + 1 - 3]_+ = 0 both ways
    >>> float(cross_modality_gap(ir, y, vis, y, margin=0.5))
    0.0
    >>> float(cross_modality_gap(ir, y, vis, y, margin=2.5))   # 2 * mean(0.5) = 1.0
    1.0
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple, Union

import torch
from torch import nn

from ...modeling.losses import TRIPLET_EPS, batch_hard_triplet, cross_entropy
from ...utils.distance import pairwise_distance

__all__ = ['BLOCKS', 'CROSS_PAIRS', 'modality_respective_terms', 'cross_modality_gap', 'XIVLoss']

BLOCKS = ('I', 'X', 'V')
# The cross-modality pairs of Eq. 3: the infrared block against each visible-side block.
CROSS_PAIRS = (('I', 'X'), ('I', 'V'))
_LOG_NAMES = {'I': 'ir', 'X': 'x', 'V': 'vis'}

Index = Union[slice, torch.Tensor]


def modality_respective_terms(logits: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
                              margin: float, label_smoothing: float = 0.0
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """ID and intra-modal batch-hard triplet terms of one modality block (Eq. 8–10).

    Args:
        logits: ``(M, C)`` classifier outputs of the block; feats: ``(M, D)`` pre-BN features;
        labels: ``(M,)`` identity labels; margin: α2; label_smoothing: ε of the ID loss (0: plain
        cross entropy, the paper's choice).

    Returns: ``(id_term, triplet_term)``, scalars = ``(1/M) Σ CE`` and ``(1/M) Σ tri``.
    """
    dist = pairwise_distance(feats, feats, eps=TRIPLET_EPS)
    return (cross_entropy(logits, labels, label_smoothing),
            batch_hard_triplet(dist, labels, labels, margin).mean())


def cross_modality_gap(feats_a: torch.Tensor, labels_a: torch.Tensor, feats_b: torch.Tensor,
                       labels_b: torch.Tensor, margin: float) -> torch.Tensor:
    """``L_cross^{A,B}`` of Eq. 4–6: hard mining across the modality pair (A, B) only.

    Anchors in A mine their hardest positive and negative among B, and anchors in B among A;
    pairs inside A or inside B never enter. One ``(|A|, |B|)`` distance block serves both
    directions (its transpose is the B→A block).

    Args: feats_a ``(n_a, D)``, labels_a ``(n_a,)``, feats_b ``(n_b, D)``, labels_b ``(n_b,)``;
        margin: α1. Returns: a scalar, ``mean_a tri(a→B) + mean_b tri(b→A)``.
    """
    dist = pairwise_distance(feats_a, feats_b, eps=TRIPLET_EPS)
    a_to_b = batch_hard_triplet(dist, labels_a, labels_b, margin)
    b_to_a = batch_hard_triplet(dist.t(), labels_b, labels_a, margin)
    return a_to_b.mean() + b_to_a.mean()


class XIVLoss(nn.Module):
    """``L = L_M + λ · L_C`` over the modality blocks present in a batch.

    Args (keyword-only; ``cfg.xiv`` holds the defaults, see :meth:`from_config`):
        margin_intra: α2 of the per-modality triplet.
        margin_cross: α1 of the cross-modality triplets.
        lambda_cmg: λ.
        use_cmg: include ``L_C`` (False: the ``baseline`` / ``baseline+X`` ablations).
        label_smoothing: ε of the ID loss (0 = the paper's plain cross entropy).

    ``forward(logits, feats, labels, blocks)``:
        logits ``(N, C)``, feats ``(N, D)`` pre-BN, labels ``(N,)``; ``blocks`` maps
        ``'I'``/``'X'``/``'V'`` to the rows of that block (a ``slice`` or a LongTensor index).
        A missing block is an absent modality: its MRG term and its cross pair are skipped, so
        ``{'I', 'V'}`` without CMG is the two-modality strong baseline ``L_V + L_I``.

    Returns a dict of scalar tensors: ``loss`` (the total), ``loss_m``, ``loss_c``, and per term
    ``id_<b>``, ``tri_<b>`` for each block b in (ir, x, vis) present, ``cmg_ir_x``/``cmg_ir_vis``
    for each cross pair used (unweighted; ``loss_c`` is their sum, multiplied by λ in ``loss``).

    Example::

        >>> from torchreid_vi.config import get_default_config
        >>> XIVLoss.from_config(get_default_config(), lambda_cmg=0.2).lambda_cmg
        0.2
    """

    def __init__(self, *, margin_intra: float, margin_cross: float, lambda_cmg: float,
                 use_cmg: bool, label_smoothing: float):
        super().__init__()
        if margin_intra < 0 or margin_cross < 0 or lambda_cmg < 0:
            raise ValueError(f'xiv margins and lambda must be >= 0, got margin_intra='
                             f'{margin_intra}, margin_cross={margin_cross}, '
                             f'lambda_cmg={lambda_cmg}')
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f'xiv.label_smoothing must be in [0, 1), got {label_smoothing}')
        self.margin_intra = float(margin_intra)
        self.margin_cross = float(margin_cross)
        self.lambda_cmg = float(lambda_cmg)
        self.use_cmg = bool(use_cmg)
        self.label_smoothing = float(label_smoothing)

    @classmethod
    def from_config(cls, cfg, **overrides) -> 'XIVLoss':
        """The loss of ``cfg.xiv``; ``overrides`` replace single arguments."""
        x = cfg.xiv
        kwargs = dict(margin_intra=x.margin_intra, margin_cross=x.margin_cross,
                      lambda_cmg=x.lambda_cmg, use_cmg=x.use_cmg,
                      label_smoothing=x.label_smoothing)
        kwargs.update(overrides)
        return cls(**kwargs)

    def forward(self, logits: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
                blocks: Mapping[str, Index]) -> Dict[str, torch.Tensor]:
        unknown = set(blocks) - set(BLOCKS)
        if unknown or 'I' not in blocks or 'V' not in blocks:
            raise ValueError(f'XIVLoss blocks must include "I" and "V" (and optionally "X"), '
                             f'got {sorted(blocks)}')
        terms: Dict[str, torch.Tensor] = {}
        loss_m = feats.new_zeros(())
        for name in BLOCKS:
            if name not in blocks:
                continue
            rows = blocks[name]
            id_term, tri_term = modality_respective_terms(
                logits[rows], feats[rows], labels[rows], self.margin_intra, self.label_smoothing)
            terms[f'id_{_LOG_NAMES[name]}'] = id_term
            terms[f'tri_{_LOG_NAMES[name]}'] = tri_term
            loss_m = loss_m + id_term + tri_term
        loss_c = feats.new_zeros(())
        if self.use_cmg:
            for a, b in CROSS_PAIRS:
                if b not in blocks:
                    continue
                ra, rb = blocks[a], blocks[b]
                gap = cross_modality_gap(feats[ra], labels[ra], feats[rb], labels[rb],
                                         self.margin_cross)
                terms[f'cmg_{_LOG_NAMES[a]}_{_LOG_NAMES[b]}'] = gap
                loss_c = loss_c + gap
        terms['loss_m'] = loss_m
        terms['loss_c'] = loss_c
        terms['loss'] = loss_m + self.lambda_cmg * loss_c
        return terms
