"""IDKL loss terms on hand-built tensors (spec idkl.md §3, §5, §10.5-10.9)."""
import math

import pytest
import torch
import torch.nn.functional as F

from torchreid_vi.methods.idkl.loss import (
    IDKLLoss,
    canonical_views,
    csa_terms,
    discrepancy_reducing_loss,
    discrimination_enhancing_loss,
    entropy,
    off_diagonal,
    off_diagonal_distances,
    pseudo_modality_labels,
    set_level_kl,
    set_level_rows,
    tgsa_terms,
)
from torchreid_vi.modeling.losses import symmetric_kl


def idkl_loss(**overrides):
    """The loss of the default config (``cfg.idkl``) with some arguments replaced."""
    from torchreid_vi.config import get_default_config
    return IDKLLoss.from_config(get_default_config(), **overrides)


VIS, IR = 0, 1


def official_layout(pid_list, m):
    """Released-code sampler layout: per identity IR, VIS, IR, VIS, … (K = 2m entries)."""
    pids, mods = [], []
    for pid in pid_list:
        for _ in range(m):
            pids += [pid, pid]
            mods += [IR, VIS]
    return torch.tensor(pids), torch.tensor(mods)


def block_layout(pid_list, m):
    """Our sampler's layout: all visible (K-blocks per identity), then all infrared."""
    pids = [pid for pid in pid_list for _ in range(m)] * 2
    mods = [VIS] * (len(pid_list) * m) + [IR] * (len(pid_list) * m)
    return torch.tensor(pids), torch.tensor(mods)


def permutation_official_to_block(pid_list, m):
    """perm with block[i] = official[perm[i]], keeping each identity's within-modality order."""
    n_ids = len(pid_list)
    vis = [p * 2 * m + 2 * k + 1 for p in range(n_ids) for k in range(m)]
    ir = [p * 2 * m + 2 * k for p in range(n_ids) for k in range(m)]
    return torch.tensor(vis + ir)


def random_outputs(batch, classes=7, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(batch, dim, generator=g) * 3 for k in ('f_sh', 'f_sp', 'r_F', 'r_Fm')}
    out.update({k: torch.randn(batch, classes, generator=g) * 2
                for k in ('z_sh', 'z_sp', 'e_F', 'e_Fd')})
    out.update({k: torch.randn(batch, 2, generator=g) for k in ('d_logits', 'q_logits')})
    return out


def explicit_J(a, b):
    pa, pb = F.softmax(a, 1), F.softmax(b, 1)
    return sum(float((pb[i] * (pb[i].log() - pa[i].log())).sum()
                     + (pa[i] * (pa[i].log() - pb[i].log())).sum())
               for i in range(a.shape[0])) / a.shape[0]


def explicit_R(s, t=None):
    t = s if t is None else t
    d = torch.cdist(s.double(), t.double()).float().clamp(min=1e-3)  # distances here are >> 1e-3
    return torch.stack([torch.cat([d[i, :i], d[i, i + 1:]]) for i in range(s.shape[0])])


# --------------------------------------------------------------------- symmetric KL J and S

def test_symmetric_kl_properties_and_gradients():
    a = torch.randn(5, 9, requires_grad=True)
    b = torch.randn(5, 9, requires_grad=True)
    jab, jba = symmetric_kl(a, b), symmetric_kl(b, a).detach()
    assert torch.allclose(jab, jba) and jab > 0
    assert math.isclose(jab.detach().item(), explicit_J(a.detach(), b.detach()), rel_tol=1e-5)
    with torch.no_grad():
        assert float(symmetric_kl(a, a)) == pytest.approx(0.0, abs=1e-7)
        assert float(symmetric_kl(a, a + torch.randn(5, 1))) == pytest.approx(0.0, abs=1e-6)
    jab.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0  # no detach on either side


def test_set_level_rows_is_chunk_and_concatenate():
    num_ids, m, c = 3, 4, 5
    z = torch.randn(num_ids * m, c)
    expected = torch.stack([torch.cat([z[p * m + k] for p in range(num_ids)]) for k in range(m)])
    assert torch.equal(set_level_rows(z, num_ids), expected)
    a, b = torch.randn(num_ids * m, c), torch.randn(num_ids * m, c)
    s = set_level_kl(a, b, num_ids)
    assert float(s) == pytest.approx(float(set_level_kl(b, a, num_ids)))
    assert float(s) == pytest.approx(
        explicit_J(set_level_rows(a, num_ids), set_level_rows(b, num_ids)), rel=1e-5)
    assert float(set_level_kl(a, a, num_ids)) == pytest.approx(0.0, abs=1e-7)


# --------------------------------------------------------------------- R(S)

def test_off_diagonal_distances_equal_explicit_deletion():
    s = torch.randn(7, 4) * 2
    r = off_diagonal_distances(s)
    assert r.shape == (7, 6)
    assert torch.allclose(r, explicit_R(s), atol=1e-4)
    # column c of row i refers to set position c (c < i) or c + 1 (c >= i)
    mat = torch.arange(16.).view(4, 4)
    assert off_diagonal(mat).tolist() == [[1, 2, 3], [4, 6, 7], [8, 9, 11], [12, 13, 14]]
    t = torch.randn(7, 4) * 2
    assert torch.allclose(off_diagonal_distances(s, t), explicit_R(s, t), atol=1e-4)


def test_off_diagonal_rejects_non_square():
    with pytest.raises(ValueError, match='square'):
        off_diagonal(torch.zeros(3, 4))


# --------------------------------------------------------------------- canonical views

def test_canonical_views_reproduce_boolean_selection_on_official_layout():
    pid_list, m = [11, 4, 9], 2
    pids, mods = official_layout(pid_list, m)
    views = canonical_views(pids, mods, m)
    assert views.vis.shape == (3, 2) and views.ir.shape == (3, 2)
    assert torch.equal(views.vis.reshape(-1), torch.arange(len(pids))[mods == VIS])
    assert torch.equal(views.ir.reshape(-1), torch.arange(len(pids))[mods == IR])


def test_canonical_views_pair_same_identity_and_slot_for_any_layout():
    pid_list, m = [5, 2, 8, 1], 3
    pids, mods = official_layout(pid_list, m)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        perm = torch.randperm(len(pids), generator=g)
        p2, m2 = pids[perm], mods[perm]
        views = canonical_views(p2, m2, m)
        assert torch.equal(p2[views.vis], p2[views.ir])            # row r: same identity
        assert (m2[views.vis] == VIS).all() and (m2[views.ir] == IR).all()
        # identities in order of first occurrence, images in order of occurrence
        seen = []
        for pid in p2.tolist():
            if pid not in seen:
                seen.append(pid)
        assert p2[views.vis[:, 0]].tolist() == seen
        assert (views.vis.diff(dim=1) > 0).all() and (views.ir.diff(dim=1) > 0).all()


@pytest.mark.parametrize('pids, mods, m, match', [
    ([1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 1, 0, 1, 1, 1], 2, 'vis 3 ir 1'),   # unbalanced modalities
    ([1, 1, 2, 2, 3, 3, 4, 4], [0, 1, 0, 1, 0, 1, 0, 1], 2, '4 identities'),  # m = 1 really
    ([1, 1, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1], 2, '2·P·K'),             # B not 2·P·m
    ([1, 1, 1, 1], [0, 2, 0, 2], 1, 'unknown modality'),
])
def test_canonical_views_reject_bad_batches_with_a_clear_message(pids, mods, m, match):
    with pytest.raises(ValueError, match=match):
        canonical_views(torch.tensor(pids), torch.tensor(mods), m)


# --------------------------------------------------------------------- pseudo labels

def test_pseudo_labels_match_code_pattern_on_official_layout():
    pids, mods = official_layout([3, 9, 4], 5)   # m odd: the pattern runs across identities
    labels = pseudo_modality_labels(canonical_views(pids, mods, 5), len(pids))
    assert labels.tolist() == [1, 0, 0, 1] * (len(pids) // 4) + [1, 0, 0, 1][:len(pids) % 4]


@pytest.mark.parametrize('seed', range(4))
def test_pseudo_labels_balanced_per_modality_for_any_layout(seed):
    pids, mods = official_layout([0, 1, 2, 3], 2)
    perm = torch.randperm(len(pids), generator=torch.Generator().manual_seed(seed))
    pids, mods = pids[perm], mods[perm]
    labels = pseudo_modality_labels(canonical_views(pids, mods, 2), len(pids))
    for modality in (VIS, IR):
        assert labels[mods == modality].sum() == (mods == modality).sum() // 2
    assert (labels == mods).float().mean() == 0.5


# --------------------------------------------------------------------- information purifier losses

def test_discrimination_enhancing_loss_against_direct_formula():
    e_f, e_fd = torch.randn(6, 5) * 2, torch.randn(6, 5) * 2

    def h(z):
        return -(F.softmax(z, 1) * F.log_softmax(z, 1)).sum(1)

    assert torch.allclose(entropy(e_f), h(e_f))
    gap = h(e_fd) - h(e_f)
    assert float(discrimination_enhancing_loss(e_fd, e_f)) == pytest.approx(
        float((gap.clamp(min=0).exp() - 1).mean()), rel=1e-6)
    assert float(discrimination_enhancing_loss(e_fd, e_f, 'paper')) == pytest.approx(
        float(torch.log1p(gap.exp()).mean()), rel=1e-6)
    assert float(discrimination_enhancing_loss(e_f, e_f)) == 0.0     # m_e ≡ 1
    with pytest.raises(ValueError, match='idkl.ip.loss_form'):
        discrimination_enhancing_loss(e_fd, e_f, 'nope')


def test_discrepancy_reducing_loss_against_direct_formula():
    pid_list, m = [4, 7, 1], 2
    pids, mods = official_layout(pid_list, m)
    r_f, r_fm = torch.randn(len(pids), 5), torch.randn(len(pids), 5)
    views = canonical_views(pids, mods, m)

    def delta(v, pid):
        c_v = v[(pids == pid) & (mods == VIS)].mean(0)
        c_i = v[(pids == pid) & (mods == IR)].mean(0)
        return (c_v - c_i + 1e-6).norm()

    gaps = torch.stack([delta(r_fm, p) - delta(r_f, p) for p in pid_list])
    assert float(discrepancy_reducing_loss(r_fm, r_f, views)) == pytest.approx(
        float(gaps.clamp(min=0).mean()), rel=1e-5)
    assert float(discrepancy_reducing_loss(r_fm, r_f, views, 'paper')) == pytest.approx(
        float(F.softplus(gaps).mean()), rel=1e-5)
    assert float(discrepancy_reducing_loss(r_f, r_f, views)) == 0.0   # m_r ≡ 1


# --------------------------------------------------------------------- TGSA and CSA

def test_tgsa_pairing_matches_boolean_selection_of_official_code():
    pid_list, m = [0, 1, 2, 3], 2                    # P = 4, N = 8: X = first 2 identities
    pids, mods = official_layout(pid_list, m)
    f_sh, f_sp = torch.randn(len(pids), 6) * 3, torch.randn(len(pids), 6) * 3
    views = canonical_views(pids, mods, m)
    t_dist, t_mdr = tgsa_terms(f_sh, f_sp, views, (1.0, 1.0, 1.0))

    # the released code: boolean selection in batch order, then explicit per-row deletion
    sh_v, sh_i, sp_v, sp_i = (f_sh[mods == VIS], f_sh[mods == IR],
                              f_sp[mods == VIS], f_sp[mods == IR])
    cross = torch.cat([sh_v[:4], sh_i[:4]])
    assert (pids[mods == VIS][:4].tolist() == [0, 0, 1, 1]
            and pids[mods == IR][:4].tolist() == [0, 0, 1, 1])
    a_v, a_i, a_x = explicit_R(sh_v), explicit_R(sh_i), explicit_R(cross)
    assert t_dist.item() == pytest.approx(
        explicit_J(a_v, explicit_R(sp_v)) + explicit_J(a_i, explicit_R(sp_i)), rel=1e-4)
    assert t_mdr.item() == pytest.approx(
        explicit_J(a_v, a_i) + explicit_J(a_v, a_x) + explicit_J(a_x, a_i), rel=1e-4)

    _, t_mdr_w = tgsa_terms(f_sh, f_sp, views, (0.1, 0.0, 0.0))
    assert t_mdr_w.item() == pytest.approx(0.1 * explicit_J(a_v, a_i), rel=1e-4)
    _, t_mdr_x = tgsa_terms(f_sh, f_sp, views, (0.0, 1.0, 0.0), cross_mode='cross_modal')
    assert t_mdr_x.item() == pytest.approx(explicit_J(a_v, explicit_R(sh_v, sh_i)), rel=1e-4)


def test_tgsa_distillation_vanishes_for_identical_branches():
    pids, mods = block_layout([0, 1, 2], 2)
    f = torch.randn(len(pids), 6) * 3
    t_dist, t_mdr = tgsa_terms(f, f.clone(), canonical_views(pids, mods, 2))
    assert float(t_dist) == pytest.approx(0.0, abs=1e-6) and float(t_mdr) > 0


def test_csa_terms_against_direct_formula():
    pid_list, m = [0, 1, 2], 2
    pids, mods = official_layout(pid_list, m)
    z_sh, z_sp = torch.randn(len(pids), 5) * 2, torch.randn(len(pids), 5) * 2
    views = canonical_views(pids, mods, m)
    l_bg, l_sm = csa_terms(z_sh, z_sp, views, csa_weight=0.8, mdr_weight=1.0)
    sh_v, sh_i, sp_v, sp_i = (z_sh[mods == VIS], z_sh[mods == IR],
                              z_sp[mods == VIS], z_sp[mods == IR])
    assert l_bg.item() == pytest.approx(
        explicit_J(sh_v, sh_i) + 0.8 * (explicit_J(sh_v, sp_v) + explicit_J(sh_i, sp_i)),
        rel=1e-5)

    def t(z):  # k-th image of every identity side by side
        return torch.stack([torch.cat([z[p * m + k] for p in range(len(pid_list))])
                            for k in range(m)])

    assert l_sm.item() == pytest.approx(explicit_J(t(sh_v), t(sh_i)) + 0.8 * (
        explicit_J(t(sh_v), t(sp_v)) + explicit_J(t(sh_i), t(sp_i))), rel=1e-5)
    # λ3 terms vanish when the branches agree; set-level off drops S
    l_bg_same, l_sm_off = csa_terms(z_sh, z_sh.clone(), views, 0.8, set_level=False)
    assert (l_bg_same.item() == pytest.approx(explicit_J(sh_v, sh_i), rel=1e-5)
            and float(l_sm_off) == 0.0)


def test_distillation_and_csa_terms_send_gradient_into_both_branches():
    """The released code has no stop-gradient anywhere (spec §3, "no detach"): T_dist pulls the
    specific branch's affinities towards the shared ones and back, and CSA's J(z_sh, z_sp) terms
    train both heads. A detach on either side would leave the forward values unchanged."""
    pids, mods = official_layout([0, 1, 2, 3], 2)
    views = canonical_views(pids, mods, 2)
    f_sh = (torch.randn(len(pids), 6) * 3).requires_grad_()
    f_sp = (torch.randn(len(pids), 6) * 3).requires_grad_()
    t_dist, _ = tgsa_terms(f_sh, f_sp, views, (0.0, 0.0, 0.0))
    g_sh, g_sp = torch.autograd.grad(t_dist, (f_sh, f_sp))
    for mod in (VIS, IR):  # each modality's rows, through its own J term
        assert g_sh[mods == mod].abs().sum() > 0 and g_sp[mods == mod].abs().sum() > 0, mod
    z_sh = (torch.randn(len(pids), 5) * 2).requires_grad_()
    z_sp = (torch.randn(len(pids), 5) * 2).requires_grad_()
    for set_level in (False, True):
        l_bg, l_sm = csa_terms(z_sh, z_sp, views, csa_weight=0.8, mdr_weight=0.0,
                               set_level=set_level)
        term = l_sm if set_level else l_bg
        g_sh, g_sp = torch.autograd.grad(term, (z_sh, z_sp))
        for mod in (VIS, IR):
            assert (g_sh[mods == mod].abs().sum() > 0
                    and g_sp[mods == mod].abs().sum() > 0), (set_level, mod)


# --------------------------------------------------------------------- total loss

def test_total_loss_is_the_weighted_sum_and_terms_are_nonnegative():
    pids, mods = official_layout([0, 1, 2, 3], 2)
    out = random_outputs(len(pids))
    crit = idkl_loss(num_instances=2)
    terms = crit(out, pids, mods)
    for name in ('tri_sh', 'tri_sp', 'ce', 'id_pl', 'unad', 'pse', 'F_p', 'IN_p', 'soft_dt',
                 'tgsa_dist', 'tgsa_mdr', 'bg_kl', 'sm_kl'):
        assert terms[name] >= 0, name
    expected = (terms['tri'] + terms['ce'] + terms['id_pl'] + terms['unad'] + terms['pse']
                + 0.1 * (terms['F_p'] + terms['IN_p']) + terms['tgsa_mdr']
                + 0.6 * terms['tgsa_dist'] + terms['bg_kl'] + terms['sm_kl'])
    assert float(terms['loss']) == pytest.approx(float(expected), rel=1e-6)
    assert float(terms['tri']) == pytest.approx(float(terms['tri_sh'] + terms['tri_sp']))
    # the pseudo-label confuser target: code pattern on this layout
    pse = F.cross_entropy(out['q_logits'], torch.tensor([1, 0, 0, 1] * 4))
    assert float(terms['pse']) == pytest.approx(float(pse), rel=1e-6)
    # paper mode: true modality labels
    grl = idkl_loss(num_instances=2, confuser_mode='grl')(out, pids, mods)
    assert float(grl['pse']) == pytest.approx(float(F.cross_entropy(out['q_logits'], mods)),
                                              rel=1e-6)
    # TGSA off (RegDB): no soft_dt in the total
    off = idkl_loss(num_instances=2, tgsa_enabled=False, csa_weight=0.3)(out, pids, mods)
    assert float(off['soft_dt']) == 0.0
    assert float(off['loss']) < float(terms['loss'])


def test_total_loss_is_layout_invariant():
    """§10.9: official interleaved layout vs all-visible-then-all-infrared give the same loss."""
    pid_list, m = [6, 2, 0, 4], 2
    pids, mods = official_layout(pid_list, m)
    out = random_outputs(len(pids), seed=5)
    perm = permutation_official_to_block(pid_list, m)
    pids_b, mods_b = block_layout(pid_list, m)
    assert torch.equal(pids[perm], pids_b) and torch.equal(mods[perm], mods_b)
    crit = idkl_loss(num_instances=m)
    a = crit(out, pids, mods)
    b = crit({k: v[perm] for k, v in out.items()}, pids_b, mods_b)
    for name in a:
        assert float(a[name]) == pytest.approx(float(b[name]), rel=1e-5, abs=1e-6), name


def test_loss_path_has_no_data_dependent_host_sync():
    """With the layout check off, the whole loss (and its backward) runs on the meta device:
    no .item(), no nonzero, no boolean indexing — nothing that needs tensor values on the host."""
    pids, mods = official_layout([0, 1, 2], 2)
    out = {k: v.to('meta').requires_grad_() for k, v in random_outputs(len(pids)).items()}
    crit = idkl_loss(num_instances=2, check_batch_layout=False)
    terms = crit(out, pids.to('meta'), mods.to('meta'))
    terms['loss'].backward()
    assert out['f_sh'].grad is not None and out['f_sh'].grad.shape == out['f_sh'].shape
    with pytest.raises(Exception):   # the check itself does synchronise (and can be switched off)
        idkl_loss(num_instances=2)(out, pids.to('meta'), mods.to('meta'))


def test_invalid_options_name_the_config_key():
    with pytest.raises(ValueError, match='idkl.tgsa.cross_mode'):
        idkl_loss(num_instances=2, tgsa_cross_mode='bad')
    with pytest.raises(ValueError, match='idkl.confuser.mode'):
        idkl_loss(num_instances=2, confuser_mode='bad')
    with pytest.raises(ValueError, match='mdr_weights'):
        idkl_loss(num_instances=2, tgsa_mdr_weights=(1, 1))
    # N = 3 images per modality: pseudo labels unbalanced
    pids, mods = official_layout([0, 1, 2], 1)
    with pytest.raises(ValueError, match='even number'):
        idkl_loss(num_instances=1)(random_outputs(len(pids)), pids, mods)
    with pytest.raises(ValueError, match='mixed_set needs an even number'):
        idkl_loss(num_instances=1, confuser_mode='grl')(random_outputs(len(pids)), pids, mods)
    idkl_loss(num_instances=1, confuser_mode='grl', tgsa_cross_mode='cross_modal')(
        random_outputs(len(pids)), pids, mods)


# --------------------------------------------------------------------- every term, independently

def _reference_views(pids, mods):
    """Canonical views by hand: identities by first occurrence, each identity's visible and
    infrared batch positions in order of occurrence -> two lists of batch positions."""
    ids = []
    for pid in pids.tolist():
        if pid not in ids:
            ids.append(pid)
    vis = [i for pid in ids for i in range(len(pids)) if pids[i] == pid and mods[i] == VIS]
    ir = [i for pid in ids for i in range(len(pids)) if pids[i] == pid and mods[i] == IR]
    return ids, vis, ir


def _reference_triplet(x, y, margin):
    d = torch.cdist(x.double(), x.double())
    return sum(max(0.0, margin + float(d[i][y == y[i]].max()) - float(d[i][y != y[i]].min()))
               for i in range(len(y))) / len(y)


def _reference_entropy(z):
    p = F.softmax(z.double(), dim=0)
    return -float((p * p.log()).sum())


def _reference_T(z, num_ids, m):
    """k-th image of every identity side by side: row k = [z_{0m+k}, z_{1m+k}, ...]."""
    return torch.stack([torch.cat([z[p * m + k] for p in range(num_ids)]) for k in range(m)])


def reference_idkl_terms(out, pids, mods, m, *, margin, ip_weight, distill_weight, mdr_weights,
                         csa_weight, mdr_logit_weight=1.0, tgsa=True):
    """Spec idkl.md §3 term by term with Python loops over anchors / samples / identities."""
    ids, vis, ir = _reference_views(pids, mods)
    num_ids, n = len(ids), len(vis)
    t = {}
    t['tri_sh'] = _reference_triplet(out['f_sh'], pids, margin)
    t['tri_sp'] = _reference_triplet(out['f_sp'], pids, margin)
    t['tri'] = t['tri_sh'] + t['tri_sp']
    t['ce'] = float(F.cross_entropy(out['z_sh'], pids))
    t['id_pl'] = float(F.cross_entropy(out['z_sp'], pids))
    t['unad'] = float(F.cross_entropy(out['d_logits'], mods))
    pseudo = torch.zeros(len(pids), dtype=torch.long)
    for r in range(n):                       # IR row r: 1 if r even; visible row r: 1 if r odd
        pseudo[ir[r]] = 1 if r % 2 == 0 else 0
        pseudo[vis[r]] = 1 if r % 2 == 1 else 0
    t['pse'] = float(F.cross_entropy(out['q_logits'], pseudo))
    t['F_p'] = sum(math.exp(max(0.0, _reference_entropy(out['e_Fd'][i])
                                - _reference_entropy(out['e_F'][i]))) - 1.0
                   for i in range(len(pids))) / len(pids)

    def delta(v, p):
        c_v = v[vis[p * m:(p + 1) * m]].double().mean(0)
        c_i = v[ir[p * m:(p + 1) * m]].double().mean(0)
        return float((c_v - c_i + 1e-6).norm())
    t['IN_p'] = sum(max(0.0, delta(out['r_Fm'], p) - delta(out['r_F'], p))
                    for p in range(num_ids)) / num_ids

    sh_v, sh_i = out['f_sh'][vis], out['f_sh'][ir]
    sp_v, sp_i = out['f_sp'][vis], out['f_sp'][ir]
    if tgsa:
        a_v, a_i = explicit_R(sh_v), explicit_R(sh_i)
        cross = torch.cat([sh_v[:n // 2], sh_i[:n // 2]])
        a_x = explicit_R(cross)
        t['tgsa_dist'] = explicit_J(a_v, explicit_R(sp_v)) + explicit_J(a_i, explicit_R(sp_i))
        w1, w2, w3 = mdr_weights
        t['tgsa_mdr'] = (w1 * explicit_J(a_v, a_i) + w2 * explicit_J(a_v, a_x)
                         + w3 * explicit_J(a_x, a_i))
        t['soft_dt'] = t['tgsa_mdr'] + distill_weight * t['tgsa_dist']
    else:
        t['tgsa_dist'] = t['tgsa_mdr'] = t['soft_dt'] = 0.0
    z_v, z_i = out['z_sh'][vis], out['z_sh'][ir]
    zp_v, zp_i = out['z_sp'][vis], out['z_sp'][ir]
    t['bg_kl'] = mdr_logit_weight * explicit_J(z_v, z_i) + csa_weight * (
        explicit_J(z_v, zp_v) + explicit_J(z_i, zp_i))

    def S(a, b):
        return explicit_J(_reference_T(a, num_ids, m), _reference_T(b, num_ids, m))
    t['sm_kl'] = mdr_logit_weight * S(z_v, z_i) + csa_weight * (S(z_v, zp_v) + S(z_i, zp_i))
    t['loss'] = (t['tri'] + t['ce'] + t['id_pl'] + t['unad'] + t['pse']
                 + ip_weight * (t['F_p'] + t['IN_p']) + t['soft_dt'] + t['bg_kl'] + t['sm_kl'])
    t['acc'] = 100.0 * float((out['z_sh'].argmax(1) == pids).float().mean())
    return t


def scrambled_batch(pid_list, m, seed):
    """P identities x (m visible + m infrared), rows shuffled: the two modalities list the
    identities in different orders and the images of an identity are scattered."""
    pids, mods = block_layout(pid_list, m)
    perm = torch.randperm(len(pids), generator=torch.Generator().manual_seed(seed))
    return pids[perm], mods[perm]


@pytest.mark.parametrize('dataset', ['sysu', 'regdb'])
def test_every_term_equals_the_explicit_reference_on_a_scrambled_batch(dataset):
    pid_list, m = [6, 2, 9, 4], 3                  # N = 12 per modality: X = first 2 identities
    pids, mods = scrambled_batch(pid_list, m, seed=3)
    vis_order = [p for p in dict.fromkeys(pids[mods == VIS].tolist())]
    ir_order = [p for p in dict.fromkeys(pids[mods == IR].tolist())]
    assert vis_order != ir_order                   # the modalities disagree on identity order
    out = random_outputs(len(pids), classes=10, dim=6, seed=11)
    for k in ('f_sh', 'f_sp'):                     # identity structure: some hinges active
        out[k] = out[k] + 6.0 * torch.randn(10, 6, generator=torch.Generator().manual_seed(2))[pids]
    out['e_Fd'] = out['e_F'] + torch.randn(out['e_F'].shape, generator=torch.Generator()
                                           .manual_seed(4))     # L_e: some samples active
    weights = dict(margin=1.3, ip_weight=0.1, distill_weight=0.6, mdr_weights=(1.0, 1.0, 1.0),
                   csa_weight=0.8) if dataset == 'sysu' else dict(
        margin=1.3, ip_weight=0.1, distill_weight=0.1, mdr_weights=(0.1, 0.0, 0.0),
        csa_weight=0.3, tgsa=False)
    kwargs = dict(num_instances=m, margin=weights['margin'], ip_weight=weights['ip_weight'],
                  tgsa_distill_weight=weights['distill_weight'],
                  tgsa_mdr_weights=weights['mdr_weights'], csa_weight=weights['csa_weight'],
                  tgsa_enabled=weights.get('tgsa', True))
    terms = idkl_loss(**kwargs)(out, pids, mods)
    expected = reference_idkl_terms(out, pids, mods, m, **weights)
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-4, abs=1e-6), name
    # both sides of the hinges are exercised (triplet 8/24 anchors, L_e 10/24 samples, L_r 3/4
    # identities active): a term that ignored its hinge or mixed up its inputs would show
    assert 0 < expected['tri_sh'] and 0 < expected['tri_sp'] and 0 < expected['F_p']
    assert 0 < expected['IN_p']


def test_weights_reach_their_own_terms_only():
    """Each weight of cfg.idkl scales exactly its term of the total (against the reference)."""
    pids, mods = scrambled_batch([1, 5, 3, 0], 2, seed=8)
    out = random_outputs(len(pids), seed=9)
    base = dict(margin=1.3, ip_weight=0.1, distill_weight=0.6, mdr_weights=(1.0, 1.0, 1.0),
                csa_weight=0.8)
    odd = dict(margin=0.7, ip_weight=0.35, distill_weight=0.45, mdr_weights=(0.2, 0.7, 1.9),
               csa_weight=0.55, mdr_logit_weight=1.7)
    for weights in (base, odd):
        terms = idkl_loss(num_instances=2, margin=weights['margin'],
                          ip_weight=weights['ip_weight'],
                          tgsa_distill_weight=weights['distill_weight'],
                          tgsa_mdr_weights=weights['mdr_weights'],
                          csa_weight=weights['csa_weight'],
                          mdr_logit_weight=weights.get('mdr_logit_weight', 1.0))(out, pids, mods)
        expected = reference_idkl_terms(out, pids, mods, 2, **weights)
        for name in ('tri', 'soft_dt', 'tgsa_mdr', 'bg_kl', 'sm_kl', 'loss'):
            assert float(terms[name]) == pytest.approx(expected[name], rel=1e-4), (name, weights)
    # discriminator / confuser weights scale their CE terms in the total
    plain = idkl_loss(num_instances=2)(out, pids, mods)
    scaled = idkl_loss(num_instances=2, discriminator_weight=0.5, confuser_weight=2.0)(
        out, pids, mods)
    assert float(scaled['loss'] - plain['loss']) == pytest.approx(
        float(-0.5 * plain['unad'] + plain['pse']), rel=1e-4)
