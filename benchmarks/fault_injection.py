"""Kill a training run at random moments, resume it each time, and check that nothing was lost.

A small XIV run (synthetic SYSU-MM01, ``xiv_resnet18``, a checkpoint every epoch, an evaluation
every other epoch, ``keep_last 2``) is started with ``model.resume auto``; after a random delay
it receives SIGKILL (no chance to react: the worst case of a lost node) or SIGTERM (what a
cluster sends before preemption), then it is started again the same way. Moments are drawn
uniformly over the launch, so faults land in start-up, pre-flight, training steps, checkpoint
writes and evaluations. After every fault the save_dir is checked:

* **corrupt files**: every ``model.pth.tar-*`` must load and ``results.json`` must parse (no
  ``results.json.unreadable-*`` may appear); a SIGKILL during a checkpoint write may leave a
  ``.part`` temporary, which is not a checkpoint and is removed by the next start;
* **lost checkpoints**: the newest saved progress (epoch, step) must never go back, every
  checkpoint an evaluation came from must still exist, and no evaluation in ``results.json``
  may disappear.

Each faulted run is resumed until it finishes (a fault drawn after its end hits nothing; a
new run in a fresh save_dir then takes the remaining faults). Its final weights are compared bit
for bit with an uninterrupted run of the same config (``resumed weights equal``), and its
``results.json`` must hold one evaluation of every scheduled epoch. The last line is::

    faults: N injected, 0 lost checkpoints, 0 corrupt files, resumed weights equal: yes

Usage::

    python benchmarks/fault_injection.py [--faults 20] [--seed 0] [--workdir DIR] [--keep]

Exit status 0 only when nothing was lost or corrupt and the weights are equal.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import os.path as osp
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = osp.join(osp.dirname(osp.abspath(__file__)), '..')
sys.path.insert(0, ROOT)

MAX_EPOCH = 6
EVAL_FREQ = 2
# XIV on a small synthetic SYSU-MM01: ~14 steps an epoch, an evaluation every other epoch
RUN_OPTIONS = [
    '--config-file', 'xiv/sysu_mm01',
    'model.name', 'xiv_resnet18', 'model.pretrained', 'False',
    'data.height', '64', 'data.width', '32', 'data.workers', '0',
    'train.batch_size', '16', 'sampler.num_instances', '2', 'vi.sampler.epoch_mode', 'cover',
    'train.max_epoch', str(MAX_EPOCH), 'train.print_freq', '1', 'train.amp', 'none',
    'train.lr_scheduler', 'single_step', 'train.stepsize', '[4]',
    'test.eval_freq', str(EVAL_FREQ), 'test.batch_size', '128',
    'vi.train.checkpoint_freq', '1', 'vi.train.keep_last', '2',
    'vi.sysu_mm01.num_trials', '2', 'vi.sysu_mm01.shots', '[1]',
    'vi.sysu_mm01.search_modes', "['all']", 'test.visrank', 'False',
]


def run_command(data_root: str, save_dir: str, resume: bool) -> list:
    return ([sys.executable, '-m', 'torchreid_vi', '--root', data_root] + RUN_OPTIONS
            + ['data.save_dir', save_dir] + (['model.resume', 'auto'] if resume else []))


def launch(cmd: list, log_path: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    log = open(log_path, 'wb')
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def last_activity(log_path: str) -> str:
    """What the run was doing: the last meaningful line of its output, shortened."""
    try:
        lines = [ln.strip() for ln in open(log_path, errors='replace').read().splitlines()]
    except OSError:
        return 'not started'
    for line in reversed(lines):
        step = re.match(r'epoch: \[(\d+)/\d+\]\[(\d+)/(\d+)\]', line)
        if step:
            return f'training: epoch {step[1]}, step {step[2]}/{step[3]} done'
        for key, label in (('Checkpoint saved', 'after a checkpoint write'),
                           ('Evaluating', 'evaluation'), ('Extracting', 'evaluation'),
                           ('Pre-flight', 'pre-flight'), ('=> Start training', 'start of training'),
                           ('Building model', 'building the model'),
                           ('model.resume auto', 'resuming'), ('received', 'stopping on a signal')):
            if key in line:
                return label
    return 'start-up (imports)'


class ReferenceTimeline:
    """Run the uninterrupted reference, noting when each line of its output appeared: how long
    start-up takes and when each epoch begins, to spread faults over a launch's real duration."""

    def __init__(self, cmd: list, log_path: str):
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED='1')
        t0 = time.time()
        self.epoch_start = {}
        self.startup = None
        with open(log_path, 'w') as log, subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                text=True, errors='replace') as proc:
            for line in proc.stdout:
                log.write(line)
                now = time.time() - t0
                if line.startswith('=> Final test'):  # all epochs done: the last evaluation
                    self.epoch_start.setdefault(MAX_EPOCH, now)
                step = re.match(r'epoch: \[(\d+)/', line)
                if step:
                    self.epoch_start.setdefault(int(step[1]) - 1, now)
                    if self.startup is None:
                        self.startup = now
        self.returncode = proc.returncode
        self.total = time.time() - t0
        self.startup = self.startup or self.total

    def expected_launch(self, finished_epochs: int) -> float:
        """Seconds a launch resuming after ``finished_epochs`` epochs is expected to run."""
        begin = self.epoch_start.get(finished_epochs, self.total)
        return self.startup + (self.total - begin)


def checkpoints(save_dir: str) -> dict:
    return {osp.basename(p): p for p in glob.glob(osp.join(save_dir, 'model', 'model.pth.tar-*'))}


class SaveDirState:
    """What a save_dir holds, checked against what it held before the fault."""

    def __init__(self, save_dir: str):
        from torchreid_vi.checkpoint import load_checkpoint
        self.corrupt, self.progress, self.parts = [], (0, 0), []
        for name, path in checkpoints(save_dir).items():
            try:
                ckpt = load_checkpoint(path)
                step = int(ckpt.get('step') or 0)
                self.progress = max(self.progress, (int(ckpt['epoch']), step))
            except Exception as exc:  # noqa: BLE001 - counted and reported
                self.corrupt.append(f'{name}: {type(exc).__name__}: {exc}')
        self.parts = [osp.basename(p) for p in glob.glob(osp.join(save_dir, 'model', '.*part'))]
        self.evaluations = []
        results = osp.join(save_dir, 'results.json')
        if osp.exists(results):
            try:
                data = json.load(open(results))
                self.evaluations = [(e['epoch'], osp.basename(e['checkpoint'] or ''),
                                     e['run_id']) for e in data['evaluations']]
            except Exception as exc:  # noqa: BLE001
                self.corrupt.append(f'results.json: {type(exc).__name__}: {exc}')
        self.corrupt += [f'{osp.basename(p)} appeared' for p in
                         glob.glob(osp.join(save_dir, 'results.json.unreadable-*'))]
        self.names = set(checkpoints(save_dir))

    def lost_since(self, before: 'SaveDirState') -> list:
        lost = []
        if self.progress < before.progress:
            lost.append(f'progress went back from {before.progress} to {self.progress}')
        for epoch, name, _ in before.evaluations:
            if name and name not in self.names:
                lost.append(f'{name} (evaluated at epoch {epoch}) is gone')
        missing = set(before.evaluations) - set(self.evaluations)
        if missing:
            lost.append(f'{len(missing)} evaluations disappeared from results.json')
        return lost


def final_weights(save_dir: str) -> dict:
    from torchreid_vi.checkpoint import load_checkpoint
    return load_checkpoint(osp.join(save_dir, 'model', f'model.pth.tar-{MAX_EPOCH}'))['state_dict']


def equal_weights(a: dict, b: dict) -> bool:
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--faults', type=int, default=20, help='faults to inject (default 20)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the fault moments/signals')
    parser.add_argument('--sigkill-share', type=float, default=0.6,
                        help='fraction of faults that are SIGKILL (the rest SIGTERM)')
    parser.add_argument('--workdir', help='folder for data and runs (default: a temporary one)')
    parser.add_argument('--keep', action='store_true', help='keep the workdir')
    args = parser.parse_args(argv)
    from torchreid_vi.tools.synthesize import synthesize

    workdir = args.workdir or tempfile.mkdtemp(prefix='fault-injection-')
    os.makedirs(workdir, exist_ok=True)
    rng = random.Random(args.seed)
    try:
        data_root = osp.join(workdir, 'data')
        if not osp.isdir(osp.join(data_root, 'SYSU-MM01')):
            # many training ids and a small test split, so that most of a launch is training
            # (where a preempted multi-day run spends its time), not evaluation
            synthesize('sysu_mm01', osp.join(data_root, 'SYSU-MM01'), seed=0, num_ids=80,
                       num_test_ids=8, size=(64, 32))
        start = time.time()
        reference = osp.join(workdir, 'uninterrupted')
        shutil.rmtree(reference, ignore_errors=True)
        timeline = ReferenceTimeline(run_command(data_root, reference, resume=False),
                                     osp.join(workdir, 'uninterrupted.log'))
        if timeline.returncode != 0:
            print(f'the uninterrupted run failed (exit {timeline.returncode}); see '
                  f'{workdir}/uninterrupted.log')
            return 1
        print(f'uninterrupted run: {timeline.total:.1f} s ({timeline.startup:.1f} s to the first '
              f'step); a fault is drawn uniformly over the time a launch is expected to take '
              f'(start-up + the epochs left)')
        expected = list(range(EVAL_FREQ, MAX_EPOCH + 1, EVAL_FREQ))
        reference_weights = final_weights(reference)
        injected, launches, lost, corrupt, unequal, episodes = 0, 0, [], [], 0, 0
        phases = {}  # what the runs were doing when hit -> how many faults
        # an episode is one run in its own save_dir, faulted and resumed until it finishes; a
        # new one starts while faults remain (a fault drawn after the run's end hits nothing)
        while injected < args.faults:
            episodes += 1
            save_dir = osp.join(workdir, f'faulted-{episodes}')
            shutil.rmtree(save_dir, ignore_errors=True)
            state = SaveDirState(save_dir)
            for attempt in range(args.faults + 10):
                launches += 1
                log_path = osp.join(workdir, f'launch-{launches:03d}.log')
                proc = launch(run_command(data_root, save_dir, resume=True), log_path)
                rc, fault = None, None
                if injected < args.faults:
                    delay = rng.uniform(0, timeline.expected_launch(state.progress[0]))
                    signum = (signal.SIGKILL if rng.random() < args.sigkill_share
                              else signal.SIGTERM)
                    try:
                        rc = proc.wait(timeout=delay)
                    except subprocess.TimeoutExpired:
                        fault = (signal.Signals(signum).name, delay, last_activity(log_path))
                        phase = fault[2].split(':')[0]
                        phases[phase] = phases.get(phase, 0) + 1
                        proc.send_signal(signum)
                        injected += 1
                if rc is None:
                    rc = proc.wait()
                after = SaveDirState(save_dir)
                new_lost = after.lost_since(state)
                lost += new_lost
                corrupt += after.corrupt
                state = after
                if fault is not None:
                    print(f'fault {injected:2d}: {fault[0]:7s} at {fault[1]:5.1f} s ({fault[2]}) '
                          f'-> exit {rc}; saved: {after.progress[0]} epochs + {after.progress[1]} '
                          f'steps, {len(after.evaluations)} evaluations'
                          + (f', {len(after.parts)} .part left' if after.parts else '')
                          + (f'; LOST: {new_lost}' if new_lost else '')
                          + (f'; CORRUPT: {after.corrupt}' if after.corrupt else ''), flush=True)
                    continue
                if rc != 0:
                    print(f'launch {launches}: exit {rc} without a fault; see {log_path}')
                    return 1
                break
            else:
                print(f'episode {episodes} does not finish; see {log_path}')
                return 1
            epochs = sorted(e for e, _, _ in state.evaluations)
            if epochs != expected:
                lost.append(f'episode {episodes}: evaluated epochs {epochs}, expected {expected}')
            same = equal_weights(reference_weights, final_weights(save_dir))
            unequal += not same
            print(f'episode {episodes} finished after {attempt + 1} launches: evaluations of '
                  f'epochs {epochs}, final weights {"equal to" if same else "DIFFERENT from"} '
                  f'the uninterrupted run\'s', flush=True)
        for line in lost + corrupt:
            print(f'  problem: {line}')
        print(f'{episodes} episodes, {launches} launches; {time.time() - start:.0f} s in all, '
              f'load average {os.getloadavg()[0]:.1f}')
        print('faults by what the run was doing: '
              + ', '.join(f'{k} {v}' for k, v in sorted(phases.items(), key=lambda kv: -kv[1])))
        print(f'faults: {injected} injected, {len(lost)} lost checkpoints, {len(corrupt)} corrupt '
              f'files, resumed weights equal: {"yes" if not unequal else "no"}')
        return 0 if not unequal and not lost and not corrupt else 1
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
