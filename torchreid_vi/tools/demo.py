"""``make demo``: synthesise a SYSU-MM01-layout dataset, train XIV on it, evaluate, draw pictures.

Usage::

    python -m torchreid_vi.tools.demo --out demo [--method xiv] [--num-ids 100] [-- key value ...]

Steps (each prints where its output went):

1. ``<out>/data/SYSU-MM01``: synthetic data in the real layout (``torchreid_vi.tools.synthesize``);
2. ``<out>/<method>``: training + full SYSU evaluation (all/indoor × single/multi-shot × 10
   trials) through the command line with the packaged config ``demo/<method>_synthetic``; logs,
   checkpoints, ``results.json``, tensorboard events and ranked-result pictures (``visrank/``);
3. for XIV, ``<out>/xiv/figures``: visible / X / infrared triplets and channel histograms;
4. ``<out>/SUMMARY.md``: the results table next to the chance level (the same protocol evaluated
   on random distances), so "well above chance" is a number, not a claim.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import sys
import time

import numpy as np

__all__ = ['main', 'chance_level']

def chance_level(data_root: str, dataset: str = 'sysu_mm01', seed: int = 0,
                 options: dict = None) -> dict:
    """Mean metrics of every setting when the distances are random (uniform): the chance level."""
    from ..config import get_default_config
    from ..evaluation.evaluator import CrossModalEvaluator
    from ..registry import DATASETS
    from ..registration import register_all
    register_all()
    qset = DATASETS.get(dataset)(root=data_root, mode='query', verbose=False, **(options or {}))
    evaluator = CrossModalEvaluator.from_config(get_default_config())
    return {k: r.mean for k, r in evaluator.chance_level(dataset, qset, seed).items()}


def _table(results_json: str, chance: dict) -> str:
    data = json.load(open(results_json))
    final = [e for e in data['evaluations'] if e.get('final')] or data['evaluations'][-1:]
    lines = ['| setting | rank-1 | rank-10 | mAP | mINP | chance rank-1 | chance mAP |',
             '|---|---|---|---|---|---|---|']
    for ev in final:
        for key, res in ev['metrics'].items():
            m, c = res['mean'], chance.get(key, {})
            lines.append(f"| {key} | {100 * m['rank1']:.2f} | {100 * m['rank10']:.2f} | "
                         f"{100 * m['mAP']:.2f} | {100 * m['mINP']:.2f} | "
                         f"{100 * c.get('rank1', float('nan')):.2f} | "
                         f"{100 * c.get('mAP', float('nan')):.2f} |")
    return '\n'.join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default='demo', help='output folder')
    p.add_argument('--method', default='xiv', choices=['xiv', 'idkl'])
    p.add_argument('--num-ids', type=int, default=None,
                   help='synthetic SYSU identities (default: the generator default)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('opts', nargs=argparse.REMAINDER, help='extra "key value" config options')
    args = p.parse_args(argv)

    from .. import cli
    from .synthesize import synthesize

    out = osp.abspath(args.out)
    data_root = osp.join(out, 'data')
    sysu = osp.join(data_root, 'SYSU-MM01')
    t0 = time.time()
    if not osp.isdir(sysu):
        manifest = synthesize('sysu_mm01', sysu, seed=args.seed, num_ids=args.num_ids)
        tr_ids = len(manifest['splits']['train']['vis']['ids'])
        print(f'[demo] synthetic SYSU-MM01 ({tr_ids} train ids) -> {sysu} '
              f'({time.time() - t0:.1f}s)')
    else:
        print(f'[demo] reusing synthetic data in {sysu}')

    config = f'demo/{args.method}_synthetic'
    save_dir = osp.join(out, args.method)
    opts = [o for o in args.opts if o != '--']
    t1 = time.time()
    rc = cli.main(['--config-file', config, '--root', data_root, 'data.save_dir', save_dir]
                  + opts)
    if rc:
        return rc
    print(f'[demo] training + evaluation: {time.time() - t1:.0f}s -> {save_dir}')

    ckpts = sorted((f for f in os.listdir(osp.join(save_dir, 'model')) if '.pth.tar-' in f),
                   key=lambda f: int(f.rsplit('-', 1)[1]))
    if args.method == 'xiv':
        from ..methods.xiv import figures
        figures.main(['--config-file', config, '--root', data_root,
                          '--load-weights', osp.join(save_dir, 'model', ckpts[-1]),
                          '--out', osp.join(save_dir, 'figures')])

    chance = chance_level(data_root)
    table = _table(osp.join(save_dir, 'results.json'), chance)
    summary = osp.join(out, 'SUMMARY.md')
    with open(summary, 'w') as f:
        f.write(f'# torchreid_vi demo: {args.method} on synthetic SYSU-MM01\n\n'
                'Synthetic data (not the real SYSU-MM01); means over 10 trials, in %. '
                '"chance" = the same protocol on random distances.\n\n'
                f'{table}\n\nResults: {save_dir}/results.json\n'
                f'Ranked results: {save_dir}/visrank/\n')
    print(table)
    print(f'[demo] done in {time.time() - t0:.0f}s; summary -> {summary}')
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
