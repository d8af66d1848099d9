"""Cost of one training step of a method's engine vs torchreid's ``ImageTripletEngine``.

Usage::

    python benchmarks/bench_train_step.py --method xiv            # default: small, a few minutes
    python benchmarks/bench_train_step.py --method idkl --backbone-size full \\
        --height 256 --width 128

What is measured
----------------
* **time**: the median wall time of ``engine.forward_backward(batch)`` (forward, loss, backward,
  optimizer step; on GPU with ``torch.cuda.synchronize()`` before and after), over ``--steps``
  steps after ``--warmup`` steps, for

  - the method's engine (``xiv`` / ``idkl`` / any registered engine with a ``<method>_<backbone>``
    model) on a modality-balanced batch of 2PK images (P identities × K visible + K infrared, the
    ModalityBalancedSampler's layout);
  - torchreid's ``ImageTripletEngine`` (ID + batch-hard triplet, Adam) on torchreid's ResNet of
    the same depth with last stride 1, fed **the same number of images the method's backbone
    sees**: 3PK for XIV (its X block adds PK images inside the step: the paper's 3M batch), 2PK
    for IDKL and others.

  Both run in the same process, interleaved step by step (so machine load affects both alike),
  on the same random tensors (no data loading, no augmentation: that cost is the same for both).
  The ratio method / torchreid is printed; XIV's target is <= 1.15.
* **FLOP bound**: the floating-point operations of one ``forward_backward`` of each engine on
  its batch, counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix
  products, forward and backward; elementwise ops, normalisation and the optimizer update are
  not counted). Their ratio is the step-time ratio the extra FLOPs alone would give; the report
  prints how far the measured ratio is above (or below) that bound. For IDKL the second
  layer3 + layer4 makes its network about 1.7x a ResNet with last stride 1.
* **profile** (``--profile N``): the N operators with the largest self CPU time (and CUDA time
  on a GPU) of one step of each engine (``torch.profiler``), to see where the time goes when
  the measured ratio is above the FLOP bound.
* **memory** (each engine alone in a fresh subprocess, so the numbers do not mix):

  - GPU: ``torch.cuda.max_memory_allocated()`` over the measured steps (model, optimizer state,
    activations, gradients), in MiB;
  - CPU: the growth of the process's peak resident set from just before the first step to
    after the last one, in MiB (Linux: ``VmHWM`` of ``/proc/self/status``, reset first through
    ``/proc/self/clear_refs``; elsewhere ``resource.getrusage(RUSAGE_SELF).ru_maxrss``). That
    covers the optimizer state created at the first step, activations and gradients, not the
    model weights or the libraries (``tracemalloc`` cannot see torch's allocations).

Defaults (``--backbone-size small``: ResNet-18, 128×64, P=4, K=4) finish in a few minutes on
2 CPU cores; ``--backbone-size full --height 256 --width 128 --p 8 --k 6`` is the paper's
XIV setting (ResNet-50), best run on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BACKBONES = {'small': 'resnet18', 'full': 'resnet50'}
# Images the method's backbone sees per step, from P and K (K = images per identity per modality).
BACKBONE_IMAGES = {'xiv': lambda p, k: 3 * p * k}
NUM_CLASSES = 100


def _datamanager(args):
    """The attributes an engine reads at construction; no loaders (batches are passed in)."""
    return SimpleNamespace(train_loader=None, test_loader={}, num_train_pids=NUM_CLASSES,
                           height=args.height, width=args.width, sources=['sysu_mm01'],
                           targets=['sysu_mm01'])


def _config(args):
    from torchreid_vi.config import get_default_config
    cfg = get_default_config()
    cfg.engine.name = args.method
    cfg.model.name = f'{args.method}_{BACKBONES[args.backbone_size]}'
    cfg.model.pretrained = False
    cfg.data.height, cfg.data.width = args.height, args.width
    cfg.sampler.train_sampler = 'ModalityBalancedSampler'
    cfg.sampler.num_instances = args.k
    cfg.train.batch_size = 2 * args.p * args.k
    cfg.use_gpu = args.device == 'cuda'
    return cfg


def _optimizer(model):
    from torchreid_vi._torchreid import tr
    return tr.optim.build_optimizer(model, optim='adam', lr=3.5e-4, weight_decay=5e-4)


def build_method(args):
    """``(engine, batch)``: the registered method engine and a modality-balanced 2PK batch."""
    from torchreid_vi.cli import build_model
    from torchreid_vi.registration import register_all
    from torchreid_vi.registry import ENGINES
    register_all()
    cfg = _config(args)
    model = build_model(cfg, NUM_CLASSES).to(args.device)  # with the method's model options
    engine = ENGINES.get(args.method)(cfg, _datamanager(args), model, _optimizer(model), None)
    p, k = args.p, args.k
    pids = torch.arange(p).repeat_interleave(k).repeat(2)          # [v(p1..pP), r(p1..pP)]
    modality = torch.cat([torch.zeros(p * k), torch.ones(p * k)]).long()
    batch = {'img': torch.randn(2 * p * k, 3, args.height, args.width), 'pid': pids,
             'modality': modality, 'dsetid': modality.clone(), 'camid': modality + 1,
             'impath': [''] * (2 * p * k)}
    return engine, batch


def build_baseline(args):
    """``(engine, batch)``: torchreid's ImageTripletEngine on a last-stride-1 torchreid ResNet."""
    from torchreid_vi._torchreid import tr
    from torchreid_vi.modeling.backbones import torchreid_resnet
    model = torchreid_resnet(BACKBONES[args.backbone_size], num_classes=NUM_CLASSES,
                             loss='triplet', last_stride=1).to(args.device)
    engine = tr.engine.ImageTripletEngine(_datamanager(args), model, _optimizer(model),
                                          margin=0.3, weight_t=1, weight_x=1,
                                          use_gpu=args.device == 'cuda', label_smooth=False)
    n = BACKBONE_IMAGES.get(args.method, lambda p, k: 2 * p * k)(args.p, args.k)
    per_id = n // args.p
    batch = {'img': torch.randn(n, 3, args.height, args.width),
             'pid': torch.arange(args.p).repeat_interleave(per_id)}
    return engine, batch


def _sync(device):
    if device == 'cuda':
        torch.cuda.synchronize()


def _step(engine, batch, device) -> float:
    engine.set_model_mode('train')
    _sync(device)
    t0 = time.perf_counter()
    engine.forward_backward(batch)
    _sync(device)
    return time.perf_counter() - t0


def step_flops(engine, batch) -> int:
    """FLOPs of one ``forward_backward(batch)`` (``FlopCounterMode``: conv + matmul, forward and
    backward). It is a real training step: the weights move, like a warm-up step."""
    from torch.utils.flop_counter import FlopCounterMode
    engine.set_model_mode('train')
    with FlopCounterMode(display=False) as counter:
        engine.forward_backward(batch)
    return int(counter.get_total_flops())


def profile_step(engine, batch, device, top: int) -> str:
    """Table of the ``top`` operators by self CPU (and CUDA) time of one training step."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == 'cuda' else [])
    engine.set_model_mode('train')
    with profile(activities=activities) as prof:
        engine.forward_backward(batch)
        _sync(device)
    key = 'self_cuda_time_total' if device == 'cuda' else 'self_cpu_time_total'
    return prof.key_averages().table(sort_by=key, row_limit=top)


def memory_worker(args) -> dict:
    """Run one engine alone (``args.memory_worker`` = 'method' | 'baseline'); report its peak."""
    torch.manual_seed(0)
    engine, batch = (build_method if args.memory_worker == 'method' else build_baseline)(args)
    if args.device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _peak_rss_mib(reset=True)
    for _ in range(args.warmup + 2):
        _step(engine, batch, args.device)
    after = _peak_rss_mib()
    if args.device == 'cuda':
        return {'peak_mib': torch.cuda.max_memory_allocated() / 2 ** 20, 'kind': 'cuda_peak'}
    return {'peak_mib': after - before, 'kind': 'rss_growth'}


def _peak_rss_mib(reset: bool = False) -> float:
    """Peak resident set of this process in MiB (with ``reset``: the current RSS, after
    resetting the peak where Linux allows it).

    On Linux, ``VmHWM`` of ``/proc/self/status`` is used and reset through
    ``/proc/self/clear_refs``: ``ru_maxrss`` can carry the peak of the parent process into a
    child, which would hide the child's own growth.
    """
    try:
        if reset:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # 5: reset the peak RSS (VmHWM) to the current RSS
        fields = dict(line.split(':', 1) for line in open('/proc/self/status'))
        return int(fields['VmRSS' if reset else 'VmHWM'].split()[0]) / 1024
    except OSError:
        scale = 1 if sys.platform == 'darwin' else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20


def _memory(args, which: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), '--memory-worker', which] + [
        a for a in sys.argv[1:] if a != '--no-memory']
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f'memory worker "{which}" failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--method', default='xiv', help='registered engine name (xiv, idkl)')
    p.add_argument('--backbone-size', default='small', choices=sorted(BACKBONES),
                   help='small = ResNet-18, full = ResNet-50 (the papers)')
    p.add_argument('--height', type=int, default=128)
    p.add_argument('--width', type=int, default=64)
    p.add_argument('--p', type=int, default=4, help='identities per batch')
    p.add_argument('--k', type=int, default=4, help='images per identity per modality')
    p.add_argument('--steps', type=int, default=10, help='measured steps per engine')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--no-memory', action='store_true', help='skip the memory subprocesses')
    p.add_argument('--profile', type=int, default=0, metavar='N',
                   help='print the N most expensive operators of one step of each engine')
    p.add_argument('--json', default='', help='also write the results to this file')
    p.add_argument('--memory-worker', default='', help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.memory_worker:
        print(json.dumps(memory_worker(args)))
        return 0

    mem = {} if args.no_memory else {w: _memory(args, w) for w in ('method', 'baseline')}
    torch.manual_seed(0)
    method, method_batch = build_method(args)
    base, base_batch = build_baseline(args)
    n_method = 2 * args.p * args.k
    n_base = len(base_batch['img'])
    print(f'{args.method} ({method.model.__class__.__name__}, loader batch {n_method}) vs '
          f'torchreid ImageTripletEngine (ResNet last stride 1, batch {n_base}); '
          f'{BACKBONES[args.backbone_size]} {args.height}x{args.width}, P={args.p} K={args.k}, '
          f'{args.device}, {torch.get_num_threads()} threads')
    flops = {'method': step_flops(method, method_batch), 'baseline': step_flops(base, base_batch)}
    flop_ratio = flops['method'] / flops['baseline']
    print(f'FLOPs per step (FlopCounterMode, conv + matmul, forward + backward): {args.method} '
          f'{flops["method"] / 1e9:.2f} GFLOP, torchreid triplet {flops["baseline"] / 1e9:.2f} '
          f'GFLOP -> FLOP-bound step-time ratio {flop_ratio:.3f}')
    if args.profile:
        for name, engine, batch in (('method', method, method_batch),
                                    ('baseline', base, base_batch)):
            print(f'--- profile of one step: '
                  f'{args.method if name == "method" else "torchreid triplet"}')
            print(profile_step(engine, batch, args.device, args.profile))
    times = {'method': [], 'baseline': []}
    for i in range(args.warmup + args.steps):
        order = (('method', method, method_batch), ('baseline', base, base_batch))
        for name, engine, batch in (order if i % 2 == 0 else order[::-1]):
            dt = _step(engine, batch, args.device)
            if i >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {'method': args.method, 'backbone': BACKBONES[args.backbone_size],
              'height': args.height, 'width': args.width, 'p': args.p, 'k': args.k,
              'device': args.device, 'steps': args.steps,
              'method_step_s': med['method'], 'baseline_step_s': med['baseline'],
              'ratio': med['method'] / med['baseline'],
              'method_gflop': flops['method'] / 1e9, 'baseline_gflop': flops['baseline'] / 1e9,
              'flop_ratio': flop_ratio,
              'over_flop_bound': med['method'] / med['baseline'] / flop_ratio - 1,
              'loadavg_1min': os.getloadavg()[0] if hasattr(os, 'getloadavg') else None}
    print(f'median step: {args.method} {med["method"] * 1e3:.1f} ms, torchreid triplet '
          f'{med["baseline"] * 1e3:.1f} ms -> ratio {result["ratio"]:.3f}'
          + (' (XIV target <= 1.15)' if args.method == 'xiv' else ''))
    print(f'FLOP bound {flop_ratio:.3f}: the measured ratio is '
          f'{100 * result["over_flop_bound"]:+.1f} % from it (time per FLOP: {args.method} '
          f'{med["method"] / flops["method"] * 1e12:.1f} ps, '
          f'torchreid triplet {med["baseline"] / flops["baseline"] * 1e12:.1f} ps)'
          + (f'; load average {result["loadavg_1min"]:.2f}'
             if result['loadavg_1min'] is not None else ''))
    if mem:
        what = ('peak allocated (torch.cuda.max_memory_allocated)' if args.device == 'cuda'
                else 'peak RSS growth during the training steps (VmHWM, else ru_maxrss)')
        result.update({'method_mem_mib': mem['method']['peak_mib'],
                       'baseline_mem_mib': mem['baseline']['peak_mib'], 'memory_kind': what})
        print(f'memory, {what}: {args.method} {mem["method"]["peak_mib"]:.0f} MiB, torchreid '
              f'triplet {mem["baseline"]["peak_mib"]:.0f} MiB')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
