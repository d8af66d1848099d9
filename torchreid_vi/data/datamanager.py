"""The datamanager of the command line, and the one hook into torchreid's own datamanager.

:class:`CrossModalImageDataManager` is torchreid's ``ImageDataManager`` flow (same arguments,
attributes, loaders and printed summary) built by the plugin itself, so that

* plugin datasets get their options (e.g. RegDB ``trial``) as constructor arguments: torchreid's
  ``init_image_dataset`` has a fixed keyword set, so the plugin constructs registered
  cross-modal datasets directly and leaves every other dataset to torchreid;
* plugin samplers get theirs (``seed``, ``epoch_mode``, ``replace`` for the
  ``ModalityBalancedSampler``);
* ``test_datasets`` exposes the query dataset objects, whose protocol the evaluator reads;
* the train loader is the plugin's (:mod:`torchreid_vi.data.loader`): whole-batch epochs with
  per-sample augmentation seeds (results do not depend on the number of workers), resumable
  mid-epoch, and under ``torchrun`` each rank loads its slice of every global batch;
* loaders take ``pin_memory``, ``persistent_workers`` and ``prefetch_factor``, and their own
  random generators (iterating a loader never moves the global RNG streams).

torchreid hard-codes its sampler and transform names in ``build_train_sampler`` and
``build_transforms``; :func:`install` replaces those two functions on torchreid's
``data.datamanager`` module with the plugin's registry-backed ones, so that a registered sampler
(:func:`torchreid_vi.registry.register_sampler`) or transform
(:func:`torchreid_vi.data.transforms.register_transform`) also works in a plain
``tr.data.ImageDataManager`` (with the sampler's default options), and an unknown transform name
is an error there too. Those are the only torchreid functions the plugin replaces.

Example::

    from torchreid_vi.data.datamanager import CrossModalImageDataManager
    dm = CrossModalImageDataManager(
        root='reid-data', sources='regdb', height=288, width=144,
        batch_size_train=64, num_instances=4, train_sampler='ModalityBalancedSampler',
        dataset_options={'regdb': {'trial': 2}}, sampler_options={'seed': 0})
    regdb_test_set = dm.test_datasets['regdb']
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .._torchreid import tr
from ..registry import DATASETS, SAMPLERS, register_sampler
from ..utils import distributed as dist_utils
from .base import CrossModalDataset
from .loader import EpochBatchSampler, SeededDataset
from .transforms import build_transforms

__all__ = ['install', 'build_train_sampler', 'CrossModalImageDataManager', 'TORCHREID_SAMPLERS']

_DM = tr.module('data.datamanager')
_TR_SAMPLER = tr.module('data.sampler')
_TR_DATASETS = tr.module('data.datasets')
TORCHREID_SAMPLERS: Tuple[str, ...] = tuple(_TR_SAMPLER.AVAI_SAMPLERS)
_TORCHREID_BUILD_SAMPLER = _TR_SAMPLER.build_train_sampler


def _torchreid_sampler(name: str):
    """A registry entry for torchreid's sampler ``name`` that defers to torchreid's builder."""
    def build(data_source, batch_size=32, num_instances=4, num_cams=1, num_datasets=1, **kwargs):
        return _TORCHREID_BUILD_SAMPLER(
            data_source, name, batch_size=batch_size, num_instances=num_instances,
            num_cams=num_cams, num_datasets=num_datasets, **kwargs)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"torchreid's {name} (built by torchreid's build_train_sampler)."
    build.torchreid_builtin = True
    return build


TORCHREID_SAMPLER_WRAPPERS = {name: _torchreid_sampler(name) for name in TORCHREID_SAMPLERS}


def _accepted_kwargs(factory, offered: Dict[str, Any]) -> Dict[str, Any]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return offered
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return offered
    return {k: v for k, v in offered.items() if k in params}


def build_train_sampler(data_source, train_sampler, batch_size=32, num_instances=4, num_cams=1,
                        num_datasets=1, sampler_options: Optional[Mapping[str, Any]] = None,
                        **kwargs):
    """torchreid's ``build_train_sampler`` extended with the plugin sampler registry.

    A registered plugin sampler is called as ``cls(data_source, batch_size, num_instances,
    **options)`` with those of ``sampler_options`` (and ``num_cams``/``num_datasets``) it accepts.

    Raises:
        ValueError: unknown sampler name (the message lists the available ones).
    """
    if train_sampler not in SAMPLERS:
        if train_sampler in TORCHREID_SAMPLERS:
            return _TORCHREID_BUILD_SAMPLER(
                data_source, train_sampler, batch_size=batch_size, num_instances=num_instances,
                num_cams=num_cams, num_datasets=num_datasets, **kwargs)
        names = sorted(set(SAMPLERS.names()) | set(TORCHREID_SAMPLERS))
        raise ValueError(f'unknown train sampler "{train_sampler}" (sampler.train_sampler); '
                         f'available: {", ".join(names)}')
    factory = SAMPLERS.get(train_sampler)
    if getattr(factory, 'torchreid_builtin', False):
        return factory(data_source, batch_size=batch_size, num_instances=num_instances,
                       num_cams=num_cams, num_datasets=num_datasets, **kwargs)
    offered = {'num_cams': num_cams, 'num_datasets': num_datasets, **kwargs,
               **dict(sampler_options or {})}
    return factory(data_source, batch_size, num_instances, **_accepted_kwargs(factory, offered))


def install() -> None:
    """Put the plugin's ``build_train_sampler`` and ``build_transforms`` on torchreid's
    datamanager module and list torchreid's samplers in the plugin registry. Idempotent."""
    _DM.build_train_sampler = build_train_sampler
    _DM.build_transforms = build_transforms
    for name, wrapper in TORCHREID_SAMPLER_WRAPPERS.items():
        register_sampler(name, wrapper)


# ------------------------------------------------------------------------------- datamanager
def _dataset_class(name: str):
    return DATASETS.get(name) if name in DATASETS else None


def _is_cross_modal(name: str) -> bool:
    cls = _dataset_class(name)
    return isinstance(cls, type) and issubclass(cls, CrossModalDataset)


def _requires_modality(sampler_name: str) -> bool:
    if sampler_name not in SAMPLERS:
        return False
    return bool(getattr(SAMPLERS.get(sampler_name), 'requires_modality', False))


class CrossModalImageDataManager(_DM.DataManager):
    """torchreid's ``ImageDataManager`` with plugin dataset and sampler options.

    Takes every argument of torchreid's ``ImageDataManager`` (``root``, ``sources``, ``targets``,
    ``height``, ``width``, ``transforms``, ``batch_size_train``, ``batch_size_test``,
    ``num_instances``, ``train_sampler``, ``workers``, ...) plus:

    Args:
        dataset_options: dataset name -> constructor options of that cross-modal dataset, e.g.
            ``{'regdb': {'trial': 2}}``; unknown datasets or option names raise ``TypeError``.
        sampler_options: options offered to a plugin sampler (``seed``, ``epoch_mode``,
            ``replace`` for ``ModalityBalancedSampler``; those it does not accept are dropped).
        seed: seed of the per-sample augmentation and of the loaders' generators.
        pin_memory: pinned host memory (only used with CUDA).
        persistent_workers, prefetch_factor: DataLoader options (used when ``workers > 0``).
        rank, world_size: this process's slice of every global train batch (default: the
            running ``torchrun`` group, or the whole batch).

    Attributes (besides torchreid's ``train_loader``, ``test_loader``, ``test_dataset``,
    ``num_train_pids``...):
        train_set: the training dataset (a ``CrossModalDataset`` for cross-modal sources).
        train_sampler: the train sampler the loader's batches come from.
        test_datasets: target name -> its **query dataset object**.

    Raises:
        ValueError: sources mix cross-modal and plain datasets, or a modality-aware sampler
            (``requires_modality``) was chosen and a source is not cross-modal (the modality
            would be lost).
    """

    data_type = 'image'

    def __init__(self, root='', sources=None, targets=None, height=256, width=128,
                 transforms='random_flip', k_tfm=1, norm_mean=None, norm_std=None, use_gpu=True,
                 split_id=0, combineall=False, load_train_targets=False, batch_size_train=32,
                 batch_size_test=32, workers=4, num_instances=4, num_cams=1, num_datasets=1,
                 train_sampler='RandomSampler', train_sampler_t='RandomSampler',
                 cuhk03_labeled=False, cuhk03_classic_split=False, market1501_500k=False, *,
                 dataset_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 sampler_options: Optional[Mapping[str, Any]] = None, seed: int = 0,
                 pin_memory: bool = True, persistent_workers: bool = False,
                 prefetch_factor: int = 2, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        install()
        self.seed = int(seed)
        self.rank = dist_utils.rank() if rank is None else int(rank)
        self.world_size = dist_utils.world_size() if world_size is None else int(world_size)
        self.loader_options = {'num_workers': workers}
        if workers > 0:
            self.loader_options.update(persistent_workers=bool(persistent_workers),
                                       prefetch_factor=int(prefetch_factor))
        # torchreid's DataManager.__init__, with the plugin's transform builder
        self.sources = [sources] if isinstance(sources, str) else list(sources or [])
        if not self.sources:
            raise ValueError('data.sources is empty: give at least one source dataset')
        targets = self.sources if not targets else targets
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        self.height, self.width = height, width
        self.transform_tr, self.transform_te = build_transforms(
            height, width, transforms=transforms, norm_mean=norm_mean, norm_std=norm_std)
        self.use_gpu = torch.cuda.is_available() and use_gpu
        self.loader_options['pin_memory'] = bool(pin_memory) and self.use_gpu
        self.dataset_options = {str(k): dict(v) for k, v in (dataset_options or {}).items()}
        self.sampler_options = dict(sampler_options or {})
        for name, opts in self.dataset_options.items():
            self._check_options(name, opts)
        needs_modality = _requires_modality(train_sampler)
        plain = [s for s in self.sources if _dataset_class(s) is not None
                 and not _is_cross_modal(s)]
        if plain and (needs_modality or len(plain) < len(self.sources)):
            # Checked here because torchreid sums the train sets with the LEFT operand's
            # __add__: a plain dataset first would silently drop the modality.
            why = (f'train_sampler={train_sampler} needs the per-image modality' if needs_modality
                   else 'cross-modal and plain datasets cannot be mixed')
            raise ValueError(
                f'{why}, but source(s) {plain} are not cross-modal datasets (CrossModalDataset '
                f'subclasses): the training set would have no per-image modality (the modality '
                f'would be lost)')
        common = dict(root=root, split_id=split_id, cuhk03_labeled=cuhk03_labeled,
                      cuhk03_classic_split=cuhk03_classic_split, market1501_500k=market1501_500k)
        sampler_kwargs = dict(batch_size=batch_size_train, num_instances=num_instances,
                              num_cams=num_cams, num_datasets=num_datasets,
                              sampler_options=self.sampler_options)

        print('=> Loading train (source) dataset')
        trainset = sum(self._dataset(name, transform=self.transform_tr, k_tfm=k_tfm,
                                     mode='train', combineall=combineall, **common)
                       for name in self.sources)
        self._num_train_pids = trainset.num_train_pids
        self._num_train_cams = trainset.num_train_cams
        self.train_set = trainset
        self.train_sampler = build_train_sampler(trainset.train, train_sampler, **sampler_kwargs)
        self.train_loader = self._train_loader(trainset, self.train_sampler, batch_size_train)
        if needs_modality and not isinstance(trainset, CrossModalDataset):
            raise ValueError(
                f'train_sampler={train_sampler} needs the per-image modality, but the training set '
                f'built from {self.sources} is a {type(trainset).__name__} without it')

        self.train_loader_t = None
        if load_train_targets:
            if set(self.sources) & set(self.targets):
                raise ValueError(f'data.load_train_targets: sources={self.sources} and '
                                 f'targets={self.targets} must not overlap')
            print('=> Loading train (target) dataset')
            trainset_t = sum(self._dataset(name, transform=self.transform_tr, k_tfm=k_tfm,
                                           mode='train', combineall=False, **common)
                             for name in self.targets)
            self.train_loader_t = self._train_loader(
                trainset_t, build_train_sampler(trainset_t.train, train_sampler_t,
                                                **sampler_kwargs), batch_size_train)

        print('=> Loading test (target) dataset')
        self.test_loader = {name: {'query': None, 'gallery': None} for name in self.targets}
        self.test_dataset = {name: {'query': None, 'gallery': None} for name in self.targets}
        for name in self.targets:
            for mode in ('query', 'gallery'):
                dataset = self._dataset(name, transform=self.transform_te, mode=mode,
                                        combineall=combineall, verbose=mode == 'query', **common)
                self.test_loader[name][mode] = torch.utils.data.DataLoader(
                    dataset, batch_size=batch_size_test, shuffle=False, drop_last=False,
                    generator=self._generator(), **self.loader_options)
                self.test_dataset[name][mode] = getattr(dataset, mode)
        self.test_datasets = {name: self.test_loader[name]['query'].dataset
                              for name in self.targets}

        print('\n  **************** Summary ****************')
        print(f'  source            : {self.sources}')
        print(f'  # source datasets : {len(self.sources)}')
        print(f'  # source ids      : {self.num_train_pids}')
        print(f'  # source images   : {len(trainset)}')
        print(f'  # source cameras  : {self.num_train_cams}')
        if load_train_targets:
            print(f'  # target images   : {len(trainset_t)} (unlabeled)')
        print(f'  target            : {self.targets}')
        print('  *****************************************\n')

    @classmethod
    def from_config(cls, cfg) -> 'CrossModalImageDataManager':
        """The datamanager of ``cfg`` (``data.*``, ``sampler.*``, ``vi.<dataset>``,
        ``vi.sampler``)."""
        from ..config import dataset_options
        if cfg.data.type != 'image':
            raise ValueError(f'data.type={cfg.data.type!r}: torchreid_vi works on image '
                             f'datasets only')
        sampler_seed = cfg.vi.sampler.seed if cfg.vi.sampler.seed >= 0 else cfg.train.seed
        return cls(
            root=cfg.data.root, sources=list(cfg.data.sources), targets=list(cfg.data.targets),
            height=cfg.data.height, width=cfg.data.width, transforms=list(cfg.data.transforms),
            k_tfm=cfg.data.k_tfm, norm_mean=list(cfg.data.norm_mean),
            norm_std=list(cfg.data.norm_std),
            use_gpu=bool(cfg.get('use_gpu', torch.cuda.is_available())),
            split_id=cfg.data.split_id, combineall=cfg.data.combineall,
            load_train_targets=cfg.data.load_train_targets,
            batch_size_train=cfg.train.batch_size, batch_size_test=cfg.test.batch_size,
            workers=cfg.data.workers, num_instances=cfg.sampler.num_instances,
            num_cams=cfg.sampler.num_cams, num_datasets=cfg.sampler.num_datasets,
            train_sampler=cfg.sampler.train_sampler, train_sampler_t=cfg.sampler.train_sampler_t,
            cuhk03_labeled=cfg.cuhk03.labeled_images,
            cuhk03_classic_split=cfg.cuhk03.classic_split,
            market1501_500k=cfg.market1501.use_500k_distractors,
            dataset_options=dataset_options(cfg),
            sampler_options={'seed': sampler_seed, 'epoch_mode': cfg.vi.sampler.epoch_mode,
                             'replace': cfg.vi.sampler.replace},
            seed=cfg.train.seed, pin_memory=cfg.data.pin_memory,
            persistent_workers=cfg.data.persistent_workers,
            prefetch_factor=cfg.data.prefetch_factor)

    # ---------------------------------------------------------------------------- helpers
    @staticmethod
    def _check_options(name: str, options: Mapping[str, Any]) -> None:
        cls = _dataset_class(name)
        if cls is None:
            return  # not registered (yet): a dataset that is not used needs no options
        if not _is_cross_modal(name):
            raise TypeError(f'dataset options {sorted(options)} were given for "{name}", which '
                            f'is not a cross-modal dataset (CrossModalDataset subclass) and '
                            f'takes none')
        for key in options:
            if key not in cls.default_options:
                allowed = ', '.join(cls.option_names()) or 'none'
                raise TypeError(f'dataset "{name}": unknown dataset option "{key}" '
                                f'(options of {name}: {allowed})')

    def _dataset(self, name: str, **kwargs):
        """Dataset ``name``: registered cross-modal datasets get their options; the others are
        torchreid's (``init_image_dataset`` lists the valid names on a typo)."""
        if _is_cross_modal(name):
            return DATASETS.get(name)(**kwargs, **self.dataset_options.get(name, {}))
        return _TR_DATASETS.init_image_dataset(name, **kwargs)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def _train_loader(self, dataset, sampler, batch_size: int):
        """Global batches of ``batch_size`` from ``sampler``, this rank's slice of each, every
        sample augmented with its own seed (:mod:`torchreid_vi.data.loader`)."""
        batches = EpochBatchSampler(sampler, batch_size, self.seed, self.rank, self.world_size)
        return torch.utils.data.DataLoader(SeededDataset(dataset), batch_sampler=batches,
                                           generator=self._generator(), **self.loader_options)
