"""A run whose checkpoints cannot fit on the save_dir's disk stops before its first step.

The size of one checkpoint is checked against the files ``save_checkpoint`` really writes; the
number a run keeps against what a real run writes and keeps; the verdict under ``torchrun``
against two gloo processes that see different free space.
"""
import collections
import os
import re
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_run_safety import _log, _run, _steps_logged

from torchreid_vi._torchreid import tr
from torchreid_vi.checkpoint import (
    NotEnoughDiskSpace,
    checkpoint_bytes,
    save_checkpoint,
    training_state,
)
from torchreid_vi.engine.base import CrossModalEngine

MiB = 1 << 20
_Usage = collections.namedtuple('usage', 'total used free')


def _net():
    torch.manual_seed(0)  # ~2.1 M float32 parameters: 8.5 MB, well above the 1 MiB allowance
    return torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.BatchNorm1d(2048),
                               torch.nn.ReLU(), torch.nn.Linear(2048, 10))


OPTIMIZERS = {
    'sgd_momentum': lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    'sgd_plain': lambda p: torch.optim.SGD(p, lr=0.1),
    'adam': lambda p: torch.optim.Adam(p, lr=1e-3),
    'amsgrad': lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True),
    'rmsprop_centered': lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True),
    'adagrad': lambda p: torch.optim.Adagrad(p, lr=1e-2),
}


@pytest.mark.parametrize('name', [*OPTIMIZERS, 'torchreid_radam_staged'])
def test_checkpoint_bytes_covers_the_file_a_stepped_optimizer_writes(name, tmp_path):
    net = _net()
    if name == 'torchreid_radam_staged':  # torchreid's own RAdam, two parameter groups
        optimizer = tr.optim.build_optimizer(net, optim='radam', lr=1e-3, staged_lr=True,
                                             new_layers=['3'], base_lr_mult=0.1)
        assert len(optimizer.param_groups) == 2
    else:
        optimizer = OPTIMIZERS[name](net.parameters())
    estimate = checkpoint_bytes(net, optimizer)
    net(torch.randn(8, 1024)).square().mean().backward()
    optimizer.step()  # the state buffers exist from the first step on
    path = save_checkpoint(training_state(net, optimizer, epoch=1), str(tmp_path / 'ckpt'))
    actual = os.path.getsize(path)
    # never short of the file; over it by the fixed allowance at most
    assert actual <= estimate <= actual + MiB, (actual, estimate)


def _engine(keep_last=0, checkpoint_freq=1):
    engine = CrossModalEngine.__new__(CrossModalEngine)
    net = _net()
    engine.model, engine.optimizer = net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    engine.keep_last, engine.checkpoint_freq = keep_last, checkpoint_freq
    return engine


@pytest.mark.parametrize('opts', [
    ('train.max_epoch', '6', 'vi.train.checkpoint_freq', '1', 'vi.train.keep_last', '2',
     'test.eval_freq', '3'),
    ('train.max_epoch', '5', 'vi.train.checkpoint_freq', '2', 'vi.train.keep_last', '0',
     'test.eval_freq', '4', 'test.start_eval', '4'),
    ('train.max_epoch', '4', 'vi.train.checkpoint_freq', '0', 'test.eval_freq', '-1'),
])
def test_the_checkpoint_schedule_is_what_a_real_run_writes_and_keeps(small_sysu, tmp_path,
                                                                     opts):
    root, _ = small_sysu
    run = tmp_path / 'run'
    assert _run(root, run, *opts) == 0
    values = dict(zip(opts[::2], opts[1::2]))
    engine = _engine(int(values.get('vi.train.keep_last', 0)),
                     int(values['vi.train.checkpoint_freq']))
    plan = engine.checkpoint_schedule(0, int(values['train.max_epoch']),
                                      int(values.get('test.start_eval', 0)),
                                      int(values['test.eval_freq']))
    written = len(re.findall(r'^Checkpoint saved to ', _log(run), flags=re.M))
    kept = len(os.listdir(run / 'model'))
    assert written == plan['evaluated'] + plan['periodic']
    assert kept == plan['evaluated'] + plan['retained'] == plan['peak'] - 1


def _fake_free(monkeypatch, free_under):
    """``shutil.disk_usage`` reporting ``free_under[prefix]`` bytes free below each prefix."""
    real = shutil.disk_usage

    def usage(path):
        u = real(path)
        for prefix, free in free_under.items():
            if os.path.abspath(path).startswith(str(prefix)):
                return _Usage(u.total, u.used, free)
        return u
    monkeypatch.setattr(shutil, 'disk_usage', usage)


def test_a_run_that_cannot_keep_its_checkpoints_stops_before_its_first_step(small_sysu,
                                                                            tmp_path, capsys,
                                                                            monkeypatch):
    root, _ = small_sysu
    opts = ('train.max_epoch', '3', 'vi.train.checkpoint_freq', '1')
    # the need as the run itself will count it (resnet18 + torchreid's default Adam), 1 byte
    # short of it: the check must stop the run; with exactly the need, it must train
    sizes = []
    real_bytes = checkpoint_bytes
    monkeypatch.setattr('torchreid_vi.engine.base.checkpoint_bytes',
                        lambda *a: sizes.append(real_bytes(*a)) or sizes[-1])
    _fake_free(monkeypatch, {tmp_path / 'probe': 10**15})
    assert _run(root, tmp_path / 'probe', *opts, 'train.max_epoch', '1') == 0
    need = sizes[-1] * 4  # 1 final + 2 periodic + 1 before pruning
    capsys.readouterr()

    _fake_free(monkeypatch, {tmp_path / 'short': need - 1, tmp_path / 'enough': need})
    assert _run(root, tmp_path / 'short', *opts) == 2
    err = capsys.readouterr().err
    assert 'not enough disk space' in err and str(tmp_path / 'short') in err
    assert 'up to 4 checkpoints' in err and 'vi.train.check_disk_space False' in err
    assert _steps_logged(tmp_path / 'short') == 0
    assert not os.path.exists(tmp_path / 'short' / 'model')

    assert _run(root, tmp_path / 'enough', *opts) == 0
    assert 'Pre-flight: data.save_dir' in capsys.readouterr().out
    assert _run(root, tmp_path / 'skip', *opts, 'vi.train.check_disk_space', 'False') == 0


def _disk_worker(rank, world, init_file, out_dir):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                            world_size=world)
    real = shutil.disk_usage
    # rank 0, which writes the checkpoints, sees a full disk; rank 1 plenty of space
    shutil.disk_usage = lambda p: _Usage(real(p).total, real(p).used, 0 if rank == 0 else 10**15)
    try:
        _engine().check_disk_space(out_dir, 0, 3)
        outcome = 'trained'
    except NotEnoughDiskSpace as exc:
        outcome = f'stopped: {exc}'
    with open(os.path.join(out_dir, f'rank{rank}'), 'w') as f:
        f.write(outcome)
    dist.destroy_process_group()


def test_under_torchrun_every_rank_takes_rank_0s_verdict(tmp_path):
    mp.spawn(_disk_worker, args=(2, str(tmp_path / 'init'), str(tmp_path)), nprocs=2,
             join=True)
    outcomes = [open(tmp_path / f'rank{r}').read() for r in (0, 1)]
    assert all(o.startswith('stopped: not enough disk space') for o in outcomes), outcomes
