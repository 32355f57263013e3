"""The zoo: the spec files shipped with attnzoo, found by name, and what an argument of
``create_model`` / ``load_spec`` names.

Precedence, one rule for every entry point: a ``ModelSpec`` or dict is a spec; a
string starting ``hf-hub:`` is a Hub repo; a ``PathLike``, an absolute path or a
string with a path separator (``./resnet50_se``) is a file or folder; a string with
a newline is YAML text; a zoo name is the zoo model, even when a folder of that name
exists in the working directory; any other ``.yaml``/``.yml`` name is a file.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any, Literal

from .errors import SpecError
from .registry import did_you_mean
from .spec import ModelSpec

SourceKind = Literal["spec", "dict", "hub", "folder", "file", "text", "zoo"]
HUB_PREFIX = "hf-hub:"


def data_dir(name: str) -> Path:
    """The ``specs`` or ``weights`` folder: inside the package in an installed wheel,
    beside it in a source checkout (and an editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / name, here.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"attnzoo's {name}/ folder is missing from {here}")


def spec_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(data_dir("specs").glob("*.yaml"))}


def list_models(pattern: str = "*") -> list[str]:
    """Zoo model names matching a shell-style pattern, e.g. ``list_models("*cbam*")``."""
    return [n for n in spec_files() if fnmatch.fnmatch(n, pattern)]


def _is_path(text: str) -> bool:
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return os.path.isabs(text) or any(s in text for s in seps)


def classify_source(source: Any) -> SourceKind:
    """What ``source`` names (see the module docstring for the precedence)."""
    if isinstance(source, ModelSpec):
        return "spec"
    if isinstance(source, dict):
        return "dict"
    if isinstance(source, str) and source.startswith(HUB_PREFIX):
        return "hub"
    if isinstance(source, os.PathLike) or isinstance(source, str) and (
            "\n" not in source and _is_path(source)):
        return "folder" if os.path.isdir(source) else "file"
    if not isinstance(source, str):
        raise SpecError(f"a model is a zoo name, a path, YAML text, a dict, a ModelSpec or "
                        f"'hf-hub:org/repo', not {type(source).__name__}")
    if "\n" in source:
        return "text"
    files = spec_files()
    if source in files:
        return "zoo"
    if source.endswith((".yaml", ".yml")):
        return "file"
    folder = (f"; a folder of that name is here: pass './{source}' (or a Path) to load it"
              if os.path.isdir(source) else "")
    raise SpecError(f"unknown model {source[:128]!r}{did_you_mean(source, files)}; "
                    f"`attnzoo list` shows the zoo, or pass a .yaml path{folder}")


def load_spec(source: str | os.PathLike[str] | dict[str, Any] | ModelSpec) -> ModelSpec:
    """A validated ModelSpec from a zoo name, a YAML file path, YAML text, a dict or a
    ModelSpec."""
    kind = classify_source(source)
    if kind == "spec":
        return source
    if kind == "dict":
        return ModelSpec.from_dict(source, origin="spec dict")
    if kind == "zoo":
        return ModelSpec.from_yaml(spec_files()[source])
    if kind == "file":
        return ModelSpec.from_yaml(Path(source))
    if kind == "text":
        return ModelSpec.from_yaml(source)
    raise SpecError(f"{source}: is a {'saved folder' if kind == 'folder' else 'Hub repo'}, "
                    "not a spec; attnzoo.create_model loads it")
