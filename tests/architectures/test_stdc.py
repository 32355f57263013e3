"""STDC (2104.13188): the STDC module, STDC1/STDC2 ImageNet backbones, STDC1-Seg with
BiSeNet's ARM/FFM and the detail head, the detail aggregation target and loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import attnzoo
from attnzoo.architectures.bisenet import AttentionRefinement, FeatureFusion
from attnzoo.architectures.stdc import (
    STDCModule,
    STDCNet,
    STDCSeg,
    detail_loss,
    detail_target,
    stdc_widths,
)
from tests._helpers.exported import assert_export_matches, assert_onnxruntime_matches

# name -> (STDC modules in stages 3-5, params (M), MFLOPs as the paper counts them = MMACs)
PAPER = {
    "stdc1": ((2, 2, 2), 8.44, 813),    # "STDCNet813" in the authors' code; Table 2
    "stdc2": ((4, 5, 3), 12.5, 1446),   # "STDCNet1446"
}


def _macs(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(shape, device="meta"))
    return counter.get_total_flops() / 2


def test_stdc_widths_halve_and_sum_to_the_output():
    assert stdc_widths(256, 4) == [128, 64, 32, 32]      # out/2, out/4, out/8, out/8
    assert stdc_widths(512, 2) == [256, 256]
    assert stdc_widths(64, 3) == [32, 16, 16]


@pytest.mark.parametrize("stride", [1, 2])
def test_stdc_module_concatenates_its_blocks(stride):
    module = STDCModule(32, 64, stride=stride).eval()
    assert [tuple(c[0].weight.shape) for c in module.convs] == [
        (32, 32, 1, 1), (16, 32, 3, 3), (8, 16, 3, 3), (8, 8, 3, 3)]
    x = torch.randn(2, 32, 16, 16)
    out = module(x)
    assert out.shape == (2, 64, 16 // stride, 16 // stride)
    first = module.convs[0](x)
    if stride == 2:   # the first block's output reaches the concatenation average-pooled
        first = F.avg_pool2d(first, 3, stride=2, padding=1)
    torch.testing.assert_close(out[:, :32], first)
    # the last block's output closes the concatenation
    chain = module.downsample(module.convs[0](x))
    for conv in module.convs[1:]:
        chain = conv(chain)
    torch.testing.assert_close(out[:, -8:], chain)


def test_stdc_module_downsamples_with_a_depthwise_conv():
    module = STDCModule(64, 256, stride=2)
    conv = module.downsample[0]
    assert (conv.groups, conv.stride, tuple(conv.weight.shape)) == (128, (2, 2), (128, 1, 3, 3))


def test_stdc_block_and_its_errors():
    block = attnzoo.create_block("stdc", 64)
    assert block(torch.randn(1, 64, 8, 8)).shape == (1, 64, 8, 8)
    assert len(attnzoo.create_block("stdc", 64, num_convs=2).convs) == 2
    with pytest.raises(ValueError, match="divisible by 8"):
        STDCModule(64, 100)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_zoo_backbones_have_the_papers_layout_params_and_flops(name):
    layers, params_m, mflops = PAPER[name]
    with torch.device("meta"):
        model = attnzoo.create_model(name).eval()
    assert isinstance(model, STDCNet)
    assert tuple(len(stage) for stage in list(model.stages)[2:]) == layers
    params = sum(p.numel() for p in model.parameters()) / 1e6
    macs = _macs(model, (1, 3, 224, 224)) / 1e6
    # measured: stdc1 8.44M / 806 MMACs, stdc2 12.47M / 1437 MMACs (BN, ReLU and pooling
    # ops are not counted by FlopCounterMode)
    assert abs(params - params_m) / params_m < 0.01, params
    assert abs(macs - mflops) / mflops < 0.02, macs


@pytest.mark.parametrize("name", ["stdc1", "stdc2"])
def test_zoo_backbones_run_forward_and_backward_at_64(name):
    model = attnzoo.create_model(name, num_classes=10)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert model.stages[0][0][0].weight.grad.abs().sum() > 0
    assert model.attnzoo_spec.paper == "https://arxiv.org/abs/2104.13188"


def test_backbone_behaves_like_a_timm_classifier():
    model = STDCNet(num_classes=5).eval()
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    x = torch.randn(1, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (1, 1024, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (1, model.num_features)
    assert model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert model(x).shape == (1, 1024)
    stages = STDCNet(features_only=True)(x)
    assert [(f.shape[1], 64 // f.shape[-1]) for f in stages] == [
        (32, 2), (64, 4), (256, 8), (512, 16), (1024, 32)]


def test_blocks_insert_by_stage_into_stdc():
    model = attnzoo.create_model({
        "name": "stdc1_se", "backbone": {"source": "attnzoo", "name": "stdcnet"},
        "insert": [{"block": {"type": "se"}, "at": {"path": "stages.*.*"}, "stages": [4, 5]}],
    })
    assert [b.site for b in model.attnzoo_blocks] == [
        "stages.3.0", "stages.3.1", "stages.4.0", "stages.4.1"]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_stdc1_seg_outputs_maps_at_input_size_and_detail_logits_in_training():
    model = attnzoo.create_model("stdc1_seg", num_classes=7)
    assert isinstance(model, STDCSeg)
    assert isinstance(model.context_head.arm32, AttentionRefinement)
    assert isinstance(model.ffm, FeatureFusion)
    assert model.ffm.fc1.out_channels == 256 // 4     # STDC's FFM reduces by 4
    x = torch.randn(2, 3, 64, 64)
    logits, aux16, aux32, detail = model.train()(x)
    assert logits.shape == aux16.shape == aux32.shape == (2, 7, 64, 64)
    assert detail.shape == (2, 1, 64, 64)
    labels = torch.randint(0, 7, (2, 64, 64))
    loss = sum(F.cross_entropy(o, labels) for o in (logits, aux16, aux32))
    (loss + detail_loss(detail, labels)).backward()
    assert model.detail_head.classifier.weight.grad.abs().sum() > 0
    assert model.backbone.stages[0][0][0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 7, 64, 64)
    assert model.pretrained_cfg["input_size"] == (3, 512, 1024)


def test_stdc_seg_attention_modules_are_spec_fields():
    model = attnzoo.create_model({
        "name": "stdc1_seg_cbam", "backbone": {
            "source": "attnzoo", "name": "stdc_seg", "args": {"arm": {"type": "cbam"}}}})
    assert type(model.context_head.arm16).__name__ == "CBAM"
    with pytest.raises(attnzoo.SpecError, match="backbone.args.ffm"):
        attnzoo.create_model({"name": "bad", "backbone": {
            "source": "attnzoo", "name": "stdc_seg", "args": {"ffm": {"type": "ffm", "x": 1}}}})
    with pytest.raises(attnzoo.SpecError, match="stdc3"):
        attnzoo.create_model({"name": "bad", "backbone": {
            "source": "attnzoo", "name": "stdc_seg", "args": {"layers": "stdc3"}}})


def _naive_detail_target(labels: torch.Tensor) -> torch.Tensor:
    """Loop-by-loop Laplacian (zero padding) at strides 1, 2, 4, fused 0.6/0.3/0.1."""
    h, w = labels.shape
    padded = F.pad(labels.float(), (1, 1, 1, 1))
    fused = torch.zeros(h, w)
    for stride, weight in ((1, 0.6), (2, 0.3), (4, 0.1)):
        for i in range(0, h, stride):
            for j in range(0, w, stride):
                window = padded[i:i + 3, j:j + 3]
                value = 9 * window[1, 1] - window.sum()
                if value > 0.1:
                    fused[i:i + stride, j:j + stride] += weight
    return (fused > 0.1).float()


def test_detail_target_is_the_laplacian_pyramid_of_the_labels():
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[0, 4:12, 4:12] = 1
    labels[1, :, 9:] = 3
    target = detail_target(labels)
    assert target.shape == (2, 1, 16, 16)
    for n in range(2):
        torch.testing.assert_close(target[n, 0], _naive_detail_target(labels[n]))
    assert target[0, 0, 4, 4] == 1 and target[0, 0, 8, 8] == 0 and target[0, 0, 0, 0] == 0
    assert detail_target(torch.zeros(1, 8, 8, dtype=torch.long)).sum() == 0


def test_detail_loss_rewards_the_right_edges():
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[0, 8:24, 8:24] = 2
    target = detail_target(labels)
    good = detail_loss(20 * (2 * target - 1), labels)
    bad = detail_loss(-20 * (2 * target - 1), labels)
    assert good < 0.05 < 1.0 < bad
    # logits at 1/8 are resized to the labels' size
    assert detail_loss(torch.zeros(1, 1, 4, 4), labels) > 0


def test_stdc_module_exports():
    module = STDCModule(16, 32, stride=2).eval()
    assert_export_matches(module, torch.randn(1, 16, 16, 16))


@pytest.mark.slow
def test_stdc_seg_exports_compiles_and_onnx_matches_onnxruntime(tmp_path):
    model = STDCSeg(num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    assert_export_matches(model, x)
    assert_onnxruntime_matches(model, x, tmp_path / "stdc.onnx")
    compiled = torch.compile(model.train(), fullgraph=True, backend="eager")
    assert len(compiled(torch.randn(2, 3, 64, 64))) == 4   # BN on the pooled tail: batch > 1
