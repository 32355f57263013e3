"""Self-attention within a feature map (attnzoo/blocks/self_attention.py): Polarized
Self-Attention, VOLO's outlook attention, BoTNet's MHSA; and what these blocks share
with the non-local family (test_non_local.py), tested once for both.

Each block is checked against its paper's formula written out here with an explicit
affinity matrix (or against the timm module that implements the same thing, given the
same weights), and the zoo specs that use them build, train and start as their backbone.
"""

from __future__ import annotations

import collections

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.models.volo import OutlookAttention as TimmOutlookAttention
from torch.utils._python_dispatch import TorchDispatchMode

import attnzoo
from attnzoo import SpecError
from attnzoo.blocks.self_attention import MultiHeadSelfAttention2d, OutlookAttention
from attnzoo.convert import from_timm
from tests._helpers.blocks import block, conv1x1
from tests._helpers.exported import assert_export_matches, assert_onnxruntime_matches
from tests._helpers.modules import live_batchnorm_, randomize_

# the non-local family (test_non_local.py) and the self-attention blocks
ALL_BLOCKS = ["non_local", "disentangled_non_local", "criss_cross",
              "double_attention", "polarized", "outlook", "mhsa2d"]


# --- Polarized self-attention -----------------------------------------------------------


def psa_weights(psa, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_ch, A_sp) from eq. 2 and eq. 3 of the PSA paper."""
    n, c, h, w = x.shape
    flat = x.flatten(2)
    q = conv1x1(flat, psa.channel_query).softmax(-1)                   # (N, 1, HW)
    z = torch.einsum("ncp,nop->nc", conv1x1(flat, psa.channel_value), q)
    z = z @ psa.channel_up.weight.flatten(1).T                         # (N, C)
    a_ch = torch.sigmoid(F.layer_norm(z, (c,), psa.channel_norm.weight, psa.channel_norm.bias))
    q_sp = conv1x1(flat, psa.spatial_query).mean(-1).softmax(-1)       # (N, C/2)
    a_sp = torch.sigmoid(torch.einsum("nc,ncp->np", q_sp, conv1x1(flat, psa.spatial_value)))
    return a_ch.view(n, c, 1, 1), a_sp.view(n, 1, h, w)


def test_polarized_parallel_and_sequential_equal_the_paper():
    x = torch.randn(2, 16, 5, 6)
    p = randomize_(block("polarized", 16))
    a_ch, a_sp = psa_weights(p, x)
    torch.testing.assert_close(p(x), a_ch * x + a_sp * x, atol=1e-5, rtol=1e-5)
    s = randomize_(block("polarized", 16, layout="sequential"))
    a_ch, _ = psa_weights(s, x)
    y = a_ch * x
    _, a_sp = psa_weights(s, y)
    torch.testing.assert_close(s(x), a_sp * y, atol=1e-5, rtol=1e-5)


def test_polarized_rejects_unknown_layout():
    with pytest.raises(SpecError, match="layout"):
        block("polarized", 16, layout="diagonal")


# --- Outlook attention ------------------------------------------------------------------


@pytest.mark.parametrize(("stride", "size"), [(1, (6, 6)), (2, (8, 8)), (2, (7, 9))])
def test_outlook_equals_timm_given_the_same_weights(stride, size):
    ours = block("outlook", 48, num_heads=3, stride=stride).eval()
    peer = TimmOutlookAttention(48, num_heads=3, kernel_size=3, padding=1, stride=stride).eval()
    peer.load_state_dict(ours.state_dict(), strict=True)    # same names and shapes
    x = torch.randn(2, 48, *size)
    expected = peer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)       # timm is NHWC
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
    nhwc = block("outlook", 48, num_heads=3, stride=stride, channels_last=True).eval()
    nhwc.load_state_dict(ours.state_dict())
    torch.testing.assert_close(nhwc(x.permute(0, 2, 3, 1)), expected.permute(0, 2, 3, 1),
                               atol=1e-5, rtol=1e-5)


def test_outlook_rejects_heads_that_do_not_divide_channels():
    with pytest.raises(SpecError, match="divisible"):
        block("outlook", 50, num_heads=6)


# --- MHSA (BoTNet) ----------------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2])
def test_mhsa2d_equals_timm_bottleneck_attention(stride):
    ours = MultiHeadSelfAttention2d(32, (6, 4), out_channels=64, stride=stride).eval()
    peer = BottleneckAttn(32, 64, feat_size=(6, 4), stride=stride, num_heads=4).eval()
    sd = ours.state_dict()
    peer.load_state_dict({"qkv.weight": sd["qkv.weight"],
                          "pos_embed.height_rel": sd["height_rel"],
                          "pos_embed.width_rel": sd["width_rel"]})
    x = torch.randn(2, 32, 6, 4)
    out = ours(x)
    assert out.shape == (2, 64, 6 // stride, 4 // stride)
    torch.testing.assert_close(out, peer(x), atol=1e-5, rtol=1e-5)


def test_mhsa2d_position_logits_follow_relative_offsets():
    mhsa = block("mhsa2d", 8, size=(3, 4), num_heads=1)
    h, w = 3, 4
    q = torch.randn(1, 1, h * w, 8)
    logits = mhsa.position_logits(q, h, w)[0, 0]
    for i in range(h * w):
        for j in range(h * w):
            (qx, qy), (kx, ky) = divmod(i, w), divmod(j, w)
            r = mhsa.height_rel[kx - qx + h - 1] + mhsa.width_rel[ky - qy + w - 1]
            torch.testing.assert_close(logits[i, j], q[0, 0, i] @ r)


def test_mhsa2d_runs_at_another_size_and_needs_a_size():
    mhsa = block("mhsa2d", 16, size=(8, 8))
    assert mhsa(torch.randn(1, 16, 4, 6)).shape == (1, 16, 4, 6)
    with pytest.raises(SpecError, match="size"):
        attnzoo.create_block("mhsa2d", 16)


# --- what the non-local and the self-attention blocks share -----------------------------


@pytest.mark.parametrize("name", ["non_local", "mhsa2d"])
def test_uses_scaled_dot_product_attention(name, monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    block(name, 16, size=(4, 4))(torch.randn(1, 16, 4, 4))
    assert len(calls) == 1


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops a forward pass dispatches, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ALL_BLOCKS)
def test_blocks_run_the_same_ops_at_every_map_size(name):
    # No Python loop over positions, rows or windows: a 3x larger map dispatches exactly
    # the same kernels, the same number of times (outlook: unfold/fold = im2col/col2im).
    m = block(name, 24, size=(6, 6)).eval()
    counts = []
    for size in ((8, 8), (12, 24)):
        with _OpCounter() as counter, torch.no_grad():
            m(torch.randn(1, 24, *size))
        counts.append(counter.ops)
    assert counts[0] == counts[1]
    if name == "outlook":
        assert counts[0]["aten.im2col"] == 1 and counts[0]["aten.col2im"] == 1


@pytest.mark.parametrize("name", ALL_BLOCKS)
def test_blocks_export_and_compile_without_graph_breaks(name):
    m = block(name, 24, size=(6, 6)).eval()
    x = torch.randn(1, 24, 6, 6)
    assert_export_matches(m, x)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), m(x))


@pytest.mark.slow
def test_blocks_export_to_onnx_and_run_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript")
    x = torch.randn(1, 24, 6, 6)
    for name in ALL_BLOCKS:
        m = randomize_(block(name, 24, size=(6, 6)))
        assert_onnxruntime_matches(m, x, tmp_path / f"{name}.onnx", tol=1e-4)


@pytest.mark.parametrize("name", ALL_BLOCKS)
def test_blocks_train(name):
    m = block(name, 24, size=(6, 6)).train()
    with torch.no_grad():  # leave the zero-init state, so every weight gets a gradient
        for p in m.parameters():
            if p.dim() == 1:
                p.normal_(std=0.2)
    x = torch.randn(2, 24, 6, 6, requires_grad=True)
    m(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in m.parameters())


# --- zoo specs (of both families) -------------------------------------------------------


# name -> (inserted blocks, parameters the paper reports in millions, tolerance in millions);
# None where the paper gives no ImageNet figure for this model: the count is then pinned to
# the blocks' formulas in EXACT.
ZOO = {
    "resnet50_nl": (5, None, None),
    "resnet50_dnl": (5, None, None),
    "resnet50_cca": (5, None, None),
    "resnet50_psa_p": (16, None, None),
    "resnet50_psa_s": (16, None, None),
    "resnet50_a2": (5, None, None),
    "resnet50_mhsa": (3, 20.8, 0.2),    # BoTNet: BoT50 has 20.8M parameters
    "volo_d1": (4, 27.0, 0.5),          # VOLO, Table 2: D1 has 27M (rounded to 1M)
}

# Exact parameter counts of the built models, from the blocks' formulas.
EXACT = {
    "resnet50_nl": 25_557_032 + 2 * (4 * 512 * 256 + 3 * 256 + 512 + 2 * 512)
    + 3 * (4 * 1024 * 512 + 3 * 512 + 1024 + 2 * 1024),
    "resnet50_cca": 25_557_032 + 2 * (2 * (512 * 64 + 64) + 512 * 512 + 512 + 1)
    + 3 * (2 * (1024 * 128 + 128) + 1024 * 1024 + 1024 + 1),
    # per block: A, B, V (C -> C/2) and the reconstruction (C/2 -> C), with biases
    "resnet50_a2": 25_557_032 + sum(n * (4 * c * (c // 2) + 3 * (c // 2) + c)
                                    for n, c in ((2, 512), (3, 1024))),
    # PSA_p as released: Wq_ch (C->1), Wv_ch, Wz, Wq_sp, Wv_sp (C<->C/2), no bias and
    # no LayerNorm after Wz (the paper's eq. 3 has one: 2C more)
    "resnet50_psa_p": 25_557_032 + sum(n * (4 * c * (c // 2) + c)
                                       for n, c in ((3, 64), (4, 128), (6, 256), (3, 512))),
}

IDENTITY_SPECS = ["resnet50_nl", "resnet50_dnl", "resnet50_cca", "resnet50_a2",
                  "resnet50_psa_p", "resnet50_psa_s"]  # PSA (a gate) is blended by the builder


def build(name: str, **kwargs) -> torch.nn.Module:
    if name == "volo_d1":
        kwargs.setdefault("img_size", 64)  # VOLO's position embedding is made for its input
    return attnzoo.create_model(name, **kwargs)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_spec_builds_and_trains_at_64(name):
    n_blocks, params_m, tolerance = ZOO[name]
    model = build(name).train()
    assert len(model.attnzoo_blocks) == n_blocks
    assert model.attnzoo_spec.paper.startswith("https://arxiv.org/abs/")
    params = sum(p.numel() for p in model.parameters())
    if params_m is not None:
        assert abs(params / 1e6 - params_m) <= tolerance, params
    if name in EXACT:
        assert params == EXACT[name]
    if name == "resnet50_a2":  # A^2-Nets' abstract: over 40% fewer than ResNet-152 (60.2M)
        assert params < 0.6 * 60.19e6
    logits = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 1000)
    logits.logsumexp(-1).mean().backward()
    inserted = [model.get_submodule(b.name) for b in model.attnzoo_blocks]
    assert all(p.grad is not None for m in inserted for p in m.parameters()
               if p.requires_grad and p.dim() > 1)


@pytest.mark.parametrize("name", IDENTITY_SPECS)
def test_zero_init_gives_the_bare_backbone_logits(name):
    spec = attnzoo.load_spec(name).model_dump(mode="json", exclude_defaults=True)
    spec["insert"] = [{**ins, "zero_init": True} for ins in spec["insert"]]
    model = attnzoo.create_model(spec)
    # non-trivial BN statistics, so the test sees real features
    bare = live_batchnorm_(timm.create_model("resnet50"), var=(0.5, 1.5))
    result = model.load_state_dict(bare.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(".attnzoo_" in k for k in result.missing_keys)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x), bare.eval()(x), atol=1e-5, rtol=1e-5)


def test_resnet50_mhsa_is_botnet():
    model = build("resnet50_mhsa")
    first, later = model.layer4[0].conv2, model.layer4[1].conv2
    assert isinstance(first, MultiHeadSelfAttention2d) and isinstance(later,
                                                                       MultiHeadSelfAttention2d)
    assert first.num_heads == 4 and first.dim_head == 128
    assert isinstance(first.pool, torch.nn.AvgPool2d) and isinstance(later.pool,
                                                                      torch.nn.Identity)
    # relative tables sized for the 224 input: 14x14 before the pool, 7x7 after
    assert first.height_rel.shape == (27, 128) and later.width_rel.shape == (13, 128)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_volo_d1_loads_timm_weights_and_equals_timm():
    peer = timm.create_model("volo_d1_224", img_size=64).eval()
    model = build("volo_d1").eval()
    outlooks = [m for m in model.modules() if isinstance(m, OutlookAttention)]
    assert len(outlooks) == 4 and all(m.channels_last and m.stride == 2 for m in outlooks)
    assert not any(type(m).__name__ == "OutlookAttention" and m not in outlooks
                   for m in model.modules())
    model.load_state_dict(from_timm("volo_d1", peer.state_dict()), strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), peer(x), atol=1e-5, rtol=1e-5)
