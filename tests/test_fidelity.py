"""Zoo models against their authors' released networks (issue 20, items 1-5 and 8-10).

Each test copies one set of random weights into the zoo model and into an oracle of
the released network (or, where no code was released, of the paper's equations),
written in tests/_helpers/release_oracles.py from that code, and compares outputs in
eval and in training mode (batch statistics) in float64: max abs difference < 1e-5.
The oracles read the zoo's key names here; tests/test_convert_official.py runs the
same oracles on the authors' key names.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import attnzoo
from tests._helpers import release_oracles as ro

TOL = 1e-5


def max_diff(a, b) -> float:
    if isinstance(a, tuple | list):
        assert isinstance(b, tuple | list) and len(a) == len(b), (type(a), type(b))
        return max(max_diff(x, y) for x, y in zip(a, b, strict=True))
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_matches(ours, oracle, what: str) -> None:
    diff = max_diff(ours, oracle)
    assert diff < TOL, f"{what}: max abs difference {diff:.3g} from the released network"


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random, non-trivial float64 weights: fan-in scaled convs and linears, BN weights
    in [0.5, 1.5] with random statistics, every other parameter (CCNet's gamma, ...)
    drawn from N(0, 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    model.double()
    with torch.no_grad():
        done = set()
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Conv1d | nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=torch.float64)
                               / math.sqrt(m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen,
                                             dtype=torch.float64) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
            else:
                continue
            done.update(id(p) for p in m.parameters(recurse=False))
        for p in model.parameters():
            if id(p) not in done:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return model


def no_dropout_(model: nn.Module) -> nn.Module:
    """Dropout off, so that training mode compares batch statistics only."""
    for m in model.modules():
        if isinstance(m, nn.Dropout | nn.Dropout2d):
            m.p = 0.0
    return model


def image(size: int = 32, batch: int = 4, channels: int = 3) -> torch.Tensor:
    """A float64 batch; 32x32 keeps the ResNet-50s cheap (res5 at 1x1; SimAM needs 48).
    Four images: training-mode BN on a 1x1 map of two images divides by sqrt(eps) where
    the two values nearly agree, which turns float64 rounding into 1e-5 differences."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, channels, size, size, generator=gen, dtype=torch.float64)


def run(model: nn.Module, x: torch.Tensor, train: bool):
    model.train(train)
    with torch.no_grad():
        return model(x)


def zoo_classifier(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The zoo model with random float64 weights, and its state dict."""
    model = randomize_(attnzoo.create_model(name))
    return model, {k: v.clone() for k, v in model.state_dict().items()}


MODES = pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])


# --- 1. SimAM: after conv2, before bn2 and the ReLU; lambda 0.1 -----------------------


@MODES
def test_resnet50_simam_is_the_released_network(train):
    model, sd = zoo_classifier("resnet50_simam")
    x = image(48, batch=2)   # SimAM's variance needs more than one position: res5 at 2x2
    oracle = ro.resnet(sd, x, train=train,
                       after_conv2=lambda _sd, _p, y, _t: ro.simam(y, 0.1))
    assert_matches(run(model, x, train), oracle, "resnet50_simam")


# --- 2. GSoP: the last stage at stride 1 ----------------------------------------------


@MODES
def test_resnet50_gsop_is_the_released_network(train):
    model, sd = zoo_classifier("resnet50_gsop")
    x = image()
    oracle = ro.resnet(sd, x, train=train, stage_strides=(1, 2, 2, 1),
                       after_bn3=ro.gsop_hook(ro.ZOO_GSOP))
    assert_matches(run(model, x, train), oracle, "resnet50_gsop")


def test_resnet50_gsop_last_stage_sees_14x14_at_224():
    model = attnzoo.create_model("resnet50_gsop")
    sizes = {b.site.split(".")[0]: b.size for b in model.attnzoo_blocks}
    assert sizes["layer4"] == (14, 14) and sizes["layer3"] == (14, 14)
    assert model.feature_info[-1]["reduction"] == 16


# GCT (found with item 2): the released ResNet-50 has the stride in the 1x1 conv ----------


@MODES
def test_resnet50_gct_is_the_released_network(train):
    model, sd = zoo_classifier("resnet50_gct")
    x = image()
    oracle = ro.resnet(sd, x, train=train, stride_in_1x1=True,
                       before_conv=ro.gct_hook(ro.ZOO_GCT))
    assert_matches(run(model, x, train), oracle, "resnet50_gct")


def test_restrided_resnets_take_their_backbones_timm_checkpoint(fake_hub):
    """resnet50_gsop / resnet50_gct are timm's ResNet-50 with strides moved: every tensor
    has timm's shape, so pretrained_backbone= loads timm's resnet50 checkpoint."""
    import timm
    from safetensors.torch import save

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model("resnet50").state_dict().items()}
    fake_hub.commit("timm/resnet50.a1_in1k", {"model.safetensors": save(state)})
    for name in ("resnet50_gsop", "resnet50_gct"):
        model = attnzoo.create_model(name, pretrained_backbone=True)
        ours = model.state_dict()
        assert all(torch.equal(ours[k], v) for k, v in state.items()), name
        assert model.attnzoo_weights["repo"] == "timm/resnet50.a1_in1k"


# --- 3. CCNet and DNLNet: segmentation networks with their heads ---------------------


def _segmentation(name: str) -> nn.Module:
    return no_dropout_(randomize_(attnzoo.create_model(name)))


@MODES
def test_ccnet_resnet50_is_the_released_network(train):
    model = _segmentation("ccnet_resnet50")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = image(batch=2)

    def rcca(y):  # RCCAModule: the same CrissCrossAttention twice (R = 2)
        for _ in range(2):
            y = ro.criss_cross(sd, "head.attention", y)
        return y

    main, aux = ro.context_head_net(sd, x, train, rcca, act="leaky_relu", first_full=True)
    assert_matches(run(model, x, train), (main, aux) if train else main, "ccnet_resnet50")


@MODES
def test_dnlnet_resnet50_is_the_released_network(train):
    """The network around the block (dilated deep-base ResNet, heads, upsampling); the
    block is the zoo's ``disentangled_non_local`` module, whose own equations are tested
    with the block."""
    model = _segmentation("dnlnet_resnet50")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = image(batch=2)
    block = copy.deepcopy(model.head.attention).train(train)
    main, aux = ro.context_head_net(sd, x, train, block, act="relu", first_full=False)
    assert_matches(run(model, x, train), (main, aux) if train else main, "dnlnet_resnet50")


def test_segmentation_models_have_the_released_heads():
    ccnet = attnzoo.create_model("ccnet_resnet50")
    dnl = attnzoo.create_model("dnlnet_resnet50")
    assert type(ccnet.head.attention).__name__ == "CrissCrossAttention"
    assert ccnet.head.attention.recurrence == 2
    assert type(dnl.head.attention).__name__ == "DisentangledNonLocal"
    assert dnl.head.attention.variant == "released" and dnl.head.attention.g.out_channels == 512
    # CCNet's dsn conv has a bias, DNL's does not; InPlace-ABN's leaky ReLU vs ReLU
    assert ccnet.aux_head.conv.conv.bias is not None and dnl.aux_head.conv.conv.bias is None
    assert isinstance(ccnet.head.reduce.act, nn.LeakyReLU) and isinstance(dnl.head.reduce.act,
                                                                          nn.ReLU)
    for model in (ccnet, dnl):
        assert model.encoder.maxpool.ceil_mode
        assert model.encoder.layer4[0].conv2.stride == (1, 1)
        assert model.head.classifier.out_channels == 19
        out = model.train()(torch.randn(2, 3, 32, 32))
        assert [o.shape for o in out] == [torch.Size([2, 19, 32, 32])] * 2
    # the first block of res4 / res5: full rate in CCNet, the previous rate in DNL's torchcv
    assert ccnet.encoder.layer3[0].conv2.dilation == (2, 2)
    assert ccnet.encoder.layer4[0].conv2.dilation == (4, 4)
    assert dnl.encoder.layer3[0].conv2.dilation == (1, 1)
    assert dnl.encoder.layer4[0].conv2.dilation == (2, 2)


@pytest.mark.parametrize("name, seg", [("resnet50_cca", "ccnet_resnet50"),
                                       ("resnet50_dnl", "dnlnet_resnet50")])
def test_classification_cca_and_dnl_say_their_placement_is_the_zoos_own(name, seg):
    description = attnzoo.load_spec(name).description
    assert "zoo's own composition" in description and seg in description


# --- 4. ECA: the released kernel sizes by stage ---------------------------------------


@MODES
def test_resnet50_eca_is_the_released_k3557_network(train):
    model, sd = zoo_classifier("resnet50_eca")
    x = image()
    oracle = ro.resnet(sd, x, train=train, after_bn3=ro.eca_hook(ro.ZOO_ECA, (3, 5, 5, 7)))
    assert_matches(run(model, x, train), oracle, "resnet50_eca")


@pytest.mark.parametrize("name, kernels", [("resnet50_eca", (3, 5, 5, 7)),
                                           ("resnet101_eca", (3, 3, 5, 7))])
def test_eca_models_have_the_released_kernels(name, kernels):
    model = attnzoo.create_model(name)
    by_stage = {}
    for b in model.attnzoo_blocks:
        block = model.get_submodule(b.name)
        by_stage.setdefault(int(b.site[len("layer")]), set()).add(block.kernel_size)
    assert by_stage == {i + 1: {k} for i, k in enumerate(kernels)}


def test_eca_block_keeps_the_papers_kernel_rule_by_default():
    assert attnzoo.create_block("eca", 256).kernel_size == 5   # rule: |(log2 256 + 1)/2|odd
    assert attnzoo.create_block("eca", 2048).kernel_size == 7
    assert attnzoo.create_block("eca", 256, kernel_size=3).kernel_size == 3


# --- 5. CBAM: (max, mean), BN momentum 0.01, gate starting at 0.5 ----------------------


@MODES
def test_resnet50_cbam_is_the_released_network(train):
    model, sd = zoo_classifier("resnet50_cbam")
    x = image()
    oracle = ro.resnet(sd, x, train=train, after_bn3=ro.cbam_hook(ro.ZOO_CBAM))
    assert_matches(run(model, x, train), oracle, "resnet50_cbam")


def test_cbam_spatial_gate_has_the_released_bn_and_init():
    block = attnzoo.create_block("cbam", 64)
    assert block.spatial.bn.momentum == 0.01 and block.spatial.bn.eps == 1e-5
    assert not block.spatial.bn.weight.any() and not block.spatial.bn.bias.any()
    assert not block.channel.fc1.bias.any() and not block.channel.fc2.bias.any()
    x = torch.randn(2, 64, 6, 6)
    torch.testing.assert_close(block.spatial.eval()(x), 0.5 * x)   # sigmoid(0) everywhere


def test_cbam_pool_order_field_gives_the_papers_order():
    released = randomize_(attnzoo.create_block("cbam", 32)).eval()
    paper = attnzoo.create_block("cbam", 32, pool_order="mean_max").double().eval()
    state = released.state_dict()
    state["spatial.conv.weight"] = state["spatial.conv.weight"].flip(1)
    paper.load_state_dict(state)
    x = torch.randn(2, 32, 5, 7, dtype=torch.float64)
    assert_matches(paper(x), released(x), "cbam pool_order=mean_max")


# --- 8. BiSeNet: align_corners=True -----------------------------------------------------


@MODES
def test_bisenetv1_is_the_authors_network(train):
    model = randomize_(attnzoo.create_model("bisenetv1_resnet18"))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    context_path = copy.deepcopy(model.context_path).train(train)
    x = image(64, batch=2)
    oracle = ro.bisenet_r18(sd, x, train, context_path)
    assert_matches(run(model, x, train), oracle, "bisenetv1_resnet18")


# --- 9. STN: no resize before the localisation net (the paper) --------------------------


@MODES
@pytest.mark.parametrize("size", [(48, 48), (40, 56)])
def test_stn_block_is_the_papers_transformer(size, train):
    block = randomize_(attnzoo.create_block("stn", 3, size=size))
    with torch.no_grad():   # a non-trivial transform near the identity
        block.theta.weight.mul_(0.1)
        block.theta.bias.copy_(torch.tensor([0.9, 0.1, 0.05, -0.1, 1.1, -0.05]))
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    oracle = ro.stn(block.state_dict(), x)
    assert_matches(run(block, x, train), oracle, f"stn at {size}")


def test_stn_resize_is_an_option_the_zoo_spec_states():
    assert attnzoo.create_block("stn", 3, size=(48, 48)).loc_resolution is None
    spec = attnzoo.load_spec("stn_resnet18")
    assert spec.insert[0].block.loc_resolution == 64
    assert "zoo's own composition" in spec.description
    with pytest.raises(attnzoo.SpecError, match="input_size"):
        attnzoo.create_block("stn", 3)   # sized for the site's map: it needs one


# --- 10. PAN: the FPA pyramid downsamples by pooling ------------------------------------


@MODES
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_fpa_pyramid_pools_as_the_paper(pool, train):
    kwargs = {} if pool == "avg" else {"downsample": "max"}
    block = randomize_(attnzoo.create_block("fpa", 32, **kwargs))
    x = torch.randn(2, 32, 16, 16, dtype=torch.float64)
    oracle = ro.fpa(block.state_dict(), x, train, pool=pool)
    assert_matches(run(block, x, train), oracle, f"fpa ({pool} pooling)")


def test_pan_spec_uses_the_papers_fpa():
    spec = attnzoo.load_spec("pan_resnet50")
    assert spec.backbone.args["fpa"]["downsample"] == "avg"
    model = attnzoo.create_model("pan_resnet50")
    assert model.fpa.downsample == "avg"
    assert all(d[0].stride == (1, 1) for d in model.fpa.down)
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 21, 64, 64)


# --- the docs column ----------------------------------------------------------------------


def test_every_zoo_spec_says_what_it_follows():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import make_docs
    mine = ["resnet50_simam", "resnet50_gsop", "resnet50_gct", "resnet50_eca", "resnet101_eca",
            "resnet50_cbam", "resnet18_cbam", "resnet50_fca", "bisenetv1_resnet18",
            "ccnet_resnet50", "dnlnet_resnet50"]
    assert {n: make_docs.follows(attnzoo.load_spec(n).description) for n in mine} == dict.fromkeys(
        mine, "released code")
    assert make_docs.follows(attnzoo.load_spec("pan_resnet50").description) == "paper"
    for name in ("stn_resnet18", "resnet50_cca", "resnet50_dnl", "digits_cbam_tiny"):
        assert make_docs.follows(attnzoo.load_spec(name).description) == "zoo's own"
