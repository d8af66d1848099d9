"""IDKL (Ren & Zhang, CVPR 2024): dual-stream network, information purifier, knowledge distillation
from the modality-specific into the modality-shared feature, as the released code computes it.

One folder holds the method: :mod:`.config` (``cfg.idkl`` and the model factory's options),
:mod:`.model` (``IDKLNet``, ``idkl_*`` models), :mod:`.loss` (``IDKLLoss`` and its terms) and
:mod:`.engine` (``IDKLEngine``). :func:`register` is idempotent.
"""
from .config import add_config, model_options
from .engine import IDKLEngine
from .loss import IDKLLoss
from .model import IDKLNet

__all__ = ['register', 'add_config', 'model_options', 'IDKLEngine', 'IDKLLoss', 'IDKLNet']


def register() -> None:
    """Register the IDKL models and the ``idkl`` engine with its config node (idempotent)."""
    from ...registry import register_engine
    from .model import register_models
    register_models()
    register_engine('idkl', IDKLEngine.from_config, config=add_config)
