"""The zoo in timm's world: entry points, pretrained listings and one pretrained_cfg."""

from __future__ import annotations

import timm
import torch

import attnzoo


def test_timm_builds_a_zoo_architecture_model_with_and_without_weights() -> None:
    plain = timm.create_model("digits_cbam_tiny")
    loaded = timm.create_model("digits_cbam_tiny", pretrained=True)
    ours = attnzoo.create_model("digits_cbam_tiny", pretrained=True)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), ours.eval()(x))
    assert plain.pretrained_cfg["architecture"] == "digits_cbam_tiny"
    assert "tag" not in plain.pretrained_cfg


def test_zoo_models_with_weights_are_listed_by_timm_with_their_tags() -> None:
    listed = timm.list_models(pretrained=True)  # timm lists name.tag
    assert "digits_cbam_tiny.sklearn_digits" in listed
    assert "resnet50_se.a1_in1k" in listed and "resnet18_sk.ra_in1k" in listed
    assert timm.list_pretrained("digits*") == ["digits_cbam_tiny.sklearn_digits"]
    assert not timm.list_models("resnet50_cbam*", pretrained=True)  # no weights of its own


def test_pretrained_cfg_is_the_zoo_models_from_both_entry_points() -> None:
    ours = attnzoo.create_model("resnet18_se")
    theirs = timm.create_model("resnet18_se")
    assert ours.pretrained_cfg == theirs.pretrained_cfg
    cfg = ours.pretrained_cfg
    assert cfg["architecture"] == "resnet18_se" and cfg["num_classes"] == 1000
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["classifier"] == "fc"
    assert "hf_hub_id" not in cfg  # resnet18's own weights are not this model's
    assert timm.data.resolve_data_config(model=ours)["input_size"] == (3, 224, 224)
    loaded = attnzoo.create_model("digits_cbam_tiny", pretrained=True)
    assert loaded.pretrained_cfg["tag"] == "sklearn_digits"
    assert loaded.pretrained_cfg == timm.create_model("digits_cbam_tiny",
                                                      pretrained=True).pretrained_cfg
    assert attnzoo.create_model("resnet18_se", num_classes=5).pretrained_cfg["num_classes"] == 5


def test_input_size_follows_the_backbone_args() -> None:
    """in_chans and img_size change the input a model takes: its cfg says so (found by
    test_random_specs_build_or_raise_spec_error: a 1-channel tiny_cnn said 3)."""
    tiny = attnzoo.create_model({"name": "t", "backbone": {
        "source": "attnzoo", "name": "tiny_cnn", "args": {"img_size": 6}}, "insert": []})
    assert tiny.pretrained_cfg["input_size"] == (1, 6, 6)
    grey = attnzoo.create_model({"name": "g", "backbone": {
        "name": "resnet10t", "args": {"in_chans": 1}}, "insert": []})
    _, *hw = timm.create_model("resnet10t", pretrained=False).pretrained_cfg["input_size"]
    assert grey.pretrained_cfg["input_size"] == (1, *hw)
    assert timm.data.resolve_data_config(model=grey)["input_size"] == (1, *hw)
