"""The builder: what a built model is, where blocks go, and how bad specs fail."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models.resnet import ResNet

import attnzoo
from attnzoo import SpecError
from attnzoo.blocks.channel import SqueezeExcite
from attnzoo.blocks.mixed import CBAM

X = torch.randn(2, 3, 64, 64)


def live_bare(name="resnet18"):
    """A timm backbone whose last BNs are not zero (timm zero-inits them, which would
    make every residual branch output 0 and hide what an inserted block does)."""
    bare = timm.create_model(name).eval()
    for m in bare.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    return bare


def spec(*insert, backbone="resnet18", **extra):
    return {"name": "t", "backbone": {"name": backbone}, "insert": list(insert), **extra}


def test_resnet50_cbam_is_a_timm_resnet_with_unchanged_names():
    model = attnzoo.create_model("resnet50_cbam")
    assert isinstance(model, ResNet)
    plain = timm.create_model("resnet50")
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys, "CBAM parameters should be missing from a plain resnet50"
    assert all(".attnzoo_after." in k for k in result.missing_keys)
    # 16 bottlenecks, CBAM before the add in each: after bn3.
    cbams = [n for n, m in model.named_modules() if isinstance(m, CBAM)]
    assert cbams == [f"layer{s}.{b}.bn3.attnzoo_after"
                     for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3), strict=True) for b in range(n)]
    assert model.attnzoo_spec.name == "resnet50_cbam"


def test_no_forward_hooks_and_timm_api_still_works():
    model = attnzoo.create_model("resnet18_cbam")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert model.forward_features(X).shape == (2, 512, 2, 2)
    model.reset_classifier(7)
    assert model(X).shape == (2, 7)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)


def test_inserted_block_changes_the_output_where_it_says():
    bare = timm.create_model("resnet18").eval()
    torch.nn.init.uniform_(bare.layer4[1].bn2.weight, 0.5, 1.5)  # timm zero-inits it
    model = attnzoo.create_model(spec({"block": {"type": "se"}, "at": "residual",
                                       "stages": [4], "blocks": [1]})).eval()
    model.load_state_dict(bare.state_dict(), strict=False)
    se = model.layer4[1].bn2.attnzoo_after
    assert isinstance(se, SqueezeExcite)
    x = torch.randn(1, 512, 4, 4)
    expected = se(bare.layer4[1].bn2(bare.layer4[1].conv2(x)))
    got = model.layer4[1].bn2(model.layer4[1].conv2(x))
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, bare.layer4[1].bn2(bare.layer4[1].conv2(x)))
    assert len(model.attnzoo_blocks) == 1


def test_num_classes_from_call_and_from_spec():
    assert attnzoo.create_model("resnet18_se", num_classes=10)(X).shape == (2, 10)
    assert attnzoo.create_model(spec(num_classes=3))(X).shape == (2, 3)


def test_backbone_args_are_forwarded():
    model = attnzoo.create_model("resnet18_se", in_chans=1)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("position", ["before", "after"])
def test_path_glob_positions(position):
    model = attnzoo.create_model(spec({"block": {"type": "simam"},
                                       "at": {"path": "layer*.*.conv2", "position": position}}))
    child = f"attnzoo_{position}"
    convs = [n for n, m in model.named_modules() if n.endswith("conv2") and hasattr(m, child)]
    assert len(convs) == 8
    assert model(X).shape == (2, 1000)


def test_before_sees_input_channels_and_after_output_channels():
    model = attnzoo.create_model(spec(
        {"block": {"type": "se"}, "at": {"path": "layer2.0.conv1", "position": "before"}},
        {"block": {"type": "se"}, "at": {"path": "layer2.0.conv1", "position": "after"}},
    ))
    rows = {b.position: b for b in model.attnzoo_blocks}
    assert rows["before"].channels == 64 and rows["after"].channels == 128
    assert rows["before"].size == (56, 56) and rows["after"].size == (28, 28)
    assert model(X).shape == (2, 1000)


def test_replace_puts_the_block_at_the_path():
    model = attnzoo.create_model(spec({"block": {"type": "cbam"},
                                       "at": {"path": "layer1.*.act2", "position": "replace"}}))
    assert isinstance(model.layer1[0].act2, CBAM)
    assert model(X).shape == (2, 1000)


def test_two_blocks_at_one_site_chain_in_order():
    model = attnzoo.create_model(spec({"block": {"type": "se"}, "at": "residual"},
                                      {"block": {"type": "cbam"}, "at": "residual"}))
    chain = model.layer1[0].bn2.attnzoo_after
    assert isinstance(chain[0], SqueezeExcite) and isinstance(chain[1], CBAM)
    assert model(X).shape == (2, 1000)


@pytest.mark.parametrize("block", ["se", "cbam", "eca", "simam", "global_context"])
def test_zero_init_keeps_the_backbone_outputs(block):
    bare = live_bare()
    model = attnzoo.create_model(spec({"block": {"type": block}, "at": "residual",
                                       "zero_init": True})).eval()
    model.load_state_dict(bare.state_dict(), strict=False)
    torch.testing.assert_close(model(X), bare(X))
    if block != "global_context":  # GC starts as the identity even without zero_init
        plain = attnzoo.create_model(spec({"block": {"type": block}, "at": "residual"})).eval()
        plain.load_state_dict(bare.state_dict(), strict=False)
        assert not torch.allclose(plain(X), bare(X))


def test_stage_and_block_filters():
    model = attnzoo.create_model("resnet50_gc")
    assert [b.site for b in model.attnzoo_blocks][:2] == ["layer2.0.bn3", "layer2.1.bn3"]
    assert len(model.attnzoo_blocks) == 4 + 6 + 3
    model = attnzoo.create_model(spec({"block": {"type": "se"}, "at": "post_add",
                                       "stages": [2, 3], "blocks": [1]}))
    assert [b.site for b in model.attnzoo_blocks] == ["layer2.1", "layer3.1"]


def test_path_that_matches_nothing_shows_close_paths():
    with pytest.raises(SpecError) as err:
        attnzoo.create_model(spec({"block": {"type": "se"},
                                   "at": {"path": "layer1.0.bn22", "position": "after"}}))
    msg = str(err.value)
    assert "layer1.0.bn22" in msg and "layer1.0.bn2" in msg and "insert[0]" in msg


def test_alias_on_a_non_resnet_is_a_clear_error():
    with pytest.raises(SpecError, match="resnet"):
        attnzoo.create_model(spec({"block": {"type": "se"}, "at": "residual"},
                                  backbone="mobilenetv3_small_050"))


def test_unknown_alias_and_missing_conv3():
    with pytest.raises(SpecError, match="unknown site alias 'middle'"):
        attnzoo.create_model(spec({"block": {"type": "se"}, "at": "middle"}))
    with pytest.raises(SpecError, match="after_conv3"):
        attnzoo.create_model(spec({"block": {"type": "se"}, "at": "after_conv3"}))


def test_filters_that_keep_nothing_are_an_error():
    with pytest.raises(SpecError, match="stages=\\[9\\]"):
        attnzoo.create_model(spec({"block": {"type": "se"}, "at": "residual", "stages": [9]}))


def test_unknown_backbone_suggests_names():
    with pytest.raises(SpecError, match="resnet50"):
        attnzoo.create_model(spec(backbone="resnet5O"))


def test_bad_backbone_arg_is_a_spec_error():
    with pytest.raises(SpecError, match="bad args"):
        attnzoo.create_model(spec(), not_an_arg=1)


def test_unknown_zoo_name():
    with pytest.raises(SpecError, match="resnet50_cbam"):
        attnzoo.create_model("resnet50_cbm")


def test_deepcopy_and_state_dict_round_trip():
    model = attnzoo.create_model("resnet18_cbam").eval()
    clone = copy.deepcopy(model)
    other = attnzoo.create_model("resnet18_cbam").eval()
    other.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(clone(X), model(X))
    torch.testing.assert_close(other(X), model(X))


def test_backward_reaches_inserted_blocks():
    model = attnzoo.create_model("resnet18_cbam")
    for m in model.modules():  # timm zero-inits the last BN of each block; undo it
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    model(X).sum().backward()
    grad = model.layer1[0].bn2.attnzoo_after.channel.fc1.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_block_at_a_site_of_the_wrong_rank_is_refused():
    with pytest.raises(SpecError, match=r"takes 4-D \(N, C, H, W\) tensors.*'fc'.*2-D"):
        attnzoo.create_model(spec({"block": {"type": "se"},
                                   "at": {"path": "fc", "position": "after"}}))


def test_a_two_input_block_cannot_be_inserted_at_one_site():
    for block in ("gau", "ffm"):
        with pytest.raises(SpecError, match=f"'{block}' fuses several inputs"):
            attnzoo.create_model(spec({"block": {"type": block}, "at": "post_add"}))


def test_call_time_args_are_written_into_the_recorded_spec(tmp_path):
    model = attnzoo.create_model("resnet18_cbam", num_classes=7, drop_rate=0.25,
                                 drop_path_rate=0.1).eval()
    recorded = model.attnzoo_spec
    assert recorded.num_classes == 7
    assert recorded.backbone.args == {"drop_rate": 0.25, "drop_path_rate": 0.1}
    assert attnzoo.load_spec("resnet18_cbam").backbone.args == {}  # the zoo's is untouched
    rebuilt = attnzoo.create_model(attnzoo.ModelSpec.from_yaml(recorded.to_yaml()))
    assert rebuilt.drop_rate == 0.25 and rebuilt.fc.out_features == 7
    attnzoo.save_pretrained(model, tmp_path / "saved")
    loaded = attnzoo.create_model(tmp_path / "saved").eval()
    assert loaded.drop_rate == 0.25
    torch.testing.assert_close(loaded(X), model(X))


def test_a_model_built_with_non_yaml_args_is_not_saved(tmp_path):
    model = attnzoo.create_model("resnet18_cbam", act_layer=torch.nn.ReLU6)
    assert model.attnzoo_spec.backbone.args == {}
    with pytest.raises(attnzoo.AttnZooError, match=r"\['act_layer'\].*not plain YAML"):
        attnzoo.save_pretrained(model, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize("name", ["resnet50_cbam", "resnet50_gc"])
def test_spec_file_by_path_builds_the_zoo_model(tmp_path, name):
    path = tmp_path / "mine.yaml"
    path.write_text(attnzoo.load_spec(name).to_yaml())
    from_file = attnzoo.create_model(path).state_dict()
    from_name = attnzoo.create_model(name).state_dict()
    assert {k: v.shape for k, v in from_file.items()} == {
        k: v.shape for k, v in from_name.items()}


def test_resnet50_cbam_forward_with_default_and_custom_classes():
    assert attnzoo.create_model("resnet50_cbam")(X).shape == (2, 1000)
    assert attnzoo.create_model("resnet50_cbam", num_classes=10)(X).shape == (2, 10)


def test_sync_batchnorm_conversion_keeps_the_blocks_running():
    model = attnzoo.create_model("resnet18_cbam").eval()
    for m in model.modules():  # un-zero timm's last BNs so the blocks matter
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    expected = model(X)
    # torch's conversion alone keeps the blocks as children that nothing calls
    plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert not torch.allclose(plain(X), expected)
    assert len(attnzoo.reattach_blocks(plain)) == 8
    torch.testing.assert_close(plain(X), expected)
    synced = attnzoo.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert isinstance(synced.layer1[0].bn2, torch.nn.SyncBatchNorm)
    assert isinstance(synced.layer1[0].bn2.attnzoo_after, CBAM)
    torch.testing.assert_close(synced(X), expected)
    assert attnzoo.reattach_blocks(synced) == []
