"""XIV engine: batch splitting by modality, the loss terms it reports, the strong-baseline
reduction, the fused test distance (Eq. 2), and a short training run through the command line."""
import copy
import glob
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from torchreid_vi._torchreid import tr
from torchreid_vi.methods.xiv import model_options, register
from torchreid_vi.methods.xiv.engine import XIVEngine
from torchreid_vi.methods.xiv.model import xiv_resnet18

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P, K, H, W, NUM_CLASSES = 3, 2, 32, 16, 6


def _cfg():
    register()
    from torchreid_vi.config import get_default_config
    return get_default_config()


def _engine(model=None, **xiv_options):
    """The engine of the default config with ``cfg.xiv`` options changed, built as the command
    line builds it (model switches through the factory, the rest through from_config)."""
    torch.manual_seed(0)
    cfg = _cfg()
    cfg.use_gpu = False
    for key, value in xiv_options.items():
        cfg.xiv[key] = value
    model = model or xiv_resnet18(NUM_CLASSES, pretrained=False, **model_options(cfg))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3.5e-4)
    dm = SimpleNamespace(train_loader=None, test_loader={}, num_train_pids=NUM_CLASSES,
                         height=H, width=W)
    return XIVEngine.from_config(cfg, dm, model, optimizer, None)


def _features(engine, imgs, modality):
    out = engine.extract_features(imgs, modality)
    return out if isinstance(out, dict) else {'feat': out}


def _batch(seed=0):
    """The sampler's layout: [v(p1..pP, K each), r(p1..pP, K each)]."""
    g = torch.Generator().manual_seed(seed)
    pids = torch.arange(P).repeat_interleave(K).repeat(2)
    modality = torch.cat([torch.zeros(P * K), torch.ones(P * K)]).long()
    return {'img': torch.randn(2 * P * K, 3, H, W, generator=g), 'pid': pids,
            'modality': modality}


def _permuted(batch, perm):
    return {k: v[perm] for k, v in batch.items()}


def test_split_follows_modality_not_positions():
    """Shuffling the batch (so visible and infrared rows interleave) changes nothing."""
    a = _engine()
    b = _engine(model=copy.deepcopy(a.model))
    b.optimizer.load_state_dict(a.optimizer.state_dict())
    a.model.train()
    b.model.train()
    batch = _batch()
    perm = torch.randperm(2 * P * K, generator=torch.Generator().manual_seed(1))
    terms_a = a.forward_backward(batch)
    terms_b = b.forward_backward(_permuted(batch, perm))
    assert terms_a.keys() == terms_b.keys()
    for k in terms_a:
        assert terms_a[k] == pytest.approx(terms_b[k], rel=1e-4, abs=1e-5), k

    with pytest.raises(ValueError, match='ModalityBalancedSampler'):
        only_vis = {k: v[:P * K] for k, v in batch.items()}
        a.forward_backward(only_vis)


def test_full_step_reports_every_term_and_trains_the_generator():
    engine = _engine()
    engine.model.train()
    before = [p.detach().clone() for p in engine.net.generator.parameters()]
    terms = engine.forward_backward(_batch())
    assert set(terms) == {'id_ir', 'tri_ir', 'id_x', 'tri_x', 'id_vis', 'tri_vis',
                          'cmg_ir_x', 'cmg_ir_vis', 'loss_m', 'loss_c', 'loss'}
    assert all(isinstance(v, float) for v in terms.values())
    assert terms['loss'] == pytest.approx(terms['loss_m'] + 0.1 * terms['loss_c'], rel=1e-5)
    after = list(engine.net.generator.parameters())
    assert all(not torch.equal(b, a) for b, a in zip(before, after))


def test_fixed_generator_has_no_gradient_and_x_is_the_transform():
    engine = _engine(generator='gray', use_cmg=False)
    engine.model.train()
    terms = engine.forward_backward(_batch())
    assert 'id_x' in terms and not any(k.startswith('cmg') for k in terms)
    assert all(p.grad is None for p in engine.net.generator.parameters())


def test_generator_none_without_cmg_is_the_two_modality_strong_baseline():
    engine = _engine(generator='none', use_cmg=False)
    reference = copy.deepcopy(engine.model).train()
    engine.model.train()
    batch = _batch()
    terms = engine.forward_backward(batch)
    assert set(terms) == {'id_ir', 'tri_ir', 'id_vis', 'tri_vis', 'loss_m', 'loss_c', 'loss'}

    # L_I + L_V with torchreid's own losses, on one forward of [I, V]
    ir, vis = batch['modality'] == 1, batch['modality'] == 0
    imgs = torch.cat([batch['img'][ir], batch['img'][vis]])
    pids = torch.cat([batch['pid'][ir], batch['pid'][vis]])
    with torch.no_grad():
        logits, t = reference(imgs)
    ce = tr.losses.CrossEntropyLoss(NUM_CLASSES, use_gpu=False, label_smooth=False)
    tri = tr.losses.TripletLoss(margin=0.3)
    n = int(ir.sum())
    expected = sum(float(ce(logits[s], pids[s]) + tri(t[s], pids[s]))
                   for s in (slice(0, n), slice(n, None)))
    assert terms['loss'] == pytest.approx(expected, rel=1e-4)
    assert not engine.fusion


@pytest.mark.parametrize('fusion', [True, False])
def test_fused_distance_is_d_iv_plus_d_ix(fusion):
    engine = _engine(fusion=fusion)
    engine.model.eval()
    ir_imgs, vis_imgs = torch.randn(4, 3, H, W), torch.randn(5, 3, H, W)
    with torch.no_grad():
        ir = _features(engine, ir_imgs, 1)
        vis = _features(engine, vis_imgs, 0)
        dist = engine.pairwise_distance(ir, vis)
        f_i, f_v = engine.model(ir_imgs), engine.model(vis_imgs)
        f_x = engine.model(engine.net.make_x(vis_imgs))
    assert set(ir) == {'feat'}
    assert set(vis) == ({'feat', 'feat_x'} if fusion else {'feat'})
    # independent of the code under test: torch's own Euclidean distance
    expected = torch.cdist(f_i.double(), f_v.double())
    if fusion:
        expected = expected + torch.cdist(f_i.double(), f_x.double())
    assert dist.shape == (4, 5)
    assert torch.allclose(dist.double(), expected, atol=1e-4)


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match='xiv.generator'):
        _engine(generator='sepia')
    with pytest.raises(ValueError, match='xiv.test_feature'):
        _engine(test_feature='gem')
    with pytest.raises(TypeError, match='xiv_resnet50'):
        _engine(model=tr.models.build_model('resnet18', NUM_CLASSES, pretrained=False,
                                            use_gpu=False))


def test_config_node_has_the_paper_defaults():
    cfg = _cfg()
    assert (cfg.xiv.generator, cfg.xiv.lambda_cmg, cfg.xiv.margin_cross, cfg.xiv.margin_intra,
            cfg.xiv.label_smoothing, cfg.xiv.fusion) == ('learned', 0.1, 0.5, 0.3, 0.0, True)
    for path in glob.glob(os.path.join(REPO, 'configs', 'xiv', '**', '*.yaml'), recursive=True) \
            + [os.path.join(REPO, 'configs', 'demo', 'xiv_synthetic.yaml')]:
        c = _cfg()
        c.merge_from_file(path)  # every shipped config uses declared keys only
        assert c.engine.name == 'xiv' and c.model.name.startswith('xiv_'), path


def test_ablation_configs_differ_from_the_full_method_only_in_xiv_switches():
    base = _cfg()
    base.merge_from_file(os.path.join(REPO, 'configs', 'xiv', 'sysu_mm01.yaml'))
    expected = {'baseline': ('learned', False, False), 'baseline_x': ('learned', True, False),
                'mean': ('mean', True, False), 'gray': ('gray', True, False),
                'hsv_v': ('hsv_v', True, False), 'ycbcr_y': ('ycbcr_y', True, False)}
    for name, (generator, use_x, use_cmg) in expected.items():
        c = _cfg()
        c.merge_from_file(os.path.join(REPO, 'configs', 'xiv', 'ablation', f'{name}.yaml'))
        assert (c.xiv.generator, c.xiv.use_x, c.xiv.use_cmg) == (generator, use_x, use_cmg)
        c.xiv, c.data.save_dir = base.xiv.clone(), base.data.save_dir
        assert c == base, name


def _logged_losses(save_dir):
    logs = glob.glob(os.path.join(save_dir, 'train.log-*'))
    assert logs, f'no train.log in {save_dir}'
    text = open(logs[0]).read()
    return [float(v) for v in re.findall(r'(?:^|\s)loss ([0-9.]+) \(', text)]


def test_training_through_the_command_line_lowers_the_loss(tmp_path):
    from torchreid_vi.tools.synthesize import synthesize
    root = tmp_path / 'data'
    synthesize('sysu_mm01', root / 'SYSU-MM01', seed=0, num_ids=16, size=(32, 16))  # 6 train ids
    out = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'torchreid_vi',
           '--config-file', os.path.join(REPO, 'configs', 'demo', 'xiv_synthetic.yaml'),
           '--root', str(root), 'data.save_dir', str(out),
           'data.height', '32', 'data.width', '16', 'data.workers', '0',
           'data.transforms', "['random_flip']",
           'train.batch_size', '16', 'sampler.num_instances', '2', 'vi.sampler.epoch_mode', 'cover',
           'train.max_epoch', '10', 'train.lr', '0.001', 'train.lr_scheduler', 'single_step',
           'train.stepsize', '[100]', 'train.print_freq', '1',
           'vi.sysu_mm01.search_modes', "['all']", 'vi.sysu_mm01.shots', '[1]',
           'vi.sysu_mm01.num_trials', '1', 'test.visrank', 'False']
    # One thread: at 32x16 a second one gains little, and it keeps the run fast on a busy machine.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    losses = _logged_losses(str(out))
    assert len(losses) >= 16  # 10 'cover' epochs x 2 steps
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.9 * first, losses
    assert os.path.isfile(out / 'results.json')
