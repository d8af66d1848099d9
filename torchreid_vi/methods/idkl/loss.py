"""IDKL losses (spec ``idkl.md`` §3-§5), vectorised and free of host-device synchronisation.

Building blocks (names of the spec):

* :func:`canonical_views` — per-modality gathers of a batch: row ``r = p·m + k`` of the visible
  (infrared) view is the k-th visible (infrared) image of the p-th identity, identities ordered by
  first occurrence in the batch and images by occurrence (spec §5). Built with tensor ops
  (comparison matrices, cumulative sums, one argsort) — no ``.item()``, no boolean indexing; the
  optional layout check is the only synchronisation and can be switched off.
* :func:`off_diagonal_distances` — R(S), the ``n×(n−1)`` distance rows with the diagonal deleted.
* :func:`set_level_rows` — T(Z), the ``m×(P·C)`` set-level rearrangement; :func:`set_level_kl` = S.
* :func:`entropy` — H(z).
* :func:`discrimination_enhancing_loss` — L_e; :func:`discrepancy_reducing_loss` — L_r.
* :func:`tgsa_terms` — T_dist and T_mdr; :func:`csa_terms` — L_bg and L_sm.
* :class:`IDKLLoss` — the total loss of §3.7 with every term returned separately.

The symmetric KL J, the batch-hard triplet and the cross entropy come from
:mod:`torchreid_vi.modeling.losses`, the distances from :mod:`torchreid_vi.utils.distance`. All
loss maths runs in float32 (inputs are cast), so the network may run under autocast.

Example (the official layout: per identity IR, VIS, IR, VIS, …)::

    >>> import torch
    >>> from torchreid_vi.methods.idkl.loss import canonical_views, pseudo_modality_labels
    >>> pids = torch.tensor([7, 7, 7, 7, 3, 3, 3, 3])
    >>> mods = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])
    >>> views = canonical_views(pids, mods, num_instances=2)
    >>> views.vis.tolist(), views.ir.tolist()
    ([[1, 3], [5, 7]], [[0, 2], [4, 6]])
    >>> pseudo_modality_labels(views, batch_size=8).tolist()
    [1, 0, 0, 1, 1, 0, 0, 1]
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...data.base import INFRARED, VISIBLE
from ...data.sampler import batch_layout
from ...modeling.losses import TRIPLET_EPS, batch_hard_triplet, cross_entropy, symmetric_kl
from ...utils.distance import pairwise_distance
from .config import CONFUSER_MODES, CROSS_MODES, LOSS_FORMS

__all__ = [
    'CanonicalViews', 'canonical_views', 'pseudo_modality_labels', 'off_diagonal',
    'off_diagonal_distances', 'set_level_rows', 'set_level_kl', 'entropy',
    'discrimination_enhancing_loss', 'discrepancy_reducing_loss', 'tgsa_terms', 'csa_terms',
    'IDKLLoss', 'DISTANCE_EPS',
]

# Clamp of the squared distances inside R(S) (released code's kl_soft_dist).
DISTANCE_EPS = 1e-6


class CanonicalViews(NamedTuple):
    """Index tensors of the canonical per-modality views, each ``(P, m)`` int64 on the batch's
    device: ``vis[p, k]`` / ``ir[p, k]`` = batch position of the k-th visible / infrared image of
    the p-th identity (identities by first occurrence)."""
    vis: torch.Tensor
    ir: torch.Tensor

    @property
    def num_ids(self) -> int:
        return self.vis.shape[0]

    @property
    def num_instances(self) -> int:
        return self.vis.shape[1]

    def take(self, x: torch.Tensor):
        """``(B, ...) -> ((N, ...), (N, ...))`` rows of ``x`` in canonical visible / infrared
        order."""
        return x.index_select(0, self.vis.reshape(-1)), x.index_select(0, self.ir.reshape(-1))


def canonical_views(pids: torch.Tensor, modalities: torch.Tensor, num_instances: int,
                    validate: bool = True) -> CanonicalViews:
    """Canonical visible/infrared views of a batch (spec §5), independent of the batch layout.

    Args:
        pids: ``(B,)`` identity labels. modalities: ``(B,)`` 0 = visible, 1 = infrared.
        num_instances: m, images per identity **per modality** (``sampler.num_instances``).
        validate: check that the batch holds P = B/(2m) distinct identities with exactly m
            visible and m infrared images each (one host-device synchronisation; switch off with
            ``idkl.check_batch_layout False`` for the fastest step once the sampler is trusted).

    Returns: :class:`CanonicalViews` with ``(P, m)`` index tensors.

    The sort key is ``(modality, first-occurrence rank of the pid, occurrence index of the image
    within its (pid, modality))``; it is unique per image, so one argsort orders the batch into
    ``[visible view, infrared view]``.
    """
    if pids.dim() != 1 or modalities.shape != pids.shape:
        raise ValueError(f'canonical_views: pids and modalities must be equal 1-D tensors, got '
                         f'{tuple(pids.shape)} and {tuple(modalities.shape)}')
    batch = pids.numel()
    num_ids, m = batch_layout(batch, int(num_instances))
    device = pids.device
    pos = torch.arange(batch, device=device)
    same_pid = pids.view(-1, 1) == pids.view(1, -1)                       # (B, B)
    first = torch.where(same_pid, pos.view(1, -1), batch).amin(dim=1)     # first index of my pid
    id_rank = (first == pos).long().cumsum(0).sub(1).index_select(0, first)
    same_pid_mod = same_pid & (modalities.view(-1, 1) == modalities.view(1, -1))
    occurrence = (same_pid_mod & (pos.view(1, -1) < pos.view(-1, 1))).sum(dim=1)
    key = modalities.long() * (batch * batch) + id_rank * batch + occurrence
    order = torch.argsort(key)
    n = num_ids * m
    if validate:
        grid = (torch.arange(num_ids, device=device).view(-1, 1) * batch
                + torch.arange(m, device=device).view(1, -1)).reshape(-1)
        expected = torch.cat([grid + VISIBLE * batch * batch, grid + INFRARED * batch * batch])
        if not bool((key.index_select(0, order) == expected).all()):
            raise ValueError(_layout_error(pids, modalities, m, num_ids))
    return CanonicalViews(order[:n].view(num_ids, m), order[n:].view(num_ids, m))


def _layout_error(pids, modalities, m, num_ids) -> str:
    # Error path only: a readable summary of what the batch actually held.
    counts = {}
    for pid, mod in zip(pids.tolist(), modalities.tolist()):
        counts.setdefault(pid, {}).setdefault(mod, 0)
        counts[pid][mod] += 1
    shown = ', '.join(f'{pid}: vis {c.get(VISIBLE, 0)} ir {c.get(INFRARED, 0)}'
                      for pid, c in list(counts.items())[:8])
    other = sorted({mod for mod in modalities.tolist()} - {VISIBLE, INFRARED})
    return (f'IDKL batch layout: expected {num_ids} identities with exactly {m} visible (0) and '
            f'{m} infrared (1) images each (train.batch_size = 2·P·m, sampler.num_instances = m = '
            f'{m}, sampler.train_sampler ModalityBalancedSampler); got {len(counts)} identities '
            f'({shown}{", ..." if len(counts) > 8 else ""})'
            + (f'; unknown modality codes {other}' if other else ''))


def pseudo_modality_labels(views: CanonicalViews, batch_size: int) -> torch.Tensor:
    """Balanced confuser pseudo labels in batch order, ``(B,)`` int64 (spec §3.3).

    On the canonical views: infrared row r → 1 if r even else 0; visible row r → 1 if r odd else 0.
    Each modality gets N/2 zeros and N/2 ones (N even); on the official interleaved IR-first
    layout this is the released code's position pattern 1, 0, 0, 1, 1, 0, 0, 1, …
    """
    n = views.vis.numel()
    rows = torch.arange(n, device=views.vis.device)
    labels = torch.zeros(batch_size, dtype=torch.long, device=views.vis.device)
    labels.index_put_((views.vis.reshape(-1),), rows % 2)
    labels.index_put_((views.ir.reshape(-1),), 1 - rows % 2)
    return labels


def off_diagonal(mat: torch.Tensor) -> torch.Tensor:
    """``(n, n) -> (n, n−1)``: row i without its entry i, other columns in order.

    ``out[i, c] = mat[i, c]`` if ``c < i`` else ``mat[i, c + 1]`` (a gather; no boolean indexing).
    """
    n = mat.shape[0]
    if mat.dim() != 2 or mat.shape[1] != n or n < 2:
        raise ValueError(f'off_diagonal needs a square matrix with n >= 2, got {tuple(mat.shape)}')
    cols = torch.arange(n - 1, device=mat.device).view(1, -1)
    rows = torch.arange(n, device=mat.device).view(-1, 1)
    return mat.gather(1, cols + (cols >= rows).long())


def off_diagonal_distances(s: torch.Tensor, t: torch.Tensor = None) -> torch.Tensor:
    """R(S): ``(n, d) -> (n, n−1)`` Euclidean distances, diagonal deleted (spec §3 building blocks).

    ``D_ij = sqrt(max(|s_i|² + |s_j|² − 2 s_i·s_j, 1e-6))`` in float32. With ``t`` (``(n, d)``)
    the cross-set version A(S; T): rows ``s_i``, columns ``t_j``, the paired entry ``j = i``
    deleted.
    """
    return off_diagonal(pairwise_distance(s, s if t is None else t, eps=DISTANCE_EPS))


def set_level_rows(z: torch.Tensor, num_ids: int) -> torch.Tensor:
    """T(Z): canonical view ``(P·m, C) -> (m, P·C)``; row k = [Z_{0·m+k}, Z_{1·m+k}, …]."""
    n, c = z.shape
    if n % num_ids:
        raise ValueError(f'set_level_rows: {n} rows are not a multiple of P = {num_ids}')
    m = n // num_ids
    return z.reshape(num_ids, m, c).transpose(0, 1).reshape(m, num_ids * c)


def set_level_kl(a: torch.Tensor, b: torch.Tensor, num_ids: int) -> torch.Tensor:
    """S(a, b) = J(T(a), T(b)): symmetric KL of softmaxes over all P·C entries, mean over m rows."""
    return symmetric_kl(set_level_rows(a, num_ids), set_level_rows(b, num_ids))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(z) = −Σ_c s(z)_c log s(z)_c per row: ``(n, C) -> (n,)`` (nats, float32)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def discrimination_enhancing_loss(e_fd: torch.Tensor, e_f: torch.Tensor, form: str = 'code'):
    """L_e from C_e logits of the masked (``e_fd``) and unmasked (``e_f``) features, ``(B, C)``
    each.

    ``code``: mean_i exp(max(0, H(e_fd,i) − H(e_f,i))) − 1 (zero when masking never raises the
    entropy); ``paper``: mean_i softplus(H(e_fd,i) − H(e_f,i)) (softplus(0) = ln 2: never
    exactly 0).
    """
    gap = entropy(e_fd) - entropy(e_f)
    if form == 'code':
        return (torch.exp(F.relu(gap)) - 1.0).mean()
    if form == 'paper':
        return F.softplus(gap).mean()
    raise ValueError(f'idkl.ip.loss_form must be one of {LOSS_FORMS}, got {form!r}')


def _modality_centroid_distance(feat: torch.Tensor, views: CanonicalViews) -> torch.Tensor:
    # δ_p = ‖c_V^p − c_I^p + 1e-6‖₂ with per-identity, per-modality means: (B, d) -> (P,)
    vis, ir = views.take(feat.float())
    shape = (views.num_ids, views.num_instances, -1)
    return F.pairwise_distance(vis.reshape(shape).mean(1), ir.reshape(shape).mean(1), eps=1e-6)


def discrepancy_reducing_loss(r_fm: torch.Tensor, r_f: torch.Tensor, views: CanonicalViews,
                              form: str = 'code') -> torch.Tensor:
    """L_r from g(F̂_m−) (``r_fm``) and g(F̂) (``r_f``), ``(B, d)`` each.

    ``code``: (1/P) Σ_p max(0, δ_p(r_fm) − δ_p(r_f)); ``paper``: softplus instead of the hinge.
    δ_p is the distance between the visible and infrared centroids of identity p in the batch.
    """
    gap = _modality_centroid_distance(r_fm, views) - _modality_centroid_distance(r_f, views)
    if form == 'code':
        return F.relu(gap).mean()
    if form == 'paper':
        return F.softplus(gap).mean()
    raise ValueError(f'idkl.ip.loss_form must be one of {LOSS_FORMS}, got {form!r}')


def tgsa_terms(f_sh: torch.Tensor, f_sp: torch.Tensor, views: CanonicalViews,
               mdr_weights: Sequence[float] = (1.0, 1.0, 1.0), cross_mode: str = 'mixed_set'):
    """TGSA distillation T_dist and the MDR feature part T_mdr (spec §3.5), pre-BN ``(B, d)``
    inputs.

    Returns ``(t_dist, t_mdr)``::

        A_V = R(f_sh[V]), A_I = R(f_sh[I]), Ap_V = R(f_sp[V]), Ap_I = R(f_sp[I])
        t_dist = J(A_V, Ap_V) + J(A_I, Ap_I)
        t_mdr  = w1·J(A_V, A_I) + w2·J(A_V, A_X) + w3·J(A_X, A_I)

    ``mixed_set`` (code): A_X = R(concat(f_sh[V][:N//2], f_sh[I][:N//2])), a self-affinity of a
    half-visible/half-infrared set. ``cross_modal``: A_X = A(V; I), rows f_sh[V]_r, columns
    f_sh[I]_j, j ≠ r.
    """
    sh_v, sh_i = views.take(f_sh.float())
    sp_v, sp_i = views.take(f_sp.float())
    a_v, a_i = off_diagonal_distances(sh_v), off_diagonal_distances(sh_i)
    t_dist = (symmetric_kl(a_v, off_diagonal_distances(sp_v))
              + symmetric_kl(a_i, off_diagonal_distances(sp_i)))
    w1, w2, w3 = (float(w) for w in mdr_weights)
    t_mdr = w1 * symmetric_kl(a_v, a_i)
    if w2 or w3:
        if cross_mode == 'mixed_set':
            if sh_v.shape[0] % 2:
                raise ValueError(
                    f'idkl.tgsa.cross_mode mixed_set needs an even number of images per modality '
                    f'(P·m), got {sh_v.shape[0]}; change train.batch_size / sampler.num_instances, '
                    f'or use cross_modal, or set idkl.tgsa.mdr_weights w2 = w3 = 0')
            half = sh_v.shape[0] // 2
            a_x = off_diagonal_distances(torch.cat([sh_v[:half], sh_i[:half]]))
        elif cross_mode == 'cross_modal':
            a_x = off_diagonal_distances(sh_v, sh_i)
        else:
            raise ValueError(
                f'idkl.tgsa.cross_mode must be one of {CROSS_MODES}, got {cross_mode!r}')
        t_mdr = t_mdr + w2 * symmetric_kl(a_v, a_x) + w3 * symmetric_kl(a_x, a_i)
    return t_dist, t_mdr


def csa_terms(z_sh: torch.Tensor, z_sp: torch.Tensor, views: CanonicalViews, csa_weight: float,
              mdr_weight: float = 1.0, set_level: bool = True):
    """CSA + MDR logit part (spec §3.6) from ID logits ``(B, C)``. Returns ``(l_bg, l_sm)``::

        l_bg = w_mdr·J(z_sh[V], z_sh[I]) + λ3·(J(z_sh[V], z_sp[V]) + J(z_sh[I], z_sp[I]))
        l_sm = the same with S (set level) instead of J; 0 when ``set_level`` is False.
    """
    sh_v, sh_i = views.take(z_sh.float())
    sp_v, sp_i = views.take(z_sp.float())
    l_bg = mdr_weight * symmetric_kl(sh_v, sh_i) + csa_weight * (
        symmetric_kl(sh_v, sp_v) + symmetric_kl(sh_i, sp_i))
    if not set_level:
        return l_bg, z_sh.new_zeros((), dtype=torch.float32)
    p = views.num_ids
    l_sm = mdr_weight * set_level_kl(sh_v, sh_i, p) + csa_weight * (
        set_level_kl(sh_v, sp_v, p) + set_level_kl(sh_i, sp_i, p))
    return l_bg, l_sm


class IDKLLoss(nn.Module):
    """The IDKL objective (spec §3.7); ``cfg.idkl``'s defaults reproduce the released code on
    SYSU-MM01. Build it with :meth:`from_config`.

    Args (keyword-only) mirror ``cfg.idkl`` (:mod:`torchreid_vi.methods.idkl.config`):
        num_instances: m (``sampler.num_instances``). margin: triplet margin μ.
        ip_weight: λ1. ip_loss_form: ``'code'`` | ``'paper'``.
        tgsa_enabled, tgsa_distill_weight (λ2), tgsa_mdr_weights (w1, w2, w3), tgsa_cross_mode.
        csa_weight: λ3. csa_set_level: include the S terms. mdr_logit_weight: weight of
        J/S(z_sh[V], z_sh[I]). discriminator_weight, confuser_weight. confuser_mode:
        ``'pseudo'`` (balanced pseudo labels) | ``'grl'`` (true modality; the model reverses the
        gradient). check_batch_layout: validate the batch in :func:`canonical_views`.

    ``forward(outputs, pids, modalities)`` takes the train-mode dict of
    :class:`torchreid_vi.methods.idkl.model.IDKLNet` and returns float32 scalars::

        loss     total = tri + ce + id_pl + w_D·unad + w_C·pse + λ1·(F_p + IN_p)
                         + [tgsa]·soft_dt + bg_kl + sm_kl
        tri      tri_sh + tri_sp (batch-hard on pre-BN f_sh, f_sp over the whole mixed batch)
        ce       L_id_sh;  id_pl  L_id_sp;  unad  L_D;  pse  L_C
        F_p      L_e;  IN_p  L_r                     (unweighted)
        soft_dt  tgsa_mdr + λ2·tgsa_dist (0 when TGSA is off); tgsa_dist, tgsa_mdr unweighted
        bg_kl    L_bg;  sm_kl  L_sm                  (λ3 and the MDR weight applied inside)
        acc      ID accuracy of z_sh in percent (not differentiable)
    """

    def __init__(self, *, num_instances: int, margin: float, ip_weight: float,
                 ip_loss_form: str, tgsa_enabled: bool, tgsa_distill_weight: float,
                 tgsa_mdr_weights: Sequence[float], tgsa_cross_mode: str, csa_weight: float,
                 csa_set_level: bool, mdr_logit_weight: float, discriminator_weight: float,
                 confuser_weight: float, confuser_mode: str, check_batch_layout: bool):
        super().__init__()
        for key, value, allowed in (('idkl.ip.loss_form', ip_loss_form, LOSS_FORMS),
                                    ('idkl.tgsa.cross_mode', tgsa_cross_mode, CROSS_MODES),
                                    ('idkl.confuser.mode', confuser_mode, CONFUSER_MODES)):
            if value not in allowed:
                raise ValueError(f'{key} must be one of {allowed}, got {value!r}')
        if len(tuple(tgsa_mdr_weights)) != 3:
            raise ValueError('idkl.tgsa.mdr_weights needs 3 values (w1, w2, w3), '
                             f'got {tgsa_mdr_weights!r}')
        if int(num_instances) < 1:
            raise ValueError(f'sampler.num_instances must be >= 1 for IDKL, got {num_instances!r}')
        self.num_instances = int(num_instances)
        self.margin = float(margin)
        self.ip_weight = float(ip_weight)
        self.ip_loss_form = ip_loss_form
        self.tgsa_enabled = bool(tgsa_enabled)
        self.tgsa_distill_weight = float(tgsa_distill_weight)
        self.tgsa_mdr_weights = tuple(float(w) for w in tgsa_mdr_weights)
        self.tgsa_cross_mode = tgsa_cross_mode
        self.csa_weight = float(csa_weight)
        self.csa_set_level = bool(csa_set_level)
        self.mdr_logit_weight = float(mdr_logit_weight)
        self.discriminator_weight = float(discriminator_weight)
        self.confuser_weight = float(confuser_weight)
        self.confuser_mode = confuser_mode
        self.check_batch_layout = bool(check_batch_layout)

    @classmethod
    def from_config(cls, cfg, **overrides) -> 'IDKLLoss':
        """The loss of ``cfg.idkl`` with m = ``sampler.num_instances``; ``overrides`` replace
        single arguments (e.g. ``confuser_mode='grl'``)."""
        c = cfg.idkl
        kwargs = dict(
            num_instances=cfg.sampler.num_instances, margin=c.triplet.margin,
            ip_weight=c.ip.weight, ip_loss_form=c.ip.loss_form, tgsa_enabled=c.tgsa.enabled,
            tgsa_distill_weight=c.tgsa.distill_weight, tgsa_mdr_weights=tuple(c.tgsa.mdr_weights),
            tgsa_cross_mode=c.tgsa.cross_mode, csa_weight=c.csa.weight,
            csa_set_level=c.csa.set_level, mdr_logit_weight=c.mdr.logit_weight,
            discriminator_weight=c.discriminator.weight, confuser_weight=c.confuser.weight,
            confuser_mode=c.confuser.mode, check_batch_layout=c.check_batch_layout)
        kwargs.update(overrides)
        return cls(**kwargs)

    def forward(self, outputs: Dict[str, torch.Tensor], pids: torch.Tensor,
                modalities: torch.Tensor) -> Dict[str, torch.Tensor]:
        views = canonical_views(pids, modalities, self.num_instances, self.check_batch_layout)
        if self.confuser_mode == 'pseudo' and (pids.numel() // 2) % 2:
            raise ValueError(
                f'IDKL pseudo-label confuser needs an even number of images per modality '
                f'(P·m), got {pids.numel() // 2}; change train.batch_size / sampler.num_instances '
                f'or use idkl.confuser.mode grl')
        f_sh, f_sp = outputs['f_sh'].float(), outputs['f_sp'].float()
        z_sh, z_sp = outputs['z_sh'].float(), outputs['z_sp'].float()
        terms = {}
        terms['tri_sh'] = batch_hard_triplet(pairwise_distance(f_sh, f_sh, eps=TRIPLET_EPS), pids,
                                             pids, self.margin).mean()
        terms['tri_sp'] = batch_hard_triplet(pairwise_distance(f_sp, f_sp, eps=TRIPLET_EPS), pids,
                                             pids, self.margin).mean()
        terms['tri'] = terms['tri_sh'] + terms['tri_sp']
        terms['ce'] = cross_entropy(z_sh, pids)
        terms['id_pl'] = cross_entropy(z_sp, pids)
        terms['unad'] = cross_entropy(outputs['d_logits'], modalities.long())
        confuser_labels = (pseudo_modality_labels(views, pids.numel())
                           if self.confuser_mode == 'pseudo' else modalities.long())
        terms['pse'] = cross_entropy(outputs['q_logits'], confuser_labels)
        terms['F_p'] = discrimination_enhancing_loss(outputs['e_Fd'], outputs['e_F'],
                                                     self.ip_loss_form)
        terms['IN_p'] = discrepancy_reducing_loss(outputs['r_Fm'], outputs['r_F'], views,
                                                  self.ip_loss_form)
        zero = f_sh.new_zeros(())
        if self.tgsa_enabled:
            t_dist, t_mdr = tgsa_terms(f_sh, f_sp, views, self.tgsa_mdr_weights,
                                       self.tgsa_cross_mode)
            terms['soft_dt'] = t_mdr + self.tgsa_distill_weight * t_dist
        else:
            t_dist = t_mdr = terms['soft_dt'] = zero
        terms['tgsa_dist'], terms['tgsa_mdr'] = t_dist, t_mdr
        terms['bg_kl'], terms['sm_kl'] = csa_terms(z_sh, z_sp, views, self.csa_weight,
                                                   self.mdr_logit_weight, self.csa_set_level)
        terms['loss'] = (terms['tri'] + terms['ce'] + terms['id_pl']
                         + self.discriminator_weight * terms['unad']
                         + self.confuser_weight * terms['pse']
                         + self.ip_weight * (terms['F_p'] + terms['IN_p'])
                         + terms['soft_dt'] + terms['bg_kl'] + terms['sm_kl'])
        with torch.no_grad():
            terms['acc'] = (z_sh.argmax(1) == pids).float().mean() * 100.0
        return terms
