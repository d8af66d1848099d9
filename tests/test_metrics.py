"""Cross-modal metrics: golden values (spec §6), properties (§7.2), torchreid parity, errors."""
import warnings

import numpy as np
import pytest
import torch
from spec_oracle import evaluate as reference_evaluate

from torchreid_vi._torchreid import tr
from torchreid_vi.evaluation import CrossModalResult, evaluate_cross_modal, protocol_rules
from torchreid_vi.evaluation.rules import PRESETS as PROTOCOLS

TOL = 1e-6


# ------------------------------------------------------------------------------------------------
# case generators: exactly as in datasets_and_protocols.md §6 (RNG call order preserved)

# pids 26, 27: queries, no gallery
def case_sysu(seed, mode='all', shots=1, n_ids=25, n_absent=2):
    rng = np.random.default_rng(seed); gcams = [1, 2, 4, 5] if mode == 'all' else [1, 2]
    qp, qc, gp, gc = [], [], [], []
    for pid in range(1, n_ids + n_absent + 1):
        for c in (3, 6):
            k = int(rng.integers(1, 4)); qp += [pid] * k; qc += [c] * k
        if pid <= n_ids:
            for c in gcams: gp += [pid] * shots; gc += [c] * shots
    qp, qc, gp, gc = map(np.array, (qp, qc, gp, gc))
    # dist, q_pids, g_pids, q_cams, g_cams
    return rng.random((len(qp), len(gp))), qp, gp, qc, gc


def case_regdb(seed, n_ids=25, per=10):
    rng = np.random.default_rng(seed); qp = np.repeat(np.arange(n_ids), per)
    return rng.random((len(qp), len(qp))), qp, qp.copy()             # dist, q_pids, g_pids


def case_llcm(seed, n_ids=25):
    rng = np.random.default_rng(seed); qp, qc, gp, gc = [], [], [], []
    for pid in range(n_ids):
        for c in rng.choice([1, 2, 4, 5, 6, 7, 8, 9], 3, replace=False):   # IR query cams
            k = int(rng.integers(1, 4)); qp += [pid] * k; qc += [int(c)] * k
        for c in rng.choice(np.arange(1, 10), 4, replace=False):   # VIS gallery cams, 1 shot
            gp += [pid]; gc += [int(c)]
    qp, qc, gp, gc = map(np.array, (qp, qc, gp, gc))
    return rng.random((len(qp), len(gp))), qp, gp, qc, gc


def regdb_inputs(seed):
    dist, qp, gp = case_regdb(seed)
    return dist, qp, gp, np.ones(len(qp), int), np.full(len(gp), 2)   # pseudo-cams q=1, g=2




def assert_same(result, reference, tol=1e-12):
    cmc, m_ap, m_inp, n_valid = reference
    np.testing.assert_allclose(result.cmc, cmc, atol=tol, rtol=0)
    assert abs(result.mAP - m_ap) <= tol and abs(result.mINP - m_inp) <= tol
    assert result.num_valid == n_valid


# ------------------------------------------------------------------------------------------------
# golden values (§6)

GOLDEN = [
    # case, rules, nq, ng, valid, R1, R5, R10, R20, mAP, mINP
    ('sysu', 'sysu', 105, 100, 95, .021053, .189474, .484211, .810526, .084568, .054272),
    ('sysu', 'torchreid', 105, 100, 95, .021053, .189474, .357895, .642105, .080792, .051044),
    ('regdb', 'regdb', 250, 250, 250, .048000, .156000, .336000, .544000, .058721, .044594),
    ('regdb', 'torchreid', 250, 250, 250, .048000, .156000, .336000, .544000, .058721, .044594),
    ('regdb', ('none', 'identity'), 250, 250, 250, .048, .168, .384, .816, .058721, .044594),
    ('llcm', 'llcm', 159, 100, 159, .031447, .163522, .339623, .767296, .075379, .047574),
    ('llcm', 'torchreid', 159, 100, 159, .031447, .163522, .276730, .522013, .075379, .047574),
    ('llcm', ('none', 'identity'), 159, 100, 159, .037736, .201258, .402516, .823899, .080329,
     .051509),
]
CASES = {'sysu': lambda: case_sysu(0, 'all', 1), 'regdb': lambda: regdb_inputs(3),
         'llcm': lambda: case_llcm(4)}


@pytest.mark.parametrize('row', GOLDEN, ids=lambda r: f'{r[0]}-{r[1]}')
def test_golden_values(row):
    name, rules, nq, ng, n_valid, r1, r5, r10, r20, m_ap, m_inp = row
    dist, qp, gp, qc, gc = CASES[name]()
    if isinstance(rules, tuple):
        res = evaluate_cross_modal(dist, qp, gp, qc, gc, removal=rules[0], cmc_mode=rules[1])
    else:
        res = evaluate_cross_modal(dist, qp, gp, qc, gc, rules)
    assert (res.num_query, res.num_gallery, res.num_valid) == (nq, ng, n_valid)
    got = [res.cmc[k - 1] for k in (1, 5, 10, 20)] + [res.mAP, res.mINP]
    np.testing.assert_allclose(got, [r1, r5, r10, r20, m_ap, m_inp], atol=TOL, rtol=0)


@pytest.mark.parametrize('dataset,semantics,name', [
    ('sysu', 'vireid', 'sysu'), ('sysu', 'torchreid', 'torchreid'), ('sysu', 'idkl', 'sysu'),
    ('regdb', 'vireid', 'regdb'), ('regdb', 'torchreid', 'torchreid'), ('llcm', 'vireid', 'llcm'),
    ('llcm', 'torchreid', 'torchreid')])
def test_semantics_table_matches_presets(dataset, semantics, name):
    assert protocol_rules(dataset, semantics) == PROTOCOLS[name]
    assert protocol_rules('regdb', 'idkl') == ('none', 'identity')
    assert protocol_rules('llcm', 'idkl') == ('none', 'identity')
    assert protocol_rules('sysu_mm01') == ('location', 'identity')


def test_torchreid_rule_misses_the_sysu_location_rule():
    """§3.5: query/gallery cams are disjoint, so torchreid's rule removes nothing on SYSU."""
    dist, qp, gp, qc, gc = case_sysu(0, 'all', 1)
    ours = evaluate_cross_modal(dist, qp, gp, qc, gc, 'torchreid')
    assert abs(ours.cmc[9] - .357895) < TOL and abs(ours.mAP - .080792) < TOL
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        cmc_tr, map_tr = tr.metrics.evaluate_rank(dist, qp, gp, qc, gc, max_rank=20,
                                                  use_cython=False)
    assert abs(cmc_tr[9] - .357895) < TOL and abs(map_tr - .080792) < TOL
    sysu = evaluate_cross_modal(dist, qp, gp, qc, gc, 'sysu')
    assert abs(sysu.cmc[9] - .484211) < TOL and abs(sysu.mAP - .084568) < TOL


@pytest.mark.parametrize('seed', range(6))
def test_agrees_with_torchreid_evaluate_rank(seed):
    rng = np.random.default_rng(100 + seed)
    nq, ng = int(rng.integers(20, 80)), int(rng.integers(30, 120))
    qp, gp = rng.integers(0, 25, nq), rng.integers(0, 25, ng)
    qc, gc = rng.integers(1, 4, nq), rng.integers(1, 4, ng)
    gp[:25] = np.arange(25)                                  # every query pid has a gallery item
    dist = rng.random((nq, ng)).astype(np.float32 if seed % 2 else np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        cmc_tr, map_tr = tr.metrics.evaluate_rank(dist, qp, gp, qc, gc, max_rank=20,
                                                  use_cython=False)
    ours = evaluate_cross_modal(dist, qp, gp, qc, gc, 'torchreid', max_rank=20)
    assert abs(ours.cmc[0] - cmc_tr[0]) < TOL and abs(ours.mAP - map_tr) < TOL
    np.testing.assert_allclose(ours.cmc, cmc_tr, atol=TOL)


# ------------------------------------------------------------------------------------------------
# the vectorised path equals the reference definition, including exact ties

def random_case(rng, ties):
    nq, ng = int(rng.integers(1, 40)), int(rng.integers(1, 60))
    if ties:
        dtype = rng.choice([np.float32, np.float64])
        dist = rng.integers(0, int(rng.integers(1, 6)), (nq, ng)).astype(dtype)
    else:
        dist = rng.random((nq, ng))
    return (dist, rng.integers(0, 6, nq), rng.integers(0, 6, ng), rng.integers(1, 7, nq),
            rng.integers(1, 7, ng))


@pytest.mark.filterwarnings('ignore')   # tiny random galleries: saturating CMC, empty references
@pytest.mark.parametrize('ties', [False, True], ids=['distinct', 'ties'])
def test_matches_reference_definition(ties):
    rng = np.random.default_rng(7 + ties)
    checked = 0
    for _ in range(60):
        dist, qp, gp, qc, gc = random_case(rng, ties)
        for removal in ('location', 'same_pid_cam', 'none'):
            for mode in ('identity', 'image'):
                try:
                    ref = reference_evaluate(dist, qp, gp, qc, gc, removal, mode, max_rank=10)
                except ValueError:                                 # no valid query
                    continue
                res = evaluate_cross_modal(dist, qp, gp, qc, gc, removal=removal, cmc_mode=mode,
                                           max_rank=10, chunk_size=7)
                assert_same(res, ref)
                checked += 1
    assert checked > 200


def test_index_arguments_equal_slicing_and_threads_do_not_matter():
    rng = np.random.default_rng(11)
    big = rng.random((300, 400)).astype(np.float32)
    q_idx = rng.permutation(300)[:250]
    g_idx = rng.permutation(400)[:330]
    qp, gp = rng.integers(0, 30, 250), rng.integers(0, 30, 330)
    qc, gc = rng.choice([3, 6], 250), rng.choice([1, 2, 4, 5], 330)
    sliced = evaluate_cross_modal(big[np.ix_(q_idx, g_idx)], qp, gp, qc, gc, 'sysu',
                                  num_threads=1)
    indexed = evaluate_cross_modal(big, qp, gp, qc, gc, 'sysu', query_index=q_idx,
                                   gallery_index=g_idx, num_threads=3, chunk_size=40)
    assert np.array_equal(sliced.cmc, indexed.cmc)
    assert sliced.mAP == indexed.mAP and sliced.mINP == indexed.mINP


# ------------------------------------------------------------------------------------------------
# property tests (§7.2 items 1-4, 8, 9, 10)

@pytest.mark.parametrize('removal', ['location', 'same_pid_cam', 'none'])
def test_identity_and_image_cmc_share_rank1_map_minp(removal):           # 7.2.1
    for seed in range(3):
        dist, qp, gp, qc, gc = case_sysu(seed, 'all', 3)
        ident = evaluate_cross_modal(dist, qp, gp, qc, gc, removal=removal, cmc_mode='identity')
        image = evaluate_cross_modal(dist, qp, gp, qc, gc, removal=removal, cmc_mode='image')
        assert ident.cmc[0] == image.cmc[0]
        assert ident.mAP == image.mAP and ident.mINP == image.mINP
        assert np.all(ident.cmc >= image.cmc)                          # 7.2.8 CMC_id >= CMC_img
        assert (ident.cmc > image.cmc).any()                           # and not trivially equal


def test_cam6_only_location_equals_same_pid_cam():                        # 7.2.2
    dist, qp, gp, qc, gc = case_sysu(1, 'all', 2)
    keep = qc == 6
    args = (dist[keep], qp[keep], gp, qc[keep], gc)
    loc = evaluate_cross_modal(*args, removal='location', cmc_mode='identity')
    spc = evaluate_cross_modal(*args, removal='same_pid_cam', cmc_mode='identity')
    assert np.array_equal(loc.cmc, spc.cmc) and loc.mAP == spc.mAP and loc.mINP == spc.mINP


@pytest.mark.parametrize('protocol', ['sysu', 'regdb', 'llcm', 'torchreid'])
def test_gallery_permutation_invariance(protocol):                        # 7.2.3
    dist, qp, gp, qc, gc = case_sysu(2, 'all', 3)
    perm = np.random.default_rng(0).permutation(len(gp))
    a = evaluate_cross_modal(dist, qp, gp, qc, gc, protocol)
    b = evaluate_cross_modal(dist[:, perm], qp, gp[perm], qc, gc[perm], protocol)
    np.testing.assert_allclose(a.cmc, b.cmc, atol=1e-12)
    assert abs(a.mAP - b.mAP) < 1e-12 and abs(a.mINP - b.mINP) < 1e-12


def test_query_without_gallery_match_only_changes_counts():              # 7.2.4
    dist, qp, gp, qc, gc = case_llcm(5)
    base = evaluate_cross_modal(dist, qp, gp, qc, gc, 'llcm')
    extra = np.random.default_rng(1).random((1, dist.shape[1]))
    more = evaluate_cross_modal(np.vstack([dist, extra]), np.r_[qp, 999], gp, np.r_[qc, 1], gc,
                                'llcm')
    assert np.array_equal(base.cmc, more.cmc) and base.mAP == more.mAP
    assert base.mINP == more.mINP and more.num_valid == base.num_valid
    assert more.num_query == base.num_query + 1 and more.num_invalid == base.num_invalid + 1


def test_cmc_shape_monotonic_and_ragged_crash_case():                    # 7.2.8
    # gallery ids 1..4; cam-3 queries lose every cam-2 item (ids 3, 4 live only in cam 2), so
    # queries see 2 or 4 distinct ids: AGW's per-query truncation crashes here (Q5)
    gp = np.array([1, 1, 2, 2, 3, 4])
    gc = np.array([1, 4, 1, 5, 2, 2])
    qp = np.array([1, 2, 1, 3])
    qc = np.array([3, 3, 6, 6])
    dist = np.array([[.9, .8, .1, .2, .0, .0],
                     [.1, .2, .9, .8, .0, .0],
                     [.5, .6, .1, .2, .3, .4],
                     [.5, .6, .1, .2, .7, .0]])
    with pytest.warns(UserWarning, match='exceeds the 4 distinct gallery ids'):
        res = evaluate_cross_modal(dist, qp, gp, qc, gc, 'sysu', max_rank=20)
    assert res.cmc.shape == (20,) and res.cmc.dtype == np.float64
    # identity ranks: q0 -> 2, q1 -> 2, q2 -> 4 (ids 2, 3, 4 closer), q3 -> 4
    np.testing.assert_allclose(res.cmc[:5], [0, .5, .5, 1, 1])
    assert np.all(res.cmc[3:] == 1.0)                                  # carried forward
    assert np.all(np.diff(res.cmc) >= 0) and res.cmc.max() <= 1
    assert_same(res, reference_evaluate(dist, qp, gp, qc, gc, 'location', 'identity'))
    with pytest.raises(ValueError, match='rank 25'):
        res.as_dict(ranks=(1, 25))


def test_all_equal_distances_rank_in_gallery_order():                    # 7.2.9
    dist, qp, gp, qc, gc = case_sysu(3, 'all', 2)
    flat = np.zeros_like(dist)
    in_order = np.broadcast_to(np.arange(dist.shape[1], dtype=float), dist.shape)
    for protocol in ('sysu', 'llcm', 'regdb', 'torchreid'):
        a = evaluate_cross_modal(flat, qp, gp, qc, gc, protocol)
        b = evaluate_cross_modal(in_order, qp, gp, qc, gc, protocol)
        assert np.array_equal(a.cmc, b.cmc) and a.mAP == b.mAP and a.mINP == b.mINP
        c = evaluate_cross_modal(flat, qp, gp, qc, gc, protocol)
        assert np.array_equal(a.cmc, c.cmc) and a.mAP == c.mAP          # deterministic


def test_float64_is_never_downcast():
    # these distances collapse to ties in float32; float64 keeps the true order
    gp, gc = np.array([1, 2]), np.array([1, 1])
    dist = np.array([[1.0 + 1e-12, 1.0]])                               # wrong id is closer
    res = evaluate_cross_modal(dist, [1], gp, [3], gc, 'regdb', max_rank=2)
    assert res.cmc[0] == 0.0 and res.mAP == 0.5


def test_inputs_are_not_mutated():                                       # 7.2.10 (no mutation)
    dist, qp, gp, qc, gc = case_sysu(4, 'indoor', 2)
    dist[0, :3] = dist[0, 0]                                           # exercise the tie path
    arrays = [dist, qp, gp, qc, gc]
    copies = [a.copy() for a in arrays]
    evaluate_cross_modal(*arrays, 'sysu')
    evaluate_cross_modal(*arrays, 'llcm')
    assert all(np.array_equal(a, c) for a, c in zip(arrays, copies))
    tensors = [torch.from_numpy(a.copy()) for a in arrays]
    res_t = evaluate_cross_modal(*tensors, 'sysu')
    assert all(np.array_equal(t.numpy(), c) for t, c in zip(tensors, copies))
    res_n = evaluate_cross_modal(*arrays, 'sysu')
    assert np.array_equal(res_t.cmc, res_n.cmc) and res_t.mAP == res_n.mAP


# ------------------------------------------------------------------------------------------------
# result object and errors

def test_result_as_dict_and_frozen():
    dist, qp, gp, qc, gc = case_llcm(4)
    res = evaluate_cross_modal(dist, qp, gp, qc, gc, 'llcm')
    assert isinstance(res, CrossModalResult)
    d = res.as_dict()
    assert set(d) >= {'rank1', 'rank5', 'rank10', 'rank20', 'mAP', 'mINP', 'num_valid',
                      'num_query', 'num_gallery', 'cmc'}
    assert d['rank10'] == res.cmc[9] and len(d['cmc']) == 20
    with pytest.raises(Exception):
        res.mAP = 1.0
    with pytest.raises(ValueError):
        res.cmc[0] = 1.0


def test_no_valid_query_names_protocol_and_counts():
    dist, qp, gp, qc, gc = case_llcm(4)
    with pytest.raises(ValueError, match=r"protocol 'llcm'.*0 of 159 queries.*100 gallery"):
        evaluate_cross_modal(dist, qp + 1000, gp, qc, gc, 'llcm')


@pytest.mark.parametrize('kwargs,match', [
    (dict(q_pids=np.arange(3)), r'q_pids must have shape \(num_query,\) = \(4,\)'),
    (dict(g_camids=np.ones(7)), r'g_camids must have shape \(num_gallery,\) = \(5,\)'),
    (dict(distmat=np.zeros(5)), r'distmat must have shape \(num_query, num_gallery\)'),
    (dict(protocol='market'), r"unknown protocol 'market'"),
    (dict(protocol=None), r'give protocol='),
    (dict(removal='cam'), r"unknown removal 'cam'"),
    (dict(max_rank=0), r'max_rank must be a positive int'),
    (dict(gallery_index=np.array([0, 9])), r'gallery_index indexes columns'),
])
def test_clear_errors(kwargs, match):
    args = dict(distmat=np.random.default_rng(0).random((4, 5)), q_pids=np.arange(4),
                g_pids=np.arange(5), q_camids=np.ones(4), g_camids=np.ones(5), protocol='regdb')
    args.update(kwargs)
    if 'gallery_index' in kwargs:
        args['g_pids'], args['g_camids'] = np.arange(2), np.ones(2)
    with pytest.raises((ValueError, IndexError), match=match):
        evaluate_cross_modal(**args)


def test_nan_distance_is_rejected_with_its_row():
    dist, qp, gp, qc, gc = case_regdb(3)[0], *regdb_inputs(3)[1:]
    dist = dist.copy()
    dist[7, 3] = np.nan
    with pytest.raises(ValueError, match='NaN.*query 7'):
        evaluate_cross_modal(dist, qp, gp, qc, gc, 'regdb')


def test_memory_layout_does_not_matter():
    dist, qp, gp, qc, gc = case_llcm(6)
    ref = evaluate_cross_modal(dist, qp, gp, qc, gc, 'llcm')
    fortran = np.asfortranarray(dist)
    readonly = np.asfortranarray(dist)
    readonly.setflags(write=False)
    strided = np.repeat(dist, 2, axis=1)[:, ::2]                      # rows not contiguous
    readonly_rows = dist.copy()                                     # rows read in place
    readonly_rows.setflags(write=False)
    for layout in (fortran, readonly, strided, readonly_rows,
                   torch.from_numpy(dist.T.copy()).t()):
        res = evaluate_cross_modal(layout, qp, gp, qc, gc, 'llcm')
        assert np.array_equal(res.cmc, ref.cmc) and res.mAP == ref.mAP
    assert np.array_equal(fortran, dist)
