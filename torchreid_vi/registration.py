"""``register_all()``: put every dataset, model, sampler and engine of the plugin in the registries.

Called by ``import torchreid_vi``; safe to call any number of times.
"""
from __future__ import annotations

from .registry import register_engine

__all__ = ['register_all']


def register_all() -> None:
    from .data import register_all as register_data
    from .engine.cross_modal import build_softmax_engine, build_triplet_engine
    from .engine.idkl import register as register_idkl
    from .engine.xiv import register as register_xiv

    # torchreid's own engines, reached by `loss.name` or `engine.name`.
    register_engine('softmax', build_softmax_engine)
    register_engine('triplet', build_triplet_engine)
    register_data()
    register_xiv()
    register_idkl()
