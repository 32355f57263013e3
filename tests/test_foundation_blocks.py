"""SE, ECA, CBAM, SimAM and GC: equal to their timm peers given the same weights,
and to their papers' formulas written out here."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers import EcaModule, GlobalContext, SEModule
from timm.layers.cbam import CbamModule

import attnzoo
from attnzoo import SpecError

X = torch.randn(2, 64, 9, 7)


def copy_by_order(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Copy src's tensors into dst in registration order (reshaped where a peer keeps a
    LayerNorm's weight as (C,) and we keep (C, 1, 1))."""
    src_t = list(src.state_dict().values())
    dst_sd = dst.state_dict()
    assert len(src_t) == len(dst_sd)
    dst.load_state_dict({k: s.reshape(v.shape) for (k, v), s in zip(dst_sd.items(), src_t,
                                                                      strict=True)})


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


def test_cbam_equals_timm_without_mlp_bias():
    ours = attnzoo.create_block("cbam", 64, mlp_bias=False).eval()
    peer = CbamModule(64, rd_ratio=1 / 16).eval()
    copy_by_order(ours, peer)
    torch.testing.assert_close(ours(X), peer(X))


def test_cbam_rejects_even_kernel():
    with pytest.raises(SpecError, match="spatial_kernel"):
        attnzoo.create_block("cbam", 64, spatial_kernel=4)


def test_simam_formula():
    out = attnzoo.create_block("simam", 64)(X)
    n = X.shape[2] * X.shape[3] - 1
    mu = X.mean((2, 3), keepdim=True)
    var = ((X - mu) ** 2).sum((2, 3), keepdim=True) / n
    e_inv = (X - mu) ** 2 / (4 * (var + 1e-4)) + 0.5
    torch.testing.assert_close(out, X * torch.sigmoid(e_inv))
    assert sum(p.numel() for p in attnzoo.create_block("simam", 64).parameters()) == 0


def test_global_context_equals_timm_add_fusion():
    ours = attnzoo.create_block("global_context", 64)
    torch.nn.init.normal_(ours.fc2.weight)  # make the transform non-trivial
    ours.norm.eps = 1e-6  # timm's LayerNorm2d eps; GCNet's reference uses nn.LayerNorm's 1e-5
    peer = GlobalContext(64, fuse_add=True, fuse_scale=False, rd_ratio=1 / 16)
    peer.load_state_dict({
        "conv_attn.weight": ours.attn.weight, "conv_attn.bias": ours.attn.bias,
        "mlp_add.fc1.weight": ours.fc1.weight, "mlp_add.fc1.bias": ours.fc1.bias,
        "mlp_add.norm.weight": ours.norm.weight.flatten(),
        "mlp_add.norm.bias": ours.norm.bias.flatten(),
        "mlp_add.fc2.weight": ours.fc2.weight, "mlp_add.fc2.bias": ours.fc2.bias,
    })
    torch.testing.assert_close(ours(X), peer(X), atol=1e-5, rtol=1e-5)


def test_global_context_starts_as_identity():
    torch.testing.assert_close(attnzoo.create_block("global_context", 64)(X), X)


def test_create_block_validates_config():
    with pytest.raises(SpecError, match="reduction"):
        attnzoo.create_block("se", 64, reduction=-1)
    with pytest.raises(SpecError, match="unknown block type"):
        attnzoo.create_block("nope", 64)


@pytest.mark.parametrize("channels", [64, 128, 256, 512, 1024, 2048])
def test_eca_kernel_follows_its_formula(channels):
    t = int(abs(math.log2(channels) / 2 + 1 / 2))
    expected = t if t % 2 else t + 1
    assert attnzoo.create_block("eca", channels).conv.kernel_size == (expected,)
