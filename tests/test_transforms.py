"""Named transforms: the released-IDKL pipeline, torchreid's names, order, errors, plugins.

Every expectation is a pipeline built by hand from torchvision / torchreid classes, run on the same
images with torch and python ``random`` seeded identically before each call.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from torchreid_vi._torchreid import tr
from torchreid_vi.data import transforms as tfm
from torchreid_vi.data.transforms import build_transforms, list_transforms, register_transform

H, W = 48, 24
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
OTHER_MEAN, OTHER_STD = [0.3, 0.5, 0.7], [0.2, 0.25, 0.3]
TORCHREID_NAMES = ['random_flip', 'random_crop', 'random_patch', 'color_jitter', 'random_erase']


def images(n, seed=0):
    """``n`` random RGB images of varied sizes (not H×W, so Resize matters)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (rng.integers(30, 90), rng.integers(15, 45), 3),
                                         dtype=np.uint8))
            for _ in range(n)]


def seeded(fn, img, seed):
    random.seed(seed)
    torch.manual_seed(seed)
    return fn(img)


def idkl_reference(mean=MEAN, std=STD):
    return T.Compose([T.Resize((H, W)), T.RandomHorizontalFlip(), T.Pad(10, fill=127),
                      T.RandomCrop((H, W)), T.ToTensor(), T.Normalize(mean, std),
                      T.RandomErasing(p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)])


def test_idkl_pipeline_equals_torchvision_composition_and_every_branch_occurs():
    ours, _ = build_transforms(H, W, ['random_flip', 'pad_crop', 'tv_random_erasing'], MEAN, STD)
    ref = idkl_reference()
    events = {'flip': 0, 'no_flip': 0, 'off_centre_crop': 0, 'erased': 0, 'not_erased': 0}
    for seed, img in enumerate(images(80)):
        out = seeded(ours, img, seed)
        assert torch.equal(out, seeded(ref, img, seed)), seed
        # Re-run the reference step by step with the same seed to see which branches fired.
        random.seed(seed)
        torch.manual_seed(seed)
        x = img
        steps = [x]
        for t in ref.transforms:
            x = t(x)
            steps.append(x)
        resized, flipped, padded, cropped, _, normed, erased = steps[1:]
        events['flip' if np.array_equal(np.asarray(flipped),
                                        np.asarray(resized)[:, ::-1]) else 'no_flip'] += 1
        centre = padded.crop((10, 10, 10 + W, 10 + H))
        if not np.array_equal(np.asarray(cropped), np.asarray(centre)):
            events['off_centre_crop'] += 1
        events['erased' if not torch.equal(erased, normed) else 'not_erased'] += 1
    assert min(events.values()) >= 10, events


def test_strong_baseline_pad_crop_pads_with_black_then_crops():
    ours, _ = build_transforms(H, W, ['random_flip', 'pad_crop_zero'], MEAN, STD)
    ref = T.Compose([T.Resize((H, W)), T.RandomHorizontalFlip(), T.Pad(10, fill=0),
                     T.RandomCrop((H, W)), T.ToTensor(), T.Normalize(MEAN, STD)])
    for seed, img in enumerate(images(30)):
        assert torch.equal(seeded(ours, img, seed), seeded(ref, img, seed)), seed
    # a white image shows the black border wherever the crop is off centre
    black = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    saw_border = False
    for seed in range(20):
        out = seeded(ours, Image.new('RGB', (W, H), (255, 255, 255)), seed)
        saw_border |= bool(((out.permute(1, 2, 0) - black).abs().max(-1).values < 1e-6).any())
    assert saw_border


def test_idkl_pipeline_pads_with_grey_and_erases_with_zero_after_normalize():
    # A black image: grey 127 padding and the zero-valued erasing are both visible in the output.
    ours, _ = build_transforms(H, W, ['pad_crop', 'tv_random_erasing'], MEAN, STD)
    grey = (127 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    black = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    saw_pad = saw_erase = False
    for seed in range(40):
        out = seeded(ours, Image.new('RGB', (W, H)), seed)
        pixels = out.permute(1, 2, 0).reshape(-1, 3)
        known = ((pixels - grey).abs().max(1).values < 1e-6) | \
                ((pixels - black).abs().max(1).values < 1e-6) | (pixels.abs().max(1).values == 0)
        assert known.all()
        saw_pad |= bool(((pixels - grey).abs().max(1).values < 1e-6).any())
        saw_erase |= bool((pixels.abs().max(1).values == 0).any())
    assert saw_pad and saw_erase


@pytest.mark.parametrize('mean,std', [(MEAN, STD), (OTHER_MEAN, OTHER_STD), (None, None)])
def test_test_transform_is_resize_to_tensor_normalize(mean, std):
    _, test = build_transforms(H, W, ['random_flip', 'pad_crop', 'tv_random_erasing'], mean, std)
    ref = T.Compose([T.Resize((H, W)), T.ToTensor(), T.Normalize(mean or MEAN, std or STD)])
    for seed, img in enumerate(images(10)):
        out = seeded(test, img, seed)
        assert out.shape == (3, H, W)
        assert torch.equal(out, ref(img))


@pytest.mark.parametrize('names', [[n] for n in TORCHREID_NAMES] + [
    ['random_flip', 'random_crop', 'random_erase'], TORCHREID_NAMES, []])
@pytest.mark.parametrize('mean,std', [(MEAN, STD), (OTHER_MEAN, OTHER_STD)])
def test_torchreid_names_match_torchreid_build_transforms(names, mean, std, capsys):
    ours_tr, ours_te = build_transforms(H, W, names, mean, std)
    ref_tr, ref_te = tr.data.transforms.build_transforms(H, W, transforms=list(names),
                                                         norm_mean=mean, norm_std=std)
    capsys.readouterr()  # torchreid prints its steps
    # random_patch only pastes once its pool holds 100 patches: feed one long sequence.
    n = 130 if 'random_patch' in names else 40
    for seed, img in enumerate(images(n, seed=1)):
        assert torch.equal(seeded(ours_tr, img, seed), seeded(ref_tr, img, seed)), seed
        assert torch.equal(ours_te(img), ref_te(img))
    if 'random_patch' in names:
        pool = next(t for t in ours_tr.transforms
                    if isinstance(t, tr.data.transforms.RandomPatch)).patchpool
        assert len(pool) >= 100  # pasting was live for the last images


def test_torchreid_random_erase_differs_from_tv_random_erasing():
    a, _ = build_transforms(H, W, ['random_erase'])
    b, _ = build_transforms(H, W, ['tv_random_erasing'])
    assert any(not torch.equal(seeded(a, img, s), seeded(b, img, s))
               for s, img in enumerate(images(20)))


@pytest.mark.parametrize('names,steps', [
    (['pad_crop', 'random_flip'], ['pad', 'crop', 'flip']),
    (['random_flip', 'pad_crop'], ['flip', 'pad', 'crop']),
    # tensor-stage names go after Normalize wherever they are listed, in their own order
    (['tv_random_erasing', 'random_flip', 'random_erase'], ['flip', '|', 'tv_erase', 'tr_erase']),
    (['random_erase', 'color_jitter', 'tv_random_erasing'],
     ['jitter', '|', 'tr_erase', 'tv_erase']),
])
def test_order_within_each_stage_is_respected(names, steps):
    parts = {'pad': lambda: T.Pad(10, fill=127), 'crop': lambda: T.RandomCrop((H, W)),
             'flip': T.RandomHorizontalFlip,
             'jitter': lambda: T.ColorJitter(brightness=0.2, contrast=0.15, saturation=0, hue=0),
             'tv_erase': lambda: T.RandomErasing(p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3),
                                                 value=0),
             'tr_erase': lambda: tr.data.transforms.RandomErasing(mean=MEAN),
             '|': lambda: T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])}
    if '|' not in steps:
        steps = steps + ['|']
    ref = T.Compose([T.Resize((H, W))] + [parts[s]() for s in steps])
    ours, _ = build_transforms(H, W, names)
    for seed, img in enumerate(images(40)):
        assert torch.equal(seeded(ours, img, seed), seeded(ref, img, seed)), seed


def test_different_orders_give_different_outputs():
    a, _ = build_transforms(H, W, ['pad_crop', 'random_flip'])
    b, _ = build_transforms(H, W, ['random_flip', 'pad_crop'])
    assert any(not torch.equal(seeded(a, img, s), seeded(b, img, s))
               for s, img in enumerate(images(20)))


def test_names_are_case_insensitive_and_a_string_is_one_name_like_torchreid():
    a, _ = build_transforms(H, W, ['Random_Flip', 'PAD_CROP'])
    b, _ = build_transforms(H, W, ['random_flip', 'pad_crop'])
    c, _ = build_transforms(H, W, 'random_flip')
    d = T.Compose([T.Resize((H, W)), T.RandomHorizontalFlip(), T.ToTensor(),
                   T.Normalize(MEAN, STD)])
    for s, img in enumerate(images(10)):
        assert torch.equal(seeded(a, img, s), seeded(b, img, s))
        assert torch.equal(seeded(c, img, s), seeded(d, img, s))
    none, _ = build_transforms(H, W, None)
    assert torch.equal(none(images(1)[0]), T.Compose([T.Resize((H, W)), T.ToTensor(),
                                                      T.Normalize(MEAN, STD)])(images(1)[0]))


EXPECTED_BUILTINS = {'random_flip', 'random_crop', 'random_patch', 'color_jitter', 'random_erase',
                     'pad_crop', 'pad_crop_zero', 'tv_random_erasing'}


@pytest.mark.parametrize('bad', ['random_erasing', 'randomflip', 'autoaugment'])
def test_unknown_name_raises_naming_it_the_config_key_and_the_registered_names(bad):
    with pytest.raises(ValueError) as err:
        build_transforms(H, W, ['random_flip', bad])
    msg = str(err.value)
    assert repr(bad) in msg and 'data.transforms' in msg
    assert EXPECTED_BUILTINS <= set(msg.split('registered transforms: ')[1].split(', '))


def test_unknown_name_suggests_the_close_registered_names():
    with pytest.raises(ValueError, match=r"did you mean 'tv_random_erasing' or 'random_erase'"):
        build_transforms(H, W, ['random_erasing'])


@pytest.mark.parametrize('names', [['random_flip', 'pad_crop', 'random_flip'],
                                   ['Random_Flip', 'random_flip'],
                                   ['tv_random_erasing', 'tv_random_erasing']])
def test_duplicate_names_raise(names):
    with pytest.raises(ValueError, match=r"data.transforms lists '\w+' twice"):
        build_transforms(H, W, names)


@pytest.mark.parametrize('bad', [{'random_flip': 1}, ['random_flip', 3], 7])
def test_a_non_list_raises(bad):
    with pytest.raises(ValueError, match='data.transforms must be a list of transform names'):
        build_transforms(H, W, bad)


def test_builtins_are_listed():
    assert EXPECTED_BUILTINS <= set(list_transforms())
    assert list_transforms() == sorted(list_transforms())


@pytest.fixture
def scratch_names():
    names = []
    yield names
    for n in names:  # leave the process-wide registry as it was
        tfm.TRANSFORMS._store.pop(n, None)


def _negate(height, width, norm_mean, norm_std):
    return lambda x: -x


def _grey(height, width, norm_mean, norm_std):
    return T.Grayscale(num_output_channels=3)


def test_register_transform_plugs_a_new_name_into_its_stage(scratch_names):
    scratch_names += ['test_negate', 'test_grey']
    register_transform('test_negate', 'tensor', _negate)
    register_transform('test_grey', 'pil', _grey)
    assert register_transform('test_negate', 'tensor', _negate).factory is _negate  # idempotent
    assert {'test_negate', 'test_grey'} <= set(list_transforms())
    ours, _ = build_transforms(H, W, ['test_negate', 'random_flip', 'test_grey'])
    ref = T.Compose([T.Resize((H, W)), T.RandomHorizontalFlip(), T.Grayscale(3), T.ToTensor(),
                     T.Normalize(MEAN, STD), lambda x: -x])
    for s, img in enumerate(images(10)):
        assert torch.equal(seeded(ours, img, s), seeded(ref, img, s))


def test_register_transform_refuses_a_different_registration(scratch_names):
    scratch_names.append('test_negate')
    register_transform('test_negate', 'tensor', _negate)
    with pytest.raises(ValueError, match='"test_negate" is already registered.*overwrite=True'):
        register_transform('test_negate', 'tensor', _grey)
    with pytest.raises(ValueError, match='already registered'):
        register_transform('test_negate', 'pil', _negate)
    with pytest.raises(ValueError, match='already registered'):
        register_transform('pad_crop', 'pil', _grey)
    register_transform('test_negate', 'pil', _grey, overwrite=True)
    assert tfm.TRANSFORMS.get('test_negate').stage == 'pil'


@pytest.mark.parametrize('name,stage', [('test_x', 'image'), ('Test_X', 'pil'), ('', 'pil')])
def test_register_transform_validates_name_and_stage(name, stage, scratch_names):
    scratch_names.append(name)
    with pytest.raises(ValueError, match='stage|lower-case'):
        register_transform(name, stage, _negate)


def test_stateful_transforms_are_fresh_per_build():
    a, _ = build_transforms(H, W, ['random_patch'])
    b, _ = build_transforms(H, W, ['random_patch'])
    assert a.transforms[1] is not b.transforms[1]
