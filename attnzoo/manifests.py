"""Zoo weight manifests: ``weights/<model>.yaml`` lists the tags of one zoo model's weights.

Each tag names a safetensors file (in a Hub repo at a pinned revision, or embedded in
the manifests folder) and its sha256. The manifests folder is attnzoo's own
``weights/``; the environment variable ``ATTNZOO_WEIGHTS_DIR`` (or the ``folder``
argument of the functions here) points at another one, e.g. a team's own manifests.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import SpecError, WeightsError, short_list
from .registry import did_you_mean
from .safe_weights import SHA256, check_weights_file_name
from .safe_yaml import load_yaml, read_source
from .validation import format_validation_error
from .zoo import data_dir

WEIGHTS_DIR_ENV = "ATTNZOO_WEIGHTS_DIR"
COMMIT = re.compile(r"^[0-9a-f]{40}$")


class WeightsEntry(BaseModel):
    """One tag of a zoo model's weights: where the file is and what is known about it.

    Unknown facts stay empty (``None``); an entry missing its ``sha256`` (or, for a
    Hub file, its pinned ``revision``) is refused until ``tools/pin_weights.py`` fills it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    repo: str | None = Field(None, description="Hub repo id; empty for a file embedded in "
                             "attnzoo's weights/ folder.")
    revision: str | None = Field(None, description="Pinned 40-hex commit of the repo.")
    file: str = Field("model.safetensors", description="The safetensors file (in the repo, "
                      "or in weights/ when embedded).")
    sha256: str | None = Field(None, description="sha256 of the file, checked before loading.")
    format: Literal["attnzoo", "timm"] = Field(
        "attnzoo", description="Key layout of the file: attnzoo's own, or timm's (renamed "
        "with attnzoo.convert.from_timm after verification).")
    num_classes: int | None = Field(None, description="Classifier outputs of these weights.")
    source: dict[str, Any] = Field(default_factory=dict, description="Provenance: where the "
                                   "weights come from and how they were made.")
    license: str | None = Field(None, description="License of the weights.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Measured metrics "
                                      "(name -> value), with the dataset in `source`.")
    notes: str = Field("", description="Anything else a user should know.")

    @model_validator(mode="after")
    def _check(self) -> WeightsEntry:
        if self.revision is not None and not COMMIT.match(self.revision):
            raise ValueError(f"revision must be a 40-hex commit, got {self.revision!r}")
        if self.sha256 is not None and not SHA256.match(self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        check_weights_file_name(self.file, embedded=self.repo is None)
        return self

    @property
    def pinned(self) -> bool:
        return self.sha256 is not None and (self.repo is None or self.revision is not None)

    def unpinned(self) -> list[str]:
        """The facts a load needs that the entry does not record."""
        needed = ("sha256",) if self.repo is None else ("revision", "sha256")
        return [k for k in needed if getattr(self, k) is None]


class WeightsManifest(BaseModel):
    """``weights/<model>.yaml``: the tags of one zoo model's weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="The zoo model the weights are for.")
    default: str = Field(description="The tag that pretrained=True picks.")
    tags: dict[str, WeightsEntry] = Field(description="tag -> weights entry.")

    @model_validator(mode="after")
    def _default_exists(self) -> WeightsManifest:
        if self.default not in self.tags:
            raise ValueError(f"default tag {self.default!r} is not one of the tags "
                             f"{sorted(self.tags)}")
        return self


def weights_dir() -> Path:
    """The manifests folder: ``$ATTNZOO_WEIGHTS_DIR`` when set, else attnzoo's own
    ``weights/`` (``attnzoo.weights`` in a wheel)."""
    override = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(override) if override else data_dir("weights")


def load_manifest(name: str, folder: str | os.PathLike[str] | None = None
                  ) -> WeightsManifest | None:
    """The manifest of zoo model ``name`` in ``folder`` (default :func:`weights_dir`), or
    None when it has no weights."""
    path = Path(folder or weights_dir()) / f"{name}.yaml"
    if not path.is_file():
        return None
    try:  # a regular file inside the folder, of a spec's size at most
        text, _ = read_source(path, within=path.parent)
        return WeightsManifest.model_validate(load_yaml(text, f"weights manifest {path}"))
    except SpecError as exc:
        raise WeightsError(str(exc)) from None
    except ValidationError as exc:
        raise WeightsError(format_validation_error(
            exc, f"weights manifest {path}", text, model=WeightsManifest,
            what="manifest")) from None


def list_pretrained(pattern: str = "*", folder: str | os.PathLike[str] | None = None
                    ) -> list[str]:
    """``model.tag`` of every weights entry in ``folder`` matching a shell pattern."""
    folder = Path(folder or weights_dir())
    out = []
    for path in sorted(folder.glob("*.yaml")):
        manifest = load_manifest(path.stem, folder)
        if manifest is not None:
            out += [f"{manifest.model}.{tag}" for tag in manifest.tags]
    return [n for n in out if fnmatch.fnmatch(n, pattern)]


def resolve_zoo_weights(model_name: str, pretrained: bool | str,
                        folder: str | os.PathLike[str] | None = None
                        ) -> tuple[str, WeightsEntry]:
    """The (tag, entry) that ``pretrained`` picks for zoo model ``model_name``:
    True = the default tag, ``"tag"`` or ``"model.tag"`` = that tag."""
    folder = Path(folder or weights_dir())
    manifest = load_manifest(model_name, folder)
    if manifest is None:
        have = [p.stem for p in sorted(folder.glob("*.yaml"))]
        raise WeightsError(f"zoo model {model_name!r} has no pretrained weights of its own; "
                           "start it from its backbone's ImageNet weights with "
                           "pretrained_backbone=True (its blocks start as the identity). "
                           f"Models with weights: {short_list(have) or 'none'}")
    if pretrained is True:
        tag = manifest.default
    elif isinstance(pretrained, str) and pretrained:
        tag = pretrained
        if pretrained.startswith(f"{model_name}."):
            tag = pretrained[len(model_name) + 1:]
        elif "." in pretrained and pretrained not in manifest.tags:
            other = pretrained.rsplit(".", 1)[0]
            raise WeightsError(f"weights {pretrained!r} are for model {other!r}, not "
                               f"{model_name!r}; tags of {model_name}: "
                               f"{', '.join(sorted(manifest.tags))}")
    else:
        raise WeightsError(f"pretrained must be True or a tag string, got {pretrained!r}")
    if tag not in manifest.tags:
        raise WeightsError(f"zoo model {model_name!r} has no weights tag {tag!r}"
                           f"{did_you_mean(tag, manifest.tags)}; tags: "
                           f"{', '.join(sorted(manifest.tags))}")
    return tag, manifest.tags[tag]


__all__ = ["WEIGHTS_DIR_ENV", "WeightsEntry", "WeightsManifest", "list_pretrained",
           "load_manifest", "resolve_zoo_weights", "weights_dir"]
