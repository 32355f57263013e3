"""The zoo: the spec files shipped with attnzoo, found by name, and what an argument of
``create_model`` / ``load_spec`` names.

Precedence, one rule for every entry point: a ``ModelSpec`` or dict is a spec; a
string starting ``hf-hub:`` is a Hub repo; a ``PathLike``, an absolute path or a
string with a path separator (``./resnet50_se``) is a file or folder; a string with
a newline is YAML text; a zoo name is the zoo model, even when a folder of that name
exists in the working directory; any other ``.yaml``/``.yml`` name is a file.

A saved model on disk (kind ``"folder"``) is a folder written by ``save_pretrained``
or that folder's ``attnzoo.yaml`` itself: a spec file with a ``weights:`` section.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any, Literal

from .errors import SpecError
from .registry import did_you_mean
from .safe_yaml import load_yaml
from .spec import WEIGHTS_KEY, ModelSpec

SourceKind = Literal["spec", "dict", "hub", "folder", "file", "text", "zoo"]
HUB_PREFIX = "hf-hub:"
#: The spec file of a saved folder (the spec plus its ``weights:`` section).
SPEC_FILE = "attnzoo.yaml"


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
        return "folder" if os.path.isdir(source) or is_saved_spec(source) else "file"
    if not isinstance(source, str):
        raise SpecError(f"a model is a zoo name, a path, YAML text, a dict, a ModelSpec or "
                        f"'hf-hub:org/repo', not {type(source).__name__}")
    if "\n" in source:
        return "text"
    files = spec_files()
    if source in files:
        return "zoo"
    if source.endswith((".yaml", ".yml")):
        return "folder" if is_saved_spec(source) else "file"
    folder = (f"; a folder of that name is here: pass './{source}' (or a Path) to load it"
              if os.path.isdir(source) else "")
    raise SpecError(f"unknown model {source[:128]!r}{did_you_mean(source, files)}; "
                    f"`attnzoo list` shows the zoo, or pass a .yaml path{folder}")


def is_saved_spec(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a saved folder's spec file: a YAML mapping with a top-level
    ``weights:`` key (``attnzoo.yaml``, as ``save_pretrained`` writes it). A file that
    cannot be read or parsed is not; reading it as a spec reports why."""
    if not os.path.isfile(path):
        return False
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = load_yaml(text, str(path))
    except (OSError, UnicodeDecodeError, SpecError):
        return False
    return isinstance(data, dict) and WEIGHTS_KEY in data


def saved_spec_path(source: str | os.PathLike[str]) -> Path:
    """The ``attnzoo.yaml`` of a saved model given as its folder or as that file."""
    path = Path(source)
    return path / SPEC_FILE if path.is_dir() else path


def load_spec(source: str | os.PathLike[str] | dict[str, Any] | ModelSpec) -> ModelSpec:
    """A validated ModelSpec from a zoo name, a YAML file path, YAML text, a dict, a
    ModelSpec, or a saved folder (or its ``attnzoo.yaml``: the spec without its
    ``weights:`` section)."""
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
    if kind == "folder":
        path = saved_spec_path(source)
        if not path.is_file():
            raise SpecError(f"{source}: a folder without {SPEC_FILE}; a saved model's folder "
                            "is written by attnzoo.save_pretrained")
        return ModelSpec.from_yaml(path)
    raise SpecError(f"{source}: is a Hub repo, not a spec; attnzoo.create_model loads it")
