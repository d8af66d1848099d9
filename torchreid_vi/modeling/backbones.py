"""ImageNet backbones with their pretrained-weight metadata, and the one ImageNet loader.

Every method builds its network from these (timm's habit: the weights' metadata lives beside the
model, and loading fails loudly):

* :func:`torchreid_resnet` — torchreid's ResNet-18/50 (torchvision's maths: the stride of a
  Bottleneck sits on its 3×3 conv) with a configurable last stride (the re-ID "last stride 1"),
  torchreid's initialisation and, with ``pretrained=True``, torchvision's ImageNet-1k V1 weights;
* :func:`torchreid_densenet121` — torchreid's DenseNet-121 with torchvision's weights;
* :func:`pooled_backbone` — a torchreid classification model turned into a ``(B, 3, H, W) →
  (B, D)`` pooled-feature extractor (its classifier replaced by the identity);
* :func:`load_imagenet_weights` — downloads (or reads from the torch hub cache) the file named
  in :data:`IMAGENET_WEIGHTS` and copies it by name and shape; any backbone tensor left without
  a value is an error naming the file and the tensors.

Example::

    >>> import torch
    >>> from torchreid_vi.modeling.backbones import torchreid_resnet, pooled_backbone
    >>> net, dim = pooled_backbone(torchreid_resnet('resnet18', last_stride=1))
    >>> dim, tuple(net.eval()(torch.rand(2, 3, 64, 32)).shape)
    (512, (2, 512))
    >>> net.layer4[0].conv1.stride       # last stride 1: layer4 keeps layer3's resolution
    (1, 1)
"""
from __future__ import annotations

import logging
import re
from typing import Dict, NamedTuple, Tuple

from torch import nn

from .._torchreid import tr
from ..utils.state_dict import load_matching

__all__ = ['ImageNetWeights', 'IMAGENET_WEIGHTS', 'IMAGENET_MEAN', 'IMAGENET_STD',
           'load_imagenet_weights', 'torchreid_resnet', 'torchreid_densenet121', 'pooled_backbone',
           'RESNET_LAYERS']

logger = logging.getLogger(__name__)


class ImageNetWeights(NamedTuple):
    url: str
    description: str


# The normalisation every ImageNet backbone (and every reference VI-ReID code) expects.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGENET_WEIGHTS: Dict[str, ImageNetWeights] = {
    'resnet50': ImageNetWeights('https://download.pytorch.org/models/resnet50-19c8e357.pth',
                                'resnet50 (torchvision ImageNet-1k V1)'),
    'resnet18': ImageNetWeights('https://download.pytorch.org/models/resnet18-5c106cde.pth',
                                'resnet18 (torchvision ImageNet-1k)'),
    'densenet121': ImageNetWeights('https://download.pytorch.org/models/densenet121-a639ec97.pth',
                                   'densenet121 (torchvision ImageNet-1k)'),
}
# arch -> (torchreid block class name, blocks per stage)
RESNET_LAYERS = {'resnet50': ('Bottleneck', (3, 4, 6, 3)), 'resnet18': ('BasicBlock', (2, 2, 2, 2))}
# Heads of the classification models: never part of the ImageNet transfer.
_HEAD_PREFIXES = ('classifier.', 'fc.')

_DENSENET_OLD_KEY = re.compile(  # old torchvision names: 'denselayer1.norm.1.weight'
    r'^(.*denselayer\d+\.(?:norm|relu|conv))\.'
    r'((?:[12])\.(?:weight|bias|running_mean|running_var))$')


def _rename_old_densenet_key(key: str) -> str:
    m = _DENSENET_OLD_KEY.match(key)
    return m.group(1) + m.group(2) if m else key


def load_imagenet_weights(model: nn.Module, arch: str) -> int:
    """Copy the ImageNet weights of ``arch`` into ``model`` (by name and shape).

    Raises:
        PretrainedWeightsUnavailable: the file is neither cached nor downloadable (offline); the
            message says where to put it and how to run without it.
        RuntimeError: a backbone tensor of ``model`` (anything but the classifier) found no
            matching entry in the file: wrong file for this architecture.

    Returns: the number of tensors loaded.
    """
    from .. import pretrained  # looked up at call time: tests and mirrors substitute the loader
    weights = IMAGENET_WEIGHTS[arch]
    state = pretrained.load_imagenet_state_dict(weights.url, weights.description)
    report = load_matching(model, state, rename=_rename_old_densenet_key)
    missing = [k for k in report.missing if not k.startswith(_HEAD_PREFIXES)]
    if missing:
        raise RuntimeError(
            f'ImageNet weights of {weights.description} ({weights.url}): {len(missing)} backbone '
            f'tensors found no entry of the same name and shape (first: {missing[:4]}); wrong '
            f'file for this architecture?')
    logger.info('loaded %d ImageNet tensors of %s', len(report.loaded), weights.description)
    return len(report.loaded)


def torchreid_resnet(arch: str = 'resnet50', num_classes: int = 1, loss: str = 'softmax',
                     last_stride: int = 1, pretrained: bool = False) -> nn.Module:
    """torchreid's ``ResNet`` of ``arch`` (``'resnet50'`` or ``'resnet18'``).

    Args:
        num_classes, loss: torchreid's classifier width and train-mode output convention.
        last_stride: stride of layer4 (1: the re-ID convention, 2: ImageNet's).
        pretrained: load torchvision's ImageNet weights (:func:`load_imagenet_weights`).
    """
    if arch not in RESNET_LAYERS:
        raise ValueError(f'backbone arch must be one of {sorted(RESNET_LAYERS)}, got {arch!r}')
    resnet = tr.module('models.resnet')
    block, layers = RESNET_LAYERS[arch]
    model = resnet.ResNet(num_classes=num_classes, loss=loss, block=getattr(resnet, block),
                          layers=list(layers), last_stride=last_stride, fc_dims=None)
    if pretrained:
        load_imagenet_weights(model, arch)
    return model


def torchreid_densenet121(num_classes: int = 1, loss: str = 'softmax',
                          pretrained: bool = False) -> nn.Module:
    """torchreid's DenseNet-121 (1024-d pooled feature), optionally with ImageNet weights."""
    densenet = tr.module('models.densenet')
    model = densenet.DenseNet(num_classes=num_classes, loss=loss, num_init_features=64,
                              growth_rate=32, block_config=(6, 12, 24, 16), fc_dims=None,
                              dropout_p=None)
    if pretrained:
        load_imagenet_weights(model, 'densenet121')
    return model


def pooled_backbone(model: nn.Module) -> Tuple[nn.Module, int]:
    """Turn a torchreid classification model into a pooled-feature backbone.

    torchreid models (ResNet, DenseNet, OSNet, ...) return the pooled vector ``v`` in eval mode and
    ``classifier(v)`` in train mode with ``loss='softmax'``; replacing ``classifier`` by the
    identity makes them return ``v`` in both modes. Returns ``(model, feature_dim)``.
    """
    if not hasattr(model, 'classifier') or not hasattr(model, 'feature_dim'):
        raise TypeError(f'{type(model).__name__} has no .classifier/.feature_dim; wrap it in a '
                        f'module that returns pooled (B, D) features instead')
    model.classifier = nn.Identity()
    model.loss = 'softmax'
    return model, int(model.feature_dim)
