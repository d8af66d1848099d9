"""IDKL network: structure, eval path, gradients, parameter counts (spec idkl.md §2, §10.1-10.4,
§10.11, §10.14). Uses idkl_resnet18 on tiny images; ResNet-50 is built only where counts need it."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, ResNet

import torchreid_vi.pretrained as pretrained_module
from torchreid_vi._torchreid import tr
from torchreid_vi.methods.idkl.loss import IDKLLoss
from torchreid_vi.methods.idkl.model import IDKLNet, idkl_resnet18, idkl_resnet50, register_models
from torchreid_vi.modeling.backbones import IMAGENET_WEIGHTS
from torchreid_vi.registry import MODELS


def idkl_loss(**overrides):
    """The loss of the default config (``cfg.idkl``) with some arguments replaced."""
    from torchreid_vi.config import get_default_config
    return IDKLLoss.from_config(get_default_config(), **overrides)


H, W = 64, 32        # Θ out 8×4, deep out 4×2 (last stride 1)
NUM_CLASSES = 4
VIS, IR = 0, 1


def official_batch(num_ids=2, m=2, seed=0):
    """IR, VIS, IR, VIS, … per identity (released sampler layout)."""
    g = torch.Generator().manual_seed(seed)
    pids = torch.arange(num_ids).repeat_interleave(2 * m)
    mods = torch.tensor([IR, VIS] * (num_ids * m))
    return torch.randn(len(pids), 3, H, W, generator=g), pids, mods


@pytest.fixture(scope='module')
def net18():
    torch.manual_seed(0)
    return idkl_resnet18(NUM_CLASSES, pretrained=False)


def specific_modules(net):
    return [net.specific_deep, net.purifier, net.bnneck_sp, net.classifier_sh, net.classifier_sp,
            net.classifier_e, net.discriminator, net.confuser]


# ------------------------------------------------------------------ construction and counts

def test_resnet50_parameter_counts_match_the_released_model():
    """§10.11: 47,059,108 + 6,144·C trained (+4,096 frozen BNNeck biases); inference 23,512,128."""
    net = idkl_resnet50(395, pretrained=False)
    trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
    frozen = [p for p in net.parameters() if not p.requires_grad]
    assert trained == 49_485_988
    assert sum(p.numel() for p in frozen) == 4_096
    assert {id(p) for p in frozen} == {id(net.bnneck_sh.bn.bias), id(net.bnneck_sp.bn.bias)}
    # only the three bias-free classifiers depend on C: 47,059,108 + 6,144·C (RegDB 206, LLCM 713)
    classifiers = (net.classifier_sh, net.classifier_sp, net.classifier_e)
    assert all(c.weight.shape == (395, 2048) and c.bias is None for c in classifiers)
    assert trained - 3 * 2048 * 395 == 47_059_108
    assert sum(p.numel() for p in net.inference_modules().parameters()) == 23_512_128
    # last stride 1 in both deep copies; the copies share no parameter
    assert net.shared_deep.layer4[0].conv2.stride == (1, 1)
    assert net.specific_deep.layer4[0].downsample[0].stride == (1, 1)
    shared = {id(p) for p in net.shared_deep.parameters()}
    assert not shared & {id(p) for p in net.specific_deep.parameters()}
    # the 2048-d eval output, also for a batch of one
    with torch.no_grad():
        assert net.eval()(torch.rand(1, 3, H, W)).shape == (1, 2048)


def test_pretrained_false_never_touches_the_weights_loader(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError('pretrained=False must not load weights')
    monkeypatch.setattr(pretrained_module, 'load_imagenet_state_dict', fail)
    idkl_resnet18(NUM_CLASSES, pretrained=False)


def test_pretrained_weights_reach_shared_and_specific_copies(monkeypatch):
    reference = ResNet(BasicBlock, [2, 2, 2, 2])
    calls = []

    def fake_loader(url, what):
        calls.append(url)
        return reference.state_dict()
    monkeypatch.setattr(pretrained_module, 'load_imagenet_state_dict', fake_loader)
    net = idkl_resnet18(NUM_CLASSES, pretrained=True)
    assert calls == [IMAGENET_WEIGHTS["resnet18"].url]
    assert torch.equal(net.shallow.conv1.weight, reference.conv1.weight)
    for deep in (net.shared_deep, net.specific_deep):
        assert torch.equal(deep.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert net.specific_deep.layer3[0].conv1.weight is not net.shared_deep.layer3[0].conv1.weight


def test_registered_in_torchreid_factory():
    register_models()
    register_models()  # idempotent
    net = tr.models.build_model('idkl_resnet18', num_classes=3, loss='softmax', pretrained=False,
                                use_gpu=False)
    assert isinstance(net, IDKLNet) and MODELS.get('idkl_resnet50') is idkl_resnet50


def test_invalid_switches_name_the_config_key(net18):
    with pytest.raises(ValueError, match='idkl.ip.mask_mode'):
        IDKLNet(3, arch='resnet18', pretrained=False, mask_mode='channel')
    with pytest.raises(ValueError, match='idkl.confuser.mode'):
        net18.confuser_mode = 'adversarial'


# ------------------------------------------------------------------ eval path

@pytest.mark.parametrize('batch', [1, 2])
def test_eval_returns_bn_shared_feature_without_running_the_specific_branch(net18, batch):
    net18.eval()
    x = torch.randn(batch, 3, H, W)
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for mod in specific_modules(net18)
             for m in mod.modules()]
    try:
        with torch.no_grad():
            out = net18(x)
            direct = net18.bnneck_sh(net18.pool(net18.shared_deep(net18.shallow(x))))
            # randomise every module the eval output must not depend on
            saved = {k: v.clone() for k, v in net18.state_dict().items()}
            for mod in specific_modules(net18):
                for p in mod.parameters():
                    p.normal_()
            net18.bnneck_sp.bn.running_mean.normal_()
            again = net18(x)
            net18.load_state_dict(saved)
    finally:
        for h in hooks:
            h.remove()
    assert out.shape == (batch, 512)
    assert torch.allclose(out, direct) and torch.equal(out, again)
    assert calls == []


# ------------------------------------------------------------------ train path

def test_train_outputs_shapes_and_purifier_identities(net18):
    net18.train()
    x, _, _ = official_batch()
    b = x.shape[0]
    out = net18(x)
    for key in ('f_sh', 'f_sp', 'b_sh', 'b_sp', 'r_F', 'r_Fm'):
        assert out[key].shape == (b, 512), key
    for key in ('z_sh', 'z_sp', 'e_F', 'e_Fd'):
        assert out[key].shape == (b, NUM_CLASSES), key
    assert out['d_logits'].shape == (b, 2) and out['q_logits'].shape == (b, 2)

    shallow = net18.shallow(x)
    assert shallow.shape == (b, 128, H // 8, W // 8)
    feat = net18.specific_deep(shallow)
    assert feat.shape == (b, 512, H // 16, W // 16)  # last stride 1
    ip = net18.purifier(feat)
    for mask in (ip.mask_e, ip.mask_r):
        assert mask.shape == feat.shape and mask.min() > 0 and mask.max() < 1
    assert torch.allclose(ip.purified, ip.mask_e * ip.mask_r * (feat + ip.normalized), atol=1e-5)
    assert torch.allclose(ip.normalized.mean(dim=(2, 3)), torch.zeros(b, 512), atol=1e-4)


def test_purifier_masks_come_from_f_and_in_f_as_released(net18):
    """m_e = σ(W2·relu(W1·F)) from F, m_r the same bottleneck of its own from F̂ = IN(F), per
    position; F_d+ = m_e ⊙ F, F̂_m− = m_r ⊙ F̂ (spec idkl.md §2.3), with explicit layer calls."""
    torch.manual_seed(4)
    feat = torch.randn(3, 512, 4, 2) * 2 + 0.5
    pur = net18.purifier.train()
    with torch.no_grad():
        ip = pur(feat)
        normalized = F.instance_norm(feat, weight=pur.norm.weight, bias=pur.norm.bias, eps=1e-5)
        masks = {}
        for name, source in (('mask_e', feat), ('mask_r', normalized)):
            mask = getattr(pur, name)
            hidden = F.relu(F.conv2d(source, mask.fc1.weight))
            masks[name] = torch.sigmoid(F.conv2d(hidden, mask.fc2.weight))
        wrong_source = torch.sigmoid(F.conv2d(F.relu(F.conv2d(feat, pur.mask_r.fc1.weight)),
                                              pur.mask_r.fc2.weight))
    assert torch.allclose(ip.normalized, normalized, atol=1e-5)
    assert torch.allclose(ip.mask_e, masks['mask_e'], atol=1e-6)
    assert torch.allclose(ip.mask_r, masks['mask_r'], atol=1e-6)
    assert not torch.allclose(wrong_source, masks['mask_r'], atol=1e-3)   # F and IN(F) differ
    assert torch.allclose(ip.enhanced, masks['mask_e'] * feat, atol=1e-5)
    assert torch.allclose(ip.reduced, masks['mask_r'] * normalized, atol=1e-5)
    assert torch.allclose(ip.purified, masks['mask_e'] * masks['mask_r'] * (feat + normalized),
                          atol=1e-5)


def test_se_mask_mode_gives_channel_masks(net18):
    feat = torch.randn(3, 512, 4, 2)
    try:
        net18.purifier.mask_mode = 'se'
        ip = net18.purifier(feat)
    finally:
        net18.purifier.mask_mode = 'pixel'
    assert ip.mask_e.shape == (3, 512, 1, 1) and ip.mask_r.shape == (3, 512, 1, 1)
    assert ip.purified.shape == feat.shape
    mask = net18.purifier.mask_e
    expected = torch.sigmoid(mask.fc2(F.relu(mask.fc1(feat.mean((2, 3), keepdim=True)))))
    assert torch.allclose(ip.mask_e, expected)


def test_every_trainable_parameter_gets_a_gradient_and_bnneck_biases_stay_zero():
    torch.manual_seed(1)
    net = idkl_resnet18(NUM_CLASSES, pretrained=False).train()
    x, pids, mods = official_batch()
    crit = idkl_loss(num_instances=2)
    optimizer = tr.optim.build_optimizer(net, optim='adam', lr=3.5e-4, weight_decay=5e-3,
                                         adam_beta1=0.9, adam_beta2=0.999)
    assert len(optimizer.param_groups) == 1
    crit(net(x), pids, mods)['loss'].backward()
    missing = [n for n, p in net.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []
    assert net.bnneck_sh.bn.bias.grad is None and net.bnneck_sp.bn.bias.grad is None
    for _ in range(2):  # Adam with coupled weight decay must leave the frozen biases alone
        optimizer.step()
    assert net.bnneck_sh.bn.bias.abs().sum() == 0 and net.bnneck_sp.bn.bias.abs().sum() == 0


def test_total_loss_is_layout_invariant_through_the_network():
    """§10.9: official IR/VIS interleaving vs all-visible-then-all-infrared (dropout off)."""
    torch.manual_seed(2)
    net = idkl_resnet18(NUM_CLASSES, pretrained=False).train()
    for mod in net.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    x, pids, mods = official_batch(seed=3)
    vis = (mods == VIS).nonzero().flatten()
    ir = (mods == IR).nonzero().flatten()
    perm = torch.cat([vis, ir])     # keeps each identity's within-modality order
    crit = idkl_loss(num_instances=2)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    a = crit(net(x), pids, mods)
    net.load_state_dict(state)      # same BN running stats for the second pass
    b = crit(net(x[perm]), pids[perm], mods[perm])
    for name in a:
        assert a[name].item() == pytest.approx(b[name].item(), rel=1e-4, abs=1e-5), name


def test_paper_mode_confuser_flips_the_backbone_gradient_only(net18):
    """§10.14: with GRL the gradient of L_C w.r.t. b_sh flips sign; Q's own gradients do not."""
    net18.train()
    b_sh = torch.randn(8, 512)  # batch of 8: BatchNorm1d in Q needs > 1 row
    labels = torch.tensor([0, 1] * 4)
    grads = {}
    for mode in ('pseudo', 'grl'):
        net18.confuser_mode = mode
        net18.zero_grad(set_to_none=True)
        inp = b_sh.clone().requires_grad_()
        torch.manual_seed(7)    # same dropout masks
        F.cross_entropy(net18.confuse(inp), labels).backward()
        grads[mode] = (inp.grad.clone(), [p.grad.clone() for p in net18.confuser.parameters()])
    net18.confuser_mode = 'pseudo'
    assert grads['pseudo'][0].abs().sum() > 0
    assert torch.allclose(grads['grl'][0], -grads['pseudo'][0])
    for g_pseudo, g_grl in zip(grads['pseudo'][1], grads['grl'][1]):
        assert torch.allclose(g_pseudo, g_grl)
