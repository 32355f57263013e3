"""The SK zoo models are timm's SK networks: timm weights -> from_timm -> strict load ->
equal outputs, in eval mode and in train mode (batch statistics)."""

from __future__ import annotations

import pytest
import timm
import torch

import attnzoo
from attnzoo.convert import TIMM_EQUIVALENTS, from_timm

PAIRS = [("resnet18_sk", "skresnet18"), ("resnet34_sk", "skresnet34"),
         ("resnet50_sk", "skresnext50_32x4d")]


def randomise_norms(model: torch.nn.Module) -> None:
    """Give every BN non-trivial affine weights and running statistics, so a BN that
    went missing or was mapped to the wrong place changes the outputs."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize(("name", "peer_name"), PAIRS)
def test_zoo_sk_model_equals_timm_given_its_weights(name, peer_name):
    assert TIMM_EQUIVALENTS[name].timm_name == peer_name
    peer = timm.create_model(peer_name)
    randomise_norms(peer)
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


def test_sk_replaces_the_conv_and_its_bn():
    model = attnzoo.create_model("resnet18_sk")
    kinds = {(b.block_type, b.name) for b in model.attnzoo_blocks}
    assert ("sk", "layer1.0.conv1") in kinds and ("identity", "layer1.0.bn1") in kinds
    assert len(model.attnzoo_blocks) == 16  # 8 blocks: SK + the removed BN
    assert not any(k.startswith("layer1.0.bn1.") for k in model.state_dict())
    assert model.layer2[0].conv1.branches[1].conv.stride == (2, 2)
    assert model.layer2[0].conv1.branches[1].conv.dilation == (2, 2)
