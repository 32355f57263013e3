"""`attnzoo schema`: the JSON Schema editors use for spec files accepts every zoo spec
and rejects what the builder would reject."""

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
from attnzoo.cli import main
from attnzoo.zoo import spec_files

jsonschema = pytest.importorskip("jsonschema")

SPEC_FILES = spec_files()
BASE = {
    "name": "resnet18_cbam_test",
    "backbone": {"source": "timm", "name": "resnet18"},
    "insert": [{"block": {"type": "cbam", "reduction": 16}, "at": "residual"}],
}


@pytest.fixture(scope="module")
def validator() -> Any:
    """A Draft 2020-12 validator for the schema the CLI prints (pydantic's dialect)."""
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
    assert _errors(validator, BASE) == []


def _bad(path: tuple[Any, ...], value: Any, delete: bool = False) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
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
    ("unknown backbone source", _bad(("backbone", "source"), "torchvision")),
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
