"""IDKL engine, config node and per-dataset configs (spec idkl.md §3.7, §6, §10.10, §10.13)."""
import os.path as osp
from types import SimpleNamespace

import pytest
import torch

from torchreid_vi.config import get_default_config
from torchreid_vi.methods.idkl import model_options, register
from torchreid_vi.methods.idkl.engine import IDKLEngine
from torchreid_vi.methods.idkl.model import idkl_resnet18
from torchreid_vi.optim import optimizer_from_config, scheduler_from_config
from torchreid_vi.registry import ENGINES, list_engines, list_models

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = {name: osp.join(REPO, 'configs', 'idkl', f'{name}.yaml')
           for name in ('sysu_mm01', 'regdb', 'llcm')}
VIS, IR = 0, 1
TERMS = ('loss', 'tri', 'tri_sh', 'tri_sp', 'ce', 'id_pl', 'unad', 'pse', 'F_p', 'IN_p',
         'soft_dt', 'tgsa_dist', 'tgsa_mdr', 'bg_kl', 'sm_kl', 'acc')

register()


def config(path=None, opts=()):
    cfg = get_default_config()
    if path:
        cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


def tiny_cfg(*opts):
    return config(opts=['sampler.num_instances', '2', 'train.batch_size', '8',
                        'sampler.train_sampler', 'ModalityBalancedSampler', 'train.lr', '3.5e-4',
                        'train.weight_decay', '5e-3', 'model.name', 'idkl_resnet18', *opts])


def fake_datamanager():
    return SimpleNamespace(train_loader=[], test_loader={})


def build_engine(cfg, num_classes=4):
    torch.manual_seed(0)
    cfg.use_gpu = False
    model = idkl_resnet18(num_classes, pretrained=False, **model_options(cfg))
    optimizer = optimizer_from_config(cfg, model)
    return IDKLEngine.from_config(cfg, fake_datamanager(), model, optimizer, None)


def block_batch(num_ids=2, m=2, seed=0):
    """Our sampler's layout: all visible (m per identity), then all infrared."""
    g = torch.Generator().manual_seed(seed)
    pids = torch.arange(num_ids).repeat_interleave(m).repeat(2)
    mods = torch.tensor([VIS] * (num_ids * m) + [IR] * (num_ids * m))
    return {'img': torch.randn(len(pids), 3, 64, 32, generator=g), 'pid': pids, 'modality': mods}


# ------------------------------------------------------------------ registration and config

def test_register_is_idempotent_and_adds_the_config_node():
    register()
    assert 'idkl' in list_engines() and ENGINES.get('idkl') == IDKLEngine.from_config
    assert {'idkl_resnet50', 'idkl_resnet18'} <= set(list_models())
    cfg = get_default_config()
    c = cfg.idkl
    assert (c.triplet.margin, c.ip.weight, c.tgsa.distill_weight, c.csa.weight) == (
        1.3, 0.1, 0.6, 0.8)
    assert list(c.tgsa.mdr_weights) == [1.0, 1.0, 1.0] and c.tgsa.enabled and c.csa.set_level
    assert (c.ip.mask_mode, c.ip.loss_form, c.tgsa.cross_mode, c.confuser.mode) == (
        'pixel', 'code', 'mixed_set', 'pseudo')
    with pytest.raises((KeyError, AssertionError), match='idkl.tgsa.enable'):  # yacs rejects typos
        cfg.merge_from_list(['idkl.tgsa.enable', 'False'])


def test_dataset_configs_hold_the_released_values():
    """§10.10 and §6: per-dataset λ's, batch layout, image size, optimizer."""
    cfgs = {name: config(path) for name, path in CONFIGS.items()}
    for name, cfg in cfgs.items():
        assert cfg.engine.name == 'idkl' and cfg.model.name == 'idkl_resnet50'
        assert (cfg.sampler.train_sampler == 'ModalityBalancedSampler'
                and cfg.sampler.num_instances == 5)
        assert (cfg.train.optim, cfg.train.lr, cfg.train.weight_decay) == ('adam', 3.5e-4, 5e-3)
        assert (cfg.adam.beta1, cfg.adam.beta2) == (0.9, 0.999)
        assert cfg.train.lr_scheduler == 'multi_step' and list(cfg.train.stepsize) == [55, 95]
        assert cfg.train.max_epoch == 160 and cfg.train.gamma == 0.1
        assert cfg.idkl.ip.weight == 0.1 and cfg.idkl.triplet.margin == 1.3
        assert cfg.data.sources == [name] and cfg.data.targets == [name]
        assert cfg.train.amp == 'fp16'
    for name in ('sysu_mm01', 'llcm'):
        c = cfgs[name]
        assert (c.data.height, c.data.width, c.train.batch_size) == (384, 144, 120)
        assert c.idkl.tgsa.enabled and c.idkl.tgsa.distill_weight == 0.6
        assert list(c.idkl.tgsa.mdr_weights) == [1.0, 1.0, 1.0] and c.idkl.csa.weight == 0.8
    r = cfgs['regdb']
    assert (r.data.height, r.data.width, r.train.batch_size) == (256, 128, 60)
    assert not r.idkl.tgsa.enabled and r.idkl.csa.weight == 0.3
    assert cfgs['sysu_mm01'].test.normalize_feature and not r.test.normalize_feature
    assert not cfgs['llcm'].test.normalize_feature


def test_optimizer_and_schedule_follow_the_released_code():
    """§10.13: one Adam group, betas (0.9, 0.999), wd 5e-3, lr 3.5e-4 / 3.5e-5 / 3.5e-6."""
    cfg = config(CONFIGS['sysu_mm01'])
    net = torch.nn.Linear(2, 2)
    optimizer = optimizer_from_config(cfg, net)
    assert isinstance(optimizer, torch.optim.Adam) and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert group['betas'] == (0.9, 0.999) and group['weight_decay'] == 5e-3
    scheduler = scheduler_from_config(cfg, optimizer)
    lrs = []
    for _ in range(cfg.train.max_epoch):
        lrs.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    expected = [3.5e-4] * 55 + [3.5e-5] * 40 + [3.5e-6] * 65
    assert lrs == pytest.approx(expected, rel=1e-9)


# ------------------------------------------------------------------ builder

def test_model_switches_reach_the_model_through_the_factory_and_bad_setups_fail():
    engine = build_engine(tiny_cfg('idkl.ip.mask_mode', 'se', 'idkl.confuser.mode', 'grl',
                                   'idkl.confuser.grl_alpha', '0.5'))
    assert isinstance(engine, IDKLEngine)
    assert engine.model.purifier.mask_mode == 'se'
    assert engine.model.confuser_mode == 'grl' and engine.model.grl_alpha == 0.5
    assert engine.criterion.confuser_mode == 'grl' and engine.criterion.num_instances == 2

    cfg = tiny_cfg()
    cfg.use_gpu = False
    with pytest.raises(TypeError, match='idkl_resnet50'):
        IDKLEngine.from_config(cfg, fake_datamanager(), torch.nn.Linear(2, 2), None, None)
    # the loss and the model must agree on the confuser mode
    model = idkl_resnet18(4, pretrained=False, **model_options(cfg))
    with pytest.raises(ValueError, match="idkl.confuser.mode.*'grl'.*'pseudo'"):
        IDKLEngine.from_config(tiny_cfg('idkl.confuser.mode', 'grl'), fake_datamanager(), model,
                               None, None)
    bad = tiny_cfg('train.batch_size', '10')
    with pytest.raises(ValueError, match='train.batch_size=10'):
        build_engine(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU refusal of fp16')
def test_fp16_is_refused_on_cpu_and_bad_amp_names_the_key():
    with pytest.raises(ValueError, match='train.amp fp16 needs a CUDA device'):
        build_engine(tiny_cfg('train.amp', 'fp16'))
    with pytest.raises(ValueError, match='train.amp'):
        build_engine(tiny_cfg('train.amp', 'fp8'))


# ------------------------------------------------------------------ training step

def test_forward_backward_reports_every_term_and_learns():
    # A small lr: from a random init, Adam's first sign-like steps at the released 3.5e-4 make the
    # distance-softmax terms spike on a batch of 8 before they settle (the CLI test trains at
    # 3.5e-4).
    engine = build_engine(tiny_cfg('train.lr', '1e-5'))
    engine.model.train()
    data = block_batch()
    history = [engine.forward_backward(data) for _ in range(4)]
    assert set(history[0]) == set(TERMS)
    assert all(isinstance(v, float) for v in history[0].values())
    first, last = history[0], history[-1]
    assert last['loss'] < 0.8 * first['loss']
    assert first['loss'] == pytest.approx(
        first['tri'] + first['ce'] + first['id_pl'] + first['unad'] + first['pse']
        + 0.1 * (first['F_p'] + first['IN_p']) + first['soft_dt'] + first['bg_kl'] + first['sm_kl'],
        rel=1e-5)
    assert first['soft_dt'] == pytest.approx(first['tgsa_mdr'] + 0.6 * first['tgsa_dist'], rel=1e-5)
    model = engine.model
    assert model.bnneck_sh.bn.bias.abs().sum() == 0 and model.bnneck_sp.bn.bias.abs().sum() == 0
    # eval path of the engine: (B, 512) BN'd shared features
    model.eval()
    with torch.no_grad():
        feats = engine.extract_features(data['img'][:3], IR)
    assert feats.shape == (3, 512) and feats.dtype == torch.float32


def test_forward_backward_rejects_a_batch_without_the_idkl_layout():
    engine = build_engine(tiny_cfg())
    engine.model.train()
    data = block_batch()
    data['modality'] = torch.zeros_like(data['modality'])   # all visible
    with pytest.raises(ValueError, match='sampler.num_instances'):
        engine.forward_backward(data)


# ------------------------------------------------------------------ end to end

def test_cli_trains_idkl_on_synthetic_sysu_and_the_loss_goes_down(tmp_path, monkeypatch):
    """The command line with configs/demo/idkl_synthetic.yaml on a tiny synthetic SYSU-MM01 tree.

    'cover' epochs show every training identity once per epoch, so epoch means are comparable;
    the seed is fixed (train.seed 1), so the run is deterministic on a given platform."""
    from torchreid_vi import cli
    from torchreid_vi.methods.idkl import engine as idkl_engine
    from torchreid_vi.tools.synthesize import synthesize

    synthesize('sysu_mm01', tmp_path / 'data' / 'SYSU-MM01', seed=0, num_ids=12, size=(32, 16))
    losses = []
    step = idkl_engine.IDKLEngine.forward_backward

    def recording_step(self, data):
        out = step(self, data)
        losses.append((self.epoch, out['loss']))
        return out
    monkeypatch.setattr(idkl_engine.IDKLEngine, 'forward_backward', recording_step)
    save_dir = tmp_path / 'run'
    rc = cli.main([
        '--config-file', osp.join(REPO, 'configs', 'demo', 'idkl_synthetic.yaml'),
        '--root', str(tmp_path / 'data'), 'data.save_dir', str(save_dir),
        'data.height', '32', 'data.width', '16', 'data.workers', '0',
        'train.batch_size', '8', 'sampler.num_instances', '2', 'vi.sampler.epoch_mode', 'cover',
        'train.max_epoch', '6', 'train.stepsize', '[10]', 'test.visrank', 'False',
        'vi.sysu_mm01.num_trials', '1', 'vi.sysu_mm01.shots', '[1]',
        'vi.sysu_mm01.search_modes', "['all']", 'vi.eval.max_rank', '5'])
    assert rc == 0
    epochs = sorted({e for e, _ in losses})
    assert epochs == [0, 1, 2, 3, 4, 5]
    mean = {e: sum(v for ee, v in losses if ee == e) / sum(1 for ee, _ in losses if ee == e)
            for e in epochs}
    # from random weights the distance-softmax terms first rise, then the loss falls
    assert mean[5] < mean[0], mean
    results = (save_dir / 'results.json').read_text()
    assert 'sysu_mm01/all/single' in results
