"""The reproduction guides of projects/XIV/README.md and projects/IDKL/README.md: the README
blocks equal the generator's output, every command builds its config, the paper numbers are the
specs', and the cost figures (multiply-adds, steps per epoch) check out independently."""
from __future__ import annotations

import ast
import math
import os
import re
import shlex

import pytest
import torch
from torch import nn

from torchreid_vi.config import resolve_config_file
from torchreid_vi.tools import repro_guide as guide

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READMES = {'xiv': os.path.join(REPO, 'projects', 'XIV', 'README.md'),
           'idkl': os.path.join(REPO, 'projects', 'IDKL', 'README.md')}
SPECS = {'xiv': 'xiv.md', 'idkl': 'idkl.md'}
ROWS = [(method, table.title, row) for method, tables in guide.TABLES.items()
        for table in tables for row in table.rows]


def row_id(item):
    method, _, row = item
    return f'{method}:{row.config}:{row.label}'


@pytest.mark.parametrize('method', sorted(READMES))
def test_readme_block_equals_the_generated_text(method):
    text = open(READMES[method], encoding='utf-8').read()
    begin, end = guide.BEGIN.format(method=method), guide.END.format(method=method)
    assert text.count(begin) == 1 and text.count(end) == 1, READMES[method]
    block = begin + text.split(begin, 1)[1].split(end, 1)[0] + end + '\n'
    assert block == guide.render(method), (
        f'{READMES[method]} is out of date: run python -m torchreid_vi.tools.repro_guide '
        f'--method {method} --write {os.path.relpath(READMES[method], REPO)}')
    assert guide.replace_block(text, method) == text


@pytest.mark.parametrize('item', ROWS, ids=row_id)
def test_every_command_builds_its_config_and_its_overrides_take_effect(item):
    method, _, row = item
    resolve_config_file(row.config)                       # a packaged config name
    cmd = guide.command(row)
    if row.loop:
        var, values = row.loop
        m = re.fullmatch(rf'for {var} in ([0-9 ]+); do (.*); done', cmd)
        assert m and [int(v) for v in m.group(1).split()] == list(values), cmd
        runs = [shlex.split(m.group(2).replace('$' + var, str(v))) for v in values]
    else:
        runs = [shlex.split(cmd)]
    assert [r[3:] for r in runs] == guide.row_commands(row)
    for words, cfg in zip(runs, guide.row_configs(row)):
        assert words[:3] == ['python', '-m', 'torchreid_vi']
        assert words[3:7] == ['--config-file', row.config, '--root', '/data']
        assert cfg.data.root == '/data'
        opts = words[7:]
        for key, value in zip(opts[0::2], opts[1::2]):
            node = cfg
            for part in key.split('.'):
                node = node[part]
            try:
                expected = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                expected = value
            assert (list(node) if isinstance(node, (list, tuple)) else node) == expected, key
        # what the run builds from the config before training
        _build_run_options(cfg)


def _build_run_options(cfg):
    from torchreid_vi.data.sampler import batch_layout
    from torchreid_vi.data.transforms import build_transforms
    from torchreid_vi.evaluation.evaluator import EvalOptions
    from torchreid_vi.methods.idkl import IDKLLoss
    from torchreid_vi.methods.xiv import XIVLoss
    from torchreid_vi.registry import ENGINES, MODELS
    assert cfg.model.name in MODELS and cfg.engine.name in ENGINES
    batch_layout(cfg.train.batch_size, cfg.sampler.num_instances)
    build_transforms(cfg.data.height, cfg.data.width, list(cfg.data.transforms))
    EvalOptions.from_config(cfg)
    {'xiv': XIVLoss, 'idkl': IDKLLoss}[cfg.engine.name].from_config(cfg)


@pytest.mark.parametrize('item', ROWS, ids=row_id)
def test_paper_numbers_are_the_specs(item):
    method, _, row = item
    spec = os.path.join(REPO, '..', 'shared', 'spec', SPECS[method])
    if not os.path.isfile(spec):
        pytest.skip(f'spec {os.path.abspath(spec)} not found (shared folder beside the checkout)')
    text = open(spec, encoding='utf-8').read()
    assert row.paper and any(v is not None for v in row.paper) or row.label.startswith('λ')
    for value in row.paper:
        if value is not None:
            assert re.search(rf'(?<![0-9.]){re.escape(value)}(?![0-9])', text), (row.label, value)


def _hook_macs(net, shape):
    """Multiply-adds of every Conv2d and Linear, from their output shapes (forward hooks)."""
    total = []

    def conv(m, inp, out):
        total.append(out.numel() * m.in_channels // m.groups * m.kernel_size[0]
                     * m.kernel_size[1])

    def linear(m, inp, out):
        total.append(out.numel() * m.in_features)
    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
             for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.device('meta'):
        x = torch.empty(*shape)
    net.eval()(x)
    for h in hooks:
        h.remove()
    return sum(total) / shape[0]


def test_multiply_adds_agree_with_a_hook_count_and_the_papers_figures():
    from torchreid_vi.modeling.backbones import pooled_backbone, torchreid_resnet
    with torch.device('meta'):
        nets = {s: pooled_backbone(torchreid_resnet('resnet50', last_stride=s))[0]
                for s in (1, 2)}
    for stride, net in nets.items():
        assert guide.resnet50_macs(stride) == pytest.approx(_hook_macs(net, (1, 3, 256, 128)),
                                                            rel=1e-9)
    assert guide.resnet50_macs(2) / 1e9 == pytest.approx(2.67, abs=0.01)   # the paper's ~2.7 G
    assert guide.resnet50_macs(1) / 1e9 == pytest.approx(4.05, abs=0.01)   # last stride 1
    assert guide.generator_macs() == 6 * 256 * 128                         # xiv.md §2


def test_steps_and_images_per_epoch_follow_the_samplers():
    cfg = guide.build_row_config(['--config-file', 'xiv/sysu_mm01', '--root', '/data'])
    c = guide.cost(cfg)
    # 'agw' epoch: floor(max(22,258 visible, 11,909 infrared) / (P·K = 48)) + 1 batches of
    # 96 loader images + 48 X images
    assert (c.steps_per_epoch, c.images_per_step, c.epochs) == (22258 // 48 + 1, 144, 120)
    assert c.evaluations == 6                                  # test.eval_freq 20 over 120 epochs
    base = guide.cost(guide.build_row_config(['--config-file', 'xiv/ablation/baseline',
                                              '--root', '/data']))
    assert base.images_per_step == 96                          # no X block
    idkl = guide.cost(guide.build_row_config(['--config-file', 'idkl/sysu_mm01', '--root',
                                              '/data']))
    assert (idkl.steps_per_epoch, idkl.images_per_step, idkl.epochs) == (198, 120, 160)
    assert idkl.tflops == guide.ASSUMED_TFLOPS['fp16']
    hours = (144 * 464 * 120 * 6 * c.train_macs + c.eval_images * 6 * 2 * c.eval_macs) \
        / (guide.ASSUMED_TFLOPS['none'] * 1e12) / 3600
    assert c.seconds / 3600 == pytest.approx(hours, rel=1e-9)
    assert math.isclose(c.eval_images, 3803 + 2 * 6775)        # fused: f(V) and f(g(V))
