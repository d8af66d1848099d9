"""A multi-day run never loses its work, and bad input stops it in seconds.

Pre-flight before the first step, weights before every evaluation, results.json history, the
save_dir lock, SIGTERM mid-epoch resume equal to an uninterrupted run, non-finite losses,
checkpoint retention, and one ``error:`` line (exit 2) for each user mistake.
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from torchreid_vi import cli
from torchreid_vi.checkpoint import load_checkpoint, save_checkpoint, training_state
from torchreid_vi.engine.base import CrossModalEngine
from torchreid_vi.evaluation.evaluator import CrossModalEvaluator

# torchreid's resnet18 + softmax on a small synthetic SYSU tree (conftest's ``small_sysu``):
# 'cover' epochs of 2 steps (P = 3, K = 2), one single-shot all-search trial.
STOCK = ['model.name', 'resnet18', 'model.pretrained', 'False', 'loss.name', 'softmax',
         'data.sources', "['sysu_mm01']", 'data.targets', "['sysu_mm01']",
         'data.height', '32', 'data.width', '16', 'data.workers', '0',
         'sampler.train_sampler', 'ModalityBalancedSampler', 'sampler.num_instances', '2',
         'vi.sampler.epoch_mode', 'cover', 'train.batch_size', '12', 'train.print_freq', '1',
         'test.batch_size', '256', 'train.lr_scheduler', 'single_step', 'train.stepsize', '[1]',
         'vi.sysu_mm01.num_trials', '1', 'vi.sysu_mm01.shots', '[1]',
         'vi.sysu_mm01.search_modes', "['all']", 'vi.eval.max_rank', '5']
STEPS_PER_EPOCH = 2


def _run(root, save_dir, *opts, prefix=()):
    return cli.main(list(prefix) + ['--root', str(root), 'data.save_dir', str(save_dir)]
                    + STOCK + list(opts))


def _log(save_dir, kind='train'):
    logs = sorted(glob.glob(os.path.join(str(save_dir), f'{kind}.log-*')))
    return ''.join(open(p).read() for p in logs)


def _steps_logged(save_dir):
    return len(re.findall(r'^epoch: \[', _log(save_dir), flags=re.M))


def _weights(path):
    return load_checkpoint(str(path))['state_dict']


def _assert_equal_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------ pre-flight
@pytest.mark.parametrize('opts,expected', [
    (['test.dist_metric', 'manhattan'], 'test.dist_metric'),
    (['vi.eval.rerank', 'bogus'], 'vi.eval.rerank'),
    (['vi.eval.max_rank', '0'], 'vi.eval.max_rank'),
    (['vi.sysu_mm01.perm_file', '/nonexistent/rand_perm_cam.mat'], 'perm_file'),
    (['vi.sysu_mm01.num_trials', '11'], 'num_trials=11'),
])
def test_bad_evaluation_options_fail_before_the_first_step(small_sysu, tmp_path, capsys, opts,
                                                            expected):
    root, _ = small_sysu
    assert _run(root, tmp_path / 'run', 'train.max_epoch', '2', *opts) == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith('error:')]
    assert expected in line and 'Traceback' not in err
    assert _steps_logged(tmp_path / 'run') == 0
    assert not os.path.exists(tmp_path / 'run' / 'model')


def test_a_setting_without_valid_query_fails_before_the_first_step(small_sysu, tmp_path,
                                                                   copy_dataset, capsys):
    """Indoor search without cam-1 images: cam-3 queries lose every match to the location rule
    (cam 2 is removed for them) and cam-6 queries are dropped from the copy too."""
    _, manifest = small_sysu
    folder = copy_dataset(manifest, edit=('cam1', 'cam6'))
    test_ids = set(manifest['splits']['query']['ir']['ids'])
    for cam in ('cam1', 'cam6'):
        for pid in test_ids:
            shutil.rmtree(os.path.join(folder, cam, f'{pid:04d}'), ignore_errors=True)
    rc = _run(os.path.dirname(folder), tmp_path / 'run', 'train.max_epoch', '2',
              'vi.sysu_mm01.search_modes', "['indoor']", 'vi.eval.check_images', 'False',
              'vi.sysu_mm01.gallery_sampler', 'agw_seed')
    assert rc == 2
    err = capsys.readouterr().err
    assert 'no valid query' in err and 'indoor' in err
    assert _steps_logged(tmp_path / 'run') == 0


def test_unreadable_test_image_fails_before_the_first_step(small_sysu, tmp_path, copy_dataset,
                                                           capsys):
    _, manifest = small_sysu
    folder = copy_dataset(manifest, edit=('cam3',))
    pid = manifest['splits']['query']['ir']['ids'][0]
    bad = sorted(glob.glob(os.path.join(folder, 'cam3', f'{pid:04d}', '*.jpg')))[0]
    open(bad, 'wb').write(b'not a jpeg')
    assert _run(os.path.dirname(folder), tmp_path / 'run', 'train.max_epoch', '2') == 2
    err = capsys.readouterr().err
    assert bad in err and 'cannot be read' in err
    assert _steps_logged(tmp_path / 'run') == 0


# ------------------------------------------------------------------------------ weights first
def test_failed_final_evaluation_keeps_the_weights_and_says_how_to_evaluate_them(
        small_sysu, tmp_path, capsys, monkeypatch):
    root, _ = small_sysu
    real = CrossModalEvaluator.evaluate

    def broken(self, *a, **k):
        raise RuntimeError('the disk with the test set went away')
    monkeypatch.setattr(CrossModalEvaluator, 'evaluate', broken)
    run = tmp_path / 'run'
    assert _run(root, run, 'train.max_epoch', '2', 'vi.train.checkpoint_freq', '0') == 3
    err = capsys.readouterr().err
    ckpt = run / 'model' / 'model.pth.tar-2'
    assert ckpt.is_file() and load_checkpoint(str(ckpt))['epoch'] == 2
    assert 'went away' in err and str(ckpt) in err
    assert 'test.evaluate True' in err and f'model.load_weights {ckpt}' in err
    assert 'error:' in _log(run)

    # the printed command evaluates the saved weights, labelled with their epoch
    monkeypatch.setattr(CrossModalEvaluator, 'evaluate', real)
    assert _run(root, run, 'test.evaluate', 'True', 'model.resume', '',
                'model.load_weights', str(ckpt)) == 0
    data = json.load(open(run / 'results.json'))
    assert [r['kind'] for r in data['runs']] == ['train', 'evaluate']
    (evaluation,) = data['evaluations']
    assert evaluation['epoch'] == 2 and evaluation['checkpoint'] == str(ckpt)
    assert evaluation['run_id'] == data['runs'][1]['run_id']


# ------------------------------------------------------------------------------ results history
def test_results_json_keeps_every_evaluation_across_resume_and_evaluation_only(small_sysu,
                                                                             tmp_path):
    root, _ = small_sysu
    run = tmp_path / 'run'
    assert _run(root, run, 'train.max_epoch', '2', 'test.eval_freq', '1') == 0
    first = json.load(open(run / 'results.json'))
    assert [e['epoch'] for e in first['evaluations']] == [1, 2]
    assert _run(root, run, 'train.max_epoch', '3', 'test.eval_freq', '1',
                'model.resume', str(run / 'model' / 'model.pth.tar-2')) == 0
    assert _run(root, run, 'test.evaluate', 'True',
                'model.load_weights', str(run / 'model' / 'model.pth.tar-3')) == 0
    data = json.load(open(run / 'results.json'))
    assert [r['kind'] for r in data['runs']] == ['train', 'train', 'evaluate']
    assert [e['epoch'] for e in data['evaluations']] == [1, 2, 3, 3]
    assert data['evaluations'][:2] == first['evaluations']          # nothing earlier is lost
    assert len({e['run_id'] for e in data['evaluations']}) == 3
    assert data['evaluations'][-1]['metrics'] == data['evaluations'][-2]['metrics']


def _scalars(save_dir):
    """{tag: [(step, value), ...]} of every tensorboard event file directly in ``save_dir``."""
    from tensorboard.backend.event_processing import event_accumulator
    out = {}
    for path in sorted(glob.glob(os.path.join(str(save_dir), 'events.out.tfevents.*'))):
        acc = event_accumulator.EventAccumulator(path, size_guidance={
            event_accumulator.SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags()['scalars']:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_an_evaluation_only_run_writes_tensorboard_events_at_the_checkpoint_epoch(small_sysu,
                                                                                   tmp_path):
    root, _ = small_sysu
    assert _run(root, tmp_path / 'train', 'train.max_epoch', '2') == 0
    trained = _scalars(tmp_path / 'train')
    assert 'Train/lr' in trained and 'Test/sysu_mm01/rank1' in trained
    ckpt = str(tmp_path / 'train' / 'model' / 'model.pth.tar-2')
    assert _run(root, tmp_path / 'eval', 'test.evaluate', 'True', 'model.load_weights',
                ckpt) == 0
    evaluated = _scalars(tmp_path / 'eval')
    assert evaluated['Test/sysu_mm01/rank1'] == trained['Test/sysu_mm01/rank1']  # step 2
    assert not any(tag.startswith('Train/') for tag in evaluated)


class _Killed(BaseException):
    """Stands for SIGKILL: nothing in the run gets to handle it."""


@pytest.mark.parametrize('killed_at', [1, 2])
def test_a_run_killed_during_an_evaluation_makes_it_when_resumed(small_sysu, tmp_path,
                                                                 monkeypatch, killed_at):
    root, _ = small_sysu
    run = tmp_path / 'run'
    opts = ['train.max_epoch', '2', 'test.eval_freq', '1']
    original = CrossModalEngine.evaluate_cross_modal_target

    def dies_at_epoch(self, *a, **k):
        if self.epoch + 1 == killed_at:
            raise _Killed
        return original(self, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(CrossModalEngine, 'evaluate_cross_modal_target', dies_at_epoch)
        with pytest.raises(_Killed):
            _run(root, run, *opts)
    assert [e['epoch'] for e in json.load(open(run / 'results.json'))['evaluations']] == \
        list(range(1, killed_at))
    steps = _steps_logged(run)
    assert _run(root, run, *opts, 'model.resume', 'auto') == 0
    evaluations = json.load(open(run / 'results.json'))['evaluations']
    assert [(e['epoch'], os.path.basename(e['checkpoint']), e['final']) for e in evaluations] == \
        [(1, 'model.pth.tar-1', False), (2, 'model.pth.tar-2', True)]
    # the resumed run trained only the epochs that were left
    assert _steps_logged(run) - steps == (2 - killed_at) * STEPS_PER_EPOCH
    # relaunching the complete run (a requeued job) succeeds and changes nothing
    steps = _steps_logged(run)
    assert _run(root, run, *opts, 'model.resume', 'auto') == 0
    assert json.load(open(run / 'results.json'))['evaluations'] == evaluations
    assert _steps_logged(run) == steps and 'is complete' in _log(run)


# ------------------------------------------------------------------------------ the lock
def test_a_live_run_locks_its_save_dir_and_a_stale_lock_is_taken_over(small_sysu, tmp_path,
                                                                       capsys):
    root, _ = small_sysu
    run = tmp_path / 'run'
    run.mkdir()
    host = __import__('socket').gethostname()
    holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        (run / '.lock').write_text(json.dumps({'pid': holder.pid, 'host': host,
                                               'started': 'earlier', 'command': ['x']}))
        assert _run(root, run, 'train.max_epoch', '1') == 2
        err = capsys.readouterr().err
        assert f'pid {holder.pid}' in err and 'share_save_dir' in err
        # sharing on purpose is allowed
        assert _run(root, run, 'train.max_epoch', '1', 'vi.train.share_save_dir', 'True') == 0
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its lock is stale; a killed writer's .part file is cleaned up
    part = run / 'model' / f'.model.pth.tar-1.{holder.pid}.abcd.part'
    part.write_bytes(b'x' * 1000)
    assert _run(root, run, 'train.max_epoch', '1') == 0
    assert 'took over the stale lock' in _log(run) and not part.exists()
    assert not (run / '.lock').exists()                                # released at the end


# ------------------------------------------------------------------------------ preemption
def _signal_at_step(monkeypatch, step, signum=signal.SIGTERM):
    """Send ``signum`` to this process during global training step ``step`` (0-based)."""
    original = CrossModalEngine.train
    counter = {'n': 0}

    def fake_fb(self, data, _fb):
        out = _fb(data)
        if counter['n'] == step:
            os.kill(os.getpid(), signum)
        counter['n'] += 1
        return out

    def train(self, *a, **k):
        fb = self.forward_backward
        self.forward_backward = lambda data: fake_fb(self, data, fb)
        try:
            return original(self, *a, **k)
        finally:
            del self.forward_backward
    monkeypatch.setattr(CrossModalEngine, 'train', train)


@pytest.mark.parametrize('engine_opts', [[], ['engine.name', 'xiv', 'model.name', 'xiv_resnet18',
                                              'loss.name', 'triplet']])
def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(small_sysu, tmp_path,
                                                                    monkeypatch, capsys,
                                                                    engine_opts):
    root, _ = small_sysu
    opts = ['train.max_epoch', '2', 'vi.train.checkpoint_freq', '1', *engine_opts]
    assert _run(root, tmp_path / 'full', *opts) == 0
    step = STEPS_PER_EPOCH + 1                  # the second step of epoch 2
    with monkeypatch.context() as m:
        _signal_at_step(m, step)
        assert _run(root, tmp_path / 'cut', *opts) == 75
    err = capsys.readouterr().err
    interrupted = tmp_path / 'cut' / 'model' / 'model.pth.tar-interrupted'
    assert 'SIGTERM' in err and str(interrupted) in err
    ckpt = load_checkpoint(str(interrupted))
    assert (ckpt['epoch'], ckpt['step']) == (1, 2)
    assert not (tmp_path / 'cut' / 'model' / 'model.pth.tar-2').exists()
    # resume with two loader workers: augmentation is seeded per sample, so it does not matter
    assert _run(root, tmp_path / 'cut', *opts, 'model.resume', 'auto', 'data.workers', '2') == 0
    _assert_equal_weights(_weights(tmp_path / 'full' / 'model' / 'model.pth.tar-2'),
                          _weights(tmp_path / 'cut' / 'model' / 'model.pth.tar-2'))
    assert not interrupted.exists()               # superseded by the epoch-2 checkpoint


# ------------------------------------------------------------------------------ divergence
def test_a_non_finite_loss_stops_the_run_at_that_step(small_sysu, tmp_path, capsys):
    root, _ = small_sysu
    rc = _run(root, tmp_path / 'run', 'train.max_epoch', '3', 'train.lr', '1e30',
              'train.optim', 'sgd', 'vi.train.checkpoint_freq', '1')
    assert rc == 4
    err = capsys.readouterr().err
    assert 'diverged' in err and re.search(r'loss=(nan|inf)', err)
    assert _steps_logged(tmp_path / 'run') < 3 * STEPS_PER_EPOCH


# ------------------------------------------------------------------------------ retention
def test_keep_last_keeps_the_newest_periodic_checkpoints_and_the_evaluated_ones(small_sysu,
                                                                              tmp_path):
    root, _ = small_sysu
    run = tmp_path / 'run'
    assert _run(root, run, 'train.max_epoch', '6', 'vi.train.checkpoint_freq', '1',
                'vi.train.keep_last', '2', 'test.eval_freq', '3') == 0
    names = sorted(os.listdir(run / 'model'))
    # the checkpoints evaluations came from (3, final 6) are kept; of the others, the newest 2
    assert names == [f'model.pth.tar-{e}' for e in (3, 4, 5, 6)]


def test_keep_last_after_a_resume_keeps_the_checkpoints_earlier_runs_evaluated(small_sysu,
                                                                              tmp_path):
    root, _ = small_sysu
    run = tmp_path / 'run'
    opts = ['vi.train.checkpoint_freq', '1', 'vi.train.keep_last', '1', 'test.eval_freq', '3']
    assert _run(root, run, 'train.max_epoch', '4', *opts) == 0
    assert _run(root, run, 'train.max_epoch', '7', *opts, 'model.resume', 'auto') == 0
    # 3 and 4 were evaluated by the first run, 6 and 7 by the resumed one; 5 is the newest
    # periodic one (keep_last 1)
    assert sorted(os.listdir(run / 'model')) == [f'model.pth.tar-{e}' for e in (3, 4, 5, 6, 7)]


def test_checkpoints_and_results_follow_the_umask(small_sysu, tmp_path):
    root, _ = small_sysu
    old = os.umask(0o027)
    try:
        assert _run(root, tmp_path / 'run', 'train.max_epoch', '1') == 0
    finally:
        os.umask(old)
    for path in (tmp_path / 'run' / 'results.json', tmp_path / 'run' / 'model' /
                 'model.pth.tar-1'):
        assert os.stat(path).st_mode & 0o777 == 0o640, path


# ------------------------------------------------------------------------------ user mistakes
def _adam_checkpoint(tmp_path, num_classes):
    model = __import__('torchreid_vi._torchreid', fromlist=['tr']).tr.models.build_model(
        'resnet18', num_classes, loss='softmax', pretrained=False, use_gpu=False)
    opt = torch.optim.Adam(model.parameters())
    path = tmp_path / f'adam_{num_classes}.pth'
    save_checkpoint(training_state(model, opt, None, epoch=1), str(path))
    return str(path)


def _mistake(name, tmp_path, root, copy_dataset, manifests):
    """(extra argv prefix, options, data root, expected message part) of one user mistake."""
    sysu, regdb = manifests
    if name == 'regdb_path_traversal':
        folder = copy_dataset(regdb, edit=('idx',))
        idx = os.path.join(folder, 'idx', 'train_visible_1.txt')
        lines = open(idx).read().splitlines()
        lines[0] = '../../etc/passwd 0'
        open(idx, 'w').write('\n'.join(lines) + '\n')
        return [], ['data.sources', "['regdb']", 'data.targets', "['regdb']"], \
            os.path.dirname(folder), 'leaves the dataset folder'
    if name == 'regdb_bad_label':
        folder = copy_dataset(regdb, edit=('idx',))
        idx = os.path.join(folder, 'idx', 'test_thermal_1.txt')
        lines = open(idx).read().splitlines()
        lines[0] = lines[0].rsplit(' ', 1)[0] + ' seven'
        open(idx, 'w').write('\n'.join(lines) + '\n')
        return [], ['data.sources', "['regdb']", 'data.targets', "['regdb']"], \
            os.path.dirname(folder), 'integer label'
    if name == 'sysu_bad_name':
        folder = copy_dataset(sysu, edit=('cam1',))
        pid = sysu['splits']['train']['vis']['ids'][0]
        open(os.path.join(folder, 'cam1', f'{pid:04d}', 'abc.jpg'), 'wb').write(b'x')
        return [], [], os.path.dirname(folder), 'abc.jpg'
    if name == 'sysu_train_test_overlap':
        folder = copy_dataset(sysu, edit=('exp',))
        test_ids = open(os.path.join(folder, 'exp', 'test_id.txt')).read().strip()
        with open(os.path.join(folder, 'exp', 'train_id.txt'), 'w') as f:
            f.write(test_ids.split(',')[0] + ',' + open(os.path.join(
                sysu['root'], 'exp', 'train_id.txt')).read().strip() + '\n')
        return [], [], os.path.dirname(folder), 'disjoint'
    if name == 'unreadable_train_image':
        cams = ('cam1', 'cam2', 'cam4', 'cam5')
        folder = copy_dataset(sysu, edit=cams)
        pid = sysu['splits']['train']['vis']['ids'][0]   # every visible image of one train id
        for cam in cams:
            for p in glob.glob(os.path.join(folder, cam, f'{pid:04d}', '*.jpg')):
                open(p, 'wb').write(b'garbage')
        return [], ['train.max_epoch', '2'], os.path.dirname(folder), 'cannot decode image'
    table = {
        'option_value': ([], ['xiv.generator', 'sepia', 'engine.name', 'xiv', 'model.name',
                              'xiv_resnet18'], 'xiv.generator'),
        'num_instances_zero': ([], ['sampler.num_instances', '0'], 'sampler.num_instances'),
        'unknown_dataset': ([], ['data.sources', "['sysu_mm02']"], 'sysu_mm02'),
        'unknown_model': ([], ['model.name', 'resnet19'], 'resnet19'),
        'unknown_engine': ([], ['engine.name', 'xvi'], 'xvi'),
        'unknown_sampler': ([], ['sampler.train_sampler', 'Balanced'], 'Balanced'),
        'unknown_transform': ([], ['data.transforms', "['bogus']"], 'bogus'),
        'zero_epochs': ([], ['train.max_epoch', '0'], 'nothing to train'),
        'trailing_sources': (['-s', 'sysu_mm01', 'train.max_epoch', '0'], [], 'nothing to train'),
    }
    if name in table:
        prefix, opts, expected = table[name]
        return prefix, opts, root, expected
    if name in ('invalid_yaml', 'yaml_list'):
        path = tmp_path / f'{name}.yaml'
        path.write_text('model: {name: [\n' if name == 'invalid_yaml' else '- a\n- b\n')
        return ['--config-file', str(path)], [], root, str(path)
    if name == 'text_file_resume':
        path = tmp_path / 'notes.txt'
        path.write_text('hello\n')
        return [], ['model.resume', str(path)], root, 'not a torch checkpoint'
    num_classes = len(sysu['splits']['train']['vis']['ids'])
    if name == 'adam_resumed_with_sgd':
        return [], ['model.resume', _adam_checkpoint(tmp_path, num_classes), 'train.optim', 'sgd',
                    'train.max_epoch', '2'], root, 'Adam'
    if name == 'other_number_of_classes':
        return [], ['model.resume', _adam_checkpoint(tmp_path, num_classes + 1),
                    'train.max_epoch', '2'], root, 'number of training identities'
    if name == 'resume_past_max_epoch':
        return [], ['model.resume', _adam_checkpoint(tmp_path, num_classes),
                    'train.max_epoch', '1'], root, 'nothing to train'
    if name == 'save_dir_under_a_file':
        blocker = tmp_path / 'a_file'
        blocker.write_text('x')
        return [], ['data.save_dir', str(blocker / 'run')], root, 'a_file'
    raise KeyError(name)


MISTAKES = ['regdb_path_traversal', 'regdb_bad_label', 'sysu_bad_name', 'sysu_train_test_overlap',
            'unreadable_train_image', 'option_value', 'num_instances_zero', 'unknown_dataset',
            'unknown_model', 'unknown_engine', 'unknown_sampler', 'unknown_transform',
            'zero_epochs', 'trailing_sources', 'invalid_yaml', 'yaml_list', 'text_file_resume',
            'adam_resumed_with_sgd', 'other_number_of_classes', 'resume_past_max_epoch',
            'save_dir_under_a_file']


@pytest.mark.parametrize('name', MISTAKES)
def test_each_user_mistake_ends_in_one_error_line_and_exit_2(name, small_sysu, regdb_root,
                                                             tmp_path, copy_dataset, capsys):
    root, _ = small_sysu
    prefix, opts, data_root, expected = _mistake(name, tmp_path, root, copy_dataset,
                                                 (small_sysu[1], regdb_root[1]))
    run = tmp_path / 'run'
    rc = _run(data_root, run, *opts, prefix=prefix)
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith('error:')]
    assert len(lines) == 1 and expected in lines[0], err[-2000:]
    assert 'Traceback' not in err
    if os.path.isdir(run) and glob.glob(str(run / 'train.log-*')):
        assert lines[0] in _log(run)


def test_bare_module_prints_help_and_the_no_argument_path_explains_itself():
    help_out = subprocess.run([sys.executable, '-m', 'torchreid_vi', '--help'],
                              capture_output=True, text=True)
    assert help_out.returncode == 0 and '--config-file' in help_out.stdout
    bare = subprocess.run([sys.executable, '-m', 'torchreid_vi'], capture_output=True, text=True)
    assert bare.returncode == 2 and 'nothing to do' in bare.stderr
    assert 'Traceback' not in bare.stderr
