"""Plugging cross-modal datasets and samplers into torchreid's ``ImageDataManager``.

torchreid hard-codes its sampler names in ``build_train_sampler`` and calls datasets with a fixed
keyword set through ``init_image_dataset``; both are looked up as globals of its
``data.datamanager`` module. :func:`install` wraps the two there, so that

* any sampler registered with ``torchreid_vi.registry.register_sampler`` works as
  ``train_sampler=<name>`` (torchreid's own names still reach torchreid's builder, and are listed
  in the registry as thin wrappers);
* plugin dataset options (e.g. RegDB ``trial``) reach the datasets while a
  :func:`dataset_options` context is active.

:class:`CrossModalImageDataManager` is torchreid's ``ImageDataManager`` built inside that context,
plus checks and ``test_datasets`` (the query dataset objects, whose ``evaluation_settings()`` the
engine calls). Plain ``tr.data.ImageDataManager(train_sampler='ModalityBalancedSampler', ...)``
works too once :func:`torchreid_vi.data.register_all` has run.

Example::

    from torchreid_vi.data import register_all
    from torchreid_vi.data.datamanager import CrossModalImageDataManager
    register_all()
    dm = CrossModalImageDataManager(
        root='reid-data', sources='regdb', height=288, width=144,
        batch_size_train=64, num_instances=4, train_sampler='ModalityBalancedSampler',
        dataset_options={'regdb': {'trial': 2}}, sampler_options={'seed': 0})
    settings = dm.test_datasets['regdb'].evaluation_settings()
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Dict, Mapping, Optional, Tuple

from .._torchreid import tr
from ..registry import DATASETS, SAMPLERS, register_sampler
from .base import CrossModalDataset

__all__ = [
    'install', 'uninstall', 'dataset_options', 'current_options', 'build_train_sampler',
    'init_image_dataset', 'CrossModalImageDataManager', 'TORCHREID_SAMPLERS',
]

_DM = tr.module('data.datamanager')
_TR_SAMPLER = tr.module('data.sampler')
TORCHREID_SAMPLERS: Tuple[str, ...] = tuple(_TR_SAMPLER.AVAI_SAMPLERS)

# (dataset name -> options, sampler options) active while a datamanager is being built.
_OPTIONS: ContextVar[Tuple[Dict[str, Dict[str, Any]], Dict[str, Any]]] = ContextVar(
    'torchreid_vi_data_options', default=({}, {}))
# The functions that were bound on torchreid's datamanager module before install().
_PREVIOUS: Dict[str, Any] = {}


def _previous(name: str):
    prev = _PREVIOUS.get(name)
    if prev is not None:
        return prev
    return getattr(_TR_SAMPLER if name == 'build_train_sampler' else tr.module('data.datasets'),
                   name)


def _torchreid_sampler(name: str):
    """A registry entry for torchreid's sampler ``name`` that defers to torchreid's builder."""
    def build(data_source, batch_size=32, num_instances=4, num_cams=1, num_datasets=1, **kwargs):
        return _previous('build_train_sampler')(
            data_source, name, batch_size=batch_size, num_instances=num_instances,
            num_cams=num_cams, num_datasets=num_datasets, **kwargs)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"torchreid's {name} (built by torchreid's build_train_sampler)."
    build.torchreid_builtin = True
    return build


TORCHREID_SAMPLER_WRAPPERS = {name: _torchreid_sampler(name) for name in TORCHREID_SAMPLERS}


# ------------------------------------------------------------------------------- options context
def _dataset_class(name: str):
    return DATASETS.get(name) if name in DATASETS else None


def _check_dataset_options(name: str, options: Mapping[str, Any]) -> None:
    cls = _dataset_class(name)
    if cls is None:
        return  # not registered (yet); torchreid reports unknown names when one is built
    if not (isinstance(cls, type) and issubclass(cls, CrossModalDataset)):
        raise TypeError(f'dataset options {sorted(options)} were given for "{name}", which is not '
                        f'a cross-modal dataset (CrossModalDataset subclass) and takes none')
    for key in options:
        if key not in cls.default_options:
            allowed = ', '.join(cls.option_names()) or 'none'
            raise TypeError(f'dataset "{name}": unknown dataset option "{key}" '
                            f'(options of {name}: {allowed})')


@contextmanager
def dataset_options(options: Optional[Mapping[str, Mapping[str, Any]]] = None,
                    sampler_options: Optional[Mapping[str, Any]] = None):
    """Make plugin dataset and sampler options visible to datamanagers built inside the block.

    Args:
        options: dataset name -> keyword options of that dataset, e.g.
            ``{'regdb': {'trial': 2}, 'sysu_mm01': {'shots': (1,)}}``. Names not used by the
            datamanager are ignored; unknown option names raise ``TypeError`` naming the dataset
            and the key.
        sampler_options: keywords offered to a plugin sampler (e.g. ``{'seed': 0,
            'epoch_mode': 'agw', 'replace': 'auto'}``); those the chosen sampler does not accept
            are not passed (torchreid's own samplers take none).

    The innermost block wins (no merging with an enclosing block).
    """
    options = {str(k): dict(v) for k, v in (options or {}).items()}
    for name, opts in options.items():
        _check_dataset_options(name, opts)
    token = _OPTIONS.set((options, dict(sampler_options or {})))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


_options_context = dataset_options  # the name is shadowed by the datamanager's keyword below


def current_options() -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Any]]:
    """``(dataset options, sampler options)`` of the innermost active :func:`dataset_options`."""
    return _OPTIONS.get()


# ------------------------------------------------------------------------------- wrapped builders
def init_image_dataset(name: str, **kwargs):
    """torchreid's ``init_image_dataset`` plus the active plugin options of dataset ``name``."""
    opts = _OPTIONS.get()[0].get(name)
    if opts:
        _check_dataset_options(name, opts)
        kwargs = {**kwargs, **opts}
    return _previous('init_image_dataset')(name, **kwargs)


init_image_dataset._torchreid_vi_wrapper = True


def _accepted_kwargs(factory, offered: Dict[str, Any]) -> Dict[str, Any]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return offered
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return offered
    return {k: v for k, v in offered.items() if k in params}


def build_train_sampler(data_source, train_sampler, batch_size=32, num_instances=4, num_cams=1,
                        num_datasets=1, **kwargs):
    """torchreid's ``build_train_sampler`` extended with the plugin sampler registry.

    A registered plugin sampler is called as ``cls(data_source, batch_size, num_instances,
    **options)`` with the active sampler options (and ``num_cams``/``num_datasets``) it accepts.
    """
    if train_sampler not in SAMPLERS:
        if train_sampler in TORCHREID_SAMPLERS:
            return _previous('build_train_sampler')(
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
               **_OPTIONS.get()[1]}
    return factory(data_source, batch_size, num_instances, **_accepted_kwargs(factory, offered))


build_train_sampler._torchreid_vi_wrapper = True


def install() -> None:
    """Wrap ``build_train_sampler`` and ``init_image_dataset`` on torchreid's datamanager module
    and list torchreid's samplers in the plugin registry. Idempotent."""
    for name, wrapper in (('build_train_sampler', build_train_sampler),
                          ('init_image_dataset', init_image_dataset)):
        bound = getattr(_DM, name)
        if not getattr(bound, '_torchreid_vi_wrapper', False):
            _PREVIOUS[name] = bound
            setattr(_DM, name, wrapper)
    for name, wrapper in TORCHREID_SAMPLER_WRAPPERS.items():
        register_sampler(name, wrapper)


def uninstall() -> None:
    """Put back the functions :func:`install` replaced (registry entries stay)."""
    for name, prev in list(_PREVIOUS.items()):
        if getattr(getattr(_DM, name), '_torchreid_vi_wrapper', False):
            setattr(_DM, name, prev)
        del _PREVIOUS[name]


def is_installed() -> bool:
    return all(getattr(getattr(_DM, n), '_torchreid_vi_wrapper', False)
               for n in ('build_train_sampler', 'init_image_dataset'))


# ------------------------------------------------------------------------------- datamanager
_TR_INIT = inspect.signature(tr.data.ImageDataManager.__init__)


class CrossModalImageDataManager(tr.data.ImageDataManager):
    """torchreid's ``ImageDataManager`` with plugin dataset and sampler options.

    Takes every argument of ``ImageDataManager`` (``root``, ``sources``, ``targets``, ``height``,
    ``width``, ``batch_size_train``, ``num_instances``, ``train_sampler``, ``workers``, ...)
    plus:

    Args:
        dataset_options: dataset name -> options (see :func:`dataset_options`).
        sampler_options: options offered to a plugin sampler (``seed``, ``epoch_mode``,
            ``replace`` for ``ModalityBalancedSampler``).

    Attributes (besides torchreid's):
        train_set: the training dataset (a ``CrossModalDataset`` for cross-modal sources).
        test_datasets: target name -> its **query dataset object**, e.g.
            ``dm.test_datasets['sysu_mm01'].evaluation_settings()``.

    Raises:
        ValueError: sources mix cross-modal and plain datasets, or a modality-aware sampler
            (``requires_modality``) was chosen and a source is not cross-modal (the modality
            would be lost), or the built train set has no modality.
    """

    def __init__(self, *args, dataset_options: Optional[Mapping] = None,
                 sampler_options: Optional[Mapping] = None, **kwargs):
        bound = _TR_INIT.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        install()
        sampler_name = arguments['train_sampler']
        needs_modality = _requires_modality(sampler_name)
        sources = arguments['sources']
        sources = [sources] if isinstance(sources, str) else list(sources or [])
        # Unregistered names are left to torchreid, which lists the valid ones.
        plain = [s for s in sources if _dataset_class(s) is not None and not _is_cross_modal(s)]
        if plain and (needs_modality or len(plain) < len(sources)):
            # Checked here because torchreid sums the train sets with the LEFT operand's
            # __add__: a plain dataset first would silently drop the modality.
            why = (f'train_sampler={sampler_name} needs the per-image modality' if needs_modality
                   else 'cross-modal and plain datasets cannot be mixed')
            raise ValueError(
                f'{why}, but source(s) {plain} are not cross-modal datasets (CrossModalDataset '
                f'subclasses): the training set would have no per-image modality (the modality '
                f'would be lost)')
        self.dataset_options = {k: dict(v) for k, v in (dataset_options or {}).items()}
        self.sampler_options = dict(sampler_options or {})
        with _options_context(self.dataset_options, self.sampler_options):
            super().__init__(*args, **kwargs)
        self.train_set = self.train_loader.dataset
        if needs_modality and not isinstance(self.train_set, CrossModalDataset):
            raise ValueError(
                f'train_sampler={sampler_name} needs the per-image modality, but the training set '
                f'built from {sources} is a {type(self.train_set).__name__} without it')
        self.test_datasets = {name: self.test_loader[name]['query'].dataset
                              for name in self.targets}


def _is_cross_modal(name: str) -> bool:
    cls = _dataset_class(name)
    return isinstance(cls, type) and issubclass(cls, CrossModalDataset)


def _requires_modality(sampler_name: str) -> bool:
    if sampler_name not in SAMPLERS:
        return False
    return bool(getattr(SAMPLERS.get(sampler_name), 'requires_modality', False))
