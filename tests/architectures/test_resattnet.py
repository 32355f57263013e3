"""Residual Attention Network (1704.06904): the attention module, Attention-56/92,
their zoo specs, and the paper's parameter and FLOP figures."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import attnzoo
from attnzoo.architectures.resattnet import (
    PreActBottleneck,
    ResidualAttentionModule,
    ResidualAttentionNet,
    SoftMaskBranch,
    mask_depth,
)
from tests._helpers.exported import assert_export_matches, assert_onnxruntime_matches

# name -> (attention modules per stage, params (M), GFLOPs as the paper counts them = GMACs)
PAPER = {
    "resattnet56": ((1, 1, 1), 31.9, 6.3),    # Table 6 of the paper (6.3e9 FLOPs)
    "resattnet92": ((1, 2, 3), 51.3, 10.4),   # Table 6 of the paper
}


def _units(module: nn.Module) -> int:
    return sum(isinstance(m, PreActBottleneck) for m in module.modules())


def _meta_model(name: str) -> nn.Module:
    with torch.device("meta"):
        return attnzoo.create_model(name)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_zoo_spec_has_the_papers_layout_params_and_flops(name):
    per_stage, params_m, gflops = PAPER[name]
    model = _meta_model(name)
    assert isinstance(model, ResidualAttentionNet)
    counted = tuple(sum(isinstance(b, ResidualAttentionModule) for b in stage)
                    for stage in list(model.stages)[:3])
    assert counted == per_stage
    params = sum(p.numel() for p in model.parameters()) / 1e6
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224, device="meta"))
    macs = counter.get_total_flops() / 2e9
    # measured: 56 -> 31.81M / 6.27 GMACs, 92 -> 52.47M / 10.53 GMACs
    assert abs(params - params_m) / params_m < 0.03, params
    assert abs(macs - gflops) / gflops < 0.02, macs


@pytest.mark.parametrize("name", sorted(PAPER))
def test_zoo_spec_runs_forward_and_backward_at_64(name):
    model = attnzoo.create_model(name, num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    out = model(x)
    assert out.shape == (1, 10)
    out.sum().backward()
    assert model.stem[0].weight.grad is not None
    assert model.stages[0][1].mask.head[-1].weight.grad.abs().sum() > 0
    assert model.attnzoo_spec.paper == "https://arxiv.org/abs/1704.06904"


def test_mask_depth_follows_the_paper_at_224():
    # the mask pools down to 7x7: three times at 56, twice at 28, once at 14
    assert [mask_depth((s, s)) for s in (56, 28, 14, 7)] == [3, 2, 1, 0]
    model = _meta_model("resattnet56")
    assert [stage[1].mask.depth for stage in list(model.stages)[:3]] == [3, 2, 1]


def test_mask_branch_has_the_reference_units():
    # Attention-56 prototxt, stage 1 mask: down res1_1, res2_1, res3_1, res3_2; skip res1,
    # res2; up res2_1, res1_1 -> 8 residual units; stage 2: 5, stage 3: 2
    assert [_units(SoftMaskBranch(16, depth)) for depth in (3, 2, 1, 0)] == [8, 5, 2, 2]
    module = ResidualAttentionModule(16, depth=3)
    assert _units(module) == 8 + 4   # + pre, 2 trunk, post


def test_soft_mask_is_in_0_1_and_keeps_the_shape():
    mask = SoftMaskBranch(16, depth=3).eval()
    x = torch.randn(2, 16, 28, 20)
    m = mask(x)
    assert m.shape == x.shape
    assert m.min() >= 0 and m.max() <= 1


def test_attention_residual_learning_is_one_plus_mask_times_trunk():
    module = ResidualAttentionModule(16, p=0, depth=2).eval()
    x = torch.randn(1, 16, 16, 16)
    nn.init.zeros_(module.mask.head[-1].weight)   # mask logits 0 -> M = 0.5 everywhere
    torch.testing.assert_close(module(x), 1.5 * module.trunk(x))


def test_preact_unit_matches_timm_preact_bottleneck():
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models.resnetv2 import DownsampleConv
    from timm.models.resnetv2 import PreActBottleneck as TimmPreAct

    peer = TimmPreAct(32, 64, bottle_ratio=0.25, stride=2, norm_layer=BatchNormAct2d,
                      conv_layer=partial(create_conv2d, bias=False),
                      proj_layer=DownsampleConv).eval()
    for m in peer.modules():      # non-trivial BN statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight, m.running_var):
                nn.init.uniform_(t, 0.5, 1.5)
            for t in (m.bias, m.running_mean):
                nn.init.uniform_(t, -0.5, 0.5)
    names = {"norm1": "bn1", "norm2": "bn2", "norm3": "bn3", "downsample.conv": "shortcut"}
    state = {}
    for key, value in peer.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        state[f"{names.get(prefix, prefix)}.{leaf}"] = value
    ours = PreActBottleneck(32, 64, stride=2).eval()
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 32, 16, 16)
    torch.testing.assert_close(ours(x), peer(x))


def test_block_builds_from_its_site_size_and_refuses_without_one():
    block = attnzoo.create_block("residual_attention", 32, size=(28, 28))
    assert block.mask.depth == 2
    assert attnzoo.create_block("residual_attention", 32, depth=1).mask.depth == 1
    with pytest.raises(ValueError, match="depth"):
        attnzoo.create_block("residual_attention", 32)
    with pytest.raises(ValueError, match="at least 4 channels"):
        attnzoo.create_block("residual_attention", 2, depth=1)


def test_block_inserts_into_a_timm_resnet():
    spec = {
        "name": "resnet18_ran", "backbone": {"source": "timm", "name": "resnet18"},
        "insert": [{"block": {"type": "residual_attention"}, "at": "post_add",
                    "stages": [3], "blocks": [1]}],
    }
    model = attnzoo.create_model(spec, num_classes=5)
    (inserted,) = model.attnzoo_blocks
    assert inserted.size == (14, 14)
    assert model.layer3[1].attnzoo_after.mask.depth == 1
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_attention_module_is_a_spec_field():
    model = attnzoo.create_model({
        "name": "ran_se", "backbone": {"source": "attnzoo", "name": "resattnet",
                                       "args": {"attention": {"type": "se"}}},
    })
    assert type(model.stages[1][1]).__name__ == "SqueezeExcite"
    with pytest.raises(attnzoo.SpecError, match="backbone.args.attention"):
        attnzoo.create_model({"name": "bad", "backbone": {
            "source": "attnzoo", "name": "resattnet", "args": {"attention": {"type": "nope"}}}})
    with pytest.raises(attnzoo.SpecError, match="attention_modules"):
        attnzoo.create_model({"name": "bad", "backbone": {
            "source": "attnzoo", "name": "resattnet", "args": {"attention_modules": [1, 2]}}})


def test_behaves_like_a_timm_classifier():
    model = ResidualAttentionNet(num_classes=7).eval()
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert model.pretrained_cfg["num_classes"] == 7
    x = torch.randn(1, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (1, 2048, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (1, model.num_features)
    assert model.get_classifier().out_features == 7
    model.reset_classifier(0)
    assert model(x).shape == (1, 2048)
    model.reset_classifier(3)
    assert model(x).shape == (1, 3) and model.num_classes == 3


def test_attention_module_exports():
    module = ResidualAttentionModule(8, depth=2).eval()
    assert_export_matches(module, torch.randn(1, 8, 16, 16))


@pytest.mark.slow
def test_attention_module_compiles_and_onnx_matches_onnxruntime(tmp_path):
    module = ResidualAttentionModule(8, depth=2).eval()
    x = torch.randn(1, 8, 16, 16)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), module(x))
    assert_onnxruntime_matches(module, x, tmp_path / "ran.onnx")
