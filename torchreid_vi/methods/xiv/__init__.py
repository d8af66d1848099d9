"""XIV (Li, Wei, Hong, Gong, AAAI 2020): X-modality generator, weight-sharing learner, MRG + CMG.

One folder holds the method: :mod:`.config` (``cfg.xiv`` and the model factory's options),
:mod:`.model` (``XGenerator``, ``XIVNet``, ``xiv_*`` models), :mod:`.loss` (``XIVLoss``),
:mod:`.engine` (``XIVEngine``) and :mod:`.figures` (the paper's Fig. 3/4). :func:`register` puts
the models and the ``xiv`` engine (with its config node) in the registries; it is idempotent.
"""
from .config import add_config, model_options
from .engine import XIVEngine
from .loss import XIVLoss
from .model import XGenerator, XIVNet, register_xiv_backbone

__all__ = ['register', 'add_config', 'model_options', 'XIVEngine', 'XIVLoss', 'XGenerator',
           'XIVNet', 'register_xiv_backbone']


def register() -> None:
    """Register the ``xiv_*`` models and the ``xiv`` engine with its config node (idempotent)."""
    from ...registry import register_engine
    from .model import register_models
    register_models()
    register_engine('xiv', XIVEngine.from_config, config=add_config)
