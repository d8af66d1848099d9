"""XIV losses: hand-computed MRG/CMG values, cross-pair-only mining, and the strong-baseline
reduction (``generator none`` + no CMG = L_V + L_I) against torchreid's own loss classes."""
import math

import pytest
import torch
import torch.nn.functional as F

from torchreid_vi._torchreid import tr
from torchreid_vi.methods.xiv.loss import XIVLoss, cross_modality_gap, modality_respective_terms


def xiv_loss(**overrides):
    """The loss of the default config (``cfg.xiv``) with some arguments replaced."""
    from torchreid_vi.config import get_default_config
    return XIVLoss.from_config(get_default_config(), **overrides)


# Batch [I, X, V], one image per identity per block, 1-D features (distances are |a - b|).
#   I: y=(0, 1) f=(0.0, 0.2)   X: f=(1.0, 2.5)   V: f=(0.5, 3.0)
FEATS = torch.tensor([[0.0], [0.2], [1.0], [2.5], [0.5], [3.0]])
LABELS = torch.tensor([0, 1, 0, 1, 0, 1])
BLOCKS = {'I': slice(0, 2), 'X': slice(2, 4), 'V': slice(4, 6)}
LOGITS = torch.zeros(6, 2)  # CE = ln 2 per sample


def test_hand_built_batch_gives_the_hand_computed_terms():
    terms = xiv_loss(margin_intra=0.3, margin_cross=0.5, lambda_cmg=0.1)(
        LOGITS, FEATS, LABELS, BLOCKS)
    ln2 = math.log(2.0)
    # MRG: each anchor is its own positive (d ~ 1e-6); I: negative at 0.2 -> 0.3 - 0.2 = 0.1 for
    # both anchors; X (neg at 1.5) and V (neg at 2.5) are beyond the margin.
    expected = {
        'id_ir': ln2, 'id_x': ln2, 'id_vis': ln2,
        'tri_ir': 0.1, 'tri_x': 0.0, 'tri_vis': 0.0,
        # I->X: I0 [0.5+1-2.5]+=0, I1 [0.5+2.3-0.8]=2.0 -> 1.0; X->I: X0 0.5+1-0.8=0.7,
        # X1 0.5+2.3-2.5=0.3 -> 0.5.  (I1's nearest negative overall is I0 at 0.2: not used.)
        'cmg_ir_x': 1.5,
        # I->V: 0 and 0.5+2.8-0.3=3.0 -> 1.5; V->I: 0.5+0.5-0.3=0.7, 0.5+2.8-3.0=0.3 -> 0.5.
        'cmg_ir_vis': 2.0,
        'loss_m': 3 * ln2 + 0.1, 'loss_c': 3.5, 'loss': 3 * ln2 + 0.1 + 0.35,
    }
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(value, abs=1e-5), name


def test_cross_terms_mine_only_across_the_named_pair():
    feats = torch.randn(24, 8, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(2).repeat(3)  # blocks of 8: ids 0,0,1,1,2,2,3,3
    blocks = {'I': slice(0, 8), 'X': slice(8, 16), 'V': slice(16, 24)}
    terms = xiv_loss(margin_cross=5.0)(torch.zeros(24, 4), feats, labels, blocks)

    grad_x, = torch.autograd.grad(terms['cmg_ir_x'], feats, retain_graph=True)
    assert grad_x[16:].abs().sum() == 0 and grad_x[:16].abs().sum() > 0  # V never enters I<->X
    grad_v, = torch.autograd.grad(terms['cmg_ir_vis'], feats)
    assert grad_v[8:16].abs().sum() == 0 and grad_v[16:].abs().sum() > 0  # X never enters I<->V

    # Intra-block pairs never enter: collapsing all I features of different ids onto one point
    # (the hardest possible intra-modal negatives) leaves the I<->X term equal to a reference
    # computed from the I-by-X distance block alone.
    collapsed = feats.detach().clone()
    collapsed[0:8] = collapsed[0]
    got = cross_modality_gap(collapsed[0:8], labels[0:8], collapsed[8:16], labels[8:16], 5.0)
    assert float(got) == pytest.approx(_reference_cross(collapsed[0:8], labels[0:8],
                                                        collapsed[8:16], labels[8:16], 5.0),
                                       rel=1e-5)


def _reference_cross(fa, ya, fb, yb, margin):
    """Loop form of Eq. 5 (sum over anchors / M, both directions)."""
    def one_way(f1, y1, f2, y2):
        total = 0.0
        for i in range(len(f1)):
            d = (f2 - f1[i]).norm(dim=1)
            pos, neg = d[y2 == y1[i]].max(), d[y2 != y1[i]].min()
            total += max(0.0, margin + float(pos) - float(neg))
        return total / len(f1)
    return one_way(fa, ya, fb, yb) + one_way(fb, yb, fa, ya)


def test_cross_gap_matches_loop_reference_on_random_blocks():
    torch.manual_seed(0)
    fa, fb = torch.randn(12, 5), torch.randn(12, 5)
    ya = yb = torch.arange(3).repeat_interleave(4)
    assert float(cross_modality_gap(fa, ya, fb, yb, 0.5)) == pytest.approx(
        _reference_cross(fa, ya, fb, yb, 0.5), rel=1e-5)


def test_two_modality_baseline_equals_torchreid_strong_baseline_losses():
    """Blocks {I, V} without CMG: L = L_I + L_V with torchreid's CE and batch-hard triplet."""
    torch.manual_seed(1)
    num_classes = 6
    feats, logits = torch.randn(24, 16), torch.randn(24, num_classes)
    labels = torch.arange(num_classes).repeat_interleave(2).repeat(2)
    blocks = {'V': slice(0, 12), 'I': slice(12, 24)}
    terms = xiv_loss(use_cmg=False)(logits, feats, labels, blocks)

    ce = tr.losses.CrossEntropyLoss(num_classes, use_gpu=False, label_smooth=False)
    tri = tr.losses.TripletLoss(margin=0.3)
    expected = sum(float(ce(logits[s], labels[s]) + tri(feats[s], labels[s]))
                   for s in blocks.values())
    assert float(terms['loss']) == pytest.approx(expected, rel=1e-5)
    assert float(terms['loss_c']) == 0.0 and not any(k.startswith('cmg') for k in terms)
    assert not any(k.endswith('_x') for k in terms)


def test_label_smoothing_matches_torchreid_and_lambda_scales_only_cmg():
    torch.manual_seed(2)
    logits, labels = torch.randn(8, 4), torch.arange(4).repeat(2)
    ls_id, _ = modality_respective_terms(logits, torch.randn(8, 3), labels, 0.3,
                                         label_smoothing=0.1)
    ce = tr.losses.CrossEntropyLoss(4, eps=0.1, use_gpu=False, label_smooth=True)
    assert float(ls_id) == pytest.approx(float(ce(logits, labels)), rel=1e-5)

    base = xiv_loss(lambda_cmg=0.1)(LOGITS, FEATS, LABELS, BLOCKS)
    big = xiv_loss(lambda_cmg=1.0)(LOGITS, FEATS, LABELS, BLOCKS)
    assert float(big['loss'] - base['loss']) == pytest.approx(0.9 * float(base['loss_c']),
                                                               abs=1e-5)


def test_bad_arguments_name_the_key():
    with pytest.raises(ValueError, match='label_smoothing'):
        xiv_loss(label_smoothing=1.5)
    with pytest.raises(ValueError, match='margin'):
        xiv_loss(margin_cross=-1)
    with pytest.raises(ValueError, match='blocks'):
        xiv_loss()(LOGITS, FEATS, LABELS, {'I': slice(0, 2), 'Y': slice(2, 4)})


# ------------------------------------------------------------------------------------------------
# Every term against an explicit per-anchor reference, on blocks whose label vectors all differ
# (a label mix-up between blocks changes the value) and non-zero logits (a logit mix-up does).

def _reference_batch_hard(anchors, anchor_labels, candidates, candidate_labels, margin):
    """(1/n_a) Σ_i [margin + max_{pos} D − min_{neg} D]_+ with D from torch.cdist, one anchor at
    a time (the anchor's own set may be the candidate set: it is then its own positive, D = 0)."""
    d = torch.cdist(anchors.double(), candidates.double())
    total, active = 0.0, 0
    for i in range(len(anchors)):
        same = candidate_labels == anchor_labels[i]
        hinge = margin + float(d[i][same].max()) - float(d[i][~same].min())
        total += max(0.0, hinge)
        active += hinge > 0
    return total / len(anchors), active


def _labelled_blocks(seed=18):
    """36 rows: I, X and V blocks of 12 rows (3 identities x 4 images), rows of the three blocks
    interleaved at random; the three label vectors are different orders of the same identities."""
    g = torch.Generator().manual_seed(seed)
    labels_by_block = {'I': [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2],
                       'X': [2, 1, 0, 2, 1, 0, 2, 1, 0, 2, 1, 0],
                       'V': [1, 2, 2, 0, 0, 1, 2, 1, 0, 0, 2, 1]}
    rows = torch.randperm(36, generator=g)
    blocks = {b: rows[12 * i:12 * (i + 1)] for i, b in enumerate('IXV')}
    labels = torch.empty(36, dtype=torch.long)
    for b, idx in blocks.items():
        labels[idx] = torch.tensor(labels_by_block[b])
    # identity centres + noise, so some hinges are active and some are not
    centres = torch.randn(3, 6, generator=g)
    feats = 2.0 * centres[labels] + torch.randn(36, 6, generator=g)
    logits = 2.0 * torch.randn(36, 5, generator=g)
    return feats, logits, labels, blocks


def test_every_term_equals_an_explicit_per_anchor_reference_with_different_block_labels():
    feats, logits, labels, blocks = _labelled_blocks()
    alpha1, alpha2, lam = 0.5, 0.3, 0.37
    terms = xiv_loss(margin_cross=alpha1, margin_intra=alpha2, lambda_cmg=lam)(
        logits, feats, labels, blocks)

    f = {b: feats[idx] for b, idx in blocks.items()}
    y = {b: labels[idx] for b, idx in blocks.items()}
    expected, counts = {}, {}
    for b, name in (('I', 'ir'), ('X', 'x'), ('V', 'vis')):
        expected[f'id_{name}'] = float(F.cross_entropy(logits[blocks[b]], y[b]))   # mean over M
        expected[f'tri_{name}'], counts[name] = _reference_batch_hard(f[b], y[b], f[b], y[b],
                                                                      alpha2)
    for b, name in (('X', 'ir_x'), ('V', 'ir_vis')):
        fwd, n_fwd = _reference_batch_hard(f['I'], y['I'], f[b], y[b], alpha1)   # I -> B
        bwd, n_bwd = _reference_batch_hard(f[b], y[b], f['I'], y['I'], alpha1)   # B -> I
        expected[f'cmg_{name}'] = fwd + bwd
        counts[name] = (n_fwd, n_bwd)
    expected['loss_m'] = sum(expected[f'{t}_{b}']
                             for t in ('id', 'tri') for b in ('ir', 'x', 'vis'))
    expected['loss_c'] = expected['cmg_ir_x'] + expected['cmg_ir_vis']
    expected['loss'] = expected['loss_m'] + lam * expected['loss_c']

    # the batch exercises both sides of every hinge
    for name in ('ir', 'x', 'vis'):
        assert 0 < counts[name] < 12, (name, counts[name])
    for name in ('ir_x', 'ir_vis'):
        assert all(0 < n < 12 for n in counts[name]), (name, counts[name])
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_cross_gap_uses_each_sides_own_labels():
    """``cross_modality_gap`` on two blocks whose label vectors differ, against the reference;
    the same blocks with the B labels replaced by A's give another value (so a mix-up shows)."""
    feats, _, labels, blocks = _labelled_blocks(seed=9)
    fa, ya, fb, yb = (feats[blocks['I']], labels[blocks['I']],
                      feats[blocks['V']], labels[blocks['V']])
    fwd, _ = _reference_batch_hard(fa, ya, fb, yb, 0.5)
    bwd, _ = _reference_batch_hard(fb, yb, fa, ya, 0.5)
    assert float(cross_modality_gap(fa, ya, fb, yb, 0.5)) == pytest.approx(fwd + bwd, rel=1e-5)
    wrong = sum(_reference_batch_hard(*args, 0.5)[0]
                for args in ((fa, ya, fb, ya), (fb, ya, fa, ya)))
    assert abs(wrong - (fwd + bwd)) > 0.05


def test_label_smoothing_is_the_smoothed_cross_entropy_of_each_block():
    feats, logits, labels, blocks = _labelled_blocks(seed=6)
    terms = xiv_loss(label_smoothing=0.1)(logits, feats, labels, blocks)
    for b, name in (('I', 'ir'), ('X', 'x'), ('V', 'vis')):
        rows = blocks[b]
        log_p = F.log_softmax(logits[rows].double(), dim=1)
        smooth = -(0.9 * log_p.gather(1, labels[rows, None]).squeeze(1) + 0.1 * log_p.mean(1))
        assert float(terms[f'id_{name}']) == pytest.approx(float(smooth.mean()), rel=1e-5), name
