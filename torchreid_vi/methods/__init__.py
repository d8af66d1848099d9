"""The methods: one sub-package each (``xiv``, ``idkl``), found and registered automatically.

A method package holds its ``config`` (its config node and the model factory's options),
``model``, ``loss`` and ``engine`` modules and a ``register()`` that puts its models and engine in
the registries. Adding a third method means adding one folder here (plus its yaml configs and a
``projects/`` README): :func:`register_all` imports every sub-package and calls its
``register()``.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import List

__all__ = ['register_all', 'method_names']


def method_names() -> List[str]:
    """The method sub-packages, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg)


def register_all() -> None:
    """Import every method package and call its ``register()`` (idempotent)."""
    for name in method_names():
        importlib.import_module(f'{__name__}.{name}').register()
