"""The command line: torchreid's ``scripts/main.py`` plus the plugin's registries.

Usage (``torchreid-vi`` and ``python -m torchreid_vi`` are the same)::

    python -m torchreid_vi --config-file configs/xiv/sysu_mm01.yaml --root /data \\
        data.save_dir log/xiv_sysu train.max_epoch 120
    python -m torchreid_vi --list
    python -m torchreid_vi --plugin projects/custom_dataset/my_dataset.py --config-file ...

Flow: plugins → config (defaults, ``--config-file``, ``-s/-t/--transforms/--root``, trailing
``key value`` options) → seed → log file ``<save_dir>/{train,test}.log-<time>`` → datamanager →
model (registry) → optional weights → optimizer / scheduler → optional resume → engine (registry:
``engine.name``, else ``loss.name``) → ``engine.run``. Every run writes
``<save_dir>/results.json`` (config, environment, every evaluation).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import os.path as osp
import sys
import time
from typing import List, Optional

import torch

__all__ = ['main', 'build_parser', 'build_config', 'load_plugins']


class _Tee:
    """stdout that also writes to a log file (torchreid's Logger closes the real stdout)."""

    def __init__(self, path: str, stream):
        os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
        self.file = open(path, 'a')
        self.stream = stream

    def write(self, msg):
        self.stream.write(msg)
        self.file.write(msg)

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def isatty(self):
        return False

    def close(self):
        self.file.close()


class UserError(Exception):
    """A mistake in the command, the config or the data; reported without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='torchreid-vi', formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description='torchreid with visible-infrared cross-modal datasets, samplers and methods.')
    p.add_argument('--config-file', type=str, default='', help='path to a yaml config file')
    p.add_argument('-s', '--sources', type=str, nargs='+', help='source datasets')
    p.add_argument('-t', '--targets', type=str, nargs='+', help='target datasets')
    p.add_argument('--transforms', type=str, nargs='+', help='data augmentation')
    p.add_argument('--root', type=str, default='', help='path to data root')
    p.add_argument('--plugin', action='append', default=[],
                   help='python file or module to import first (it may register datasets, '
                        'models, samplers, engines); repeatable')
    p.add_argument('--list', action='store_true',
                   help='print the registered datasets, models, samplers and engines and exit')
    p.add_argument('opts', default=None, nargs=argparse.REMAINDER,
                   help='config options as "key value" pairs, e.g. train.max_epoch 10')
    return p


def load_plugins(names: List[str]) -> None:
    """Import each plugin: a ``.py`` file path or a dotted module name."""
    for name in names:
        if name.endswith('.py') or osp.sep in name:
            if not osp.isfile(name):
                raise UserError(f'plugin file "{name}" does not exist')
            mod_name = 'torchreid_vi_plugin_' + osp.splitext(osp.basename(name))[0]
            if mod_name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(mod_name, name)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(name)


def build_config(args):
    from .config import get_default_config
    cfg = get_default_config()
    cfg.use_gpu = torch.cuda.is_available()
    if args.config_file:
        if not osp.isfile(args.config_file):
            raise UserError(f'config file "{args.config_file}" does not exist')
        try:
            cfg.merge_from_file(args.config_file)
        except (KeyError, ValueError) as exc:
            raise UserError(f'in config file "{args.config_file}": {exc}') from exc
    if args.root:
        cfg.data.root = args.root
    if args.sources:
        cfg.data.sources = args.sources
    if args.targets:
        cfg.data.targets = args.targets
    if args.transforms:
        cfg.data.transforms = args.transforms
    if args.opts:
        if len(args.opts) % 2:
            raise UserError(f'options must be "key value" pairs, got an odd list: {args.opts}')
        try:
            cfg.merge_from_list(args.opts)
        except (KeyError, ValueError, AssertionError) as exc:
            raise UserError(f'in command-line options: {exc}') from exc
    if cfg.loss.name == 'triplet' and cfg.loss.triplet.weight_x == 0 and cfg.train.fixbase_epoch:
        raise UserError('train.fixbase_epoch needs loss.triplet.weight_x > 0: the classifier is '
                        'not in the graph otherwise')
    cfg.freeze()
    return cfg


def print_registries(out=sys.stdout) -> None:
    from .registry import list_datasets, list_engines, list_models, list_samplers
    for title, names in (('datasets', list_datasets()), ('models', list_models()),
                         ('samplers', list_samplers()), ('engines', list_engines())):
        print(f'{title} ({len(names)}):', file=out)
        for n in names:
            print(f'  {n}', file=out)


def build_datamanager(cfg):
    from .config import dataset_options, imagedata_kwargs, sampler_options
    from .data.datamanager import CrossModalImageDataManager
    if cfg.data.type != 'image':
        raise UserError(f'data.type "{cfg.data.type}" is not supported: torchreid_vi works on '
                        f'image datasets')
    return CrossModalImageDataManager(**imagedata_kwargs(cfg, cfg.use_gpu),
                                      dataset_options=dataset_options(cfg),
                                      sampler_options=sampler_options(cfg))


def build_model(cfg, num_classes: int):
    from .pretrained import explain_offline_downloads
    from .registry import MODELS
    factory = MODELS.get(cfg.model.name)
    with explain_offline_downloads(cfg.model.name):
        return factory(num_classes=num_classes, loss=cfg.loss.name,
                       pretrained=cfg.model.pretrained, use_gpu=cfg.use_gpu)


def build_engine(cfg, datamanager, model, optimizer, scheduler):
    from .registry import ENGINES
    name = cfg.engine.name or cfg.loss.name
    return ENGINES.get(name)(cfg, datamanager, model, optimizer, scheduler, cfg.use_gpu)


def run(cfg) -> object:
    """Build everything from a frozen config and run it; returns the engine."""
    from ._torchreid import tr
    from .checkpoint import load_model_weights, resume_from_checkpoint
    from .config import lr_scheduler_kwargs, optimizer_kwargs
    from .optim import build_lr_scheduler
    from .results import ResultsFile, environment_info

    tr.utils.set_random_seed(cfg.train.seed)
    if cfg.vi.train.deterministic:
        torch.use_deterministic_algorithms(True)
    if cfg.use_gpu:
        torch.backends.cudnn.benchmark = not cfg.vi.train.deterministic
    print(f'Show configuration\n{cfg}\n')
    env = environment_info('cuda' if cfg.use_gpu else 'cpu')
    print('Environment: ' + ', '.join(f'{k}={v}' for k, v in env.items()))

    datamanager = build_datamanager(cfg)
    print(f'Building model: {cfg.model.name}')
    model = build_model(cfg, datamanager.num_train_pids)
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f'Model parameters: {n_all:,} ({n_train:,} trainable)')
    if cfg.model.load_weights:
        load_model_weights(model, cfg.model.load_weights)
    if cfg.use_gpu:
        model = model.cuda()
    optimizer = tr.optim.build_optimizer(model, **optimizer_kwargs(cfg))
    scheduler = build_lr_scheduler(optimizer, **lr_scheduler_kwargs(cfg))
    start_epoch = cfg.train.start_epoch
    if cfg.model.resume:
        start_epoch = resume_from_checkpoint(cfg.model.resume, model, optimizer, scheduler)['epoch']
    if cfg.test.evaluate and not (cfg.model.load_weights or cfg.model.resume):
        print('Warning: evaluating without model.load_weights or model.resume: the weights '
              'are ' + ('ImageNet-pretrained' if cfg.model.pretrained else 'random') + '.')
    engine = build_engine(cfg, datamanager, model, optimizer, scheduler)
    engine.results = ResultsFile(osp.join(cfg.data.save_dir, 'results.json'), cfg, env)
    engine.run(save_dir=cfg.data.save_dir, max_epoch=cfg.train.max_epoch,
               start_epoch=start_epoch, print_freq=cfg.train.print_freq,
               fixbase_epoch=cfg.train.fixbase_epoch, open_layers=cfg.train.open_layers,
               start_eval=cfg.test.start_eval, eval_freq=cfg.test.eval_freq,
               test_only=cfg.test.evaluate)
    return engine


def main(argv: Optional[List[str]] = None) -> int:
    from . import registration
    from .checkpoint import CheckpointError
    from .data.base import DatasetLayoutError
    from .pretrained import PretrainedWeightsUnavailable

    args = build_parser().parse_args(argv)
    try:
        registration.register_all()
        load_plugins(args.plugin)
        if args.list:
            print_registries()
            return 0
        cfg = build_config(args)
        load_plugins(list(cfg.vi.plugins))
    except (UserError, KeyError, ImportError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2

    log_name = ('test.log' if cfg.test.evaluate else 'train.log') + time.strftime(
        '-%Y-%m-%d-%H-%M-%S')
    stdout = sys.stdout
    tee = _Tee(osp.join(cfg.data.save_dir, log_name), stdout)
    sys.stdout = tee
    try:
        run(cfg)
    except (UserError, DatasetLayoutError, PretrainedWeightsUnavailable, CheckpointError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        tee.file.write(f'error: {exc}\n')
        return 2
    finally:
        sys.stdout = stdout
        tee.close()
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
