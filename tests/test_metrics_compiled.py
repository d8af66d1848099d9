"""The compiled evaluation kernel (numba): the §3.1 definitions, to the bit of the numpy engines.

The kernel bins each row's items between the query's true matches instead of sorting, packs
trial counters in bytes that widen before they overflow, and evaluates up to 64 trials of any
rules at once. Each of those has its own failure mode, so each has a case here; expectations come
from the independent §3.4 oracle (``spec_oracle``) and from the numpy batch engine.
"""
import warnings

import numpy as np
import pytest
from spec_oracle import evaluate as reference_evaluate
from test_metrics_engines import (
    RULES,
    assert_identical,
    check_engine,
    pooled_case,
    records,
    rule_settings,
    run_strategy,
)

import torchreid_vi.evaluation.metrics as rank
import torchreid_vi.evaluation.report as report
from torchreid_vi.evaluation import EvalSetting, evaluate_cross_modal, evaluate_settings

compiled = pytest.importorskip('torchreid_vi.evaluation.compiled')
if not compiled.available():  # pragma: no cover - numba is a dependency where it installs
    pytest.skip(f'compiled kernel unavailable: {compiled.unavailable_reason()}',
                allow_module_level=True)


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('signed', [False, True], ids=['distances', 'signed-zeros'])
def test_compiled_equals_oracle_and_batches_with_ties(monkeypatch, dtype, signed):
    """Distances rounded to one decimal: most items tie exactly with a true match, so the
    bucket comparisons and the column tie rule decide; 24 trials of 6 rules share one pool
    (location, same_pid_cam and none; identity and image CMC)."""
    rng = np.random.default_rng(21 + signed)
    for _ in range(3):
        dist, ir_p, ir_c, vis_p, vis_c, galleries = pooled_case(rng, signed=signed)
        check_engine(monkeypatch, 'compiled', dist.astype(dtype), ir_p, ir_c, vis_p, vis_c,
                     galleries, max_rank=10)


def test_infinite_distances_rank_last_and_first(monkeypatch):
    """+inf and -inf among the distances and among the true matches (the bucket range is then
    unbounded): still the oracle's ranking."""
    rng = np.random.default_rng(5)
    dist, ir_p, ir_c, vis_p, vis_c, galleries = pooled_case(rng)
    dist = dist.astype(np.float64)
    dist[rng.random(dist.shape) < 0.1] = np.inf
    dist[rng.random(dist.shape) < 0.05] = -np.inf
    dist[3] = np.inf                                        # a row of exact ties
    check_engine(monkeypatch, 'compiled', dist, ir_p, ir_c, vis_p, vis_c, galleries,
                 max_rank=10)


def test_float_ids_and_cameras_keep_their_exact_values(monkeypatch):
    """Float pids/cameras are accepted: integral ones run on the kernel, and query cameras
    3.5 and 1.5 are neither camera 3 (location rule) nor gallery camera 1 (same_pid_cam), as in
    the numpy engines."""
    rng = np.random.default_rng(6)
    dist, ir_p, ir_c, vis_p, vis_c, galleries = pooled_case(rng)
    ir_c = ir_c.astype(np.float64)
    ir_c[::5], ir_c[1::5] = 3.5, 1.5
    g = galleries[0]
    args = (dist, ir_p.astype(np.float64), vis_p[g].astype(np.float64), ir_c,
            vis_c[g].astype(np.float64))
    for removal, cmc_mode in RULES:
        got = {}
        for strategy in ('compiled', 'batch'):
            monkeypatch.setattr(rank, '_STRATEGY', strategy)
            got[strategy] = evaluate_cross_modal(*args, removal=removal, cmc_mode=cmc_mode,
                                                 max_rank=5, gallery_index=g)
        assert_identical(got['compiled'], got['batch'])
        cmc, m_ap, _, n_valid = reference_evaluate(dist[:, g], *args[1:], removal, cmc_mode,
                                                   max_rank=5)
        np.testing.assert_allclose(got['compiled'].cmc, cmc, atol=1e-12, rtol=0)
        assert abs(got['compiled'].mAP - m_ap) <= 1e-12 and got['compiled'].num_valid == n_valid


def test_byte_counters_widen_before_they_overflow(monkeypatch):
    """Queries whose true matches are all far: 1,000+ items of one trial land in the bin before
    the first match, so its byte counters widen several times (255 items each)."""
    rng = np.random.default_rng(7)
    n_vis, n_ir = 1600, 12
    vis_p, vis_c = rng.integers(0, 4, n_vis), rng.choice([1, 2, 4, 5], n_vis)
    ir_p, ir_c = rng.integers(0, 4, n_ir), rng.choice([1, 3, 6], n_ir)
    dist = rng.random((n_ir, n_vis)).astype(np.float32)
    own = ir_p[:, None] == vis_p[None, :]
    dist[own] += 2.0                                        # every true match after the others
    dist[:4][own[:4]] -= 2.5                                # ... except for 4 queries
    galleries = [np.arange(n_vis), np.sort(rng.choice(n_vis, 1200, replace=False)),
                 np.sort(rng.choice(n_vis, 300, replace=False))]
    assert (~own[0][galleries[0]]).sum() > 4 * 255
    check_engine(monkeypatch, 'compiled', dist, ir_p, ir_c, vis_p, vis_c, galleries,
                 max_rank=20)


def test_more_trials_than_one_pool_holds(monkeypatch):
    """70 trials > 64 trial bits: two compiled pools, each = the batch engine."""
    rng = np.random.default_rng(70)
    dist, ir_p, ir_c, vis_p, vis_c, _ = pooled_case(rng, n_ir=30, n_vis=200)
    galleries = [np.sort(rng.choice(200, int(rng.integers(20, 200)), replace=False))
                 for _ in range(70)]
    ir, vis = records(ir_p, ir_c, 'ir'), records(vis_p, vis_c, 'vis')
    s = [EvalSetting('x', 'ir2vis', tuple((np.arange(30), g) for g in galleries), 'location',
                     'identity', 'x')]
    made = []
    original = compiled.PoolTables.__init__

    def spy(self, galleries, *args):
        made.append(len(galleries))
        original(self, galleries, *args)

    monkeypatch.setattr(compiled.PoolTables, '__init__', spy)
    got = run_strategy(monkeypatch, 'compiled', dist, ir, vis, s, max_rank=8)
    assert made == [64, 6]
    want = run_strategy(monkeypatch, 'batch', dist, ir, vis, s, max_rank=8)
    for a, b in zip(got['x'].per_trial, want['x'].per_trial):
        assert_identical(a, b)


def test_auto_runs_the_compiled_kernel_on_a_protocol_report(monkeypatch):
    """The dispatcher sends every ascending gallery to the kernel (the speed of a report rests on
    it), and the threads a report runs on do not change a number."""
    rng = np.random.default_rng(3)
    dist, ir_p, ir_c, vis_p, vis_c, galleries = pooled_case(rng, n_ir=400, n_vis=3000,
                                                            n_ids=40)
    ir, vis = records(ir_p, ir_c, 'ir'), records(vis_p, vis_c, 'vis')
    settings = rule_settings(galleries, len(ir))
    engines = []
    original = compiled.CompiledEngine.__init__

    def spy(self, tables, *args):
        engines.append(tables.T)
        original(self, tables, *args)

    monkeypatch.setattr(compiled.CompiledEngine, '__init__', spy)
    monkeypatch.setattr(report, '_default_threads', lambda: 1)
    one = evaluate_settings(dist, ir, vis, settings)
    monkeypatch.setattr(report, '_default_threads', lambda: 2)
    two = evaluate_settings(dist, ir, vis, settings)
    assert engines == [len(settings) * len(galleries)] * 2
    for key in one:
        for a, b in zip(one[key].per_trial, two[key].per_trial):
            assert_identical(a, b)


def test_unsorted_gallery_index_falls_back_with_its_own_tie_order():
    """A gallery_index out of column order ranks exact ties by its own order: not the kernel's
    column order, so the numpy engines take it; the oracle on the gathered matrix agrees."""
    rng = np.random.default_rng(11)
    dist, ir_p, ir_c, vis_p, vis_c, _ = pooled_case(rng)
    g = rng.permutation(len(vis_p))[:70]
    res = evaluate_cross_modal(dist, ir_p, vis_p[g], ir_c, vis_c[g], 'sysu', max_rank=10,
                               gallery_index=g)
    cmc, m_ap, m_inp, n_valid = reference_evaluate(dist[:, g], ir_p, vis_p[g], ir_c, vis_c[g],
                                                   'location', 'identity', max_rank=10)
    np.testing.assert_allclose(res.cmc, cmc, atol=1e-12, rtol=0)
    assert abs(res.mAP - m_ap) <= 1e-12 and res.num_valid == n_valid


@pytest.mark.parametrize('row_has_match', [True, False], ids=['valid-query', 'invalid-query'])
def test_nan_is_rejected_where_any_engine_would_see_it(monkeypatch, row_has_match):
    """NaN in a gallery column of a query's row: ValueError naming the query, whether or not
    the query has a true match; NaN in a column that no gallery uses is never read."""
    rng = np.random.default_rng(4)
    dist, ir_p, ir_c, vis_p, vis_c, galleries = pooled_case(rng)
    q = int(np.flatnonzero(np.isin(ir_p, vis_p) == row_has_match)[0])
    ir, vis = records(ir_p, ir_c, 'ir'), records(vis_p, vis_c, 'vis')
    s = [EvalSetting('x', 'ir2vis', tuple((np.arange(len(ir)), g) for g in galleries), 'none',
                     'image', 'x')]
    bad = dist.copy()
    bad[q, galleries[0][3]] = np.nan
    for strategy in ('compiled', 'batch'):
        with pytest.raises(ValueError, match=rf"setting 'x' trial 0: .*NaN.*query {q}\b"):
            run_strategy(monkeypatch, strategy, bad, ir, vis, s)
    unused = np.setdiff1d(np.arange(len(vis_p)), np.concatenate(galleries))
    if len(unused):
        ok = dist.copy()
        ok[q, unused[0]] = np.nan
        a = run_strategy(monkeypatch, 'compiled', ok, ir, vis, s)
        b = run_strategy(monkeypatch, 'batch', dist, ir, vis, s)
        assert_identical(a['x'].per_trial[0], b['x'].per_trial[0])


def test_without_numba_the_numpy_engines_give_the_same_numbers(monkeypatch):
    """No numba (or NUMBA_DISABLE_JIT): the same numbers from the numpy engines; a numba that
    is installed but fails to import, or to compile the kernel, says so once, in a warning."""
    rng = np.random.default_rng(9)
    dist, ir_p, ir_c, vis_p, vis_c, galleries = pooled_case(rng)
    ir, vis = records(ir_p, ir_c, 'ir'), records(vis_p, vis_c, 'vis')
    settings = rule_settings(galleries, len(ir))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        fast = evaluate_settings(dist, ir, vis, settings, max_rank=5)
    numba_module = compiled.numba
    monkeypatch.setattr(compiled, 'numba', None)
    monkeypatch.setattr(compiled, '_IMPORT_ERROR', ImportError('Numba needs NumPy 2.3 or less'))
    monkeypatch.setattr(rank, '_COMPILED', [])
    monkeypatch.setattr(compiled.CompiledEngine, '__init__', None)     # must not be used
    with pytest.warns(UserWarning, match='compiled evaluator is unavailable: numba failed to '
                                         'import.*NumPy 2.3'):
        slow = evaluate_settings(dist, ir, vis, settings, max_rank=5)
    for key in fast:
        for a, b in zip(fast[key].per_trial, slow[key].per_trial):
            assert_identical(a, b)
    monkeypatch.setattr(compiled, 'numba', numba_module)               # imports, cannot compile

    def broken():
        raise OSError('LLVM ERROR: cannot select')

    monkeypatch.setattr(compiled, 'warm_up', broken)
    monkeypatch.setattr(rank, '_COMPILED', [])
    with pytest.warns(UserWarning, match='numba failed to compile it .OSError: LLVM ERROR'):
        slow = evaluate_settings(dist, ir, vis, settings, max_rank=5)
    for key in fast:
        for a, b in zip(fast[key].per_trial, slow[key].per_trial):
            assert_identical(a, b)
    missing = ModuleNotFoundError("No module named 'numba'", name='numba')
    monkeypatch.setattr(compiled, 'numba', None)
    monkeypatch.setattr(compiled, '_IMPORT_ERROR', missing)
    assert compiled.unavailable_reason() == 'numba is not installed'


def test_pairwise_sum_is_numpys():
    """AP sums: the kernel's pairwise sum equals np.add.reduceat's to the bit, at every length
    (blocks of 8, the 128-item blocks and the halving above them)."""
    rng = np.random.default_rng(1)
    for n in list(range(1, 300)) + [513, 1000, 1025, 4097]:
        a = rng.random(n) / rng.integers(1, 50, n)
        assert np.add.reduceat(a, [0])[0] == a[0] + compiled._pairwise_sum(a, 1, n - 1), n


def test_warm_up_readies_both_dtypes_or_says_why_not(monkeypatch):
    """``make install`` runs warm_up: it leaves machine code for float32 and float64 (a second
    call only loads it), and without numba it raises with the reason instead of pretending."""
    assert compiled.warm_up() >= 0.0
    assert {sig[0].dtype.name for sig in compiled._kernel.signatures} >= {'float32', 'float64'}
    monkeypatch.setattr(compiled, 'numba', None)
    monkeypatch.setattr(compiled, '_IMPORT_ERROR',
                        ModuleNotFoundError("No module named 'numba'", name='numba'))
    with pytest.raises(RuntimeError, match='unavailable: numba is not installed'):
        compiled.warm_up()
