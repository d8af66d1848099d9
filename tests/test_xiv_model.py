"""XIV network: generator size/cost/behaviour, fixed transforms, the feature learner's outputs,
registration and ImageNet-weight loading."""
import pytest
import torch
from PIL import Image
from torch import nn

from torchreid_vi._torchreid import tr
from torchreid_vi.methods.xiv import model as xiv
from torchreid_vi.methods.xiv.model import XGenerator, XIVNet
from torchreid_vi.modeling.backbones import IMAGENET_WEIGHTS
from torchreid_vi.registry import list_models


@pytest.fixture(scope='module')
def net():
    torch.manual_seed(0)
    return xiv.xiv_resnet18(num_classes=5, pretrained=False)


def test_learned_generator_has_10_parameters_and_keeps_the_shape():
    g = XGenerator('learned')
    shapes = {name: tuple(p.shape) for name, p in g.named_parameters()}
    assert shapes == {'reduce.weight': (1, 3, 1, 1), 'reduce.bias': (1,),
                      'expand.weight': (3, 1, 1, 1), 'expand.bias': (3,)}
    assert sum(p.numel() for p in g.parameters()) == 10
    x = torch.randn(2, 3, 16, 8)
    assert g(x).shape == x.shape


def test_learned_generator_is_w2_relu_w1_x_plus_b1_plus_b2_per_pixel():
    """g(x) = W2·relu(W1·x + b1) + b2 at every pixel, on hand-set weights (spec xiv.md §2)."""
    g = XGenerator('learned')
    with torch.no_grad():
        g.reduce.weight.copy_(torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1))    # W1
        g.reduce.bias.fill_(-0.25)                                                # b1
        g.expand.weight.copy_(torch.tensor([2.0, -1.0, 0.5]).view(3, 1, 1, 1))    # W2
        g.expand.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))                       # b2
    # one image, 1 x 3 pixels (channels first): (1, 0, 2), (0, 1, 0), (-1, -1, 1)
    x = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, -1.0], [2.0, 0.0, 1.0]]).view(1, 3, 1, 3)
    # W1·x + b1 = 1 + 1 - 0.25 = 1.75 (kept), -2 - 0.25 = -2.25 (cut), -1 + 2 + 0.5 - 0.25 = 1.25
    # out = W2 * relu(.) + b2: (3.5 + 0.1, -1.75 + 0.2, 0.875 - 0.3), b2, (2.5 + 0.1, ...)
    expected = torch.tensor([[3.6, 0.1, 2.6], [-1.55, 0.2, -1.05], [0.575, -0.3, 0.325]])
    with torch.no_grad():
        out = g(x)
    assert out.shape == (1, 3, 1, 3)
    assert torch.allclose(out[0, :, 0, :], expected, atol=1e-6)
    # a batch of two computes each image on its own
    with torch.no_grad():
        both = g(torch.cat([x, -x]))
    assert torch.allclose(both[:1], out, atol=1e-6)
    # -(0, 1, 0): W1·x + b1 = 2 - 0.25 = 1.75 (kept); -(1, 0, 2): -2 - 0.25 (cut) -> b2
    assert torch.allclose(both[1, :, 0, 1], torch.tensor([3.6, -1.55, 0.575]), atol=1e-6)
    assert torch.allclose(both[1, :, 0, 0], torch.tensor([0.1, 0.2, -0.3]), atol=1e-6)


def test_learned_generator_acts_per_pixel():
    """No spatial mixing: shuffling the pixels commutes with g."""
    g = XGenerator('learned')
    x = torch.randn(1, 3, 8, 4)
    perm = torch.randperm(32)
    shuffle = lambda t: t.flatten(2)[:, :, perm].view_as(t)  # noqa: E731
    assert torch.allclose(g(shuffle(x)), shuffle(g(x)), atol=1e-6)


def test_generator_costs_a_ten_thousandth_of_the_resnet50_learner():
    h, w = 256, 128
    params, flops = tr.utils.compute_model_complexity(XGenerator(), (1, 3, h, w))
    # torchreid counts a 1x1 conv as (c_in + bias) ops per output element: 4*HW + 2*3*HW; the
    # multiply-adds alone are 6 per pixel (~0.0002 G at 256x128, spec xiv.md §2).
    assert (params, flops) == (10, 10 * h * w)
    learner = xiv.xiv_resnet50(num_classes=2, pretrained=False)
    _, learner_flops = tr.utils.compute_model_complexity(learner.backbone, (1, 3, h, w))
    assert 2.5e9 < learner_flops < 5e9  # ~4.1 G with last stride 1 (the paper's ~2.7 G: stride 2)
    assert 6 * h * w / learner_flops < 1e-4


RGB = (0.2, 0.9, 0.4)  # one pixel, RGB in [0, 1]
EXPECTED = {
    'mean': (0.2 + 0.9 + 0.4) / 3,
    'gray': 0.299 * 0.2 + 0.587 * 0.9 + 0.114 * 0.4,                       # 0.6337
    'hsv_v': 0.9,
    'ycbcr_y': (16 + 65.481 * 0.2 + 128.553 * 0.9 + 24.966 * 0.4) / 255,   # MATLAB rgb2ycbcr
}


@pytest.mark.parametrize('kind', sorted(EXPECTED))
def test_fixed_generators_undo_and_redo_the_normalisation(kind):
    g = XGenerator(kind)
    rgb = torch.tensor(RGB).view(1, 3, 1, 1).expand(2, 3, 4, 2).contiguous()
    x = g(g.normalize(rgb))  # the normalised tensor the backbone would see
    assert x.shape == rgb.shape
    back = g.denormalize(x)
    assert torch.allclose(back, torch.full_like(back, EXPECTED[kind]), atol=1e-5)
    assert sum(p.numel() for p in g.parameters() if p.grad is not None) == 0


def test_gray_and_v_agree_with_pil():
    pixel = tuple(round(255 * c) for c in RGB)
    img = Image.new('RGB', (1, 1), pixel)
    rgb = torch.tensor(pixel, dtype=torch.float32).view(1, 3, 1, 1) / 255
    for kind, pil in (('gray', img.convert('L').getpixel((0, 0))),
                      ('hsv_v', img.convert('HSV').getpixel((0, 0))[2])):
        g = XGenerator(kind)
        value = float(g.denormalize(g(g.normalize(rgb)))[0, 0, 0, 0]) * 255
        assert abs(value - pil) <= 1.0, kind


def test_generator_none_and_bad_kinds_fail_clearly(net):
    with pytest.raises(ValueError, match='xiv.generator'):
        XGenerator('sepia')
    g = XGenerator('none')
    with pytest.raises(RuntimeError, match='no X modality'):
        g(torch.zeros(1, 3, 4, 2))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        XGenerator()(torch.zeros(3, 4, 2))


def test_eval_returns_bnneck_feature_or_pre_bn(net):
    net.eval()
    x = torch.rand(3, 3, 64, 32)
    with torch.no_grad():
        t = net.backbone(x)
        b = net(x)
        net.test_feature = 'pre_bn'
        t_out = net(x)
        net.test_feature = 'bn'
        one = net(x[:1])
    assert b.shape == (3, 512) and one.shape == (1, 512)
    assert torch.allclose(t_out, t)
    bn = net.neck.bn
    assert torch.allclose(b, (t - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
                          * bn.weight + bn.bias, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(net(x, x_view=True), net(net.make_x(x)))
    with pytest.raises(ValueError, match='test_feature'):
        net.test_feature = 'gem'


def test_train_mode_outputs_and_strong_baseline_heads(net):
    net.train()
    x = torch.rand(4, 3, 64, 32)
    logits, t = net(x)
    assert logits.shape == (4, 5) and t.shape == (4, 512)
    assert net.classifier.bias is None
    assert not net.neck.bn.bias.requires_grad and float(net.neck.bn.bias.abs().sum()) == 0
    # last stride 1: a 64x32 input leaves a 4x2 map after layer4 (stride 16, not 32)
    seen = {}
    hook = net.backbone.layer4.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    net(x)
    hook.remove()
    assert tuple(seen['shape'][2:]) == (4, 2)
    # the generator is trained through the learner
    logits, _ = net(x, x_view=True)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.generator.parameters())
    net.zero_grad()
    net.loss = 'softmax'
    assert net(x).shape == (4, 5)
    net.loss = 'triplet'


def test_training_step_feeds_the_bnneck_to_the_classifier_and_t_to_the_triplet(net):
    """``net(ir, visible=vis)`` = one backbone pass over [I, g(V), V];
    logits = classifier(BNNeck(t)) and the returned feature is the pre-BN t (spec xiv.md §3),
    pinned with explicit sub-module calls."""
    torch.manual_seed(3)
    ir, vis = torch.rand(4, 3, 64, 32), torch.rand(4, 3, 64, 32)
    net.train()
    with torch.no_grad():
        logits, t = net(ir, visible=vis)
        t_ref = net.backbone(torch.cat([ir, net.generator(vis), vis]))   # train-mode BatchNorm
        b_ref = net.neck(t_ref)
        logits_ref = net.classifier(b_ref)
        logits_2, t_2 = net(ir, visible=vis, use_x=False)
        t2_ref = net.backbone(torch.cat([ir, vis]))
    assert t.shape == (12, 512) and logits.shape == (12, 5)
    assert torch.allclose(t, t_ref, atol=1e-5)
    assert torch.allclose(logits, logits_ref, atol=1e-6)
    # the alternatives really differ here (the test can tell them apart)
    assert not torch.allclose(b_ref, t_ref, atol=1e-2)
    assert not torch.allclose(net.classifier(t_ref), logits_ref, atol=1e-4)
    assert torch.allclose(t_2, t2_ref, atol=1e-5) and t_2.shape == (8, 512)
    assert torch.allclose(logits_2, net.classifier(net.neck(t2_ref)), atol=1e-6)
    # torchreid's convention, one batch: (classifier(BNNeck(t)), t)
    with torch.no_grad():
        logits_3, t_3 = net(vis)
        t3_ref = net.backbone(vis)
    assert torch.allclose(t_3, t3_ref, atol=1e-5)
    assert torch.allclose(logits_3, net.classifier(net.neck(t3_ref)), atol=1e-6)


def test_registered_in_torchreid_factory_and_idempotent():
    xiv.register_models()
    xiv.register_models()
    assert {'xiv_resnet50', 'xiv_densenet121', 'xiv_resnet18'} <= set(list_models())
    model = tr.models.build_model('xiv_densenet121', num_classes=3, loss='triplet',
                                  pretrained=False, use_gpu=False)
    assert isinstance(model, XIVNet) and model.feature_dim == 1024
    with pytest.raises(TypeError, match='unexpected options'):
        xiv.xiv_resnet18(3, pretrained=False, last_stride=2)


def test_any_pooled_backbone_registers_in_one_line():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3))

    def tiny_fn(pretrained):
        return Tiny(), 8

    factory = xiv.register_xiv_backbone('tiny_test', tiny_fn, overwrite=True)  # rerunnable
    assert xiv.register_xiv_backbone('tiny_test', tiny_fn) is factory  # idempotent
    model = tr.models.build_model('xiv_tiny_test', 4, loss='triplet', pretrained=False,
                                  use_gpu=False).eval()
    assert model(torch.rand(2, 3, 16, 8)).shape == (2, 8)
    with pytest.raises(ValueError, match='already registered'):
        xiv.register_xiv_backbone('tiny_test', lambda p: (Tiny(), 8))


def test_imagenet_weights_load_by_name_and_shape(monkeypatch):
    from torchvision.models import resnet18

    import torchreid_vi.pretrained as pretrained

    source = resnet18(weights=None).state_dict()  # torchvision names, as in the hub file
    requested = []

    def fake_load(url, what):
        requested.append(url)
        return source

    monkeypatch.setattr(pretrained, 'load_imagenet_state_dict', fake_load)
    model = xiv.xiv_resnet18(num_classes=3, pretrained=True)
    assert requested == [IMAGENET_WEIGHTS["resnet18"].url]
    assert torch.equal(model.backbone.layer4[1].conv2.weight, source['layer4.1.conv2.weight'])

    monkeypatch.setattr(pretrained, 'load_imagenet_state_dict', lambda url, what: {'fc.w': 1})
    with pytest.raises(RuntimeError, match='wrong file'):
        xiv.xiv_resnet18(num_classes=3, pretrained=True)
