"""The spec format: validation, errors that say where, lossless YAML round trips."""

from __future__ import annotations

import pytest

import attnzoo
from attnzoo import ModelSpec, SpecError

BASE = """\
name: demo
backbone: {name: resnet18}
insert:
  - block: {type: se, reduction: 8}
    at: residual
    stages: [3, 4]
  - block: {type: cbam}
    at: {path: "layer4.*", position: after}
    zero_init: true
"""


def test_round_trip_is_lossless_for_every_zoo_spec():
    for name in attnzoo.list_models():
        spec = attnzoo.load_spec(name)
        again = ModelSpec.from_yaml(spec.to_yaml())
        assert again == spec, name
        assert again.to_yaml() == spec.to_yaml()


def test_round_trip_keeps_selectors_filters_and_flags():
    spec = ModelSpec.from_yaml(BASE)
    assert spec.insert[0].block.reduction == 8
    assert spec.insert[1].at.path == "layer4.*" and spec.insert[1].zero_init
    assert ModelSpec.from_yaml(spec.to_yaml()) == spec


def test_block_fields_default_to_the_paper():
    spec = ModelSpec.from_yaml(BASE)
    cbam = spec.insert[1].block
    assert (cbam.reduction, cbam.spatial_kernel) == (16, 7)


def test_unknown_block_key_is_an_error_with_path_and_line():
    text = BASE.replace("reduction: 8", "reductio: 8")
    with pytest.raises(SpecError) as err:
        ModelSpec.from_yaml(text)
    msg = str(err.value)
    assert "insert[0].block" in msg and "reductio" in msg and "line 4" in msg


def test_unknown_block_type_names_the_choices():
    with pytest.raises(SpecError) as err:
        ModelSpec.from_yaml(BASE.replace("type: se", "type: sse"))
    assert "sse" in str(err.value) and "'se'" in str(err.value)


def test_spec_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BASE.replace("name: demo", "name: demo\ncolour: red"))
    with pytest.raises(SpecError) as err:
        ModelSpec.from_yaml(path)
    assert str(path) in str(err.value) and "colour" in str(err.value)


def test_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec file"):
        ModelSpec.from_yaml(tmp_path / "nope.yaml")


def test_python_yaml_tags_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    text = BASE + f'extra: !!python/object/apply:os.system ["touch {marker}"]\n'
    with pytest.raises(SpecError, match="not valid YAML"):
        ModelSpec.from_yaml(text)
    assert not marker.exists()


@pytest.mark.parametrize("arg", ["pretrained", "checkpoint_path", "pretrained_cfg_overlay"])
def test_backbone_args_cannot_load_weights(arg):
    with pytest.raises(SpecError, match=arg):
        ModelSpec.from_dict({"name": "x", "backbone": {"name": "resnet18", "args": {arg: True}}})


def test_spec_is_immutable():
    spec = ModelSpec.from_yaml(BASE)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        spec.name = "other"


def test_json_schema_lists_every_block_type():
    schema = ModelSpec.model_json_schema()
    text = str(schema)
    for block in attnzoo.list_blocks():
        assert f"'{block}'" in text
