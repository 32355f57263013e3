"""Validation (attnzoo/validation.py): errors name the fields of the model they are
about; a block type is a registered name, never a path; a stranger's huge names get a
short message."""

from __future__ import annotations

import time

import pytest
import yaml

import attnzoo
from attnzoo import SpecError, WeightsError
from attnzoo.manifests import load_manifest
from tests._helpers.specs import spec_error


def test_create_block_typo_lists_the_blocks_fields_and_the_close_match() -> None:
    with pytest.raises(SpecError) as err:
        attnzoo.create_block("se", 64, reductoin=8)
    msg = str(err.value)
    assert "unknown field 'reductoin' (did you mean 'reduction'?)" in msg
    assert "the fields here are reduction, min_channels, divisor" in msg
    assert "backbone" not in msg and "insert" not in msg


def test_manifest_typo_lists_the_manifest_fields(tmp_path) -> None:
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(
        {"model": "m", "defualt": "a", "tags": {"a": {"sha256": "0" * 64,
                                                   "file": "m.safetensors"}}}))
    with pytest.raises(WeightsError) as err:
        load_manifest("m", tmp_path)
    msg = str(err.value)
    assert "invalid manifest" in msg
    assert "unknown field 'defualt' (did you mean 'default'" in msg
    assert "the fields here are model, " \
           "default, tags" in msg


def test_a_manifest_entry_typo_lists_the_entry_fields(tmp_path) -> None:
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(
        {"model": "m", "default": "a", "tags": {"a": {"sha265": "0" * 64}}}))
    with pytest.raises(WeightsError, match=r"tags\.a\.sha265.*did you mean 'sha256'.*the "
                                           r"fields here are repo, revision, file, sha256"):
        load_manifest("m", tmp_path)


@pytest.mark.parametrize("field", ["channels", "in_channels", "size"])
def test_site_fields_are_refused_with_their_own_message(field: str) -> None:
    spec = {"name": "x", "backbone": {"name": "resnet18"},
            "insert": [{"block": {"type": "se", field: 256}, "at": "after_conv2"}]}
    with pytest.raises(SpecError) as err:
        attnzoo.load_spec(spec)
    msg = str(err.value)
    assert f"insert[0].block.se.{field}: " in msg
    assert "taken from the site; remove the field" in msg
    assert "did you mean" not in msg and "min_channels" not in msg


def test_create_block_refuses_site_fields_too() -> None:
    with pytest.raises(SpecError, match="channels are taken from the site; remove the field"):
        attnzoo.create_block("se", 64, in_channels=3)


def test_a_real_field_named_like_a_site_field_is_not_refused() -> None:
    # STN's localisation net has its own `size`-free config; FcaNet takes `dct_size`, not
    # `size`: a field a block really has is validated as usual.
    block = attnzoo.create_block("fca", 64, dct_size=[7, 7], size=(7, 7))
    assert sum(p.numel() for p in block.parameters()) > 0


def test_create_block_validates_config():
    with pytest.raises(SpecError, match="reduction"):
        attnzoo.create_block("se", 64, reduction=-1)
    with pytest.raises(SpecError, match="unknown block type"):
        attnzoo.create_block("nope", 64)


def test_create_block_with_a_non_string_type_is_a_spec_error():
    for bad in (None, 3, ["se"]):
        with pytest.raises(SpecError, match="unknown block type"):
            attnzoo.create_block(bad, 8)


@pytest.mark.parametrize("block_type", ["os.system", "torch.nn.Identity",
                                        "attnzoo.blocks.channel.SqueezeExcite", "__class__",
                                        "SqueezeExcite", "SE", ""])
def test_block_types_are_names_not_paths(block_type):
    with pytest.raises(SpecError, match="block type"):
        attnzoo.create_model({"name": "x", "backbone": {"name": "resnet18"},
                              "insert": [{"block": {"type": block_type}, "at": "residual"}]})


@pytest.mark.parametrize("data", [
    {"name": "x" * 10**6, "backbone": {"name": "resnet18"}},
    {"name": "x", "backbone": {"name": "resnet" * 10**5}},
    {"name": "x", "backbone": {"source": "attnzoo", "name": "tiny" * 10**5}},
    {"name": "x", "backbone": {"name": "resnet18"},
     "insert": [{"block": {"type": "se" * 10**5}, "at": "residual"}]},
    {"name": "x", "backbone": {"name": "resnet18"},
     "insert": [{"block": {"type": "se", "q" * 10**5: 1}, "at": "residual"}]},
    {"name": "x", "backbone": {"name": "resnet18"},
     "insert": [{"block": {"type": "se"}, "at": "residual" * 10**5}]},
    {"name": "x", "backbone": {"name": "resnet18"}, "q" * 10**5: 1},
])
def test_huge_names_are_refused_with_a_short_message(data):
    """Names have length limits, and a stranger's megabyte-long key or value is not
    copied (let alone fuzzy-matched) into the error message."""
    start = time.perf_counter()
    msg = spec_error(data)
    assert len(msg) < 2000
    assert time.perf_counter() - start < 5

