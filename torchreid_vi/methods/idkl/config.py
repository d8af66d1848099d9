"""``cfg.idkl``: every IDKL option and its default, in one place.

Defaults are the released code's SYSU-MM01 values (spec ``idkl.md`` §3.7); ``configs/idkl/*.yaml``
hold the per-dataset values. :func:`add_config` adds the node; :func:`model_options` maps the
model-side switches (purifier masks, confuser mode) to the ``idkl_*`` factories' arguments.
"""
from __future__ import annotations

from yacs.config import CfgNode

__all__ = ['add_config', 'model_options', 'MASK_MODES', 'CONFUSER_MODES', 'LOSS_FORMS',
           'CROSS_MODES']

MASK_MODES = ('pixel', 'se')
CONFUSER_MODES = ('pseudo', 'grl')
LOSS_FORMS = ('code', 'paper')
CROSS_MODES = ('mixed_set', 'cross_modal')


def add_config(cfg: CfgNode) -> None:
    """Add ``cfg.idkl`` (the released code's SYSU-MM01 values)."""
    node = type(cfg)
    cfg.idkl = node()
    cfg.idkl.check_batch_layout = True  # validate P ids x (m vis + m ir) every step (one host sync)

    cfg.idkl.triplet = node()
    cfg.idkl.triplet.margin = 1.3  # batch-hard triplet on pre-BN f_sh and f_sp, whole mixed batch

    cfg.idkl.ip = node()  # information purifier
    cfg.idkl.ip.weight = 0.1  # lambda1, weight of L_e + L_r
    # 'pixel' (code: per-position masks) | 'se' (paper: channel masks)
    cfg.idkl.ip.mask_mode = 'pixel'
    cfg.idkl.ip.loss_form = 'code'  # 'code' (exp-hinge / ReLU hinge) | 'paper' (softplus)

    cfg.idkl.tgsa = node()  # feature-level distillation + MDR feature part
    cfg.idkl.tgsa.enabled = True  # False on RegDB in the released configs
    cfg.idkl.tgsa.distill_weight = 0.6  # lambda2, weight of T_dist = J(A_sh, A_sp) per modality
    cfg.idkl.tgsa.mdr_weights = [1.0, 1.0, 1.0]  # w1..w3 of J(A_V,A_I), J(A_V,A_X), J(A_X,A_I)
    cfg.idkl.tgsa.cross_mode = 'mixed_set'  # A_X: 'mixed_set' (code) | 'cross_modal' (paper A(V;I))

    cfg.idkl.csa = node()  # logit-level distillation
    cfg.idkl.csa.weight = 0.8  # lambda3 (RegDB: 0.3)
    cfg.idkl.csa.set_level = True  # add the set-level S terms (code; not in the paper)

    cfg.idkl.mdr = node()
    cfg.idkl.mdr.logit_weight = 1.0  # weight of J and S between z_sh[V] and z_sh[I]

    cfg.idkl.discriminator = node()
    cfg.idkl.discriminator.weight = 1.0  # CE of D(b_sp) with the true modality

    cfg.idkl.confuser = node()
    cfg.idkl.confuser.weight = 1.0  # CE of the confuser Q on b_sh
    cfg.idkl.confuser.mode = 'pseudo'  # 'pseudo' (code: balanced pseudo labels) | 'grl' (paper)
    cfg.idkl.confuser.grl_alpha = 1.0  # gradient-reversal factor in 'grl' mode


def model_options(cfg: CfgNode) -> dict:
    """Keyword arguments of the ``idkl_*`` factories: the model-side switches."""
    return {'mask_mode': cfg.idkl.ip.mask_mode, 'confuser_mode': cfg.idkl.confuser.mode,
            'grl_alpha': float(cfg.idkl.confuser.grl_alpha)}
