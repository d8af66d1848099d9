"""The command line: torchreid's ``scripts/main.py`` plus the plugin's registries.

Usage (``torchreid-vi`` and ``python -m torchreid_vi`` are the same)::

    python -m torchreid_vi --config-file xiv/sysu_mm01 --root /data \\
        data.save_dir log/xiv_sysu train.max_epoch 120
    python -m torchreid_vi --list
    python -m torchreid_vi --plugin projects/custom_dataset/my_dataset.py --config-file ...

``--config-file`` takes a yaml path or a packaged config name (``xiv/sysu_mm01``, see
``--list``). Flow: plugins (``--plugin``, then the config's ``vi.plugins``) → config (defaults,
``--config-file``, ``-s/-t/--transforms/--root``, trailing ``key value`` options) → seed → log
file ``<save_dir>/{train,test}.log-<time>`` → datamanager → model (registry, with the method's
model options) → optional weights → optimizer / scheduler → engine (registry: ``engine.name``,
else ``loss.name``) → optional resume → ``engine.run``. Every run writes
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

__all__ = ['main', 'build_parser', 'build_config', 'load_plugins', 'UserError']


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
    p.add_argument('--config-file', type=str, default='',
                   help='yaml config: a path or a packaged name such as xiv/sysu_mm01')
    p.add_argument('-s', '--sources', type=str, nargs='+', help='source datasets')
    p.add_argument('-t', '--targets', type=str, nargs='+', help='target datasets')
    p.add_argument('--transforms', type=str, nargs='+', help='data augmentation')
    p.add_argument('--root', type=str, default='', help='path to data root')
    p.add_argument('--plugin', action='append', default=[],
                   help='python file or module to import first (it may register datasets, '
                        'models, samplers, engines, config nodes); repeatable')
    p.add_argument('--list', action='store_true',
                   help='print the registered datasets, models, samplers, engines and the '
                        'packaged configs, and exit')
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
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as exc:
                raise UserError(f'plugin module "{name}" cannot be imported: {exc}') from exc


def _config_plugins(args) -> List[str]:
    """``vi.plugins`` of the config file and the ``key value`` options, read before the config
    is built so that the plugins can add config nodes."""
    from .config import load_yaml_with_base, resolve_config_file
    plugins: List[str] = []
    if args.config_file:
        data = load_yaml_with_base(resolve_config_file(args.config_file))
        plugins = list((data.get('vi') or {}).get('plugins') or [])
    opts = list(args.opts or [])
    for key, value in zip(opts[0::2], opts[1::2]):
        if key == 'vi.plugins':
            import yaml
            plugins = list(yaml.safe_load(value) or [])
    return plugins


def _is_config_key(cfg, token: str) -> bool:
    node = cfg
    for part in token.split('.'):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return '.' in token


def _split_dataset_lists(args, cfg) -> None:
    """``-s a b model.name x`` → sources ``[a, b]``, options ``model.name x``: argparse's ``+``
    takes every word after ``-s``/``-t``; the first one naming a config key starts the options."""
    for attr in ('sources', 'targets', 'transforms'):
        values = getattr(args, attr)
        if not values:
            continue
        for i, token in enumerate(values):
            if _is_config_key(cfg, token):
                setattr(args, attr, values[:i])
                args.opts = values[i:] + list(args.opts or [])
                break


def build_config(args):
    from .config import ConfigError, get_default_config
    cfg = get_default_config()
    _split_dataset_lists(args, cfg)
    cfg.use_gpu = torch.cuda.is_available()
    try:
        if args.config_file:
            cfg.merge_from_file(args.config_file)
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    except (KeyError, ValueError, AssertionError) as exc:
        raise UserError(f'in config file "{args.config_file}": {exc}') from exc
    if args.root:
        cfg.data.root = args.root
    for attr in ('sources', 'targets', 'transforms'):
        if getattr(args, attr):
            cfg.data[attr] = getattr(args, attr)
    if args.opts:
        if len(args.opts) % 2:
            raise UserError(f'options must be "key value" pairs, got an odd list: {args.opts}')
        try:
            cfg.merge_from_list(args.opts)
        except ConfigError as exc:
            raise UserError(str(exc)) from exc
        except (KeyError, ValueError, AssertionError) as exc:
            raise UserError(f'in command-line options: {exc}') from exc
    if cfg.loss.name == 'triplet' and cfg.loss.triplet.weight_x == 0 and cfg.train.fixbase_epoch:
        raise UserError('train.fixbase_epoch needs loss.triplet.weight_x > 0: the classifier is '
                        'not in the graph otherwise')
    cfg.freeze()
    return cfg


def print_registries(out=sys.stdout) -> None:
    from .config import packaged_configs
    from .registry import list_datasets, list_engines, list_models, list_samplers
    for title, names in (('datasets', list_datasets()), ('models', list_models()),
                         ('samplers', list_samplers()), ('engines', list_engines()),
                         ('packaged configs (--config-file NAME)', packaged_configs())):
        print(f'{title} ({len(names)}):', file=out)
        for n in names:
            print(f'  {n}', file=out)


def build_model(cfg, num_classes: int):
    """The registered model ``model.name`` with its method's options from the config."""
    from .pretrained import explain_offline_downloads
    from .registry import MODEL_OPTIONS, MODELS
    factory = MODELS.get(cfg.model.name)
    options = MODEL_OPTIONS[cfg.model.name](cfg) if cfg.model.name in MODEL_OPTIONS else {}
    with explain_offline_downloads(cfg.model.name):
        return factory(num_classes=num_classes, loss=cfg.loss.name,
                       pretrained=cfg.model.pretrained, use_gpu=cfg.use_gpu, **options)


def build_engine(cfg, datamanager, model, optimizer, scheduler):
    from .registry import ENGINES
    name = cfg.engine.name or cfg.loss.name
    return ENGINES.get(name)(cfg, datamanager, model, optimizer, scheduler)


def run(cfg) -> object:
    """Build everything from a frozen config and run it; returns the engine."""
    from ._torchreid import tr
    from .checkpoint import load_model_weights
    from .data.datamanager import CrossModalImageDataManager
    from .optim import optimizer_from_config, scheduler_from_config
    from .results import ResultsFile, environment_info

    tr.utils.set_random_seed(cfg.train.seed)
    if cfg.vi.train.deterministic:
        torch.use_deterministic_algorithms(True)
    if cfg.use_gpu:
        torch.backends.cudnn.benchmark = not cfg.vi.train.deterministic
    print(f'Show configuration\n{cfg}\n')
    env = environment_info('cuda' if cfg.use_gpu else 'cpu')
    print('Environment: ' + ', '.join(f'{k}={v}' for k, v in env.items()))

    datamanager = CrossModalImageDataManager.from_config(cfg)
    print(f'Building model: {cfg.model.name}')
    model = build_model(cfg, datamanager.num_train_pids)
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f'Model parameters: {n_all:,} ({n_train:,} trainable)')
    if cfg.model.load_weights:
        load_model_weights(model, cfg.model.load_weights)
    if cfg.use_gpu:
        model = model.cuda()
    optimizer = optimizer_from_config(cfg, model)
    scheduler = scheduler_from_config(cfg, optimizer)
    engine = build_engine(cfg, datamanager, model, optimizer, scheduler)
    start_epoch = cfg.train.start_epoch
    if cfg.model.resume:
        start_epoch = engine.resume(cfg.model.resume)
    if cfg.test.evaluate and not (cfg.model.load_weights or cfg.model.resume):
        print('Warning: evaluating without model.load_weights or model.resume: the weights '
              'are ' + ('ImageNet-pretrained' if cfg.model.pretrained else 'random') + '.')
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
    from .config import ConfigError
    from .data.base import DatasetLayoutError
    from .pretrained import PretrainedWeightsUnavailable

    args = build_parser().parse_args(argv)
    try:
        registration.register_all()
        load_plugins(args.plugin)
        if args.list:
            print_registries()
            return 0
        load_plugins(_config_plugins(args))
        cfg = build_config(args)
    except (UserError, ConfigError, KeyError, ImportError) as exc:
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
