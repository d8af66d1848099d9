"""The command line: listing, training a stock torchreid model, exact resume, results.json,
evaluation-only runs, clear errors, the custom-dataset project."""
import json
import os
import subprocess
import sys
import urllib.error

import torch

from torchreid_vi import cli
from torchreid_vi._torchreid import tr
from torchreid_vi.checkpoint import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stock torchreid model on the tiny synthetic SYSU tree with the modality-balanced sampler;
# one trial of single-shot all-search keeps the evaluation cheap.
STOCK = ['model.name', 'resnet18', 'model.pretrained', 'False', 'loss.name', 'softmax',
         'data.sources', "['sysu_mm01']", 'data.targets', "['sysu_mm01']",
         'data.height', '32', 'data.width', '16', 'data.workers', '0',
         'sampler.train_sampler', 'ModalityBalancedSampler', 'sampler.num_instances', '2',
         'vi.sampler.epoch_mode', 'cover',  # every train id once per epoch: a few small steps
         'train.batch_size', '24', 'train.print_freq', '1000', 'test.batch_size', '256',
         'train.lr_scheduler', 'single_step', 'train.stepsize', '[1]',
         'vi.sysu_mm01.num_trials', '1', 'vi.sysu_mm01.shots', '[1]',
         'vi.sysu_mm01.search_modes', "['all']"]


def _run(root, save_dir, *opts):
    return cli.main(['--root', root, 'data.save_dir', str(save_dir)] + STOCK + list(opts))


def _weights(path):
    return load_checkpoint(str(path))['state_dict']


def test_list_prints_torchreid_and_plugin_names():
    out = subprocess.run([sys.executable, '-m', 'torchreid_vi', '--list'], capture_output=True,
                         text=True, check=True).stdout
    for name in ('market1501', 'sysu_mm01', 'regdb', 'llcm', 'resnet50', 'osnet_x1_0',
                 'xiv_resnet50', 'idkl_resnet50', 'RandomIdentitySampler',
                 'ModalityBalancedSampler', 'softmax', 'triplet', 'xiv', 'idkl'):
        assert f'  {name}\n' in out, name
    script = os.path.join(os.path.dirname(sys.executable), 'torchreid-vi')
    assert subprocess.run([script, '--list'], capture_output=True, text=True,
                          check=True).stdout == out


def test_train_resume_equals_uninterrupted_run(sysu_root, tmp_path):
    root, _ = sysu_root
    assert _run(root, tmp_path / 'full', 'train.max_epoch', '2') == 0
    assert _run(root, tmp_path / 'part', 'train.max_epoch', '1') == 0
    first = tmp_path / 'part' / 'model' / 'model.pth.tar-1'
    assert load_checkpoint(str(first))['epoch'] == 1
    assert _run(root, tmp_path / 'resumed', 'train.max_epoch', '2',
                'model.resume', str(first)) == 0
    full = _weights(tmp_path / 'full' / 'model' / 'model.pth.tar-2')
    resumed = _weights(tmp_path / 'resumed' / 'model' / 'model.pth.tar-2')
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    # The scheduler state travelled too (stepsize 1: lr dropped after epoch 1).
    assert load_checkpoint(str(tmp_path / 'resumed' / 'model' / 'model.pth.tar-2'))[
        'scheduler']['last_epoch'] == 2

    results = json.load(open(tmp_path / 'full' / 'results.json'))
    (run,) = results['runs']
    assert run['config']['model']['name'] == 'resnet18' and run['kind'] == 'train'
    env = run['environment']
    assert env['torchreid_layout'] == tr.layout and env['device'] == 'cpu'
    assert env['torch'].startswith('2.') and env['torchvision']
    (evaluation,) = results['evaluations']
    assert evaluation['epoch'] == 2 and evaluation['dataset'] == 'sysu_mm01'
    assert evaluation['run_id'] == run['run_id'] and evaluation['final']
    assert evaluation['checkpoint'].endswith('model.pth.tar-2')
    setting = evaluation['metrics']['sysu_mm01/all/single/official_perm']
    assert 0.0 <= setting['mean']['rank1'] <= 1.0 and len(setting['per_trial']) == 1
    assert any(f.startswith('train.log-') for f in os.listdir(tmp_path / 'full'))

    # Evaluation only, from the checkpoint, with ranked-result pictures.
    ckpt = tmp_path / 'full' / 'model' / 'model.pth.tar-2'
    assert _run(root, tmp_path / 'eval', 'test.evaluate', 'True', 'model.load_weights',
                str(ckpt), 'test.visrank', 'True', 'vi.eval.visrank_max_queries', '5') == 0
    again = json.load(open(tmp_path / 'eval' / 'results.json'))['evaluations'][0]
    assert again['metrics'] == evaluation['metrics']
    pics = tmp_path / 'eval' / 'visrank' / 'sysu_mm01' / 'sysu_mm01_all_single_official_perm'
    assert len(os.listdir(pics)) == 5
    assert any(f.startswith('test.log-') for f in os.listdir(tmp_path / 'eval'))


def test_unknown_config_key_is_a_clear_error(capsys, tmp_path):
    assert cli.main(['data.save_dir', str(tmp_path), 'train.max_epok', '3']) == 2
    assert 'train.max_epok' in capsys.readouterr().err
    assert cli.main(['--config-file', str(tmp_path / 'nope.yaml')]) == 2
    assert 'nope.yaml' in capsys.readouterr().err


def test_missing_dataset_is_a_clear_error(capsys, tmp_path):
    assert _run(str(tmp_path / 'empty'), tmp_path / 'out', 'train.max_epoch', '1') == 2
    err = capsys.readouterr().err
    assert 'sysu_mm01' in err and 'SYSU-MM01' in err and 'expected layout' in err


def test_offline_pretrained_message_through_the_command_line(sysu_root, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))

    def no_network(*a, **k):
        raise urllib.error.URLError('[Errno -2] Name or service not known')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    root, _ = sysu_root
    assert _run(root, tmp_path / 'out', 'model.pretrained', 'True', 'train.max_epoch', '1') == 2
    err = capsys.readouterr().err
    assert 'resnet18-5c106cde.pth' in err and 'model.pretrained False' in err
    assert 'Traceback' not in err


def test_custom_dataset_project_trains_through_the_command_line(tmp_path):
    project = os.path.join(REPO, 'projects', 'custom_dataset')
    data = tmp_path / 'data'
    subprocess.run([sys.executable, os.path.join(project, 'my_dataset.py'), '--root', str(data)],
                   check=True, capture_output=True)
    out = subprocess.run(
        [sys.executable, '-m', 'torchreid_vi', '--plugin', os.path.join(project, 'my_dataset.py'),
         '--config-file', os.path.join(project, 'my_dataset.yaml'), '--root', str(data),
         'data.save_dir', str(tmp_path / 'log'), 'train.max_epoch', '1'],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.load(open(tmp_path / 'log' / 'results.json'))
    assert results['evaluations'] and results['evaluations'][-1]['dataset'] == 'my_vi'
