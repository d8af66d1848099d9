"""The cross-modal evaluator: one feature pass, one distance matrix, every setting × trial.

:class:`EvalOptions` holds every evaluation option (``test.*`` and ``vi.eval.*``), checked once
when it is built, so a bad option stops a run before training. :class:`CrossModalEvaluator`
evaluates a cross-modal test set given two method hooks (how to extract features of a batch of
one modality, how to turn infrared and visible features into a distance matrix); it needs no
engine, so tools and notebooks use it directly::

    >>> import numpy as np
    >>> from torchreid_vi.config import get_default_config
    >>> from torchreid_vi.evaluation.evaluator import CrossModalEvaluator
    >>> evaluator = CrossModalEvaluator.from_config(get_default_config())
    >>> evaluator.options.dist_metric
    'euclidean'

``evaluator.prepare(name, dataset)`` builds the dataset's settings (reading the SYSU permutation
file, checking the trial count and that every setting has a valid query) once and caches them;
``evaluator.evaluate(name, query_loader, gallery_loader, extract, distance)`` does the rest and
returns ``{setting key: SettingResult}``; ``evaluator.evaluate_distances`` scores a precomputed
(or random: the chance level) distance matrix.
"""
from __future__ import annotations

import dataclasses
import os.path as osp
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..data.base import INFRARED, MODALITY_NAMES, VISIBLE
from ..utils.distance import pairwise_distance
from .protocols import EvalSetting, record_fields, settings_for
from .report import SettingResult, evaluate_settings, format_table
from .rules import valid_queries

__all__ = ['EvalOptions', 'CrossModalEvaluator', 'DIST_METRICS', 'RERANK_METHODS',
           'FeatureDict']

DIST_METRICS = ('euclidean', 'cosine')
RERANK_METHODS = ('none', 'k_reciprocal', 'query_only')

FeatureDict = Dict[str, torch.Tensor]
ExtractFn = Callable[[torch.Tensor, int], Union[torch.Tensor, FeatureDict]]
DistanceFn = Callable[[FeatureDict, FeatureDict], torch.Tensor]


def _positive_int(value, key: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{key}={value!r}; expected an int >= {minimum}')


@dataclass(frozen=True)
class EvalOptions:
    """Every evaluation option, validated on construction (errors name the config key).

    Attributes (config keys):
        dist_metric: ``test.dist_metric`` — ``'euclidean'`` (true Euclidean) or ``'cosine'``.
        normalize_feature: ``test.normalize_feature`` — L2-normalise features first.
        ranks: ``test.ranks`` — CMC ranks printed for torchreid targets (cross-modal reports
            show ranks 1, 5, 10, 20 up to ``max_rank``).
        max_rank: ``vi.eval.max_rank`` — CMC length.
        flip: ``vi.eval.flip`` — average the features of each image and its mirror.
        rerank: ``vi.eval.rerank`` — ``'none'``, ``'k_reciprocal'`` (torchreid's) or
            ``'query_only'`` (IDKL's variant); ``rerank_k1``, ``rerank_k2``, ``rerank_lambda``.
        visrank: ``test.visrank`` — ranked-result pictures of the final evaluation;
            ``visrank_topk``: ``test.visrank_topk``; ``visrank_max_queries``:
            ``vi.eval.visrank_max_queries`` (0: all).
        use_metric_cuhk03: ``cuhk03.use_metric_cuhk03`` (torchreid targets only).
    """
    dist_metric: str
    normalize_feature: bool
    ranks: Tuple[int, ...]
    max_rank: int
    flip: bool
    rerank: str
    rerank_k1: int
    rerank_k2: int
    rerank_lambda: float
    visrank: bool
    visrank_topk: int
    visrank_max_queries: int
    use_metric_cuhk03: bool = False

    def __post_init__(self):
        if self.dist_metric not in DIST_METRICS:
            raise ValueError(f'test.dist_metric={self.dist_metric!r}; expected one of '
                             f'{DIST_METRICS}')
        if self.rerank not in RERANK_METHODS:
            raise ValueError(f'vi.eval.rerank={self.rerank!r}; expected one of {RERANK_METHODS}')
        _positive_int(self.max_rank, 'vi.eval.max_rank')
        object.__setattr__(self, 'ranks', tuple(self.ranks))
        if not self.ranks:
            raise ValueError('test.ranks is empty; expected ranks such as [1, 5, 10, 20]')
        for k in self.ranks:
            _positive_int(k, 'test.ranks')
        _positive_int(self.rerank_k1, 'vi.eval.rerank_k1')
        _positive_int(self.rerank_k2, 'vi.eval.rerank_k2')
        if not 0.0 <= float(self.rerank_lambda) <= 1.0:
            raise ValueError(f'vi.eval.rerank_lambda={self.rerank_lambda!r}; expected a number '
                             f'in [0, 1]')
        _positive_int(self.visrank_topk, 'test.visrank_topk')
        _positive_int(self.visrank_max_queries, 'vi.eval.visrank_max_queries', minimum=0)

    @classmethod
    def from_config(cls, cfg, **overrides) -> 'EvalOptions':
        ev = cfg.vi.eval
        kwargs = dict(dist_metric=cfg.test.dist_metric,
                      normalize_feature=bool(cfg.test.normalize_feature),
                      ranks=tuple(cfg.test.ranks), max_rank=ev.max_rank, flip=bool(ev.flip),
                      rerank=ev.rerank, rerank_k1=ev.rerank_k1, rerank_k2=ev.rerank_k2,
                      rerank_lambda=float(ev.rerank_lambda), visrank=bool(cfg.test.visrank),
                      visrank_topk=cfg.test.visrank_topk,
                      visrank_max_queries=ev.visrank_max_queries,
                      use_metric_cuhk03=bool(cfg.cuhk03.use_metric_cuhk03))
        kwargs.update(overrides)
        return cls(**kwargs)

    def replace(self, **changes) -> 'EvalOptions':
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)


class _Progress:
    """"Extracting features" lines with speed and ETA, at most every ``every_s`` seconds."""

    def __init__(self, what: str, total: int, every_s: float = 10.0, stream=None):
        self.what, self.total, self.every_s = what, total, every_s
        self.stream = stream or sys.stdout
        self.start = self.last = time.time()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.time()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            speed = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(speed, 1e-9)
            print(f'Extracting features of {self.what}: {self.done}/{self.total} images, '
                  f'{speed:.1f} img/s, ETA {time.strftime("%H:%M:%S", time.gmtime(eta))}',
                  file=self.stream, flush=True)


class CrossModalEvaluator:
    """Evaluates cross-modal test sets (see the module docstring).

    Args:
        options: the :class:`EvalOptions`.
    """

    def __init__(self, options: EvalOptions):
        self.options = options
        self._settings: Dict[str, List[EvalSetting]] = {}

    @classmethod
    def from_config(cls, cfg, **overrides) -> 'CrossModalEvaluator':
        return cls(EvalOptions.from_config(cfg, **overrides))

    # ------------------------------------------------------------------ settings (pre-flight)
    def prepare(self, name: str, dataset) -> List[EvalSetting]:
        """Build (once) and check the settings of test set ``name``.

        Reads what the protocol needs (the SYSU permutation file), checks the trial count and
        that every setting and trial has at least one query with a kept true match: everything
        the final evaluation would otherwise find out after training.

        Raises:
            ValueError, FileNotFoundError: naming the dataset, the setting and the option.
        """
        if name in self._settings:
            return self._settings[name]
        settings = settings_for(dataset)
        q_pids, q_cams = record_fields(dataset.query, f'{name} query')
        g_pids, g_cams = record_fields(dataset.gallery, f'{name} gallery')
        for s in settings:
            rows, cols = ((q_pids, q_cams), (g_pids, g_cams)) if s.direction == 'ir2vis' else (
                (g_pids, g_cams), (q_pids, q_cams))
            for t, (q_idx, g_idx) in enumerate(s.trials):
                if len(q_idx) == 0 or len(g_idx) == 0:
                    raise ValueError(f'{name}: setting {s.key} trial {t} has {len(q_idx)} '
                                     f'queries and {len(g_idx)} gallery images')
                valid = valid_queries(s.removal, rows[0][q_idx], rows[1][q_idx],
                                      cols[0][g_idx], cols[1][g_idx])
                if not valid.any():
                    raise ValueError(
                        f'{name}: setting {s.key} trial {t} has no valid query (none of its '
                        f'{len(q_idx)} queries has a true match left in its {len(g_idx)}-image '
                        f'gallery under removal {s.removal!r}); check the test split and the '
                        f'dataset options of vi.{name}')
        self._settings[name] = settings
        return settings

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def extract(self, loader, extract: ExtractFn, modality: int, what: str = '') -> FeatureDict:
        """Features of every image of ``loader`` (in loader order) as float32 tensors on the
        extractor's device; ``extract(imgs, modality)`` gets the CPU batch (it moves it where the
        model is) and returns ``(B, D)`` or a dict of them."""
        chunks: Dict[str, list] = {}
        progress = _Progress(what or f'{MODALITY_NAMES[modality]} images', len(loader.dataset))
        for data in loader:
            imgs = data['img']
            feats = _as_dict(extract(imgs, modality))
            if self.options.flip:  # average with the mirrored image (DEEN/CAJ test-time fusion)
                flipped = _as_dict(extract(torch.flip(imgs, dims=[3]), modality))
                feats = {k: (v + flipped[k]) / 2 for k, v in feats.items()}
            for k, v in feats.items():
                chunks.setdefault(k, []).append(v.float())
            progress.update(len(imgs))
        return {k: torch.cat(v) for k, v in chunks.items()}

    def feature_distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The configured distance between feature rows (``test.dist_metric``,
        ``test.normalize_feature``), float32, lower = closer."""
        return pairwise_distance(a.float(), b.float(), self.options.dist_metric,
                                 normalize=self.options.normalize_feature)

    def default_distance(self, ir: FeatureDict, vis: FeatureDict) -> torch.Tensor:
        """``(n_ir, n_vis)`` distances of the ``'feat'`` features."""
        return self.feature_distance(ir['feat'], vis['feat'])

    def _rerank_function(self, ir: FeatureDict, vis: FeatureDict):
        """Per-trial re-ranked distances, or ``None`` for the plain shared distance matrix.

        Re-ranking needs each trial's own gallery (its neighbourhoods depend on it), so it is
        recomputed per trial from the main features (``'feat'``; fused distances such as XIV's
        are not re-ranked). ``test.normalize_feature`` applies; the base distance is torchreid's
        (squared Euclidean or cosine), as in torchreid's and IDKL's re-ranking.
        """
        o = self.options
        if o.rerank == 'none':
            return None
        from .rerank import k_reciprocal_distances, query_only_rerank
        feats = {'ir2vis': (ir['feat'], vis['feat']), 'vis2ir': (vis['feat'], ir['feat'])}
        if o.normalize_feature:
            feats = {k: (F.normalize(a, dim=1), F.normalize(b, dim=1)) for k, (a, b) in
                     feats.items()}

        def dist_fn(query_idx, gallery_idx, direction):
            qf, gf = feats[direction]
            qf = qf[torch.as_tensor(query_idx, device=qf.device)].cpu()
            gf = gf[torch.as_tensor(gallery_idx, device=gf.device)].cpu()
            if o.rerank == 'k_reciprocal':
                return k_reciprocal_distances(qf, gf, o.rerank_k1, o.rerank_k2, o.rerank_lambda,
                                              o.dist_metric)
            return query_only_rerank(qf, gf, o.rerank_k1, o.rerank_k2, o.rerank_lambda)
        print(f'Re-ranking: {o.rerank} (k1={o.rerank_k1}, k2={o.rerank_k2}, '
              f'lambda={o.rerank_lambda}), recomputed per trial')
        return dist_fn

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, name: str, query_loader, gallery_loader, extract: ExtractFn,
                 distance: Optional[DistanceFn] = None, title: str = ''
                 ) -> Tuple[Dict[str, SettingResult], np.ndarray]:
        """Evaluate test set ``name``: features of its IR (``query_loader``) and VIS
        (``gallery_loader``) images, one distance matrix, every setting and trial.

        Args:
            extract: ``extract(imgs, modality) -> (B, D) | {name: (B, D)}`` in eval mode.
            distance: ``distance(ir_feats, vis_feats) -> (n_ir, n_vis)``; default
                :meth:`default_distance`.
            title: the printed table's title.

        Returns: ``(results, dist_ir_vis)``: the results by setting key and the IR × VIS
        distance matrix (a float32 tensor on the features' device).
        """
        qset, gset = query_loader.dataset, gallery_loader.dataset
        settings = self.prepare(name, qset)
        print(f'##### Evaluating {name}: {len(settings)} settings, {len(qset.query)} IR + '
              f'{len(gset.gallery)} VIS test images #####')
        t0 = time.time()
        ir = self.extract(query_loader, extract, INFRARED, f'{name} infrared (query side)')
        vis = self.extract(gallery_loader, extract, VISIBLE, f'{name} visible (gallery side)')
        t1 = time.time()
        dist = (distance or self.default_distance)(ir, vis)
        rerank = self._rerank_function(ir, vis)
        # the matrix stays where the features are: on a GPU the metrics run there too
        results = evaluate_settings(dist if rerank is None else rerank, qset.query,
                                    gset.gallery, settings, max_rank=self.options.max_rank)
        print(format_table(results, title=title or name))
        print(f'features {t1 - t0:.1f}s, metrics {time.time() - t1:.1f}s')
        return results, dist

    def evaluate_distances(self, name: str, dataset, dist_ir_vis) -> Dict[str, SettingResult]:
        """Score a given ``(len(dataset.query), len(dataset.gallery))`` distance matrix (or a
        per-trial ``dist_fn``, see :func:`~torchreid_vi.evaluation.report.evaluate_settings`)
        under the dataset's settings."""
        return evaluate_settings(dist_ir_vis, dataset.query, dataset.gallery,
                                 self.prepare(name, dataset), max_rank=self.options.max_rank)

    def chance_level(self, name: str, dataset, seed: int = 0) -> Dict[str, SettingResult]:
        """The same settings on uniform random distances: what "well above chance" compares to."""
        rng = np.random.default_rng(seed)
        return self.evaluate_distances(name, dataset,
                                       rng.random((len(dataset.query), len(dataset.gallery))))

    def visualize(self, name: str, dataset, gallery_dataset, dist_ir_vis: np.ndarray,
                  save_dir: str, height: int, width: int) -> None:
        """Ranked-result pictures of trial 0 of every setting, under ``save_dir/visrank/<name>``
        (the project's visualiser: unique file names, the protocol's removal rule applied)."""
        from .visrank import visualize_setting
        if torch.is_tensor(dist_ir_vis):
            dist_ir_vis = dist_ir_vis.cpu().numpy()
        root = osp.join(save_dir, 'visrank', name)
        for setting in self.prepare(name, dataset):
            folder = osp.join(root, setting.key.replace('/', '_'))
            n = visualize_setting(dist_ir_vis, dataset.query, gallery_dataset.gallery, setting,
                                  folder, topk=self.options.visrank_topk,
                                  max_queries=self.options.visrank_max_queries, height=height,
                                  width=width)
            print(f'Ranked results of {setting.key} (trial 0, {n} queries) -> {folder}')


def _as_dict(out) -> FeatureDict:
    return out if isinstance(out, dict) else {'feat': out}
