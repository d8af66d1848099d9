"""XIV network (Li, Wei, Hong, Gong, "Infrared-Visible Cross-Modal Person Re-Identification with an
X Modality", AAAI 2020): an X generator ``g`` in front of a "bag of tricks" feature learner ``f``.

Structure (spec ``xiv.md`` §2–3)::

    visible V ─ g (1×1 conv 3→1, ReLU, 1×1 conv 1→3) ─ X
    [I, X, V] ─ backbone (shared, last stride 1) ─ pooled t (B, D) ─ BNNeck ─ b ─ classifier

* ``g`` has 10 parameters and no spatial mixing; fixed alternatives of the paper's Table 5
  (``mean``, ``gray``, ``hsv_v``, ``ycbcr_y``) replace it without changing the parameter set, so
  a state dict loads whatever the generator kind.
* Any torchreid backbone whose ``forward`` ends in a pooled vector and which keeps its classifier
  in ``.classifier`` can be wrapped (:func:`torchreid_backbone`); :func:`register_xiv_backbone`
  registers ``xiv_<name>`` in torchreid's model factory in one line.
* **Train mode**: ``model(images)`` returns ``(logits, t)`` when ``model.loss == 'triplet'``
  (torchreid's convention, what the XIV engine uses) and ``logits`` when ``'softmax'``.
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
    >>> from torchreid_vi.models.xiv import xiv_resnet18
    >>> net = xiv_resnet18(num_classes=4, pretrained=False).eval()
    >>> images = torch.rand(2, 3, 64, 32)
    >>> tuple(net(images).shape), tuple(net(images, x_view=True).shape)
    ((2, 512), (2, 512))
    >>> sum(p.numel() for p in net.generator.parameters())
    10
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import nn

from .._torchreid import tr
from .layers import BNNeck

__all__ = [
    'GENERATOR_KINDS', 'TEST_FEATURES', 'IMAGENET_MEAN', 'IMAGENET_STD',
    'XGenerator', 'XIVNet', 'torchreid_backbone', 'register_xiv_backbone', 'register_models',
    'xiv_resnet50', 'xiv_resnet18', 'xiv_densenet121', 'load_matching_weights',
]

logger = logging.getLogger(__name__)

GENERATOR_KINDS = ('learned', 'mean', 'gray', 'hsv_v', 'ycbcr_y', 'none')
TEST_FEATURES = ('bn', 'pre_bn')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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
            mode (e.g. :func:`torchreid_backbone`).
        feature_dim: D, the backbone's pooled dimension.
        num_classes: training identities (the classifier's outputs).
        loss: ``'triplet'`` (train mode returns ``(logits, t)``) or ``'softmax'`` (``logits``).
        generator: see :class:`XGenerator`.
        test_feature: ``'bn'`` (BNNeck output, default) or ``'pre_bn'`` (``t``) in eval mode.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int,
                 loss: str = 'triplet', generator: str = 'learned', test_feature: str = 'bn'):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f'XIVNet needs num_classes >= 1, got {num_classes}')
        self.generator = XGenerator(generator)
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

    @property
    def has_x(self) -> bool:
        """False when the generator kind is ``'none'`` (no X modality)."""
        return self.generator.kind != 'none'

    def make_x(self, visible: torch.Tensor) -> torch.Tensor:
        """X images ``g(V)``: ``(B, 3, H, W)`` normalised → ``(B, 3, H, W)`` normalised."""
        return self.generator(visible)

    def forward(self, images: torch.Tensor, x_view: bool = False):
        """Args:
            images: ``(B, 3, H, W)`` normalised images.
            x_view: pass the images through the generator first (features of ``g(images)``).

        Returns: eval mode ``(B, D)``; train mode ``(logits (B, C), t (B, D))`` or ``logits``.
        """
        if x_view:
            images = self.make_x(images)
        t = self.backbone(images)
        if t.dim() != 2:
            raise RuntimeError(f'the XIV backbone must return pooled (B, D) features, got '
                               f'{tuple(t.shape)}')
        if not self.training:
            return self.neck(t) if self._test_feature == 'bn' else t
        logits = self.classifier(self.neck(t))
        return (logits, t) if self._loss == 'triplet' else logits


# ---------------------------------------------------------------------------------------------
# Backbones


def torchreid_backbone(model: nn.Module) -> Tuple[nn.Module, int]:
    """Turn a torchreid classification model into a pooled-feature backbone.

    torchreid models (ResNet, DenseNet, OSNet, ...) return the pooled vector ``v`` in eval mode and
    ``classifier(v)`` in train mode with ``loss='softmax'``; replacing ``classifier`` by identity
    makes them return ``v`` in both modes. Returns ``(model, model.feature_dim)``.
    """
    if not hasattr(model, 'classifier') or not hasattr(model, 'feature_dim'):
        raise TypeError(f'{type(model).__name__} has no .classifier/.feature_dim; wrap it in a '
                        f'module that returns pooled (B, D) features instead')
    model.classifier = nn.Identity()
    model.loss = 'softmax'
    return model, int(model.feature_dim)


_DENSENET_OLD_KEY = re.compile(  # old torchvision names: 'denselayer1.norm.1.weight'
    r'^(.*denselayer\d+\.(?:norm|relu|conv))\.'
    r'((?:[12])\.(?:weight|bias|running_mean|running_var))$')


def load_matching_weights(module: nn.Module, state_dict: Dict[str, torch.Tensor], what: str,
                          min_fraction: float = 0.9) -> int:
    """Copy the entries of ``state_dict`` whose name and shape match ``module``'s.

    Old torchvision DenseNet keys (``denselayer1.norm.1.weight``) are renamed first. Raises
    ``RuntimeError`` when fewer than ``min_fraction`` of the module's tensors were found (wrong
    file for this architecture). Returns the number of tensors loaded.
    """
    renamed = {}
    for key, value in state_dict.items():
        m = _DENSENET_OLD_KEY.match(key)
        renamed[m.group(1) + m.group(2) if m else key] = value
    own = module.state_dict()
    matched = {k: v for k, v in renamed.items() if k in own and own[k].shape == v.shape}
    wanted = [k for k in own if not k.endswith('num_batches_tracked')]
    found = sum(k in matched for k in wanted)
    if found < min_fraction * len(wanted):
        raise RuntimeError(f'ImageNet weights of {what}: only {found} of {len(wanted)} tensors '
                           f'match the backbone by name and shape; wrong file for this '
                           f'architecture?')
    module.load_state_dict(matched, strict=False)
    logger.info('loaded %d/%d ImageNet tensors of %s', found, len(wanted), what)
    return found


def _resnet_backbone(block: str, layers: Sequence[int], url_name: str, what: str):
    def build(pretrained: bool) -> Tuple[nn.Module, int]:
        resnet = tr.module('models.resnet')
        model = resnet.ResNet(num_classes=1, loss='softmax', block=getattr(resnet, block),
                              layers=list(layers), last_stride=1, fc_dims=None)
        if pretrained:
            from .. import pretrained as weights
            load_matching_weights(model, weights.load_imagenet_state_dict(
                getattr(weights, url_name), what), what)
        return torchreid_backbone(model)
    return build


def _densenet121_backbone(pretrained: bool) -> Tuple[nn.Module, int]:
    densenet = tr.module('models.densenet')
    model = densenet.DenseNet(num_classes=1, loss='softmax', num_init_features=64, growth_rate=32,
                              block_config=(6, 12, 24, 16), fc_dims=None, dropout_p=None)
    if pretrained:
        from .. import pretrained as weights
        what = 'densenet121 (torchvision)'
        load_matching_weights(model, weights.load_imagenet_state_dict(
            weights.DENSENET121_URL, what), what)
    return torchreid_backbone(model)


resnet50_backbone = _resnet_backbone('Bottleneck', (3, 4, 6, 3), 'RESNET50_V1_URL',
                                     'resnet50 (torchvision V1)')
resnet18_backbone = _resnet_backbone('BasicBlock', (2, 2, 2, 2), 'RESNET18_URL',
                                     'resnet18 (torchvision)')

# name -> model factory, so registering the same backbone twice returns the same object
# (torchreid_vi.registry treats re-registration of an identical object as a no-op).
_FACTORIES: Dict[str, Tuple[Callable, Callable]] = {}


def register_xiv_backbone(name: str, backbone_fn: Callable[[bool], Tuple[nn.Module, int]],
                          *, overwrite: bool = False) -> Callable:
    """Register ``xiv_<name>`` in torchreid's model factory.

    Args:
        name: backbone name; the model is registered as ``'xiv_' + name``.
        backbone_fn: ``backbone_fn(pretrained: bool) -> (module, feature_dim)`` where ``module``
            maps ``(B, 3, H, W)`` → ``(B, feature_dim)`` in train and eval mode; for a torchreid
            model use :func:`torchreid_backbone`, e.g.
            ``register_xiv_backbone('osnet', lambda p: torchreid_backbone(
            tr.models.build_model('osnet_x1_0', 1, pretrained=p)))``.

    Returns: the factory ``fn(num_classes, loss='triplet', pretrained=True, use_gpu=True,
    generator='learned', test_feature='bn')``.
    """
    from ..registry import register_model

    model_name = name if name.startswith('xiv_') else f'xiv_{name}'
    cached = _FACTORIES.get(model_name)
    if cached is not None and not overwrite:
        if cached[0] is not backbone_fn:
            raise ValueError(f'XIV backbone "{model_name}" is already registered to a different '
                             f'backbone function (pass overwrite=True to replace it)')
        return register_model(model_name, cached[1])

    def factory(num_classes, loss='triplet', pretrained=True, use_gpu=True,
                generator='learned', test_feature='bn', **unknown):
        if unknown:
            raise TypeError(f'{model_name}() got unexpected options {sorted(unknown)}; it takes '
                            f'num_classes, loss, pretrained, use_gpu, generator, test_feature')
        backbone, dim = backbone_fn(bool(pretrained))
        # torchreid's build_model passes cfg.loss.name; any name other than 'softmax' (e.g. the
        # engine's own) means "logits and features", which is what the XIV engine needs.
        return XIVNet(backbone, dim, num_classes, loss='softmax' if loss == 'softmax'
                      else 'triplet', generator=generator, test_feature=test_feature)

    factory.__name__ = model_name
    factory.__qualname__ = f'xiv_model_factory[{model_name}]'
    factory.__doc__ = f'XIV network on the "{name}" backbone (see torchreid_vi.models.xiv).'
    _FACTORIES[model_name] = (backbone_fn, factory)
    return register_model(model_name, factory, overwrite=overwrite)


def _direct(backbone_fn, name):
    def build(num_classes, loss='triplet', pretrained=True, use_gpu=True, **kwargs) -> XIVNet:
        if name not in _FACTORIES:
            register_models()
        return _FACTORIES[name][1](num_classes, loss=loss, pretrained=pretrained,
                                   use_gpu=use_gpu, **kwargs)
    build.__name__ = name
    build.__doc__ = f'Build ``{name}`` (same arguments as the registered factory).'
    return build


xiv_resnet50 = _direct(resnet50_backbone, 'xiv_resnet50')
xiv_resnet18 = _direct(resnet18_backbone, 'xiv_resnet18')
xiv_densenet121 = _direct(_densenet121_backbone, 'xiv_densenet121')


def register_models():
    """Register ``xiv_resnet50``, ``xiv_densenet121`` and ``xiv_resnet18`` (idempotent)."""
    register_xiv_backbone('resnet50', resnet50_backbone)
    register_xiv_backbone('densenet121', _densenet121_backbone)
    register_xiv_backbone('resnet18', resnet18_backbone)
