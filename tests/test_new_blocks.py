"""Issue 21's blocks and models: each block against an oracle written here from its
paper's equations or its authors' released code; equal outputs to timm's
implementation, given the same weights, for split attention (ResNeSt), halo attention,
lambda layers, gather-excite and effective SE; zero_init starting as the identity; the
DANet architecture; the zoo models' parameter counts against their papers' tables."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import attnzoo
from attnzoo.builder import build_model
from attnzoo.convert import TIMM_EQUIVALENTS, from_timm

NEW_BLOCKS = ["bam", "contextual_transformer", "coordinate_attention", "danet_channel",
              "danet_position", "effective_se", "efficient_multiscale_attention",
              "external_attention", "gather_excite", "generalized_attention", "halo_attention",
              "lambda_layer", "scse", "shuffle_attention", "spatial_group_enhance",
              "split_attention", "triplet_attention"]


def rand_(module: nn.Module, std: float = 0.3) -> nn.Module:
    """Random parameters (no zero gamma or BN weight hides a path) and BN statistics;
    eval mode."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * std)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return module.eval()


def bn(x: torch.Tensor, norm: nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                        False, 0.0, norm.eps)


def conv(x: torch.Tensor, c: nn.Conv2d) -> torch.Tensor:
    return F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)


def block(name: str, channels: int = 64, size=(7, 6), **cfg) -> nn.Module:
    return rand_(attnzoo.create_block(name, channels, size=size, **cfg))


def test_the_new_blocks_are_registered():
    assert set(NEW_BLOCKS) <= set(attnzoo.list_blocks())


# --- oracles from the papers' equations and the released code -----------------------------


def test_coordinate_attention_is_the_authors_coordatt():
    m = block("coordinate_attention", 64)
    x = torch.randn(2, 64, 7, 5)
    h, w = x.shape[-2:]
    y = torch.cat([F.adaptive_avg_pool2d(x, (None, 1)),
                   F.adaptive_avg_pool2d(x, (1, None)).permute(0, 1, 3, 2)], dim=2)
    y = bn(conv(y, m.conv1), m.bn1)
    y = y * F.relu6(y + 3) / 6                                      # h_swish
    y_h, y_w = torch.split(y, [h, w], dim=2)
    want = x * conv(y_w.permute(0, 1, 3, 2), m.conv_w).sigmoid() * conv(y_h, m.conv_h).sigmoid()
    torch.testing.assert_close(m(x), want)
    assert m.conv1.out_channels == max(8, 64 // 32)


def _zpool_gate(x: torch.Tensor, gate) -> torch.Tensor:
    pooled = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), 1)
    return x * torch.sigmoid(bn(F.conv2d(pooled, gate.conv.weight, padding=3), gate.bn))


@pytest.mark.parametrize("spatial", [True, False])
def test_triplet_attention_is_the_authors_three_branches(spatial):
    m = block("triplet_attention", 16, spatial=spatial)
    x = torch.randn(2, 16, 7, 5)
    out1 = _zpool_gate(x.permute(0, 2, 1, 3), m.channel_height).permute(0, 2, 1, 3)
    out2 = _zpool_gate(x.permute(0, 3, 2, 1), m.channel_width).permute(0, 3, 2, 1)
    want = (_zpool_gate(x, m.spatial) + out1 + out2) / 3 if spatial else (out1 + out2) / 2
    torch.testing.assert_close(m(x), want)


@pytest.mark.parametrize("combine", ["sum", "product"])
def test_bam_is_the_paper_or_the_released_code(combine):
    m = block("bam", 64, combine=combine)
    x = torch.randn(2, 64, 9, 8)
    fc1, bn1, _, fc2 = m.channel
    mc = conv(F.relu(bn(conv(x.mean((2, 3), keepdim=True), fc1), bn1)), fc2)
    s = x
    for layer in m.spatial:
        s = conv(s, layer) if isinstance(layer, nn.Conv2d) else (
            bn(s, layer) if isinstance(layer, nn.BatchNorm2d) else F.relu(s))
    assert m.spatial[3].dilation == (4, 4) and m.channel[0].out_channels == 64 // 16
    att = 1 + torch.sigmoid(mc + s if combine == "sum" else mc * s)   # F' = F + F * M(F)
    torch.testing.assert_close(m(x), att * x)


def test_danet_position_attention_is_the_released_pam():
    m = block("danet_position", 64)
    x = torch.randn(2, 64, 5, 6)
    n, c, h, w = x.shape
    q = conv(x, m.query_conv).view(n, -1, h * w).permute(0, 2, 1)
    k = conv(x, m.key_conv).view(n, -1, h * w)
    attention = torch.softmax(torch.bmm(q, k), dim=-1)
    v = conv(x, m.value_conv).view(n, -1, h * w)
    out = torch.bmm(v, attention.permute(0, 2, 1)).view(n, c, h, w)
    torch.testing.assert_close(m(x), m.gamma * out + x, atol=1e-5, rtol=1e-5)
    assert m.query_conv.out_channels == 8


def test_danet_channel_attention_is_the_released_cam():
    m = block("danet_channel", 16)
    x = torch.randn(2, 16, 5, 6)
    n, c, h, w = x.shape
    q = x.view(n, c, -1)
    energy = torch.bmm(q, q.permute(0, 2, 1))
    energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
    out = torch.bmm(torch.softmax(energy_new, dim=-1), q).view(n, c, h, w)
    torch.testing.assert_close(m(x), m.gamma * out + x, atol=1e-5, rtol=1e-5)


def test_shuffle_attention_is_the_authors_sa_layer():
    m = block("shuffle_attention", 256)
    assert m.groups == 64
    x = torch.randn(2, 256, 5, 4)
    b, c, h, w = x.shape
    g = x.reshape(b * 64, -1, h, w)
    x0, x1 = g.chunk(2, dim=1)
    xn = x0 * torch.sigmoid(m.cweight * F.adaptive_avg_pool2d(x0, 1) + m.cbias)
    xs = x1 * torch.sigmoid(m.sweight * F.group_norm(x1, x1.shape[1], m.gn.weight, m.gn.bias,
                                                     m.gn.eps) + m.sbias)
    out = torch.cat([xn, xs], dim=1).reshape(b, -1, h, w)
    want = out.reshape(b, 2, -1, h, w).permute(0, 2, 1, 3, 4).reshape(b, -1, h, w)
    torch.testing.assert_close(m(x), want)


def test_spatial_group_enhance_is_the_authors_sge():
    m = block("spatial_group_enhance", 128)
    x = torch.randn(2, 128, 6, 5)
    b, c, h, w = x.shape
    g = x.view(b * 64, -1, h, w)
    t = (g * F.adaptive_avg_pool2d(g, 1)).sum(dim=1, keepdim=True).view(b * 64, -1)
    t = t - t.mean(dim=1, keepdim=True)
    t = t / (t.std(dim=1, keepdim=True) + 1e-5)
    t = t.view(b, 64, h, w) * m.weight + m.bias
    want = (g * torch.sigmoid(t.view(b * 64, 1, h, w))).view(b, c, h, w)
    torch.testing.assert_close(m(x), want)


def test_efficient_multiscale_attention_is_the_authors_ema():
    m = block("efficient_multiscale_attention", 64)
    x = torch.randn(2, 64, 6, 5)
    b, c, h, w = x.shape
    gx = x.reshape(b * 32, -1, h, w)
    x_h = F.adaptive_avg_pool2d(gx, (None, 1))
    x_w = F.adaptive_avg_pool2d(gx, (1, None)).permute(0, 1, 3, 2)
    hw = conv(torch.cat([x_h, x_w], dim=2), m.conv1x1)
    x_h, x_w = torch.split(hw, [h, w], dim=2)
    x1 = F.group_norm(gx * x_h.sigmoid() * x_w.permute(0, 1, 3, 2).sigmoid(), m.gn.num_groups,
                      m.gn.weight, m.gn.bias, m.gn.eps)
    x2 = conv(gx, m.conv3x3)
    x11 = torch.softmax(F.adaptive_avg_pool2d(x1, 1).reshape(b * 32, -1, 1).permute(0, 2, 1), -1)
    x21 = torch.softmax(F.adaptive_avg_pool2d(x2, 1).reshape(b * 32, -1, 1).permute(0, 2, 1), -1)
    weights = (x11 @ x2.reshape(b * 32, c // 32, -1) + x21 @ x1.reshape(b * 32, c // 32, -1))
    want = (gx * weights.reshape(b * 32, 1, h, w).sigmoid()).reshape(b, c, h, w)
    torch.testing.assert_close(m(x), want)


@pytest.mark.parametrize(("channels", "wanted", "per_group", "got"),
                         [(256, 64, 2, 64), (48, 64, 2, 24), (12, 64, 1, 12), (40, 32, 1, 20)])
def test_grouped_blocks_use_the_largest_fitting_group_count(channels, wanted, per_group, got):
    from attnzoo.blocks.grouped import fitting_groups

    assert fitting_groups(channels, wanted, per_group) == got


def _aggregation_reference(x, w, k):
    """The authors' own reference for their CUDA aggregation (its unfold-based test)."""
    n, c_x, h, wd = x.shape
    c_w = w.shape[2]
    x2 = F.unfold(x, k, padding=k // 2).view(n, c_x // c_w, c_w, k * k, h, wd)
    return (w.unsqueeze(2) * x2.unsqueeze(1)).sum(-3).view(n, -1, h, wd)


@pytest.mark.parametrize("stride", [1, 2])
def test_contextual_transformer_is_the_authors_cotlayer(stride):
    m = rand_(attnzoo.create_block("contextual_transformer", 32))
    if stride == 2:
        m.avd = nn.AvgPool2d(3, 2, padding=1)
    x = torch.randn(2, 32, 8, 7)
    x_in = m.avd(x)
    k = m.key_embed(x_in)
    b, _, hh, ww = x_in.shape
    wts = m.embed(torch.cat([x_in, k], dim=1)).view(b, 1, -1, 9, hh, ww)
    y = _aggregation_reference(m.conv1x1(x_in), wts, 3)
    y = m.act(m.bn(y))
    both = torch.cat([y.view(b, 32, 1, hh, ww), k.view(b, 32, 1, hh, ww)], dim=2)
    attn = F.softmax(m.se(both.sum(2).mean((2, 3), keepdim=True)).view(b, 32, 2), dim=2)
    want = (both * attn.reshape(b, 32, 2, 1, 1)).sum(dim=2)
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)


def test_external_attention_is_the_authors_eanet_block():
    m = block("external_attention", 32)
    x = torch.randn(2, 32, 5, 6)
    b, c, h, w = x.shape
    y = conv(x, m.conv1).view(b, c, h * w)
    attn = F.softmax(F.conv1d(y, m.linear_0.weight), dim=-1)
    attn = attn / (1e-9 + attn.sum(dim=1, keepdim=True))
    y = F.conv1d(attn, m.linear_1.weight).view(b, c, h, w)
    want = F.relu(bn(conv(y, m.conv2[0]), m.conv2[1]) + x)
    torch.testing.assert_close(m(x), want)
    fresh = attnzoo.create_block("external_attention", 32)
    torch.testing.assert_close(fresh.linear_1.weight, fresh.linear_0.weight.permute(1, 0, 2))


@pytest.mark.parametrize("combine", ["add", "max", "mul"])
def test_scse_is_the_papers_concurrent_gates(combine):
    m = block("scse", 32, combine=combine)
    x = torch.randn(2, 32, 5, 6)
    c_se = x * torch.sigmoid(conv(F.relu(conv(x.mean((2, 3), keepdim=True), m.fc1)), m.fc2))
    s_se = x * torch.sigmoid(conv(x, m.spatial))
    want = {"add": c_se + s_se, "max": torch.maximum(c_se, s_se), "mul": c_se * s_se}[combine]
    torch.testing.assert_close(m(x), want)
    assert m.fc1.out_channels == 16


def _mmcv_generalized(m, x):
    """mmcv's GeneralizedAttention.forward, term by term, with ``m``'s weights."""
    heads, d = m.num_heads, m.dim_head
    t = m.terms
    xq = x[:, :, ::m.q_stride, ::m.q_stride]
    xk = x[:, :, ::m.kv_stride, ::m.kv_stride]
    n, _, h, w = xq.shape
    hk, wk = xk.shape[-2:]
    energy = torch.zeros(n, heads, h, w, hk, wk)
    if t[0] or t[1]:
        q = conv(xq, m.query_conv).view(n, heads, d, h * w).permute(0, 1, 3, 2)
    if t[0] or t[2]:
        k = conv(xk, m.key_conv).view(n, heads, d, hk * wk)
        query = (q if t[0] else 0) + (m.appr_bias.view(1, heads, 1, d) if t[2] else 0)
        energy = energy + torch.matmul(query.expand(n, heads, h * w, d), k).view(
            n, heads, h, w, hk, wk)
    if t[1] or t[3]:
        dim = m.position_dim
        feat = torch.arange(0, dim / 4)
        dim_mat = torch.tensor([1000.0]) ** ((4.0 / dim) * feat)
        w_diff = (torch.arange(w)[:, None] * m.q_stride - torch.arange(wk)[None] * m.kv_stride)
        h_diff = (torch.arange(h)[:, None] * m.q_stride - torch.arange(hk)[None] * m.kv_stride)
        w_diff = (w_diff * m.position_magnitude)[..., None] / dim_mat
        h_diff = (h_diff * m.position_magnitude)[..., None] / dim_mat
        emb_x = torch.cat([w_diff.sin(), w_diff.cos()], dim=2)
        emb_y = torch.cat([h_diff.sin(), h_diff.cos()], dim=2)
        px = F.linear(emb_x, m.appr_geom_fc_x.weight).view(1, w, wk, heads, d).permute(
            0, 3, 1, 2, 4) / math.sqrt(2)
        py = F.linear(emb_y, m.appr_geom_fc_y.weight).view(1, h, hk, heads, d).permute(
            0, 3, 1, 2, 4) / math.sqrt(2)
        geom = (q if t[1] else 0) + (m.geom_bias.view(1, heads, 1, d) if t[3] else 0)
        geom = geom.expand(n, heads, h * w, d).reshape(n, heads, h, w, d)
        ex = torch.matmul(geom.permute(0, 1, 3, 2, 4), px.permute(0, 1, 2, 4, 3))
        ey = torch.matmul(geom, py.permute(0, 1, 2, 4, 3))
        energy = energy + ex.permute(0, 1, 3, 2, 4).unsqueeze(4) + ey.unsqueeze(5)
    energy = energy.view(n, heads, h * w, hk * wk)
    if m.spatial_range >= 0:
        r, s = m.spatial_range, m.kv_stride
        mask = torch.ones(h, w, hk, wk, dtype=torch.bool)
        for iy in range(h):
            for ix in range(w):
                mask[iy, ix, max((iy - r) // s, 0):(iy + r + 1) // s + 1,
                     max((ix - r) // s, 0):(ix + r + 1) // s + 1] = False
        energy = energy.masked_fill(mask.view(1, 1, h * w, hk * wk), float("-inf"))
    attention = F.softmax(energy, 3)
    v = conv(xk, m.value_conv).view(n, heads, d, hk * wk).permute(0, 1, 3, 2)
    out = torch.matmul(attention, v).permute(0, 1, 3, 2).reshape(n, heads * d, h, w)
    out = conv(out, m.proj_conv)
    if m.q_stride > 1:
        out = F.interpolate(out, size=x.shape[2:], mode="bilinear", align_corners=False)
    return m.gamma * out + x


@pytest.mark.parametrize("cfg", [{}, {"attention_type": "0010"}, {"attention_type": "0101"},
                                 {"attention_type": "1000", "kv_stride": 1},
                                 {"spatial_range": 2}, {"q_stride": 2, "num_heads": 4}])
def test_generalized_attention_is_mmcvs_four_terms(cfg):
    m = block("generalized_attention", 32, **cfg)
    x = torch.randn(2, 32, 8, 7)
    torch.testing.assert_close(m(x), _mmcv_generalized(m, x), atol=1e-5, rtol=1e-4)


# --- equal to timm, given the same weights ---------------------------------------------------


@pytest.mark.parametrize(("groups", "radix", "stride"), [(1, 2, 1), (2, 2, 2), (1, 1, 1),
                                                        (2, 4, 1)])
def test_split_attention_equals_timms_splitattn(groups, radix, stride):
    from timm.layers import SplitAttn

    peer = rand_(SplitAttn(64, 64, stride=stride, groups=groups, radix=radix,
                           norm_layer=nn.BatchNorm2d))
    ours = attnzoo.blocks.split_attention.SplitAttention(
        64, 64, stride=stride, groups=groups, radix=radix).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(2, 64, 9, 8)
    torch.testing.assert_close(ours(x), peer(x))


def _live_bn_(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("name", ["resnest50", "vovnet39_ese"])
def test_zoo_model_loads_timms_weights_strictly_with_equal_outputs(name):
    peer = _live_bn_(timm.create_model(TIMM_EQUIVALENTS[name].timm_name))
    model = attnzoo.create_model(name).eval()
    model.load_state_dict(from_timm(name, peer.state_dict()), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), peer(x), atol=1e-5, rtol=1e-5)


def test_halonet50_loads_halonet50ts_weights_strictly():
    """timm's HaloNet needs 256x256 inputs (8x8 blocks at stride 32); the equal outputs
    are checked layer by layer below, at small sizes."""
    peer = timm.create_model("halonet50ts")
    model = attnzoo.create_model("halonet50")
    model.load_state_dict(from_timm("halonet50", peer.state_dict()), strict=True)
    assert sum(isinstance(m, attnzoo.blocks.local_self_attention.HaloAttention)
               for m in model.modules()) == 5
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("cfg", [dict(), dict(stride=2), dict(stride=2, avg_down=True),
                                 dict(block_size=3, stride=2), dict(dim_head=12, qkv_bias=True),
                                 dict(scale_pos_embed=True, halo_size=0)])
def test_halo_attention_equals_timms_haloattn(cfg):
    from timm.layers.halo_attn import HaloAttn

    cfg = {"num_heads": 4, "block_size": 4, "halo_size": 1, **cfg}
    peer = rand_(HaloAttn(32, 48, **cfg))
    ours = attnzoo.blocks.local_self_attention.HaloAttention(32, 48, **cfg).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    bs = cfg["block_size"]
    x = torch.randn(2, 32, 2 * bs * 2, 3 * bs * 2)
    torch.testing.assert_close(ours(x), peer(x))


def test_halo_attention_pads_other_sizes_with_zero_keys():
    """A map that is not a multiple of the block size: the same as timm's computation on
    the map padded to a multiple, when the padding's keys and values are 0 (the kv conv
    has no bias), cropped back."""
    from timm.layers.halo_attn import HaloAttn

    peer = rand_(HaloAttn(16, 16, num_heads=2, block_size=4, halo_size=1))
    ours = attnzoo.blocks.local_self_attention.HaloAttention(16, 16, num_heads=2, block_size=4,
                                                             halo_size=1).eval()
    ours.load_state_dict(peer.state_dict())
    x = torch.randn(1, 16, 6, 7)
    want = peer(F.pad(x, [0, 1, 0, 2]))[..., :6, :7]
    torch.testing.assert_close(ours(x), want)


@pytest.mark.parametrize("cfg", [dict(r=9), dict(r=None), dict(r=5, stride=2),
                                 dict(r=9, dim_head=8, num_heads=2, qkv_bias=True)])
def test_lambda_layer_equals_timms_lambdalayer(cfg):
    from timm.layers.lambda_layer import LambdaLayer

    peer = rand_(LambdaLayer(32, feat_size=(6, 7), **cfg))
    ours = attnzoo.blocks.local_self_attention.LambdaLayer(32, size=(6, 7), **{
        "dim_head": 16, **cfg}).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(2, 32, 6, 7)
    torch.testing.assert_close(ours(x), peer(x))


@pytest.fixture()
def timm_gather_excite(monkeypatch):
    """timm's GatherExcite, with the positional ``*dd`` its constructor passes to
    ``create_conv2d``, ``ConvMlp`` and ``BatchNorm2d`` dropped (a bug of timm 1.0.x that
    makes every configuration with an MLP or parameters fail to build)."""
    import timm.layers.gather_excite as ge

    def strip(fn):
        return lambda *a, **k: fn(*[v for v in a if not isinstance(v, str)], **k)

    monkeypatch.setattr(ge, "create_conv2d", strip(ge.create_conv2d))
    monkeypatch.setattr(ge, "ConvMlp", strip(ge.ConvMlp))
    return ge.GatherExcite


@pytest.mark.parametrize("cfg", [
    dict(extra_params=False, extent=0),
    dict(extra_params=False, extent=2),
    dict(extra_params=False, extent=4, mlp=False),
    dict(extra_params=True, extent=4),
    dict(extra_params=True, extent=0, global_padding="same"),
])
def test_gather_excite_equals_timms(cfg, timm_gather_excite):
    size = (7, 6)
    kwargs = dict(extent=cfg["extent"], extra_params=False, use_mlp=cfg.get("mlp", True))
    peer = timm_gather_excite(64, feat_size=size, **kwargs)
    if cfg["extra_params"]:
        # timm's norm layers fail to build too (BatchNorm2d(channels, *dd)): ours, whose
        # gather is laid out as timm's (conv1, norm1, act1, ...), lends its gather.
        ours = attnzoo.create_block("gather_excite", 64, size=size, **cfg)
        peer.gather = ours.gather
    ours = attnzoo.create_block("gather_excite", 64, size=size, **cfg)
    rand_(peer)
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(2, 64, *size)
    torch.testing.assert_close(ours.eval()(x), peer(x))


def test_gather_excite_global_valid_gathers_one_value_per_channel():
    """The paper's GE-theta: a depthwise conv whose kernel covers the map, then BN."""
    m = block("gather_excite", 32, size=(5, 4))
    x = torch.randn(2, 32, 5, 4)
    context = bn(F.conv2d(x, m.gather.conv1.weight, groups=32), m.gather.norm1)
    assert context.shape == (2, 32, 1, 1)
    want = x * torch.sigmoid(conv(F.relu(conv(context, m.mlp.fc1)), m.mlp.fc2))
    torch.testing.assert_close(m(x), want)


def test_effective_se_equals_timms_effectivesemodule():
    from timm.layers.squeeze_excite import EffectiveSEModule

    peer = rand_(EffectiveSEModule(48))
    ours = attnzoo.create_block("effective_se", 48).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(2, 48, 5, 6)
    torch.testing.assert_close(ours(x), peer(x))


# --- zero_init ----------------------------------------------------------------------------

RESIDUAL = [b for b in NEW_BLOCKS if attnzoo.registry.get_block_config(b).residual]
REPLACING = {"split_attention", "halo_attention", "lambda_layer", "contextual_transformer"}


@pytest.mark.parametrize("name", RESIDUAL)
def test_residual_blocks_reset_to_the_identity(name):
    m = block(name, 32, (6, 6))
    x = torch.randn(2, 32, 6, 6)
    assert not torch.allclose(m(x), x)
    m.reset_identity_()
    torch.testing.assert_close(m(x), x)


@pytest.mark.parametrize("name", sorted(set(NEW_BLOCKS) - set(RESIDUAL) - REPLACING))
def test_zero_init_keeps_a_backbones_outputs(name):
    """The builder wraps a gating block in IdentityBlend (alpha = 0): whatever the
    block's own weights, the model computes the backbone."""
    from attnzoo.builder import IdentityBlend

    spec = {"name": "z", "backbone": {"name": "resnet10t"}, "input_size": [3, 64, 64],
            "insert": [{"block": {"type": name}, "at": "residual", "stages": [3, 4],
                        "zero_init": True}]}
    model = rand_(attnzoo.create_model(spec))
    blends = [m for m in model.modules() if isinstance(m, IdentityBlend)]
    assert len(blends) == 2
    with torch.no_grad():
        for m in blends:
            m.alpha.zero_()
    plain = timm.create_model("resnet10t").eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))


# --- the DANet architecture ---------------------------------------------------------------


def test_danet_returns_fused_logits_and_branch_outputs_in_training():
    spec = {"name": "d", "input_size": [3, 64, 64],
            "backbone": {"source": "attnzoo", "name": "danet",
                         "args": {"backbone": "resnet18", "num_classes": 5}}}
    model = attnzoo.create_model(spec)
    x = torch.randn(2, 3, 64, 64)
    outs = model.train()(x)
    assert len(outs) == 3 and all(o.shape == (2, 5, 64, 64) for o in outs)
    sum(o.mean() for o in outs).backward()
    assert model.branches.position.attention.gamma.grad is not None
    assert model.eval()(x).shape == (2, 5, 64, 64)
    pam = model.branches.position.attention
    assert isinstance(pam, attnzoo.blocks.danet.PositionAttention)
    assert pam.query_conv.in_channels == 512 // 4
    assert model.encoder.layer4[0].conv1.stride == (1, 1)  # output stride 8


def test_danet_with_one_branch_and_bad_args():
    base = {"name": "d", "input_size": [3, 32, 32],
            "backbone": {"source": "attnzoo", "name": "danet",
                         "args": {"backbone": "resnet18", "channel": None}}}
    model = attnzoo.create_model(base).eval()
    assert list(model.branches) == ["position"]
    for bad in ({"channel": None, "position": None}, {"dropout": 1.5},
                {"position": {"type": "nope"}}):
        spec = {**base, "backbone": {**base["backbone"],
                                     "args": {"backbone": "resnet18", **bad}}}
        with pytest.raises(attnzoo.SpecError):
            attnzoo.create_model(spec)


# --- the zoo models and their papers' parameter counts ---------------------------------------

# name -> (inserted blocks, parameters in millions the paper reports, or None)
PAPER = {
    "mobilenetv2_ca": (16, 3.95),      # Coordinate Attention, Table 2 (MobileNetV2 + CA)
    "resnet50_ca": (16, None),         # zoo composition (r = 32 at the SE site)
    "resnet50_triplet": (16, 25.56),   # Triplet Attention, Table 2 / the authors' README
    "resnet50_bam": (3, 25.92),        # BAM, Table 4 (ResNet50 + BAM)
    "resnest50": (48, 27.5),           # ResNeSt, Table 3 (ResNeSt-50, 27.5M)
    "resnet50_sa": (16, 25.56),        # SA-Net: ResNet-50 25.56M plus a few hundred
    "resnet50_sge": (16, 25.56),       # SGE-Net, Table 5 (SGE-ResNet50)
    "mobilenetv2_ema": (13, 3.55),     # EMA's release, ImageNet table (MobileNetV2 + EMA)
    "resnet50_lambda": (16, 15.0),     # LambdaNetworks, Table 3 (lambda layer, 15.0M)
    "halonet50": (5, None),            # zoo composition (timm's halonet50ts: 22.73M)
    "resnet50_ge": (16, None),         # GE-theta+; the table value was not checked
    "vovnet39_ese": (4, None),         # timm's ese_vovnet39b (24.57M)
    "resnet50_ga": (9, None),          # zoo composition (mmdet's placement)
    "resnet50_cot": (48, 22.2),        # CoTNet, Table 1 (CoTNet-50, 22.2M)
    "resnet50_scse": (16, None),       # zoo composition
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_zoo_model_has_its_papers_parameter_count(name):
    blocks, paper_m = PAPER[name]
    model = build_model(attnzoo.load_spec(name), device="meta")
    assert len(model.attnzoo_blocks) == blocks
    params = sum(p.numel() for p in model.parameters()) / 1e6
    if paper_m is not None:
        assert abs(params - paper_m) <= 0.006 + 0.001 * paper_m, params
    assert attnzoo.load_spec(name).paper.startswith("https://")


@pytest.mark.parametrize(("name", "params"), [("danet_resnet101", 66.58), ("eanet_resnet101",
                                                                          53.84)])
def test_segmentation_models_build_with_their_sizes(name, params):
    """DANet's and EANet's papers report no parameter count; ours, for the record."""
    model = build_model(attnzoo.load_spec(name), device="meta")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == params
