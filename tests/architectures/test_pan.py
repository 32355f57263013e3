"""Pyramid Attention Network: the zoo spec builds and trains at 64x64; FPA and GAU
compose their branches as the paper describes; the encoder is timm's ResNet-50."""

from __future__ import annotations

import pytest
import timm
import torch

import attnzoo
from attnzoo.architectures.pan import (
    FeaturePyramidAttention,
    GlobalAttentionUpsample,
    PyramidAttentionNetwork,
)


def _spec(**args):
    return {"name": "pan_test", "backbone": {"source": "attnzoo", "name": "pan", "args": args}}


def test_zoo_spec_trains_and_predicts_at_input_size():
    model = attnzoo.create_model("pan_resnet50")
    assert isinstance(model, PyramidAttentionNetwork)
    assert isinstance(model.fpa, FeaturePyramidAttention)
    assert all(isinstance(g, GlobalAttentionUpsample)
               for g in (model.gau4, model.gau3, model.gau2))
    out = model.train()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 21, 64, 64)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.eval()(torch.randn(1, 3, 40, 56)).shape == (1, 21, 40, 56)


def test_encoder_is_resnet50_at_output_stride_16_and_loads_timm_weights():
    model = attnzoo.create_model("pan_resnet50")
    assert model.encoder.feature_info.reduction() == [4, 8, 16, 16]
    peer = timm.create_model("resnet50", pretrained=False)
    state = {k: v for k, v in peer.state_dict().items() if not k.startswith("fc.")}
    model.encoder.load_state_dict(state, strict=True)


def test_fpa_multiplies_master_by_one_pixel_map_and_adds_global_context():
    fpa = attnzoo.create_block("fpa", 16).eval()
    for m in fpa.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.bias, 0.5, 1.0)  # keep the ReLUs open
    torch.nn.init.zeros_(fpa.master[1].weight)       # master branch = 1 everywhere
    torch.nn.init.ones_(fpa.master[1].bias)
    x = torch.randn(2, 16, 9, 7)
    context = fpa.global_branch(x.mean((2, 3), keepdim=True))
    attention = fpa(x) - context
    # one attention value per pixel, shared by every channel, varying over pixels
    torch.testing.assert_close(attention, attention[:, :1].expand_as(attention))
    assert attention.std() > 0 and (attention >= 0).all()


def test_fpa_works_down_to_a_1x1_map():
    fpa = attnzoo.create_block("fpa", 8).eval()
    assert fpa(torch.randn(1, 8, 1, 1)).shape == (1, 8, 1, 1)


def test_gau_with_closed_gate_returns_the_upsampled_high_level():
    gau = GlobalAttentionUpsample(12, 6).eval()
    torch.nn.init.zeros_(gau.gate[0].weight)
    torch.nn.init.zeros_(gau.gate[1].bias)
    low, high = torch.randn(1, 12, 8, 8), torch.randn(1, 6, 4, 4)
    expected = torch.nn.functional.interpolate(high, size=(8, 8), mode="bilinear",
                                               align_corners=False)
    torch.testing.assert_close(gau(low, high), expected)


def test_gau_gate_weights_low_level_channels_by_high_level_context():
    gau = GlobalAttentionUpsample(4, 4).eval()
    low, high = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)
    gate = gau.gate(high.mean((2, 3), keepdim=True))
    expected = gau.low(low) * gate + torch.nn.functional.interpolate(
        high, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(gau(low, high), expected)


def test_output_stride_32_and_a_wrong_gau_are_handled():
    model = attnzoo.create_model(_spec(output_stride=32, decoder_channels=64), num_classes=3)
    assert model.encoder.feature_info.reduction() == [4, 8, 16, 32]
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(attnzoo.SpecError, match=r"backbone\.args\.gau"):
        attnzoo.create_model(_spec(gau={"type": "se"}))
    with pytest.raises(attnzoo.SpecError, match=r"backbone\.args\.fpa"):
        attnzoo.create_model(_spec(fpa={"type": "fpa", "pyramid_channels": 7}))
