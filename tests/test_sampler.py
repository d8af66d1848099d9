"""ModalityBalancedSampler: batch layout, determinism, robustness and length (spec §5.5, §7.3)."""
from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from torchreid_vi.data.base import INFRARED, VISIBLE
from torchreid_vi.data.sampler import ModalityBalancedSampler, batch_layout


def make_data(counts, seed=0):
    """Records from ``{pid: (n_vis, n_ir)}``, interleaved in a shuffled order."""
    rows = [(f'{pid}_{m}_{k}.jpg', pid, 1 + m, m)
            for pid, (nv, ni) in counts.items() for m, n in ((VISIBLE, nv), (INFRARED, ni))
            for k in range(n)]
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order]


# Non-contiguous pids, uneven counts.
COUNTS = {pid: (3 + pid % 7, 2 + pid % 5) for pid in (5, 17, 18, 40, 41, 77, 90, 91, 300, 1000)}
P, K = 3, 2


def batches(sampler):
    idx = list(sampler)
    bs = sampler.batch_size
    assert len(idx) % bs == 0
    return [idx[i:i + bs] for i in range(0, len(idx), bs)]


MODES = ['agw', 'cover', 'idkl']


def assert_layout(batch, data, p, k):
    """``batch``: P distinct ids, K visible then (second half) K infrared each, j <-> PK + j."""
    pids = [data[i][1] for i in batch]
    mods = [data[i][3] for i in batch]
    assert len(batch) == 2 * p * k
    assert mods == [VISIBLE] * (p * k) + [INFRARED] * (p * k)
    assert pids[:p * k] == pids[p * k:]                    # position j and PK + j
    blocks = [pids[b * k:(b + 1) * k] for b in range(p)]
    assert all(len(set(b)) == 1 for b in blocks)           # K-blocks per identity
    assert len({b[0] for b in blocks}) == p                # P distinct identities
    return [b[0] for b in blocks]


@pytest.mark.parametrize('epoch_mode,replace', [('agw', 'auto'), ('agw', 'always'),
                                                ('cover', 'auto'), ('cover', 'always'),
                                                ('idkl', 'auto')])
def test_batch_layout(epoch_mode, replace):
    data = make_data(COUNTS)
    s = ModalityBalancedSampler(data, 2 * P * K, K, seed=3, epoch_mode=epoch_mode, replace=replace)
    for _ in range(3):
        for batch in batches(s):
            assert_layout(batch, data, P, K)


@pytest.mark.parametrize('epoch_mode', MODES)
def test_without_replacement_when_enough_images(epoch_mode):
    data = make_data(COUNTS)
    s = ModalityBalancedSampler(data, 2 * P * K, K, seed=0, epoch_mode=epoch_mode)
    for _ in range(5):
        for batch in batches(s):
            for b in range(2 * P):
                assert len(set(batch[b * K:(b + 1) * K])) == K


def test_replace_always_draws_with_replacement():
    data = make_data({p: (2, 2) for p in range(8)})
    s = ModalityBalancedSampler(data, 2 * 4 * 2, 2, seed=0, replace='always')
    blocks = [tuple(b[i:i + 2]) for _ in range(20) for b in batches(s) for i in range(0, 16, 2)]
    assert any(len(set(b)) == 1 for b in blocks)  # AGW's distribution repeats images


@pytest.mark.parametrize('epoch_mode', MODES)
def test_same_seed_and_epoch_give_same_output_and_epochs_differ(epoch_mode):
    data = make_data(COUNTS)
    a = ModalityBalancedSampler(data, 2 * P * K, K, seed=7, epoch_mode=epoch_mode)
    b = ModalityBalancedSampler(data, 2 * P * K, K, seed=7, epoch_mode=epoch_mode)
    first_a, second_a = list(a), list(a)            # __iter__ advances the epoch
    assert a.epoch == 2
    assert list(b) == first_a and first_a != second_a
    b.set_epoch(1)
    assert list(b) == second_a
    assert list(ModalityBalancedSampler(data, 2 * P * K, K, seed=8,
                                        epoch_mode=epoch_mode)) != first_a


@pytest.mark.parametrize('epoch_mode', MODES)
def test_output_does_not_depend_on_global_rng_state(epoch_mode):
    data = make_data(COUNTS)
    out = []
    for g in (0, 123):
        random.seed(g)
        np.random.seed(g)
        torch.manual_seed(g)
        state = (random.getstate(), np.random.get_state()[1].copy())
        out.append(list(ModalityBalancedSampler(data, 2 * P * K, K, seed=1,
                                                epoch_mode=epoch_mode)))
        assert random.getstate() == state[0]
        assert (np.random.get_state()[1] == state[1]).all()
    assert out[0] == out[1]


@pytest.mark.parametrize('epoch_mode', MODES)
def test_identity_with_one_ir_image_gives_k_identical_indices(epoch_mode):
    counts = {p: (6, 6) for p in range(4)}
    counts[9] = (6, 1)
    data = make_data(counts)
    only_ir = next(i for i, r in enumerate(data) if r[1] == 9 and r[3] == INFRARED)
    s = ModalityBalancedSampler(data, 2 * 2 * 4, 4, seed=0, epoch_mode=epoch_mode)
    seen = 0
    for _ in range(10):
        for batch in batches(s):
            for b in range(2):
                vis_block = batch[b * 4:(b + 1) * 4]
                if data[vis_block[0]][1] == 9:
                    seen += 1
                    assert batch[8 + b * 4: 8 + (b + 1) * 4] == [only_ir] * 4
    assert seen > 0


@pytest.mark.parametrize('epoch_mode', MODES)
def test_ids_with_one_modality_are_never_drawn_and_logged_once(caplog, epoch_mode):
    counts = dict(COUNTS)
    counts.update({500: (4, 0), 501: (0, 3), 502: (5, 0)})
    data = make_data(counts)
    with caplog.at_level(logging.INFO, logger='torchreid_vi.data.sampler'):
        s = ModalityBalancedSampler(data, 2 * P * K, K, seed=0, epoch_mode=epoch_mode)
    lines = [r.getMessage() for r in caplog.records if r.name == 'torchreid_vi.data.sampler']
    assert len(lines) == 1
    assert '10 of 13 ids' in lines[0] and '1 lack IR' not in lines[0] and '2 lack IR' in lines[0]
    assert '1 lack visible' in lines[0]
    assert sorted(s.eligible_pids) == sorted(COUNTS)
    drawn = {data[i][1] for _ in range(10) for i in s}
    assert drawn.isdisjoint({500, 501, 502})


def test_too_few_eligible_ids_raise_with_counts():
    counts = {1: (3, 3), 2: (3, 3), 3: (3, 0), 4: (0, 2), 5: (2, 0)}
    with pytest.raises(ValueError, match=r'need >= P=3 ids with both modalities, found 2 '
                                         r'\(2 ids lack IR, 1 lack visible\)'):
        ModalityBalancedSampler(make_data(counts), 2 * 3 * 2, 2)


@pytest.mark.parametrize('epoch_mode', MODES)
def test_len_is_the_number_of_indices_yielded(epoch_mode):
    data = make_data(COUNTS)
    s = ModalityBalancedSampler(data, 2 * P * K, K, epoch_mode=epoch_mode)
    for _ in range(3):
        n = len(s)
        assert len(list(s)) == n
    if epoch_mode == 'agw':
        n_vis = sum(v for v, _ in COUNTS.values())
        n_ir = sum(r for _, r in COUNTS.values())
        assert len(s) == (max(n_vis, n_ir) // (P * K) + 1) * 2 * P * K
    elif epoch_mode == 'cover':
        assert len(s) == -(-len(COUNTS) // P) * 2 * P * K


def test_cover_epoch_sees_every_eligible_id():
    data = make_data(COUNTS)
    s = ModalityBalancedSampler(data, 2 * P * K, K, seed=4, epoch_mode='cover')
    for _ in range(5):
        assert {data[i][1] for i in s} == set(COUNTS)


def test_agw_epoch_draws_identities_uniformly():
    data = make_data({p: (4, 4) for p in range(10)})
    s = ModalityBalancedSampler(data, 2 * 2 * 2, 2, seed=0)
    hits = np.zeros(10)
    for _ in range(100):
        for batch in batches(s):
            hits[[data[batch[0]][1], data[batch[2]][1]]] += 1
    assert hits.min() > 0.75 * hits.mean() and hits.max() < 1.25 * hits.mean()


def test_batch_layout_helper_and_bad_sizes():
    assert batch_layout(64, 4) == (8, 4)
    assert batch_layout(12, 2) == (3, 2)
    for bs, k in ((30, 4), (4, 4), (0, 1)):
        with pytest.raises(ValueError, match=r'train.batch_size=.* must be 2·P·K .*num_instances'):
            batch_layout(bs, k)
    with pytest.raises(ValueError, match='num_instances'):
        batch_layout(8, 0)
    with pytest.raises(ValueError, match='2·P·K'):
        ModalityBalancedSampler(make_data(COUNTS), 10, 2)


def test_bad_modality_codes_and_options_raise():
    data = make_data(COUNTS)
    bad = [(p, pid, cam, 2 if i == 3 else m) for i, (p, pid, cam, m) in enumerate(data)]
    with pytest.raises(ValueError, match='item 3 has dsetid 2.*modality'):
        ModalityBalancedSampler(bad, 12, 2)
    with pytest.raises(ValueError, match=r"vi.sampler.epoch_mode='all'; expected one of "
                                         r"\('agw', 'cover', 'idkl'\)"):
        ModalityBalancedSampler(data, 12, 2, epoch_mode='all')
    with pytest.raises(ValueError, match="vi.sampler.replace='never'"):
        ModalityBalancedSampler(data, 12, 2, replace='never')
    with pytest.raises(ValueError, match=r"vi.sampler.replace='always' cannot be combined with "
                                         r"vi.sampler.epoch_mode='idkl'; expected 'auto'"):
        ModalityBalancedSampler(data, 12, 2, epoch_mode='idkl', replace='always')


def test_dataloader_batches_have_the_layout(sysu_root):
    import torchvision.transforms as T

    from torchreid_vi.data.sysu_mm01 import SYSUMM01
    root, _ = sysu_root
    ds = SYSUMM01(root=root, verbose=False, transform=T.Compose([T.Resize((16, 8)),
                                                                 T.ToTensor()]))
    p, k = 4, 2
    s = ModalityBalancedSampler(ds.train, 2 * p * k, k, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=2 * p * k, sampler=s, drop_last=True,
                                         num_workers=0)
    assert len(loader) == len(s) // (2 * p * k)
    for step, data in enumerate(loader):
        assert tuple(data['img'].shape) == (2 * p * k, 3, 16, 8)
        assert data['modality'].tolist() == [VISIBLE] * (p * k) + [INFRARED] * (p * k)
        assert torch.equal(data['pid'][:p * k], data['pid'][p * k:])
        assert data['pid'][:p * k].view(p, k).unique(dim=1).shape == (p, 1)
        assert data['pid'][:p * k:k].unique().numel() == p
        if step == 2:
            break


# --- 'idkl' epochs (spec idkl.md §6) -------------------------------------------------------------
# Chunks of an id with (n_vis, n_ir): max(1, min(n_vis, n_ir) // K), written out by hand below.

def idkl_sampler(counts, p, k, seed=0):
    data = make_data(counts)
    return data, ModalityBalancedSampler(data, 2 * p * k, k, seed=seed, epoch_mode='idkl')


def epoch_pids(data, sampler, p, k):
    """One epoch as a list of per-batch id lists (layout asserted on the way)."""
    return [assert_layout(b, data, p, k) for b in batches(sampler)]


def test_idkl_when_every_id_is_in_every_batch_the_epoch_is_the_fewest_chunks():
    # P = all 4 ids: every round takes each id once, so it stops when the first id runs out.
    # Chunks (K=2): (9,7) -> 3, (12,7) -> 3, (8,9) -> 4, (13,6) -> 3.
    counts = {1: (9, 7), 2: (12, 7), 3: (8, 9), 4: (13, 6)}
    data, s = idkl_sampler(counts, 4, 2)
    for _ in range(5):
        assert len(epoch_pids(data, s, 4, 2)) == 3


def test_idkl_with_one_id_per_batch_every_chunk_is_used():
    # P = 1: rounds go on until no chunk is left. Chunks (K=2): (9,7) 3, (1,5) 1 and (1,1) 1
    # (a modality below K: one chunk), (4,3) 1, (6,6) 3, (4,5) 2; 11 in all.
    counts = {1: (9, 7), 2: (1, 5), 3: (1, 1), 4: (4, 3), 5: (6, 6), 6: (4, 5)}
    data, s = idkl_sampler(counts, 1, 2)
    for _ in range(5):
        pids = epoch_pids(data, s, 1, 2)
        assert len(pids) == 11
        assert sorted(p for (p,) in pids) == [1] * 3 + [2, 3, 4] + [5] * 3 + [6] * 2


@pytest.mark.parametrize('num_ids,expected', [(5, 1), (6, 2), (8, 2), (9, 3), (10, 3)])
def test_idkl_epoch_stops_when_fewer_than_p_ids_have_chunks(num_ids, expected):
    # One chunk per id (K=3, 3..5 images): each round retires P=3 ids for good, so the epoch has
    # num_ids // 3 batches and the num_ids % 3 ids left over are not drawn.
    counts = {10 + i: (3 + i % 3, 4 + i % 2) for i in range(num_ids)}
    data, s = idkl_sampler(counts, 3, 3)
    for _ in range(5):
        pids = epoch_pids(data, s, 3, 3)
        assert len(pids) == expected
        flat = [p for b in pids for p in b]
        assert len(flat) == len(set(flat))            # one chunk each: no id twice


def test_idkl_epoch_length_follows_the_uniform_draw_of_ids_with_chunks_left():
    # 3 ids with 2 chunks each, P = 2. Round 1 takes some pair. Round 2 draws one of the 3 pairs
    # uniformly: the same pair (1/3) leaves a single id with chunks -> stop at 2 batches; another
    # pair (2/3) leaves two ids with one chunk each -> a third batch.
    counts = {1: (4, 5), 2: (6, 4), 3: (5, 5)}
    data, s = idkl_sampler(counts, 2, 2, seed=11)
    lengths = [len(epoch_pids(data, s, 2, 2)) for _ in range(600)]
    assert set(lengths) == {2, 3}
    assert 0.27 < lengths.count(2) / 600 < 0.40


def test_idkl_len_and_epoch_batches_follow_the_draw_of_each_epoch():
    counts = {1: (4, 5), 2: (6, 4), 3: (5, 5)}
    data, s = idkl_sampler(counts, 2, 2, seed=11)
    seen = set()
    for e in range(20):
        n = len(s)
        assert s.num_batches_in_epoch(e) * 8 == n
        out = list(s)
        assert len(out) == n and np.array_equal(s.epoch_batches(e).reshape(-1), out)
        seen.add(n)
    assert seen == {16, 24}                             # the length really changes per epoch


def test_idkl_uses_each_image_at_most_once_per_epoch_and_subsamples_the_longer_modality():
    # K=2, P = all 4 ids, min(n_vis, n_ir) = 6 for each: 3 batches, every image of the shorter
    # modality exactly once per epoch, 6 distinct images of the longer one, all of them over epochs.
    counts = {1: (9, 6), 2: (6, 11), 3: (6, 6), 4: (7, 6)}
    data, s = idkl_sampler(counts, 4, 2)
    used_long = {pid: set() for pid in counts}
    for _ in range(30):
        idx = list(s)
        assert len(idx) == 3 * 16
        assert len(idx) == len(set(idx))               # no image twice in the epoch
        for pid, (nv, ni) in counts.items():
            mine = [i for i in idx if data[i][1] == pid]
            vis = {i for i in mine if data[i][3] == VISIBLE}
            ir = {i for i in mine if data[i][3] == INFRARED}
            assert len(vis) == len(ir) == 6            # the shorter list, cut to chunks of K
            used_long[pid] |= vis if nv > ni else ir
    for pid, (nv, ni) in counts.items():
        assert len(used_long[pid]) == max(nv, ni)      # a random subset, not always the first 6


def test_idkl_ids_below_k_in_one_or_both_modalities_draw_with_replacement():
    # K=4. id 50: 7 visible, 2 IR (one below K: the released code crashes here); id 51: 2 and 3
    # (both below K). Each gives one chunk: K IR drawn from its few images with replacement, and
    # for id 50 K distinct visible images (the longer list cut to K without replacement).
    counts = {p: (8, 8) for p in range(5)}
    counts.update({50: (7, 2), 51: (2, 3)})
    data, s = idkl_sampler(counts, 2, 4)
    own = {(pid, m): {i for i, r in enumerate(data) if r[1] == pid and r[3] == m}
           for pid in (50, 51) for m in (VISIBLE, INFRARED)}
    drawn = {key: set() for key in own}
    appearances = {50: 0, 51: 0}
    for _ in range(40):
        per_epoch = {50: 0, 51: 0}
        for batch in batches(s):
            for b, pid in enumerate(assert_layout(batch, data, 2, 4)):
                if pid not in per_epoch:
                    continue
                per_epoch[pid] += 1
                vis, ir = batch[b * 4:(b + 1) * 4], batch[8 + b * 4:8 + (b + 1) * 4]
                assert set(vis) <= own[pid, VISIBLE] and set(ir) <= own[pid, INFRARED]
                if pid == 50:
                    assert len(set(vis)) == 4
                drawn[pid, VISIBLE] |= set(vis)
                drawn[pid, INFRARED] |= set(ir)
        assert max(per_epoch.values()) <= 1            # one chunk each per epoch
        for pid in per_epoch:
            appearances[pid] += per_epoch[pid]
    assert min(appearances.values()) > 0
    assert drawn == own                                # every short image gets drawn


@pytest.mark.parametrize('epoch_mode', MODES)
def test_epoch_batches_is_what_iteration_yields_and_is_pure(epoch_mode):
    data = make_data(COUNTS)
    s = ModalityBalancedSampler(data, 2 * P * K, K, seed=2, epoch_mode=epoch_mode)
    ahead = [s.epoch_batches(e).copy() for e in range(6)]   # planned before iterating
    assert s.epoch == 0
    for e in range(6):
        assert s.num_batches_in_epoch(e) == len(ahead[e]) == len(s) // (2 * P * K)
        out = np.asarray(list(s)).reshape(-1, 2 * P * K)
        assert np.array_equal(out, ahead[e])
    s.set_epoch(3)
    assert np.array_equal(np.asarray(list(s)).reshape(-1, 2 * P * K), ahead[3])
    fresh = ModalityBalancedSampler(data, 2 * P * K, K, seed=2, epoch_mode=epoch_mode)
    assert np.array_equal(fresh.epoch_batches(4), ahead[4])  # not a function of what ran before
    with pytest.raises(ValueError):
        s.epoch_batches(0)[0, 0] = -1                        # the cached plan cannot be edited


@pytest.mark.parametrize('epoch_mode', MODES)
@pytest.mark.parametrize('world_size', [1, 2, 3, 6])
def test_rank_positions_split_each_batch_into_balanced_batches_of_disjoint_ids(epoch_mode,
                                                                               world_size):
    p, k = 6, 2
    data = make_data({pid: (5 + pid % 4, 4 + pid % 3) for pid in range(14)})
    s = ModalityBalancedSampler(data, 2 * p * k, k, seed=0, epoch_mode=epoch_mode)
    pos = [s.rank_positions(r, world_size) for r in range(world_size)]
    assert sorted(np.concatenate(pos).tolist()) == list(range(2 * p * k))
    for batch in s.epoch_batches(0):
        ids = [assert_layout(batch[q].tolist(), data, p // world_size, k) for q in pos]
        flat = [i for part in ids for i in part]
        assert len(set(flat)) == p                     # ranks get disjoint identities


def test_rank_positions_reject_uneven_splits_and_bad_ranks():
    s = ModalityBalancedSampler(make_data(COUNTS), 2 * 3 * 2, 2)
    with pytest.raises(ValueError, match=r'world_size=2: the P=3 identities per batch '
                                         r'\(train.batch_size=12 / '
                                         r'\(2 x sampler.num_instances=2\)\)'
                                         r'.*positive divisor of 3'):
        s.rank_positions(0, 2)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match=f'world_size={bad}'):
            s.rank_positions(0, bad)
    with pytest.raises(ValueError, match=r'rank=3; expected an int in 0..2'):
        s.rank_positions(3, 3)
    assert s.rank_positions(2, 3).tolist() == [4, 5, 10, 11]


@pytest.mark.parametrize('epoch_mode', MODES)
def test_the_k_images_of_a_block_come_in_random_order(epoch_mode):
    """Position k of an identity's visible block pairs with position k of its infrared block
    (IDKL's canonical views pair them), so the order within a block must be random: with exactly
    K images per modality every image visits every position, in both halves independently."""
    k = 3
    counts = {p: (k, k) for p in range(4)}
    data = make_data(counts, seed=5)
    s = ModalityBalancedSampler(data, 2 * 2 * k, k, seed=0, epoch_mode=epoch_mode)
    seen = {(pid, m): set() for pid in counts for m in (VISIBLE, INFRARED)}
    pairs = {pid: set() for pid in counts}
    for _ in range(30):
        for batch in batches(s):
            for b, pid in enumerate(assert_layout(batch, data, 2, k)):
                vis, ir = batch[b * k:(b + 1) * k], batch[2 * k + b * k:2 * k + (b + 1) * k]
                assert sorted(vis) == sorted(i for i, r in enumerate(data)
                                             if r[1] == pid and r[3] == VISIBLE)
                seen[pid, VISIBLE] |= {(pos, i) for pos, i in enumerate(vis)}
                seen[pid, INFRARED] |= {(pos, i) for pos, i in enumerate(ir)}
                pairs[pid] |= set(zip(vis, ir))
    assert all(len(v) == k * k for v in seen.values())       # every image at every position
    assert all(len(v) == k * k for v in pairs.values())      # every visible-infrared pairing
