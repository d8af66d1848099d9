"""Registries: one idea, used for every kind of plug-in.

torchreid keeps datasets and models in private module dicts and hard-codes samplers and engines.
This module gives all four kinds the same public face:

* ``register_dataset(name, cls)`` / ``list_datasets()``: torchreid's image-dataset registry;
* ``register_model(name, fn, options=None)`` / ``list_models()``: torchreid's model factory;
  ``options(cfg) -> dict`` are the method's model switches, passed to ``fn`` by the command line;
* ``register_sampler(name, cls)`` / ``list_samplers()``: train samplers usable in
  ``sampler.train_sampler`` (torchreid's own names stay available);
* ``register_engine(name, builder, config=None)`` / ``list_engines()``: engines chosen by name in
  the command line (torchreid's ``softmax`` and ``triplet`` stay available); ``builder`` is an
  engine class's ``from_config``.

Registering the same object twice under the same name is a no-op, so importing a module that
registers things twice is harmless; registering a *different* object under a taken name raises
(pass ``overwrite=True`` to replace on purpose).

Example::

    >>> from torchreid_vi.registry import Registry
    >>> colours = Registry('colour')
    >>> colours.register('red', (255, 0, 0))
    (255, 0, 0)
    >>> colours.get('red')
    (255, 0, 0)
    >>> colours.names()
    ['red']
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from ._torchreid import private_dict, tr

__all__ = [
    'Registry', 'DATASETS', 'MODELS', 'SAMPLERS', 'ENGINES', 'MODEL_OPTIONS', 'ENGINE_CONFIGS',
    'register_dataset', 'register_model', 'register_sampler', 'register_engine',
    'list_datasets', 'list_models', 'list_samplers', 'list_engines',
]


class Registry:
    """A name → object map with idempotent registration and helpful lookup errors.

    Args:
        kind: what is registered (used in messages), e.g. ``'engine'``.
        store: an existing dict to manage (e.g. torchreid's private model factory); a fresh dict
            when omitted.
    """

    def __init__(self, kind: str, store: Optional[Dict[str, Any]] = None):
        self.kind = kind
        self._store = {} if store is None else store

    def register(self, name: str, obj: Any = None, *, overwrite: bool = False):
        """Register ``obj`` under ``name``; without ``obj`` return a decorator."""
        if obj is None:
            return lambda o: self.register(name, o, overwrite=overwrite)
        if not isinstance(name, str) or not name:
            raise ValueError(f'{self.kind} name must be a non-empty string, got {name!r}')
        old = self._store.get(name)
        if old is not None and old is not obj and not _same_definition(old, obj) and not overwrite:
            raise ValueError(
                f'{self.kind} "{name}" is already registered to {_describe(old)}; refusing to '
                f'replace it with {_describe(obj)} (pass overwrite=True to replace it on purpose)'
            )
        self._store[name] = obj
        return obj

    def get(self, name: str) -> Any:
        try:
            return self._store[name]
        except KeyError:
            raise KeyError(
                f'unknown {self.kind} "{name}"; registered {self.kind}s: {", ".join(self.names())}'
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._store

    def names(self) -> List[str]:
        return sorted(self._store)


def _describe(obj: Any) -> str:
    mod = getattr(obj, '__module__', None)
    qual = getattr(obj, '__qualname__', None) or type(obj).__name__
    return f'{mod}.{qual}' if mod else repr(obj)


def _same_definition(a: Any, b: Any) -> bool:
    # A module imported twice under two names (or reloaded) yields equal-but-distinct objects;
    # treat "same module path and qualified name" as the same registration. Bound methods (an
    # engine class's from_config) are the same when their functions and owners are.
    if hasattr(a, '__func__') and hasattr(b, '__func__'):
        return a == b or (_same_definition(a.__func__, b.__func__)
                          and _same_definition(a.__self__, b.__self__))
    qa, qb = getattr(a, '__qualname__', None), getattr(b, '__qualname__', None)
    return (qa is not None and qa == qb
            and getattr(a, '__module__', 1) == getattr(b, '__module__', 2))


# torchreid's own registries, managed in place so torchreid's builders see plugin entries.
DATASETS = Registry('dataset', private_dict(tr.module('data.datasets'), '__image_datasets'))
MODELS = Registry('model', private_dict(tr.models, '__model_factory'))
SAMPLERS = Registry('train sampler')
ENGINES = Registry('engine')
# Engine name -> callable(cfg) adding the engine's config node (see torchreid_vi.config).
ENGINE_CONFIGS: Dict[str, Callable] = {}
# Model name -> callable(cfg) giving the model factory's method options (e.g. XIV's generator).
MODEL_OPTIONS: Dict[str, Callable] = {}


def register_dataset(name: str, cls, *, overwrite: bool = False):
    """Register an image dataset class in torchreid's dataset registry (idempotent)."""
    return DATASETS.register(name, cls, overwrite=overwrite)


def register_model(name: str, fn: Callable, *, options: Optional[Callable] = None,
                   overwrite: bool = False):
    """Register a model constructor ``fn(num_classes, loss, pretrained, use_gpu, **options)``.

    Args:
        options: ``options(cfg) -> dict``, the method's model switches taken from the config;
            the command line builds the model with ``fn(..., **options(cfg))``.
    """
    MODELS.register(name, fn, overwrite=overwrite)
    if options is not None:
        MODEL_OPTIONS[name] = options
    return fn


def register_sampler(name: str, cls, *, overwrite: bool = False):
    """Register a train sampler ``cls(data_source, batch_size, num_instances, **options)``.

    ``data_source`` is the list of torchreid 4-tuples ``(path, pid, camid, dsetid)``.
    """
    return SAMPLERS.register(name, cls, overwrite=overwrite)


def register_engine(name: str, builder: Callable, config: Optional[Callable] = None, *,
                    overwrite: bool = False):
    """Register an engine builder ``builder(cfg, datamanager, model, optimizer, scheduler)``
    (an engine class's ``from_config``).

    Args:
        config: optional ``fn(cfg)`` that adds the engine's own node to the default config, so its
            keys can be set from yaml files and ``key value`` options.
    """
    ENGINES.register(name, builder, overwrite=overwrite)
    if config is not None:
        ENGINE_CONFIGS[name] = config
    return builder


def list_datasets() -> List[str]:
    return DATASETS.names()


def list_models() -> List[str]:
    return MODELS.names()


def list_samplers() -> List[str]:
    return SAMPLERS.names()


def list_engines() -> List[str]:
    return ENGINES.names()
