"""XIV Fig. 3 tool: the channel means are of the unclipped X images, over all training images by
default (``--max-images 0``), and ``channel_means.json`` records clipped and unclipped means."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from torchreid_vi.methods.xiv import figures
from torchreid_vi.methods.xiv.model import XGenerator

# Target X colour on the RGB [0, 1] scale: R above 1, B below 0, G inside.
X_RGB = (1.8, 0.5, -0.4)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def constant_generator():
    """A learned-kind g whose X is the constant colour X_RGB: relu(0·x + 1) = 1, then
    W2 = (X_RGB − mean) / std, b2 = 0, so de-normalised X = X_RGB at every pixel."""
    g = XGenerator('learned')
    with torch.no_grad():
        g.reduce.weight.zero_()
        g.reduce.bias.fill_(1.0)
        g.expand.weight.copy_(torch.tensor([(x - m) / s for x, m, s in zip(X_RGB, MEAN, STD)])
                              .view(3, 1, 1, 1))
        g.expand.bias.zero_()
    return g.eval()


def write_images(folder, n=5, size=(8, 4)):
    rng = np.random.default_rng(0)
    paths, means = [], []
    for i in range(n):
        pixels = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
        path = os.path.join(folder, f'{i}.png')
        Image.fromarray(pixels).save(path)
        paths.append(path)
        means.append(pixels.reshape(-1, 3).mean(0) / 255.0)
    return paths, np.array(means)


def test_means_are_of_the_unclipped_x_values(tmp_path):
    paths, vis_expected = write_images(str(tmp_path))
    g = constant_generator()
    vis, x = figures.channel_means(g, paths, 8, 4)
    assert vis.shape == x.shape == (5, 3)
    np.testing.assert_allclose(vis, vis_expected, atol=1e-6)
    np.testing.assert_allclose(x, np.tile(X_RGB, (5, 1)), atol=1e-5)   # outside [0, 1]
    assert x[:, 0].min() > 1 and x[:, 2].max() < 0
    _, clipped = figures.channel_means(g, paths, 8, 4, clip=True)
    np.testing.assert_allclose(clipped, np.tile((1.0, 0.5, 0.0), (5, 1)), atol=1e-5)
    shown = figures.x_images(g, torch.rand(2, 3, 8, 4))                 # display: clipped
    assert float(shown.min()) >= 0 and float(shown.max()) <= 1


def test_select_images_uses_all_by_default_or_a_seeded_sample():
    paths = [f'{i}.jpg' for i in range(10)]
    assert figures.select_images(paths, 0) == paths
    assert figures.select_images(paths, 20) == paths
    sample = figures.select_images(paths, 4, seed=3)
    assert len(sample) == 4 and sample == sorted(sample, key=paths.index)
    assert figures.select_images(paths, 4, seed=3) == sample


@pytest.fixture
def generator_checkpoint(tmp_path):
    path = tmp_path / 'xiv.pth.tar'
    state = {f'generator.{k}': v for k, v in constant_generator().state_dict().items()}
    torch.save({'state_dict': state, 'epoch': 1}, path)
    return str(path)


def test_tool_averages_every_visible_training_image_unclipped(sysu_root, generator_checkpoint,
                                                             tmp_path, monkeypatch):
    root, manifest = sysu_root
    out = tmp_path / 'figures'
    asked = []
    select = figures.select_images
    monkeypatch.setattr(figures, 'select_images',
                        lambda paths, n, seed=0: asked.append(n) or select(paths, n, seed))
    rc = figures.main(['--config-file', 'xiv/sysu_mm01', '--root', root,
                       '--load-weights', generator_checkpoint, '--out', str(out),
                       '--num-ids', '2', 'data.height', '32', 'data.width', '16'])
    assert rc == 0 and asked == [0]           # the default: every image, not a sample
    summary = json.loads((out / 'channel_means.json').read_text())
    train_vis = manifest['splits']['train']['vis']
    assert summary['num_images'] == summary['num_visible_train_images'] == \
        train_vis['num_images']
    assert summary['sampled'] is False
    assert summary['x_mean_rgb'] == pytest.approx(X_RGB, abs=1e-4)   # float32 sums
    assert summary['x_mean_rgb_clipped'] == pytest.approx((1.0, 0.5, 0.0), abs=1e-4)
    # the visible means, independently: every visible training image (cams 1, 2, 4, 5 of the
    # train + val ids), per-image mean of the pixels (the files are already 32 x 16)
    files = [f for pid in train_vis['ids'] for cam in train_vis['cams']
             for f in glob.glob(os.path.join(manifest['root'], f'cam{cam}', f'{pid:04d}', '*.jpg'))]
    assert len(files) == train_vis['num_images']
    per_image = [np.asarray(Image.open(f).convert('RGB'), np.float64).reshape(-1, 3).mean(0) / 255
                 for f in files]
    assert summary['visible_mean_rgb'] == pytest.approx(np.mean(per_image, 0).tolist(), abs=1e-5)
    assert (out / 'channel_histograms.png').is_file() and (out / 'triplets.png').is_file()

    sampled = tmp_path / 'sampled'
    figures.main(['--config-file', 'xiv/sysu_mm01', '--root', root,
                  '--load-weights', generator_checkpoint, '--out', str(sampled),
                  '--num-ids', '2', '--max-images', '7', 'data.height', '32', 'data.width', '16'])
    small = json.loads((sampled / 'channel_means.json').read_text())
    assert small['num_images'] == 7 and small['sampled'] is True
    assert small['x_mean_rgb'] == pytest.approx(X_RGB, abs=1e-4)


def test_x_is_g_of_the_normalised_image_then_de_normalised(tmp_path):
    """A g that depends on the pixel: normalised X = relu(normalised R) on all three channels,
    computed here pixel by pixel from the files."""
    paths, _ = write_images(str(tmp_path), n=3)
    g = XGenerator('learned')
    with torch.no_grad():
        g.reduce.weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))
        g.reduce.bias.zero_()
        g.expand.weight.fill_(1.0)
        g.expand.bias.zero_()
    _, x = figures.channel_means(g, paths, 8, 4)
    expected = []
    for p in paths:
        rgb = np.asarray(Image.open(p).convert('RGB'), np.float64) / 255.0   # (H, W, 3)
        x_norm = np.maximum((rgb[..., 0] - MEAN[0]) / STD[0], 0.0)           # (H, W)
        expected.append([float((x_norm * STD[c] + MEAN[c]).mean()) for c in range(3)])
    np.testing.assert_allclose(x, expected, atol=1e-5)
