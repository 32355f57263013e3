"""``features_only`` (attnzoo/features.py): a zoo model wrapped to return feature maps, as
timm wraps its own backbones, through timm and through ``attnzoo.create_model``."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import FeatureListNet
from timm.models._features import FeatureGetterNet

import attnzoo
from attnzoo import SpecError
from attnzoo.features import features_model
from tests._helpers.modules import live_batchnorm_
from tests._helpers.specs import build_small

ZOO = attnzoo.list_models()


def test_features_only_through_timm_runs_the_inserted_blocks():
    feats = timm.create_model("resnet50_cbam", features_only=True, out_indices=(1, 2, 3))
    assert isinstance(feats, FeatureListNet)
    assert feats.feature_info.channels() == [256, 512, 1024]
    assert feats.feature_info.reduction() == [4, 8, 16]
    assert "num_classes" not in feats.pretrained_cfg
    # layer4's blocks are not used by these features and are dropped with layer4
    assert {b.site.split(".")[0] for b in feats.attnzoo_blocks} == {"layer1", "layer2", "layer3"}
    live_batchnorm_(feats)  # timm zero-inits the last BNs, which would hide the blocks
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
    model, input_size = build_small(attnzoo.load_spec(name), img_size=False)
    if not getattr(model, "feature_info", None):
        with pytest.raises(SpecError, match="features_only needs the backbone to describe"):
            features_model(model)
        return
    feats = features_model(model).eval()
    with torch.no_grad():
        out = feats(torch.randn(1, *input_size))
    assert [o.shape[1] for o in out] == feats.feature_info.channels()
    assert [input_size[-1] // o.shape[-1] for o in out] == feats.feature_info.reduction()
