"""What ``tests/test_metrics.py`` leaves open, against the spec's §3.4 reference semantics
(datasets_and_protocols.md; restated in spec_oracle.py): the multi-threaded path of
``evaluate_cross_modal`` (it only runs for ≥ 1e6 distances) and the across-trial aggregation of
``evaluate_settings`` (§3.3: the arithmetic mean of the per-trial values, not pooled over
queries)."""
from __future__ import annotations

import numpy as np
import pytest
from spec_oracle import evaluate

from torchreid_vi.evaluation import evaluate_cross_modal
from torchreid_vi.evaluation.protocols.common import EvalSetting
from torchreid_vi.evaluation.report import evaluate_settings


def sysu_like(rng, nq, ng, n_ids, ties):
    q_pid, g_pid = rng.integers(0, n_ids, nq), rng.integers(0, n_ids, ng)
    q_cam, g_cam = rng.choice([3, 6], nq), rng.choice([1, 2, 4, 5], ng)
    dist = (rng.integers(0, 40, (nq, ng)).astype(np.float32) if ties
            else rng.random((nq, ng)).astype(np.float32))
    return dist, q_pid, g_pid, q_cam, g_cam


@pytest.mark.parametrize('removal,cmc_mode,ties', [('location', 'identity', True),
                                                   ('same_pid_cam', 'image', False)])
def test_threaded_chunks_equal_the_reference(removal, cmc_mode, ties):
    rng = np.random.default_rng(21 + ties)
    args = sysu_like(rng, 1000, 1100, 60, ties)                     # 1.1e6 distances: threaded
    got = evaluate_cross_modal(*args, removal=removal, cmc_mode=cmc_mode, num_threads=3,
                               chunk_size=90)
    cmc, m_ap, m_inp, n_valid = evaluate(*args, removal, cmc_mode)
    np.testing.assert_allclose(got.cmc, cmc, atol=1e-12, rtol=0)
    assert got.mAP == pytest.approx(m_ap, abs=1e-12) and got.mINP == pytest.approx(m_inp, abs=1e-12)
    assert got.num_valid == n_valid


def test_settings_average_the_trials_arithmetically():
    """Three trials with different queries (and so different numbers of valid queries): the
    setting's mean is the plain mean of the per-trial reference values (§3.3)."""
    rng = np.random.default_rng(5)
    dist, q_pid, g_pid, q_cam, g_cam = sysu_like(rng, 60, 80, 12, ties=False)
    g_pid[:12] = np.arange(12)
    g_cam[:12] = 1
    query = [(f'q{i}.jpg', int(p), int(c), 1) for i, (p, c) in enumerate(zip(q_pid, q_cam))]
    gallery = [(f'g{i}.jpg', int(p), int(c), 0) for i, (p, c) in enumerate(zip(g_pid, g_cam))]
    trials = []
    for n_query, n_gallery in ((10, 80), (45, 60), (25, 30)):
        q_idx = np.sort(rng.choice(60, n_query, replace=False)).astype(np.int64)
        g_idx = np.sort(rng.choice(80, n_gallery, replace=False)).astype(np.int64)
        trials.append((q_idx, g_idx))
    setting = EvalSetting('toy/ir2vis', 'ir2vis', tuple(trials), 'location', 'identity', 'all')
    res = evaluate_settings(dist, query, gallery, [setting], max_rank=10)['toy/ir2vis']
    ref = [evaluate(dist[np.ix_(q, g)], q_pid[q], g_pid[g], q_cam[q], g_cam[g], 'location',
                    'identity', max_rank=10) for q, g in trials]
    valid = [r[3] for r in ref]
    assert len(set(valid)) == 3                                       # unequal trial sizes
    assert res.num_valid == valid
    for k in (1, 5, 10):
        assert res.mean[f'rank{k}'] == pytest.approx(np.mean([r[0][k - 1] for r in ref]),
                                                     abs=1e-12)
    assert res.mean['mAP'] == pytest.approx(np.mean([r[1] for r in ref]), abs=1e-12)
    assert res.mean['mINP'] == pytest.approx(np.mean([r[2] for r in ref]), abs=1e-12)
    np.testing.assert_allclose(res.mean_cmc, np.mean([r[0] for r in ref], axis=0), atol=1e-12)
    assert res.std['mAP'] == pytest.approx(np.std([r[1] for r in ref]), abs=1e-12)
    pooled = np.average([r[1] for r in ref], weights=valid)
    assert abs(pooled - res.mean['mAP']) > 1e-4                       # pooling would show
