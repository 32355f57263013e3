"""tiny_cnn (attnzoo/architectures/tiny.py): a small plain CNN that behaves like a timm
classifier, the backbone of the zoo model digits_cbam_tiny."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.errors import SpecError


def test_tiny_cnn_behaves_like_a_timm_classifier() -> None:
    model = attnzoo.create_model({"name": "t", "backbone": {
        "source": "attnzoo", "name": "tiny_cnn", "args": {"widths": [8, 16, 24],
                                                           "depths": [1, 2, 1]}}}).eval()
    x = torch.rand(2, 1, 8, 8)
    feats = model.forward_features(x)
    assert feats.shape == (2, 24, 2, 2)  # 8 -> 4 -> 2: every stage after the first halves
    assert model.num_features == 24
    pooled = model.forward_head(feats, pre_logits=True)
    assert torch.allclose(pooled, feats.mean((2, 3)))
    assert torch.equal(model.forward_head(feats), model.get_classifier()(pooled))
    assert torch.equal(model(x), model.forward_head(feats))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 24)
    cfg = model.pretrained_cfg
    assert cfg["first_conv"] == "stem.conv" and cfg["classifier"] == "fc"
    assert model.get_submodule(cfg["first_conv"]).in_channels == 1


def test_tiny_cnn_stage_filters_select_its_blocks() -> None:
    spec = {"name": "t", "backbone": {"source": "attnzoo", "name": "tiny_cnn",
                                      "args": {"in_chans": 3, "img_size": 16}},
            "insert": [{"block": {"type": "se", "reduction": 4},
                        "at": {"path": "stages.*.*"}, "stages": [2], "blocks": [1]}]}
    model = attnzoo.create_model(spec)
    assert [(b.site, b.channels, b.size) for b in model.attnzoo_blocks] == [
        ("stages.1.1", 64, (8, 8))]
    assert model(torch.rand(1, 3, 16, 16)).shape == (1, 10)


@pytest.mark.parametrize("args, problem", [
    ({"widths": [8, 16], "depths": [1]}, "same length"),
    ({"widths": [8, 0], "depths": [1, 1]}, "positive"),
])
def test_tiny_cnn_bad_args_are_spec_errors(args: dict, problem: str) -> None:
    spec = {"name": "t", "backbone": {"source": "attnzoo", "name": "tiny_cnn", "args": args}}
    with pytest.raises(SpecError, match=problem):
        attnzoo.create_model(spec)
