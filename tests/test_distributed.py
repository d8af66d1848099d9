"""Many processes, the methods' losses unchanged: DDP on gloo (CPU) against one process.

* one training step of torchreid's triplet engine, XIV and IDKL on the same global batch gives the
  same loss (1e-5 relative) and the same parameter gradients (1e-4 relative, SyncBatchNorm on) on
  2 processes as on 1. The networks run in float64 here: the comparison is about the
  implementation (gathering, SyncBatchNorm, DDP averaging), and in float32 the convolutions of a
  half batch round differently from those of the whole one, which IDKL's specific branch (instance
  normalisation of 4×2 maps at these tiny sizes) amplifies to ~1e-3 relative; in float64 all
  three agree to ~1e-8 (loss maths stays float32 as in training);
* the distributed loader's rank slices put together are the single-process batches;
* ``torchrun --nproc_per_node 2`` trains, evaluates, checkpoints once and resumes, and its
  evaluation equals a single-process one exactly;
* mixed precision: ``train.amp bf16`` trains a step of every engine on CPU; a GradScaler's state
  travels through a checkpoint.
"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchreid_vi.checkpoint import load_checkpoint
from torchreid_vi.data.loader import EpochBatchSampler
from torchreid_vi.data.sampler import ModalityBalancedSampler

P, K, H, W, NUM_CLASSES = 4, 2, 32, 16, 6
ENGINES = ('triplet', 'xiv', 'idkl')


def _cfg(engine):
    from torchreid_vi.config import get_default_config
    cfg = get_default_config()
    cfg.use_gpu = False
    cfg.train.batch_size, cfg.sampler.num_instances = 2 * P * K, K
    if engine == 'triplet':
        cfg.loss.name, cfg.model.name = 'triplet', 'resnet18'
        cfg.loss.triplet.weight_x = 1.0
    else:
        cfg.engine.name, cfg.model.name = engine, f'{engine}_resnet18'
        cfg.loss.name = 'triplet'
    cfg.model.pretrained = False
    return cfg


def _batch():
    """One modality-balanced global batch ``[v(p1..pP), r(p1..pP)]`` (K per id and modality)."""
    g = torch.Generator().manual_seed(0)
    pids = torch.arange(P).repeat_interleave(K).repeat(2)
    modality = torch.cat([torch.zeros(P * K), torch.ones(P * K)]).long()
    return {'img': torch.randn(2 * P * K, 3, H, W, generator=g), 'pid': pids,
            'modality': modality, 'camid': modality + 1, 'dsetid': modality,
            'impath': [''] * (2 * P * K)}


def _rank_positions(rank, world):
    data = [(f'{m}{p}_{k}', p, 1, m) for p in range(P) for m in (0, 1) for k in range(K)]
    return ModalityBalancedSampler(data, 2 * P * K, K).rank_positions(rank, world)


def _step(engine_name, world=1, rank=0, dtype=torch.float64):
    """``(loss terms, {param name: grad})`` of one step of ``engine_name`` on this rank's slice."""
    from torchreid_vi.cli import _wrap_distributed, build_engine, build_model
    from torchreid_vi.registration import register_all
    register_all()
    cfg = _cfg(engine_name)
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # IDKL's heads: dropout masks cannot agree across process counts
    model = model.to(dtype)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if world > 1:
        model = _wrap_distributed(cfg, model, torch.device('cpu'))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    dm = SimpleNamespace(train_loader=None, test_loader={}, num_train_pids=NUM_CLASSES,
                         height=H, width=W)
    engine = build_engine(cfg, dm, model, optimizer, None)
    engine.set_model_mode('train')
    batch = _batch()
    batch['img'] = batch['img'].to(dtype)
    if world > 1:
        idx = torch.as_tensor(_rank_positions(rank, world))
        batch = {k: (v[idx] if torch.is_tensor(v) else [v[i] for i in idx]) for k, v in
                 batch.items()}
    terms = engine.forward_backward(batch)
    params = dict(engine.eval_model.named_parameters())
    grads = {n: params[n].grad.clone() for n in names if params[n].grad is not None}
    return terms, grads


def _ddp_worker(rank, world, init_file, out_file):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    results = {name: _step(name, world, rank) for name in ENGINES}
    if rank == 0:
        torch.save(results, out_file)
    dist.destroy_process_group()


@pytest.fixture(scope='module')
def two_process_steps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('ddp')
    out = str(tmp / 'steps.pt')
    mp.spawn(_ddp_worker, args=(2, str(tmp / 'init'), out), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize('engine_name', ENGINES)
def test_two_processes_give_the_single_process_loss_and_gradients(engine_name,
                                                                  two_process_steps):
    single_terms, single_grads = _step(engine_name)
    ddp_terms, ddp_grads = two_process_steps[engine_name]
    assert single_terms.keys() == ddp_terms.keys()
    for k, v in single_terms.items():
        assert ddp_terms[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert single_grads.keys() == ddp_grads.keys() and single_grads
    # relative to each tensor's largest gradient; tensors whose gradient is zero in exact
    # arithmetic (a Linear bias right before a BatchNorm) are measured against 1e-5 of the largest
    # gradient of the model instead of their own rounding noise
    floor = 1e-5 * max(g.abs().max().item() for g in single_grads.values())
    worst = max((ddp_grads[n] - g).abs().max().item() / max(g.abs().max().item(), floor)
                for n, g in single_grads.items())
    assert worst <= 1e-4, worst


def test_a_local_loss_is_not_the_method():
    """The check above can fail: without gathering, rank 0's triplet loss sees half a batch."""
    single_terms, _ = _step('triplet')
    local = _step_local_half()
    assert local['loss_t'] != pytest.approx(single_terms['loss_t'], rel=1e-3)


def _step_local_half():
    from torchreid_vi.cli import build_engine, build_model
    cfg = _cfg('triplet')
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES)
    dm = SimpleNamespace(train_loader=None, test_loader={}, num_train_pids=NUM_CLASSES,
                         height=H, width=W)
    engine = build_engine(cfg, dm, model, torch.optim.SGD(model.parameters(), lr=0.0), None)
    engine.set_model_mode('train')
    idx = torch.as_tensor(_rank_positions(0, 2))
    return engine.forward_backward({k: v[idx] for k, v in _batch().items() if torch.is_tensor(v)})


# ------------------------------------------------------------------------------ the loader
def test_rank_slices_of_the_loader_make_up_the_single_process_batches():
    data = [(f'{m}{p}_{k}', p, 1, m) for p in range(10) for m in (0, 1) for k in range(5)]
    sampler = ModalityBalancedSampler(data, batch_size=16, num_instances=2, seed=3)
    single = EpochBatchSampler(sampler, 16, seed=7)
    ranks = [EpochBatchSampler(ModalityBalancedSampler(data, batch_size=16, num_instances=2,
                                                       seed=3), 16, seed=7, rank=r,
                               world_size=2) for r in range(2)]
    for epoch in range(2):
        single.set_epoch(epoch)
        for r in ranks:
            r.set_epoch(epoch)
        whole = list(single)
        parts = [list(r) for r in ranks]
        assert len(parts[0]) == len(parts[1]) == len(whole) > 0
        for b, batch in enumerate(whole):
            merged = parts[0][b] + parts[1][b]
            assert sorted(merged) == sorted(batch)          # same (index, seed) pairs
            pids = [data[i][1] for i, _ in parts[0][b]]
            assert len(set(pids) & {data[i][1] for i, _ in parts[1][b]}) == 0
            mods = [data[i][3] for i, _ in parts[0][b]]
            assert mods == [0] * 4 + [1] * 4                # each slice is itself balanced
    # a seed is a function of the position, not of the process
    assert EpochBatchSampler(sampler, 16, seed=7).epoch_order().shape[1] == 16
    with pytest.raises(ValueError, match='split evenly across ranks'):
        EpochBatchSampler(ModalityBalancedSampler(data, batch_size=24, num_instances=2), 24,
                          seed=0, rank=0, world_size=5)


# ------------------------------------------------------------------------------ torchrun
def _torchrun(args, nproc=2, timeout=400):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
           f'--nproc_per_node={nproc}', '-m', 'torchreid_vi'] + args
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_torchrun_trains_evaluates_resumes_and_evaluates_like_one_process(tmp_path):
    from torchreid_vi.tools.synthesize import synthesize
    root = tmp_path / 'data'
    synthesize('sysu_mm01', str(root / 'SYSU-MM01'), seed=0, num_ids=16, size=(32, 16))
    run = tmp_path / 'run'
    common = ['--config-file', 'demo/xiv_synthetic', '--root', str(root), 'data.save_dir',
              str(run), 'data.height', '32', 'data.width', '16', 'train.batch_size', '16',
              'sampler.num_instances', '2', 'vi.sysu_mm01.num_trials', '1',
              'vi.sysu_mm01.shots', '[1]', 'vi.sysu_mm01.search_modes', "['all']",
              'test.visrank', 'False', 'vi.eval.max_rank', '5', 'vi.train.checkpoint_freq', '1',
              'train.print_freq', '1']
    out = _torchrun(common + ['train.max_epoch', '2'])
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(os.listdir(run / 'model')) == ['model.pth.tar-1', 'model.pth.tar-2']
    data = json.load(open(run / 'results.json'))
    assert len(data['runs']) == 1 and data['runs'][0]['environment']['world_size'] == 2
    assert [e['epoch'] for e in data['evaluations']] == [2]
    logs = [f for f in os.listdir(run) if f.startswith('train.log-')]
    assert len(logs) == 1
    # the disk pre-flight ran under torchrun: rank 0 measured, both ranks took its verdict
    assert open(run / logs[0]).read().count('Pre-flight: data.save_dir') == 1

    out = _torchrun(common + ['train.max_epoch', '3', 'model.resume', 'auto'])
    assert out.returncode == 0, out.stderr[-3000:]
    assert load_checkpoint(str(run / 'model' / 'model.pth.tar-3'))['world_size'] == 2
    data = json.load(open(run / 'results.json'))
    assert [e['epoch'] for e in data['evaluations']] == [2, 3]

    # evaluation of one checkpoint: 2 processes (rank 0 evaluates) == 1 process, exactly
    weights = str(run / 'model' / 'model.pth.tar-3')
    evaluate = ['test.evaluate', 'True', 'model.resume', '', 'model.load_weights', weights]
    out = _torchrun(common + evaluate)
    assert out.returncode == 0, out.stderr[-3000:]
    single = subprocess.run([sys.executable, '-m', 'torchreid_vi'] + common + evaluate
                            + ['data.save_dir', str(tmp_path / 'single')], capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    a = json.load(open(run / 'results.json'))['evaluations'][-1]['metrics']
    b = json.load(open(tmp_path / 'single' / 'results.json'))['evaluations'][-1]['metrics']
    assert a == b


# ------------------------------------------------------------------------------ precision
@pytest.mark.parametrize('engine_name', ('softmax',) + ENGINES)
def test_bf16_autocast_trains_a_step_of_every_engine_on_cpu(engine_name):
    from torchreid_vi.cli import build_engine, build_model
    cfg = _cfg('triplet' if engine_name == 'softmax' else engine_name)
    if engine_name == 'softmax':
        cfg.loss.name = 'softmax'
    cfg.train.amp = 'bf16'
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES)
    before = [p.detach().clone() for p in model.parameters()]
    dm = SimpleNamespace(train_loader=None, test_loader={}, num_train_pids=NUM_CLASSES,
                         height=H, width=W)
    engine = build_engine(cfg, dm, model, torch.optim.SGD(model.parameters(), lr=0.01), None)
    assert engine.amp == 'bf16' and engine.scaler is None
    engine.set_model_mode('train')
    terms = engine.forward_backward(_batch())
    assert all(np.isfinite(v) for v in terms.values())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_a_gradscaler_state_travels_through_a_checkpoint(tmp_path):
    from torchreid_vi.cli import build_engine, build_model
    cfg = _cfg('xiv')

    def engine():
        torch.manual_seed(0)
        model = build_model(cfg, NUM_CLASSES)
        dm = SimpleNamespace(train_loader=None, test_loader={}, num_train_pids=NUM_CLASSES,
                             height=H, width=W)
        e = build_engine(cfg, dm, model, torch.optim.SGD(model.parameters(), lr=0.0), None)
        e.scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 16)   # fp16's dynamic scaler
        return e
    first = engine()
    first.scaler.scale(torch.ones(()))       # the scaler starts lazily, on its first use
    first.scaler.update(new_scale=1234.0)
    path = first.save_model(0, None, str(tmp_path))
    assert load_checkpoint(path)['scaler']['scale'] == 1234.0
    second = engine()
    assert second.scaler.state_dict()['scale'] != 1234.0
    assert second.resume(path) == 1
    assert second.scaler.state_dict()['scale'] == 1234.0


def test_fp16_is_refused_on_cpu_with_a_clear_message():
    from torchreid_vi.cli import build_engine, build_model
    if torch.cuda.is_available():
        pytest.skip('CUDA present: fp16 is allowed')
    cfg = _cfg('idkl')
    cfg.train.amp = 'fp16'
    model = build_model(cfg, NUM_CLASSES)
    dm = SimpleNamespace(train_loader=None, test_loader={}, num_train_pids=NUM_CLASSES,
                         height=H, width=W)
    with pytest.raises(ValueError, match='train.amp fp16 needs a CUDA device.*bf16'):
        build_engine(cfg, dm, model, torch.optim.SGD(model.parameters(), lr=0.0), None)
