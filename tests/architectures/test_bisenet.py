"""BiSeNet V1: the zoo spec builds and trains at 64x64, ARM/FFM behave as the paper
describes, the ARM is swappable from YAML, and the context path is timm's ResNet-18."""

from __future__ import annotations

import pytest
import timm
import torch

import attnzoo
from attnzoo.architectures.bisenet import AttentionRefinement, BiSeNetV1, FeatureFusion
from attnzoo.blocks.mixed import CBAM


def _spec(**args):
    return {"name": "bisenet_test", "backbone": {"source": "attnzoo", "name": "bisenetv1",
                                                 "args": args}}


def test_zoo_spec_trains_and_predicts_at_input_size():
    model = attnzoo.create_model("bisenetv1_resnet18")
    assert isinstance(model, BiSeNetV1)
    x = torch.randn(2, 3, 64, 64)
    outputs = model.train()(x)
    assert isinstance(outputs, tuple) and len(outputs) == 3  # main + two auxiliary heads
    assert all(o.shape == (2, 19, 64, 64) for o in outputs)
    sum(o.mean() for o in outputs).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    assert model(torch.randn(1, 3, 64, 48)).shape == (1, 19, 64, 48)


def test_arm_swapped_for_cbam_from_yaml(tmp_path):
    path = tmp_path / "bisenet_cbam.yaml"
    path.write_text("name: bisenet_cbam\nbackbone:\n  source: attnzoo\n  name: bisenetv1\n"
                    "  args: {arm: {type: cbam, reduction: 8}}\nnum_classes: 5\n")
    model = attnzoo.create_model(path)
    assert isinstance(model.context_head.arm32, CBAM) and isinstance(model.context_head.arm16, CBAM)
    assert not any(isinstance(m, AttentionRefinement) for m in model.modules())
    assert model.context_head.arm16.channel.fc1.out_channels == 128 // 8
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 5, 64, 64)


def test_default_arm_and_ffm_are_the_papers_modules():
    model = attnzoo.create_model("bisenetv1_resnet18")
    assert isinstance(model.context_head.arm32, AttentionRefinement)
    assert isinstance(model.context_head.arm16, AttentionRefinement)
    assert isinstance(model.ffm, FeatureFusion)


def test_bad_arm_config_is_a_spec_error_that_says_where():
    with pytest.raises(attnzoo.SpecError, match=r"backbone\.args\.arm"):
        attnzoo.create_model(_spec(arm={"type": "cbam", "reductio": 8}))
    with pytest.raises(attnzoo.SpecError, match="nope"):
        attnzoo.create_model(_spec(arm={"type": "nope"}))


def test_arm_scales_each_channel_by_a_sigmoid_of_its_pooled_value():
    arm = attnzoo.create_block("arm", 8).eval()
    torch.nn.init.normal_(arm.conv.weight)
    x = torch.randn(2, 8, 5, 6)
    y = arm(x)
    pooled = x.mean((2, 3))                                          # GAP
    z = pooled @ arm.conv.weight.view(8, 8).T                          # 1x1 conv
    z = (z - arm.bn.running_mean) / torch.sqrt(arm.bn.running_var + arm.bn.eps)
    expected = x * torch.sigmoid(z * arm.bn.weight + arm.bn.bias)[..., None, None]
    torch.testing.assert_close(y, expected)


def test_ffm_fuses_concatenation_and_adds_reweighted_copy():
    ffm = attnzoo.create_block("ffm", 12).eval()
    torch.nn.init.zeros_(ffm.fc2.weight)        # sigmoid(0) = 1/2 for every channel
    a, b = torch.randn(1, 4, 6, 6), torch.randn(1, 8, 6, 6)
    fused = ffm.proj(torch.cat([a, b], dim=1))
    torch.testing.assert_close(ffm(a, b), 1.5 * fused)
    assert ffm(torch.cat([a, b], dim=1)).shape == (1, 12, 6, 6)  # one input: insertable


def test_context_path_loads_timm_resnet18_weights_strictly():
    model = attnzoo.create_model("bisenetv1_resnet18")
    peer = timm.create_model("resnet18", pretrained=False)
    state = {k: v for k, v in peer.state_dict().items() if not k.startswith("fc.")}
    model.context_path.load_state_dict(state, strict=True)
    n_peer = sum(v.numel() for k, v in peer.named_parameters() if not k.startswith("fc."))
    assert sum(p.numel() for p in model.context_path.parameters()) == n_peer


def test_blocks_can_be_inserted_into_the_context_path():
    model = attnzoo.create_model({**_spec(), "insert": [
        {"block": {"type": "se"}, "at": "residual", "stages": [4]}]})
    assert [b.site for b in model.attnzoo_blocks] == ["context_path.layer4.0.bn2",
                                                     "context_path.layer4.1.bn2"]
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 19, 64, 64)


def test_exports_without_graph_breaks():
    model = attnzoo.create_model("bisenetv1_resnet18").eval()
    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
