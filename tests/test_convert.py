"""Timm weights onto zoo models (attnzoo/convert.py): for each zoo model with a timm twin,
timm weights -> from_timm -> strict load -> equal outputs (the SK networks in eval mode
and in train mode, with batch statistics). volo_d1 and vit_small_mha are checked with
their blocks (tests/blocks/test_self_attention.py, tests/blocks/test_sequence.py)."""

from __future__ import annotations

import pytest
import timm
import torch

import attnzoo
from attnzoo.convert import TIMM_EQUIVALENTS, from_timm
from tests._helpers.modules import live_batchnorm_


@pytest.mark.parametrize("name, peer_name, peer_args", [
    ("resnet50_se", "seresnet50", {}),
    ("resnet50_cbam", "resnet50", {"block_args": {"attn_layer": "cbam"}}),
])
def test_from_timm_loads_strictly_with_equal_outputs(name, peer_name, peer_args):
    torch.manual_seed(0)
    peer = timm.create_model(peer_name, **peer_args).eval()
    # un-zero timm's last BNs so the attention matters
    live_batchnorm_(peer, mean=(-0.1, 0.1), var=(0.5, 1.5))
    eq = TIMM_EQUIVALENTS[name]
    assert (eq.timm_name, dict(eq.timm_args)) == (peer_name, peer_args)
    model = attnzoo.create_model(name).eval()
    model.load_state_dict(from_timm(name, peer.state_dict()), strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), peer(x), atol=1e-5, rtol=1e-5)


def test_from_timm_unknown_model_is_a_weights_error():
    with pytest.raises(attnzoo.WeightsError, match="no timm equivalent"):
        from_timm("resnet50_simam", {})


# --- SK networks -------------------------------------------------------------------------


PAIRS = [("resnet18_sk", "skresnet18"), ("resnet34_sk", "skresnet34"),
         ("resnet50_sk", "skresnext50_32x4d")]


@pytest.mark.parametrize(("name", "peer_name"), PAIRS)
def test_zoo_sk_model_equals_timm_given_its_weights(name, peer_name):
    assert TIMM_EQUIVALENTS[name].timm_name == peer_name
    peer = timm.create_model(peer_name)
    # non-trivial BN affine weights and running statistics, so a BN that went missing
    # or was mapped to the wrong place changes the outputs
    live_batchnorm_(peer, bias=(-0.2, 0.2), mean=(-0.2, 0.2), var=(0.5, 1.5))
    model = attnzoo.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in peer.parameters())
    model.load_state_dict(from_timm(name, peer.state_dict()), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), peer.eval()(x), atol=1e-5, rtol=1e-5)
        # Train mode normalises with batch statistics: equal only if the same BNs sit in
        # the same places (an identity-initialised extra BN would differ here).
        torch.testing.assert_close(model.train()(x), peer.train()(x), atol=1e-4, rtol=1e-4)
