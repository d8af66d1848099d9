"""XIV engine pinned against references written here: the training step's loss terms (which rows
form which block, which labels X gets) and the fused test distance of Eq. 2 all the way through
the evaluation of a (synthetic) RegDB test set with the packaged ``xiv/regdb`` config.

The expectations use explicit sub-module calls (``net.generator``, ``net.backbone``, ``net.neck``,
``net.classifier``), ``torch.cdist`` (true Euclidean distance), ``F.cross_entropy`` and a
per-anchor loop, never the engine's or the loss module's own functions.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from torchreid_vi.config import get_default_config
from torchreid_vi.methods.xiv import model_options
from torchreid_vi.methods.xiv.engine import XIVEngine
from torchreid_vi.methods.xiv.model import xiv_resnet18
from torchreid_vi.optim import optimizer_from_config

H, W = 32, 16
VIS, IR = 0, 1


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids the thread-pool overhead of a shared machine (5x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch_hard_reference(anchors, anchor_labels, candidates, candidate_labels, margin):
    """(1/n) Σ_i [margin + max_pos D − min_neg D]_+, D = torch.cdist, one anchor at a time."""
    d = torch.cdist(anchors.double(), candidates.double())
    total = 0.0
    for i in range(len(anchors)):
        same = candidate_labels == anchor_labels[i]
        total += max(0.0, margin + float(d[i][same].max()) - float(d[i][~same].min()))
    return total / len(anchors)


def xiv_cfg(*opts):
    cfg = get_default_config()
    cfg.merge_from_list(list(opts))
    cfg.use_gpu = False
    return cfg


def test_training_step_terms_equal_an_explicit_reference():
    """Visible and infrared rows interleaved, the infrared identities in another order than the
    visible ones: X = g(V) must carry the visible labels, I the infrared ones."""
    torch.manual_seed(0)
    cfg = xiv_cfg('xiv.lambda_cmg', '0.25')
    num_classes = 5
    model = xiv_resnet18(num_classes, pretrained=False, **model_options(cfg))
    optimizer = optimizer_from_config(cfg, model)
    dm = SimpleNamespace(train_loader=None, test_loader={}, num_train_pids=num_classes,
                         height=H, width=W)
    engine = XIVEngine.from_config(cfg, dm, model, optimizer, None)
    g = torch.Generator().manual_seed(1)
    vis_pids = torch.tensor([0, 0, 3, 3, 1, 1])
    ir_pids = torch.tensor([1, 3, 0, 1, 3, 0])
    order = torch.randperm(12, generator=g)                     # rows of both modalities mixed
    pids = torch.cat([vis_pids, ir_pids])[order]
    modality = torch.tensor([VIS] * 6 + [IR] * 6)[order]
    imgs = torch.randn(12, 3, H, W, generator=g)
    reference = copy.deepcopy(model).train()                   # the weights before the step

    model.train()
    terms = engine.forward_backward({'img': imgs, 'pid': pids, 'modality': modality})

    ir, vis = imgs[modality == IR], imgs[modality == VIS]       # batch order within a modality
    y_i, y_v = pids[modality == IR], pids[modality == VIS]
    with torch.no_grad():
        t = reference.backbone(torch.cat([ir, reference.generator(vis), vis]))   # one pass
        logits = reference.classifier(reference.neck(t))
    rows = {'ir': slice(0, 6), 'x': slice(6, 12), 'vis': slice(12, 18)}
    labels = {'ir': y_i, 'x': y_v, 'vis': y_v}
    a1, a2, lam = cfg.xiv.margin_cross, cfg.xiv.margin_intra, cfg.xiv.lambda_cmg
    expected = {}
    for b, r in rows.items():
        expected[f'id_{b}'] = float(F.cross_entropy(logits[r], labels[b]))
        expected[f'tri_{b}'] = batch_hard_reference(t[r], labels[b], t[r], labels[b], a2)
    for b in ('x', 'vis'):
        expected[f'cmg_ir_{b}'] = (
            batch_hard_reference(t[rows['ir']], y_i, t[rows[b]], labels[b], a1)
            + batch_hard_reference(t[rows[b]], labels[b], t[rows['ir']], y_i, a1))
    expected['loss_m'] = sum(v for k, v in expected.items() if k[:3] in ('id_', 'tri'))
    expected['loss_c'] = expected['cmg_ir_x'] + expected['cmg_ir_vis']
    expected['loss'] = expected['loss_m'] + lam * expected['loss_c']
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_fused_distance_through_the_evaluation_of_a_test_set(regdb_root):
    """``engine.test()`` with the packaged ``xiv/regdb`` config scores exactly the Eq. 2 matrix
    ``D(f(I), f(V)) + D(f(I), f(g(V)))`` (true Euclidean D; visible→thermal uses its
    transpose), built here from the loaders' images with explicit sub-module calls."""
    from torchreid_vi.data.datamanager import CrossModalImageDataManager

    root, _ = regdb_root
    cfg = get_default_config()
    cfg.merge_from_file('xiv/regdb')
    cfg.merge_from_list(['data.root', root, 'data.height', str(H), 'data.width', str(W),
                         'data.workers', '0', 'model.pretrained', 'False', 'test.batch_size',
                         '64', 'vi.eval.max_rank', '10'])
    cfg.use_gpu = False
    assert cfg.xiv.fusion and cfg.test.dist_metric == 'euclidean'
    assert not cfg.test.normalize_feature
    dm = CrossModalImageDataManager.from_config(cfg)
    torch.manual_seed(0)
    model = xiv_resnet18(dm.num_train_pids, pretrained=False, **model_options(cfg))
    engine = XIVEngine.from_config(cfg, dm, model, optimizer_from_config(cfg, model), None)
    engine.test()
    got = engine.last_results['regdb']

    loaders = dm.test_loader['regdb']
    net = model.eval()
    with torch.no_grad():
        def feats(loader, x_view=False):
            out = []
            for data in loader:
                x = net.generator(data['img']) if x_view else data['img']
                out.append(net.neck(net.backbone(x)).double())
            return torch.cat(out)
        f_i, f_v = feats(loaders['query']), feats(loaders['gallery'])
        f_x = feats(loaders['gallery'], x_view=True)
    fused = torch.cdist(f_i, f_v) + torch.cdist(f_i, f_x)
    plain = torch.cdist(f_i, f_v)
    expected = engine.evaluator.evaluate_distances('regdb', loaders['query'].dataset,
                                                   fused.numpy())
    assert set(got) == set(expected) == {'regdb/trial1/t2v', 'regdb/trial1/v2t'}
    for key in expected:
        for metric in ('rank1', 'rank5', 'mAP', 'mINP'):
            assert got[key].mean[metric] == pytest.approx(expected[key].mean[metric],
                                                          abs=1e-9), (key, metric)
    # the alternatives score differently on this model, so the comparison can tell them apart
    others = [engine.evaluator.evaluate_distances('regdb', loaders['query'].dataset, d.numpy())
              for d in (plain, torch.cdist(f_i, f_v) ** 2 + torch.cdist(f_i, f_x) ** 2)]
    for other in others:
        assert any(abs(other[k].mean['mAP'] - expected[k].mean['mAP']) > 1e-6 for k in expected)
