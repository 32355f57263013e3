"""Layouts (attnzoo/layouts.py): every site knows where its channels are, a block that
takes another layout runs converted, and a site that cannot be told is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo import SpecError
from attnzoo.builder import build_model
from attnzoo.layouts import Layout, LayoutAdapter, Stated, decide, run_layout, token_hints


@pytest.fixture(scope="module")
def convnext_mlp_cbam():
    """The regression case: CBAM after ``stages.*.blocks.*.mlp`` of timm's convnext_tiny,
    whose tensor there is NHWC (the old builder read H as the channels)."""
    spec = {"name": "c", "backbone": {"name": "convnext_tiny"},
            "insert": [{"block": {"type": "cbam"}, "at": {"path": "stages.*.blocks.*.mlp"}}]}
    return attnzoo.create_model(spec).eval()


def test_convnext_mlp_site_is_nhwc_and_cbam_gets_the_true_channels(convnext_mlp_cbam):
    blocks = convnext_mlp_cbam.attnzoo_blocks
    assert len(blocks) == 3 + 3 + 9 + 3
    widths = {1: 96, 2: 192, 3: 384, 4: 768}
    sides = {1: 56, 2: 28, 3: 14, 4: 7}
    for b in blocks:
        stage = int(b.site.split(".")[1]) + 1
        assert (b.layout, b.block_layout) == ("nhwc", "nchw")
        assert b.channels == widths[stage] and b.size == (sides[stage], sides[stage])
        assert b.in_shape == (sides[stage], sides[stage], widths[stage])
        adapter = convnext_mlp_cbam.get_submodule(b.name)
        assert isinstance(adapter, LayoutAdapter)
        assert adapter.block.channel.fc1.in_channels == widths[stage]


@pytest.mark.parametrize("hw", [(64, 64), (32, 48)])
def test_convnext_mlp_cbam_runs_at_other_sizes(convnext_mlp_cbam, hw):
    """Built at 224 (the probe), run at other sizes: the old build crashed off 224."""
    with torch.no_grad():
        assert convnext_mlp_cbam(torch.randn(1, 3, *hw)).shape == (1, 1000)


def test_the_adapter_permutes_nhwc_for_an_nchw_block(convnext_mlp_cbam):
    adapter = convnext_mlp_cbam.stages[0].blocks[0].mlp.attnzoo_after
    x = torch.randn(2, 8, 8, 96)
    with torch.no_grad():
        expected = adapter.block(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        torch.testing.assert_close(adapter(x), expected)


def test_volo_records_its_nhwc_sites_as_they_are():
    """volo_d1's outlookers take (B, 28, 28, 192): 192 channels at 28x28, not 28 channels
    at 28x192 as the builder used to record."""
    model = build_model(attnzoo.load_spec("volo_d1"), device="meta")
    assert len(model.attnzoo_blocks) == 4
    for b in model.attnzoo_blocks:
        assert (b.layout, b.block_layout, b.channels, b.size) == ("nhwc", "nhwc", 192, (28, 28))
        assert (b.in_shape, b.out_shape) == ((28, 28, 192), (28, 28, 192))
        assert model.get_submodule(b.name).v.in_features == 192


# ---------------------------------------------------------------------------- decide


@pytest.mark.parametrize(("shape", "feature", "second", "kind", "how"), [
    ((1, 64, 56, 56), 64, None, "nchw", "layer"),
    ((1, 56, 56, 96), 96, None, "nhwc", "layer"),
    ((1, 197, 384), 384, None, "tokens", "layer"),
    ((1, 1000), None, None, "vectors", "rank"),
    ((1, 8, 8, 8), 8, (1, 8, 16, 16), "nchw", "probe"),     # the layer cannot tell; 2x can
    ((1, 8, 8, 8), 8, (1, 16, 16, 8), "nhwc", "probe"),
    ((1, 8, 8, 8), 8, None, "unknown", ""),                 # nothing tells: no guess
    ((1, 8, 8, 8), None, (1, 8, 8, 8), "unknown", ""),      # a fixed-size tensor
    ((1, 49, 96), None, None, "unknown", ""),
    ((64, 49, 96), None, (256, 49, 96), "tokens", "probe"),  # more windows of tokens
])
def test_decide(shape, feature, second, kind, how):
    layout = decide(shape, feature=feature, second=second)
    assert (layout.kind, layout.how) == (kind, how)


def test_token_grid_from_the_two_runs_and_from_the_modules():
    # 1 class token + 14x14 at 224, 1 + 28x28 at 448
    layout = decide((1, 197, 384), feature=384, second=(1, 785, 384), input_hw=(224, 224))
    assert (layout.prefix, layout.grid) == (1, (14, 14))
    layout = decide((1, 198, 192), feature=192, token_hints=[(2, (14, 14))])
    assert (layout.prefix, layout.grid, str(layout)) == (2, (14, 14), "tokens(2+14x14)")
    layout = decide((1, 197, 384), feature=384)
    assert (layout.prefix, layout.grid) == (None, None)
    stated = Stated("tokens", 1, (14, 14))
    assert decide((1, 197, 384), stated=stated).grid == (14, 14)


def test_a_site_that_gives_tokens_without_a_grid_has_no_map_layout():
    tokens = Layout("tokens", (1, 197, 384))
    assert run_layout(tokens, ("nchw",)) is None
    assert run_layout(tokens, ("tokens", "nchw")) == "tokens"
    assert run_layout(Layout("tokens", (1, 197, 384), 1, (14, 14)), ("nchw",)) == "nchw"
    assert run_layout(Layout("vectors", (1, 10)), ("nchw", "tokens")) is None


def test_token_hints_read_vit_and_swin_modules():
    import timm

    with torch.device("meta"):
        vit = timm.create_model("vit_tiny_patch16_224")
        swin = timm.create_model("swin_tiny_patch4_window7_224")
    assert token_hints(vit, "blocks.3.attn") == [(1, (14, 14))]
    assert (0, (56, 56)) in token_hints(swin, "layers.0.blocks.0.mlp")
    assert (0, (7, 7)) in token_hints(swin, "layers.0.blocks.0.attn")


# ---------------------------------------------------------------------------- adapter


class _Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 4
        return x * 2 + x[:, :1]  # channel 0 of NCHW added: a wrong axis shows


@pytest.mark.parametrize(("site", "block"), [("nhwc", "nchw"), ("nchw", "nhwc")])
def test_adapter_round_trips_maps(site, block):
    x = torch.randn(2, 5, 6, 7)
    adapter = LayoutAdapter(nn.Identity(), site, block)
    assert torch.equal(adapter(x), x)
    seen = []
    probe = LayoutAdapter(_Recorder(seen), site, block)
    probe(x)
    want = x.permute(0, 3, 1, 2) if site == "nhwc" else x.permute(0, 2, 3, 1)
    assert torch.equal(seen[0], want)


class _Recorder(nn.Module):
    def __init__(self, seen: list) -> None:
        super().__init__()
        self.seen = seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return x


def test_adapter_keeps_class_tokens_out_of_the_map():
    x = torch.randn(2, 1 + 3 * 4, 8)
    seen: list[torch.Tensor] = []
    adapter = LayoutAdapter(_Recorder(seen), "tokens", "nchw", prefix=1, grid=(3, 4))
    assert torch.equal(adapter(x), x)
    assert seen[0].shape == (2, 8, 3, 4)
    assert torch.equal(seen[0][:, :, 1, 2], x[:, 1 + 1 * 4 + 2])  # row 1, column 2
    doubled = LayoutAdapter(_Double(), "tokens", "nchw", prefix=1, grid=(3, 4))(x)
    assert torch.equal(doubled[:, 0], x[:, 0])  # the class token passes by


def test_adapter_takes_a_square_grid_at_another_size_and_refuses_a_wrong_one():
    adapter = LayoutAdapter(nn.Identity(), "tokens", "nchw", prefix=1, grid=(4, 4))
    x = torch.randn(1, 1 + 36, 8)
    assert torch.equal(adapter(x), x)
    with pytest.raises(RuntimeError, match="do not form the 4x4 grid"):
        adapter(torch.randn(1, 1 + 35, 8))


# ---------------------------------------------------------------------------- errors


class _Tokens(nn.Module):
    """A patch embedding and a learnt position table of a fixed length: the second dry
    run fails, and no module names a grid, so its token sites have none."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 24, 8, 8)
        self.pos = nn.Parameter(torch.zeros(1, 16, 24))  # 4x4 patches of a 32x32 image
        self.mix = nn.Sequential(nn.LayerNorm(24), nn.Linear(24, 24))
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.mix(t).mean(1))


def test_a_map_block_at_tokens_without_a_grid_is_refused_until_the_site_states_it():
    with pytest.raises(SpecError) as err:
        attnzoo.insert(_Tokens(), [{"block": {"type": "cbam", "reduction": 4},
                                    "at": {"path": "mix"}}], input_size=32)
    msg = str(err.value)
    assert "block 'cbam' takes 4-D (N, C, H, W) tensors (nchw)" in msg
    assert "after 'mix' the tensor is 3-D (B, N, C) (tokens 16x24)" in msg
    assert "grid: [h, w]" in msg
    model = attnzoo.insert(_Tokens(), [{"block": {"type": "cbam", "reduction": 4}, "at": {
        "path": "mix", "layout": "tokens", "grid": [4, 4], "prefix_tokens": 0}}],
        input_size=32)
    (b,) = model.attnzoo_blocks
    assert (b.layout, b.block_layout, b.channels, b.size) == ("tokens(0+4x4)", "nchw", 24, (4, 4))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_a_block_that_cannot_take_the_site_layout_names_site_and_layouts():
    with pytest.raises(SpecError) as err:
        attnzoo.create_model({"name": "v", "backbone": {"name": "resnet18"}, "insert": [
            {"block": {"type": "eca"}, "at": {"path": "fc"}}]})
    msg = str(err.value)
    assert "v: insert[0] (eca): block 'eca' takes 4-D (N, C, H, W) tensors (nchw), but " \
           "after 'fc' the tensor is 2-D (N, C) (vectors 1000); pick another site" in msg


class _Square(nn.Module):
    """NHWC with as many channels as pixels a side, made for one size: the layer before
    the site cannot tell the axes apart and a second dry run cannot happen."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 1)
        self.swap = nn.Identity()
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] == 8, "made for 8x8"
        y = self.swap(self.proj(x).permute(0, 2, 3, 1))
        return self.head(y.mean((1, 2)))


def test_an_undecidable_site_is_refused_and_a_stated_layout_is_used():
    with pytest.raises(SpecError, match=r"cannot tell where the channels are after 'swap'.*"
                                        r"layout: nchw\|nhwc"):
        attnzoo.insert(_Square(), [{"block": {"type": "se", "reduction": 2},
                                    "at": {"path": "swap"}}], input_size=8)
    model = attnzoo.insert(_Square(), [{"block": {"type": "se", "reduction": 2},
                                        "at": {"path": "swap", "layout": "nhwc"}}],
                           input_size=8)
    (b,) = model.attnzoo_blocks
    assert (b.layout, b.block_layout) == ("nhwc", "nchw")
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 2)


def test_a_stated_layout_of_the_wrong_rank_is_an_error():
    with pytest.raises(SpecError, match=r"layout tokens is for 3-D tensors \(B, N, C\), but "
                                        r"after 'layer1' the tensor is 4-D"):
        attnzoo.create_model({"name": "v", "backbone": {"name": "resnet18"}, "insert": [
            {"block": {"type": "se"}, "at": {"path": "layer1", "layout": "tokens"}}]})


def test_token_fields_need_a_token_layout():
    with pytest.raises(SpecError, match="need layout: tokens"):
        attnzoo.ModelSpec.from_dict({"name": "v", "backbone": {"name": "resnet18"}, "insert": [
            {"block": {"type": "se"}, "at": {"path": "layer1", "grid": [2, 2]}}]})
