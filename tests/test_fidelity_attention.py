"""Issue 20, items 6 and 7: the ``variant: released`` networks of non_local,
disentangled_non_local, polarized and mhsa2d equal their authors' released code.

Each oracle below is written from the released code's equations (not from attnzoo's
modules; only their weights are read), with the block's weights copied across, in eval
and train mode: max abs difference under 1e-5.

- non_local: facebookresearch/video-nonlocal-net, ``lib/models/nonlocal_helper.py``
  (max-pool x before the phi and g convs, floor mode; logits * dim_inner^-0.5; softmax;
  conv out; BN; + x) with ``lib/core/config.py``'s defaults (USE_MAXPOOL, USE_SCALE,
  USE_BN, CONV_INIT_STD 0.01, BN_INIT_GAMMA 0).
- disentangled_non_local: yinmh17/DNL-Semantic-Segmentation,
  ``model/seg/ops/nonlocal_block.py`` (``NonLocal2d_bn`` with the DNL configs'
  whiten_type ['channel'], temperature, with_gc, use_out False, out_bn False).
- polarized: DeLightCMU/PSA, ``semantic-segmentation/network/PSA.py`` (``PSA_p``,
  ``PSA_s``).
- mhsa2d: BoTNet's released ``relpos_self_attention`` (q scaled by d^-0.5 before the
  content and the relative logits; ``rel_to_abs`` relative indexing).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo

TOL = dict(atol=1e-5, rtol=0)


def randomize_(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return module


def conv1x1(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """A 1x1 conv of (N, C, H, W) written out as a matrix product."""
    out = torch.einsum("oc,nchw->nohw", conv.weight.flatten(1), x)
    return out if conv.bias is None else out + conv.bias[None, :, None, None]


def batch_norm(x: torch.Tensor, bn: torch.nn.BatchNorm2d, train: bool) -> torch.Tensor:
    if train:  # batch statistics, biased variance
        mean = x.mean((0, 2, 3), keepdim=True)
        var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    else:
        mean, var = bn.running_mean.view(1, -1, 1, 1), bn.running_var.view(1, -1, 1, 1)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + \
        bn.bias.view(1, -1, 1, 1)


def maxpool2x2_floor(x: torch.Tensor) -> torch.Tensor:
    """Caffe2/PyTorch MaxPool(kernel 2, stride 2, no padding): an odd last row/column is
    dropped."""
    n, c, h, w = x.shape
    x = x[:, :, :h // 2 * 2, :w // 2 * 2]
    return x.reshape(n, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))


def check(block: torch.nn.Module, oracle, x: torch.Tensor) -> None:
    for train in (False, True):
        block.train(train)
        with torch.no_grad():
            got = block(x)
        torch.testing.assert_close(got, oracle(x, train), **TOL)


# --- non_local (item 6) -----------------------------------------------------------------


def nl_released_oracle(nl):
    """spacetime_nonlocal of video-nonlocal-net on 2-D maps, plus the residual sum."""
    def run(x: torch.Tensor, train: bool) -> torch.Tensor:
        n, c, h, w = x.shape
        theta = conv1x1(x, nl.theta).flatten(2)                    # (N, C', HW)
        pooled = maxpool2x2_floor(x)                               # pool x, then convs
        phi = conv1x1(pooled, nl.phi).flatten(2)                   # (N, C', HW')
        g = conv1x1(pooled, nl.g).flatten(2)
        dim_inner = theta.shape[1]
        affinity = torch.bmm(theta.transpose(1, 2), phi) * dim_inner ** -0.5
        p = affinity.softmax(dim=2)                                # (N, HW, HW')
        t = torch.bmm(g, p.transpose(1, 2)).view(n, dim_inner, h, w)
        return x + batch_norm(conv1x1(t, nl.out_conv), nl.out_norm, train)
    return run


def nl_paper_oracle(nl):
    """The paper's Fig. 2 with the subsampling trick: max-pool (floor) after phi and g,
    no scaling (the common PyTorch ports)."""
    def run(x: torch.Tensor, train: bool) -> torch.Tensor:
        n, c, h, w = x.shape
        theta = conv1x1(x, nl.theta).flatten(2)
        phi = maxpool2x2_floor(conv1x1(x, nl.phi)).flatten(2)
        g = maxpool2x2_floor(conv1x1(x, nl.g)).flatten(2)
        p = torch.bmm(theta.transpose(1, 2), phi).softmax(dim=2)
        y = torch.bmm(g, p.transpose(1, 2)).view(n, -1, h, w)
        return x + batch_norm(conv1x1(y, nl.out_conv), nl.out_norm, train)
    return run


@pytest.mark.parametrize("size", [(7, 7), (6, 9), (8, 8)])
def test_non_local_released_equals_video_nonlocal_net(size):
    nl = randomize_(attnzoo.create_block("non_local", 16, variant="released"))
    assert nl.scale == 8 ** -0.5                  # USE_SCALE: dim_inner ** -0.5
    check(nl, nl_released_oracle(nl), torch.randn(2, 16, *size))


@pytest.mark.parametrize("size", [(7, 7), (5, 6), (8, 8)])
def test_non_local_subsamples_in_floor_mode(size):
    """Item 6: odd maps (7x7) pool to 3x3, as every reference does (ceil gave 4x4)."""
    nl = randomize_(attnzoo.create_block("non_local", 16))
    check(nl, nl_paper_oracle(nl), torch.randn(2, 16, *size))


def test_non_local_released_initialisation_follows_the_release():
    torch.manual_seed(0)
    nl = attnzoo.create_block("non_local", 256, variant="released")
    for conv in (nl.theta, nl.phi, nl.g, nl.out_conv):   # GaussianFill std 0.01, bias 0
        assert abs(conv.weight.std().item() - 0.01) < 0.001
        assert not conv.bias.any()
    assert not nl.out_norm.weight.any()                  # BN_INIT_GAMMA = 0: identity
    x = torch.randn(1, 256, 5, 5)
    torch.testing.assert_close(nl.train()(x), x)


def test_non_local_scaled_field_overrides_the_variant():
    assert attnzoo.create_block("non_local", 16, variant="released", scaled=False).scale == 1
    assert attnzoo.create_block("non_local", 16, scaled=True).scale == 8 ** -0.5


# --- disentangled_non_local (item 7) ----------------------------------------------------


def dnl_released_oracle(dnl, downsample: bool):
    """NonLocal2d_bn.forward with whiten_type ['channel'], with_gc, no conv_out/out_bn."""
    def run(x: torch.Tensor, train: bool) -> torch.Tensor:
        n, c, h, w = x.shape
        input_x = maxpool2x2_floor(x) if downsample else x
        query = conv1x1(x, dnl.theta).flatten(2)                   # conv_query
        key = conv1x1(input_x, dnl.phi).flatten(2)                 # conv_key
        value = conv1x1(input_x, dnl.g).flatten(2)                 # conv_value, C -> C
        key = key - key.mean(2, keepdim=True)
        query = query - query.mean(2, keepdim=True)
        planes = query.shape[1]
        sim = torch.bmm(query.transpose(1, 2), key) / planes ** 0.5 / 0.05
        out_sim = torch.bmm(sim.softmax(dim=2), value.transpose(1, 2)).transpose(1, 2)
        out_sim = dnl.gamma * out_sim.reshape(n, c, h, w)
        mask = conv1x1(input_x, dnl.unary).flatten(2).softmax(dim=2)   # conv_mask
        out_gc = torch.bmm(value, mask.permute(0, 2, 1)).unsqueeze(-1)
        return out_sim + out_gc + x
    return run


@pytest.mark.parametrize("subsample", [False, True])
def test_disentangled_non_local_released_equals_the_authors_block(subsample):
    dnl = attnzoo.create_block("disentangled_non_local", 16, variant="released",
                               subsample=subsample)
    assert dnl.g.out_channels == 16 and dnl.g.bias is None
    assert not hasattr(dnl, "out_conv") and not hasattr(dnl, "out_norm")
    randomize_(dnl, 0.15)
    check(dnl, dnl_released_oracle(dnl, subsample), torch.randn(2, 16, 7, 6))


def test_disentangled_non_local_released_starts_as_the_release_does():
    torch.manual_seed(0)
    dnl = attnzoo.create_block("disentangled_non_local", 256, variant="released")
    assert dnl.gamma.item() == 0
    assert abs(dnl.g.weight.std().item() - 0.01) < 0.001
    dnl.reset_identity_()                           # zero_init: the unary term too
    x = torch.randn(1, 256, 4, 5)
    torch.testing.assert_close(dnl(x), x)


# --- polarized (item 7) -----------------------------------------------------------------


def psa_released_oracle(psa):
    """PSA_p / PSA_s: spatial_pool (the channel-only branch) and channel_pool (the
    spatial-only branch) of the release."""
    def spatial_pool(x):                                           # -> x * mask_ch
        n, c, h, w = x.shape
        input_x = conv1x1(x, psa.channel_value).flatten(2)         # conv_v_right
        mask = conv1x1(x, psa.channel_query).flatten(2).softmax(dim=2)  # conv_q_right
        context = torch.matmul(input_x, mask.transpose(1, 2)).unsqueeze(-1)
        if psa.layout == "parallel":
            context = conv1x1(context, psa.channel_up)             # conv_up
        else:                                                      # the bottleneck
            conv_a, norm, _, conv_b = psa.channel_up
            context = conv1x1(context, conv_a)
            context = F.layer_norm(context, context.shape[1:], norm.weight, norm.bias,
                                   norm.eps)
            context = conv1x1(torch.relu(context), conv_b)
        return x * torch.sigmoid(context)

    def channel_pool(x):                                           # -> x * mask_sp
        n, c, h, w = x.shape
        g_x = conv1x1(x, psa.spatial_query)                        # conv_q_left
        avg_x = g_x.mean((2, 3)).unsqueeze(1)                      # (N, 1, IC)
        theta_x = conv1x1(x, psa.spatial_value).flatten(2)         # conv_v_left
        if psa.layout == "parallel":
            context = torch.matmul(avg_x, theta_x).softmax(dim=2)
        else:
            context = torch.matmul(avg_x, theta_x.softmax(dim=2))
        return x * torch.sigmoid(context.view(n, 1, h, w))

    def run(x: torch.Tensor, train: bool) -> torch.Tensor:
        if psa.layout == "parallel":
            return channel_pool(x) + spatial_pool(x)
        return channel_pool(spatial_pool(x))
    return run


@pytest.mark.parametrize("layout", ["parallel", "sequential"])
def test_polarized_released_equals_the_authors_psa(layout):
    psa = attnzoo.create_block("polarized", 32, layout=layout, variant="released")
    assert not hasattr(psa, "channel_norm")
    if layout == "sequential":   # conv(C/2 -> C/8, bias), LayerNorm, ReLU, conv(-> C, bias)
        assert [type(m).__name__ for m in psa.channel_up] == [
            "Conv2d", "LayerNorm", "ReLU", "Conv2d"]
        assert psa.channel_up[0].out_channels == 4 and psa.channel_up[3].bias is not None
    randomize_(psa)
    check(psa, psa_released_oracle(psa), torch.randn(2, 32, 5, 6))


def test_polarized_released_parameter_counts():
    c = 64
    p = attnzoo.create_block("polarized", c, variant="released")
    s = attnzoo.create_block("polarized", c, layout="sequential", variant="released")
    count = lambda m: sum(t.numel() for t in m.parameters())  # noqa: E731
    # q_right C, v_right, q_left, v_left C*C/2 each, conv_up C/2*C (no LayerNorm)
    assert count(p) == c + 4 * c * (c // 2)
    bottleneck = (c // 2) * (c // 8) + c // 8 + 2 * (c // 8) + (c // 8) * c + c
    assert count(s) == c + 3 * c * (c // 2) + bottleneck


# --- mhsa2d (item 7) --------------------------------------------------------------------


def rel_to_abs(x: torch.Tensor) -> torch.Tensor:
    """BoTNet's rel_to_abs: [B, Nh, L, 2L-1] relative -> [B, Nh, L, L] absolute."""
    b, nh, length, _ = x.shape
    x = torch.cat([x, x.new_zeros(b, nh, length, 1)], dim=3)
    flat = torch.cat([x.reshape(b, nh, -1), x.new_zeros(b, nh, length - 1)], dim=2)
    return flat.reshape(b, nh, length + 1, 2 * length - 1)[:, :, :length, length - 1:]


def relative_logits_1d(q: torch.Tensor, rel_k: torch.Tensor, transpose_mask) -> torch.Tensor:
    bs, heads, h, w, dim = q.shape
    rel = torch.einsum("bhxyd,md->bhxym", q, rel_k).reshape(bs, heads * h, w, 2 * w - 1)
    rel = rel_to_abs(rel).reshape(bs, heads, h, w, w)
    rel = rel.unsqueeze(3).expand(bs, heads, h, h, w, w)
    return rel.permute(*transpose_mask)


def botnet_oracle(mhsa):
    """relpos_self_attention (the released BoTNet code), heads concatenated, then the
    2x2 average pool of a strided block."""
    def run(x: torch.Tensor, train: bool) -> torch.Tensor:
        n, _, h, w = x.shape
        heads, d = mhsa.num_heads, mhsa.dim_head
        qkv = conv1x1(x, mhsa.qkv)
        q, k, v = (t.reshape(n, heads, d, h, w).permute(0, 1, 3, 4, 2)
                   for t in qkv.split(heads * d, dim=1))           # (B, heads, H, W, d)
        q = q * d ** -0.5                                          # scaled dot-product
        logits = torch.einsum("bhHWd,bhPQd->bhHWPQ", q, k)
        logits = logits + relative_logits_1d(q, mhsa.width_rel, (0, 1, 2, 4, 3, 5))
        logits = logits + relative_logits_1d(q.transpose(2, 3), mhsa.height_rel,
                                             (0, 1, 4, 2, 5, 3))
        weights = logits.reshape(n, heads, h, w, h * w).softmax(-1).reshape(logits.shape)
        out = torch.einsum("bhHWPQ,bhPQd->bHWhd", weights, v)     # heads, then d
        out = out.reshape(n, h, w, heads * d).permute(0, 3, 1, 2)
        return F.avg_pool2d(out, 2) if mhsa.pool.__class__.__name__ == "AvgPool2d" else out
    return run


@pytest.mark.parametrize("stride", [1, 2])
def test_mhsa2d_released_equals_botnet(stride):
    from attnzoo.blocks.self_attention import MultiHeadSelfAttention2d

    mhsa = MultiHeadSelfAttention2d(16, (6, 4), out_channels=32, stride=stride,
                                    variant="released")
    randomize_(mhsa)
    check(mhsa, botnet_oracle(mhsa), torch.randn(2, 16, 6, 4))


@pytest.mark.parametrize(("name", "cfg", "size"), [
    ("non_local", {}, (7, 7)),
    ("disentangled_non_local", {}, (6, 6)),
    ("polarized", {"layout": "parallel"}, (6, 6)),
    ("polarized", {"layout": "sequential"}, (6, 6)),
    ("mhsa2d", {"size": (6, 6)}, (6, 6)),
])
def test_variant_field_validates_and_the_released_network_differs(name, cfg, size):
    default = attnzoo.create_block(name, 16, **cfg)
    released = attnzoo.create_block(name, 16, **cfg, variant="released")
    with pytest.raises(attnzoo.SpecError, match="variant"):
        attnzoo.create_block(name, 16, **cfg, variant="preprint")
    if set(default.state_dict()) == set(released.state_dict()):
        randomize_(default)
        released.load_state_dict(default.state_dict())
        x = torch.randn(1, 16, *size)
        assert not torch.allclose(default.eval()(x), released.eval()(x), atol=1e-3)
