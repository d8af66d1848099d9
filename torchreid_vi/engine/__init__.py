"""Engines: the cross-modal base engine and torchreid's stock engines on top of it."""
from .base import CrossModalEngine
from .stock import CrossModalSoftmaxEngine, CrossModalTripletEngine

__all__ = ['CrossModalEngine', 'CrossModalSoftmaxEngine', 'CrossModalTripletEngine']
