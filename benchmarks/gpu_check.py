"""The one-shot GPU check: what a training step of each method costs at the papers' sizes, per
precision, whether data loading keeps up, what a second GPU buys, and how long the SYSU-MM01
report takes on the device. Run it through ``benchmarks/gpu_check.sh``.

Rows of the table:

* **XIV** (``xiv_resnet50``, 256×128, a loader batch of 96 = 2·P·K with P 8, K 6; the engine adds
  the X block, so the network sees 144 images) and **IDKL** (``idkl_resnet50``, 384×144, batch
  120 = 2·12·5), each at ``train.amp`` none / fp16 / bf16, from the packaged configs
  (``xiv/sysu_mm01``, ``idkl/sysu_mm01``; no ImageNet weights: the machine is offline, and the
  weights do not change the cost). Per row: milliseconds per optimizer step (after warm-up; SGD
  at lr 0, so every step does the same work), loader images per second that this step rate
  consumes, peak GPU memory, and the total loss of the same first batch from the same initial
  weights, with its relative difference to the fp32 (``none``) row;
* **loader**: images per second of the real train loader (the config's augmentations, decoding
  JPEGs of a synthetic SYSU-MM01 tree written at 288×144, ``data.workers`` = the CPU cores);
  when it is below a step row's images/s, data loading bounds that row;
* **DDP**: with 2+ GPUs, the same global batch split over all GPUs (NCCL, SyncBatchNorm, losses on
  the gathered batch), step time and scaling (1-GPU step time / N-GPU step time; N is ideal);
* **SYSU report**: one 3,803×6,775 distance matrix of 2048-d features plus the whole protocol
  (all/indoor × single/multi-shot × 10 trials) on the device.

``--dry`` runs every row on the CPU at tiny sizes (64×32 / 96×36 images, P 2, K 2, 2 gloo
processes for the DDP row, fp16 reported as refused) so that the script itself is tested on
machines without a GPU; its timings mean nothing. The whole check stops starting new rows after
``--budget`` seconds (default 420) and marks the rest skipped, so it ends in under 8 minutes.

Usage::

    bash benchmarks/gpu_check.sh [--dry] [--json PATH] [--budget SECONDS]
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import os.path as osp
import shutil
import sys
import tempfile
import time
import traceback

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from train_steps import StepRunner, engine_config  # noqa: E402

AMPS = ('none', 'fp16', 'bf16')
# method: (packaged config, model, (H, W), P, K) at the papers' sizes, and at --dry sizes
FULL = {'xiv': ('xiv/sysu_mm01', (256, 128), 8, 6), 'idkl': ('idkl/sysu_mm01', (384, 144), 12, 5)}
DRY = {'xiv': ('xiv/sysu_mm01', (64, 32), 2, 2), 'idkl': ('idkl/sysu_mm01', (96, 36), 2, 2)}


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.time(), seconds

    def left(self) -> bool:
        return time.time() - self.start < self.seconds


def _peak_gib(device: torch.device):
    if device.type != 'cuda':
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def _free(device: torch.device) -> None:
    import gc
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def total_loss(terms: dict) -> float:
    """The optimised loss among a step's logged terms (XIV and IDKL log it as ``loss``; the
    other terms are its parts, and ``acc`` a batch accuracy)."""
    return float(terms['loss'])


def step_row(method: str, amp: str, sizes: dict, device: torch.device, warmup: int,
             steps: int) -> dict:
    config, (height, width), ids, per_id = sizes[method]
    cfg = engine_config(method, config, ['data.height', str(height), 'data.width', str(width),
                                         'train.amp', amp])
    _free(device)
    runner = StepRunner(cfg, ids, per_id, device)
    batch = runner.batch()
    torch.manual_seed(1)  # the same dropout masks in every precision's first step
    seconds, first = runner.time_steps(batch, warmup, steps)
    loader_images = 2 * ids * per_id
    row = {'method': method, 'model': cfg.model.name, 'input': f'{height}x{width}',
           'batch': loader_images, 'network_images': loader_images * (3 if method == 'xiv'
                                                                        and cfg.xiv.use_x else 2)
           // 2, 'amp': amp, 'step_ms': seconds * 1e3, 'images_per_s': loader_images / seconds,
           'peak_gib': _peak_gib(device), 'first_loss': total_loss(first)}
    del runner
    _free(device)
    return row


def loader_row(method: str, sizes: dict, data_root: str, save_dir: str, batches: int,
               workers: int) -> dict:
    """Images per second of the real train loader of ``method``'s config."""
    from torchreid_vi.data.datamanager import CrossModalImageDataManager
    from torchreid_vi.registration import register_all
    register_all()
    config, (height, width), ids, per_id = sizes[method]
    cfg = engine_config(method, config, [
        'data.height', str(height), 'data.width', str(width), 'data.root', data_root,
        'data.workers', str(workers), 'train.batch_size', str(2 * ids * per_id),
        'sampler.num_instances', str(per_id),
        'data.save_dir', save_dir])
    cfg.use_gpu = torch.cuda.is_available()  # pinned memory as in a GPU run
    dm = CrossModalImageDataManager.from_config(cfg)
    loader = dm.train_loader
    it = iter(loader)
    next(it)  # workers started, first batch decoded
    n, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            n += len(next(it)['img'])
        except StopIteration:
            it = iter(loader)
    seconds = time.perf_counter() - start
    return {'method': method, 'input': f'{height}x{width}', 'workers': workers,
            'images_per_s': n / seconds, 'transforms': list(cfg.data.transforms)}


def _ddp_worker(rank, world, init_file, out_file, method, sizes, backend, warmup, steps):
    dist.init_process_group(backend, init_method=f'file://{init_file}', rank=rank,
                            world_size=world)
    if backend == 'nccl':
        device = torch.device('cuda', rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device('cpu')
        torch.set_num_threads(1)
    config, (height, width), ids, per_id = sizes[method]
    cfg = engine_config(method, config, ['data.height', str(height), 'data.width', str(width),
                                         'train.amp', 'bf16' if backend == 'nccl' else 'none'])
    runner = StepRunner(cfg, ids, per_id, device)
    torch.manual_seed(1)
    seconds, first = runner.time_steps(runner.batch(), warmup, steps)
    if rank == 0:
        torch.save({'seconds': seconds, 'first_loss': total_loss(first)}, out_file)
    dist.destroy_process_group()


def ddp_row(method: str, sizes: dict, world: int, backend: str, warmup: int, steps: int,
            single: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = osp.join(tmp, 'ddp.pt')
        mp.spawn(_ddp_worker, args=(world, osp.join(tmp, 'init'), out, method, sizes, backend,
                                    warmup, steps), nprocs=world, join=True)
        res = torch.load(out, weights_only=False)
    return {'method': method, 'processes': world, 'backend': backend,
            'step_ms': res['seconds'] * 1e3, 'single_step_ms': single['step_ms'],
            'scaling': single['step_ms'] / (res['seconds'] * 1e3),
            'first_loss': res['first_loss'],
            'loss_rel_diff': abs(res['first_loss'] - single['first_loss'])
            / max(abs(single['first_loss']), 1e-12)}


def sysu_report_row(device: torch.device, scratch: str) -> dict:
    import bench_eval as be

    from torchreid_vi.evaluation import evaluate_settings, sysu_settings
    rng = np.random.default_rng(0)
    cells, perm_file, _ = be.sysu_cells(be.DEFAULT_PERM, be.DEFAULT_TEST_IDS, rng, scratch)
    query = be.records_from_cells(cells, (3, 6), 1)
    gallery = be.records_from_cells(cells, (1, 2, 4, 5), 0)
    features = be.FeatureModel(rng)
    q, g = features(query, True).to(device), features(gallery, False).to(device)
    settings = sysu_settings(query, gallery, gallery_sampler='official_perm',
                             perm_file=perm_file)
    as_input = (lambda t: t) if device.type == 'cuda' else (lambda t: t.numpy())
    be.timed(lambda: evaluate_settings(as_input(be.distance(q, g)), query, gallery, settings),
             device=device)  # warm-up (kernels, allocator)
    (dist_, t_dist) = be.timed(lambda: as_input(be.distance(q, g)), repeat=2, device=device)
    _, t_eval = be.timed(lambda: evaluate_settings(dist_, query, gallery, settings), repeat=2,
                         device=device)
    return {'shape': f'{len(query)}x{len(gallery)}', 'evaluations':
            sum(s.num_trials for s in settings), 'distance_s': t_dist, 'evaluate_s': t_eval,
            'report_s': t_dist + t_eval, 'device': str(device)}


def _fmt(value, spec):
    return '-' if value is None else format(value, spec)


def _rows(columns, rows, render, skipped_at: int, extra=None) -> None:
    """One markdown table: a header of ``columns``, ``render(r)`` cells per row; a row that
    holds ``'skipped'`` shows its method (and ``extra`` cells) and the reason at column
    ``skipped_at``."""
    print('| ' + ' | '.join(columns) + ' |\n' + '|---' * len(columns) + '|')
    for r in rows:
        if 'skipped' in r:
            cells = [''] * len(columns)
            cells[0], cells[skipped_at] = r.get('method', r.get('device', '')), r['skipped']
            for at, key in (extra or {}).items():
                cells[at] = r[key]
        else:
            cells = render(r)
        print('|' + '|'.join(f' {c} ' if c else ' ' for c in cells) + '|')


def print_table(rows: dict, device_name: str) -> None:
    print(f'\n## gpu_check on {device_name}\n')
    _rows(['method', 'model', 'input', 'batch (net)', 'amp', 'step ms', 'img/s', 'peak GiB',
           'first loss', 'rel diff vs fp32'], rows['steps'], lambda r: [
        r['method'], r['model'], r['input'], f"{r['batch']} ({r['network_images']})", r['amp'],
        f"{r['step_ms']:.1f}", f"{r['images_per_s']:.0f}", _fmt(r['peak_gib'], '.2f'),
        f"{r['first_loss']:.5f}", _fmt(r.get('rel_diff'), '.1e')], 5, extra={4: 'amp'})
    print()
    _rows(['train loader', 'input', 'workers', 'img/s', 'transforms'], rows['loader'], lambda r: [
        r['method'], r['input'], str(r['workers']), f"{r['images_per_s']:.0f}",
        ', '.join(r['transforms'])], 3)
    print()
    _rows(['DDP', 'processes', 'backend', 'step ms', '1-process step ms', 'scaling',
           'first-loss rel diff'], rows['ddp'], lambda r: [
        r['method'], str(r['processes']), r['backend'], f"{r['step_ms']:.1f}",
        f"{r['single_step_ms']:.1f}", f"{r['scaling']:.2f} (ideal {r['processes']})",
        f"{r['loss_rel_diff']:.1e}"], 3)
    print()
    _rows(['SYSU report', 'matrix', 'evaluations', 'distance s', 'evaluate s', 'total s'],
          [rows['sysu_report']], lambda r: [
        r['device'], r['shape'], str(r['evaluations']), f"{r['distance_s']:.3f}",
        f"{r['evaluate_s']:.3f}", f"{r['report_s']:.3f}"], 5)


def _attempt(fn, *args, **kwargs) -> dict:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - one failed row must not hide the others
        traceback.print_exc()
        return {'skipped': f'failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}'}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dry', action='store_true',
                        help='tiny sizes on the CPU: proves the script runs (timings mean nothing)')
    parser.add_argument('--json', help='also write the rows as JSON here')
    parser.add_argument('--budget', type=float, default=420.0,
                        help='seconds after which no new row starts (default 420)')
    parser.add_argument('--steps', type=int, help='timed steps per row (default 20; --dry 2)')
    parser.add_argument('--warmup', type=int, help='warm-up steps per row (default 5; --dry 1)')
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry:
        print('error: no CUDA GPU is visible (torch.cuda.is_available() is False); '
              'run with --dry to check the script on a CPU', file=sys.stderr)
        return 2
    dry = args.dry
    device = torch.device('cpu' if dry else 'cuda')
    sizes = DRY if dry else FULL
    steps = args.steps or (2 if dry else 20)
    warmup = args.warmup or (1 if dry else 5)
    n_gpus = torch.cuda.device_count() if cuda else 0
    device_name = ('CPU (--dry: tiny sizes, timings mean nothing)' if dry else
                   f'{n_gpus} x {torch.cuda.get_device_name(0)}')
    if not dry:
        torch.backends.cudnn.benchmark = True
    print(f'torch {torch.__version__}, {device_name}, {os.cpu_count()} CPU cores')
    budget = Budget(args.budget)
    # everything the check writes (synthetic data, save dirs) lives here and goes at exit
    scratch = tempfile.mkdtemp(prefix='gpu-check-')
    atexit.register(shutil.rmtree, scratch, True)
    rows = {'device': device_name, 'dry': dry, 'torch': torch.__version__, 'steps': [],
            'loader': [], 'ddp': [], 'sysu_report': {}}
    fp32 = {}
    for method in ('xiv', 'idkl'):
        for amp in AMPS:
            if not budget.left():
                rows['steps'].append({'method': method, 'amp': amp,
                                      'skipped': 'skipped (time budget)'})
                continue
            if amp == 'fp16' and device.type != 'cuda':
                rows['steps'].append({'method': method, 'amp': amp,
                                      'skipped': 'refused on CPU (fp16 is CUDA only)'})
                continue
            row = _attempt(step_row, method, amp, sizes, device, warmup, steps)
            row.setdefault('method', method)
            row.setdefault('amp', amp)
            if amp == 'none' and 'skipped' not in row:
                fp32[method] = row
            if 'skipped' not in row and method in fp32:
                ref = fp32[method]['first_loss']
                row['rel_diff'] = abs(row['first_loss'] - ref) / max(abs(ref), 1e-12)
            rows['steps'].append(row)
            print(f'{method} amp={amp}: {row}', flush=True)
    if budget.left():
        from torchreid_vi.tools.synthesize import synthesize
        data_root = osp.join(scratch, 'data')
        t0 = time.time()
        synthesize('sysu_mm01', osp.join(data_root, 'SYSU-MM01'), seed=0,
                   num_ids=16 if dry else 80, size=(64, 32) if dry else (288, 144))
        print(f'synthetic SYSU-MM01 written in {time.time() - t0:.1f} s', flush=True)
        workers = 2 if dry else (os.cpu_count() or 1)
        for method in ('xiv', 'idkl'):
            row = (_attempt(loader_row, method, sizes, data_root,
                             osp.join(scratch, f'loader-{method}'), 3 if dry else 30, workers)
                   if budget.left() else {'skipped': 'skipped (time budget)'})
            row.setdefault('method', method)
            rows['loader'].append(row)
            print(f'loader {method}: {row}', flush=True)
    else:
        rows['loader'] = [{'method': m, 'skipped': 'skipped (time budget)'}
                          for m in ('xiv', 'idkl')]
    world, backend = (2, 'gloo') if dry else (n_gpus, 'nccl')
    for method in ('xiv', 'idkl'):
        if world < 2:
            row = {'skipped': f'needs 2+ GPUs ({n_gpus} visible)'}
        elif not budget.left():
            row = {'skipped': 'skipped (time budget)'}
        else:
            # the 1-process reference at the DDP rows' precision (bf16 on GPUs, fp32 on CPU)
            single = fp32.get(method) if dry else next(
                (r for r in rows['steps'] if r.get('method') == method and r.get('amp') == 'bf16'
                 and 'skipped' not in r), None)
            row = (_attempt(ddp_row, method, sizes, world, backend, warmup, steps, single)
                   if single else {'skipped': 'no 1-process row to compare with'})
        row.setdefault('method', method)
        rows['ddp'].append(row)
        print(f'ddp {method}: {row}', flush=True)
    rows['sysu_report'] = (_attempt(sysu_report_row, device, scratch) if budget.left()
                           else {'skipped': 'skipped (time budget)'})
    print_table(rows, device_name)
    print(f'\ngpu_check: {time.time() - budget.start:.0f} s; load average '
          f'{os.getloadavg()[0]:.1f}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)
    failed = [r for r in rows['steps'] + rows['loader'] + rows['ddp'] + [rows['sysu_report']]
              if str(r.get('skipped', '')).startswith('failed')]
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
