"""XIV network (Li, Wei, Hong, Gong, "Infrared-Visible Cross-Modal Person Re-Identification with an
X Modality", AAAI 2020): an X generator ``g`` in front of a "bag of tricks" feature learner ``f``.

Structure (spec ``xiv.md`` §2–3)::

    visible V ─ g (1×1 conv 3→1, ReLU, 1×1 conv 1→3) ─ X
    [I, X, V] ─ backbone (shared, last stride 1) ─ pooled t (B, D) ─ BNNeck ─ b ─ classifier

* ``g`` has 10 parameters and no spatial mixing; fixed alternatives of the paper's Table 5
  (``mean``, ``gray``, ``hsv_v``, ``ycbcr_y``) replace it without changing the parameter set, so
  a state dict loads whatever the generator kind.
* Any torchreid backbone whose ``forward`` ends in a pooled vector and which keeps its classifier
  in ``.classifier`` can be wrapped (:func:`~torchreid_vi.modeling.backbones.pooled_backbone`);
  :func:`register_xiv_backbone` registers ``xiv_<name>`` in torchreid's model factory in one line.
* **Train mode**: ``model(ir, visible=vis)`` is XIV's step: one backbone pass over ``[I, g(V), V]``
  returning ``(logits, t)``; ``model(images)`` follows torchreid's convention (``(logits, t)``
  when ``model.loss == 'triplet'``, ``logits`` when ``'softmax'``).
* **Eval mode**: ``model(images)`` returns ``(B, D)`` features, the BNNeck output ``b`` by
  default (``test_feature='bn'``) or the pre-BN ``t`` (``'pre_bn'``);
  ``model(images, x_view=True)`` returns the features of the X images ``f(g(images))`` (test-time
  fusion, Eq. 2).

Registered model names (:func:`register_models`):

* ``xiv_resnet50`` — the paper's network (ResNet-50, last stride 1, 2048-d).
* ``xiv_densenet121`` — the paper's alternative backbone (1024-d; the paper feeds 224×224).
* ``xiv_resnet18`` — ResNet-18, last stride 1, 512-d: for the CPU demo and the tests only; its
  numbers are not comparable to published ones.

Example::

    >>> import torch
    >>> from torchreid_vi.methods.xiv.model import xiv_resnet18
    >>> net = xiv_resnet18(num_classes=4, pretrained=False).eval()
    >>> images = torch.rand(2, 3, 64, 32)
    >>> tuple(net(images).shape), tuple(net(images, x_view=True).shape)
    ((2, 512), (2, 512))
    >>> sum(p.numel() for p in net.generator.parameters())
    10
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ...modeling.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    pooled_backbone,
    torchreid_densenet121,
    torchreid_resnet,
)
from ...modeling.layers import BNNeck
from .config import GENERATOR_KINDS, TEST_FEATURES

__all__ = ['XGenerator', 'XIVNet', 'register_xiv_backbone', 'register_models', 'xiv_resnet50',
           'xiv_resnet18', 'xiv_densenet121']

# Luma of ITU-R BT.601 as PIL's convert('L') computes it (torchvision's rgb_to_grayscale uses
# 0.2989/0.587/0.114, the same to 4 decimals).
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)
# Y of YCbCr in the *studio* range of BT.601 (MATLAB's rgb2ycbcr): Y = 16/255 + (65.481 R +
# 128.553 G + 24.966 B)/255 for RGB in [0, 1]. The full-range (JPEG) Y is identical to `gray`,
# which would make the paper's separate "gray" and "Y" rows of Table 5 the same experiment, so the
# studio-range definition is assumed (the paper gives no formula).
_YCBCR_Y_WEIGHTS = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)
_YCBCR_Y_OFFSET = 16.0 / 255.0


class XGenerator(nn.Module):
    """The X-modality generator ``g``: visible image → X image, same shape, channel space only.

    Args:
        kind: ``'learned'`` (the paper's ``Conv2d(3,1,1) → ReLU → Conv2d(1,3,1)``, 10 parameters),
            ``'mean'``, ``'gray'``, ``'hsv_v'``, ``'ycbcr_y'`` (fixed one-channel transforms of
            Table 5, repeated to 3 channels) or ``'none'`` (no X modality; calling it raises).
        norm_mean, norm_std: the normalisation of the input tensors (the data pipeline's
            ``data.norm_mean``/``data.norm_std``; ImageNet by default).

    Input and output live in the *normalised* space the backbone sees, ``(B, 3, H, W)``:

    * ``learned`` works directly on the normalised tensor, as in the paper (its 1×1 convolutions
      absorb any per-channel affine normalisation).
    * the fixed kinds are defined on RGB in [0, 1], so they **undo the normalisation**
      (``rgb = x * std + mean``), compute the one-channel image, repeat it to 3 channels and
      **redo the normalisation** (``(y - mean) / std``).

    The learned convolutions always exist (``kind`` can be switched without changing the
    parameter set or state dict); with a fixed kind they receive no gradient.

    Example::

        >>> import torch
        >>> g = XGenerator('hsv_v')
        >>> rgb = torch.tensor([0.2, 0.9, 0.4]).view(1, 3, 1, 1)   # one pixel, RGB in [0, 1]
        >>> x = g(g.normalize(rgb))                                 # normalised in, normalised out
        >>> torch.allclose(g.denormalize(x), torch.full((1, 3, 1, 1), 0.9))
        True
    """

    def __init__(self, kind: str = 'learned', norm_mean: Sequence[float] = IMAGENET_MEAN,
                 norm_std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.reduce = nn.Conv2d(3, 1, kernel_size=1)
        self.relu = nn.ReLU(inplace=False)
        self.expand = nn.Conv2d(1, 3, kernel_size=1)
        if len(norm_mean) != 3 or len(norm_std) != 3:
            raise ValueError(f'XGenerator needs 3-channel norm_mean/norm_std, got {norm_mean}, '
                             f'{norm_std}')
        # Not persistent: the normalisation belongs to the data config, not to the weights.
        self.register_buffer('norm_mean', torch.tensor(norm_mean, dtype=torch.float32)
                             .view(1, 3, 1, 1), persistent=False)
        self.register_buffer('norm_std', torch.tensor(norm_std, dtype=torch.float32)
                             .view(1, 3, 1, 1), persistent=False)
        self.kind = kind

    @property
    def kind(self) -> str:
        return self._kind

    @kind.setter
    def kind(self, kind: str):
        if kind not in GENERATOR_KINDS:
            raise ValueError(f'xiv.generator must be one of {GENERATOR_KINDS}, got {kind!r}')
        self._kind = kind

    def set_normalization(self, norm_mean: Sequence[float], norm_std: Sequence[float]):
        """Use the data pipeline's normalisation (``data.norm_mean``/``data.norm_std``)."""
        self.norm_mean.copy_(torch.tensor(norm_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.norm_std.copy_(torch.tensor(norm_std, dtype=torch.float32).view(1, 3, 1, 1))

    def normalize(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] ``(B, 3, H, W)`` → normalised tensor."""
        return (rgb - self.norm_mean.to(rgb.dtype)) / self.norm_std.to(rgb.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tensor ``(B, 3, H, W)`` → RGB (in [0, 1] for real images)."""
        return x * self.norm_std.to(x.dtype) + self.norm_mean.to(x.dtype)

    def one_channel(self, rgb: torch.Tensor) -> torch.Tensor:
        """The fixed transform of ``kind`` on RGB in [0, 1]: ``(B, 3, H, W)`` → ``(B, 1, H, W)``."""
        if self._kind == 'mean':
            return rgb.mean(dim=1, keepdim=True)
        if self._kind == 'gray':
            w = rgb.new_tensor(_GRAY_WEIGHTS).view(1, 3, 1, 1)
            return (rgb * w).sum(dim=1, keepdim=True)
        if self._kind == 'hsv_v':
            return rgb.amax(dim=1, keepdim=True)
        if self._kind == 'ycbcr_y':
            w = rgb.new_tensor(_YCBCR_Y_WEIGHTS).view(1, 3, 1, 1)
            return (rgb * w).sum(dim=1, keepdim=True) + _YCBCR_Y_OFFSET
        raise RuntimeError(f'generator kind {self._kind!r} has no fixed one-channel transform')

    def forward(self, visible: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised visible images → ``(B, 3, H, W)`` normalised X images."""
        if visible.dim() != 4 or visible.size(1) != 3:
            raise ValueError(f'XGenerator expects (B, 3, H, W) images, got {tuple(visible.shape)}')
        if self._kind == 'learned':
            return self.expand(self.relu(self.reduce(visible)))
        if self._kind == 'none':
            raise RuntimeError('xiv.generator is "none": there is no X modality to generate '
                               '(set xiv.generator to learned/mean/gray/hsv_v/ycbcr_y)')
        y = self.one_channel(self.denormalize(visible))
        return self.normalize(y.expand(-1, 3, -1, -1))

    def extra_repr(self) -> str:
        return f'kind={self._kind}'


class XIVNet(nn.Module):
    """X generator + strong-baseline feature learner.

    Args:
        backbone: module mapping ``(B, 3, H, W)`` → pooled ``(B, feature_dim)`` in train and eval
            mode (e.g. :func:`~torchreid_vi.modeling.backbones.pooled_backbone`).
        feature_dim: D, the backbone's pooled dimension.
        num_classes: training identities (the classifier's outputs).
        loss: ``'triplet'`` (train mode returns ``(logits, t)``) or ``'softmax'`` (``logits``).
        generator, norm_mean, norm_std: see :class:`XGenerator` (``cfg.xiv.generator``,
            ``cfg.data.norm_mean/norm_std``).
        test_feature: ``'bn'`` (BNNeck output) or ``'pre_bn'`` (``t``) in eval mode
            (``cfg.xiv.test_feature``).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, *, loss: str,
                 generator: str, test_feature: str, norm_mean: Sequence[float] = IMAGENET_MEAN,
                 norm_std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f'XIVNet needs num_classes >= 1, got {num_classes}')
        self.generator = XGenerator(generator, norm_mean, norm_std)
        self.backbone = backbone
        self.neck = BNNeck(feature_dim)
        self.classifier = nn.Linear(feature_dim, num_classes, bias=False)
        # The strong baseline's classifier initialisation (weights_init_classifier).
        nn.init.normal_(self.classifier.weight, std=0.001)
        self.feature_dim = feature_dim
        self.loss = loss
        self.test_feature = test_feature

    @property
    def loss(self) -> str:
        return self._loss

    @loss.setter
    def loss(self, loss: str):
        if loss not in ('softmax', 'triplet'):
            raise ValueError(f'XIVNet loss must be "softmax" or "triplet", got {loss!r}')
        self._loss = loss

    @property
    def test_feature(self) -> str:
        return self._test_feature

    @test_feature.setter
    def test_feature(self, name: str):
        if name not in TEST_FEATURES:
            raise ValueError(f'xiv.test_feature must be one of {TEST_FEATURES}, got {name!r}')
        self._test_feature = name

    def make_x(self, visible: torch.Tensor) -> torch.Tensor:
        """X images ``g(V)``: ``(B, 3, H, W)`` normalised → ``(B, 3, H, W)`` normalised."""
        return self.generator(visible)

    def forward(self, images: torch.Tensor, x_view: bool = False, *,
                visible: Optional[torch.Tensor] = None, use_x: bool = True):
        """Args:
            images: ``(B, 3, H, W)`` normalised images.
            x_view: pass the images through the generator first (features of ``g(images)``).
            visible: training only, the cross-modal step: ``images`` are the M infrared images,
                ``visible`` the M visible ones; the backbone sees one batch ``[I, g(V), V]``
                (``use_x``) or ``[I, V]``, so BatchNorm statistics cover every modality and the
                generator is trained through the learner inside this forward (DDP sees it).

        Returns: eval mode ``(B, D)``; train mode ``(logits (B, C), t (B, D))`` (always with
        ``visible``; else when ``loss == 'triplet'``) or ``logits``.
        """
        if x_view:
            images = self.make_x(images)
        if visible is not None:
            if not self.training:
                raise RuntimeError('XIVNet(visible=...) is the training step; call it in train '
                                   'mode')
            blocks = [images, self.make_x(visible), visible] if use_x else [images, visible]
            images = torch.cat(blocks)
        t = self.backbone(images)
        if t.dim() != 2:
            raise RuntimeError(f'the XIV backbone must return pooled (B, D) features, got '
                               f'{tuple(t.shape)}')
        if not self.training:
            return self.neck(t) if self.test_feature == 'bn' else t
        logits = self.classifier(self.neck(t))
        return (logits, t) if self.loss == 'triplet' or visible is not None else logits


# ---------------------------------------------------------------------------------------------
# Backbones and the model factory

def _resnet(arch: str) -> Callable[[bool], Tuple[nn.Module, int]]:
    def build(pretrained: bool) -> Tuple[nn.Module, int]:
        return pooled_backbone(torchreid_resnet(arch, last_stride=1, pretrained=pretrained))
    build.__name__ = f'{arch}_backbone'
    return build


def _densenet121(pretrained: bool) -> Tuple[nn.Module, int]:
    return pooled_backbone(torchreid_densenet121(pretrained=pretrained))


resnet50_backbone = _resnet('resnet50')
resnet18_backbone = _resnet('resnet18')

# name -> (backbone function, model factory), so registering the same backbone twice returns the
# same factory (torchreid_vi.registry treats re-registration of one object as a no-op).
_FACTORIES: Dict[str, Tuple[Callable, Callable]] = {}


def _default_model_options() -> dict:
    from ...config import get_default_config
    from .config import model_options
    return model_options(get_default_config())


def register_xiv_backbone(name: str, backbone_fn: Callable[[bool], Tuple[nn.Module, int]],
                          *, overwrite: bool = False) -> Callable:
    """Register ``xiv_<name>`` in torchreid's model factory.

    Args:
        name: backbone name; the model is registered as ``'xiv_' + name``.
        backbone_fn: ``backbone_fn(pretrained: bool) -> (module, feature_dim)`` where ``module``
            maps ``(B, 3, H, W)`` → ``(B, feature_dim)`` in train and eval mode; for a torchreid
            model use :func:`~torchreid_vi.modeling.backbones.pooled_backbone`, e.g.
            ``register_xiv_backbone('osnet', lambda p: pooled_backbone(
            tr.models.build_model('osnet_x1_0', 1, pretrained=p)))``.

    Returns: the factory ``fn(num_classes, loss='triplet', pretrained=True, use_gpu=True,
    **options)`` where ``options`` are :func:`~torchreid_vi.methods.xiv.config.model_options`
    (generator, test_feature, norm_mean, norm_std; defaults: the default config's).
    """
    from ...registry import register_model
    from .config import model_options

    model_name = name if name.startswith('xiv_') else f'xiv_{name}'
    cached = _FACTORIES.get(model_name)
    if cached is not None and not overwrite:
        if cached[0] is not backbone_fn:
            raise ValueError(f'XIV backbone "{model_name}" is already registered to a different '
                             f'backbone function (pass overwrite=True to replace it)')
        return register_model(model_name, cached[1], options=model_options)

    def factory(num_classes, loss='triplet', pretrained=True, use_gpu=True, **options):
        settings = _default_model_options()
        unknown = sorted(set(options) - set(settings))
        if unknown:
            raise TypeError(f'{model_name}() got unexpected options {unknown}; it takes '
                            f'num_classes, loss, pretrained, use_gpu, {", ".join(settings)}')
        settings.update(options)
        backbone, dim = backbone_fn(bool(pretrained))
        # torchreid's build_model passes cfg.loss.name; any name other than 'softmax' (e.g. the
        # engine's own) means "logits and features".
        return XIVNet(backbone, dim, num_classes,
                      loss='softmax' if loss == 'softmax' else 'triplet', **settings)

    factory.__name__ = model_name
    factory.__qualname__ = f'xiv_model_factory[{model_name}]'
    factory.__doc__ = f'XIV network on the "{name}" backbone (see torchreid_vi.methods.xiv).'
    _FACTORIES[model_name] = (backbone_fn, factory)
    return register_model(model_name, factory, options=model_options, overwrite=overwrite)


def _direct(name):
    def build(num_classes, loss='triplet', pretrained=True, use_gpu=True, **options) -> XIVNet:
        if name not in _FACTORIES:
            register_models()
        return _FACTORIES[name][1](num_classes, loss=loss, pretrained=pretrained,
                                   use_gpu=use_gpu, **options)
    build.__name__ = name
    build.__doc__ = f'Build ``{name}`` (same arguments as the registered factory).'
    return build


xiv_resnet50 = _direct('xiv_resnet50')
xiv_resnet18 = _direct('xiv_resnet18')
xiv_densenet121 = _direct('xiv_densenet121')


def register_models():
    """Register ``xiv_resnet50``, ``xiv_densenet121`` and ``xiv_resnet18`` (idempotent)."""
    register_xiv_backbone('resnet50', resnet50_backbone)
    register_xiv_backbone('densenet121', _densenet121)
    register_xiv_backbone('resnet18', resnet18_backbone)
