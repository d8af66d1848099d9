"""``register_all()``: put every dataset, model, sampler and engine of the plugin in the registries.

Called by ``import torchreid_vi``; safe to call any number of times.
"""
from __future__ import annotations

from .registry import register_engine

__all__ = ['register_all']


def register_all() -> None:
    from .data import register_all as register_data
    from .engine.stock import CrossModalSoftmaxEngine, CrossModalTripletEngine
    from .methods import register_all as register_methods

    # torchreid's own engines, reached by `loss.name` or `engine.name`.
    register_engine('softmax', CrossModalSoftmaxEngine.from_config)
    register_engine('triplet', CrossModalTripletEngine.from_config)
    register_data()
    register_methods()
