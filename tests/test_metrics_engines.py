"""The host evaluation engines: trial batches, the pooled exact-sort engine, tiled column reads.

``evaluate_settings`` evaluates every trial that shares a query set in one pass, on the pooled
engine (dense galleries, e.g. SYSU multi-shot) or as trial batches. Both must give exactly the
definitions of §3.1: checked against the §3.4 reference written in ``test_metrics.py`` on
tie-heavy matrices (distances rounded to one decimal), and against each other query by query.
"""
import warnings

import numpy as np
import pytest
from test_metrics import reference_evaluate

import torchreid_vi.evaluation.metrics as rank
from torchreid_vi.evaluation import EvalSetting, evaluate_cross_modal, evaluate_settings
from torchreid_vi.evaluation.metrics import _per_query

RULES = [(r, m) for r in ('location', 'same_pid_cam', 'none') for m in ('identity', 'image')]


def records(pids, cams, tag):
    return [(f'{tag}/{i}.jpg', int(p), int(c), 0) for i, (p, c) in enumerate(zip(pids, cams))]


def pooled_case(rng, n_ir=60, n_vis=120, n_ids=10, signed=False):
    """IR queries x VIS pool (float32, many exact ties) and dense ascending trial galleries.

    Query cameras include cam 3 (location rule) and cameras that the gallery shares
    (same_pid_cam removes something); some query ids are absent from the gallery."""
    ir_p, ir_c = rng.integers(0, n_ids + 2, n_ir), rng.choice([1, 3, 4, 6], n_ir)
    vis_p, vis_c = rng.integers(0, n_ids, n_vis), rng.choice([1, 2, 4, 5], n_vis)
    dist = np.round(rng.standard_normal((n_ir, n_vis)) if signed else rng.random((n_ir, n_vis)),
                    1).astype(np.float32)
    if signed:
        dist[dist == 0] = np.where(rng.random(int((dist == 0).sum())) < 0.5, -0.0, 0.0)
    galleries = [np.sort(rng.choice(n_vis, int(rng.integers(n_vis // 3, n_vis)), replace=False))
                 for _ in range(4)]
    return dist, ir_p, ir_c, vis_p, vis_c, galleries


def run_strategy(monkeypatch, strategy, *args, **kw):
    monkeypatch.setattr(rank, '_STRATEGY', strategy)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')         # tiny galleries: saturating CMC tails
        return evaluate_settings(*args, **kw)


def assert_identical(a, b):
    assert np.array_equal(a.cmc, b.cmc) and a.mAP == b.mAP and a.mINP == b.mINP
    assert (a.num_valid, a.num_query, a.num_gallery) == (b.num_valid, b.num_query, b.num_gallery)


def rule_settings(galleries, n_query):
    """One setting per rule (RULES), each with the same trial galleries: one evaluation group."""
    trials = tuple((np.arange(n_query), g) for g in galleries)
    return [EvalSetting(f'{r}/{m}', 'ir2vis', trials, r, m, 'x') for r, m in RULES]


def check_engine(monkeypatch, strategy, dist, ir_p, ir_c, vis_p, vis_c, galleries, max_rank):
    """Every rule x gallery on ``strategy``'s engine: = the batch engine to the bit, and = the
    §3.4 oracle per trial."""
    ir, vis = records(ir_p, ir_c, 'ir'), records(vis_p, vis_c, 'vis')
    settings = rule_settings(galleries, len(ir))
    got = run_strategy(monkeypatch, strategy, dist, ir, vis, settings, max_rank=max_rank)
    batch = run_strategy(monkeypatch, 'batch', dist, ir, vis, settings, max_rank=max_rank)
    for s in settings:
        for g, a, b in zip(galleries, got[s.key].per_trial, batch[s.key].per_trial):
            assert_identical(a, b)
            cmc, m_ap, m_inp, n_valid = reference_evaluate(
                dist[:, g], ir_p, vis_p[g], ir_c, vis_c[g], s.removal, s.cmc_mode,
                max_rank=max_rank)
            np.testing.assert_allclose(a.cmc, cmc, atol=1e-12, rtol=0)
            assert abs(a.mAP - m_ap) <= 1e-12 and abs(a.mINP - m_inp) <= 1e-12
            assert a.num_valid == n_valid


@pytest.mark.parametrize('signed', [False, True], ids=['distances', 'signed-zeros'])
@pytest.mark.parametrize('max_rank,window', [(10, 128), (3, 1)], ids=['wide', 'tiny-window'])
def test_pooled_engine_equals_reference_and_batches(monkeypatch, signed, max_rank, window):
    """Every rule on the pooled engine vs the reference per trial, and vs the batch engine to
    the bit. A one-position identity window makes most identity ranks go through the capped or
    the recomputed branch."""
    monkeypatch.setattr(rank, '_IDENTITY_WINDOW', window)
    rng = np.random.default_rng(3 + signed)
    for _ in range(3):
        dist, ir_p, ir_c, vis_p, vis_c, galleries = pooled_case(rng, signed=signed)
        check_engine(monkeypatch, 'pool', dist, ir_p, ir_c, vis_p, vis_c, galleries, max_rank)


@pytest.mark.parametrize('engine', ['pool', 'compiled'])
def test_pooled_rankings_per_query(engine):
    """Query by query, every rule: a pooled engine's ranks equal the batch engine's and AP/INP
    are bit-identical. The numpy pool caps identity ranks past max_rank at max_rank + 1; the
    compiled kernel's are exact."""
    if engine == 'compiled' and rank._compiled() is None:
        pytest.skip('the compiled kernel needs numba')
    rng = np.random.default_rng(8)
    dist, ir_p, ir_c, vis_p, vis_c, galleries = pooled_case(rng)
    g = galleries[0]
    max_rank, cap = (5, 6) if engine == 'pool' else (50, np.iinfo(np.int64).max)
    for removal, cmc_mode in RULES:
        args = (dist, ir_p, vis_p[g], ir_c, vis_c[g], removal, cmc_mode)
        a = _per_query(*args, engine=engine, max_rank=max_rank, gallery_index=g)
        b = _per_query(*args, engine='batch', max_rank=max_rank, gallery_index=g)
        assert np.array_equal(a[3], b[3])
        v = a[3]
        assert np.array_equal(np.minimum(a[0][v], cap), np.minimum(b[0][v], cap))
        assert np.array_equal(a[1][v], b[1][v]) and np.array_equal(a[2][v], b[2][v])


def test_pooled_evaluation_equals_direct_evaluation_float32(monkeypatch):
    """§7.2.10 on the pooled engine: each trial of evaluate_settings equals
    evaluate_cross_modal on that trial's own matrix, to the bit (float32, with ties), in both
    directions (vis2ir reads the matrix column-wise)."""
    rng = np.random.default_rng(12)
    dist, ir_p, ir_c, vis_p, vis_c, galleries = pooled_case(rng, n_ir=80, n_vis=150)
    ir, vis = records(ir_p, ir_c, 'ir'), records(vis_p, vis_c, 'vis')
    fwd = EvalSetting('f', 'ir2vis', tuple((np.arange(80), g) for g in galleries), 'location',
                      'identity', 'x')
    back_g = [np.sort(rng.choice(80, 50, replace=False)) for _ in range(3)]
    back = EvalSetting('b', 'vis2ir', tuple((np.arange(150), g) for g in back_g), 'same_pid_cam',
                       'identity', 'x')
    res = run_strategy(monkeypatch, 'pool', dist, ir, vis, [fwd, back], max_rank=6)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for g, got in zip(galleries, res['f'].per_trial):
            assert_identical(got, evaluate_cross_modal(np.ascontiguousarray(dist[:, g]), ir_p,
                                                       vis_p[g], ir_c, vis_c[g], 'sysu',
                                                       max_rank=6))
        for g, got in zip(back_g, res['b'].per_trial):
            assert_identical(got, evaluate_cross_modal(np.ascontiguousarray(dist[g].T), vis_p,
                                                       ir_p[g], vis_c, ir_c[g], 'llcm',
                                                       max_rank=6))


def test_nan_is_rejected_by_every_engine(monkeypatch):
    rng = np.random.default_rng(4)
    dist, ir_p, ir_c, vis_p, vis_c, galleries = pooled_case(rng)
    dist[17, galleries[0][3]] = np.nan
    ir, vis = records(ir_p, ir_c, 'ir'), records(vis_p, vis_c, 'vis')
    trials = tuple((np.arange(len(ir)), g) for g in galleries)
    s = EvalSetting('x', 'ir2vis', trials, 'none', 'image', 'x')
    for strategy in ('pool', 'batch'):
        with pytest.raises(ValueError, match=r"setting 'x' trial 0: .*NaN.*query 17"):
            run_strategy(monkeypatch, strategy, dist, ir, vis, [s])


def test_column_major_reads_across_tiles():
    """A column-major matrix (a transposed view) is read in tiles of 512 source rows: a gallery
    wider than two tiles, read through a shuffled query_index, gives the row-major result."""
    rng = np.random.default_rng(9)
    dist = np.round(rng.random((1300, 40)), 2).astype(np.float32).T      # (40, 1300), F order
    assert dist.flags.f_contiguous
    qp, gp = rng.integers(0, 30, 25), rng.integers(0, 30, 1300)
    qc, gc = rng.choice([3, 6], 25), rng.choice([1, 2, 4, 5], 1300)
    q_idx = rng.permutation(40)[:25]
    a = evaluate_cross_modal(dist, qp, gp, qc, gc, 'sysu', query_index=q_idx)
    b = evaluate_cross_modal(np.ascontiguousarray(dist[q_idx]), qp, gp, qc, gc, 'sysu')
    assert_identical(a, b)


def test_pooled_engine_with_many_trials_cuts_segments(monkeypatch):
    """40 trials (as a SYSU report) pack 10 per word in 6-bit fields, so the sorted rows are cut
    every 63 positions; galleries of the whole pool fill whole segments. Pooled = batches to the
    bit, and = the reference on a sample of trials."""
    rng = np.random.default_rng(40)
    dist, ir_p, ir_c, vis_p, vis_c, _ = pooled_case(rng, n_ir=40, n_vis=300)
    ir, vis = records(ir_p, ir_c, 'ir'), records(vis_p, vis_c, 'vis')
    galleries = [np.arange(300) if t % 5 == 0 else
                 np.sort(rng.choice(300, int(rng.integers(100, 300)), replace=False))
                 for t in range(20)]
    trials = tuple((np.arange(40), g) for g in galleries)
    settings = [EvalSetting('loc', 'ir2vis', trials, 'location', 'identity', 'x'),
                EvalSetting('spc', 'ir2vis', trials, 'same_pid_cam', 'image', 'x')]
    pool = rank._Pool([(g, vis_p[g], vis_c[g]) for g in galleries * 2],
                      ['location'] * 20 + ['same_pid_cam'] * 20, ['identity'] * 40, 5, 300)
    assert pool.W == 4 and pool.grid == 63                       # the case this test is about
    pooled = run_strategy(monkeypatch, 'pool', dist, ir, vis, settings, max_rank=5)
    batch = run_strategy(monkeypatch, 'batch', dist, ir, vis, settings, max_rank=5)
    for s in settings:
        for t, (a, b) in enumerate(zip(pooled[s.key].per_trial, batch[s.key].per_trial)):
            assert_identical(a, b)
            if t % 4 == 0:
                g = galleries[t]
                cmc, m_ap, m_inp, n_valid = reference_evaluate(
                    dist[:, g], ir_p, vis_p[g], ir_c, vis_c[g], s.removal, s.cmc_mode,
                    max_rank=5)
                np.testing.assert_allclose(a.cmc, cmc, atol=1e-12, rtol=0)
                assert abs(a.mAP - m_ap) <= 1e-12 and a.num_valid == n_valid
