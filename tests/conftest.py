"""Shared fixtures: synthetic SYSU-MM01 / RegDB / LLCM trees, built once per test session.

Each ``<name>_root`` fixture returns ``(root, manifest)``:

* ``root``: torchreid's data root (pass it as ``root=``); the dataset lies in
  ``root/SYSU-MM01``, ``root/RegDB`` or ``root/LLCM``, all three under the same root, so
  multi-source tests can use any of them;
* ``manifest``: what the generator wrote (``torchreid_vi.tools.synthesize``); ``manifest['root']``
  is the dataset folder itself. Tests assert against it, never against hard-coded numbers.

The trees are shared: tests that modify files must copy them first (``copy_dataset``).
Images are 32×16 (H×W) to keep the session set-up at a few seconds.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# The development VMs advertise AMX but do not keep its register state: oneDNN's AMX bf16
# kernels then return different results on every call (and now and then NaN). Capping oneDNN at
# AVX-512 bf16 makes the bf16 tests deterministic; float32 kernels are unaffected. Read by oneDNN
# when it creates its first primitive, i.e. before any test runs a convolution.
os.environ.setdefault('ONEDNN_MAX_CPU_ISA', 'AVX512_CORE_BF16')

FIXTURE_SEED = 0
FIXTURE_SIZE = (32, 16)   # (H, W)
DATASET_DIRS = {'sysu_mm01': 'SYSU-MM01', 'regdb': 'RegDB', 'llcm': 'LLCM'}
# the default suite's peak disk use under pytest's basetemp: 0.88 GB measured (du every 2 s),
# checkpoints of the training tests; passing tests' folders go at once (setup.cfg)
SUITE_DISK_BYTES = 1 << 30


def pytest_sessionstart(session):
    """Stop at once, with the reason, when the temporary folder cannot hold the suite's files:
    a full disk otherwise shows as dozens of unrelated-looking failures."""
    from torchreid_vi.utils.fileio import free_bytes
    folder = os.path.abspath(session.config.option.basetemp or tempfile.gettempdir())
    free = free_bytes(folder)  # --basetemp may not exist yet
    if free < SUITE_DISK_BYTES:
        pytest.exit(f'the tests need about {SUITE_DISK_BYTES / 2**30:.1f} GiB free for their '
                    f'temporary files in {folder}, which has {free / 2**30:.2f} GiB free; free '
                    f'space there, or point TMPDIR or --basetemp at a bigger disk', returncode=3)


@pytest.fixture(scope='session', autouse=True)
def session_tempdir(tmp_path_factory):
    """tempfile's folder for the session, inside pytest's basetemp, removed at the end.

    Docstring examples (``tempfile.mkdtemp()``), benchmarks run by tests and the subprocesses
    tests start (the CLI, torchrun's ``torchelastic_*`` folders; they inherit ``TMPDIR``) would
    otherwise leave their files in the system's temporary folder after every run.
    """
    folder = str(tmp_path_factory.mktemp('tempfile'))
    before = os.environ.get('TMPDIR'), tempfile.tempdir
    os.environ['TMPDIR'], tempfile.tempdir = folder, folder
    yield folder
    if before[0] is None:
        os.environ.pop('TMPDIR', None)
    else:
        os.environ['TMPDIR'] = before[0]
    tempfile.tempdir = before[1]
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope='session')
def reid_data_root(tmp_path_factory):
    """A session-wide torchreid data root holding the synthetic datasets."""
    return tmp_path_factory.mktemp('reid-data')


def _synthesize(root, dataset):
    from torchreid_vi.tools.synthesize import synthesize
    manifest = synthesize(dataset, os.path.join(str(root), DATASET_DIRS[dataset]),
                          seed=FIXTURE_SEED, size=FIXTURE_SIZE)
    return str(root), manifest


@pytest.fixture(scope='session')
def sysu_root(reid_data_root):
    """``(root, manifest)`` of a synthetic SYSU-MM01 (60 pid range, official-like splits)."""
    return _synthesize(reid_data_root, 'sysu_mm01')


@pytest.fixture(scope='session')
def regdb_root(reid_data_root):
    """``(root, manifest)`` of a synthetic RegDB (24 pids, trials 1..10)."""
    return _synthesize(reid_data_root, 'regdb')


@pytest.fixture(scope='session')
def llcm_root(reid_data_root):
    """``(root, manifest)`` of a synthetic LLCM (train pids 1..12, test 13..24)."""
    return _synthesize(reid_data_root, 'llcm')


@pytest.fixture(scope='module')
def small_sysu(tmp_path_factory):
    """``(root, manifest)`` of a SYSU-MM01 tree small enough to train on in seconds (16 pid
    range, 32×16 images); one per test module, so a module may change it."""
    from torchreid_vi.tools.synthesize import synthesize
    root = tmp_path_factory.mktemp('small-reid-data')
    manifest = synthesize('sysu_mm01', str(root / 'SYSU-MM01'), seed=0, num_ids=16,
                          size=FIXTURE_SIZE)
    assert len(manifest['splits']['train']['vis']['ids']) >= 3
    return str(root), manifest


@pytest.fixture
def copy_dataset(tmp_path):
    """``copy_dataset(manifest, parent='data', edit=None) -> folder``: a private dataset copy.

    The copy lies in ``tmp_path/<parent>/<dataset folder name>``; pass ``tmp_path/<parent>`` as
    torchreid's root. With ``edit`` (top-level names such as ``('exp',)``) only those entries are
    copied and the others are symlinked to the shared tree (fast for SYSU): edit only inside them.
    """
    def copy(manifest, parent='data', edit=None):
        src = manifest['root']
        dst = tmp_path / parent / os.path.basename(src)
        if edit is None:
            shutil.copytree(src, dst)
            return str(dst)
        dst.mkdir(parents=True)
        for name in sorted(os.listdir(src)):
            if name in edit:
                shutil.copytree(os.path.join(src, name), dst / name)
            else:
                os.symlink(os.path.join(src, name), dst / name)
        return str(dst)
    return copy
