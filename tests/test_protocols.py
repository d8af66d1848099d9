"""Evaluation settings and the multi-trial report (spec §2, §1.6 counts, §7.2 items 5-7, 10, 11).

The SYSU tests run the samplers on the REAL official permutation file (96 test ids, real cell
sizes) from $TORCHREID_VI_SYSU_EXP (default ../shared/data/sysu_mm01_exp beside the repository);
skipped without it.
"""
import json
import os
import random
from collections import Counter

import numpy as np
import pytest
import scipy.io

from torchreid_vi.evaluation import (
    EvalSetting,
    agw_seed_gallery,
    evaluate_cross_modal,
    evaluate_settings,
    format_table,
    generic_settings,
    llcm_settings,
    read_sysu_perm,
    regdb_settings,
    sysu_gallery_official_perm,
    sysu_settings,
)

# The official split files ship in shared/ beside the repository checkout (as CI lays it out).
SPLIT_DIR = os.environ.get('TORCHREID_VI_SYSU_EXP', os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    'shared', 'data', 'sysu_mm01_exp'))
PERM = os.path.join(SPLIT_DIR, 'rand_perm_cam.mat')
TEST_IDS = os.path.join(SPLIT_DIR, 'test_id.mat')
needs_real = pytest.mark.skipif(not os.path.isfile(PERM) or not os.path.isfile(TEST_IDS),
                                reason='official SYSU-MM01 split files not available')


def sysu_record(cam, pid, k):
    modality = 1 if cam in (3, 6) else 0
    return (f'/data/SYSU-MM01/cam{cam}/{pid:04d}/{k:04d}.jpg', pid, cam, modality)


def records_from_sizes(sizes, cams):
    """Records sorted by (pid, cam, file name) for cells {(cam, pid): n}."""
    return [sysu_record(c, p, k) for (c, p) in sorted(sizes, key=lambda x: (x[1], x[0]))
            if c in cams for k in range(1, sizes[(c, p)] + 1)]


@pytest.fixture(scope='module')
def real():
    """The real test ids, cell sizes, and the query/gallery records they imply."""
    test_ids = scipy.io.loadmat(TEST_IDS)['id'].ravel().astype(int)
    perm = read_sysu_perm(PERM)
    ids = set(test_ids.tolist())
    sizes = {k: e.shape[1] for k, e in perm.items() if k[1] in ids}
    return dict(test_ids=test_ids, perm=perm, sizes=sizes,
                query=records_from_sizes(sizes, (3, 6)),
                gallery=records_from_sizes(sizes, (1, 2, 4, 5)))


@pytest.fixture(scope='module')
def real_settings(real):
    return sysu_settings(real['query'], real['gallery'], gallery_sampler='official_perm',
                         perm_file=PERM)


# ------------------------------------------------------------------------------------------------
# the real permutation file (§1.1, §1.6)

@needs_real
def test_real_perm_file_structure(real):
    raw = scipy.io.loadmat(PERM)['rand_perm_cam']
    assert raw.shape == (6, 1)
    assert [raw[c, 0].shape[0] for c in range(6)] == [333, 333, 533, 533, 533, 333]
    perm = real['perm']
    assert perm.num_trials == 10 and perm.source == PERM
    assert max(e.shape[1] for e in perm.values()) == 88
    e = perm[(1, 6)]
    assert e.shape[0] == 10 and np.array_equal(np.sort(e[3]), np.arange(1, e.shape[1] + 1))
    ids = real['test_ids']
    assert len(ids) == 96 and list(ids[:10]) == [6, 10, 17, 21, 24, 25, 27, 28, 31, 34]
    assert list(ids[-5:]) == [312, 315, 318, 331, 333]


@needs_real
def test_real_cell_counts_match_count_table(real):
    per_cam = Counter(r[2] for r in real['query'] + real['gallery'])
    assert per_cam == {1: 1374, 2: 1565, 3: 1883, 4: 1918, 5: 1918, 6: 1920}
    assert len(real['query']) == 3803 and len(real['gallery']) == 6775


@needs_real
def test_official_perm_gallery_sizes(real, real_settings):
    expected = {'sysu_mm01/all/single/official_perm': 301,
                'sysu_mm01/all/multi/official_perm': 3010,
                'sysu_mm01/indoor/single/official_perm': 112,
                'sysu_mm01/indoor/multi/official_perm': 1120}
    assert {s.key: len(s.trials[0][1]) for s in real_settings} == expected
    for s in real_settings:
        assert s.num_trials == 10 and s.direction == 'ir2vis' and s.sampler == 'official_perm'
        assert (s.removal, s.cmc_mode, s.semantics) == ('location', 'identity', 'vireid')
        assert all(len(g) == expected[s.key] and len(q) == 3803 for q, g in s.trials)


@needs_real
def test_gallery_cells_shots_subset_and_cams(real, real_settings):       # 7.2.5
    gallery = real['gallery']
    test_ids = set(real['test_ids'].tolist())
    for s in real_settings:
        shots = 1 if '/single/' in s.key else 10
        cams = {1, 2} if '/indoor/' in s.key else {1, 2, 4, 5}
        for _, g in s.trials:
            assert len(np.unique(g)) == len(g) and np.all(np.diff(g) > 0)   # ascending, no dup
            cells = Counter((gallery[i][2], gallery[i][1]) for i in g)
            assert {c for c, _ in cells} <= cams and {p for _, p in cells} <= test_ids
            assert cells == {k: min(shots, n) for k, n in real['sizes'].items() if k[0] in cams}


@needs_real
@pytest.mark.parametrize('trial', [0, 7])
def test_official_perm_rederived_from_mat(real, real_settings, trial):   # 7.2.6
    raw = scipy.io.loadmat(PERM)['rand_perm_cam']
    for s in real_settings:
        shots = 1 if '/single/' in s.key else 10
        cams = (1, 2) if '/indoor/' in s.key else (1, 2, 4, 5)
        expected = set()
        for pid in real['test_ids']:
            for cam in cams:
                cell = raw[cam - 1, 0]
                if pid > cell.shape[0] or cell[pid - 1, 0].shape[1] == 0:
                    continue
                expected |= {f'cam{cam}/{pid:04d}/{int(k):04d}.jpg'
                             for k in cell[pid - 1, 0][trial, :shots]}
        picked = {'/'.join(real['gallery'][i][0].split('/')[-3:]) for i in s.trials[trial][1]}
        assert picked == expected


@needs_real
def test_indoor_valid_queries(real, real_settings):
    rng = np.random.default_rng(0)
    dist = rng.random((len(real['query']), len(real['gallery'])), dtype=np.float32)
    wanted = [s for s in real_settings if '/single/' in s.key]
    for s in wanted:
        s1 = EvalSetting(s.key, s.direction, s.trials[:2], s.removal, s.cmc_mode, s.sampler)
        res = evaluate_settings(dist, real['query'], real['gallery'], [s1])[s.key]
        assert res.num_query == [3803, 3803]
        assert res.num_valid == ([2208, 2208] if '/indoor/' in s.key else [3803, 3803])


@needs_real
def test_perm_not_matching_data_is_an_error(real):
    short = [r for r in real['gallery'] if not (r[1] == 6 and r[2] == 1)]
    with pytest.raises(ValueError, match=r'rand_perm_cam.mat trial 0 selects cam1/0006/'):
        sysu_gallery_official_perm(short, real['perm'], 0, (1, 2), 1, real['test_ids'])


# ------------------------------------------------------------------------------------------------
# a small synthetic SYSU tree (always runs)

def synthetic_sysu(seed=0):
    rng = np.random.default_rng(seed)
    sizes = {}
    for pid in (3, 5, 8, 9, 12, 14):
        for cam in range(1, 7):
            if cam in (1, 2, 3, 6) or rng.random() < 0.7:
                sizes[(cam, pid)] = int(rng.integers(4, 15))
    sizes[(4, 5)] = 7
    return sizes


def write_perm(path, sizes, seed=0, n_trials=10):
    rng = np.random.default_rng(seed)
    outer = np.empty((6, 1), object)
    for cam in range(1, 7):
        n_c = max([p for c, p in sizes if c == cam] + [1])
        inner = np.empty((n_c, 1), object)
        for p in range(1, n_c + 1):
            n = sizes.get((cam, p), 0)
            inner[p - 1, 0] = (np.stack([rng.permutation(n) + 1 for _ in range(n_trials)])
                               .astype(np.uint8) if n else np.zeros((n_trials, 0), np.uint8))
        outer[cam - 1, 0] = inner
    scipy.io.savemat(path, {'rand_perm_cam': outer})
    return path


def test_agw_seed_reproduces_reference_and_keeps_global_random():      # 7.2.7
    sizes = synthetic_sysu()
    gallery = records_from_sizes(sizes, (1, 2, 4, 5))
    pids = sorted({p for _, p in sizes})
    state = random.getstate()
    picks = {t: agw_seed_gallery(gallery, t, pids, (1, 2, 4, 5)) for t in range(10)}
    assert random.getstate() == state
    assert np.array_equal(picks[3], agw_seed_gallery(gallery, 3, pids, (1, 2, 4, 5)))
    assert not np.array_equal(picks[0], picks[1])
    # the reference: global random.seed(t), one choice per existing folder, pids then cams
    names = {}
    for i, r in enumerate(gallery):
        names.setdefault((r[1], r[2]), []).append(os.path.basename(r[0]))
    try:
        for t in (0, 4):
            random.seed(t)
            ref = []
            for pid in pids:
                for cam in (1, 2, 4, 5):
                    if (pid, cam) in names:
                        name = random.choice(sorted(names[(pid, cam)]))
                        ref.append(f'cam{cam}/{pid:04d}/{name}')
            got = ['/'.join(gallery[i][0].split('/')[-3:]) for i in picks[t]]
            assert sorted(got) == sorted(ref)
    finally:
        random.setstate(state)


def test_sysu_auto_sampler_falls_back_and_says_so(tmp_path, capsys):
    sizes = synthetic_sysu()
    query, gallery = records_from_sizes(sizes, (3, 6)), records_from_sizes(sizes, (1, 2, 4, 5))
    settings = sysu_settings(query, gallery, root=tmp_path, num_trials=3)
    out = capsys.readouterr().out
    assert 'agw_seed' in out and 'multi-shot settings skipped' in out
    assert [s.key for s in settings] == ['sysu_mm01/all/single/agw_seed',
                                         'sysu_mm01/indoor/single/agw_seed']
    with pytest.raises(FileNotFoundError, match=r'wuancong/SYSU-MM01.*rand_perm_cam'):
        sysu_settings(query, gallery, root=tmp_path, gallery_sampler='official_perm')
    with pytest.raises(FileNotFoundError, match=str(tmp_path / 'exp' / 'rand_perm_cam.mat')):
        sysu_settings(query, gallery, root=tmp_path, gallery_sampler='official_perm')
    with pytest.raises(ValueError, match='single-shot only'):
        sysu_settings(query, gallery, gallery_sampler='agw_seed', shots=(10,))


def test_sysu_perm_lookup_short_cells_and_semantics(tmp_path, capsys):
    sizes = synthetic_sysu()
    (tmp_path / 'exp').mkdir()
    write_perm(tmp_path / 'exp' / 'rand_perm_cam.mat', sizes)
    query, gallery = records_from_sizes(sizes, (3, 6)), records_from_sizes(sizes, (1, 2, 4, 5))
    with pytest.warns(UserWarning, match='fewer than 10 images'):
        settings = sysu_settings(query, gallery, root=tmp_path, num_trials=2)
    assert 'official_perm' in capsys.readouterr().out
    multi = {s.key: s for s in settings}['sysu_mm01/all/multi/official_perm']
    cells = Counter((gallery[i][2], gallery[i][1]) for i in multi.trials[1][1])
    assert cells[(4, 5)] == 7                                          # min(10, n) with n = 7
    tr_settings = sysu_settings(query, gallery, root=tmp_path, num_trials=1, shots=(1,),
                                semantics='torchreid', search_modes=('all',))
    assert tr_settings[0].key == 'sysu_mm01/all/single/official_perm/torchreid'
    assert (tr_settings[0].removal, tr_settings[0].cmc_mode) == ('same_pid_cam', 'image')


def test_read_sysu_perm_rejects_malformed_files(tmp_path):
    bad_key = tmp_path / 'a.mat'
    scipy.io.savemat(bad_key, {'perm': np.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"a\.mat: expected the key 'rand_perm_cam'"):
        read_sysu_perm(bad_key)
    sizes = {(1, 2): 5}
    bad_rows = write_perm(tmp_path / 'b.mat', sizes)
    m = scipy.io.loadmat(bad_rows)
    m['rand_perm_cam'][0, 0][1, 0][2, :] = 1                           # row 2 is no permutation
    scipy.io.savemat(bad_rows, {'rand_perm_cam': m['rand_perm_cam']})
    with pytest.raises(ValueError, match=r'b\.mat: camera 1 pid 2: every row must be a perm'):
        read_sysu_perm(bad_rows)
    with pytest.raises(FileNotFoundError, match='nowhere.mat'):
        read_sysu_perm(tmp_path / 'nowhere.mat')


# ------------------------------------------------------------------------------------------------
# RegDB, LLCM, generic

def regdb_records(n_ids=6, per=3):
    thermal = [(f'Thermal/{p}/t_{k}.bmp', p, 2, 1) for p in range(1, n_ids + 1) for k in range(per)]
    visible = [(f'Visible/{p}/v_{k}.bmp', p, 1, 0) for p in range(1, n_ids + 1) for k in range(per)]
    return thermal, visible


def test_regdb_settings_directions_and_report():
    thermal, visible = regdb_records()
    settings = regdb_settings(thermal, visible, trial=2)
    assert [(s.key, s.direction) for s in settings] == [('regdb/trial2/t2v', 'ir2vis'),
                                                        ('regdb/trial2/v2t', 'vis2ir')]
    assert all((s.removal, s.cmc_mode, s.num_trials) == ('none', 'image', 1) for s in settings)
    dist = np.random.default_rng(0).random((len(thermal), len(visible)))
    res = evaluate_settings(dist, thermal, visible, settings, max_rank=5)
    qp = np.array([r[1] for r in thermal])
    vp = np.array([r[1] for r in visible])
    t2v = evaluate_cross_modal(dist, qp, vp, np.full(18, 2), np.ones(18), 'regdb', max_rank=5)
    v2t = evaluate_cross_modal(dist.T, vp, qp, np.ones(18), np.full(18, 2), 'regdb', max_rank=5)
    assert res['regdb/trial2/t2v'].mean['mAP'] == t2v.mAP
    assert res['regdb/trial2/v2t'].mean['mAP'] == v2t.mAP
    assert np.array_equal(res['regdb/trial2/v2t'].per_trial[0].cmc, v2t.cmc)
    idkl = regdb_settings(thermal, visible, semantics='idkl')
    assert idkl[0].key == 'regdb/trial1/t2v/idkl' and idkl[0].cmc_mode == 'identity'


def llcm_records(seed=0, n_ids=8):
    rng = np.random.default_rng(seed)
    nir, vis = [], []
    for pid in range(1, n_ids + 1):
        for cam in sorted(rng.choice([1, 2, 4, 5, 6, 7, 8, 9], 3, replace=False)):
            nir += [(f'test_nir/cam{cam}/{pid:04d}/{pid:04d}_c{cam:02d}_f{k}_nir.jpg', pid,
                     int(cam), 1) for k in range(int(rng.integers(1, 4)))]
        for cam in sorted(rng.choice(np.arange(1, 10), 3, replace=False)):
            vis += [(f'test_vis/cam{cam}/{pid:04d}/{pid:04d}_c{cam:02d}_f{k}_vis.jpg', pid,
                     int(cam), 0) for k in range(int(rng.integers(1, 4)))]
    return nir, vis


def test_llcm_settings_and_legacy_direction():                            # 7.2.11
    nir, vis = llcm_records()
    settings = llcm_settings(nir, vis, num_trials=4, legacy_deen_vis2ir=True)
    by_key = {s.key: s for s in settings}
    assert list(by_key) == ['llcm/ir2vis', 'llcm/vis2ir', 'llcm/legacy_deen_vis2ir']
    for s in settings:
        assert (s.removal, s.cmc_mode, s.sampler, s.num_trials) == ('same_pid_cam', 'identity',
                                                                   'agw_seed', 4)
    for q, g in by_key['llcm/ir2vis'].trials:                   # one VIS image per (pid, cam)
        assert len(q) == len(nir)
        cells = Counter((vis[i][1], vis[i][2]) for i in g)
        assert set(cells.values()) == {1} and len(cells) == len({(r[1], r[2]) for r in vis})
    legacy = by_key['llcm/legacy_deen_vis2ir']
    assert legacy.direction == 'ir2vis'
    dist = np.random.default_rng(1).random((len(nir), len(vis)))
    res = evaluate_settings(dist, nir, vis, [legacy], max_rank=5)[legacy.key]
    nir_p, nir_c = np.array([r[1] for r in nir]), np.array([r[2] for r in nir])
    vis_p, vis_c = np.array([r[1] for r in vis]), np.array([r[2] for r in vis])
    for t in range(4):
        sample = agw_seed_gallery(nir, t, None, (1, 2, 4, 5, 6, 7, 8, 9))
        assert np.array_equal(legacy.trials[t][0], sample)
        assert np.array_equal(legacy.trials[t][1], np.arange(len(vis)))
        direct = evaluate_cross_modal(dist[sample], nir_p[sample], vis_p, nir_c[sample], vis_c,
                                      'llcm', max_rank=5)
        assert np.array_equal(res.per_trial[t].cmc, direct.cmc)
        assert res.per_trial[t].mAP == direct.mAP
    idkl = llcm_settings(nir, vis, semantics='idkl')
    assert [s.key for s in idkl] == ['llcm/ir2vis/idkl', 'llcm/vis2ir/idkl']
    assert idkl[0].removal == 'none' and idkl[0].num_trials == 1
    assert len(idkl[1].trials[0][0]) == len(vis) and len(idkl[1].trials[0][1]) == len(nir)


def fake_features(records, dim=16):
    """A deterministic feature per image (a function of its path and pid only)."""
    out = []
    for path, pid, cam, _ in records:
        seed = sum(map(ord, path)) * 7919 + pid
        out.append(np.random.default_rng([pid, 5]).standard_normal(dim)
                   + 0.8 * np.random.default_rng(seed).standard_normal(dim))
    return np.array(out)


def test_pooled_evaluation_equals_per_trial_extraction(tmp_path):        # 7.2.10
    sizes = synthetic_sysu(1)
    write_perm(tmp_path / 'perm.mat', sizes)
    query, gallery = records_from_sizes(sizes, (3, 6)), records_from_sizes(sizes, (1, 2, 4, 5))
    with pytest.warns(UserWarning):
        settings = sysu_settings(query, gallery, perm_file=tmp_path / 'perm.mat', num_trials=3)
    qf, gf = fake_features(query), fake_features(gallery)
    pooled_dist = ((qf[:, None, :] - gf[None, :, :]) ** 2).sum(-1)
    pooled = evaluate_settings(pooled_dist, query, gallery, settings, max_rank=5)
    for s in settings:
        for t, (q_idx, g_idx) in enumerate(s.trials):
            trial_gallery = [gallery[i] for i in g_idx]
            tq, tg = fake_features([query[i] for i in q_idx]), fake_features(trial_gallery)
            d = ((tq[:, None, :] - tg[None, :, :]) ** 2).sum(-1)
            direct = evaluate_cross_modal(d, [query[i][1] for i in q_idx],
                                          [r[1] for r in trial_gallery],
                                          [query[i][2] for i in q_idx],
                                          [r[2] for r in trial_gallery], 'sysu', max_rank=5)
            got = pooled[s.key].per_trial[t]
            assert np.array_equal(got.cmc, direct.cmc) and got.mAP == direct.mAP
            assert got.mINP == direct.mINP and got.num_gallery == len(g_idx)


def test_dist_fn_report_table_and_json():
    nir, vis = llcm_records(2)
    settings = llcm_settings(nir, vis, num_trials=3) + generic_settings(nir, vis,
                                                                        dataset_name='mine')
    rng = np.random.default_rng(3)
    dist = rng.random((len(nir), len(vis))).astype(np.float32)
    res = evaluate_settings(dist, nir, vis, settings, max_rank=6)
    calls = []

    def dist_fn(q_idx, g_idx, direction):
        calls.append(direction)
        full = dist if direction == 'ir2vis' else dist.T
        return full[np.ix_(q_idx, g_idx)]

    via_fn = evaluate_settings(dist_fn, nir, vis, settings, max_rank=6)
    assert calls.count('vis2ir') == 4 and calls.count('ir2vis') == 4
    for key in res:
        assert res[key].mean == via_fn[key].mean
    r = res['llcm/vis2ir']
    assert r.num_trials == 3 and len(r.per_trial) == 3
    assert abs(r.mean['mAP'] - np.mean([p.mAP for p in r.per_trial])) < 1e-15
    assert abs(r.std['rank1'] - np.std([p.cmc[0] for p in r.per_trial])) < 1e-15
    assert set(r.mean) == {'rank1', 'rank5', 'mAP', 'mINP'}      # rank10/20 > max_rank
    blob = json.loads(json.dumps({k: v.as_dict() for k, v in res.items()}))
    assert blob['llcm/ir2vis']['per_trial'][1]['mAP'] == res['llcm/ir2vis'].per_trial[1].mAP
    assert blob['mine/ir2vis']['semantics'] == 'generic'
    table = format_table(res, title='LLCM')
    lines = table.splitlines()
    assert lines[0] == 'LLCM' and len(lines) == 3 + len(settings)
    row = next(line for line in lines if line.startswith('llcm/vis2ir'))
    assert f"{100 * r.mean['rank1']:6.2f} ± {100 * r.std['rank1']:5.2f}" in row
    assert f'{r.num_valid[0]}/{r.num_query[0]}' in row


def test_setting_and_report_errors():
    nir, vis = llcm_records(3)
    with pytest.raises(ValueError, match="direction must be one of"):
        EvalSetting('x', 'up', ((np.arange(2), np.arange(2)),), 'none', 'image', 'all')
    s = EvalSetting('x', 'ir2vis', ((np.arange(2), np.array([0, 10_000])),), 'none', 'image',
                    'all')
    with pytest.raises(IndexError, match=r"setting 'x' trial 0 gallery_idx"):
        evaluate_settings(np.zeros((len(nir), len(vis))), nir, vis, [s])
    with pytest.raises(ValueError, match='dist_ir_vis must have shape'):
        evaluate_settings(np.zeros((3, 3)), nir, vis, generic_settings(nir, vis,
                                                                       dataset_name='g'))
    with pytest.raises(ValueError, match='duplicate setting keys'):
        g = generic_settings(nir, vis, dataset_name='g')
        evaluate_settings(np.zeros((len(nir), len(vis))), nir, vis, g + g)
