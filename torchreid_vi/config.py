"""The yacs configuration: torchreid's ``scripts/default_config.py`` plus the plugin's nodes.

PyPI torchreid ships no ``scripts/``, so torchreid's default config is restated here with the same
keys and defaults (torchreid 1.4.0), then extended with:

* ``engine.name``: an engine from the engine registry (empty: torchreid's rule, ``loss.name``);
* ``vi``: the plugin's data, sampler, evaluation and training options;
* one node per registered engine that declares one (``xiv``, ``idkl``...).

yacs rejects unknown keys, which is what catches typos in yaml files and ``key value`` options.

Example::

    >>> from torchreid_vi.config import get_default_config
    >>> cfg = get_default_config()
    >>> cfg.merge_from_list(['vi.regdb.trial', '3'])
    >>> cfg.vi.regdb.trial
    3
"""
from __future__ import annotations

from yacs.config import CfgNode as CN

from .registry import ENGINE_CONFIGS

__all__ = ['get_default_config', 'imagedata_kwargs', 'optimizer_kwargs', 'lr_scheduler_kwargs',
           'dataset_options', 'sampler_options']


def _torchreid_defaults() -> CN:
    cfg = CN()
    cfg.model = CN()
    cfg.model.name = 'resnet50'
    cfg.model.pretrained = True  # ImageNet weights; offline runs need False or a cached file
    cfg.model.load_weights = ''  # path to model weights
    cfg.model.resume = ''  # path to a checkpoint to resume training from

    cfg.data = CN()
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
    cfg.data.norm_mean = [0.485, 0.456, 0.406]
    cfg.data.norm_std = [0.229, 0.224, 0.225]
    cfg.data.save_dir = 'log'
    cfg.data.load_train_targets = False

    cfg.market1501 = CN()
    cfg.market1501.use_500k_distractors = False
    cfg.cuhk03 = CN()
    cfg.cuhk03.labeled_images = False
    cfg.cuhk03.classic_split = False
    cfg.cuhk03.use_metric_cuhk03 = False

    cfg.sampler = CN()
    cfg.sampler.train_sampler = 'RandomSampler'
    cfg.sampler.train_sampler_t = 'RandomSampler'
    cfg.sampler.num_instances = 4  # ModalityBalancedSampler: K images per identity PER MODALITY
    cfg.sampler.num_cams = 1
    cfg.sampler.num_datasets = 1

    cfg.video = CN()
    cfg.video.seq_len = 15
    cfg.video.sample_method = 'evenly'
    cfg.video.pooling_method = 'avg'

    cfg.train = CN()
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

    cfg.sgd = CN()
    cfg.sgd.momentum = 0.9
    cfg.sgd.dampening = 0.
    cfg.sgd.nesterov = False
    cfg.rmsprop = CN()
    cfg.rmsprop.alpha = 0.99
    cfg.adam = CN()
    cfg.adam.beta1 = 0.9
    cfg.adam.beta2 = 0.999

    cfg.loss = CN()
    cfg.loss.name = 'softmax'
    cfg.loss.softmax = CN()
    cfg.loss.softmax.label_smooth = True
    cfg.loss.triplet = CN()
    cfg.loss.triplet.margin = 0.3
    cfg.loss.triplet.weight_t = 1.
    cfg.loss.triplet.weight_x = 0.

    cfg.test = CN()
    cfg.test.batch_size = 100
    cfg.test.dist_metric = 'euclidean'  # 'euclidean' | 'cosine'
    cfg.test.normalize_feature = False
    cfg.test.ranks = [1, 5, 10, 20]
    cfg.test.evaluate = False  # evaluation only (from model.load_weights or model.resume)
    cfg.test.eval_freq = -1  # -1: evaluate only after training
    cfg.test.start_eval = 0
    cfg.test.rerank = False  # torchreid's switch; the plugin's vi.eval.rerank names the variant
    cfg.test.visrank = False  # ranked-result images (final evaluation, or evaluation-only runs)
    cfg.test.visrank_topk = 10
    return cfg


def _plugin_defaults(cfg: CN) -> None:
    cfg.engine = CN()
    cfg.engine.name = ''  # registry name ('xiv', 'idkl', 'softmax', 'triplet'); '' → loss.name

    cfg.vi = CN()
    cfg.vi.plugins = []  # python files or modules imported first (they may register things)

    # Dataset options (passed to the registered dataset of the same name).
    cfg.vi.sysu_mm01 = CN()
    cfg.vi.sysu_mm01.search_modes = ['all', 'indoor']
    cfg.vi.sysu_mm01.shots = [1, 10]
    cfg.vi.sysu_mm01.gallery_sampler = 'auto'  # 'auto' | 'official_perm' | 'agw_seed'
    cfg.vi.sysu_mm01.perm_file = ''  # rand_perm_cam.mat; '' → <root>/exp/rand_perm_cam.mat
    cfg.vi.sysu_mm01.num_trials = 10
    cfg.vi.sysu_mm01.semantics = 'vireid'  # 'vireid' | 'idkl'
    cfg.vi.regdb = CN()
    cfg.vi.regdb.trial = 1  # 1..10: each trial is its own train/test split (and model)
    cfg.vi.regdb.directions = ['t2v', 'v2t']
    cfg.vi.regdb.semantics = 'vireid'
    cfg.vi.llcm = CN()
    cfg.vi.llcm.directions = ['ir2vis', 'vis2ir']
    cfg.vi.llcm.num_trials = 10
    cfg.vi.llcm.legacy_deen_vis2ir = False  # the reference code's double-swapped "VIS->IR"
    cfg.vi.llcm.semantics = 'vireid'

    cfg.vi.sampler = CN()
    cfg.vi.sampler.seed = -1  # ModalityBalancedSampler seed; -1 → train.seed
    cfg.vi.sampler.epoch_mode = 'agw'  # 'agw' | 'cover'
    cfg.vi.sampler.replace = 'auto'  # 'auto' | 'always'

    cfg.vi.eval = CN()
    cfg.vi.eval.max_rank = 20
    cfg.vi.eval.flip = False  # average the features of the image and its horizontal flip
    cfg.vi.eval.rerank = 'none'  # 'none' | 'k_reciprocal' | 'query_only' (IDKL's variant)
    cfg.vi.eval.rerank_k1 = 20
    cfg.vi.eval.rerank_k2 = 6
    cfg.vi.eval.rerank_lambda = 0.3
    cfg.vi.eval.visrank_max_queries = 50  # ranked-result rows written per setting (0: all)

    cfg.vi.train = CN()
    cfg.vi.train.warmup_epochs = 10  # for train.lr_scheduler warmup_multi_step
    cfg.vi.train.warmup_factor = 0.1
    cfg.vi.train.checkpoint_freq = 1  # save a checkpoint every N epochs (and after evaluations)
    cfg.vi.train.deterministic = False  # torch.use_deterministic_algorithms (slower)


def get_default_config() -> CN:
    """torchreid's defaults + ``engine`` + ``vi`` + every registered engine's node."""
    cfg = _torchreid_defaults()
    _plugin_defaults(cfg)
    for name in sorted(ENGINE_CONFIGS):
        ENGINE_CONFIGS[name](cfg)
    return cfg


def imagedata_kwargs(cfg: CN, use_gpu: bool) -> dict:
    """Arguments of torchreid's ``ImageDataManager`` from the config."""
    return {
        'root': cfg.data.root, 'sources': cfg.data.sources, 'targets': cfg.data.targets,
        'height': cfg.data.height, 'width': cfg.data.width, 'transforms': cfg.data.transforms,
        'k_tfm': cfg.data.k_tfm, 'norm_mean': cfg.data.norm_mean, 'norm_std': cfg.data.norm_std,
        'use_gpu': use_gpu, 'split_id': cfg.data.split_id, 'combineall': cfg.data.combineall,
        'load_train_targets': cfg.data.load_train_targets,
        'batch_size_train': cfg.train.batch_size, 'batch_size_test': cfg.test.batch_size,
        'workers': cfg.data.workers, 'num_instances': cfg.sampler.num_instances,
        'num_cams': cfg.sampler.num_cams, 'num_datasets': cfg.sampler.num_datasets,
        'train_sampler': cfg.sampler.train_sampler, 'train_sampler_t': cfg.sampler.train_sampler_t,
        'cuhk03_labeled': cfg.cuhk03.labeled_images,
        'cuhk03_classic_split': cfg.cuhk03.classic_split,
        'market1501_500k': cfg.market1501.use_500k_distractors,
    }


def dataset_options(cfg: CN) -> dict:
    """Per-dataset constructor options: ``{'sysu_mm01': {...}, 'regdb': {...}, 'llcm': {...}}``."""
    return {name: {k: (list(v) if isinstance(v, (list, tuple)) else v)
                   for k, v in cfg.vi[name].items()}
            for name in ('sysu_mm01', 'regdb', 'llcm')}


def sampler_options(cfg: CN) -> dict:
    seed = cfg.vi.sampler.seed if cfg.vi.sampler.seed >= 0 else cfg.train.seed
    return {'seed': seed, 'epoch_mode': cfg.vi.sampler.epoch_mode,
            'replace': cfg.vi.sampler.replace}


def optimizer_kwargs(cfg: CN) -> dict:
    return {
        'optim': cfg.train.optim, 'lr': cfg.train.lr, 'weight_decay': cfg.train.weight_decay,
        'momentum': cfg.sgd.momentum, 'sgd_dampening': cfg.sgd.dampening,
        'sgd_nesterov': cfg.sgd.nesterov, 'rmsprop_alpha': cfg.rmsprop.alpha,
        'adam_beta1': cfg.adam.beta1, 'adam_beta2': cfg.adam.beta2,
        'staged_lr': cfg.train.staged_lr, 'new_layers': cfg.train.new_layers,
        'base_lr_mult': cfg.train.base_lr_mult,
    }


def lr_scheduler_kwargs(cfg: CN) -> dict:
    return {
        'lr_scheduler': cfg.train.lr_scheduler, 'stepsize': cfg.train.stepsize,
        'gamma': cfg.train.gamma, 'max_epoch': cfg.train.max_epoch,
        'warmup_epochs': cfg.vi.train.warmup_epochs, 'warmup_factor': cfg.vi.train.warmup_factor,
    }
