"""Benchmark of the cross-modal evaluator (a benchmark, not a test).

What it measures, in one run:

(a) the full SYSU-MM01 report from features, as the engine does it: one IR x VIS distance matrix
    (3,803 x 6,775, float32, 2048-d features) + ``evaluate_settings`` over all 4 settings
    (all/indoor x single/multi) x 10 trials;
(b) torchreid's ``evaluate_rank(..., max_rank=50, use_cython=False)`` (the path PyPI torchreid
    takes, since it ships no Cython extension) on per-trial distance matrices, against this
    project's ``evaluate_cross_modal(..., protocol='torchreid', max_rank=50)`` on the very same
    matrices; rank-1 and mAP must agree to 1e-6. Both are timed on the same set of evaluations
    (by default trial 0 of each of the 4 settings, since torchreid needs ~20 s for one multi-shot
    trial; ``--torchreid-trials 10`` runs all 40). This comparison uses float64 distances so that
    torchreid's non-stable sort cannot order exact float32 ties differently;
(c) the LLCM-sized report: 7,166 NIR x 8,680 VIS test images, both directions x 10 trials;
(d) torchreid's Cython evaluator on the same matrices as (b), when it is importable (PyPI
    torchreid ships none; a line says so).

The evaluations run on the compiled kernel (``torchreid_vi.evaluation.compiled``) when numba is
installed, and the numpy engines' time for the same evaluations (the path without numba) is
printed beside it, with a check that both give identical numbers. The kernel's machine code is
loaded (or compiled, after an install) before any timing; that first call is printed too.

Timings are wall-clock, best of ``--repeat`` runs of each step (the machine is shared; the
ratios compare steps of the same run). ``evals_over_matmul`` = the evaluations' time / the
distance matrix's time, for SYSU (40 evaluations) and LLCM (20).

Data: SYSU-shaped records with the real per-(pid, cam) image counts of the 96 test ids, taken from
the official ``rand_perm_cam.mat`` when it is found (``--perm``, default the shared copy); the
galleries are then the real ``official_perm`` galleries. Without the file a synthetic permutation
with the same per-camera totals is written to a temporary .mat and used the same way. Features:
see :class:`FeatureModel` (rank-1 near 50 %, realistic distance spread).

The last line printed is ``speedup_vs_torchreid=<x>`` = torchreid time / this project's time for
the same evaluations on the same matrices (evaluation only, distances excluded on both sides).

``--device cuda`` computes features' distances and every metric on the GPU (the torch path of
``evaluate_settings``; the matrix never leaves the device).

Usage: ``python benchmarks/bench_eval.py [--perm PATH] [--torchreid-trials N] [--skip-llcm]
[--repeat N] [--device cpu|cuda]``
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np
import scipy.io
import torch

import torchreid_vi.evaluation.metrics as metrics
from torchreid_vi._torchreid import tr
from torchreid_vi.evaluation import (
    compiled,
    evaluate_cross_modal,
    evaluate_settings,
    format_table,
    llcm_settings,
    read_sysu_perm,
    sysu_settings,
)

# official split files (rand_perm_cam.mat, test_id.mat); override with TORCHREID_VI_SYSU_EXP
# The official split files ship in shared/ beside the repository checkout (as CI lays it out).
SPLIT_DIR = os.environ.get('TORCHREID_VI_SYSU_EXP', os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    'shared', 'data', 'sysu_mm01_exp'))
DEFAULT_PERM = os.path.join(SPLIT_DIR, 'rand_perm_cam.mat')
DEFAULT_TEST_IDS = os.path.join(SPLIT_DIR, 'test_id.mat')
# real per-camera totals of the 96 SYSU test ids (datasets_and_protocols.md §1.6): (images, ids)
SYSU_CAM_TOTALS = {1: (1374, 56), 2: (1565, 56), 3: (1883, 93), 4: (1918, 94), 5: (1918, 95),
                   6: (1920, 96)}


def sysu_cells(perm_path, test_ids_path, rng, scratch):
    """{(cam, pid): n_images} of the test ids, and the perm file to use (a synthetic one is
    written into the folder ``scratch``, which the caller removes)."""
    if perm_path and os.path.isfile(perm_path):
        perm = read_sysu_perm(perm_path)
        if os.path.isfile(test_ids_path):
            test_ids = scipy.io.loadmat(test_ids_path)['id'].ravel().astype(int)
        else:  # without test_id.mat: 96 pids seen by cam 6 (realistic sizes, not the split)
            test_ids = np.array(sorted({p for (c, p) in perm if c == 6})[:96])
        cells = {(c, p): e.shape[1] for (c, p), e in perm.items() if p in set(test_ids.tolist())}
        return cells, perm_path, f'real official permutation {perm_path}'
    # synthetic: same per-camera totals and id counts, >= 13 images per cell
    test_ids = np.sort(rng.choice(np.arange(1, 334), 96, replace=False))
    cells = {}
    for cam, (total, n_ids) in SYSU_CAM_TOTALS.items():
        pids = np.sort(rng.choice(test_ids, n_ids, replace=False))
        sizes = 13 + rng.multinomial(total - 13 * n_ids, np.ones(n_ids) / n_ids)
        cells.update({(cam, int(p)): int(s) for p, s in zip(pids, sizes)})
    outer = np.empty((6, 1), object)
    for cam in range(1, 7):
        inner = np.empty((333, 1), object)
        for p in range(1, 334):
            n = cells.get((cam, p), 0)
            inner[p - 1, 0] = (np.stack([rng.permutation(n) + 1 for _ in range(10)]).astype(
                np.uint8) if n else np.zeros((10, 0), np.uint8))
        outer[cam - 1, 0] = inner
    path = os.path.join(scratch, 'rand_perm_cam.mat')
    scipy.io.savemat(path, {'rand_perm_cam': outer})
    return cells, path, f'synthetic permutation (no {perm_path}) written to {path}'


def records_from_cells(cells, cams, modality):
    recs = []
    for (cam, pid) in sorted(cells, key=lambda k: (k[1], k[0])):
        if cam in cams:
            recs += [(f'SYSU-MM01/cam{cam}/{pid:04d}/{k:04d}.jpg', pid, cam, modality)
                     for k in range(1, cells[(cam, pid)] + 1)]
    return recs


class FeatureModel:
    """Synthetic 2048-d features with identity structure, shaped like real ReID embeddings.

    A 128-d latent per image (identity centre + noise, plus a modality offset) is projected to
    2048-d by a fixed random matrix, with a little isotropic noise, then L2-normalised. Distances
    then spread like real ones (0.9 .. 2.9 for 2 - 2 cos) and rank-1 lands near 50 % on SYSU
    single-shot; purely isotropic 2048-d noise would squeeze every distance around 2 and make
    exact float32 ties ~10x more common than with real features.
    """

    def __init__(self, rng, latent=128, n_ids=1200, noise=2.0):
        self.rng, self.noise = rng, noise
        self.centres = rng.standard_normal((n_ids, latent))
        self.project = (rng.standard_normal((latent, 2048)) / np.sqrt(latent)).astype(np.float32)
        self.modality_offset = 0.5 * rng.standard_normal(latent)

    def __call__(self, records, infrared: bool) -> torch.Tensor:
        pids = np.array([r[1] for r in records])
        z = self.centres[pids] + self.noise * self.rng.standard_normal(
            (len(records), self.centres.shape[1]))
        if infrared:
            z = z + self.modality_offset
        f = z.astype(np.float32) @ self.project + 0.1 * self.rng.standard_normal(
            (len(records), 2048)).astype(np.float32)
        return torch.nn.functional.normalize(torch.from_numpy(f), dim=1)


def distance(q, g):
    """Squared Euclidean distance of L2-normalised features: 2 - 2 cos."""
    return (2.0 - 2.0 * (q @ g.T)).clamp_min_(0)


CPU_SECONDS = {}


def timed(fn, label=None, repeat=1, device=None):
    """(result, wall seconds: the best of ``repeat`` runs); the process CPU seconds of that run
    go to CPU_SECONDS[label]. ``device``: a CUDA device to synchronise before reading clocks."""
    best = None
    for _ in range(repeat):
        if device is not None and device.type == 'cuda':
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if device is not None and device.type == 'cuda':
            torch.cuda.synchronize(device)
        wall, used = time.perf_counter() - t0, time.process_time() - c0
        if best is None or wall < best[1]:
            best = (out, wall, used)
    if label:
        CPU_SECONDS[label] = best[2]
    return best[0], best[1]


def cpu(label):
    return f' (process CPU {CPU_SECONDS[label]:.3f} s)'


def warm_up() -> str:
    """Resolve the evaluation engine, loading (or, after an install, compiling) the kernel's
    machine code outside every timing: a process pays this once, on its first evaluation."""
    t0 = time.perf_counter()
    kernel = metrics._compiled()
    engine = (f'the compiled kernel (numba {kernel.numba.__version__})' if kernel is not None
              else f'the numpy engines ({compiled.unavailable_reason()})')
    return (f'evaluation engine: {engine}; first call (machine code loaded or compiled, not in '
            f'any timing below): {time.perf_counter() - t0:.2f} s')


def numpy_engines(fn):
    """fn() evaluated by the numpy engines (the path without numba)."""
    saved, metrics._STRATEGY = metrics._STRATEGY, 'numpy'
    try:
        return fn()
    finally:
        metrics._STRATEGY = saved


def calibration() -> str:
    """A fixed single-threaded workload, to read the timings against how busy the machine is.

    On an otherwise idle 2-core machine of this project's CI class it takes ~65 ms; other
    processes sharing the cores (or the VM's host) stretch every timing below by about the same
    factor.
    """
    x = np.random.default_rng(0).random((2048, 3010), dtype=np.float32)
    best = min(timed(lambda: np.sort(x, axis=1))[1] for _ in range(3))
    return f'calibration: np.sort of a 2048x3010 float32 array {1000 * best:.0f} ms'


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--perm', default=DEFAULT_PERM, help='official rand_perm_cam.mat')
    ap.add_argument('--test-ids', default=DEFAULT_TEST_IDS, help='official test_id.mat')
    ap.add_argument('--torchreid-trials', type=int, default=1,
                    help='trials per setting evaluated with torchreid (1..10)')
    ap.add_argument('--skip-llcm', action='store_true')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--repeat', type=int, default=3,
                    help='time each distance / report step this many times, keep the best')
    ap.add_argument('--device', default='cpu', help="'cpu' or a CUDA device ('cuda', 'cuda:1')")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rep = max(1, args.repeat)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    print(f'torch threads: {torch.get_num_threads()}, numpy {np.__version__}, '
          f'torch {torch.__version__}, cpu count {os.cpu_count()}, '
          f'load average {os.getloadavg()[0]:.1f} (other processes share these cores)')
    print(calibration())

    # ---------------------------------------------------------------- SYSU-MM01-sized data
    scratch = tempfile.mkdtemp(prefix='bench_eval_')
    atexit.register(shutil.rmtree, scratch, True)
    cells, perm_file, perm_note = sysu_cells(args.perm, args.test_ids, rng, scratch)
    query_records = records_from_cells(cells, (3, 6), 1)
    gallery_records = records_from_cells(cells, (1, 2, 4, 5), 0)
    print(f'SYSU-sized: {len(query_records)} IR queries, {len(gallery_records)}-image VIS pool, '
          f'{len({r[1] for r in query_records})} ids; galleries: official_perm from {perm_note}')
    features = FeatureModel(rng)
    q_feat, g_feat = features(query_records, True), features(gallery_records, False)
    on_device = device.type != 'cpu'
    if on_device:
        q_feat, g_feat = q_feat.to(device), g_feat.to(device)
    # a CUDA matrix stays a tensor (evaluate_settings evaluates it there); CPU: numpy
    as_input = (lambda t: t) if on_device else (lambda t: t.numpy())

    settings, t_settings = timed(lambda: sysu_settings(
        query_records, gallery_records, gallery_sampler='official_perm', perm_file=perm_file))
    n_eval = sum(s.num_trials for s in settings)

    dist, t_dist = timed(lambda: as_input(distance(q_feat, g_feat)), 'sysu_dist', rep, device)
    if not on_device:
        print(warm_up())
    results, t_eval = timed(lambda: evaluate_settings(dist, query_records, gallery_records,
                                                      settings), 'sysu_eval', rep, device)
    print(format_table(results, title='SYSU-sized report (synthetic features)'))
    print(f'sysu_settings (10 trials x 4 settings): {t_settings:.3f} s')
    print(f'sysu_distance_once ({dist.shape[0]}x{dist.shape[1]} float32, 2048-d, {device}): '
          f'{t_dist:.3f} s' + cpu('sysu_dist'))
    print(f'sysu_evaluate_settings ({n_eval} evaluations): {t_eval:.3f} s' + cpu('sysu_eval'))
    if not on_device and metrics._compiled() is not None:
        numpy_results, t_numpy = timed(lambda: numpy_engines(lambda: evaluate_settings(
            dist, query_records, gallery_records, settings)), 'sysu_numpy', rep)
        same = all(a.mAP == b.mAP and a.mINP == b.mINP and np.array_equal(a.cmc, b.cmc)
                   for k in results for a, b in zip(results[k].per_trial,
                                                    numpy_results[k].per_trial))
        print(f'sysu_evaluate_settings_numpy_engines (the same {n_eval} evaluations without the '
              f'compiled kernel): {t_numpy:.3f} s' + cpu('sysu_numpy') +
              f'; {t_numpy / t_eval:.1f}x the kernel; results identical to the bit: {same}')
        assert same, 'the compiled kernel and the numpy engines disagree'
    print(f'sysu_full_report_from_features: {t_dist + t_eval:.3f} s (target < 5 s)')
    print(f'evals_over_matmul={t_eval / t_dist:.3f}  (SYSU: {n_eval} evaluations / one distance '
          f'matrix, same run, best of {rep}; target <= 0.3)')

    # ------------------------------------------------- torchreid vs ours, same matrices
    dist64 = distance(q_feat.double(), g_feat.double()).cpu().numpy()
    q_pids = np.array([r[1] for r in query_records])
    q_cams = np.array([r[2] for r in query_records])
    g_pids_all = np.array([r[1] for r in gallery_records])
    g_cams_all = np.array([r[2] for r in gallery_records])
    n_tr = max(1, min(10, args.torchreid_trials))
    cython_error = None
    try:
        tr.module('metrics.rank_cylib.rank_cy')
        has_cython = bool(getattr(tr.module('metrics.rank'), 'IS_CYTHON_AVAI', True))
    except ImportError as exc:
        has_cython, cython_error = False, exc
    t_torchreid = t_ours = t_cython = 0.0
    worst = worst_cy = 0.0
    for s in settings:
        for q_idx, g_idx in s.trials[:n_tr]:
            d = np.ascontiguousarray(dist64[np.ix_(q_idx, g_idx)])
            args_t = (d, q_pids[q_idx], g_pids_all[g_idx], q_cams[q_idx], g_cams_all[g_idx])
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                (cmc_tr, map_tr), dt = timed(lambda: tr.metrics.evaluate_rank(
                    *args_t, max_rank=50, use_cython=False))
            t_torchreid += dt
            ours, dt = timed(lambda: evaluate_cross_modal(*args_t, protocol='torchreid',
                                                          max_rank=50))
            t_ours += dt
            diff = max(abs(ours.cmc[0] - cmc_tr[0]), abs(ours.mAP - map_tr))
            worst = max(worst, diff)
            assert diff < 1e-6, (s.key, ours.cmc[0], cmc_tr[0], ours.mAP, map_tr)
            if has_cython:
                # torchreid's Cython path casts the distances to float32: ties may order
                # differently, so its agreement is reported, not asserted
                (cmc_cy, map_cy), dt = timed(lambda: tr.metrics.evaluate_rank(
                    *args_t, max_rank=50, use_cython=True))
                t_cython += dt
                worst_cy = max(worst_cy, abs(ours.cmc[0] - cmc_cy[0]), abs(ours.mAP - map_cy))
    n_cmp = n_tr * len(settings)
    print(f'torchreid_agreement: rank-1 and mAP equal within {worst:.1e} on {n_cmp} evaluations '
          f"(protocol='torchreid', float64 distances)")
    print(f'torchreid_evaluate_rank_python ({n_cmp} evaluations, max_rank=50): {t_torchreid:.3f} s')
    print(f"ours_evaluate_cross_modal_torchreid_rule (same {n_cmp} evaluations): {t_ours:.3f} s")
    if has_cython:
        print(f'torchreid_evaluate_rank_cython (same {n_cmp} evaluations): {t_cython:.3f} s; '
              f'rank-1/mAP within {worst_cy:.1e} of ours (Cython sorts float32 copies)')
    else:
        print(f'torchreid_cython: not available ({cython_error}); this torchreid has no '
              f'compiled rank_cylib, so there is no speedup_vs_torchreid_cython')

    # ------------------------------------------------------------------ LLCM-sized data
    if not args.skip_llcm:
        nir, vis = llcm_records(rng)
        f_nir, f_vis = features(nir, True), features(vis, False)
        if on_device:
            f_nir, f_vis = f_nir.to(device), f_vis.to(device)
        lsettings, t_lset = timed(lambda: llcm_settings(nir, vis))
        ldist, t_ldist = timed(lambda: as_input(distance(f_nir, f_vis)), 'llcm_dist', rep, device)
        lres, t_leval = timed(lambda: evaluate_settings(ldist, nir, vis, lsettings), 'llcm_eval',
                              rep, device)
        t_lnumpy = None
        if not on_device and metrics._compiled() is not None:
            _, t_lnumpy = timed(lambda: numpy_engines(lambda: evaluate_settings(
                ldist, nir, vis, lsettings)), 'llcm_numpy', rep)
        print(format_table(lres, title='LLCM-sized report (synthetic features)'))
        print(f'llcm_settings: {t_lset:.3f} s')
        print(f'llcm_distance_once ({ldist.shape[0]}x{ldist.shape[1]} float32): {t_ldist:.3f} s'
              + cpu('llcm_dist'))
        print(f'llcm_evaluate_settings (2 directions x 10 trials): {t_leval:.3f} s'
              + cpu('llcm_eval'))
        if t_lnumpy is not None:
            print(f'llcm_evaluate_settings_numpy_engines (the same, without the compiled kernel):'
                  f' {t_lnumpy:.3f} s' + cpu('llcm_numpy') + f'; {t_lnumpy / t_leval:.1f}x the '
                  f'kernel')
        print(f'llcm_full_report_from_features: {t_ldist + t_leval:.3f} s')
        n_leval = sum(x.num_trials for x in lsettings)
        print(f'llcm_evals_over_matmul={t_leval / t_ldist:.3f}  (LLCM: {n_leval} evaluations / '
              f'one distance matrix, same run, best of {rep}; target <= 0.3)')

    print(f'load average at the end: {os.getloadavg()[0]:.1f}; {calibration()}')
    if has_cython:
        print(f'speedup_vs_torchreid_cython={t_cython / t_ours:.1f}')
    print(f'speedup_vs_torchreid={t_torchreid / t_ours:.1f}')
    return 0


def llcm_records(rng, n_ids=351, n_nir=7166, n_vis=8680):
    """LLCM-shaped test records: pids 1..351, VIS cams 1..9, NIR cams 1,2,4..9."""
    def build(total, cams, modality, tag):
        recs = []
        cells = []
        for pid in range(1, n_ids + 1):
            chosen = np.sort(rng.choice(cams, int(rng.integers(3, len(cams) + 1)), replace=False))
            cells += [(pid, int(c)) for c in chosen]
        sizes = 1 + rng.multinomial(total - len(cells), np.ones(len(cells)) / len(cells))
        for (pid, cam), n in zip(cells, sizes):
            recs += [(f'LLCM/test_{tag}/cam{cam}/{pid:04d}/{pid:04d}_c{cam:02d}_s0_f{k}_{tag}.jpg',
                      pid, cam, modality) for k in range(int(n))]
        return recs
    nir = build(n_nir, np.array([1, 2, 4, 5, 6, 7, 8, 9]), 1, 'nir')
    vis = build(n_vis, np.arange(1, 10), 0, 'vis')
    return nir, vis


if __name__ == '__main__':
    sys.exit(main())
