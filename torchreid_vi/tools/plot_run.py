"""Pictures of one run: ``cmc.png`` (CMC of every evaluated setting, with chance) and
``training.png`` (every loss term and the learning rate against the training step).

Usage::

    python -m torchreid_vi.tools.plot_run <save_dir> [--out DIR] [--only cmc|training]

``<save_dir>`` is a run's ``data.save_dir`` (any torchreid_vi run, not only the demo's):

* ``cmc.png`` from ``<save_dir>/results.json``: the final evaluation (else the last one); one
  curve per setting from its ``mean_cmc`` (mean over trials, rank 1..max_rank, in %). The chance
  curve of each setting (the same protocol on uniform random distances) comes from
  ``<save_dir>/chance.json`` when present (the demo writes it), else it is computed from the
  dataset named in ``results.json`` (``data.root``, ``vi.<dataset>`` options) when that data is
  still there; otherwise the plot says that chance is not drawn.
* ``training.png`` from the tensorboard event files in ``<save_dir>`` (tags ``Train/<term>``,
  one value per step, and ``Train/lr``; ``Train/time`` and ``Train/data`` are timings, not
  drawn), read with ``tensorboard.backend.event_processing.event_accumulator``. Without event
  files the ``train.log-*`` files are parsed instead: lines ``epoch: [e/E][b/B] ... <term> <val>
  (<avg>) ... lr <lr>`` (only every ``train.print_freq`` steps; ``<val>`` is drawn).

Step numbers are torchreid's ``epoch * batches_per_epoch + batch`` (0-based). When anything
needed is missing the tool writes nothing and exits with status 2 and one message naming the
folder and what is missing (``--only`` draws one picture and needs only its input).
Headless: matplotlib's ``Agg`` backend.

Python API: :func:`load_cmc`, :func:`load_training_curves`, :func:`plot_cmc`,
:func:`plot_training`, :func:`plot_run` (raises :class:`RunDataMissing`).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import os.path as osp
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..results import read_results, run_config

__all__ = ['RunDataMissing', 'load_cmc', 'load_chance', 'chance_results', 'load_training_curves',
           'parse_train_logs', 'plot_cmc', 'plot_training', 'plot_run', 'main']

CHANCE_FILE = 'chance.json'
# Train/* tags that are timings (seconds per step), not loss terms.
_TIMING_TAGS = ('time', 'data')
# torchreid's console line:
# "epoch: [e/E][b/B]\ttime v (a)\tdata v (a)\teta h:mm:ss\t<term v (a)>...\tlr x"
_LOG_LINE = re.compile(r'epoch: \[(\d+)/(\d+)\]\[(\d+)/(\d+)\]\t(.*)$')
_LOG_TERM = re.compile(r'([A-Za-z_][\w./-]*) (-?[\d.]+(?:e[-+]?\d+)?|nan|inf) '
                       r'\((-?[\d.]+(?:e[-+]?\d+)?|nan|inf)\)')
_LOG_LR = re.compile(r'\blr (-?[\d.]+(?:e[-+]?\d+)?)\s*$')

Curves = Dict[str, Tuple[np.ndarray, np.ndarray]]  # name -> (steps int64 (N,), values float64 (N,))


class RunDataMissing(FileNotFoundError):
    """A run folder lacks what a picture is drawn from (the message names the folder and what)."""


# ------------------------------------------------------------------------------------------------
# CMC

def load_cmc(save_dir: str) -> Tuple[Dict[str, np.ndarray], dict]:
    """CMC curves of the final (else the last) evaluation in ``<save_dir>/results.json``.

    Returns ``(curves, info)``: ``curves`` maps a setting key (``'sysu_mm01/all/single/...'``) to
    its mean CMC, float64 ``(max_rank,)`` fractions in [0, 1] (index k-1 = rank k); ``info`` has
    ``epoch``, ``dataset`` (list of names), ``config`` (the run's config dict) and ``metrics``
    (setting key -> mean metrics dict).

    Raises:
        RunDataMissing: no ``results.json``, no evaluation in it, or no ``mean_cmc`` in it.
    """
    path = osp.join(save_dir, 'results.json')
    if not osp.isfile(path):
        raise RunDataMissing(f'{path} (the run\'s results; written at its first evaluation)')
    data = read_results(path)
    evaluations = data.get('evaluations') or []
    if not evaluations:
        raise RunDataMissing(f'evaluations in {path} (the run has not been evaluated yet)')
    final = [e for e in evaluations if e.get('final')]
    chosen = final if final else [e for e in evaluations if e['epoch'] == evaluations[-1]['epoch']]
    curves, metrics = {}, {}
    for ev in chosen:
        for key, res in ev['metrics'].items():
            if 'mean_cmc' in res:
                curves[key] = np.asarray(res['mean_cmc'], np.float64)
                metrics[key] = res.get('mean', {})
    if not curves:
        raise RunDataMissing(f'"mean_cmc" in the evaluations of {path} (a torchreid-protocol '
                             f'evaluation records only rank-1 and mAP)')
    return curves, {'epoch': chosen[-1]['epoch'], 'dataset': sorted({e['dataset'] for e in chosen}),
                    'config': run_config(data, chosen[-1].get('run_id')), 'metrics': metrics}


def chance_results(data_root: str, dataset: str = 'sysu_mm01', options: Optional[dict] = None,
                   seed: int = 0, max_rank: Optional[int] = None) -> dict:
    """Chance level of every setting of ``dataset``: the protocol on uniform random distances.

    Returns ``{setting key: {'mean': {'rank1', ..., 'mAP', 'mINP'} fractions, 'mean_cmc': list
    of max_rank fractions}}`` (JSON-ready; the format of ``chance.json``).
    """
    from ..config import get_default_config
    from ..evaluation.evaluator import CrossModalEvaluator
    from ..registration import register_all
    from ..registry import DATASETS
    register_all()
    cls = DATASETS.get(dataset)
    opts = {k: v for k, v in (options or {}).items() if k in getattr(cls, 'default_options', {})}
    qset = cls(root=data_root, mode='query', verbose=False, **opts)
    cfg = get_default_config()
    if max_rank is not None:
        cfg.vi.eval.max_rank = int(max_rank)
    evaluator = CrossModalEvaluator.from_config(cfg)
    return {k: {'mean': {m: float(v) for m, v in r.mean.items()},
                'mean_cmc': [float(v) for v in r.mean_cmc]}
            for k, r in evaluator.chance_level(dataset, qset, seed).items()}


def load_chance(save_dir: str, info: dict) -> Tuple[Dict[str, np.ndarray], str]:
    """Chance CMC per setting, ``(curves, source)``; ``({}, reason)`` when it cannot be had.

    From ``<save_dir>/chance.json`` when present, else computed from the run's dataset
    (:func:`chance_results`) if ``data.root`` of the run's config still holds it.
    """
    path = osp.join(save_dir, CHANCE_FILE)
    if osp.isfile(path):
        with open(path) as f:
            data = json.load(f)
        return {k: np.asarray(v['mean_cmc'], np.float64) for k, v in data.items()}, path
    cfg = info.get('config') or {}
    root = (cfg.get('data') or {}).get('root')
    if not root or not osp.isdir(root):
        return {}, f'no {CHANCE_FILE} and the data root {root!r} of results.json is not there'
    out: Dict[str, np.ndarray] = {}
    max_rank = ((cfg.get('vi') or {}).get('eval') or {}).get('max_rank')
    for name in info['dataset']:
        try:
            res = chance_results(root, name, (cfg.get('vi') or {}).get(name), max_rank=max_rank)
        except Exception as exc:  # noqa: BLE001 - chance is an extra; say why it is absent
            return {}, f'chance of {name} from {root} failed: {exc}'
        out.update({k: np.asarray(v['mean_cmc'], np.float64) for k, v in res.items()})
    return out, f'computed from {root}'


def plot_cmc(curves: Dict[str, np.ndarray], path: str,
             chance: Optional[Dict[str, np.ndarray]] = None, title: str = '',
             note: str = '') -> str:
    """Draw the CMC curves (in %, rank 1..max_rank) with dashed chance curves; returns ``path``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    chance = chance or {}
    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=110)
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for i, (key, cmc) in enumerate(curves.items()):
        ranks = np.arange(1, len(cmc) + 1)
        colour = colours[i % len(colours)]
        ax.plot(ranks, 100 * cmc, '-o', ms=3, lw=2, color=colour,
                label=f'{_short(key)}: rank-1 {100 * cmc[0]:.1f}%')
        if key in chance:
            c = chance[key][:len(cmc)]
            ax.plot(np.arange(1, len(c) + 1), 100 * c, '--', lw=1.2, color=colour, alpha=0.8,
                    label=f'  chance: rank-1 {100 * c[0]:.1f}%')
    ax.set_xlabel('rank k')
    ax.set_ylabel('matching rate within top k (%)')
    ax.set_ylim(0, 100)
    max_rank = max(len(c) for c in curves.values())
    ax.set_xlim(1, max_rank)
    ax.set_xticks([1] + list(range(5, max_rank + 1, 5)) if max_rank >= 5
                  else range(1, max_rank + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower right')
    ax.set_title(title or 'CMC (mean over trials)', fontsize=10)
    return _save(fig, path, note)


def _save(fig, path: str, note: str) -> str:
    """Write ``fig`` to ``path`` with ``note`` in small print at the bottom; close it."""
    import matplotlib.pyplot as plt
    if note:
        fig.text(0.01, 0.005, note, fontsize=7, color='0.4')
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def _short(key: str) -> str:
    parts = key.split('/')
    return ' '.join(parts[1:3]) + '-shot' if len(parts) >= 3 else key


# ------------------------------------------------------------------------------------------------
# training curves

def _event_files(save_dir: str) -> List[str]:
    return sorted(glob.glob(osp.join(save_dir, 'events.out.tfevents.*')))


def load_training_curves(save_dir: str) -> Tuple[Curves, str]:
    """Loss terms and the learning rate against the step, ``(curves, source)``.

    ``curves`` maps a term name (``'loss'``, ``'id_ir'``, ..., and ``'lr'``) to ``(steps,
    values)``; ``source`` says where they came from. Tensorboard events first, else the
    ``train.log-*`` lines (:func:`parse_train_logs`).

    Raises:
        RunDataMissing: neither event files with ``Train/*`` scalars nor parsable log lines.
    """
    if _event_files(save_dir):
        from tensorboard.backend.event_processing import event_accumulator
        acc = event_accumulator.EventAccumulator(
            save_dir, size_guidance={event_accumulator.SCALARS: 0})
        acc.Reload()
        curves: Curves = {}
        for tag in acc.Tags().get('scalars', []):
            if not tag.startswith('Train/') or tag[len('Train/'):] in _TIMING_TAGS:
                continue
            events = acc.Scalars(tag)
            # a resumed run rewrites steps: keep the last
            by_step = {e.step: e.value for e in events}
            steps = np.array(sorted(by_step), np.int64)
            curves[tag[len('Train/'):]] = (steps, np.array([by_step[s] for s in steps], np.float64))
        if curves:
            return curves, f'tensorboard events in {save_dir}'
    logs = sorted(glob.glob(osp.join(save_dir, 'train.log-*')))
    curves = parse_train_logs(logs)
    if curves:
        return curves, f'{len(logs)} train.log file(s) in {save_dir} (every print_freq steps)'
    raise RunDataMissing(
        'training curves: no tensorboard event files (events.out.tfevents.*) with Train/* '
        'scalars and no "epoch: [e/E][b/B] ... lr <lr>" lines in train.log-* files')


def parse_train_logs(paths: Sequence[str]) -> Curves:
    """Per-step values of the terms and ``lr`` read off the console lines torchreid prints (later
    files win)."""
    table: Dict[str, Dict[int, float]] = {}
    for path in paths:
        with open(path, errors='replace') as f:
            for line in f:
                m = _LOG_LINE.search(line.rstrip('\n'))
                if not m:
                    continue
                epoch, _, batch, num_batches = (int(g) for g in m.groups()[:4])
                step = (epoch - 1) * num_batches + batch - 1
                rest = m.group(5)
                for name, value, _avg in _LOG_TERM.findall(rest):
                    if name not in _TIMING_TAGS:
                        table.setdefault(name, {})[step] = float(value)
                lr = _LOG_LR.search(rest)
                if lr:
                    table.setdefault('lr', {})[step] = float(lr.group(1))
    out: Curves = {}
    for name, values in table.items():
        steps = np.array(sorted(values), np.int64)
        out[name] = (steps, np.array([values[s] for s in steps], np.float64))
    return out


def plot_training(curves: Curves, path: str, title: str = '', note: str = '') -> str:
    """One small panel per loss term (total ``loss`` first) and the learning rate last (log
    scale). Raw values thin, a moving average bold when there are many points. Returns ``path``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = [n for n in curves if n != 'lr']
    names.sort(key=lambda n: (n != 'loss', n.startswith('loss'), 0))  # 'loss' first, sums last
    if 'lr' in curves:
        names.append('lr')
    ncols = min(4, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.4 * nrows + 0.6), dpi=100,
                             squeeze=False, sharex=True)
    for ax, name in zip(axes.flat, names):
        steps, values = curves[name]
        if name == 'lr':
            ax.plot(steps, values, color='tab:green', lw=1.8)
            ax.set_yscale('log')
        else:
            ax.plot(steps, values, color='tab:blue', lw=0.7, alpha=0.45 if len(values) > 60 else 1)
            if len(values) > 60:
                ax.plot(steps, _moving_average(values, max(5, len(values) // 40)),
                        color='tab:blue', lw=1.8)
        ax.set_title(name, fontsize=10, fontweight='bold' if name == 'loss' else 'normal')
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in axes.flat[len(names):]:
        ax.axis('off')
    for ax in axes[-1]:
        ax.set_xlabel('step', fontsize=9)
    fig.suptitle(title or 'training', fontsize=11)
    return _save(fig, path, note)


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of ``values`` (N,), same length (shorter windows at the ends)."""
    kernel = np.ones(window)
    num = np.convolve(values, kernel, mode='same')
    den = np.convolve(np.ones_like(values), kernel, mode='same')
    return num / den


# ------------------------------------------------------------------------------------------------
# both

def plot_run(save_dir: str, out_dir: Optional[str] = None,
             only: Optional[str] = None) -> Dict[str, str]:
    """Write ``cmc.png`` and ``training.png`` of run ``save_dir`` into ``out_dir`` (default:
    ``save_dir``); ``only='cmc'|'training'`` draws one. Returns ``{'cmc': path, 'training': path}``.

    Raises:
        RunDataMissing: one message naming ``save_dir`` and every missing input; nothing is
            written then.
    """
    if not osp.isdir(save_dir):
        raise RunDataMissing(f'plot_run: {save_dir} is not a folder (expected a run\'s save_dir)')
    out_dir = out_dir or save_dir
    missing, cmc, training = [], None, None
    if only in (None, 'cmc'):
        try:
            cmc = load_cmc(save_dir)
        except RunDataMissing as exc:
            missing.append(str(exc))
    if only in (None, 'training'):
        try:
            training = load_training_curves(save_dir)
        except RunDataMissing as exc:
            missing.append(str(exc))
    if missing:
        raise RunDataMissing(f'plot_run: {save_dir} lacks ' + '; and '.join(missing))
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    name = osp.basename(osp.normpath(save_dir))
    if cmc is not None:
        curves, info = cmc
        chance, source = load_chance(save_dir, info)
        note = (f'chance (dashed): the same protocol on random distances ({source})' if chance
                else f'chance not drawn: {source}')
        written['cmc'] = plot_cmc(curves, osp.join(out_dir, 'cmc.png'), chance,
                                  title=f'{name}: CMC after epoch {info["epoch"]} '
                                        f'(mean over trials)', note=note)
    if training is not None:
        curves, source = training
        written['training'] = plot_training(curves, osp.join(out_dir, 'training.png'),
                                            title=f'{name}: loss terms and learning rate',
                                            note=f'from {source}')
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='python -m torchreid_vi.tools.plot_run',
                                description=__doc__.split('\n')[0])
    p.add_argument('save_dir', help="a run's data.save_dir (holds results.json, events, logs)")
    p.add_argument('--out', default=None, help='folder for the PNGs (default: save_dir)')
    p.add_argument('--only', choices=['cmc', 'training'], default=None, help='draw one picture')
    args = p.parse_args(argv)
    try:
        written = plot_run(args.save_dir, args.out, args.only)
    except RunDataMissing as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    for what, path in written.items():
        print(f'{what}: {path}')
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
