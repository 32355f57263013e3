"""Spatial attention (attnzoo/blocks/spatial.py).

The Spatial Transformer: identity at init, the affine theta means what the paper says,
and the zoo spec puts it in front of timm's resnet18 at any input size >= 32. Reverse
attention (RAS's ``reverse`` block) attends to what the coarser prediction has not
found yet.
"""

from __future__ import annotations

import pytest
import timm
import torch

import attnzoo
from attnzoo.blocks.spatial import SpatialTransformer

# --- Spatial Transformer ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 32, 32), (1, 5, 45, 71)])
def test_stn_at_init_leaves_its_input_unchanged(shape):
    stn = attnzoo.create_block("stn", shape[1], loc_resolution=64)
    x = torch.randn(shape)
    torch.testing.assert_close(stn(x), x, atol=1e-4, rtol=1e-4)


def test_theta_is_an_affine_map_of_normalised_coordinates():
    stn = attnzoo.create_block("stn", 3, loc_resolution=64)
    x = torch.randn(1, 3, 16, 24)
    with torch.no_grad():
        stn.theta.bias.copy_(torch.tensor([-1.0, 0, 0, 0, 1, 0]))   # mirror x
    torch.testing.assert_close(stn(x), x.flip(-1), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        stn.theta.bias.copy_(torch.tensor([1.0, 0, 0, 0, -1, 0]))   # mirror y
    torch.testing.assert_close(stn(x), x.flip(-2), atol=1e-4, rtol=1e-4)
    with torch.no_grad():                                          # shift by one column
        stn.theta.bias.copy_(torch.tensor([1.0, 0, 2 / 24, 0, 1, 0]))
    out = stn(x)
    torch.testing.assert_close(out[..., :-1], x[..., 1:], atol=1e-4, rtol=1e-4)
    assert out[..., -1].abs().max() < 1e-4                          # zeros outside


def test_zoo_spec_puts_the_transformer_before_conv1_and_starts_as_plain_resnet18():
    model = attnzoo.create_model("stn_resnet18").eval()
    (block,) = model.attnzoo_blocks
    assert (block.site, block.position, block.channels) == ("conv1", "before", 3)
    assert isinstance(model.conv1.attnzoo_before, SpatialTransformer)
    peer = timm.create_model("resnet18").eval()
    state = {k: v for k, v in model.state_dict().items() if "attnzoo_before" not in k}
    peer.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), peer(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (37, 90)])
def test_zoo_spec_trains_at_any_input_size_from_32(size):
    model = attnzoo.create_model("stn_resnet18", num_classes=10)
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 10)
    out.square().mean().backward()
    assert model.conv1.attnzoo_before.theta.weight.grad.abs().sum() > 0


def test_stn_exports():
    stn = attnzoo.create_block("stn", 3, loc_resolution=64).eval()
    x = torch.randn(1, 3, 40, 40)
    exported = torch.export.export(stn, (x,))
    torch.testing.assert_close(exported.module()(x), stn(x))


def test_localisation_net_has_the_papers_svhn_size():
    # two 5x5 convs with 32 filters (on 3 channels, then 32), FC 32*16*16 -> 32,
    # FC 32 -> 32, regression 32 -> 6, all with biases
    expected = (3 * 25 * 32 + 32) + (32 * 25 * 32 + 32) + (32 * 16 * 16 * 32 + 32) \
        + (32 * 32 + 32) + (32 * 6 + 6)
    stn = attnzoo.create_block("stn", 3, loc_resolution=64)
    assert sum(p.numel() for p in stn.parameters()) == expected == 291_494


def test_stn_sized_for_its_site_names_a_wrong_input_size():
    stn = SpatialTransformer(3, input_size=(32, 32))
    assert stn(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"sized for 32x32 maps .* got 48x48.*loc_resolution"):
        stn(torch.randn(1, 3, 48, 48))


# --- Reverse attention ------------------------------------------------------------------


def test_reverse_ignores_features_where_the_coarse_map_is_already_salient():
    unit = attnzoo.create_block("reverse", 8)
    confident = torch.full((1, 1, 4, 4), 40.0)       # sigmoid = 1: weight 1 - 1 = 0
    a, b = torch.randn(1, 8, 8, 8), torch.randn(1, 8, 8, 8)
    torch.testing.assert_close(unit(a, confident), unit(b, confident))


def test_reverse_refines_unfound_regions_residually():
    unit = attnzoo.create_block("reverse", 8, hidden_channels=16, num_convs=3)
    background = torch.full((1, 1, 4, 4), -40.0)     # sigmoid = 0: weight 1
    features = torch.randn(1, 8, 8, 8)
    out = unit(features, background)
    assert out.shape == (1, 1, 8, 8)                  # at the side's resolution
    torch.testing.assert_close(out, -40.0 + unit.residual(features))


def test_reverse_weight_is_one_minus_sigmoid_of_the_upsampled_prediction():
    unit = attnzoo.create_block("reverse", 3)
    coarse = torch.randn(1, 1, 4, 4)
    features = torch.randn(1, 3, 8, 8)
    up = torch.nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear",
                                         align_corners=False)
    expected = up + unit.residual(features * (1 - torch.sigmoid(up)))
    torch.testing.assert_close(unit(features, coarse), expected)
