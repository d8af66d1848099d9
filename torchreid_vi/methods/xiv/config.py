"""``cfg.xiv``: every XIV option and its default (the paper's values), in one place.

:func:`add_config` adds the node to the default config; :func:`model_options` maps it to the
keyword arguments of the ``xiv_*`` model factories. The loss and the engine read their options
in their own ``from_config``.

Ablations of the paper's Tables 4 and 5 (``configs/xiv/ablation/*.yaml``):

=========================  =================================================================
``baseline``               ``xiv.use_x False xiv.use_cmg False`` (= L_V + L_I, fusion off)
``baseline+X``             ``xiv.use_cmg False``
``baseline+X+CMG``         the defaults (full Eq. 11)
``baseline+<fixed>``       ``xiv.generator mean|gray|hsv_v|ycbcr_y xiv.use_cmg False``
=========================  =================================================================

``xiv.generator none`` is the same as ``xiv.use_x False``: no X images, no ``L_X``, no I↔X term,
no fusion.
"""
from __future__ import annotations

from yacs.config import CfgNode

__all__ = ['add_config', 'model_options', 'GENERATOR_KINDS', 'TEST_FEATURES']

GENERATOR_KINDS = ('learned', 'mean', 'gray', 'hsv_v', 'ycbcr_y', 'none')
TEST_FEATURES = ('bn', 'pre_bn')


def add_config(cfg: CfgNode) -> None:
    """Add ``cfg.xiv`` (the paper's values as defaults)."""
    cfg.xiv = type(cfg)()
    cfg.xiv.generator = 'learned'  # 'learned' | 'mean' | 'gray' | 'hsv_v' | 'ycbcr_y' | 'none'
    cfg.xiv.use_x = True  # train with the X block (False = no X at all, like generator 'none')
    cfg.xiv.use_cmg = True  # cross-modality gap L_C (I<->X, I<->V hard-mined triplets)
    cfg.xiv.lambda_cmg = 0.1  # λ of Eq. 11
    cfg.xiv.margin_cross = 0.5  # α1: margin of the cross-modality triplets
    cfg.xiv.margin_intra = 0.3  # α2: margin of the per-modality triplets
    cfg.xiv.label_smoothing = 0.0  # ε of the ID loss (paper: plain cross entropy)
    cfg.xiv.fusion = True  # test: d(I,V) = D(I,V) + D(I,g(V)) (needs X)
    cfg.xiv.test_feature = 'bn'  # 'bn' (BNNeck output) | 'pre_bn' (pooled t)


def model_options(cfg: CfgNode) -> dict:
    """Keyword arguments of the ``xiv_*`` factories: the generator kind, the test feature and the
    data pipeline's normalisation (the fixed generators undo and redo it)."""
    return {'generator': cfg.xiv.generator, 'test_feature': cfg.xiv.test_feature,
            'norm_mean': list(cfg.data.norm_mean), 'norm_std': list(cfg.data.norm_std)}
