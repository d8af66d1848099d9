"""IDKL network (Ren & Zhang, "Implicit Discriminative Knowledge Learning for Visible-Infrared
Person Re-Identification", CVPR 2024), as the released code computes it.

Structure (spec ``idkl.md`` §2)::

    x ─ Θ (conv1, bn1, relu, maxpool, layer1, layer2; shared)
        └─┬─ Φ (layer3, layer4; shared deep)
          │     └ GeM → f_sh → BN_sh → b_sh → C_sh → z_sh
          │                          b_sh → Q (confuser) → q_logits
          └─ Ψ (own copy of layer3, layer4; specific deep) → F
                └ Information Purifier → F̃ → GeM → f_sp
                  f_sp → BN_sp → b_sp → C_sp → z_sp
                                 b_sp → D (discriminator)

* last stride 1 in both layer4 copies; GeM with fixed p = 3; BNNecks with a frozen zero bias;
  bias-free classifiers; one label-free classifier ``C_e`` used only by the purifier's
  entropy loss; the modality discriminator ``D`` and confuser ``Q`` are 3-layer MLPs.
* Only the layers that are used exist: one trunk plus a second copy of layer3/layer4 (the
  released code builds three full ResNet-50s; the unused parts never receive a gradient).
* **Eval mode** runs Θ, Φ, GeM and BN_sh only and returns ``b_sh`` of shape ``(B, D)`` for every
  ``B`` (including 1); the specific branch, purifier, classifiers, D and Q are not executed.
* **Train mode** returns a dict of tensors (see :meth:`IDKLNet.forward`) consumed by
  :class:`torchreid_vi.methods.idkl.loss.IDKLLoss`.

Registered model names (see :func:`register_models`):

* ``idkl_resnet50`` — the paper's network (feature dim 2048; ImageNet-1k V1 weights of torchvision
  ResNet-50 through :mod:`torchreid_vi.pretrained`).
* ``idkl_resnet18`` — the same structure on ResNet-18 BasicBlocks (feature dim 512, purifier
  reduction 16 → 32 hidden channels). It exists for the CPU demo and the tests and is **not** the
  paper's network; its numbers are not comparable to published ones.

Example::

    >>> import torch
    >>> from torchreid_vi.methods.idkl.model import idkl_resnet18
    >>> net = idkl_resnet18(num_classes=4, pretrained=False).eval()
    >>> tuple(net(torch.rand(1, 3, 64, 32)).shape)
    (1, 512)
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import NamedTuple, Optional

import torch
from torch import nn

from ...modeling.backbones import RESNET_LAYERS, torchreid_resnet
from ...modeling.layers import BNNeck, GeM, grad_reverse
from .config import CONFUSER_MODES, MASK_MODES

__all__ = ['IDKLNet', 'InformationPurifier', 'ModalityHead', 'PurifierOutput', 'idkl_resnet50',
           'idkl_resnet18', 'register_models']


class PurifierOutput(NamedTuple):
    """Tensors of the information purifier; maps are ``(B, D, H, W)`` (masks ``(B, D, 1, 1)``
    in ``se`` mode)."""
    purified: torch.Tensor   # F̃ = m_r ⊙ (m_e ⊙ F) + m_e ⊙ (m_r ⊙ F̂) = m_e ⊙ m_r ⊙ (F + F̂)
    enhanced: torch.Tensor   # F_d+ = m_e ⊙ F
    normalized: torch.Tensor  # F̂ = IN(F)
    reduced: torch.Tensor    # F̂_m− = m_r ⊙ F̂
    mask_e: torch.Tensor     # m_e = M_e(F), in (0, 1)
    mask_r: torch.Tensor     # m_r = M_r(F̂), in (0, 1)


class _Mask(nn.Module):
    """σ(W2 · ReLU(W1 · x)) with bias-free 1×1 convolutions (dim → dim/reduction → dim).

    ``pixel`` mode (released code): applied at every position, giving a ``(B, D, H, W)`` mask.
    ``se`` mode (paper eq. 8): applied to the spatial mean, giving a ``(B, D, 1, 1)`` mask that
    broadcasts over H×W. Parameters are identical in both modes, so checkpoints load in either.
    """

    def __init__(self, dim: int, reduction: int):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.fc1 = nn.Conv2d(dim, hidden, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, dim, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == 'se':
            x = x.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.fc2(self.relu(self.fc1(x))))


class InformationPurifier(nn.Module):
    """Instance normalisation plus an enhancement and a reduction mask (spec §2.3).

    Args:
        dim: channels D of the specific map. reduction: mask bottleneck ratio (16 → 2048/128).
        mask_mode: ``'pixel'`` (released code, per-position masks) or ``'se'`` (paper, channel
            masks from the spatial mean).

    ``forward(F)`` with ``F`` of shape ``(B, D, H, W)`` returns a :class:`PurifierOutput`.
    The IN keeps learnable affine parameters and running statistics as in the released code
    (the statistics are never used: the branch does not run in eval mode).
    """

    def __init__(self, dim: int, reduction: int = 16, mask_mode: str = 'pixel'):
        super().__init__()
        self.norm = nn.InstanceNorm2d(dim, affine=True, track_running_stats=True)
        self.mask_e = _Mask(dim, reduction)
        self.mask_r = _Mask(dim, reduction)
        self.mask_mode = mask_mode

    @property
    def mask_mode(self) -> str:
        return self._mask_mode

    @mask_mode.setter
    def mask_mode(self, mode: str):
        if mode not in MASK_MODES:
            raise ValueError(f'idkl.ip.mask_mode must be one of {MASK_MODES}, got {mode!r}')
        self._mask_mode = mode

    def forward(self, feat: torch.Tensor) -> PurifierOutput:
        normalized = self.norm(feat)
        mask_e = self.mask_e(feat, self._mask_mode)
        mask_r = self.mask_r(normalized, self._mask_mode)
        enhanced = mask_e * feat
        reduced = mask_r * normalized
        purified = mask_r * enhanced + mask_e * reduced
        return PurifierOutput(purified, enhanced, normalized, reduced, mask_e, mask_r)


class ModalityHead(nn.Module):
    """Linear(D,100)-BN-ReLU-Dropout(0.5)-Linear(100,100)-BN-ReLU-Dropout(0.5)-Linear(100,2).

    Used for the modality discriminator D (on b̃_sp) and the confuser Q (on b_sh).
    Shapes: ``(B, D) -> (B, 2)``.
    """

    def __init__(self, dim: int, hidden: int = 100, num_modalities: int = 2, dropout: float = 0.5):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_modalities),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class IDKLNet(nn.Module):
    """The IDKL two-branch network.

    Args:
        num_classes: training identities C (classifier width).
        arch: ``'resnet50'`` (paper) or ``'resnet18'`` (small CPU variant, not the paper's).
        pretrained: load torchvision's ImageNet-1k V1 weights
            (:func:`torchreid_vi.modeling.backbones.load_imagenet_weights`; offline this raises
            ``PretrainedWeightsUnavailable``). ``False`` never touches the network.
        mask_mode: purifier masks, ``'pixel'`` (code) or ``'se'`` (paper) — ``idkl.ip.mask_mode``.
        confuser_mode: ``'pseudo'`` (code: Q sees b_sh directly) or ``'grl'`` (paper: Q sees
            GRL_α(b_sh), reversing its gradient into the backbone) — ``idkl.confuser.mode``.
        grl_alpha: α of the gradient reversal in ``grl`` mode — ``idkl.confuser.grl_alpha``.
        reduction: purifier mask bottleneck ratio.

    ``mask_mode``, ``confuser_mode`` and ``grl_alpha`` default to the default config's values.

    Attributes used by the engine and tests: ``feature_dim``, ``shallow`` (Θ), ``shared_deep``
    (Φ), ``specific_deep`` (Ψ), ``purifier``, ``bnneck_sh``/``bnneck_sp``, ``classifier_sh``/
    ``classifier_sp``/``classifier_e``, ``discriminator`` (D), ``confuser`` (Q).
    """

    def __init__(self, num_classes: int, arch: str = 'resnet50', pretrained: bool = True, *,
                 mask_mode: Optional[str] = None, confuser_mode: Optional[str] = None,
                 grl_alpha: Optional[float] = None, reduction: int = 16):
        super().__init__()
        if arch not in RESNET_LAYERS:
            raise ValueError(f'IDKL arch must be one of {sorted(RESNET_LAYERS)}, got {arch!r}')
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f'IDKL num_classes must be a positive int, got {num_classes!r}')
        if mask_mode is None or confuser_mode is None or grl_alpha is None:
            defaults = _default_model_options()
            mask_mode = defaults['mask_mode'] if mask_mode is None else mask_mode
            confuser_mode = defaults['confuser_mode'] if confuser_mode is None else confuser_mode
            grl_alpha = defaults['grl_alpha'] if grl_alpha is None else grl_alpha
        trunk = torchreid_resnet(arch, last_stride=1, pretrained=pretrained)
        dim = trunk.feature_dim
        self.arch = arch
        self.feature_dim = dim
        self.num_classes = num_classes

        self.shallow = nn.Sequential(OrderedDict(
            conv1=trunk.conv1, bn1=trunk.bn1, relu=trunk.relu, maxpool=trunk.maxpool,
            layer1=trunk.layer1, layer2=trunk.layer2))
        self.shared_deep = nn.Sequential(OrderedDict(layer3=trunk.layer3, layer4=trunk.layer4))
        # Same ImageNet start, never shared afterwards.
        self.specific_deep = copy.deepcopy(self.shared_deep)
        self.pool = GeM(p=3.0)
        self.purifier = InformationPurifier(dim, reduction, mask_mode)
        self.bnneck_sh = BNNeck(dim)
        self.bnneck_sp = BNNeck(dim)
        self.classifier_sh = nn.Linear(dim, num_classes, bias=False)
        self.classifier_sp = nn.Linear(dim, num_classes, bias=False)
        # Label-free classifier C_e: only the purifier's entropy loss L_e trains it.
        self.classifier_e = nn.Linear(dim, num_classes, bias=False)
        self.discriminator = ModalityHead(dim)
        self.confuser = ModalityHead(dim)
        self.confuser_mode = confuser_mode
        self.grl_alpha = float(grl_alpha)

    @property
    def confuser_mode(self) -> str:
        return self._confuser_mode

    @confuser_mode.setter
    def confuser_mode(self, mode: str):
        if mode not in CONFUSER_MODES:
            raise ValueError(f'idkl.confuser.mode must be one of {CONFUSER_MODES}, got {mode!r}')
        self._confuser_mode = mode

    def confuse(self, b_sh: torch.Tensor) -> torch.Tensor:
        """Confuser logits ``(B, 2)``: ``Q(b_sh)`` (pseudo mode) or ``Q(GRL_α(b_sh))``
        (grl mode)."""
        if self._confuser_mode == 'grl':
            b_sh = grad_reverse(b_sh, self.grl_alpha)
        return self.confuser(b_sh)

    def inference_modules(self) -> nn.ModuleDict:
        """The modules eval mode runs (Θ, Φ, BN_sh; GeM has no parameters): the export subgraph."""
        return nn.ModuleDict(OrderedDict(
            shallow=self.shallow, shared_deep=self.shared_deep, bnneck_sh=self.bnneck_sh))

    def forward(self, x: torch.Tensor):
        """Eval: ``(B, 3, H, W) -> (B, D)`` BN'd shared feature. Train: a dict of tensors.

        Train-mode keys (B rows each): ``f_sh``/``f_sp`` pre-BN GeM features ``(B, D)``;
        ``b_sh``/``b_sp`` BN'd ``(B, D)``; ``z_sh``/``z_sp`` ID logits ``(B, C)``; ``d_logits``
        (discriminator on b_sp) and ``q_logits`` (confuser on b_sh) ``(B, 2)``; ``e_F``/``e_Fd``
        = C_e(g(F)), C_e(g(F_d+)) ``(B, C)``; ``r_F``/``r_Fm`` = g(F̂), g(F̂_m−) ``(B, D)``.
        """
        shallow = self.shallow(x)
        f_sh = self.pool(self.shared_deep(shallow))
        b_sh = self.bnneck_sh(f_sh)
        if not self.training:
            return b_sh

        specific = self.specific_deep(shallow)
        ip = self.purifier(specific)
        f_sp = self.pool(ip.purified)
        b_sp = self.bnneck_sp(f_sp)
        return {
            'f_sh': f_sh, 'f_sp': f_sp, 'b_sh': b_sh, 'b_sp': b_sp,
            'z_sh': self.classifier_sh(b_sh), 'z_sp': self.classifier_sp(b_sp),
            'd_logits': self.discriminator(b_sp), 'q_logits': self.confuse(b_sh),
            'e_F': self.classifier_e(self.pool(specific)),
            'e_Fd': self.classifier_e(self.pool(ip.enhanced)),
            'r_F': self.pool(ip.normalized), 'r_Fm': self.pool(ip.reduced),
        }


def _default_model_options() -> dict:
    from ...config import get_default_config
    from .config import model_options
    return model_options(get_default_config())


def idkl_resnet50(num_classes, loss='idkl', pretrained=True, use_gpu=True, **options) -> IDKLNet:
    """IDKL on ResNet-50 (the paper's network). torchreid factory signature; ``loss`` and
    ``use_gpu`` are accepted for compatibility and ignored (the engine owns the losses);
    ``options``: :func:`~torchreid_vi.methods.idkl.config.model_options`."""
    return IDKLNet(num_classes, arch='resnet50', pretrained=pretrained, **options)


def idkl_resnet18(num_classes, loss='idkl', pretrained=True, use_gpu=True, **options) -> IDKLNet:
    """IDKL structure on ResNet-18 BasicBlocks (512-d). For CPU demos/tests; not the paper's."""
    return IDKLNet(num_classes, arch='resnet18', pretrained=pretrained, **options)


def register_models():
    """Register ``idkl_resnet50`` and ``idkl_resnet18`` in torchreid's model factory
    (idempotent)."""
    from ...registry import register_model
    from .config import model_options

    register_model('idkl_resnet50', idkl_resnet50, options=model_options)
    register_model('idkl_resnet18', idkl_resnet18, options=model_options)
