"""The foundation's zoo specs: they build, run, insert the right number of blocks,
and have the parameter counts their papers report."""

from __future__ import annotations

import pytest
import timm
import torch

import attnzoo
from attnzoo.convert import TIMM_EQUIVALENTS, from_timm

# name -> (inserted blocks, parameters reported by the paper, in millions)
PAPER = {
    "resnet18_se": (8, 11.78),      # SENet, Table 2
    "resnet34_se": (16, 21.96),     # SENet, Table 2
    "resnet50_se": (16, 28.09),     # SENet, Table 2
    "resnet101_se": (33, 49.33),    # SENet, Table 2
    "resnet50_eca": (16, 25.56),    # ResNet-50 (25.56M) plus 80 ECA kernel weights
    "resnet101_eca": (33, 44.55),   # ResNet-101 (44.55M) plus 99 ECA kernel weights
    "resnet18_cbam": (8, 11.78),    # CBAM, Table 4
    "resnet50_cbam": (16, 28.09),   # CBAM, Table 4
    "resnet50_simam": (16, 25.56),  # SimAM adds no parameters to ResNet-50 (25.56M)
    "resnet50_gc": (13, 28.08),     # GCNet, Table 2(b): r16, c3-c5, after add1x1
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_zoo_model_builds_runs_and_matches_the_paper(name):
    n_blocks, params_m = PAPER[name]
    model = attnzoo.create_model(name)
    assert len(model.attnzoo_blocks) == n_blocks
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / 1e6 - params_m) < 0.01 * params_m, params
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert model.attnzoo_spec.paper.startswith("https://")


def test_list_models_pattern():
    cbam = attnzoo.list_models("*cbam*")
    assert {"resnet18_cbam", "resnet50_cbam"} <= set(cbam)
    assert all("cbam" in name for name in cbam) and cbam == sorted(cbam)
    assert set(PAPER) <= set(attnzoo.list_models())


@pytest.mark.parametrize("name, peer_name, peer_args", [
    ("resnet50_se", "seresnet50", {}),
    ("resnet50_eca", "resnet50", {"block_args": {"attn_layer": "eca"}}),
    ("resnet50_cbam", "resnet50", {"block_args": {"attn_layer": "cbam"}}),
])
def test_from_timm_loads_strictly_with_equal_outputs(name, peer_name, peer_args):
    torch.manual_seed(0)
    peer = timm.create_model(peer_name, **peer_args).eval()
    for m in peer.modules():  # un-zero timm's last BNs so the attention matters
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    eq = TIMM_EQUIVALENTS[name]
    assert (eq.timm_name, dict(eq.timm_args)) == (peer_name, peer_args)
    model = attnzoo.create_model(name).eval()
    model.load_state_dict(from_timm(name, peer.state_dict()), strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), peer(x), atol=1e-5, rtol=1e-5)


def test_from_timm_unknown_model_is_a_weights_error():
    with pytest.raises(attnzoo.WeightsError, match="no timm equivalent"):
        from_timm("resnet50_simam", {})
