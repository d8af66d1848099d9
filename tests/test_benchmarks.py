"""The benchmark scripts that issues ask for run here and print what they promise."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_prints_every_row_of_its_table(tmp_path):
    out = tmp_path / 'rows.json'
    scratch = tmp_path / 'tmpdir'  # the system temporary folder the check sees
    scratch.mkdir()
    proc = subprocess.run(['bash', os.path.join(REPO, 'benchmarks', 'gpu_check.sh'), '--dry',
                           '--steps', '1', '--warmup', '1', '--json', str(out)],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHON=sys.executable, TMPDIR=str(scratch)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # its synthetic data, save dirs and perm file are gone: runs don't fill /tmp (torch's own
    # compile cache folder, torchinductor_<user>, is torch's to keep)
    assert [n for n in os.listdir(scratch) if not n.startswith('torchinductor_')] == []
    table = proc.stdout[proc.stdout.index('## gpu_check'):]
    for header in ('| method | model | input | batch (net) | amp | step ms |', '| train loader |',
                   '| DDP | processes |', '| SYSU report |'):
        assert header in table
    rows = json.load(open(out))
    steps = {(r['method'], r['amp']): r for r in rows['steps']}
    assert set(steps) == {(m, a) for m in ('xiv', 'idkl') for a in ('none', 'fp16', 'bf16')}
    for method, batch, network in (('xiv', 8, 12), ('idkl', 8, 8)):
        fp32, bf16 = steps[method, 'none'], steps[method, 'bf16']
        assert (fp32['batch'], fp32['network_images']) == (batch, network)
        assert fp32['step_ms'] > 0 and fp32['rel_diff'] == 0
        # the same first batch from the same weights: bf16 changes the loss, but only a little
        assert 0 < bf16['rel_diff'] < 0.3, bf16
        assert 'refused' in steps[method, 'fp16']['skipped']
    assert [r['method'] for r in rows['loader']] == ['xiv', 'idkl']
    assert all(r['images_per_s'] > 0 for r in rows['loader'])
    for r in rows['ddp']:  # 2 gloo processes, float32: the same loss as one process
        assert r['processes'] == 2 and r['loss_rel_diff'] < 1e-3, r
    assert rows['sysu_report']['evaluations'] == 40


def test_gpu_check_without_a_gpu_and_without_dry_says_so():
    pytest.importorskip('torch')
    import torch
    if torch.cuda.is_available():
        pytest.skip('a GPU is visible')
    proc = subprocess.run(['bash', os.path.join(REPO, 'benchmarks', 'gpu_check.sh')],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 2 and 'no CUDA GPU' in proc.stderr and '--dry' in proc.stderr
