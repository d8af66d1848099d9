"""Ranked-result pictures for a cross-modal search, in torchreid's style.

One image per query: the query with a black border, then the top-k gallery images after the
protocol's removal rule (SYSU: cam-2 images are not shown for cam-3 queries), bordered green when
they are the query's identity and red otherwise. File names are unique
(``<row>_pid<pid>_cam<cam>_<basename>.jpg``): SYSU reuses basenames across cameras, which makes
torchreid's own visualiser overwrite rows.

Example::

    >>> import numpy as np, os, tempfile
    >>> from PIL import Image
    >>> from torchreid_vi.evaluation.visrank import draw_rank_row
    >>> d = tempfile.mkdtemp()
    >>> paths = []
    >>> for i in range(3):
    ...     p = os.path.join(d, f'{i}.jpg'); Image.new('RGB', (8, 16)).save(p); paths.append(p)
    >>> row = draw_rank_row(paths[0], paths[1:], [True, False], height=32, width=16)
    >>> row.size
    (68, 32)
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from .rules import removed_mask

__all__ = ['draw_rank_row', 'visualize_setting']

BORDER = 3
SPACING = 5
QUERY_EXTRA = 10
_GREEN, _RED, _BLACK = (0, 200, 0), (220, 0, 0), (0, 0, 0)


def _tile(path: str, colour, height: int, width: int) -> Image.Image:
    img = Image.open(path).convert('RGB').resize((width - 2 * BORDER, height - 2 * BORDER))
    return ImageOps.expand(img, border=BORDER, fill=colour)


def draw_rank_row(query_path: str, gallery_paths: Sequence[str], matches: Sequence[bool],
                  height: int = 256, width: int = 128) -> Image.Image:
    """The query tile then one tile per ranked gallery image (green = same identity)."""
    n = len(gallery_paths)
    canvas = Image.new('RGB', (width * (n + 1) + SPACING * n + QUERY_EXTRA, height),
                       (255, 255, 255))
    canvas.paste(_tile(query_path, _BLACK, height, width), (0, 0))
    for i, (p, ok) in enumerate(zip(gallery_paths, matches)):
        x = width + QUERY_EXTRA + i * (width + SPACING)
        canvas.paste(_tile(p, _GREEN if ok else _RED, height, width), (x, 0))
    return canvas


def visualize_setting(dist_ir_vis: np.ndarray, ir_records, vis_records, setting, save_dir: str,
                      topk: int = 10, max_queries: int = 50, height: int = 256,
                      width: int = 128) -> int:
    """Write ranked rows of trial 0 of ``setting`` into ``save_dir``; returns the row count.

    Args:
        dist_ir_vis: ``(n_ir, n_vis)`` distances between the dataset's IR and VIS test records.
        ir_records, vis_records: the dataset's ``query`` (IR) and ``gallery`` (VIS) 4-tuples.
        setting: an ``EvalSetting``; its direction decides which side the queries come from.
        max_queries: rows to write, evenly spread over the queries (0: all).
    """
    dist = dist_ir_vis if setting.direction == 'ir2vis' else dist_ir_vis.T
    q_recs, g_recs = ((ir_records, vis_records) if setting.direction == 'ir2vis'
                      else (vis_records, ir_records))
    q_idx, g_idx = setting.trials[0]
    q_idx, g_idx = np.asarray(q_idx), np.asarray(g_idx)
    g_pids = np.array([g_recs[j][1] for j in g_idx])
    g_cams = np.array([g_recs[j][2] for j in g_idx])
    rows = q_idx
    if max_queries and len(rows) > max_queries:
        rows = q_idx[np.linspace(0, len(q_idx) - 1, max_queries).round().astype(int)]
    os.makedirs(save_dir, exist_ok=True)
    sub = dist[np.ix_(rows, g_idx)]
    for r, qi in enumerate(rows):
        q_path, q_pid, q_cam = q_recs[qi][:3]
        keep = ~removed_mask(setting.removal, q_pid, q_cam, g_pids, g_cams)
        order = np.argsort(sub[r], kind='stable')
        order = order[keep[order]][:topk]
        img = draw_rank_row(q_path, [g_recs[g_idx[j]][0] for j in order],
                            [bool(g_pids[j] == q_pid) for j in order], height, width)
        name = f'{int(qi):05d}_pid{q_pid}_cam{q_cam}_{osp.splitext(osp.basename(q_path))[0]}.jpg'
        img.save(osp.join(save_dir, name), quality=90)
    return len(rows)
