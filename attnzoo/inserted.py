"""A model changed by :func:`attnzoo.insert`, saved and loaded back.

``attnzoo.save_pretrained(model, folder)`` on such a model writes:

- ``model.safetensors``: its whole state dict, the model's own tensors and the blocks';
- ``attnzoo_insert.yaml``: the model's class (a name, checked on loading, never
  imported), each ``insert`` call's insertions and input size, and the weights file
  with its sha256;
- ``README.md``: what the folder holds and how to load it.

A file cannot make an instance of your class, and attnzoo never imports a path that
a file names, so loading takes a fresh instance that you build (same class, same
arguments): ``attnzoo.load_inserted(MyNet(...), folder)`` checks its class against the
record, inserts the blocks again (the same names, at the same input size) and loads
every tensor after checking the file's sha256. ``create_model(folder)`` says so when
given such a folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, PositiveInt, ValidationError
from torch import nn

from .any_model import insert
from .atomic import FolderLock, interrupted_save
from .errors import AttnZooError, SpecError, WeightsError
from .loading import load_checked
from .safe_weights import check_weights_file_name, read_verified
from .safe_yaml import load_yaml, read_source
from .spec import Insertion, _Strict
from .validation import format_validation_error

INSERT_FILE = "attnzoo_insert.yaml"


class _Call(_Strict):
    input_size: tuple[PositiveInt, PositiveInt, PositiveInt]
    insert: list[Insertion] = Field(min_length=1)


class _WeightsRef(_Strict):
    file: str = Field(max_length=256)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class InsertRecord(_Strict):
    """``attnzoo_insert.yaml``."""

    model_class: str = Field(max_length=512, description="module.QualName of the model")
    insertions: list[_Call] = Field(min_length=1)
    weights: _WeightsRef


def class_name(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def is_inserted(model: nn.Module) -> bool:
    """Whether ``model`` was changed by ``attnzoo.insert`` (and not built from a spec)."""
    return getattr(model, "attnzoo_spec", None) is None and bool(
        getattr(model, "attnzoo_insertions", None))


def record_text(model: nn.Module, weights: dict[str, Any]) -> str:
    """The ``attnzoo_insert.yaml`` of ``model`` with its weights file ``weights``
    (``{file, sha256}``)."""
    data = {
        "model_class": class_name(model),
        "insertions": [{"input_size": list(call["input_size"]),
                        "insert": [i.model_dump(mode="json", exclude_defaults=True)
                                   for i in call["insert"]]}
                       for call in model.attnzoo_insertions],
        "weights": dict(weights),
    }
    head = (f"# attnzoo blocks inserted into a {type(model).__name__}. Load with\n"
            f"# attnzoo.load_inserted(<a new {type(model).__name__} built as this one was>, "
            "<this folder>).\n")
    return head + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def card_text(model: nn.Module, weights: dict[str, Any]) -> str:
    """The folder's README.md."""
    blocks = getattr(model, "attnzoo_blocks", [])
    types = sorted({b.block_type for b in blocks})
    name = type(model).__name__
    return "\n".join([
        f"# {name} with attnzoo blocks", "",
        f"`{class_name(model)}` with {len(blocks)} attention block(s) inserted by "
        f"`attnzoo.insert` ({', '.join(types) or 'none'}); "
        f"{sum(p.numel() for p in model.parameters()):,} parameters.", "",
        "## Usage", "", "```python", "import attnzoo", "",
        f"model = {name}(...)  # built with the same arguments as the saved one",
        'attnzoo.load_inserted(model, "path/to/this/folder")', "```", "",
        f"`{INSERT_FILE}` lists the insertions; `{weights['file']}` holds every tensor "
        f"(sha256 `{weights['sha256']}`, checked before loading).", ""])


def read_record(folder: Path) -> InsertRecord:
    path = folder / INSERT_FILE
    text, origin = read_source(path, within=folder)
    data = load_yaml(text, origin)
    try:
        return InsertRecord.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, origin, text, model=InsertRecord,
                                                what="insert record")) from None


def load_inserted(model: nn.Module, folder: str | os.PathLike[str], *,
                  check_class: bool = True) -> nn.Module:
    """Put the blocks and weights of a folder that ``save_pretrained`` wrote for an
    ``insert``-ed model into ``model``, a fresh instance of the saved model's class
    built with the same arguments; return it.

    The class is checked against the record (``check_class=False`` skips it, e.g.
    after the class moved to another module); the insertions are applied as
    :func:`attnzoo.insert` did; the weights are loaded after their sha256 is checked,
    and every tensor must fit (WeightsError otherwise, the model's weights untouched).
    """
    folder = Path(folder)
    if not (folder / INSERT_FILE).is_file():
        raise WeightsError(f"{folder}: no {INSERT_FILE}; it is written by "
                           "attnzoo.save_pretrained for a model changed by attnzoo.insert")
    with FolderLock(folder, exclusive=False):
        problem = interrupted_save(folder, INSERT_FILE)
        if problem:
            raise WeightsError(problem)
        record = read_record(folder)
    if check_class and class_name(model) != record.model_class:
        raise AttnZooError(f"{folder}: holds blocks inserted into a {record.model_class}, "
                           f"not a {class_name(model)}; pass a new instance of that class "
                           "(or check_class=False if it only moved)")
    try:
        check_weights_file_name(record.weights.file)
    except ValueError as exc:
        raise WeightsError(f"{folder / INSERT_FILE}: weights.file: {exc}") from None
    for call in record.insertions:
        insert(model, call.insert, input_size=tuple(call.input_size))
    where = f"{folder} ({record.weights.file})"
    with FolderLock(folder, exclusive=False):
        state = read_verified(folder / record.weights.file, record.weights.sha256, where,
                              within=folder)
    load_checked(model, state, where)
    model.attnzoo_weights = {"sha256": record.weights.sha256,
                             "loaded_from": {"folder": str(folder)}}
    return model


__all__ = ["INSERT_FILE", "InsertRecord", "card_text", "class_name", "is_inserted",
           "load_inserted", "record_text"]
