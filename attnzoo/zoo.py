"""The zoo: the spec files shipped with attnzoo, found by name."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any

from .errors import SpecError
from .registry import did_you_mean
from .spec import ModelSpec


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


def load_spec(source: str | os.PathLike[str] | dict[str, Any] | ModelSpec) -> ModelSpec:
    """A validated ModelSpec from a zoo name, a YAML file path, YAML text, a dict or a
    ModelSpec."""
    if isinstance(source, ModelSpec):
        return source
    if isinstance(source, dict):
        return ModelSpec.from_dict(source, origin="spec dict")
    if isinstance(source, os.PathLike):
        return ModelSpec.from_yaml(source)
    if not isinstance(source, str):
        raise SpecError(f"a spec is a name, path, dict or ModelSpec, not {type(source).__name__}")
    files = spec_files()
    if source in files:
        return ModelSpec.from_yaml(files[source])
    if "\n" in source or source.endswith((".yaml", ".yml")):
        return ModelSpec.from_yaml(source)
    raise SpecError(f"unknown model {source!r}{did_you_mean(source, files)}; "
                    "`attnzoo list` shows the zoo, or pass a .yaml path")
