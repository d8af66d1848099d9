"""The yacs configuration: torchreid's ``scripts/default_config.py`` plus the plugin's nodes.

PyPI torchreid ships no ``scripts/``, so torchreid's default config is restated here with the same
keys and defaults (torchreid 1.4.0, minus the video keys nothing reads), then extended with:

* ``engine.name``: an engine from the engine registry (empty: torchreid's rule, ``loss.name``);
* ``vi``: the plugin's sampler, evaluation, training and distributed options;
* ``vi.<dataset>``: one node per registered cross-modal dataset, **generated** from the dataset
  class's ``default_options`` (so a dataset added by a plugin gets its node too);
* one node per registered method (``xiv``, ``idkl``...), added by the method's ``add_config``.

Every option's default lives here (or in its method's ``add_config``) and nowhere else; classes
receive the values as explicit arguments through their ``from_config(cfg)``.

yacs rejects unknown keys, which is what catches typos in yaml files and ``key value`` options.
Config files may inherit: a top-level ``_BASE_: other.yaml`` (a path relative to the file, or a
packaged config name) is loaded first and the file's own keys override it (detectron2's rule).
Packaged configs are named by their path below ``configs/`` without ``.yaml``
(``xiv/sysu_mm01``); :func:`resolve_config_file` finds them in a checkout and in an installed
wheel alike.

Example::

    >>> from torchreid_vi.config import get_default_config
    >>> cfg = get_default_config()
    >>> cfg.merge_from_list(['vi.regdb.trial', '3'])
    >>> cfg.vi.regdb.trial
    3
    >>> cfg.merge_from_file('xiv/ablation/baseline')          # a packaged config, by name
    >>> cfg.xiv.use_x, cfg.model.name
    (False, 'xiv_resnet50')
"""
from __future__ import annotations

import copy
import os
import os.path as osp
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from yacs.config import CfgNode

from .modeling.backbones import IMAGENET_MEAN, IMAGENET_STD
from .registry import DATASETS, ENGINE_CONFIGS

__all__ = ['Config', 'ConfigError', 'get_default_config', 'resolve_config_file',
           'load_yaml_with_base', 'packaged_configs', 'dataset_options', 'BASE_KEY', 'MOVED_KEYS']

BASE_KEY = '_BASE_'
_YAML_SUFFIX = '.yaml'
# Keys of earlier versions (and of torchreid's default config) that moved: the error says where.
MOVED_KEYS = {
    'idkl.amp': 'train.amp (none | fp16 | bf16), the mixed precision of every engine',
    'test.rerank': 'vi.eval.rerank (none | k_reciprocal | query_only)',
    'video.seq_len': 'nothing: torchreid_vi trains on image datasets only',
    'video.sample_method': 'nothing: torchreid_vi trains on image datasets only',
    'video.pooling_method': 'nothing: torchreid_vi trains on image datasets only',
}


class ConfigError(ValueError):
    """A config file or option is missing, unreadable or not what was expected."""


class Config(CfgNode):
    """yacs ``CfgNode`` whose ``merge_from_file`` understands ``_BASE_`` and packaged names, and
    whose merges name the new home of a key that moved (:data:`MOVED_KEYS`)."""

    def merge_from_file(self, cfg_filename: str) -> None:
        path = resolve_config_file(cfg_filename)
        data = load_yaml_with_base(path)
        _check_moved(_flat_keys(data), f'config file "{path}"')
        self.merge_from_other_cfg(type(self)(data))

    def merge_from_list(self, cfg_list: list) -> None:
        _check_moved(list(cfg_list)[0::2], 'command-line options')
        super().merge_from_list(cfg_list)


def _flat_keys(data: dict, prefix: str = '') -> List[str]:
    keys = []
    for key, value in data.items():
        keys.append(prefix + str(key))
        if isinstance(value, dict):
            keys += _flat_keys(value, f'{prefix}{key}.')
    return keys


def _check_moved(keys, where: str) -> None:
    for key in keys:
        if key in MOVED_KEYS:
            raise ConfigError(f'{where}: {key} is no longer an option; use {MOVED_KEYS[key]}')


# ------------------------------------------------------------------------------------------------
# config files

def packaged_config_dir() -> Path:
    """The folder holding the packaged configs: ``torchreid_vi/configs`` inside an installed
    wheel, the repository's ``configs/`` in a source checkout (editable install)."""
    inside = Path(str(resources.files('torchreid_vi'))) / 'configs'
    if inside.is_dir():
        return inside
    return Path(__file__).resolve().parent.parent / 'configs'


def packaged_configs() -> List[str]:
    """Names of the packaged configs (``'xiv/sysu_mm01'``, ...), sorted."""
    root = packaged_config_dir()
    return sorted(p.relative_to(root).with_suffix('').as_posix()
                  for p in root.rglob('*' + _YAML_SUFFIX))


def resolve_config_file(name: str, relative_to: Optional[str] = None) -> str:
    """The yaml file meant by ``name``.

    Looked up, in order: ``name`` as a path; relative to the folder of ``relative_to`` (a
    ``_BASE_`` reference); a packaged config (``'xiv/sysu_mm01'``, ``'configs/xiv/sysu_mm01.yaml'``
    and ``'xiv/sysu_mm01.yaml'`` all work).

    Raises:
        ConfigError: nothing found; the message lists where it looked and the packaged names.
    """
    name = os.fspath(name)
    looked = [name]
    if osp.isfile(name):
        return name
    if relative_to is not None:
        nearby = osp.join(osp.dirname(osp.abspath(relative_to)), name)
        looked.append(nearby)
        if osp.isfile(nearby):
            return nearby
    short = name[:-len(_YAML_SUFFIX)] if name.endswith(_YAML_SUFFIX) else name
    if short.startswith('configs/'):
        short = short[len('configs/'):]
    packaged = packaged_config_dir() / (short + _YAML_SUFFIX)
    looked.append(str(packaged))
    if packaged.is_file():
        return str(packaged)
    available = ', '.join(packaged_configs()) or 'none'
    raise ConfigError(f'config file "{name}" does not exist (looked at: {"; ".join(looked)}); '
                      f'packaged configs: {available}')


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding='utf-8') as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f'config file "{path}" is not valid YAML: {exc}') from None
    except OSError as exc:
        raise ConfigError(f'cannot read config file "{path}": {exc}') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f'config file "{path}": the top level must be a mapping of config '
                          f'keys (e.g. "model: {{name: xiv_resnet50}}"), got a '
                          f'{type(data).__name__}')
    return data


def _merge_dicts(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_dicts(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml_with_base(path: str, _chain: tuple = ()) -> dict:
    """The mapping of a yaml file with its ``_BASE_`` files merged underneath (recursively).

    ``_BASE_`` is a string or a list of strings (merged in order, the file's own keys last);
    nested mappings merge key by key, anything else (lists included) is replaced.

    Raises:
        ConfigError: unreadable/invalid YAML, a non-mapping top level, a missing base or a cycle.
    """
    path = osp.abspath(path)
    if path in _chain:
        cycle = ' -> '.join(list(_chain) + [path])
        raise ConfigError(f'config files inherit from each other in a cycle: {cycle}')
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f'config file "{path}": {BASE_KEY} must be a file name or a list of '
                          f'them, got {bases!r}')
    merged: dict = {}
    for base in bases:
        merged = _merge_dicts(merged, load_yaml_with_base(
            resolve_config_file(base, relative_to=path), _chain + (path,)))
    return _merge_dicts(merged, data)


# ------------------------------------------------------------------------------------------------
# defaults

def _torchreid_defaults() -> Config:
    cfg = Config()
    cfg.model = Config()
    cfg.model.name = 'resnet50'
    cfg.model.pretrained = True  # ImageNet weights; offline runs need False or a cached file
    cfg.model.load_weights = ''  # path to model weights
    cfg.model.resume = ''  # path to a checkpoint to resume training from

    cfg.data = Config()
    cfg.data.type = 'image'
    cfg.data.root = 'reid-data'
    cfg.data.sources = ['market1501']
    cfg.data.targets = ['market1501']
    cfg.data.workers = 4
    cfg.data.split_id = 0
    cfg.data.height = 256
    cfg.data.width = 128
    cfg.data.combineall = False
    cfg.data.transforms = ['random_flip']
    cfg.data.k_tfm = 1
    cfg.data.norm_mean = list(IMAGENET_MEAN)
    cfg.data.norm_std = list(IMAGENET_STD)
    cfg.data.save_dir = 'log'
    cfg.data.load_train_targets = False
    cfg.data.pin_memory = True  # pinned host memory for the loaders (used only with CUDA)
    cfg.data.persistent_workers = False  # keep loader workers alive across epochs (workers > 0)
    cfg.data.prefetch_factor = 2  # batches each worker loads ahead (workers > 0)

    cfg.market1501 = Config()
    cfg.market1501.use_500k_distractors = False
    cfg.cuhk03 = Config()
    cfg.cuhk03.labeled_images = False
    cfg.cuhk03.classic_split = False
    cfg.cuhk03.use_metric_cuhk03 = False

    cfg.sampler = Config()
    cfg.sampler.train_sampler = 'RandomSampler'
    cfg.sampler.train_sampler_t = 'RandomSampler'
    cfg.sampler.num_instances = 4  # ModalityBalancedSampler: K images per identity PER MODALITY
    cfg.sampler.num_cams = 1
    cfg.sampler.num_datasets = 1

    cfg.train = Config()
    cfg.train.optim = 'adam'
    cfg.train.lr = 0.0003
    cfg.train.weight_decay = 5e-4
    cfg.train.max_epoch = 60
    cfg.train.start_epoch = 0
    cfg.train.batch_size = 32
    cfg.train.fixbase_epoch = 0
    cfg.train.open_layers = ['classifier']
    cfg.train.staged_lr = False
    cfg.train.new_layers = ['classifier']
    cfg.train.base_lr_mult = 0.1
    cfg.train.lr_scheduler = 'single_step'  # + 'multi_step', 'cosine', 'warmup_multi_step', 'none'
    cfg.train.stepsize = [20]
    cfg.train.gamma = 0.1
    cfg.train.print_freq = 20
    cfg.train.seed = 1

    cfg.sgd = Config()
    cfg.sgd.momentum = 0.9
    cfg.sgd.dampening = 0.
    cfg.sgd.nesterov = False
    cfg.rmsprop = Config()
    cfg.rmsprop.alpha = 0.99
    cfg.adam = Config()
    cfg.adam.beta1 = 0.9
    cfg.adam.beta2 = 0.999

    cfg.loss = Config()
    cfg.loss.name = 'softmax'
    cfg.loss.softmax = Config()
    cfg.loss.softmax.label_smooth = True
    cfg.loss.triplet = Config()
    cfg.loss.triplet.margin = 0.3
    cfg.loss.triplet.weight_t = 1.
    cfg.loss.triplet.weight_x = 0.

    cfg.test = Config()
    cfg.test.batch_size = 100
    cfg.test.dist_metric = 'euclidean'  # 'euclidean' | 'cosine'
    cfg.test.normalize_feature = False
    cfg.test.ranks = [1, 5, 10, 20]
    cfg.test.evaluate = False  # evaluation only (from model.load_weights or model.resume)
    cfg.test.eval_freq = -1  # -1: evaluate only after training
    cfg.test.start_eval = 0
    cfg.test.visrank = False  # ranked-result images (final evaluation, or evaluation-only runs)
    cfg.test.visrank_topk = 10
    return cfg


def _plugin_defaults(cfg: Config) -> None:
    cfg.engine = Config()
    cfg.engine.name = ''  # registry name ('xiv', 'idkl', 'softmax', 'triplet'); '' → loss.name

    cfg.vi = Config()
    cfg.vi.plugins = []  # python files or modules imported before the config is built

    cfg.vi.sampler = Config()
    cfg.vi.sampler.seed = -1  # ModalityBalancedSampler seed; -1 → train.seed
    cfg.vi.sampler.epoch_mode = 'agw'  # 'agw' | 'cover' | 'idkl' (the released IDKL sampler's)
    cfg.vi.sampler.replace = 'auto'  # 'auto' | 'always'

    cfg.vi.eval = Config()
    cfg.vi.eval.max_rank = 20
    cfg.vi.eval.flip = False  # average the features of the image and its horizontal flip
    cfg.vi.eval.rerank = 'none'  # 'none' | 'k_reciprocal' | 'query_only' (IDKL's variant)
    cfg.vi.eval.rerank_k1 = 20
    cfg.vi.eval.rerank_k2 = 6
    cfg.vi.eval.rerank_lambda = 0.3
    cfg.vi.eval.visrank_max_queries = 50  # ranked-result rows written per setting (0: all)
    cfg.vi.eval.check_images = True  # pre-flight: decode every test image once before training

    cfg.vi.train = Config()
    cfg.vi.train.warmup_epochs = 10  # for train.lr_scheduler warmup_multi_step
    cfg.vi.train.warmup_factor = 0.1
    cfg.vi.train.checkpoint_freq = 1  # save a checkpoint every N epochs (and before evaluations)
    cfg.vi.train.keep_last = 0  # keep the newest N periodic checkpoints (0: all; final kept)
    cfg.vi.train.check_disk_space = True  # pre-flight: the save_dir's disk holds the checkpoints
    cfg.vi.train.save_retry_minutes = 10  # a failed checkpoint/results write is retried this long
    cfg.vi.train.share_save_dir = False  # allow several runs in one data.save_dir on purpose
    cfg.vi.train.deterministic = False  # torch.use_deterministic_algorithms (slower)

    # torchrun (DistributedDataParallel): train.batch_size stays the global batch.
    cfg.vi.dist = Config()
    cfg.vi.dist.global_loss = True  # losses on the batch gathered from all ranks (exact method)
    cfg.vi.dist.sync_bn = True  # BatchNorm statistics over the global batch (SyncBatchNorm)
    cfg.vi.dist.timeout_minutes = 120  # how long ranks wait for each other (rank 0 evaluates)

    # Mixed precision of the network's forward passes in every engine: 'none' | 'fp16'
    # (autocast + dynamic GradScaler, CUDA only) | 'bf16' (autocast; CPU autocast on a CPU).
    cfg.train.amp = 'none'
    cfg.train.channels_last = False  # channels-last memory format (faster convolutions on GPUs)
    cfg.train.compile = False  # torch.compile the model (first steps slower; off by default)


def _dataset_nodes(cfg: Config) -> None:
    """``vi.<name>`` for every registered cross-modal dataset, from its ``default_options``."""
    from .data.base import CrossModalDataset
    for name in DATASETS.names():
        cls = DATASETS.get(name)
        if not (isinstance(cls, type) and issubclass(cls, CrossModalDataset)):
            continue
        if name in cfg.vi:
            raise ConfigError(f'dataset "{name}" cannot have a config node: vi.{name} is '
                              f'already an option group of the plugin')
        node = Config()
        for key, value in cls.default_options.items():
            node[key] = list(value) if isinstance(value, tuple) else value
        cfg.vi[name] = node


def get_default_config() -> Config:
    """torchreid's defaults + ``engine`` + ``vi`` + a node per registered dataset and method."""
    cfg = _torchreid_defaults()
    _plugin_defaults(cfg)
    _dataset_nodes(cfg)
    for name in sorted(ENGINE_CONFIGS):
        ENGINE_CONFIGS[name](cfg)
    return cfg


def dataset_options(cfg: CfgNode) -> Dict[str, Dict[str, Any]]:
    """Constructor options of every cross-modal dataset that has a node: ``{'regdb': {...}}``."""
    from .data.base import CrossModalDataset
    out = {}
    for name in DATASETS.names():
        cls = DATASETS.get(name)
        if isinstance(cls, type) and issubclass(cls, CrossModalDataset) and name in cfg.vi:
            out[name] = {k: (list(v) if isinstance(v, (list, tuple)) else v)
                         for k, v in cfg.vi[name].items()}
    return out
