"""Channel attention (attnzoo/blocks/channel.py): SE, ECA, SK, GCT, GSoP, FcaNet.

Each block is checked against the property its paper defines it by, against formulas
written out here, and against timm where timm has the same module. The zoo specs build,
run at 64x64 and have the parameter counts their papers report; the SK zoo models are
timm's SK networks (tests/test_convert.py).
"""

from __future__ import annotations

import math

import pytest
import scipy.fft
import timm
import torch
from timm.layers import EcaModule, SelectiveKernel, SEModule

import attnzoo
from attnzoo import SpecError
from attnzoo.blocks import channel
from attnzoo.blocks.channel import GlobalSecondOrderPooling, eca_kernel_size, fca_frequencies
from tests._helpers.modules import copy_by_order

ZooSelectiveKernel = channel.SelectiveKernel

X = torch.randn(2, 64, 9, 7)


def randomise(module: torch.nn.Module) -> None:
    """Non-trivial values everywhere, so no term of a formula can hide behind a 0 or 1."""
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.5, 0.5)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)


# --- SE ----------------------------------------------------------------------------------


def test_se_equals_timm_and_the_formula():
    ours = attnzoo.create_block("se", 64)
    peer = SEModule(64, rd_ratio=1 / 16, rd_divisor=1)
    copy_by_order(ours, peer)
    torch.testing.assert_close(ours(X), peer(X))
    w1, b1 = ours.fc1.weight.flatten(1), ours.fc1.bias
    w2, b2 = ours.fc2.weight.flatten(1), ours.fc2.bias
    z = X.mean((2, 3))
    s = torch.sigmoid(torch.relu(z @ w1.T + b1) @ w2.T + b2)
    torch.testing.assert_close(ours(X), X * s[:, :, None, None])
    assert ours.fc1.out_channels == 4  # C / r with r = 16


# --- ECA ---------------------------------------------------------------------------------


def test_eca_equals_timm():
    for c in (64, 256, 2048):
        ours = attnzoo.create_block("eca", c)
        peer = EcaModule(c)
        copy_by_order(ours, peer)
        x = torch.randn(1, c, 4, 4)
        torch.testing.assert_close(ours(x), peer(x))


def test_eca_kernel_size_rejects_even():
    with pytest.raises(SpecError, match="odd"):
        attnzoo.create_block("eca", 64, kernel_size=4)


def test_eca_kernel_size_follows_the_formula_for_64_to_2048_channels():
    # k = |log2(C) / gamma + b / gamma|_odd with gamma = 2, b = 1, worked by hand:
    # 64 -> 3.5 -> 3; 128 -> 4 -> 5; 256 -> 4.5 -> 5; 512 -> 5; 1024 -> 5.5 -> 5; 2048 -> 7
    expected = {64: 3, 128: 5, 256: 5, 512: 5, 1024: 5, 2048: 7}
    for c, k in expected.items():
        assert eca_kernel_size(c) == k, c
        assert attnzoo.create_block("eca", c).conv.kernel_size == (k,)
    for c in range(64, 2049, 16):  # and timm's EcaModule agrees on every width between
        assert eca_kernel_size(c) == EcaModule(c).conv.kernel_size[0], c


@pytest.mark.parametrize("channels", [64, 128, 256, 512, 1024, 2048])
def test_eca_kernel_follows_its_formula(channels):
    t = int(abs(math.log2(channels) / 2 + 1 / 2))
    expected = t if t % 2 else t + 1
    assert attnzoo.create_block("eca", channels).conv.kernel_size == (expected,)


# --- SK ----------------------------------------------------------------------------------


def test_sk_branch_weights_are_a_softmax_over_branches():
    sk = attnzoo.create_block("sk", 64, kernel_sizes=[3, 5, 7]).eval()
    randomise(sk)
    u = sk.branch_outputs(torch.randn(2, 64, 8, 8))
    assert u.shape == (2, 3, 64, 8, 8)
    a = sk.branch_weights(u)
    assert a.shape == (2, 3, 64, 1, 1)
    assert (a > 0).all()
    torch.testing.assert_close(a.sum(1), torch.ones(2, 64, 1, 1))
    assert not torch.allclose(a[:, 0], a[:, 1])  # the selection depends on the input


def test_sk_paper_defaults():
    sk = attnzoo.create_block("sk", 256)
    convs = [b.conv for b in sk.branches]
    assert [(c.kernel_size, c.dilation, c.groups) for c in convs] == [
        ((3, 3), (1, 1), 32), ((3, 3), (2, 2), 32)]   # 3x3 and "5x5" = dilated 3x3, G=32
    assert sk.fc_reduce.out_channels == 32                # d = max(256 / 16, L = 32)
    assert attnzoo.create_block("sk", 1024).fc_reduce.out_channels == 64
    assert sk.fc_select.out_channels == 2 * 256


@pytest.mark.parametrize("split_input", [False, True])
def test_sk_equals_timm_selective_kernel(split_input):
    ours = ZooSelectiveKernel(64, 128, stride=2, groups=4, reduction=8, min_channels=16,
                              split_input=split_input).eval()
    peer = SelectiveKernel(64, 128, stride=2, groups=4, rd_ratio=1 / 8, rd_divisor=16,
                           split_input=split_input).eval()
    randomise(peer)
    copy_by_order(ours, peer)
    x = torch.randn(2, 64, 10, 10)
    torch.testing.assert_close(ours(x), peer(x))
    assert ours(x).shape == (2, 128, 5, 5)


def test_sk_replacing_a_conv_takes_its_stride_and_channels():
    model = attnzoo.create_model({
        "name": "sk_probe", "backbone": {"name": "resnet18"},
        "insert": [{"block": {"type": "sk", "groups": 1},
                    "at": {"path": "layer2.0.conv1", "position": "replace"}}],
    })
    sk = model.layer2[0].conv1
    assert isinstance(sk, ZooSelectiveKernel)
    assert sk.branches[0].conv.in_channels == 64 and sk.branches[0].conv.out_channels == 128
    assert sk.branches[0].conv.stride == (2, 2)
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_sk_rejects_bad_configs():
    with pytest.raises(SpecError, match="groups"):
        attnzoo.create_block("sk", 48)  # G = 32 does not divide 48
    with pytest.raises(SpecError, match="odd"):
        attnzoo.create_block("sk", 64, kernel_sizes=[3, 4])


def test_sk_replaces_the_conv_and_its_bn():
    model = attnzoo.create_model("resnet18_sk")
    kinds = {(b.block_type, b.name) for b in model.attnzoo_blocks}
    assert ("sk", "layer1.0.conv1") in kinds and ("identity", "layer1.0.bn1") in kinds
    assert len(model.attnzoo_blocks) == 16  # 8 blocks: SK + the removed BN
    assert not any(k.startswith("layer1.0.bn1.") for k in model.state_dict())
    assert model.layer2[0].conv1.branches[1].conv.stride == (2, 2)
    assert model.layer2[0].conv1.branches[1].conv.dilation == (2, 2)


# --- GCT ---------------------------------------------------------------------------------


def test_gct_is_the_identity_at_init():
    gct = attnzoo.create_block("gct", 64)
    x = torch.randn(2, 64, 9, 7) * 3
    assert torch.equal(gct(x), x)
    assert sum(p.numel() for p in gct.parameters()) == 3 * 64  # alpha, gamma, beta


def test_gct_follows_the_paper_formula_and_resets_to_identity():
    gct = attnzoo.create_block("gct", 32)
    randomise(gct)
    x = torch.randn(2, 32, 6, 5)
    alpha, gamma, beta = (p.view(1, -1) for p in (gct.alpha, gct.gamma, gct.beta))
    s = alpha * x.flatten(2).norm(dim=2)                       # alpha_c * ||x_c||_2
    s_hat = math.sqrt(32) * s / s.norm(dim=1, keepdim=True)    # sqrt(C) s / ||s||_2
    gate = 1 + torch.tanh(gamma * s_hat + beta)
    torch.testing.assert_close(gct(x), x * gate[:, :, None, None], atol=1e-5, rtol=1e-4)
    gct.reset_identity_()
    assert torch.equal(gct(x), x)


def test_gct_l1_mode_formula():
    gct = attnzoo.create_block("gct", 16, mode="l1")
    randomise(gct)
    x = torch.randn(1, 16, 4, 4)
    alpha, gamma, beta = (p.view(1, -1) for p in (gct.alpha, gct.gamma, gct.beta))
    s = alpha * x.abs().sum((2, 3))
    s_hat = 16 * s / s.abs().sum(1, keepdim=True)              # C s / ||s||_1
    gate = 1 + torch.tanh(gamma * s_hat + beta)
    torch.testing.assert_close(gct(x), x * gate[:, :, None, None], atol=1e-5, rtol=1e-4)


# --- GSoP --------------------------------------------------------------------------------


def test_gsop_equals_the_covariance_pooling_formula():
    gsop = GlobalSecondOrderPooling(64, reduced_channels=16).eval()
    randomise(gsop)
    x = torch.randn(2, 64, 6, 6)
    with torch.no_grad():
        z = gsop.reduce_act(gsop.reduce_bn(gsop.reduce(torch.relu(x)))).flatten(2)
        m = z.shape[2]
        # Covariance as the authors write it: X I_hat X^T, I_hat = (I - 1 1^T / M) / M.
        i_hat = (torch.eye(m) - torch.ones(m, m) / m) / m
        cov = z @ i_hat @ z.transpose(1, 2)                     # (N, d, d)
        bn = gsop.row_bn
        cov = (cov - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps)
        cov = cov * bn.weight[:, None] + bn.bias[:, None]
        # Row-wise conv: output j*4+k is the dot product of row j with its own kernel k.
        w = gsop.row_conv.weight.view(16, 4, 16)
        rows = torch.einsum("njd,jkd->njk", cov, w).reshape(2, 64) + gsop.row_conv.bias
        s = torch.sigmoid(rows @ gsop.fc.weight.flatten(1).T + gsop.fc.bias)
        torch.testing.assert_close(gsop(x), x * s[:, :, None, None], atol=1e-5, rtol=1e-4)


def test_gsop_parameter_count_and_stride():
    gsop = attnzoo.create_block("gsop", 256, reduce_stride=2)
    d, c = 128, 256
    expected = (c * d + d) + 2 * d + 2 * d + (4 * d * d + 4 * d) + (4 * d * c + c)
    assert sum(p.numel() for p in gsop.parameters()) == expected
    assert gsop.reduce.stride == (2, 2)
    assert gsop(torch.randn(1, 256, 8, 8)).shape == (1, 256, 8, 8)


# --- FcaNet ------------------------------------------------------------------------------


def test_fca_with_only_the_zero_frequency_is_se_average_pooling_up_to_a_constant():
    h, w = 7, 5
    fca = attnzoo.create_block("fca", 64, frequencies="top1", size=(h, w))
    x = torch.randn(2, 64, h, w)
    torch.testing.assert_close(fca.pool(x), x.mean((2, 3), keepdim=True) * math.sqrt(h * w))
    # ... and the whole block is SE (without biases) on the scaled average.
    randomise(fca)
    z = x.mean((2, 3)) * math.sqrt(h * w)
    s = torch.sigmoid(torch.relu(z @ fca.fc1.weight.flatten(1).T) @ fca.fc2.weight.flatten(1).T)
    torch.testing.assert_close(fca(x), x * s[:, :, None, None])


def test_fca_top16_pools_each_channel_group_with_its_2d_dct_coefficient():
    h = w = 14                     # scale 14 // 7 = 2: (u, v) in 7x7 space -> (2u, 2v)
    fca = attnzoo.create_block("fca", 32, size=(h, w))
    freqs = fca_frequencies("top16")
    assert len(freqs) == 16 and freqs[:3] == ((0, 0), (0, 1), (6, 0))
    x = torch.randn(1, 32, h, w, dtype=torch.float64)
    pooled = fca.pool(x.float()).flatten()
    spectrum = scipy.fft.dctn(x[0].numpy(), type=2, norm="ortho", axes=(1, 2))
    for c in range(32):
        u, v = freqs[c // 2]       # 32 channels / 16 frequencies = 2 channels per group
        assert pooled[c].item() == pytest.approx(spectrum[c, 2 * u, 2 * v], abs=1e-4)


def test_fca_paper_defaults_and_dct_size_from_the_site():
    fca = attnzoo.create_block("fca", 256, size=(56, 56))
    assert fca.dct_size == (56, 56) and fca.frequencies == "top16"
    assert fca.fc1.out_channels == 16 and fca.fc1.bias is None  # r = 16, FCs without bias
    # Another input size is adaptively pooled to the DCT size first.
    assert fca(torch.randn(1, 256, 16, 16)).shape == (1, 256, 16, 16)
    assert "dct_filters" not in fca.state_dict()  # derived, not a weight


@pytest.mark.parametrize("selection", ["bot8", "low32", "top32"])
def test_fca_other_selections(selection):
    fca = attnzoo.create_block("fca", 64, frequencies=selection, size=(7, 7))
    n = int(selection[3:])
    assert len(fca_frequencies(selection)) == n
    assert len(set(fca_frequencies(selection))) == n  # distinct frequencies
    assert fca(torch.randn(1, 64, 7, 7)).shape == (1, 64, 7, 7)


def test_fca_errors_say_what_is_wrong():
    with pytest.raises(SpecError, match="dct_size"):
        attnzoo.create_block("fca", 64)                         # no size known
    with pytest.raises(SpecError, match="frequencies"):
        attnzoo.create_block("fca", 64, frequencies="top3", size=(7, 7))
    with pytest.raises(SpecError, match="does not fit"):
        attnzoo.create_block("fca", 64, size=(4, 4))            # (6, 0) needs 7 rows
    with pytest.raises(SpecError, match="frequency groups"):
        attnzoo.create_block("fca", 40, size=(7, 7))            # 40 % 16 != 0


# --- exportability -----------------------------------------------------------------------


@pytest.mark.parametrize("block", ["sk", "gct", "gsop", "fca"])
def test_blocks_torch_export_matches_eager(block):
    cfg = {"size": (8, 8)} if block == "fca" else {}
    module = attnzoo.create_block(block, 64, **cfg).eval()
    x = torch.randn(2, 64, 8, 8)
    exported = torch.export.export(module, (x,), strict=False)
    torch.testing.assert_close(exported.module()(x), module(x))


@pytest.mark.slow
@pytest.mark.parametrize("block", ["sk", "gct", "gsop", "fca"])
def test_blocks_compile_as_one_graph(block):
    cfg = {"size": (8, 8)} if block == "fca" else {}
    module = attnzoo.create_block(block, 64, **cfg).eval()
    x = torch.randn(2, 64, 8, 8)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), module(x))


# --- zoo specs ---------------------------------------------------------------------------


# name -> (inserted blocks, paper's parameter count in millions or None, tolerance)
ZOO = {
    "resnet18_sk": (16, None),          # timm's variant; the paper has no SK-ResNet-18
    "resnet34_sk": (32, None),
    "resnet50_sk": (32, 27.5),          # SKNet-50, Table 2 of 1903.06586
    "resnet50_gct": (53, None),         # GCT adds 3C per conv: ResNet-50 + 0.07M
    "resnet50_gsop": (4, 28.29),        # GSoP-Net1 (authors' code, 4 blocks)
    "resnet50_fca": (16, 28.07),        # FcaNet-50, Table 3 of 2012.11879
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_spec_builds_runs_and_matches_the_paper(name):
    n_blocks, params_m = ZOO[name]
    model = attnzoo.create_model(name).eval()
    assert len(model.attnzoo_blocks) == n_blocks
    params = sum(p.numel() for p in model.parameters())
    if params_m is not None:
        assert abs(params / 1e6 - params_m) < 0.005 * params_m, params
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert model.attnzoo_spec.paper.startswith("https://arxiv.org/abs/")


def test_gct_model_starts_equal_to_its_backbone():
    model = attnzoo.create_model("resnet50_gct").eval()
    plain = timm.create_model("resnet50").eval()
    backbone_weights = {k: v for k, v in model.state_dict().items() if "attnzoo_" not in k}
    plain.load_state_dict(backbone_weights, strict=True)  # the backbone's names are kept
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))
    convs = [m for m in plain.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(model.attnzoo_blocks) == len(convs)  # one GCT before every conv ...
    added = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in plain.parameters())
    assert added == sum(3 * c.in_channels for c in convs)  # ... with alpha, gamma, beta
    paths = {b.site for b in model.attnzoo_blocks}
    assert {"conv1", "layer1.0.conv2", "layer1.0.downsample.0", "layer4.2.conv3"} <= paths


def test_fca_model_sizes_its_dct_to_each_stage():
    model = attnzoo.create_model("resnet50_fca")
    sizes = {b.site.split(".")[0]: b.size for b in model.attnzoo_blocks}
    assert sizes == {"layer1": (56, 56), "layer2": (28, 28), "layer3": (14, 14),
                     "layer4": (7, 7)}
