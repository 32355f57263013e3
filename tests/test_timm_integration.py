"""timm integration: zoo names are timm models, with pretrained cfgs and features_only."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import timm.data
import torch
from timm.models import FeatureListNet
from timm.models._features import FeatureGetterNet
from timm.models._registry import model_entrypoint

import attnzoo
from attnzoo import SpecError
from attnzoo.timm_registry import features_model, zoo_pretrained_cfg

ZOO = attnzoo.list_models()


def build_small(name: str, size: int = 64, **kwargs) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The zoo model built for a small input (size-dependent blocks are built for it)
    and that input's (C, H, W). Specs made for an even smaller input keep theirs, and
    a model whose blocks cannot work at ``size`` (FcaNet's DCT frequencies) is built
    at its own input size."""
    spec = attnzoo.load_spec(name)
    if spec.input_size is not None and max(spec.input_size[1:]) <= size:
        return attnzoo.create_model(spec, **kwargs), tuple(spec.input_size)
    chans = spec.input_size[0] if spec.input_size else 3
    try:
        small = spec.model_copy(update={"input_size": (chans, size, size)})
        return attnzoo.create_model(small, **kwargs), (chans, size, size)
    except SpecError:
        model = attnzoo.create_model(spec, **kwargs)
        return model, tuple(model.pretrained_cfg["input_size"])


def load_same_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    dst.load_state_dict(src.state_dict(), strict=True)


def test_every_zoo_model_is_a_timm_model_and_clashes_with_none_of_timms():
    for name in ZOO:
        assert timm.is_model(name), name
        # registered by attnzoo, not one of timm's own models of the same name
        assert model_entrypoint(name).__module__ == "attnzoo.timm_registry", name
    assert set(timm.list_models("*cbam*")) >= {"resnet18_cbam", "resnet50_cbam"}
    assert set(timm.list_models(module="timm_registry")) == set(ZOO)


def test_import_builds_no_model():
    """Registration reads spec files only: importing attnzoo constructs no nn.Module."""
    code = (
        "import torch.nn as nn, timm\n"
        "count = [0]\n"
        "init = nn.Module.__init__\n"
        "def counting(self, *a, **k):\n"
        "    count[0] += 1\n"
        "    init(self, *a, **k)\n"
        "nn.Module.__init__ = counting\n"
        "import attnzoo\n"
        "assert timm.is_model('resnet50_cbam')\n"
        "print(count[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["0"]


def test_timm_create_model_is_the_zoo_model():
    via_timm = timm.create_model("resnet18_cbam", num_classes=7).eval()
    ours = attnzoo.create_model("resnet18_cbam", num_classes=7).eval()
    assert type(via_timm) is type(ours)
    assert via_timm.attnzoo_spec == ours.attnzoo_spec
    load_same_weights(ours, via_timm)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(via_timm(x), ours(x))
    assert via_timm(x).shape == (2, 7)


def test_timm_forwards_backbone_args():
    model = timm.create_model("resnet18_cbam", drop_path_rate=0.1, in_chans=1)
    assert model.conv1.in_channels == 1
    assert model.layer4[1].drop_path.drop_prob == pytest.approx(0.1)


def test_pretrained_cfg_and_data_config():
    cfg = timm.models.get_pretrained_cfg("resnet50_cbam")
    assert cfg.architecture == "resnet50_cbam" and not cfg.has_weights
    assert cfg.paper_ids == "arXiv:1807.06521"
    assert (cfg.first_conv, cfg.classifier) == ("conv1", "fc")
    model = timm.create_model("resnet50_cbam")
    data = timm.data.resolve_data_config(model=model)
    resnet = timm.data.resolve_data_config(model=timm.create_model("resnet50"))
    assert data == resnet  # the zoo model is fed as its backbone is
    transform = timm.data.create_transform(**data)
    assert transform is not None


def test_pretrained_cfg_takes_the_specs_input_size_and_classes():
    spec = attnzoo.ModelSpec.from_dict({
        "name": "t", "backbone": {"name": "resnet18"}, "input_size": [3, 96, 96],
        "num_classes": 10, "license": "apache-2.0"})
    cfg = zoo_pretrained_cfg(spec)
    assert cfg["input_size"] == (3, 96, 96) and cfg["num_classes"] == 10
    assert cfg["mean"] == timm.models.get_pretrained_cfg("resnet18").mean
    assert cfg["license"] == "apache-2.0"
    assert not {"url", "hf_hub_id", "file"} & set(cfg)


def test_features_only_through_timm_runs_the_inserted_blocks():
    feats = timm.create_model("resnet50_cbam", features_only=True, out_indices=(1, 2, 3))
    assert isinstance(feats, FeatureListNet)
    assert feats.feature_info.channels() == [256, 512, 1024]
    assert feats.feature_info.reduction() == [4, 8, 16]
    assert "num_classes" not in feats.pretrained_cfg
    # layer4's blocks are not used by these features and are dropped with layer4
    assert {b.site.split(".")[0] for b in feats.attnzoo_blocks} == {"layer1", "layer2", "layer3"}
    for m in feats.modules():  # timm zero-inits the last BNs, which would hide the blocks
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    full = attnzoo.create_model("resnet50_cbam").eval()
    full.load_state_dict(feats.state_dict(), strict=False)
    feats.eval()
    x = torch.randn(1, 3, 64, 64)
    expected = full.forward_intermediates(x, indices=[1, 2, 3], intermediates_only=True)
    got = feats(x)
    assert len(got) == 3
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    # and the blocks matter: the plain backbone gives other features
    plain = timm.create_model("resnet50", features_only=True, out_indices=(1, 2, 3)).eval()
    plain.load_state_dict(feats.state_dict(), strict=False)
    assert not torch.allclose(plain(x)[2], got[2])


def test_attnzoo_create_model_features_only_and_feature_cls():
    x = torch.randn(1, 3, 32, 32)
    listed = attnzoo.create_model("resnet18_cbam", features_only=True).eval()
    assert isinstance(listed, FeatureListNet) and len(listed(x)) == 5
    getter = attnzoo.create_model("resnet18_cbam", features_only=True, out_indices=(2, 4),
                                  feature_cls="getter").eval()
    assert isinstance(getter, FeatureGetterNet)
    getter.model.load_state_dict(listed.state_dict(), strict=False)
    got = getter(x)
    want = listed(x)
    torch.testing.assert_close(got[0], want[2])
    torch.testing.assert_close(got[1], want[4])
    with pytest.raises(SpecError, match="unknown feature_cls 'lists'"):
        attnzoo.create_model("resnet18_cbam", features_only=True, feature_cls="lists")


def test_features_only_refuses_to_skip_a_block_on_a_flattened_container():
    spec = {"name": "t", "backbone": {"name": "convnext_atto"},
            "insert": [{"block": {"type": "se"}, "at": {"path": "stages", "position": "after"}}]}
    with pytest.raises(SpecError, match="would skip the inserted block stages.attnzoo_after"):
        attnzoo.create_model(spec, features_only=True)
    # the getter runs the model's own forward, so it keeps the block
    feats = attnzoo.create_model(spec, features_only=True, feature_cls="getter")
    assert isinstance(feats, FeatureGetterNet)


@pytest.mark.parametrize("name", ZOO)
def test_features_only_for_every_zoo_model(name):
    """Either feature maps that match feature_info, or a clear error for an
    architecture that does not describe its feature maps."""
    model, input_size = build_small(name)
    if not getattr(model, "feature_info", None):
        with pytest.raises(SpecError, match="features_only needs the backbone to describe"):
            features_model(model)
        return
    feats = features_model(model).eval()
    with torch.no_grad():
        out = feats(torch.randn(1, *input_size))
    assert [o.shape[1] for o in out] == feats.feature_info.channels()
    assert [input_size[-1] // o.shape[-1] for o in out] == feats.feature_info.reduction()
