"""The torch evaluation path (the default for a CUDA tensor; forced here on the CPU with
``backend='torch'``) against the numpy engines and the §3.4 reference function.

Rankings (each query's rank of its first true match, or of the true person in the
de-duplicated list) must be identical query by query; AP/INP and the aggregated metrics agree to
1e-9. Expectations come from the §6 golden table and the §3.4 reference written in
``test_metrics.py``, not from the code under test.
"""
import warnings

import numpy as np
import pytest
import torch
from test_metrics import CASES, GOLDEN, TOL, case_sysu, reference_evaluate

from torchreid_vi.evaluation import EvalSetting, evaluate_cross_modal, evaluate_settings
from torchreid_vi.evaluation.metrics import _per_query

RULES = [(r, m) for r in ('location', 'same_pid_cam', 'none') for m in ('identity', 'image')]


def assert_same_rankings(dist, qp, gp, qc, gc, removal, cmc_mode, **index):
    """numpy (batch engine) and torch: the same valid queries, the same rank per query, AP and
    INP per query within 1e-9."""
    a = _per_query(dist, qp, gp, qc, gc, removal, cmc_mode, engine='batch', **index)
    b = _per_query(dist, qp, gp, qc, gc, removal, cmc_mode, engine='torch', **index)
    assert np.array_equal(a[3], b[3])
    valid = a[3]
    assert np.array_equal(a[0][valid], b[0][valid])
    np.testing.assert_allclose(b[1][valid], a[1][valid], atol=1e-9, rtol=0)
    np.testing.assert_allclose(b[2][valid], a[2][valid], atol=1e-9, rtol=0)


def assert_close(res, other, tol=1e-9):
    np.testing.assert_allclose(res.cmc, other.cmc, atol=tol, rtol=0)
    assert abs(res.mAP - other.mAP) <= tol and abs(res.mINP - other.mINP) <= tol
    assert (res.num_valid, res.num_query, res.num_gallery) == (
        other.num_valid, other.num_query, other.num_gallery)


@pytest.mark.parametrize('row', GOLDEN, ids=lambda r: f'{r[0]}-{r[1]}')
def test_golden_values_torch(row):
    name, rules, nq, ng, n_valid, r1, r5, r10, r20, m_ap, m_inp = row
    dist, qp, gp, qc, gc = CASES[name]()
    kw = dict(removal=rules[0], cmc_mode=rules[1]) if isinstance(rules, tuple) else dict(
        protocol=rules)
    res = evaluate_cross_modal(torch.from_numpy(dist), qp, gp, qc, gc, backend='torch', **kw)
    assert (res.num_query, res.num_gallery, res.num_valid) == (nq, ng, n_valid)
    got = [res.cmc[k - 1] for k in (1, 5, 10, 20)] + [res.mAP, res.mINP]
    np.testing.assert_allclose(got, [r1, r5, r10, r20, m_ap, m_inp], atol=TOL, rtol=0)
    assert_close(res, evaluate_cross_modal(dist, qp, gp, qc, gc, backend='numpy', **kw))
    removal, cmc_mode = rules if isinstance(rules, tuple) else {
        'sysu': ('location', 'identity'), 'regdb': ('none', 'image'),
        'llcm': ('same_pid_cam', 'identity'), 'torchreid': ('same_pid_cam', 'image')}[rules]
    assert_same_rankings(dist, qp, gp, qc, gc, removal, cmc_mode)


@pytest.mark.filterwarnings('ignore')          # tiny galleries: saturating CMC tails
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_many_exact_ties_match_numpy_and_reference(dtype):
    """Distances rounded to one decimal (most rows full of exact ties), a pooled matrix read
    through query_index / gallery_index, every removal rule and CMC mode."""
    rng = np.random.default_rng(21 if dtype == np.float32 else 22)
    checked = 0
    for _ in range(12):
        n_rows, n_cols = int(rng.integers(20, 60)), int(rng.integers(30, 90))
        big = np.round(rng.random((n_rows, n_cols)), 1).astype(dtype)
        q_idx = rng.permutation(n_rows)[:int(rng.integers(5, n_rows))]
        g_idx = rng.permutation(n_cols)[:int(rng.integers(10, n_cols))]
        qp, gp = rng.integers(0, 8, len(q_idx)), rng.integers(0, 8, len(g_idx))
        qc, gc = rng.choice([1, 2, 3, 6], len(q_idx)), rng.choice([1, 2, 3, 4], len(g_idx))
        sliced = big[np.ix_(q_idx, g_idx)]
        index = dict(query_index=q_idx, gallery_index=g_idx)
        for removal, cmc_mode in RULES:
            ref = reference_evaluate(sliced, qp, gp, qc, gc, removal, cmc_mode, max_rank=10)
            if ref[3] == 0:
                continue
            args = (torch.from_numpy(big), qp, gp, qc, gc)
            got = evaluate_cross_modal(*args, removal=removal, cmc_mode=cmc_mode, max_rank=10,
                                       backend='torch', chunk_size=7, **index)
            np.testing.assert_allclose(got.cmc, ref[0], atol=1e-12, rtol=0)
            assert abs(got.mAP - ref[1]) <= 1e-12 and abs(got.mINP - ref[2]) <= 1e-12
            assert got.num_valid == ref[3]
            assert_close(got, evaluate_cross_modal(big, qp, gp, qc, gc, removal=removal,
                                                   cmc_mode=cmc_mode, max_rank=10,
                                                   backend='numpy', **index))
            assert_same_rankings(big, qp, gp, qc, gc, removal, cmc_mode, **index)
            checked += 1
    assert checked > 50


def _records(pids, cams, tag):
    return [(f'{tag}/{i}.jpg', int(p), int(c), 0) for i, (p, c) in enumerate(zip(pids, cams))]


def test_evaluate_settings_torch_tensor_equals_numpy_and_stays_on_device(monkeypatch):
    rng = np.random.default_rng(5)
    n_ir, n_vis = 70, 90
    ir = _records(rng.integers(0, 12, n_ir), rng.choice([3, 6], n_ir), 'ir')
    vis = _records(rng.integers(0, 12, n_vis), rng.choice([1, 2, 4, 5], n_vis), 'vis')
    dist = np.round(rng.random((n_ir, n_vis)), 2).astype(np.float32)      # ties included
    trials = tuple((np.arange(n_ir), np.sort(rng.choice(n_vis, 50, replace=False)))
                   for _ in range(3))
    back = tuple((np.sort(rng.choice(n_vis, 60, replace=False)), np.arange(n_ir))
                 for _ in range(2))
    settings = [EvalSetting('s/loc', 'ir2vis', trials, 'location', 'identity', 'x'),
                EvalSetting('s/spc', 'ir2vis', trials, 'same_pid_cam', 'image', 'x'),
                EvalSetting('s/back', 'vis2ir', back, 'none', 'identity', 'x')]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref = evaluate_settings(dist, ir, vis, settings, max_rank=8)
        tensor = torch.from_numpy(dist.copy())
        # the torch path must never bring the whole matrix to the host
        for name in ('cpu', 'numpy'):
            original = getattr(torch.Tensor, name)

            def guarded(self, *a, _original=original, _name=name, **k):
                assert self.numel() != tensor.numel(), f'full matrix moved by .{_name}()'
                return _original(self, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, guarded)
        got = evaluate_settings(tensor, ir, vis, settings, max_rank=8, backend='torch')
    for key in ref:
        for a, b in zip(ref[key].per_trial, got[key].per_trial):
            assert_close(b, a)


def test_backend_choice_and_errors():
    dist, qp, gp, qc, gc = case_sysu(0, 'all', 1)
    a = evaluate_cross_modal(torch.from_numpy(dist), qp, gp, qc, gc, 'sysu')   # CPU: numpy
    b = evaluate_cross_modal(dist, qp, gp, qc, gc, 'sysu', backend='torch')
    assert_close(a, b)
    with pytest.raises(ValueError, match="unknown backend 'cuda'; expected one of"):
        evaluate_cross_modal(dist, qp, gp, qc, gc, 'sysu', backend='cuda')
    bad = dist.copy()
    bad[4, 2] = np.nan
    with pytest.raises(ValueError, match='NaN.*query 4'):
        evaluate_cross_modal(bad, qp, gp, qc, gc, 'sysu', backend='torch')
