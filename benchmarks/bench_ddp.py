"""Two gloo processes against one: same gradients, and what the second process costs or buys.

One training step of a method's engine (default XIV, ``xiv_resnet18``) on one fixed
modality-balanced global batch is run

* in **one process** on the whole batch (``torch`` threads: ``--threads``, default all cores);
* in **two processes** under ``torch.distributed`` (gloo, the CPU backend; one thread each, so
  both runs use the same cores), each on its rank's slice, with the method's losses computed on
  the gathered global batch (``vi.dist.global_loss``), SyncBatchNorm and DDP averaging.

It prints the largest gradient difference of the two (relative to each tensor's largest
gradient, tensors that are zero in exact arithmetic measured against 1e-5 of the model's
largest gradient) and the ratio of the step times (2 processes / 1 process; below 1 the second
process pays off on these cores). Optimizer: SGD with lr 0, so every timed step does the same
work. The last line is::

    ddp: grad_max_rel_diff=<x> step_ratio_2proc=<y>

Usage::

    python benchmarks/bench_ddp.py [--engine xiv|idkl|triplet] [--steps 8] [--dtype float32]
                                   [--height 128] [--width 64] [--ids 4] [--per-id 2]

float32 is what training runs; ``--dtype float64`` isolates the implementation from rounding
(the convolutions of a half batch round differently from those of the whole one).
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
import tempfile

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..'))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from train_steps import StepRunner, engine_config, max_relative_difference  # noqa: E402


def timed_steps(args):
    """``(gradients of the first step, seconds per step over the timed steps)`` of this
    process (its rank's slice under a process group)."""
    cfg = engine_config(args.engine, opts=['data.height', str(args.height),
                                            'data.width', str(args.width), *args.opts])
    runner = StepRunner(cfg, args.ids, args.per_id, torch.device('cpu'),
                        dtype=getattr(torch, args.dtype), no_dropout=True)
    batch = runner.batch()
    runner.step(batch)
    grads = runner.gradients()
    seconds, _ = runner.time_steps(batch, args.warmup, args.steps)
    return grads, seconds


def _worker(rank, world, init_file, out_file, args):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    grads, seconds = timed_steps(args)
    if rank == 0:
        torch.save({'grads': grads, 'seconds': seconds}, out_file)
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--engine', default='xiv', choices=('xiv', 'idkl', 'triplet'))
    parser.add_argument('--steps', type=int, default=8, help='timed steps (default 8)')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--dtype', default='float32', choices=('float32', 'float64'))
    parser.add_argument('--height', type=int, default=128)
    parser.add_argument('--width', type=int, default=64)
    parser.add_argument('--ids', type=int, default=4, help='identities per batch (P)')
    parser.add_argument('--per-id', type=int, default=2, help='images per id and modality (K)')
    parser.add_argument('--threads', type=int, default=os.cpu_count(),
                        help='torch threads of the single process (default: all cores)')
    parser.add_argument('opts', nargs='*', metavar='KEY VALUE',
                        help='config overrides for both runs, e.g. vi.dist.global_loss False '
                             '(what a per-rank loss changes and saves)')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    single_grads, single_s = timed_steps(args)
    with tempfile.TemporaryDirectory() as tmp:
        out = osp.join(tmp, 'two.pt')
        mp.spawn(_worker, args=(2, osp.join(tmp, 'init'), out, args), nprocs=2, join=True)
        two = torch.load(out, weights_only=False)
    if two['grads'].keys() != single_grads.keys():
        print('the two runs train different parameters:',
              sorted(set(two['grads']) ^ set(single_grads)))
        return 1
    diff = max_relative_difference(single_grads, two['grads'])
    ratio = two['seconds'] / single_s
    overrides = ''.join(f', {k} {v}' for k, v in zip(args.opts[::2], args.opts[1::2]))
    print(f'{args.engine} ({args.dtype}, global batch {2 * args.ids * args.per_id} at '
          f'{args.height}x{args.width}{overrides}): 1 process ({args.threads} threads) '
          f'{single_s * 1e3:.0f} ms/step, 2 gloo processes (1 thread each) '
          f'{two["seconds"] * 1e3:.0f} ms/step; load average {os.getloadavg()[0]:.1f}')
    print(f'ddp: grad_max_rel_diff={diff:.2e} step_ratio_2proc={ratio:.2f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
