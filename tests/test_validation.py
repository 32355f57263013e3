"""Validation errors name the fields of the model they are about."""

from __future__ import annotations

import pytest
import yaml

import attnzoo
from attnzoo import SpecError, WeightsError
from attnzoo.manifests import load_manifest


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
