"""``make demo``: synthesise a SYSU-MM01-layout dataset, train XIV on it, evaluate, draw pictures.

Usage::

    python -m torchreid_vi.tools.demo --out demo [--method xiv] [--baseline] [-- key value ...]

Steps (each prints where its output went and how long it took):

1. ``<out>/data/SYSU-MM01``: synthetic data in the real layout (``torchreid_vi.tools.synthesize``
   with :data:`DEMO_DATA`: more training identities than the generator's default, the test split
   kept at 24 identities); reused when ``<out>/data/synthetic.json`` says it was made with the
   same arguments, re-made otherwise;
2. ``<out>/<method>``: training + full SYSU evaluation (all/indoor × single/multi-shot × 10
   trials) through the command line with the packaged config ``demo/<method>_synthetic``; logs,
   checkpoint, ``results.json``, tensorboard events and ranked-result pictures (``visrank/``);
3. for XIV, ``<out>/xiv_baseline``: the same budget without the X modality (the paper's Table-4
   "baseline": ``xiv.use_x False xiv.use_cmg False xiv.fusion False``; only with ``--baseline``:
   it does not fit the 5-minute budget);
4. for XIV, ``<out>/xiv/figures``: visible / X / infrared triplets and channel histograms;
5. ``<out>/<method>/cmc.png`` (CMC of the 4 settings with the chance curves) and
   ``training.png`` (every loss term and the learning rate against the step), by
   ``torchreid_vi.tools.plot_run``; ``chance.json`` beside ``results.json``;
6. ``<out>/SUMMARY.md``: the results next to the chance level (the same protocol evaluated on
   random distances), the baseline row, links to the pictures, and the wall time per stage with
   the machine's load average (the demo is timed on shared 2-core machines).

Threads: on a busy machine, OpenMP worker threads that spin while waiting for a descheduled
sibling make a training step many times slower (measured here: 2 threads at load ~6 went from
0.3 s to 4-15 s per step, against 1.2-1.8 s with passive waiting). Run as a program, the demo
therefore re-starts itself once with ``OMP_WAIT_POLICY=PASSIVE`` unless ``OMP_WAIT_POLICY`` is
already set (libgomp reads it only when it is loaded, i.e. when torch is imported).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import os.path as osp
import shutil
import sys
import time
from typing import Dict, List, Optional, Tuple

from ..results import read_results, run_config

__all__ = ['main', 'chance_level', 'DEMO_DATA', 'BASELINE_OPTS', 'StageClock', 'training_span',
           'summary_markdown']

# The synthetic SYSU-MM01 of `make demo` (arguments of tools.synthesize.make_sysu). num_ids is the
# pid range 1..N (1/6 of it are gaps, 1/30 single-camera pids, the rest "available"); of the
# available ids, num_test_ids are the test split (query/gallery) and the rest train + val
# (both trained on). 24 test ids is the test split of the generator's default 60 ids, so the
# chance level (rank-1 ~4 %) is the one the first version of the demo was compared with; the
# larger pid range only adds training identities (530 -> 400 trained ids, 67 steps per epoch).
# tests/test_synthesize.py checks at exactly these arguments that training-free descriptors stay
# <= 25 % rank-1 IR->VIS.
DEMO_DATA = {'seed': 0, 'num_ids': 530, 'num_test_ids': 24, 'size': (64, 32)}
# The paper's Table-4 "baseline" row: L_V + L_I only (no X block, no CMG, no test-time fusion).
BASELINE_OPTS = ['xiv.use_x', 'False', 'xiv.use_cmg', 'False', 'xiv.fusion', 'False']
# The baseline run costs ~2/3 of the XIV run (no X block): off by default to keep `make demo`
# within 5 minutes on 2 cores (--baseline adds it; README.md gives what it measured).
RUN_BASELINE = False
_STAMP = 'synthetic.json'  # in <out>/data, beside (not inside) the dataset root


def chance_level(data_root: str, dataset: str = 'sysu_mm01', seed: int = 0,
                 options: dict = None) -> dict:
    """Mean metrics of every setting when the distances are random (uniform): the chance level.

    Returns ``{setting key: {'rank1', ..., 'mAP', 'mINP'}}`` (fractions)."""
    from .plot_run import chance_results
    return {k: v['mean'] for k, v in chance_results(data_root, dataset, options, seed).items()}


# ------------------------------------------------------------------------------------------------
# timing

class StageClock:
    """Wall time per named stage (seconds) and the load average (1 / 5 / 15 min) at the start and
    the end (``os.getloadavg``; ``None`` where the platform has none).

    The clock starts when the process started (Linux: ``/proc/self/stat``, which an ``exec``
    keeps), so the interpreter start, the imports and the demo's re-start are counted: the
    first stage (``python start + imports``) covers them. Elsewhere it starts at construction.
    """

    def __init__(self):
        now = time.perf_counter()
        age = _process_age()
        self.start = now - age if age is not None and age >= 0 else now
        self.stages: List[Tuple[str, float]] = []
        self.load_start = _loadavg()
        self._last = self.start
        if now - self.start > 0.05:
            self.lap('python start + imports')

    def lap(self, name: str, seconds: Optional[float] = None) -> float:
        """Close stage ``name`` (its time since the previous lap, or ``seconds``) and print it."""
        now = time.perf_counter()
        took = now - self._last if seconds is None else float(seconds)
        self._last = now
        self.stages.append((name, took))
        print(f'[demo] {name}: {took:.1f} s (load average {_fmt_load(_loadavg())})')
        return took

    def split(self, name: str, parts: List[Tuple[str, float]]) -> None:
        """Close a stage measured as a whole but reported in parts (seconds that add up to it)."""
        now = time.perf_counter()
        whole = now - self._last
        self._last = now
        rest = whole - sum(s for _, s in parts)
        for part, seconds in parts[:-1] + [(parts[-1][0], parts[-1][1] + rest)]:
            self.stages.append((f'{name}: {part}', seconds))
        print(f'[demo] {name}: {whole:.1f} s (' + ', '.join(
            f'{p} {s:.1f} s' for p, s in self.stages[-len(parts):]) +
            f'; load average {_fmt_load(_loadavg())})')

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def _process_age() -> Optional[float]:
    """Seconds since this process started (Linux ``/proc``, 10 ms resolution), else ``None``."""
    try:
        with open('/proc/self/stat') as f:
            ticks = int(f.read().rsplit(')', 1)[1].split()[19])  # field 22: starttime (ticks)
        with open('/proc/uptime') as f:
            uptime = float(f.read().split()[0])
        return uptime - ticks / os.sysconf('SC_CLK_TCK')
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _loadavg() -> Optional[Tuple[float, float, float]]:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def _fmt_load(load) -> str:
    return 'n/a' if load is None else ' / '.join(f'{v:.2f}' for v in load)


def training_span(save_dir: str) -> Optional[Tuple[float, float]]:
    """``(first, last)`` wall-clock times (seconds since the epoch) of the ``Train/loss`` scalars
    in the tensorboard events of ``save_dir``: when the first and the last training step ended.
    ``None`` without events. Splits a run's wall time into setup / training / evaluation."""
    if not glob.glob(osp.join(save_dir, 'events.out.tfevents.*')):
        return None
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(save_dir, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    if 'Train/loss' not in acc.Tags().get('scalars', []):
        return None
    walls = [e.wall_time for e in acc.Scalars('Train/loss')]
    return min(walls), max(walls)


# ------------------------------------------------------------------------------------------------
# steps

def prepare_data(out: str, data_args: dict) -> str:
    """Synthesise ``<out>/data/SYSU-MM01`` with ``data_args`` (or reuse it when the stamp
    ``<out>/data/synthetic.json`` holds the same arguments); returns the data root ``<out>/data``.

    Raises ``FileExistsError`` when ``<out>/data/SYSU-MM01`` exists without a stamp (not made by
    the demo: it is never deleted)."""
    from .synthesize import synthesize
    data_root = osp.join(out, 'data')
    sysu = osp.join(data_root, 'SYSU-MM01')
    stamp = osp.join(data_root, _STAMP)
    wanted = {k: list(v) if isinstance(v, tuple) else v for k, v in data_args.items()}
    if osp.isdir(sysu):
        if not osp.isfile(stamp):
            raise FileExistsError(f'{sysu} exists but {stamp} does not: it was not made by the '
                                  f'demo; remove it or use another --out')
        with open(stamp) as f:
            made = json.load(f).get('arguments')
        if made == wanted:
            print(f'[demo] reusing synthetic data in {sysu} ({_STAMP}: {made})')
            return data_root
        print(f'[demo] {sysu} was made with {made}, the demo now uses {wanted}: re-making it')
        shutil.rmtree(sysu)
    manifest = synthesize('sysu_mm01', sysu, workers=os.cpu_count() or 1, **data_args)  # same bytes
    ids = manifest['ids']
    info = {'arguments': wanted, 'train_ids': len(ids['train']) + len(ids['val']),
            'test_ids': len(ids['test']),
            'train_images': {m: manifest['splits']['train'][m]['num_images']
                             for m in ('vis', 'ir')},
            'query_images': manifest['splits']['query']['ir']['num_images'],
            'gallery_pool_images': manifest['splits']['gallery']['vis']['num_images']}
    with open(stamp, 'w') as f:
        json.dump(info, f, indent=1)
    print(f'[demo] synthetic SYSU-MM01: {info["train_ids"]} train ids '
          f'({sum(info["train_images"].values())} images), {info["test_ids"]} test ids -> {sysu}')
    return data_root


def train_and_evaluate(clock: StageClock, stage: str, config: str, data_root: str, save_dir: str,
                       opts: List[str]) -> int:
    """One command-line run (training + the final 4-setting evaluation); its time is split into
    setup (data, model), training and evaluation (+ checkpoint, ranked-result pictures) from the
    wall times of the run's first and last training steps."""
    from .. import cli
    t0 = time.time()
    rc = cli.main(['--config-file', config, '--root', data_root, 'data.save_dir', save_dir] + opts)
    t1 = time.time()
    span = training_span(save_dir) if rc == 0 else None
    if span is None:
        clock.lap(stage)
    else:
        first, last = span
        clock.split(stage, [('setup + first step', first - t0), ('training', last - first),
                            ('evaluation', t1 - last)])
    return rc


def _final_metrics(results_json: str) -> Dict[str, dict]:
    data = read_results(results_json)
    final = [e for e in data['evaluations'] if e.get('final')] or data['evaluations'][-1:]
    return {k: v['mean'] for ev in final for k, v in ev['metrics'].items()}


def _pct(v) -> str:
    return 'n/a' if v is None else f'{100 * v:.2f}'


def summary_markdown(method: str, metrics: Dict[str, dict], chance: Dict[str, dict],
                     baseline: Optional[Dict[str, dict]], clock_rows: List[Tuple[str, float]],
                     total: float, load_start, load_end, data_info: dict, train_info: dict,
                     links: Dict[str, str], notes: List[str]) -> str:
    """The text of ``SUMMARY.md`` (metrics are fractions; printed in %)."""
    lines = [f'# torchreid_vi demo: {method} on synthetic SYSU-MM01', '',
             'Synthetic data (not the real SYSU-MM01): procedurally drawn people seen by 4 visible '
             'and 2 near-infrared cameras (`torchreid_vi.tools.synthesize`). '
             f'{data_info.get("train_ids", "?")} training identities, '
             f'{data_info.get("test_ids", "?")} test identities '
             f'({data_info.get("query_images", "?")} infrared queries); '
             f'{train_info.get("text", "")}. Means over 10 trials, in %. "chance" = the same '
             'protocol on random distances.', '',
             '| setting | rank-1 | rank-10 | mAP | mINP | chance rank-1 | chance mAP |',
             '|---|---|---|---|---|---|---|']
    for key, m in metrics.items():
        c = chance.get(key, {})
        lines.append(f'| {key} | {_pct(m.get("rank1"))} | {_pct(m.get("rank10"))} | '
                     f'{_pct(m.get("mAP"))} | {_pct(m.get("mINP"))} | {_pct(c.get("rank1"))} | '
                     f'{_pct(c.get("mAP"))} |')
    if baseline is not None:
        lines += ['', '## The X modality, same budget (paper Table 4, all-search single-shot)', '',
                  '| model | rank-1 | mAP | chance rank-1 | chance mAP |', '|---|---|---|---|---|']
        key = next((k for k in metrics if '/all/single/' in k), next(iter(metrics)))
        c = chance.get(key, {})
        lines.append(f'| baseline (L_V + L_I; no X, no CMG, no fusion) | '
                     f'{_pct(baseline.get(key, {}).get("rank1"))} | '
                     f'{_pct(baseline.get(key, {}).get("mAP"))} | {_pct(c.get("rank1"))} | '
                     f'{_pct(c.get("mAP"))} |')
        lines.append(f'| XIV (+X +CMG, fused test distance) | {_pct(metrics[key].get("rank1"))} | '
                     f'{_pct(metrics[key].get("mAP"))} | {_pct(c.get("rank1"))} | '
                     f'{_pct(c.get("mAP"))} |')
        lines += ['', 'All four settings of the baseline: `' + links.get('baseline_results', '') +
                  '`.']
    if links.get('cmc') or links.get('training'):
        lines += ['', '## Pictures', '']
        for what, label in (('cmc', 'CMC of the 4 settings, chance dashed'),
                            ('training', 'loss terms and learning rate against the step'),
                            ('triplets', 'visible / X / infrared'),
                            ('histograms', 'mean channel intensity, visible vs X')):
            if links.get(what):
                lines.append(f'![{label}]({links[what]})')
                lines.append('')
        if links.get('visrank'):
            lines.append(f'Ranked results (trial 0, first queries of each setting): '
                         f'`{links["visrank"]}`')
    lines += ['', '## Wall time', '', '| stage | seconds |', '|---|---|']
    lines += [f'| {name} | {seconds:.1f} |' for name, seconds in clock_rows]
    lines += [f'| **total** | **{total:.1f}** |', '',
              f'Load average (1 / 5 / 15 min) at the start {_fmt_load(load_start)}, at the end '
              f'{_fmt_load(load_end)}; {os.cpu_count()} CPUs; torch threads '
              f'{train_info.get("threads", "?")}; OMP_WAIT_POLICY='
              f'{os.environ.get("OMP_WAIT_POLICY", "(unset)")}.']
    if notes:
        lines += [''] + [f'Note: {n}' for n in notes]
    return '\n'.join(lines) + '\n'


def _rel(path: str, start: str) -> str:
    return osp.relpath(path, start).replace(os.sep, '/')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default='demo', help='output folder')
    p.add_argument('--method', default='xiv', choices=['xiv', 'idkl'])
    p.add_argument('--num-ids', type=int, default=None,
                   help=f'synthetic SYSU pid range (default {DEMO_DATA["num_ids"]})')
    p.add_argument('--num-test-ids', type=int, default=None,
                   help=f'identities in the test split (default {DEMO_DATA["num_test_ids"]})')
    p.add_argument('--seed', type=int, default=DEMO_DATA['seed'], help='synthetic data seed')
    p.add_argument('--baseline', action=argparse.BooleanOptionalAction, default=RUN_BASELINE,
                   help='XIV: also train the same budget without the X modality (Table-4 '
                        'baseline); it does not fit the 5-minute budget on 2 cores')
    p.add_argument('opts', nargs=argparse.REMAINDER, help='extra "key value" config options')
    args = p.parse_args(argv)
    import torch

    clock = StageClock()
    out = osp.abspath(args.out)
    data_args = dict(DEMO_DATA, seed=args.seed)
    if args.num_ids is not None:
        data_args['num_ids'] = args.num_ids
    if args.num_test_ids is not None:
        data_args['num_test_ids'] = args.num_test_ids
    data_root = prepare_data(out, data_args)
    clock.lap('synthetic data')
    with open(osp.join(data_root, _STAMP)) as f:
        data_info = json.load(f)

    config = f'demo/{args.method}_synthetic'
    save_dir = osp.join(out, args.method)
    opts = [o for o in args.opts if o != '--']
    if train_and_evaluate(clock, f'{args.method} run', config, data_root, save_dir, opts):
        return 1
    cfg = run_config(read_results(osp.join(save_dir, 'results.json')))
    baseline_dir = osp.join(out, f'{args.method}_baseline')
    baseline = None
    if args.method == 'xiv' and args.baseline:
        if train_and_evaluate(clock, 'baseline run (no X)', config, data_root, baseline_dir,
                              opts + BASELINE_OPTS + ['test.visrank', 'False']):
            return 1
        baseline = _final_metrics(osp.join(baseline_dir, 'results.json'))

    links = {}
    if args.method == 'xiv':
        from ..methods.xiv import figures
        ckpts = sorted((f for f in os.listdir(osp.join(save_dir, 'model')) if '.pth.tar-' in f),
                       key=lambda f: int(f.rsplit('-', 1)[1]))
        fig_dir = osp.join(save_dir, 'figures')
        figures.main(['--config-file', config, '--root', data_root,
                      '--load-weights', osp.join(save_dir, 'model', ckpts[-1]),
                      '--out', fig_dir] + opts)
        links.update(triplets=_rel(osp.join(fig_dir, 'triplets.png'), out),
                     histograms=_rel(osp.join(fig_dir, 'channel_histograms.png'), out))
        clock.lap('X figures')

    from .plot_run import CHANCE_FILE, chance_results, plot_run
    chance_full = chance_results(data_root, cfg['data']['sources'][0],
                                 cfg['vi'].get(cfg['data']['sources'][0]),
                                 max_rank=cfg['vi']['eval']['max_rank'])
    for folder in [save_dir] + ([baseline_dir] if baseline is not None else []):
        with open(osp.join(folder, CHANCE_FILE), 'w') as f:
            json.dump(chance_full, f, indent=1)
    pictures = plot_run(save_dir)
    links.update(cmc=_rel(pictures['cmc'], out), training=_rel(pictures['training'], out))
    if osp.isdir(osp.join(save_dir, 'visrank')):
        links['visrank'] = _rel(osp.join(save_dir, 'visrank'), out) + '/'
    if baseline is not None:
        links['baseline_results'] = _rel(osp.join(baseline_dir, 'results.json'), out)
    clock.lap('chance level + cmc.png + training.png')

    metrics = _final_metrics(osp.join(save_dir, 'results.json'))
    chance = {k: v['mean'] for k, v in chance_full.items()}
    steps = _num_steps(save_dir)
    t = cfg['train']
    train_info = {'threads': torch.get_num_threads(),
                  'text': f'{cfg["model"]["name"]} from scratch, {cfg["data"]["height"]}x'
                          f'{cfg["data"]["width"]} images, {steps} steps of '
                          f'{t["batch_size"]} loader images (lr {t["lr"]:g}, '
                          f'{t["max_epoch"]} epochs)'}
    total = clock.total
    notes = []
    if args.method == 'xiv' and baseline is None:
        notes.append('the same budget without the X modality (paper Table 4 "baseline": '
                     f'{" ".join(BASELINE_OPTS)}) is not run by default (it does not fit the '
                     '5-minute budget on 2 cores); add it with `python -m torchreid_vi.tools.demo '
                     f'--out {args.out} --baseline` (reuses the data).')
    text = summary_markdown(args.method, metrics, chance, baseline, clock.stages, total,
                            clock.load_start, _loadavg(), data_info, train_info, links, notes)
    summary = osp.join(out, 'SUMMARY.md')
    with open(summary, 'w') as f:
        f.write(text)
    print(text)
    print(f'[demo] done in {total:.0f} s (load average {_fmt_load(_loadavg())}); '
          f'summary -> {summary}')
    return 0


def _num_steps(save_dir: str) -> Optional[int]:
    span_steps = None
    try:
        from .plot_run import load_training_curves
        curves, _ = load_training_curves(save_dir)
        if 'loss' in curves:
            span_steps = int(curves['loss'][0][-1]) + 1
    except Exception:  # noqa: BLE001 - only for the summary's text
        pass
    return span_steps


def _run_as_program(argv=None) -> int:
    """Entry point of ``python -m torchreid_vi.tools.demo``: re-start once with passive OpenMP
    waiting (see the module docstring) unless ``OMP_WAIT_POLICY`` is set, then :func:`main`."""
    if 'OMP_WAIT_POLICY' not in os.environ:
        os.environ['OMP_WAIT_POLICY'] = 'PASSIVE'
        args = sys.argv[1:] if argv is None else list(argv)
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, '-m', 'torchreid_vi.tools.demo'] + args)
    return main(argv)


if __name__ == '__main__':  # pragma: no cover
    sys.exit(_run_as_program())
