"""Errors say what and where: one test per message.

Specs: the file, the field path, the YAML line, the block type, the site pattern and
the close matches. Weights: the file, and the keys that do not fit.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import attnzoo
from attnzoo import ModelSpec, SpecError, WeightsError
from attnzoo.safe_weights import sha256_file
from tests._helpers.specs import spec_error

BASE = {"name": "x", "backbone": {"name": "resnet18"}}


def _write(tmp_path: Path, text: str, name: str = "my_net.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- spec: file, path, line


def test_bad_value_names_file_field_path_block_type_and_line(tmp_path):
    path = _write(tmp_path, (
        "name: my_net\n"                      # 1
        "backbone: {name: resnet18}\n"        # 2
        "insert:\n"                           # 3
        "  - block: {type: cbam}\n"           # 4
        "    at: residual\n"                  # 5
        "  - block:\n"                        # 6
        "      type: se\n"                    # 7
        "      reduction: -4\n"               # 8
        "    at: residual\n"))                # 9
    msg = spec_error(str(path))
    assert msg.startswith(f"{path}: invalid spec (1 problem(s))")
    assert "insert[1].block.se.reduction (line 8): Input should be greater than or equal to " \
           "0.0625" in msg


def test_every_problem_is_listed_with_its_own_line(tmp_path):
    path = _write(tmp_path, "name: bad name!\nbackbone:\n  name: resnet18\n  source: pip\n"
                  "num_classes: -1\n")
    msg = spec_error(path)
    assert "(3 problem(s))" in msg
    assert re.search(r"^  name \(line 1\): String should match pattern", msg, re.M)
    assert re.search(r"^  backbone\.source \(line 4\): Input should be 'timm', 'attnzoo' or "
                     r"'torchvision'",
                     msg, re.M)
    assert re.search(r"^  num_classes \(line 5\): Input should be greater than or equal to 0",
                     msg, re.M)


def test_missing_field_names_the_mapping_and_its_line(tmp_path):
    path = _write(tmp_path, "name: x\ninsert: []\nbackbone:\n  source: timm\n")
    msg = spec_error(path)
    assert "backbone.name (line 4): Field required" in msg  # the backbone mapping's line


def test_unknown_field_suggests_the_close_one_and_lists_the_fields(tmp_path):
    path = _write(tmp_path, "name: x\nbackbone: {name: resnet18}\ninsert:\n"
                  "  - block: {type: se, reductoin: 8}\n    at: residual\n    stage: [1]\n")
    msg = spec_error(path)
    assert ("insert[0].block.se.reductoin (line 4): unknown field 'reductoin' (did you mean "
            "'reduction'?); the fields here are reduction, min_channels, divisor") in msg
    assert "insert[0].stage (line 6): unknown field 'stage' (did you mean 'stages'?)" in msg


def test_unknown_top_level_and_site_fields(tmp_path):
    msg = spec_error(_write(tmp_path, "name: x\nbackbone: {name: resnet18, arg: {}}\n"
                             "insrt: []\n"))
    assert "backbone.arg (line 2): unknown field 'arg' (did you mean 'args'?)" in msg
    assert "insrt (line 3): unknown field 'insrt' (did you mean 'insert'" in msg
    msg = spec_error({**BASE, "insert": [{"block": {"type": "se"},
                                           "at": {"path": "layer1.*", "positon": "after"}}]})
    assert "insert[0].at.SiteSelector.positon: unknown field 'positon' (did you mean " \
           "'position'" in msg
    assert "the fields here are path, position, layout, prefix_tokens, grid" in msg


def test_unknown_block_type_suggests_close_types_and_lists_all(tmp_path):
    path = _write(tmp_path, "name: x\nbackbone: {name: resnet18}\ninsert:\n"
                  "  - block: {type: cbma}\n    at: residual\n")
    msg = spec_error(path)
    assert "insert[0].block (line 4): unknown block type 'cbma' (did you mean 'cbam'" in msg
    assert ", ".join(attnzoo.list_blocks()) in msg


def test_missing_block_type_says_so():
    msg = spec_error({**BASE, "insert": [{"block": {"reduction": 8}, "at": "residual"}]})
    assert "insert[0].block: a block is a mapping with a `type`, e.g. `type: se`" in msg


def test_unknown_attnzoo_architecture_names_field_line_and_close_names(tmp_path):
    path = _write(tmp_path, "name: x\nbackbone:\n  source: attnzoo\n  name: resattnet56\n")
    msg = spec_error(path)
    assert str(path) in msg
    assert ("backbone.name (line 4): Value error, unknown attnzoo architecture "
            "'resattnet56' (did you mean 'resattnet'") in msg
    assert "attnzoo has bisenetv1, " in msg


def test_unknown_timm_backbone_names_the_spec_and_close_names():
    msg = spec_error({"name": "my_net", "backbone": {"name": "resnet_18"}})
    assert msg.startswith("my_net: backbone timm:resnet_18: timm has no model 'resnet_18' "
                          "(did you mean 'resnet18'")


def test_bad_backbone_args_name_the_spec_and_the_args():
    msg = spec_error({"name": "my_net", "backbone": {"name": "resnet18",
                                                      "args": {"num_clases": 3}}})
    assert msg.startswith("my_net: backbone timm:resnet18: bad args ['num_clases']")
    assert "num_clases" in msg.splitlines()[0]


def test_forbidden_backbone_arg_names_field_and_line(tmp_path):
    path = _write(tmp_path, "name: x\nbackbone:\n  name: resnet18\n  args:\n"
                  "    checkpoint_path: /tmp/evil.pth\n")
    msg = spec_error(path)
    assert "backbone.args (line 5): Value error, backbone args may not set checkpoint_path" \
        in msg


# ------------------------------------------------------------------- spec: YAML itself


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = _write(tmp_path, "name: x\nbackbone: {name: resnet18\ninsert: []\n")
    msg = spec_error(path)
    assert msg.startswith(f"{path}: not valid YAML (safe subset)")
    assert "line 3" in msg


def test_key_given_twice_names_file_and_both_lines(tmp_path):
    path = _write(tmp_path, "name: x\nbackbone:\n  name: resnet18\n  args: {}\n"
                  "  name: resnet50\n")
    msg = spec_error(path)
    assert msg.startswith(f"{path}: not valid YAML")
    assert "found the key 'name' twice (first on line 3)" in msg
    assert "line 5" in msg


def test_refused_tag_names_file_tag_and_line(tmp_path):
    path = _write(tmp_path, "name: x\nbackbone:\n  name: !!python/name:os.system ''\n")
    msg = spec_error(path)
    assert msg.startswith(f"{path}: not valid YAML")
    assert "python/name:os.system" in msg and "line 3" in msg
    path = _write(tmp_path, "name: x\nbackbone: {name: resnet18}\ntags: !!set {a}\n", "set.yaml")
    msg = spec_error(path)
    assert "tag 'tag:yaml.org,2002:set' is not allowed in a spec" in msg and "line 3" in msg


def test_not_a_mapping_names_the_file(tmp_path):
    path = _write(tmp_path, "- name: x\n")
    assert spec_error(path) == f"{path}: a spec must be a YAML mapping, got list"


def test_unreadable_spec_files_are_named(tmp_path):
    msg = spec_error(str(tmp_path / "absent.yaml"))
    assert msg.startswith(f"cannot read spec file {tmp_path / 'absent.yaml'}")
    path = tmp_path / "bytes.yaml"
    path.write_bytes(b"name: \xff\n")
    assert spec_error(path).startswith(f"{path}: a spec file is UTF-8 text")


def test_unknown_zoo_model_suggests_close_names():
    msg = spec_error("resnet18_cbma")
    assert msg.startswith("unknown model 'resnet18_cbma' (did you mean 'resnet18_cbam'")
    assert "`attnzoo list`" in msg


# ------------------------------------------------------------------------- spec: sites


def test_site_path_that_matches_nothing_names_pattern_block_and_close_paths():
    msg = spec_error({**BASE, "insert": [
        {"block": {"type": "se"}, "at": "residual"},
        {"block": {"type": "cbam"}, "at": {"path": "layer5.*"}},
    ]})
    assert msg.startswith("x: insert[1] (cbam): site path 'layer5.*' matches no module of "
                          "ResNet; close paths: ")
    assert "layer4.0" in msg and "layer4.1" in msg


def test_site_path_typo_suggests_the_real_path():
    msg = spec_error({**BASE, "insert": [{"block": {"type": "se"},
                                           "at": {"path": "layer1.0.con2"}}]})
    assert "site path 'layer1.0.con2' matches no module" in msg
    assert "close paths: layer1.0.conv2" in msg


def test_unknown_alias_lists_the_aliases():
    msg = spec_error({**BASE, "insert": [{"block": {"type": "se"}, "at": "residul"}]})
    assert msg == ("x: insert[0] (se): unknown site alias 'residul'; resnet aliases are "
                   "after_conv1, after_conv2, after_conv3, residual, post_add, or give "
                   "{path, position}")


def test_alias_of_a_basic_block_that_it_lacks():
    msg = spec_error({**BASE, "insert": [{"block": {"type": "se"}, "at": "after_conv3"}]})
    assert "site alias 'after_conv3' does not exist in BasicBlock (layer1.0); it has " \
           "after_conv1, after_conv2, post_add, residual" in msg


def test_alias_on_a_non_resnet_says_to_use_a_path():
    msg = spec_error({"name": "v", "backbone": {"name": "vit_tiny_patch16_224"},
                       "insert": [{"block": {"type": "se"}, "at": "residual"}]})
    assert "v: insert[0] (se): site alias 'residual' needs a resnet-family backbone" in msg
    assert "VisionTransformer has no resnet blocks" in msg and "{path: <glob>" in msg


def test_filters_that_keep_nothing_name_the_pattern_and_filters():
    msg = spec_error({**BASE, "insert": [{"block": {"type": "se"}, "at": "residual",
                                           "stages": [7], "blocks": [0]}]})
    assert msg.startswith("x: insert[0] (se): stages=[7]: stage 7 out of range; ResNet has "
                          "stages 1, 2, 3, 4 (numbered from 1)")
    msg = spec_error({**BASE, "insert": [{"block": {"type": "se"},
                                           "at": {"path": "layer1.*"}, "stages": [2]}]})
    assert "x: insert[0] (se): path 'layer1.*' matches modules, but none in stages=[2]" in msg


def test_block_that_cannot_take_the_site_tensor_names_block_site_and_ranks():
    # Token sites now take CBAM (converted to NCHW and back); a vector site cannot.
    msg = spec_error({"name": "v", "backbone": {"name": "vit_tiny_patch16_224"},
                       "insert": [{"block": {"type": "cbam"}, "at": {"path": "head"}}]})
    assert msg.startswith("v: insert[0] (cbam): ") and "'head'" in msg and "vectors" in msg


def test_block_that_cannot_be_built_at_a_site_names_block_site_and_channels():
    msg = spec_error({**BASE, "insert": [{"block": {"type": "multi_head_attention",
                                                     "num_heads": 7},
                                           "at": {"path": "layer1.0"}}]})
    assert msg.startswith("x: insert[0] (multi_head_attention): cannot build at layer1.0 "
                          "(after, 64 channels): 64 channels do not split into 7 heads")


def test_fusion_block_at_a_single_site_says_why():
    msg = spec_error({**BASE, "insert": [{"block": {"type": "gau"}, "at": "post_add"}]})
    assert "x: insert[0] (gau): block 'gau' fuses several inputs and cannot be inserted " \
           "at one site (layer1.0)" in msg


# ------------------------------------------------------------------------ create_block


def test_create_block_errors_name_the_block():
    with pytest.raises(SpecError, match=r"unknown block type 'sq' \(did you mean 'sk', 'se'"):
        attnzoo.create_block("sq", 64)
    with pytest.raises(SpecError) as err:
        attnzoo.create_block("se", 64, reduction=-1)
    assert str(err.value).startswith("block 'se': invalid block config")
    assert "reduction: Input should be greater than or equal to 0.0625" in str(err.value)
    with pytest.raises(SpecError, match=r"^block 'multi_head_attention' cannot be built for "
                                        r"30 channels: 30 channels do not split into 8 heads"):
        attnzoo.create_block("multi_head_attention", 30, num_heads=8)


# -------------------------------------------------------------------------- weights


@pytest.fixture(scope="module")
def resnet_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "resnet10t_se"
    model = attnzoo.create_model({"name": "r10_se", "backbone": {"name": "resnet10t"},
                                  "insert": [{"block": {"type": "se"}, "at": "residual"}]},
                                 num_classes=4)
    attnzoo.save_pretrained(model, folder)
    return folder


def _tamper(resnet_folder: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``resnet_folder`` whose weights ``edit`` changed, re-pinned so that only the
    content is wrong."""
    folder = tmp_path / "tampered"
    folder.mkdir()
    state = load_file(str(resnet_folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))
    data = yaml.safe_load((resnet_folder / "attnzoo.yaml").read_text())
    data["weights"]["sha256"] = sha256_file(folder / "model.safetensors")
    (folder / "attnzoo.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


def _weights_error(source) -> str:
    with pytest.raises(WeightsError) as err:
        attnzoo.create_model(str(source))
    return str(err.value)


def test_shape_mismatch_names_file_key_and_both_shapes(resnet_folder, tmp_path):
    def edit(state):
        state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)

    folder = _tamper(resnet_folder, tmp_path, edit)
    msg = _weights_error(folder)
    assert f"{folder} (model.safetensors)" in msg
    assert "shape mismatch: layer1.0.conv1.weight (file (3, 3, 3, 3), model " in msg


def test_missing_and_unexpected_keys_are_named(resnet_folder, tmp_path):
    def edit(state):
        del state["layer1.0.bn1.weight"]
        state["layer9.evil"] = torch.zeros(1)

    folder = _tamper(resnet_folder, tmp_path, edit)
    msg = _weights_error(folder)
    assert f"{folder} (model.safetensors)" in msg
    assert "missing from the file: layer1.0.bn1.weight" in msg
    assert "not in the model: layer9.evil" in msg


def test_missing_inserted_blocks_are_named(resnet_folder, tmp_path):
    def edit(state):
        for key in [k for k in state if ".attnzoo_after." in k]:
            del state[key]

    msg = _weights_error(_tamper(resnet_folder, tmp_path, edit))
    assert re.search(r"missing from the file: layer\d\.\d\.bn\d\.attnzoo_after\.", msg)


def test_many_bad_keys_are_listed_then_counted(resnet_folder, tmp_path):
    def edit(state):
        for i in range(20):
            state[f"extra.{i}"] = torch.zeros(1)

    msg = _weights_error(_tamper(resnet_folder, tmp_path, edit))
    assert "not in the model: extra.0, " in msg and "(12 more)" in msg


def test_sha256_mismatch_names_the_file_and_both_hashes(resnet_folder, tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "attnzoo.yaml").write_text((resnet_folder / "attnzoo.yaml").read_text())
    blob = bytearray((resnet_folder / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(blob))
    msg = _weights_error(folder)
    assert "model.safetensors" in msg and str(folder) in msg
    assert sha256_file(folder / "model.safetensors") in msg
    assert yaml.safe_load((resnet_folder / "attnzoo.yaml").read_text())["weights"]["sha256"] in msg


def test_lying_header_names_the_file_and_the_tensor(resnet_folder, tmp_path):
    folder = tmp_path / "lying"
    folder.mkdir()
    blob = (resnet_folder / "model.safetensors").read_bytes()
    header = blob[8:8 + int.from_bytes(blob[:8], "little")]
    lie = header.replace(b'"F32"', b'"F64"', 1)
    (folder / "model.safetensors").write_bytes(blob[:8] + lie + blob[8 + len(header):])
    data = yaml.safe_load((resnet_folder / "attnzoo.yaml").read_text())
    data["weights"]["sha256"] = sha256_file(folder / "model.safetensors")
    (folder / "attnzoo.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    msg = _weights_error(folder)
    assert f"{folder / 'model.safetensors'}: tensor '" in msg
    assert "of F64 needs" in msg


def test_pickle_named_in_a_spec_names_the_file(resnet_folder, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    data = yaml.safe_load((resnet_folder / "attnzoo.yaml").read_text())
    data["weights"]["file"] = "pytorch_model.bin"
    (folder / "attnzoo.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    msg = _weights_error(folder)
    assert "pytorch_model.bin" in msg and "pickle" in msg and "attnzoo.yaml" in msg


def test_unknown_weights_tag_lists_the_tags():
    with pytest.raises(WeightsError) as err:
        attnzoo.create_model("digits_cbam_tiny", pretrained="sklearn_digit")
    assert str(err.value).startswith("zoo model 'digits_cbam_tiny' has no weights tag "
                                     "'sklearn_digit' (did you mean 'sklearn_digits'?)")


def test_model_without_weights_lists_the_ones_that_have_them():
    with pytest.raises(WeightsError) as err:
        attnzoo.create_model("resnet18_se", pretrained=True)
    assert str(err.value).startswith(
        "zoo model 'resnet18_se' has no pretrained weights of its own; start it from its "
        "backbone's ImageNet weights with pretrained_backbone=True")
    assert "Models with weights: digits_cbam_tiny, " in str(err.value)
    assert "more)" in str(err.value)  # the list is cut: the zoo has dozens


def test_spec_error_is_a_value_error_and_both_are_attnzoo_errors():
    assert issubclass(SpecError, ValueError)
    assert issubclass(SpecError, attnzoo.AttnZooError)
    assert issubclass(WeightsError, attnzoo.AttnZooError)
    with pytest.raises(ValueError):
        ModelSpec.from_dict({"name": "x"})
