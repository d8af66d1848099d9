"""Foundation: torchreid layout resolution, registries, checkpoints, offline pretrained weights."""
import json
import os
import subprocess
import sys
import textwrap
import urllib.error

import numpy as np
import pytest
import torch

import torchreid_vi
from torchreid_vi import checkpoint as ckpt_mod
from torchreid_vi import pretrained, registry
from torchreid_vi._torchreid import tr
from torchreid_vi.modeling.backbones import IMAGENET_WEIGHTS

RESOLVER = os.path.join(os.path.dirname(torchreid_vi.__file__), '_torchreid.py')
SUBPACKAGES = ('data', 'engine', 'losses', 'metrics', 'models', 'optim', 'utils')


def _run_resolver(pythonpath):
    # The resolver is loaded as a standalone file so the fake torchreid shadows the real one.
    code = textwrap.dedent(f'''
        import importlib.util, json
        spec = importlib.util.spec_from_file_location('resolver', {RESOLVER!r})
        try:
            m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
            print(json.dumps({{'layout': m.tr.layout, 'prefix': m.tr.prefix,
                              'version': m.tr.version}}))
        except ImportError as exc:
            print(json.dumps({{'error': str(exc)}}))
    ''')
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fake_package(root, prefix, body=''):
    pkg = root.joinpath(*prefix.split('.'))
    pkg.mkdir(parents=True)
    (root / 'torchreid' / '__init__.py').write_text("__version__ = '9.9.9'\n")
    if prefix != 'torchreid':
        (pkg / '__init__.py').write_text('')
    for sub in SUBPACKAGES:
        (pkg / sub).mkdir()
        (pkg / sub / '__init__.py').write_text(body if sub == 'data' else '')


def test_resolver_uses_the_installed_layout():
    # PyPI's wheel nests the package under torchreid.reid; a source install of upstream does not
    import importlib.util
    expected = ('pypi', 'torchreid.reid') if importlib.util.find_spec('torchreid.reid') else (
        'upstream', 'torchreid')
    assert (tr.layout, tr.prefix) == expected
    assert tr.data.ImageDataManager.__module__.startswith(tr.prefix + '.')


def test_resolver_falls_back_to_upstream_layout(tmp_path):
    _fake_package(tmp_path, 'torchreid')
    assert _run_resolver(tmp_path) == {'layout': 'upstream', 'prefix': 'torchreid',
                                       'version': '9.9.9'}


def test_resolver_reports_missing_dependency_not_missing_layout(tmp_path):
    _fake_package(tmp_path, 'torchreid.reid', body='import gdown_that_is_not_installed\n')
    result = _run_resolver(tmp_path)
    assert 'dependencies is missing' in result['error']
    assert 'gdown_that_is_not_installed' in result['error']


def test_no_module_imports_torchreid_directly():
    root = os.path.dirname(torchreid_vi.__file__)
    offenders = []
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith('.py') and f != '_torchreid.py':
                text = open(os.path.join(folder, f)).read()
                if 'import torchreid\n' in text or 'from torchreid' in text.replace(
                        'from torchreid_vi', ''):
                    offenders.append(f)
    assert offenders == []


def test_registration_is_idempotent_and_lists_everything():
    from torchreid_vi.registration import register_all
    register_all()
    register_all()  # twice: harmless
    assert {'sysu_mm01', 'regdb', 'llcm', 'market1501'} <= set(registry.list_datasets())
    assert {'xiv_resnet50', 'idkl_resnet50', 'resnet50', 'osnet_x1_0'} <= set(
        registry.list_models())
    assert {'ModalityBalancedSampler', 'RandomIdentitySampler', 'RandomSampler'} <= set(
        registry.list_samplers())
    assert {'softmax', 'triplet', 'xiv', 'idkl'} <= set(registry.list_engines())


def test_registry_refuses_silent_replacement():
    reg = registry.Registry('thing')
    reg.register('a', len)
    reg.register('a', len)
    with pytest.raises(ValueError, match='already registered'):
        reg.register('a', max)
    reg.register('a', max, overwrite=True)
    assert reg.get('a') is max
    with pytest.raises(KeyError, match='registered things: a'):
        reg.get('b')


def test_user_dataset_registration_reaches_torchreid():
    class Toy(tr.data.ImageDataset):
        pass
    registry.register_dataset('toy_for_registry_test', Toy)
    registry.register_dataset('toy_for_registry_test', Toy)
    init = tr.module('data.datasets').init_image_dataset
    with pytest.raises(TypeError):  # reached Toy (which needs train/query/gallery lists)
        init('toy_for_registry_test')


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / 'model.pth'
    ckpt_mod.save_checkpoint({'epoch': 1}, str(path))

    def broken_save(obj, f):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt('killed mid-save')
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt_mod.save_checkpoint({'epoch': 2}, str(path))
    monkeypatch.undo()
    assert ckpt_mod.load_checkpoint(str(path))['epoch'] == 1
    assert os.listdir(tmp_path) == ['model.pth']  # no temporary file left behind


def test_checkpoint_load_is_safe_but_reads_old_torchreid_files(tmp_path):
    old = tmp_path / 'torchreid.pth.tar'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'epoch': 3, 'rank1': np.float64(0.25),
                'optimizer': {}, 'scheduler': {}}, old)
    assert float(ckpt_mod.load_checkpoint(str(old))['rank1']) == 0.25

    class Payload:
        def __reduce__(self):
            return (os.system, ('echo pwned',))
    evil = tmp_path / 'evil.pth'
    torch.save({'x': Payload()}, evil)
    with pytest.raises(ckpt_mod.CheckpointError, match='safe allow-list'):
        ckpt_mod.load_checkpoint(str(evil))
    (tmp_path / 'trunc.pth').write_bytes(old.read_bytes()[:50])
    with pytest.raises(ckpt_mod.CheckpointError, match='trunc.pth'):
        ckpt_mod.load_checkpoint(str(tmp_path / 'trunc.pth'))


def test_rng_state_roundtrip_through_a_checkpoint(tmp_path):
    state = ckpt_mod.rng_state()
    ckpt_mod.save_checkpoint({'rng': state}, str(tmp_path / 'r.pth'))
    expected = (np.random.rand(), torch.rand(1).item(), __import__('random').random())
    ckpt_mod.set_rng_state(ckpt_mod.load_checkpoint(str(tmp_path / 'r.pth'))['rng'])
    assert (np.random.rand(), torch.rand(1).item(), __import__('random').random()) == expected


def test_offline_pretrained_weights_give_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))

    def no_network(url, dst, *a, **k):
        raise urllib.error.URLError('[Errno -2] Name or service not known')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    with pytest.raises(pretrained.PretrainedWeightsUnavailable) as info:
        pretrained.load_imagenet_state_dict(IMAGENET_WEIGHTS["resnet50"].url, 'resnet50')
    msg = str(info.value)
    assert IMAGENET_WEIGHTS["resnet50"].url in msg
    assert str(tmp_path / 'hub' / 'checkpoints' / 'resnet50-19c8e357.pth') in msg
    assert 'model.pretrained False' in msg and 'model.load_weights' in msg
    # torchreid's own models go through the same message.
    with pytest.raises(pretrained.PretrainedWeightsUnavailable, match='resnet18-5c106cde.pth'):
        with pretrained.explain_offline_downloads('resnet18'):
            tr.models.build_model('resnet18', 10, pretrained=True, use_gpu=False)
    assert not list((tmp_path / 'hub' / 'checkpoints').glob('*.part'))


def test_cached_pretrained_weights_load_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    target = pretrained.hub_checkpoint_path('https://example.org/w/tiny-123.pth')
    target.parent.mkdir(parents=True)
    torch.save({'w': torch.arange(3)}, target)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', lambda *a, **k: 1 / 0)
    sd = pretrained.load_imagenet_state_dict('https://example.org/w/tiny-123.pth', 'tiny')
    assert sd['w'].tolist() == [0, 1, 2]
