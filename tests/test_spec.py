"""The spec format (attnzoo/spec.py): validation, errors that say where, lossless YAML
round trips, names that are names (never paths), and the JSON Schema that `attnzoo
schema` prints for editors."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import attnzoo
from attnzoo import ModelSpec, SpecError
from attnzoo.cli import main
from attnzoo.zoo import spec_files

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


def test_safe_dump_of_spec_has_no_python_tags():
    for name in attnzoo.list_models():
        text = attnzoo.load_spec(name).to_yaml()
        assert "!!" not in text
        assert ModelSpec.from_yaml(text) == attnzoo.load_spec(name)


# --- names, not paths; no weights ----------------------------------------------------------


@pytest.mark.parametrize("source", ["tensorflow", "python", "os.system", "file", "hf-hub",
                                    "ATTNZOO", ""])
def test_unknown_backbone_source_is_refused(source):
    with pytest.raises(SpecError, match="source"):
        ModelSpec.from_dict({"name": "x", "backbone": {"source": source, "name": "resnet18"}})


@pytest.mark.parametrize("name", ["os.system", "torch.nn.Linear", "__import__('os')",
                                  "../../etc/passwd", "resnet18; rm -rf /",
                                  "hf-hub:timm/resnet18.a1_in1k", "local-dir:/tmp",
                                  "timm.models.resnet.resnet18", "attnzoo.builder.build_model"])
@pytest.mark.parametrize("source", ["timm", "attnzoo"])
def test_backbone_names_are_names_not_paths(name, source):
    with pytest.raises(SpecError):
        attnzoo.create_model({"name": "x", "backbone": {"source": source, "name": name}})


def test_spec_cannot_ask_timm_to_download_or_load_a_file():
    for key in ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay",
                "cache_dir"):
        with pytest.raises(SpecError, match=key):
            attnzoo.create_model({"name": "x", "backbone": {"name": "resnet18",
                                                            "args": {key: "/etc/passwd"}}})


def test_site_paths_have_a_length_limit():
    with pytest.raises(SpecError, match=r"at\.SiteSelector\.path"):
        ModelSpec.from_dict({"name": "x", "backbone": {"name": "resnet18"},
                             "insert": [{"block": {"type": "se"},
                                         "at": {"path": "a" * 10_000}}]})


# --- the JSON Schema (`attnzoo schema`) ------------------------------------------------
#
# The schema editors use for spec files accepts every zoo spec and rejects what the
# builder would reject.


SPEC_FILES = spec_files()


SCHEMA_BASE = {
    "name": "resnet18_cbam_test",
    "backbone": {"source": "timm", "name": "resnet18"},
    "insert": [{"block": {"type": "cbam", "reduction": 16}, "at": "residual"}],
}


@pytest.fixture(scope="module")
def validator() -> Any:
    """A Draft 2020-12 validator for the schema the CLI prints (pydantic's dialect)."""
    jsonschema = pytest.importorskip("jsonschema")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["schema"]) == 0
    schema = json.loads(out.getvalue())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator: Any, data: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(data)]


def test_the_zoo_has_specs():
    assert len(SPEC_FILES) >= 30


@pytest.mark.parametrize("name", sorted(SPEC_FILES))
def test_every_zoo_spec_validates(validator, name: str):
    data = yaml.safe_load(Path(SPEC_FILES[name]).read_text(encoding="utf-8"))
    assert _errors(validator, data) == []


def test_a_spec_written_back_by_to_yaml_validates(validator):
    spec = attnzoo.load_spec("resnet50_gsop")
    assert _errors(validator, yaml.safe_load(spec.to_yaml())) == []
    assert _errors(validator, spec.model_dump(mode="json")) == []


def test_the_base_spec_is_valid(validator):
    assert _errors(validator, SCHEMA_BASE) == []


def _bad(path: tuple[Any, ...], value: Any, delete: bool = False) -> dict[str, Any]:
    data = copy.deepcopy(SCHEMA_BASE)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return data


@pytest.mark.parametrize(("what", "data"), [
    ("unknown block type", _bad(("insert", 0, "block", "type"), "cbam2")),
    ("extra block field", _bad(("insert", 0, "block", "reductoin"), 8)),
    ("extra top-level field", _bad(("pretrained_path",), "/tmp/x.pth")),
    ("extra backbone field", _bad(("backbone", "checkpoint"), "x")),
    ("wrong type of a block field", _bad(("insert", 0, "block", "reduction"), "sixteen")),
    ("wrong type of num_classes", _bad(("num_classes",), "ten")),
    ("negative num_classes", _bad(("num_classes",), -1)),
    ("unknown backbone source", _bad(("backbone", "source"), "tensorflow")),
    ("unknown site position", _bad(("insert", 0, "at"), {"path": "layer1.*", "position": "in"})),
    ("input_size of two numbers", _bad(("input_size",), [224, 224])),
    ("stages not a list", _bad(("insert", 0, "stages"), 2)),
    ("missing backbone", _bad(("backbone",), None, delete=True)),
    ("missing block type", _bad(("insert", 0, "block", "type"), None, delete=True)),
    ("name with a slash", _bad(("name",), "../evil")),
])
def test_bad_specs_are_rejected_by_the_schema_and_by_pydantic(validator, what: str, data):
    assert _errors(validator, data), f"the schema accepts a spec with {what}"
    with pytest.raises(attnzoo.SpecError):
        attnzoo.load_spec(data)

