"""The package installs like a library: the wheel carries the configs (resolved by name from any
folder), the sdist carries what the tests need, and the docstring examples run."""
import doctest
import importlib
import os
import pkgutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import torchreid_vi

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp('wheel')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps',
                    '--no-build-isolation', '-w', str(out), REPO], check=True,
                   capture_output=True, cwd=str(out))
    (path,) = [p for p in os.listdir(out) if p.endswith('.whl')]
    return str(out / path)


def test_the_wheel_ships_every_config_and_the_license(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n[len('torchreid_vi/configs/'):] for n in names
                     if n.startswith('torchreid_vi/configs/') and n.endswith('.yaml'))
    in_repo = sorted(os.path.relpath(os.path.join(d, f), os.path.join(REPO, 'configs'))
                     for d, _, files in os.walk(os.path.join(REPO, 'configs'))
                     for f in files if f.endswith('.yaml'))
    assert shipped == in_repo and 'xiv/sysu_mm01.yaml' in shipped
    assert any(n.endswith('licenses/LICENSE') for n in names)


def test_an_installed_wheel_resolves_packaged_configs_from_any_folder(wheel, tmp_path):
    target = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target',
                    str(target), wheel], check=True, capture_output=True)
    code = ('import torchreid_vi, sys; from torchreid_vi.config import get_default_config, '
            'packaged_config_dir; cfg = get_default_config(); '
            "cfg.merge_from_file('xiv/ablation/densenet121_xiv'); "
            'print(torchreid_vi.__file__); print(packaged_config_dir()); '
            'print(cfg.model.name, cfg.data.height, cfg.xiv.use_cmg)')
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    env = {**os.environ, 'PYTHONPATH': str(target)}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                         cwd=str(elsewhere), check=True).stdout.splitlines()
    assert out[0].startswith(str(target)) and out[1].startswith(str(target))
    assert out[2] == 'xiv_densenet121 224 True'
    listed = subprocess.run([sys.executable, '-m', 'torchreid_vi', '--list'], capture_output=True,
                            text=True, env=env, cwd=str(elsewhere), check=True).stdout
    assert '  demo/xiv_synthetic\n' in listed


def test_the_sdist_carries_the_tests_configs_and_license(tmp_path):
    subprocess.run([sys.executable, 'setup.py', '-q', 'sdist', '-d', str(tmp_path)], cwd=REPO,
                   check=True, capture_output=True)
    (path,) = [p for p in os.listdir(tmp_path) if p.endswith('.tar.gz')]
    names = {n.split('/', 1)[1] for n in tarfile.open(tmp_path / path).getnames() if '/' in n}
    for needed in ('tests/conftest.py', 'LICENSE', 'configs/xiv/sysu_mm01.yaml',
                   'constraints.txt', 'setup.py', 'setup.cfg'):
        assert needed in names, needed


def _modules():
    prefix = torchreid_vi.__name__ + '.'
    for info in pkgutil.walk_packages(torchreid_vi.__path__, prefix):
        if info.name.endswith('.__main__'):
            continue
        yield info.name


@pytest.mark.parametrize('name', sorted(_modules()))
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False)
    assert result.failed == 0, f'{result.failed} of {result.attempted} examples failed in {name}'
