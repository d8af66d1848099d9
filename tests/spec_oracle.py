"""The reference semantics of one cross-modal evaluation, datasets_and_protocols.md §3.4,
restated verbatim (numpy, stable argsort) so that it can be read side by side with the spec.

It is the independent oracle of ``test_metrics.py`` and ``test_metrics_reference.py``; the code
under test (``torchreid_vi.evaluation.metrics``) shares nothing with it. Lint leaves its compact
one-line statements alone (see pyproject.toml) so it stays diffable against the spec.
"""
import numpy as np


def evaluate(dist, q_pid, g_pid, q_cam, g_cam, removal, cmc_mode, max_rank=20):
    """datasets_and_protocols.md §3.4, verbatim (numpy, stable argsort)."""
    dist = np.asarray(dist, np.float64); nq, ng = dist.shape
    order = np.argsort(dist, axis=1, kind='stable')                  # gallery column at each ranked position
    gp, gc = g_pid[order], g_cam[order]
    match = gp == q_pid[:, None]
    removed = {'location': (q_cam[:, None] == 3) & (gc == 2),
               'same_pid_cam': match & (gc == q_cam[:, None]),
               'none': np.zeros_like(match)}[removal]
    kept = ~removed; pos = match & kept; valid = pos.any(1)
    if not valid.any(): raise ValueError('no valid query')
    krank = np.cumsum(kept, 1); ncum = np.cumsum(pos, 1); npos = ncum[:, -1]
    ap = (np.where(pos, ncum / np.maximum(krank, 1), 0).sum(1) / np.maximum(npos, 1))[valid]
    inp = (npos / np.maximum(np.where(pos, krank, 0).max(1), 1))[valid]
    if cmc_mode == 'image':
        first = np.where(pos, krank, ng + 1).min(1)
    else:                                                            # identity CMC
        P = np.full((nq, ng), ng); np.put_along_axis(P, order, np.where(kept, np.arange(ng), ng), 1)
        cs = np.argsort(g_pid, kind='stable'); sp = g_pid[cs]
        starts = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]]); ids = sp[starts]
        firstpos = np.minimum.reduceat(P[:, cs], starts, axis=1)     # (nq, n_ids): best kept position per id
        own = firstpos[np.arange(nq), np.clip(np.searchsorted(ids, q_pid), 0, len(ids) - 1)]
        first = (firstpos < own[:, None]).sum(1) + 1
    cmc = (first[valid][:, None] <= np.arange(1, max_rank + 1)).mean(0)
    return cmc, ap.mean(), inp.mean(), int(valid.sum())
