"""k-reciprocal re-ranking: torchreid's version and IDKL's query-only variant."""
import numpy as np
import pytest
import torch

from torchreid_vi._torchreid import tr
from torchreid_vi.evaluation import evaluate_cross_modal, k_reciprocal_distances, query_only_rerank


def clusters(seed, n_ids=8, nq=30, ng=40, dim=16, noise=0.8):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, dim))
    qp, gp = rng.integers(0, n_ids, nq), rng.integers(0, n_ids, ng)
    q = centres[qp] + noise * rng.standard_normal((nq, dim))
    g = centres[gp] + noise * rng.standard_normal((ng, dim))
    return q.astype(np.float32), g.astype(np.float32), qp, gp


def loop_reference(q, g, k1, k2, lam, restrict):
    """IDKL's algorithm step by step with per-point loops (spec §2.4, idkl.md §7), float16 V."""
    x = np.concatenate([q, g]).astype(np.float32)
    nq, n = len(q), len(q) + len(g)
    sq = (x * x).sum(1)
    d = np.maximum(sq[:, None] + sq[None] - 2 * x @ x.T, 0)
    orig = (d / d.max(0)).T
    rank_d = d.copy()
    if restrict:
        rank_d[:, nq:] = d.max()
    R = np.argsort(rank_d, axis=1, kind='stable')
    V = np.zeros((n, n), np.float16)
    kh = int(np.around(k1 / 2)) + 1
    for i in range(n):
        fwd = R[i, :k1 + 1]
        kr = fwd[np.where(R[fwd, :k1 + 1] == i)[0]]
        expanded = kr
        for c in kr:
            cf = R[c, :kh]
            ckr = cf[np.where(R[cf, :kh] == c)[0]]
            if len(np.intersect1d(ckr, kr)) > 2 / 3 * len(ckr):
                expanded = np.append(expanded, ckr)
        expanded = np.unique(expanded)
        w = np.exp(-orig[i, expanded])
        V[i, expanded] = w / w.sum()
    if k2 != 1:
        V = np.stack([V[R[i, :k2]].astype(np.float32).mean(0) for i in range(n)]).astype(
            np.float16)
    V = V.astype(np.float32)
    s = np.minimum(V[:nq, None, :], V[None, nq:, :]).sum(-1)
    return (1 - s / (2 - s)) * (1 - lam) + orig[:nq, nq:] * lam


@pytest.mark.parametrize('restrict', [True, False], ids=['query_only', 'joint'])
@pytest.mark.parametrize('k1,k2', [(20, 6), (5, 3), (6, 1)])
def test_query_only_rerank_matches_step_by_step_reference(restrict, k1, k2):
    q, g, _, _ = clusters(0)
    got = query_only_rerank(q, g, k1, k2, 0.3, restrict_to_queries=restrict, chunk_size=7)
    ref = loop_reference(q, g, k1, k2, 0.3, restrict)
    assert got.shape == (30, 40) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-3)          # float16 Jaccard resolution


def test_query_only_differs_from_standard_and_is_deterministic():
    q, g, _, _ = clusters(1)
    a = query_only_rerank(q, g)
    assert np.array_equal(a, query_only_rerank(torch.from_numpy(q), torch.from_numpy(g)))
    standard = k_reciprocal_distances(q, g)
    assert standard.shape == a.shape == (30, 40)
    assert np.array_equal(standard, k_reciprocal_distances(q, g))
    assert np.abs(a - standard).max() > 0.05
    joint = query_only_rerank(q, g, restrict_to_queries=False)
    assert np.abs(a - joint).max() > 0.05


def test_k_reciprocal_distances_is_torchreids_engine_rerank():
    q, g, _, _ = clusters(2)
    qt, gt = torch.from_numpy(q), torch.from_numpy(g)
    dm = tr.metrics.compute_distance_matrix
    expected = tr.utils.re_ranking(dm(qt, gt, 'cosine').numpy(), dm(qt, qt, 'cosine').numpy(),
                                   dm(gt, gt, 'cosine').numpy(), k1=10, k2=4, lambda_value=0.5)
    got = k_reciprocal_distances(q, g, k1=10, k2=4, lambda_value=0.5, dist_metric='cosine')
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize('fn', [k_reciprocal_distances, query_only_rerank])
def test_well_separated_clusters_keep_rank1_perfect(fn):
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((6, 16))
    qp, gp = np.repeat(np.arange(6), 4), np.repeat(np.arange(6), 6)   # every id in both
    q = (centres[qp] + 0.05 * rng.standard_normal((24, 16))).astype(np.float32)
    g = (centres[gp] + 0.05 * rng.standard_normal((36, 16))).astype(np.float32)
    cams_q, cams_g = np.ones(len(qp)), np.full(len(gp), 2)
    res = evaluate_cross_modal(fn(q, g), qp, gp, cams_q, cams_g, 'regdb', max_rank=5)
    assert res.cmc[0] == 1.0 and res.mAP == 1.0


def test_rerank_argument_errors():
    q, g, _, _ = clusters(4)
    with pytest.raises(ValueError, match='same feature_dim'):
        query_only_rerank(q, g[:, :8])
    with pytest.raises(ValueError, match=r'q_feats must have shape \(num_images, feature_dim\)'):
        k_reciprocal_distances(q[0], g)
    with pytest.raises(ValueError, match='lambda_value'):
        query_only_rerank(q, g, lambda_value=2.0)
