"""k-reciprocal re-ranking (Zhong et al., CVPR 2017): torchreid's version and IDKL's variant.

* :func:`k_reciprocal_distances` — torchreid's ``re_ranking`` exactly as torchreid's engine uses it
  (``test.rerank=True``): query-gallery, query-query and gallery-gallery distances from
  ``compute_distance_matrix`` (squared Euclidean or cosine), re-ranked over query ∪ gallery.
* :func:`query_only_rerank` — IDKL's variant (datasets_and_protocols.md §2.4, idkl.md §7), written
  here from its description and vectorised: the joint squared-Euclidean matrix over query ∪
  gallery; before the neighbourhoods are built every *gallery column* is set to the global maximum,
  so every point's k-nearest neighbours are queries (gallery points then get their
  k-reciprocal vectors only through query expansion); the encoding weights V are stored in float16.

Both need features, not a finished distance matrix, and both must be recomputed for every trial's
gallery (pass them to :func:`~torchreid_vi.evaluation.report.evaluate_settings` as a ``dist_fn``).
Memory: IDKL's variant holds the joint (N x N, N = queries + gallery) float32 distances, plus
sparse encodings.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from torchreid_vi._torchreid import tr

__all__ = ['k_reciprocal_distances', 'query_only_rerank']


def _features(x, name: str) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f'{name} must have shape (num_images, feature_dim), got {tuple(t.shape)}')
    return t.to(device='cpu', dtype=torch.float32)


def _check_pair(q: torch.Tensor, g: torch.Tensor, k1: int, k2: int, lambda_value: float):
    if q.shape[1] != g.shape[1]:
        raise ValueError(f'q_feats and g_feats must have the same feature_dim, got {q.shape[1]} '
                         f'and {g.shape[1]}')
    if q.shape[0] == 0 or g.shape[0] == 0:
        raise ValueError(f'need at least one query and one gallery feature, got {q.shape[0]} and '
                         f'{g.shape[0]}')
    if int(k1) < 1 or int(k2) < 1:
        raise ValueError(f'k1 and k2 must be >= 1, got k1={k1} k2={k2}')
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f'lambda_value must be in [0, 1], got {lambda_value}')


def k_reciprocal_distances(q_feats, g_feats, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                           dist_metric: str = 'euclidean') -> np.ndarray:
    """torchreid's k-reciprocal re-ranking of query-gallery distances.

    Args:
        q_feats: (num_query, D) features (numpy or torch).
        g_feats: (num_gallery, D) features.
        k1, k2, lambda_value: re-ranking parameters (paper: 20, 6, 0.3).
        dist_metric: 'euclidean' (squared) or 'cosine', as torchreid's ``compute_distance_matrix``.

    Returns:
        (num_query, num_gallery) float32 re-ranked distances (lower = closer).

    Example:
        >>> import numpy as np
        >>> d = k_reciprocal_distances(np.eye(4, 8), np.eye(6, 8), k1=3, k2=2)
        >>> d.shape
        (4, 6)
    """
    q, g = _features(q_feats, 'q_feats'), _features(g_feats, 'g_feats')
    _check_pair(q, g, k1, k2, lambda_value)
    metric = tr.metrics.compute_distance_matrix
    q_g = metric(q, g, dist_metric).numpy()
    q_q = metric(q, q, dist_metric).numpy()
    g_g = metric(g, g, dist_metric).numpy()
    return tr.utils.re_ranking(q_g, q_q, g_g, k1=int(k1), k2=int(k2),
                               lambda_value=float(lambda_value)).astype(np.float32)


def _nearest(rank_dist: np.ndarray, k: int) -> np.ndarray:
    """(n, k) column indices of each row's k smallest values, ordered by (value, column).

    argpartition + a sort of the k picked values; rows where equal values straddle the k-th place
    fall back to a full stable argsort, so the result equals ``argsort(kind='stable')[:, :k]``.
    """
    n, m = rank_dist.shape
    if k >= m:
        return np.argsort(rank_dist, axis=1, kind='stable')[:, :k]
    picked = np.sort(np.argpartition(rank_dist, k - 1, axis=1)[:, :k], axis=1)
    values = np.take_along_axis(rank_dist, picked, axis=1)
    kth = values.max(1, keepdims=True)
    ambiguous = ((rank_dist < kth).sum(1) + (rank_dist == kth).sum(1)) > k
    top = np.take_along_axis(picked, np.argsort(values, axis=1, kind='stable'), axis=1)
    if ambiguous.any():
        rows = np.flatnonzero(ambiguous)
        top[rows] = np.argsort(rank_dist[rows], axis=1, kind='stable')[:, :k]
    return top


def _reciprocal(neigh: np.ndarray) -> np.ndarray:
    """(n, k) bool: neigh[i, a] has i among its own first k neighbours."""
    n, k = neigh.shape
    rows = np.arange(n)[:, None, None]
    return (neigh[neigh] == rows).any(-1)


def query_only_rerank(q_feats, g_feats, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *,
                      restrict_to_queries: bool = True, chunk_size: int = 512) -> np.ndarray:
    """IDKL's k-reciprocal re-ranking (neighbourhoods restricted to the queries by default).

    Steps (N = num_query + num_gallery points, joint squared Euclidean distances d):

    1. ``orig[i, j] = d[i, j] / max_j' d[i, j']`` (row-normalised);
    2. ranking matrix: d with every gallery column set to ``max(d)`` when
       ``restrict_to_queries`` (IDKL's SYSU evaluation), else d itself (the joint variant);
    3. R(i, k1): the k1+1 nearest points of i that also have i among their k1+1 nearest;
       expanded by every candidate's R(c, round(k1/2)) that shares more than 2/3 of its points
       with R(i, k1);
    4. ``V[i, j] = exp(-orig[i, j]) / sum`` over the expanded set, stored in float16;
    5. query expansion: V[i] = mean of V over the k2 nearest points of i (ranking matrix);
    6. Jaccard distance ``1 - s / (2 - s)``, ``s = sum_k min(V[i, k], V[j, k])``;
    7. ``final = (1 - lambda) * jaccard + lambda * orig``, query rows x gallery columns.

    Differences from the released NumPy code, all below float16 resolution of the result: ties in
    the ranking go to the lower index (stable order, the reference's quicksort leaves them
    unspecified), the Jaccard sums run in float32 (the reference accumulates them in float16),
    and distances are clamped at 0 (no rounding negatives).

    Args:
        q_feats: (num_query, D) features, numpy or torch (IDKL L2-normalises them on SYSU).
        g_feats: (num_gallery, D).
        k1, k2, lambda_value: re-ranking parameters (IDKL: 20, 6, 0.3).
        restrict_to_queries: mask gallery columns before ranking (IDKL SYSU); False gives the
            joint version.
        chunk_size: query rows per block of the Jaccard step.

    Returns:
        (num_query, num_gallery) float32 distances, lower = closer.
    """
    q, g = _features(q_feats, 'q_feats'), _features(g_feats, 'g_feats')
    _check_pair(q, g, k1, k2, lambda_value)
    k1, k2, lam = int(k1), int(k2), float(lambda_value)
    nq, ng = q.shape[0], g.shape[0]
    x = torch.cat([q, g])
    n = x.shape[0]
    sq = (x * x).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min_(0).numpy()     # (N, N)
    row_max = dist.max(1, keepdims=True)
    orig = dist / np.where(row_max > 0, row_max, 1)                               # step 1

    if restrict_to_queries:                                                       # step 2
        rank_dist = dist.copy()
        rank_dist[:, nq:] = dist.max()
    else:
        rank_dist = dist
    k_full = min(k1 + 1, n)
    k_half = min(int(np.around(k1 / 2.0)) + 1, n)
    neigh = _nearest(rank_dist, k_full)                                           # (N, k1+1)
    del rank_dist

    # step 3: k-reciprocal sets and their expansion
    recip = _reciprocal(neigh)                                                    # (N, k1+1)
    half = neigh[:, :k_half]
    half_recip = _reciprocal(half)                                                # (N, k_half)
    cand_half = half[neigh]                                                       # (N, k1+1, kh)
    cand_half_ok = half_recip[neigh]
    pair_rows, pair_cols = [np.nonzero(recip)[0]], [neigh[recip]]                 # R(i, k1)
    size_half = cand_half_ok.sum(-1)                                              # (N, k1+1)
    for start in range(0, n, chunk_size):
        sl = slice(start, min(start + chunk_size, n))
        shared = ((cand_half[sl][..., None] == neigh[sl][:, None, None, :])
                  & recip[sl][:, None, None, :]).any(-1) & cand_half_ok[sl]
        accept = recip[sl] & (shared.sum(-1) > 2.0 / 3.0 * size_half[sl])         # (c, k1+1)
        take = accept[..., None] & cand_half_ok[sl]                               # (c, k1+1, kh)
        r, _, _ = np.nonzero(take)
        pair_rows.append(r + start)
        pair_cols.append(cand_half[sl][take])
    rows = np.concatenate(pair_rows)
    cols = np.concatenate(pair_cols)
    unique = np.unique(rows.astype(np.int64) * n + cols)                          # dedupe
    rows, cols = unique // n, unique % n

    # step 4: Gaussian weights over each expanded set, stored in float16
    weight = np.exp(-orig[rows, cols].astype(np.float32))
    weight /= np.bincount(rows, weights=weight, minlength=n)[rows].astype(np.float32)
    V = sp.csr_matrix((weight.astype(np.float16).astype(np.float32), (rows, cols)), shape=(n, n))

    if k2 != 1:                                                                   # step 5
        k2n = min(k2, n)
        qe = sp.csr_matrix((np.full(n * k2n, 1.0 / k2n, np.float32),
                            (np.repeat(np.arange(n), k2n), neigh[:, :k2n].ravel())), shape=(n, n))
        V = (qe @ V).tocsr()
        V.data = V.data.astype(np.float16).astype(np.float32)
        V.eliminate_zeros()

    # step 6: s[i, j] = sum_k min(V[i, k], V[j, k]) for query rows i, gallery rows j, via the
    # (i, k, j) triples that share a column k
    csc = V.tocsc()
    csc.sort_indices()
    col_of = np.repeat(np.arange(n), np.diff(csc.indptr))
    gal_mask = csc.indices >= nq
    g_ptr = np.r_[0, np.cumsum(np.bincount(col_of[gal_mask], minlength=n))]
    g_rows = csc.indices[gal_mask] - nq
    g_vals = csc.data[gal_mask]
    q_csr = V[:nq].tocsr()
    jaccard = np.empty((nq, ng), np.float32)
    for start in range(0, nq, chunk_size):
        block = q_csr[start:start + chunk_size].tocoo()
        reps = g_ptr[block.col + 1] - g_ptr[block.col]                  # gallery entries of k
        qi = np.repeat(block.row, reps)
        qv = np.repeat(block.data, reps)
        offset = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
        partner = np.repeat(g_ptr[block.col], reps) + offset
        rows_here = min(chunk_size, nq - start)
        s = np.bincount(qi * ng + g_rows[partner], weights=np.minimum(qv, g_vals[partner]),
                        minlength=rows_here * ng).reshape(rows_here, ng)
        jaccard[start:start + rows_here] = (1.0 - s / (2.0 - s)).astype(np.float16)

    final = jaccard * (1.0 - lam) + orig[:nq, nq:] * lam                           # step 7
    return final.astype(np.float32)
