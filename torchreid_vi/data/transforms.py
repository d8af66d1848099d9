"""Named train augmentations for ``data.transforms``, with a registry for plugins.

torchreid's ``build_transforms`` knows a fixed set of names, applies them in a fixed order and
silently ignores any other name, so a typo (or an augmentation it does not have, such as the
released IDKL pipeline's padded crop) trains without the augmentation. Here every augmentation is
a **registered, named** transform; unknown or repeated names are an error.

Registered names (``list_transforms()``), each with its stage:

========================  ======  =======================================================
name                      stage   what it does (H×W = ``height``×``width``)
========================  ======  =======================================================
``random_flip``           pil     torchreid's: ``RandomHorizontalFlip(p=0.5)``
``random_crop``           pil     torchreid's ``Random2DTranslation(H, W)``: with p 0.5
                                  resize to round(1.125·H)×round(1.125·W) and crop H×W
                                  at a random offset, else resize to H×W
``random_patch``          pil     torchreid's ``RandomPatch()`` (patch pool, paste p 0.5
                                  once 100 patches are pooled)
``color_jitter``          pil     torchreid's: ``ColorJitter(brightness=0.2,
                                  contrast=0.15, saturation=0, hue=0)``
``random_erase``          tensor  torchreid's Zhong-style ``RandomErasing(mean=norm_mean)``:
                                  p 0.5, area 0.02-0.4, aspect 0.3-1/0.3, the rectangle
                                  filled with the *raw* ``norm_mean`` values
``pad_crop``              pil     released IDKL: ``Pad(10, fill=127)`` (constant grey, all
                                  four sides) then ``RandomCrop((H, W))``
``pad_crop_zero``         pil     the strong baseline (Luo et al.; XIV): ``Pad(10, fill=0)``
                                  then ``RandomCrop((H, W))``
``tv_random_erasing``     tensor  released IDKL: torchvision ``RandomErasing(p=0.5,
                                  scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)``
========================  ======  =======================================================

The released IDKL train pipeline is ``['random_flip', 'pad_crop', 'tv_random_erasing']``; the
strong baseline's (XIV's configs) ``['random_flip', 'pad_crop_zero', 'random_erase']``.
``random_crop``/``random_erase`` are *not* equivalent to ``pad_crop``/``tv_random_erasing``
(other crop geometry, other erasing area and fill).

Stages: ``'pil'`` transforms act on the PIL image after ``Resize((H, W))`` and before
``ToTensor``; ``'tensor'`` transforms act on the (3, H, W) float tensor after ``Normalize``.

Example::

    >>> from PIL import Image
    >>> from torchreid_vi.data.transforms import build_transforms
    >>> train, test = build_transforms(256, 128, ['random_flip', 'pad_crop', 'tv_random_erasing'])
    >>> tuple(train(Image.new('RGB', (64, 128))).shape)
    (3, 256, 128)
    >>> build_transforms(256, 128, ['random_flip', 'random_erasing'])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: data.transforms: unknown transform 'random_erasing' (did you mean \
'tv_random_erasing' or 'random_erase'?); registered transforms: color_jitter, pad_crop, ...
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torchvision.transforms as T

from .._torchreid import tr
from ..modeling.backbones import IMAGENET_MEAN, IMAGENET_STD
from ..registry import Registry, _same_definition

__all__ = ['STAGES', 'TransformSpec', 'TRANSFORMS', 'register_transform', 'list_transforms',
           'build_transforms']

logger = logging.getLogger(__name__)

STAGES = ('pil', 'tensor')

# factory(height, width, norm_mean, norm_std) -> callable transform
Factory = Callable[[int, int, Sequence[float], Sequence[float]], Callable]


@dataclass(frozen=True)
class TransformSpec:
    """A registered transform: its ``stage`` (``'pil'`` | ``'tensor'``) and ``factory``."""
    name: str
    stage: str
    factory: Factory

    def same_as(self, other: 'TransformSpec') -> bool:
        return self.stage == other.stage and (
            self.factory is other.factory or _same_definition(self.factory, other.factory))


TRANSFORMS = Registry('transform')


def register_transform(name: str, stage: str, factory: Factory, *,
                       overwrite: bool = False) -> TransformSpec:
    """Make ``name`` usable in ``data.transforms``.

    Args:
        name: lower-case name (config names are lower-cased, as torchreid does).
        stage: ``'pil'`` (PIL image → PIL image, between ``Resize`` and ``ToTensor``) or
            ``'tensor'`` ((3, H, W) float tensor → same, after ``Normalize``).
        factory: ``factory(height, width, norm_mean, norm_std)`` returning the transform; called
            once per ``build_transforms`` call, so stateful transforms get a fresh instance.
        overwrite: replace an existing, different registration on purpose.

    Registering the same stage and factory again is a no-op; a different one under a taken name
    raises ``ValueError`` unless ``overwrite``.

    >>> from torchreid_vi.data.transforms import register_transform, list_transforms
    >>> def invert(height, width, norm_mean, norm_std):
    ...     return lambda x: -x
    >>> _ = register_transform('invert', 'tensor', invert)
    >>> _ = register_transform('invert', 'tensor', invert)      # idempotent
    >>> 'invert' in list_transforms()
    True
    """
    if not isinstance(name, str) or not name or name != name.lower() or name != name.strip():
        raise ValueError(f'transform name must be a non-empty lower-case string without '
                         f'surrounding spaces (config names are lower-cased), got {name!r}')
    if stage not in STAGES:
        raise ValueError(f'transform "{name}": stage={stage!r}; expected one of {STAGES} '
                         f'(pil: before ToTensor; tensor: after Normalize)')
    if not callable(factory):
        raise ValueError(f'transform "{name}": factory {factory!r} is not callable')
    spec = TransformSpec(name, stage, factory)
    if name in TRANSFORMS and not overwrite:
        old = TRANSFORMS.get(name)
        if old.same_as(spec):
            return old
        # Registry's own message would only name the TransformSpec class; say what differs.
        raise ValueError(
            f'transform "{name}" is already registered (stage {old.stage}, factory '
            f'{_qualified(old.factory)}); refusing to replace it with stage {stage}, factory '
            f'{_qualified(factory)} (pass overwrite=True to replace it on purpose)')
    return TRANSFORMS.register(name, spec, overwrite=True)


def list_transforms() -> List[str]:
    """Sorted names usable in ``data.transforms``."""
    return TRANSFORMS.names()


def _qualified(obj) -> str:
    return f'{getattr(obj, "__module__", "?")}.{getattr(obj, "__qualname__", repr(obj))}'


# --- built-in factories: module-level functions so re-imports register idempotently ------------
def _random_flip(height, width, norm_mean, norm_std):
    """torchreid's random_flip: RandomHorizontalFlip(p=0.5)."""
    return tr.data.transforms.RandomHorizontalFlip()


def _random_crop(height, width, norm_mean, norm_std):
    """torchreid's random_crop: Random2DTranslation (p 0.5, enlarge ×1.125, crop H×W)."""
    return tr.data.transforms.Random2DTranslation(height, width)


def _random_patch(height, width, norm_mean, norm_std):
    """torchreid's random_patch: RandomPatch() with its default pool and probabilities."""
    return tr.data.transforms.RandomPatch()


def _color_jitter(height, width, norm_mean, norm_std):
    """torchreid's color_jitter: ColorJitter(brightness=0.2, contrast=0.15)."""
    return tr.data.transforms.ColorJitter(brightness=0.2, contrast=0.15, saturation=0, hue=0)


def _random_erase(height, width, norm_mean, norm_std):
    """torchreid's random_erase: Zhong-style erasing filled with the raw norm_mean values."""
    return tr.data.transforms.RandomErasing(mean=norm_mean)


def _pad_crop(height, width, norm_mean, norm_std):
    """Released IDKL: Pad(10, fill=127) then RandomCrop((H, W))."""
    return T.Compose([T.Pad(10, fill=127), T.RandomCrop((height, width))])


def _pad_crop_zero(height, width, norm_mean, norm_std):
    """The "bag of tricks" strong baseline (XIV's learner): Pad(10) with black,
    RandomCrop((H, W))."""
    return T.Compose([T.Pad(10, fill=0), T.RandomCrop((height, width))])


def _tv_random_erasing(height, width, norm_mean, norm_std):
    """Released IDKL: torchvision RandomErasing(p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3),
    value=0) on the normalised tensor."""
    return T.RandomErasing(p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)


for _name, _stage, _factory in (
        ('random_flip', 'pil', _random_flip),
        ('random_crop', 'pil', _random_crop),
        ('random_patch', 'pil', _random_patch),
        ('color_jitter', 'pil', _color_jitter),
        ('random_erase', 'tensor', _random_erase),
        ('pad_crop', 'pil', _pad_crop),
        ('pad_crop_zero', 'pil', _pad_crop_zero),
        ('tv_random_erasing', 'tensor', _tv_random_erasing)):
    register_transform(_name, _stage, _factory)


def _names(transforms) -> List[str]:
    if transforms is None:
        return []
    if isinstance(transforms, str):
        transforms = [transforms]
    if not isinstance(transforms, (list, tuple)) or not all(isinstance(t, str) for t in transforms):
        raise ValueError(f'data.transforms must be a list of transform names, got {transforms!r}; '
                         f'registered transforms: {", ".join(list_transforms())}')
    names = [t.lower() for t in transforms]
    for i, name in enumerate(names):
        if name not in TRANSFORMS:
            close = difflib.get_close_matches(name, list_transforms(), n=2, cutoff=0.6)
            hint = f' (did you mean {" or ".join(map(repr, close))}?)' if close else ''
            raise ValueError(f'data.transforms: unknown transform {transforms[i]!r}{hint}; '
                             f'registered transforms: {", ".join(list_transforms())}')
        if name in names[:i]:
            raise ValueError(f'data.transforms lists {name!r} twice ({list(transforms)!r}); '
                             f'each transform may appear once')
    return names


def build_transforms(height: int, width: int,
                     transforms: Union[str, Sequence[str], None] = 'random_flip',
                     norm_mean: Optional[Sequence[float]] = None,
                     norm_std: Optional[Sequence[float]] = None) -> Tuple[T.Compose, T.Compose]:
    """Train and test transforms, a drop-in for torchreid's ``build_transforms``.

    Train: ``Resize((height, width))`` → the ``'pil'``-stage names in the order given →
    ``ToTensor`` → ``Normalize(norm_mean, norm_std)`` → the ``'tensor'``-stage names in the order
    given. Test: ``Resize((height, width))`` → ``ToTensor`` → ``Normalize``. Both map a PIL RGB
    image to a float tensor of shape (3, height, width).

    Unlike torchreid's builder: names keep the order given within each stage (torchreid uses a
    fixed order: flip, crop, patch, jitter); unknown and repeated names raise ``ValueError``
    (torchreid ignores unknown names). As in torchreid, names are lower-cased, a single string is
    one name, ``None`` means no augmentation, and ``norm_mean``/``norm_std`` of ``None`` mean
    ImageNet's.

    Args:
        height, width: output size in pixels.
        transforms: ``data.transforms``, names from :func:`list_transforms`.
        norm_mean, norm_std: per-channel normalisation (3 floats each).

    Returns:
        ``(train_transform, test_transform)``.

    Raises:
        ValueError: an unknown or repeated name (the message lists the registered names).
    """
    names = _names(transforms)
    if norm_mean is None or norm_std is None:
        norm_mean, norm_std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    specs = [TRANSFORMS.get(n) for n in names]
    pil = [s for s in specs if s.stage == 'pil']
    tensor = [s for s in specs if s.stage == 'tensor']

    def make(group):
        return [s.factory(height, width, norm_mean, norm_std) for s in group]

    train = T.Compose([T.Resize((height, width)), *make(pil), T.ToTensor(),
                       T.Normalize(mean=norm_mean, std=norm_std), *make(tensor)])
    test = T.Compose([T.Resize((height, width)), T.ToTensor(),
                      T.Normalize(mean=norm_mean, std=norm_std)])
    logger.info('train transforms: resize %dx%d%s, to tensor, normalize (mean=%s, std=%s)%s',
                height, width, ''.join(f', {s.name}' for s in pil), list(norm_mean),
                list(norm_std), ''.join(f', {s.name}' for s in tensor))
    return train, test
