"""Figures of XIV's X modality: visible / X / infrared triplets (paper Fig. 4) and the per-channel
intensity histograms of visible vs X images (paper Fig. 3).

Usage::

    python -m torchreid_vi.methods.xiv.figures --config-file xiv/sysu_mm01 \\
        --root /data --load-weights log/xiv/sysu_mm01/model/model.pth.tar-120 --out figures/
        [--num-ids 6] [--max-images 0] [--seed 0] [key value ...]

Writes ``<out>/triplets.png``, ``<out>/channel_histograms.png`` and ``<out>/channel_means.json``
(mean R, G, B of visible and X images, so "X is redder" is a number as well as a picture).

Images are read from the first source dataset's training split, resized to
``data.height × data.width`` and normalised as at test time (no augmentation). The X image is
``g`` of the normalised visible image with the normalisation undone. Like the paper (which
averages over the training images), the channel means are of these **unclipped** values: the
learned ``g`` is not constrained to [0, 1], so X means may lie outside it. Clipping to [0, 1]
happens only for display (the triplet picture); ``channel_means.json`` records the means of the
unclipped X (``x_mean_rgb``, the figure's numbers) and of the clipped X
(``x_mean_rgb_clipped``, what the pictures show). By default every visible training image is
used (``--max-images 0``); ``--max-images N`` draws a seeded sample of N. Only the generator's
weights are used; the generator kind comes from ``xiv.generator`` of the config.
"""
from __future__ import annotations

import json
import os
import os.path as osp
import sys
from typing import List, Sequence

import numpy as np
import torch

__all__ = ['main', 'load_generator', 'x_images', 'channel_means', 'channel_mean_table',
           'select_images', 'plot_triplets', 'plot_histograms']

_CHANNELS = (('R', 'tab:red'), ('G', 'tab:green'), ('B', 'tab:blue'))


def _config(args):
    from ...cli import UserError, build_config
    from ...registration import register_all
    register_all()
    try:
        return build_config(args)
    except UserError as exc:
        raise SystemExit(f'error: {exc}')


def load_generator(cfg, weights: str):
    """The config's X generator with the weights of checkpoint ``weights`` (``''``: untrained)."""
    from ...checkpoint import load_checkpoint
    from ...utils.state_dict import sub_state_dict
    from .model import XGenerator
    if cfg.xiv.generator == 'none':
        raise SystemExit('error: xiv.generator is "none": there is no X modality to draw')
    g = XGenerator(cfg.xiv.generator, cfg.data.norm_mean, cfg.data.norm_std)
    if weights:
        ckpt = load_checkpoint(weights)
        state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else ckpt
        own = sub_state_dict(state, 'generator.')
        if not own:
            raise SystemExit(f'error: "{weights}" holds no XIV generator weights '
                             f'(no "generator.*" keys); is it an xiv_* model checkpoint?')
        g.load_state_dict(own)
    elif cfg.xiv.generator == 'learned':
        print('Warning: no --load-weights: the learned generator is at its random initialisation')
    return g.eval()


def _train_records(cfg):
    from ...config import dataset_options
    from ...registry import DATASETS
    name = cfg.data.sources[0]
    dataset = DATASETS.get(name)(root=cfg.data.root, mode='train', verbose=False,
                                 **dataset_options(cfg).get(name, {}))
    return dataset.train


def _load(paths: Sequence[str], height: int, width: int) -> torch.Tensor:
    """RGB images in [0, 1], ``(N, 3, H, W)``."""
    from PIL import Image
    out = np.stack([np.asarray(Image.open(p).convert('RGB').resize((width, height),
                                                                  Image.BILINEAR))
                    for p in paths]).astype(np.float32) / 255.0
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def x_images(generator, rgb: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """X images of RGB images, back in RGB: ``(N, 3, H, W)`` in [0, 1] → ``(N, 3, H, W)``.

    ``clip``: clip to [0, 1] (for display); ``False`` keeps the de-normalised values as ``g``
    makes them (a learned ``g`` may leave [0, 1]).

    Example::

        >>> import torch
        >>> from torchreid_vi.methods.xiv.model import XGenerator
        >>> g = XGenerator('learned')
        >>> with torch.no_grad():
        ...     _ = g.reduce.weight.zero_(), g.reduce.bias.fill_(1.0)    # relu(W1·x + b1) = 1
        ...     _ = g.expand.weight.fill_(1.0), g.expand.bias.zero_()    # normalised X = 1
        >>> raw = x_images(g, torch.rand(1, 3, 2, 2), clip=False)        # 1 * std + mean
        >>> [round(v, 3) for v in raw[0, :, 0, 0].tolist()]
        [0.714, 0.68, 0.631]
    """
    x = generator.denormalize(generator(generator.normalize(rgb)))
    return x.clamp(0, 1) if clip else x


def channel_means(generator, paths: Sequence[str], height: int, width: int,
                  batch: int = 256, clip: bool = False) -> tuple:
    """Per-image mean R, G, B of the visible images and of their X images.

    Args:
        generator: an :class:`~torchreid_vi.methods.xiv.model.XGenerator`.
        paths: image files; height, width: the size images are resized to (pixels).
        batch: images loaded at a time.
        clip: average the X images clipped to [0, 1] (what the pictures show) instead of the
            unclipped values (the default, the paper's average intensity).

    Returns: two ``(N, 3)`` float32 arrays, visible and X, intensities on the [0, 1] RGB scale
    (X unclipped unless ``clip``).
    """
    vis, raw, clipped = channel_mean_table(generator, paths, height, width, batch)
    return vis, (clipped if clip else raw)


def channel_mean_table(generator, paths: Sequence[str], height: int, width: int,
                       batch: int = 256) -> tuple:
    """One pass over ``paths``: per-image mean R, G, B of the visible images, of their X images
    unclipped and of their X images clipped to [0, 1] — three ``(N, 3)`` float32 arrays."""
    vis, raw, clipped = [], [], []
    for i in range(0, len(paths), batch):
        rgb = _load(paths[i:i + batch], height, width)
        x = x_images(generator, rgb, clip=False)
        vis.append(rgb.mean(dim=(2, 3)))
        raw.append(x.mean(dim=(2, 3)))
        clipped.append(x.clamp(0, 1).mean(dim=(2, 3)))
    return tuple(torch.cat(v).numpy() for v in (vis, raw, clipped))


def select_images(paths: Sequence[str], max_images: int, seed: int = 0) -> List[str]:
    """All of ``paths`` (``max_images <= 0``) or a seeded sample of ``max_images``, in the
    original order.

    >>> select_images(['a', 'b', 'c'], 0)
    ['a', 'b', 'c']
    >>> len(select_images(['a', 'b', 'c'], 2, seed=1))
    2
    """
    paths = list(paths)
    if max_images <= 0 or max_images >= len(paths):
        return paths
    rng = np.random.default_rng(seed)
    return [paths[i] for i in np.sort(rng.choice(len(paths), max_images, replace=False))]


def plot_histograms(vis_means: np.ndarray, x_means: np.ndarray, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    # [0, 1], widened to the data: unclipped X means may lie outside the displayable range
    lo = min(0.0, float(np.min(vis_means)), float(np.min(x_means)))
    hi = max(1.0, float(np.max(vis_means)), float(np.max(x_means)))
    bins = np.linspace(lo, hi, 41)
    for ax, means, title in ((axes[0], vis_means, 'visible'), (axes[1], x_means, 'X = g(visible)')):
        for c, (name, colour) in enumerate(_CHANNELS):
            ax.hist(means[:, c], bins=bins, color=colour, alpha=0.45,
                    label=f'{name} (mean {means[:, c].mean():.3f})')
        ax.set_title(f'{title}: per-image channel means, {len(means)} images')
        ax.set_xlabel('average intensity')
        ax.legend(fontsize=8, loc='upper right')
    axes[0].set_ylabel('images')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_triplets(rows: List[tuple], path: str) -> None:
    """``rows``: ``(pid, visible (3,H,W), X (3,H,W), infrared (3,H,W))`` tensors in [0, 1]."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(rows), 3, figsize=(4.2, 2.2 * len(rows)), squeeze=False)
    for r, (pid, *images) in enumerate(rows):
        for c, (img, title) in enumerate(zip(images, ('visible', 'X', 'infrared'))):
            ax = axes[r, c]
            ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title)
            if c == 0:
                ax.set_ylabel(f'id {pid}')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from ...cli import build_parser
    p = build_parser()
    p.description = __doc__.split('\n')[0]
    p.add_argument('--load-weights', default='', help='XIV checkpoint (model.pth.tar-N)')
    p.add_argument('--out', default='xiv_figures', help='output folder')
    p.add_argument('--num-ids', type=int, default=6, help='identities in the triplet figure')
    p.add_argument('--max-images', type=int, default=0,
                   help='visible training images averaged for the histograms and means: 0 = all '
                        '(the paper), N > 0 = a seeded sample of N')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    cfg = _config(args)
    generator = load_generator(cfg, args.load_weights)
    records = _train_records(cfg)
    from ...data.base import INFRARED, VISIBLE
    vis = [r for r in records if r[3] == VISIBLE]
    ir = [r for r in records if r[3] == INFRARED]
    if not vis or not ir:
        raise SystemExit(f'error: the training split of {cfg.data.sources[0]} needs visible and '
                         f'infrared images ({len(vis)} visible, {len(ir)} infrared)')
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    h, w = cfg.data.height, cfg.data.width

    sample = select_images([r[0] for r in vis], args.max_images, args.seed)
    vis_means, x_means, x_means_clipped = channel_mean_table(generator, sample, h, w)
    hist_path = osp.join(args.out, 'channel_histograms.png')
    plot_histograms(vis_means, x_means, hist_path)
    summary = {'generator': cfg.xiv.generator, 'weights': args.load_weights,
               'num_images': len(sample), 'num_visible_train_images': len(vis),
               'sampled': len(sample) < len(vis), 'seed': args.seed,
               'visible_mean_rgb': [float(v) for v in vis_means.mean(0)],
               'x_mean_rgb': [float(v) for v in x_means.mean(0)],
               'x_mean_rgb_clipped': [float(v) for v in x_means_clipped.mean(0)],
               'x_values': 'x_mean_rgb: de-normalised X, unclipped (the paper\'s average); '
                           'x_mean_rgb_clipped: X clipped to [0, 1], as displayed'}
    with open(osp.join(args.out, 'channel_means.json'), 'w') as f:
        json.dump(summary, f, indent=1)

    ir_pids = {r[1] for r in ir}
    pids = sorted({r[1] for r in vis} & ir_pids)
    chosen = [pids[i] for i in np.sort(rng.choice(len(pids), min(args.num_ids, len(pids)),
                                                  replace=False))]
    rows = []
    for pid in chosen:
        v_path = next(r[0] for r in vis if r[1] == pid)
        i_path = next(r[0] for r in ir if r[1] == pid)
        rgb = _load([v_path, i_path], h, w)
        rows.append((pid, rgb[0], x_images(generator, rgb[:1])[0], rgb[1]))
    trip_path = osp.join(args.out, 'triplets.png')
    plot_triplets(rows, trip_path)
    print(f'X figures ({cfg.xiv.generator} generator): {trip_path}, {hist_path}; mean RGB '
          f'visible {np.round(summary["visible_mean_rgb"], 3).tolist()}, X '
          f'{np.round(summary["x_mean_rgb"], 3).tolist()}')
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
