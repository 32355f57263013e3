"""Issue 23: the attention kernels' memory and cost, checked by intercepting ops and by
counting FLOPs (no timing here: tools/bench.py measures speed, side by side).

- non_local runs the fused attention kernel and never holds the (HW) x (HW') matrix;
- criss_cross holds nothing larger than its (H+W)-wide logits, and R passes cost R
  times one pass;
- mhsa2d never forms a tensor as large as the (heads, HW, HW) logits, however large
  the map (the position logits go in query chunks);
- the token-layout helpers equal the plain layers;
- a spec that replaces modules never initialises them (build time, issue 23 goal 5).
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import attnzoo
from attnzoo.blocks import _kernels


class OpRecorder(TorchDispatchMode):
    """Records every aten op dispatched and the largest tensor (in elements) any op
    returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[str(func.overloadpacket)] += 1
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def nontrivial(name: str, channels: int, **cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    block = attnzoo.create_block(name, channels, **cfg)
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() <= 1:
                p.normal_(0.5, 0.1)   # leave the identity start: the attention path runs
    return block


def run_recorded(block, x, train: bool) -> OpRecorder:
    block.train(train)
    x = x.clone().requires_grad_(train)
    with OpRecorder() as rec:
        if train:
            block(x).square().mean().backward()
        else:
            with torch.no_grad():
                block(x)
    return rec


# --- non_local --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["paper", "released"])
@pytest.mark.parametrize("train", [False, True])
def test_non_local_runs_the_fused_kernel_without_the_attention_matrix(variant, train):
    n, c, h, w = 2, 8, 32, 30
    block = nontrivial("non_local", c, variant=variant)
    rec = run_recorded(block, torch.randn(n, c, h, w), train)
    hw, keys = h * w, (h // 2) * (w // 2)
    assert rec.ops["aten._scaled_dot_product_flash_attention_for_cpu"] == 1
    assert rec.ops["aten._scaled_dot_product_attention_math"] == 0
    assert rec.largest <= n * c * hw            # nothing beyond a feature map ...
    assert rec.largest < n * hw * keys / 10     # ... far from the (HW) x (HW') matrix


def test_non_local_memory_grows_linearly_with_the_map():
    block = nontrivial("non_local", 8)
    sizes = [(16, 16), (32, 32)]
    largest = [run_recorded(block, torch.randn(1, 8, *s), False).largest for s in sizes]
    assert largest[1] <= 4 * largest[0]         # 4x the positions, 4x (not 16x) the memory


# --- criss_cross ------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("size", [(32, 32), (40, 24)])
def test_criss_cross_memory_grows_as_hw_times_h_plus_w(size, train):
    c = 8
    h, w = size
    block = nontrivial("criss_cross", c)
    rec = run_recorded(block, torch.randn(1, c, h, w), train)
    assert rec.largest <= h * w * (h + w)       # the row + column logits
    assert rec.largest < (h * w) ** 2 / 10


def _flops(block, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        block(x)
    return counter.get_total_flops()


def test_criss_cross_recurrence_costs_r_passes_and_what_the_formula_says():
    c, h, w = 64, 12, 10
    x = torch.randn(1, c, h, w)
    one = _flops(nontrivial("criss_cross", c, recurrence=1).eval(), x)
    two = _flops(nontrivial("criss_cross", c, recurrence=2).eval(), x)
    three = _flops(nontrivial("criss_cross", c, recurrence=3).eval(), x)
    assert two == 2 * one and three == 3 * one
    inner, hw = c // 8, h * w
    # per pass: the q/k/v convs, row + column logits and aggregation; no HW x HW term
    assert one == 2 * hw * c * (2 * inner + c) + 2 * hw * (h + w) * (inner + c)


def test_criss_cross_dispatches_the_same_ops_at_every_size():
    block = nontrivial("criss_cross", 16).eval()
    counts = [run_recorded(block, torch.randn(1, 16, *s), False).ops
              for s in ((8, 8), (20, 12))]
    assert counts[0] == counts[1]


# --- mhsa2d -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["timm", "released"])
def test_mhsa2d_never_forms_the_full_position_logits(monkeypatch, variant):
    c, h, w = 16, 12, 10
    hw = h * w
    block = nontrivial("mhsa2d", c, size=(h, w), variant=variant).eval()
    x = torch.randn(2, c, h, w)
    with torch.no_grad():
        whole = block(x)                          # one chunk: the map is small
    monkeypatch.setattr(_kernels, "MASK_CHUNK_ELEMENTS", 2 * 4 * hw * 8)  # 8 queries
    rec = run_recorded(block, x, False)
    logits = 2 * 4 * hw * hw                      # (N, heads, HW, HW)
    assert rec.largest <= logits // 10
    assert rec.ops["aten._scaled_dot_product_flash_attention_for_cpu"] == hw // 8
    assert rec.ops["aten._scaled_dot_product_attention_math"] == 0
    with torch.no_grad():
        torch.testing.assert_close(block(x), whole, atol=1e-6, rtol=1e-5)


def test_mhsa2d_chunks_keep_to_the_budget_at_a_large_map():
    """At 128x128 (BoTNet's heads, C=512 made small here: C=16) the mask chunks hold
    MASK_CHUNK_ELEMENTS at most, and nothing approaches the 4 x 16384^2 logits."""
    c, side = 16, 128
    block = nontrivial("mhsa2d", c, size=(side, side)).eval()
    rec = run_recorded(block, torch.randn(1, c, side, side), False)
    hw = side * side
    assert rec.largest <= max(_kernels.MASK_CHUNK_ELEMENTS, 4 * hw * 2 * side)
    assert rec.largest <= 4 * hw * hw / 64      # 1/64 of the (heads, HW, HW) logits


# --- helpers ----------------------------------------------------------------------------


def test_conv1x1_tokens_equals_the_convolutions():
    torch.manual_seed(0)
    convs = [torch.nn.Conv2d(12, 5, 1), torch.nn.Conv2d(12, 3, 1, bias=False)]
    x = torch.randn(2, 12, 5, 7)
    expected = torch.cat([conv(x) for conv in convs], 1).flatten(2).transpose(1, 2)
    got = _kernels.conv1x1_tokens(x, *convs)
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    back = _kernels.conv1x1_from_tokens(got[..., :5], torch.nn.Conv2d(5, 4, 1), 5, 7)
    assert back.shape == (2, 4, 5, 7) and back.is_contiguous()
    nchw = _kernels.tokens_to_nchw(got, 5, 7)
    torch.testing.assert_close(nchw, expected.transpose(1, 2).reshape(2, 8, 5, 7))
    assert nchw.is_contiguous()


@pytest.mark.parametrize("size", [(7, 7), (6, 5), (1, 5), (4, 1)])
def test_max_pool_tokens_is_floor_mode_and_keeps_a_side_of_one(size):
    h, w = size
    x = torch.randn(2, 6, h, w)
    kernel = (min(2, h), min(2, w))
    expected = F.max_pool2d(x, kernel, kernel)          # floor mode
    pooled, ph, pw = _kernels.max_pool_tokens(x.flatten(2).transpose(1, 2), h, w)
    assert (ph, pw) == expected.shape[-2:]
    torch.testing.assert_close(pooled, expected.flatten(2).transpose(1, 2))
    torch.testing.assert_close(_kernels.max_pool_map(x), expected)


def test_attention_any_width_pads_to_one_width():
    for d, d_v in ((4, 9), (9, 4)):
        q, k, v = torch.randn(2, 10, d), torch.randn(2, 6, d), torch.randn(2, 6, d_v)
        expected = (q @ k.transpose(1, 2) * 0.7).softmax(-1) @ v
        torch.testing.assert_close(_kernels.attention_any_width(q, k, v, 0.7), expected)


# --- build: replaced modules are never initialised ----------------------------------------


class RandomFills(TorchDispatchMode):
    """Keeps every tensor a random-initialisation op writes (normal_, uniform_)."""

    OPS = {"aten.normal_", "aten.uniform_"}

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in self.OPS and not args[0].is_meta:
            self.targets.append(args[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["resnet18_sk", "resnet50_mhsa"])
def test_replaced_modules_are_never_initialised(name):
    with RandomFills() as fills:
        model = attnzoo.create_model(name)
    assert not any(t.is_meta for t in model.parameters())
    storages = {t.untyped_storage().data_ptr()
                for t in [*model.parameters(), *model.buffers()]}
    stray = [tuple(t.shape) for t in fills.targets
             if t.untyped_storage().data_ptr() not in storages]
    assert not stray, f"random init written to tensors the model does not hold: {stray[:5]}"


def test_a_replacing_build_is_deterministic_and_initialised_like_timm():
    import timm

    torch.manual_seed(0)
    a = attnzoo.create_model("resnet18_sk")
    torch.manual_seed(0)
    b = attnzoo.create_model("resnet18_sk")
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    bare = dict(timm.create_model("resnet18").named_parameters())
    for name, p in a.named_parameters():   # kept backbone weights: timm's distribution
        if name in bare and p.dim() == 4 and p.numel() > 30_000:
            ratio = (p.std() / bare[name].std()).item()
            assert 0.9 < ratio < 1.1, (name, ratio)


# --- tools/bench.py's training peers ------------------------------------------------------


@pytest.mark.parametrize(("zoo", "name"), [("resnet50_nl", "non_local"),
                                           ("resnet50_cca", "criss_cross")])
def test_bench_naive_peer_is_the_same_network(zoo, name):
    """The training benchmark's peer for a block timm lacks: the zoo model with each
    block computed by the naive formula, same weights, same outputs."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import bench

    model, peer, label = bench._training_models(zoo, "naive", name, {})
    assert sum(isinstance(m, bench.NaiveBlock) for m in peer.modules()) == 5
    x = torch.randn(2, 3, 64, 64)
    for train in (False, True):
        model.train(train)
        peer.train(train)
        with torch.no_grad():
            torch.testing.assert_close(peer(x), model(x), atol=1e-4, rtol=1e-4)
