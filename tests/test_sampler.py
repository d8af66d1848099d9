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


@pytest.mark.parametrize('epoch_mode', ['agw', 'cover'])
@pytest.mark.parametrize('replace', ['auto', 'always'])
def test_batch_layout(epoch_mode, replace):
    data = make_data(COUNTS)
    s = ModalityBalancedSampler(data, 2 * P * K, K, seed=3, epoch_mode=epoch_mode, replace=replace)
    for batch in batches(s):
        pids = [data[i][1] for i in batch]
        mods = [data[i][3] for i in batch]
        assert mods == [VISIBLE] * (P * K) + [INFRARED] * (P * K)
        assert pids[:P * K] == pids[P * K:]                    # position j and PK + j
        blocks = [pids[b * K:(b + 1) * K] for b in range(P)]
        assert all(len(set(b)) == 1 for b in blocks)           # K-blocks per identity
        assert len({b[0] for b in blocks}) == P                # P distinct identities


def test_without_replacement_when_enough_images():
    data = make_data(COUNTS)
    s = ModalityBalancedSampler(data, 2 * P * K, K, seed=0)
    for _ in range(5):
        for batch in batches(s):
            for b in range(2 * P):
                assert len(set(batch[b * K:(b + 1) * K])) == K


def test_replace_always_draws_with_replacement():
    data = make_data({p: (2, 2) for p in range(8)})
    s = ModalityBalancedSampler(data, 2 * 4 * 2, 2, seed=0, replace='always')
    blocks = [tuple(b[i:i + 2]) for _ in range(20) for b in batches(s) for i in range(0, 16, 2)]
    assert any(len(set(b)) == 1 for b in blocks)  # AGW's distribution repeats images


def test_same_seed_and_epoch_give_same_output_and_epochs_differ():
    data = make_data(COUNTS)
    a = ModalityBalancedSampler(data, 2 * P * K, K, seed=7)
    b = ModalityBalancedSampler(data, 2 * P * K, K, seed=7)
    first_a, second_a = list(a), list(a)            # __iter__ advances the epoch
    assert a.epoch == 2
    assert list(b) == first_a and first_a != second_a
    b.set_epoch(1)
    assert list(b) == second_a
    assert list(ModalityBalancedSampler(data, 2 * P * K, K, seed=8)) != first_a


def test_output_does_not_depend_on_global_rng_state():
    data = make_data(COUNTS)
    out = []
    for g in (0, 123):
        random.seed(g)
        np.random.seed(g)
        torch.manual_seed(g)
        state = (random.getstate(), np.random.get_state()[1].copy())
        out.append(list(ModalityBalancedSampler(data, 2 * P * K, K, seed=1)))
        assert random.getstate() == state[0]
        assert (np.random.get_state()[1] == state[1]).all()
    assert out[0] == out[1]


def test_identity_with_one_ir_image_gives_k_identical_indices():
    counts = {p: (6, 6) for p in range(4)}
    counts[9] = (6, 1)
    data = make_data(counts)
    only_ir = next(i for i, r in enumerate(data) if r[1] == 9 and r[3] == INFRARED)
    s = ModalityBalancedSampler(data, 2 * 2 * 4, 4, seed=0)
    seen = 0
    for _ in range(6):
        for batch in batches(s):
            for b in range(2):
                vis_block = batch[b * 4:(b + 1) * 4]
                if data[vis_block[0]][1] == 9:
                    seen += 1
                    assert batch[8 + b * 4: 8 + (b + 1) * 4] == [only_ir] * 4
    assert seen > 0


def test_ids_with_one_modality_are_never_drawn_and_logged_once(caplog):
    counts = dict(COUNTS)
    counts.update({500: (4, 0), 501: (0, 3), 502: (5, 0)})
    data = make_data(counts)
    with caplog.at_level(logging.INFO, logger='torchreid_vi.data.sampler'):
        s = ModalityBalancedSampler(data, 2 * P * K, K, seed=0)
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


@pytest.mark.parametrize('epoch_mode', ['agw', 'cover'])
def test_len_is_the_number_of_indices_yielded(epoch_mode):
    data = make_data(COUNTS)
    s = ModalityBalancedSampler(data, 2 * P * K, K, epoch_mode=epoch_mode)
    for _ in range(3):
        assert len(list(s)) == len(s)
    if epoch_mode == 'agw':
        n_vis = sum(v for v, _ in COUNTS.values())
        n_ir = sum(r for _, r in COUNTS.values())
        assert len(s) == (max(n_vis, n_ir) // (P * K) + 1) * 2 * P * K
    else:
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
    with pytest.raises(ValueError, match='epoch_mode'):
        ModalityBalancedSampler(data, 12, 2, epoch_mode='all')
    with pytest.raises(ValueError, match='replace'):
        ModalityBalancedSampler(data, 12, 2, replace='never')


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
