"""The papers' (and the released IDKL code's) training recipes, pinned in one table.

Every expected value below is written from the specs (``shared/spec/xiv.md`` §3-§6 and
``shared/spec/idkl.md`` §3.7, §6, §7), never copied from the configs; the test resolves each
packaged config by name and compares. The learning-rate schedule is checked epoch by epoch on the
optimizer and scheduler the command line builds (``optimizer_from_config`` /
``scheduler_from_config``).

Batch sizes: XIV's sampler draws P identities × K images **per modality** (the X block is made
inside the step), so ``train.batch_size`` = 2·P·K; IDKL's released P × K = 12 × 10 is 12 ×
(5 visible + 5 infrared), i.e. ``train.batch_size`` = 2·P·m with ``sampler.num_instances`` = m.
"""
from __future__ import annotations

import pytest
import torch

from torchreid_vi.config import get_default_config
from torchreid_vi.optim import optimizer_from_config, scheduler_from_config


def xiv_warmup_schedule(lr, epochs, warmup_epochs, warmup_from, milestones, gamma):
    """xiv.md §6: the strong baseline's schedule. Epoch e (1-based) of the warm-up gets
    lr·(f + (1 − f)·(e − 1)/W), f = 0.1, W = 10 (linear from 0.1·lr over the first 10 epochs,
    the full lr from epoch 11), then ×gamma once more for every milestone m < e ("×0.1 at
    epochs 40 and 70": epochs 41-70 at 0.1·lr, 71-120 at 0.01·lr)."""
    out = []
    for e in range(1, epochs + 1):
        warm = warmup_from + (1 - warmup_from) * (e - 1) / warmup_epochs \
            if e <= warmup_epochs else 1.0
        out.append(lr * warm * gamma ** sum(m < e for m in milestones))
    return out


# idkl.md §6: "lr 3.5e-4 for epochs 1-55, 3.5e-5 for 56-95, 3.5e-6 for 96-160", no warm-up.
IDKL_SCHEDULE = [3.5e-4] * 55 + [3.5e-5] * 40 + [3.5e-6] * 65
XIV_SCHEDULE = xiv_warmup_schedule(3.5e-4, 120, 10, 0.1, [40, 70], 0.1)

XIV_P, XIV_K = 8, 6               # xiv.md §4: P = 8, K = 6 per modality (M = 48, 3M = 144)
IDKL_M = 5                        # idkl.md §3.7: K = 10 = 5 visible + 5 infrared

XIV = {   # xiv.md: §3 learner, §4 batch, §5 losses, §6 optimisation, §7 test distance
    'engine.name': 'xiv', 'model.name': 'xiv_resnet50', 'model.pretrained': True,
    'train.optim': 'adam', 'train.lr': 3.5e-4, 'train.weight_decay': 5e-4,
    'adam.beta1': 0.9, 'adam.beta2': 0.999,          # Adam; the paper gives no betas: torch's
    'train.max_epoch': 120, 'train.lr_scheduler': 'warmup_multi_step',
    'train.stepsize': [40, 70], 'train.gamma': 0.1,
    'vi.train.warmup_epochs': 10, 'vi.train.warmup_factor': 0.1,
    'sampler.train_sampler': 'ModalityBalancedSampler',
    'train.batch_size': 2 * XIV_P * XIV_K, 'sampler.num_instances': XIV_K,
    'data.height': 256, 'data.width': 128,
    'data.transforms': ['random_flip', 'pad_crop_zero', 'random_erase'],   # strong baseline
    'xiv.margin_cross': 0.5, 'xiv.margin_intra': 0.3, 'xiv.lambda_cmg': 0.1,   # α1, α2, λ
    'xiv.label_smoothing': 0.0,                       # plain cross entropy
    'xiv.generator': 'learned', 'xiv.use_x': True, 'xiv.use_cmg': True,
    'xiv.fusion': True, 'test.dist_metric': 'euclidean', 'xiv.test_feature': 'bn',
    'schedule': XIV_SCHEDULE,
}
# Table 4 / 5 rows: the full method with only the switches changed (xiv.md §5 "Ablations").
BASELINE = {'xiv.use_x': False, 'xiv.use_cmg': False, 'xiv.fusion': False}      # L_V + L_I
BASELINE_X = {'xiv.generator': 'learned', 'xiv.use_x': True, 'xiv.use_cmg': False}  # + L_X
DENSENET = {'model.name': 'xiv_densenet121', 'data.height': 224, 'data.width': 224}


def fixed_x(kind):   # Table 5: X replaced by a fixed transform, no CMG
    return {'xiv.generator': kind, 'xiv.use_x': True, 'xiv.use_cmg': False}


IDKL_SYSU = {   # idkl.md §3.7 (loss values), §6 (data, sampler, optimizer), §7 (evaluation)
    'engine.name': 'idkl', 'model.name': 'idkl_resnet50', 'model.pretrained': True,
    'train.optim': 'adam', 'train.lr': 3.5e-4, 'train.weight_decay': 5e-3,
    'adam.beta1': 0.9, 'adam.beta2': 0.999,
    'train.max_epoch': 160, 'train.lr_scheduler': 'multi_step', 'train.stepsize': [55, 95],
    'train.gamma': 0.1, 'train.amp': 'fp16',
    'sampler.train_sampler': 'ModalityBalancedSampler', 'vi.sampler.epoch_mode': 'idkl',
    'train.batch_size': 2 * 12 * IDKL_M, 'sampler.num_instances': IDKL_M,
    'data.height': 384, 'data.width': 144,
    'data.transforms': ['random_flip', 'pad_crop', 'tv_random_erasing'],
    'idkl.triplet.margin': 1.3, 'idkl.ip.weight': 0.1,
    'idkl.tgsa.enabled': True, 'idkl.tgsa.distill_weight': 0.6,
    'idkl.tgsa.mdr_weights': [1.0, 1.0, 1.0], 'idkl.csa.weight': 0.8,
    'idkl.csa.set_level': True, 'idkl.mdr.logit_weight': 1.0,
    'idkl.discriminator.weight': 1.0, 'idkl.confuser.weight': 1.0,
    # defaults reproduce the released code (idkl.md §4 "torchreid_vi default: code")
    'idkl.confuser.mode': 'pseudo', 'idkl.ip.mask_mode': 'pixel', 'idkl.ip.loss_form': 'code',
    'idkl.tgsa.cross_mode': 'mixed_set',
    'test.normalize_feature': True,   # §7: SYSU L2-normalised; RegDB / LLCM raw features
    'test.eval_freq': -1,             # §7: the final model only
    'schedule': IDKL_SCHEDULE,
}

RECIPES = {
    'xiv/sysu_mm01': {**XIV, 'data.sources': ['sysu_mm01'], 'data.targets': ['sysu_mm01']},
    'xiv/regdb': {**XIV, 'data.sources': ['regdb'], 'data.targets': ['regdb']},
    'xiv/llcm': {**XIV, 'data.sources': ['llcm'], 'data.targets': ['llcm']},
    'xiv/ablation/baseline': {**XIV, **BASELINE},
    'xiv/ablation/baseline_x': {**XIV, **BASELINE_X},
    'xiv/ablation/mean': {**XIV, **fixed_x('mean')},
    'xiv/ablation/gray': {**XIV, **fixed_x('gray')},
    'xiv/ablation/hsv_v': {**XIV, **fixed_x('hsv_v')},
    'xiv/ablation/ycbcr_y': {**XIV, **fixed_x('ycbcr_y')},
    'xiv/ablation/densenet121_baseline': {**XIV, **BASELINE, **DENSENET},
    'xiv/ablation/densenet121_baseline_x': {**XIV, **BASELINE_X, **DENSENET},
    'xiv/ablation/densenet121_xiv': {**XIV, **DENSENET},
    'idkl/sysu_mm01': {**IDKL_SYSU, 'data.sources': ['sysu_mm01'],
                       'data.targets': ['sysu_mm01']},
    'idkl/llcm': {**IDKL_SYSU, 'data.sources': ['llcm'], 'data.targets': ['llcm'],
                  'test.normalize_feature': False},
    'idkl/regdb': {**IDKL_SYSU, 'data.sources': ['regdb'], 'data.targets': ['regdb'],
                   'train.batch_size': 2 * 6 * IDKL_M,            # 6 × (5 + 5)
                   'data.height': 256, 'data.width': 128,
                   'idkl.tgsa.enabled': False, 'idkl.csa.weight': 0.3,
                   # unused while TGSA is off: the released code's small-batch branch values
                   'idkl.tgsa.distill_weight': 0.1, 'idkl.tgsa.mdr_weights': [0.1, 0.0, 0.0],
                   'test.normalize_feature': False},
}


def packaged(name):
    cfg = get_default_config()
    cfg.merge_from_file(name)
    return cfg


def lookup(cfg, key):
    node = cfg
    for part in key.split('.'):
        node = node[part]
    return list(node) if isinstance(node, (list, tuple)) else node


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_config_holds_the_paper_recipe(name):
    cfg = packaged(name)
    expected = {k: v for k, v in RECIPES[name].items() if k != 'schedule'}
    got = {k: lookup(cfg, k) for k in expected}
    wrong = {k: (got[k], v) for k, v in expected.items()
             if got[k] != (pytest.approx(v) if isinstance(v, (float, list)) else v)}
    assert not wrong, f'{name}: (config, paper) differ: {wrong}'


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_optimizer_and_learning_rate_of_every_epoch(name):
    cfg = packaged(name)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model[1].bias.requires_grad_(False)               # a frozen BNNeck-like bias
    optimizer = optimizer_from_config(cfg, model)
    assert type(optimizer) is torch.optim.Adam        # coupled L2 weight decay, not AdamW
    assert len(optimizer.param_groups) == 1           # one group, no classifier multiplier
    group = optimizer.param_groups[0]
    row = RECIPES[name]
    assert group['betas'] == pytest.approx((row['adam.beta1'], row['adam.beta2']))
    assert group['eps'] == 1e-8 and group['weight_decay'] == pytest.approx(
        row['train.weight_decay'])
    scheduler = scheduler_from_config(cfg, optimizer)
    lrs = []
    for _ in range(cfg.train.max_epoch):              # torchreid steps once per epoch
        lrs.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    expected = row['schedule']
    assert len(lrs) == len(expected)
    bad = [(e + 1, got, want) for e, (got, want) in enumerate(zip(lrs, expected))
           if got != pytest.approx(want, rel=1e-9)]
    assert not bad, f'{name}: (epoch, lr, paper lr) differ: {bad[:5]}'


def test_the_schedules_as_the_papers_state_them():
    """Spot values of the two schedules, as the specs word them."""
    lr = 3.5e-4
    assert XIV_SCHEDULE[0] == pytest.approx(0.1 * lr)          # warm-up starts at 0.1·lr
    assert XIV_SCHEDULE[5] == pytest.approx(0.55 * lr)         # linear
    assert XIV_SCHEDULE[10:40] == pytest.approx([lr] * 30)     # epochs 11-40
    assert XIV_SCHEDULE[40:70] == pytest.approx([0.1 * lr] * 30)
    assert XIV_SCHEDULE[70:] == pytest.approx([0.01 * lr] * 50)
    assert len(IDKL_SCHEDULE) == 160 and max(IDKL_SCHEDULE) == lr    # no warm-up
