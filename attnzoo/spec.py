"""Pydantic models of a spec: which backbone, which blocks, and where they go.

A spec is data only. It is read with ``yaml.safe_load``; it names registered
blocks and backbones, never a Python path; nothing in it is evaluated.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .blocks import block_union
from .errors import SpecError

Position = Literal["after", "before", "replace"]
BlockUnion = block_union()
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
_FORBIDDEN_BACKBONE_ARGS = {
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
    "cache_dir", "scriptable", "exportable", "no_jit",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneSpec(_Strict):
    """The network that blocks are inserted into."""

    source: Literal["timm", "attnzoo"] = Field(
        "timm", description="Where the backbone comes from: a timm model name, or an "
        "attnzoo architecture (attnzoo/architectures/)."
    )
    name: str = Field(description="The backbone's registered name, e.g. 'resnet50'.",
                      pattern=_NAME)
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments forwarded to the backbone factory (plain YAML values).",
    )

    @field_validator("args")
    @classmethod
    def _no_loading_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        bad = sorted(_FORBIDDEN_BACKBONE_ARGS & set(args))
        if bad:
            raise ValueError(
                f"backbone args may not set {', '.join(bad)}: weights are loaded by attnzoo "
                "(create_model(..., pretrained=...)), never by a path or flag in a spec"
            )
        return args


class SiteSelector(_Strict):
    """A site by module path: a dotted glob where ``*`` matches one path segment
    and ``**`` any number of segments (``layer3.*`` = the blocks of layer3)."""

    path: str = Field(description="Dotted module-path glob, e.g. 'layer3.*' or '**.conv2'.")
    position: Position = Field(
        "after", description="Insert after the module, before it, or replace it."
    )


class Insertion(_Strict):
    """One block type inserted at every site that ``at`` and the filters select."""

    block: BlockUnion = Field(description="The block and its config, chosen by its `type`.")
    at: str | SiteSelector = Field(
        description="A site alias of the backbone family (resnet: after_conv1, after_conv2, "
        "after_conv3, residual, post_add) or a {path, position} selector."
    )
    stages: list[int] | None = Field(
        None, description="Keep only sites in these stages (resnet: layer1..layer4 = 1..4)."
    )
    blocks: list[int] | None = Field(
        None, description="Keep only sites in these block indices within a stage (0-based)."
    )
    zero_init: bool = Field(
        False, description="Start the inserted block as the identity, so a pretrained "
        "backbone keeps its outputs until fine-tuned.",
    )


class ModelSpec(_Strict):
    """A whole model: a backbone plus attention blocks and where they go."""

    name: str = Field(description="The model's name, e.g. 'resnet50_cbam'.", pattern=_NAME)
    description: str = Field("", description="One line on what the model is.")
    paper: str | None = Field(None, description="The paper the model follows (a URL).")
    backbone: BackboneSpec
    insert: list[Insertion] = Field(
        default_factory=list, description="Blocks to insert, applied in order."
    )
    num_classes: int | None = Field(
        None, ge=0, description="Classifier outputs; the backbone's default when unset."
    )
    input_size: tuple[int, int, int] | None = Field(
        None, description="(C, H, W) the model is made for; the backbone's default when unset. "
        "The shape probe runs at this size.",
    )
    license: str | None = Field(None, description="License of the model and its weights.")
    tags: list[str] = Field(default_factory=list, description="Free-form tags.")

    @classmethod
    def from_yaml(cls, source: str | os.PathLike[str]) -> ModelSpec:
        """Read a spec from YAML text or from a ``.yaml``/``.yml`` file path."""
        text, origin = _read_source(source)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"{origin}: not valid YAML (safe subset): {exc}") from None
        if not isinstance(data, dict):
            raise SpecError(f"{origin}: a spec must be a YAML mapping, got {type(data).__name__}")
        return cls.from_dict(data, origin=origin, text=text)

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "spec", text: str | None = None
                  ) -> ModelSpec:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SpecError(format_validation_error(exc, origin, text)) from None

    def to_yaml(self) -> str:
        """The spec as YAML; ``ModelSpec.from_yaml(spec.to_yaml()) == spec``."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def _read_source(source: str | os.PathLike[str]) -> tuple[str, str]:
    if isinstance(source, os.PathLike) or (
        isinstance(source, str) and "\n" not in source
        and source.endswith((".yaml", ".yml"))
    ):
        path = Path(source)
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            raise SpecError(f"cannot read spec file {path}: {exc.strerror}") from None
    return str(source), "spec"


def format_validation_error(exc: ValidationError, origin: str, text: str | None = None) -> str:
    """One line per problem: where (field path, and YAML line when known) and what."""
    lines = [f"{origin}: invalid spec ({exc.error_count()} problem(s))"]
    for err in exc.errors(include_url=False):
        loc = _loc_path(err["loc"])
        line = _yaml_line(text, err["loc"]) if text else None
        where = f"{loc} (line {line})" if line else loc or "<root>"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def _loc_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and re.fullmatch(r"[A-Za-z_][\w-]*", part):
            # Pydantic puts the discriminator value (e.g. 'se') into the path of a union
            # member; keep it, it says which block type the error is about.
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def _yaml_line(text: str, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the deepest YAML node along ``loc``."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    found = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            match = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            if match is None:
                continue  # a union tag in the path, not a YAML key
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
        else:
            continue
        found = node.start_mark.line + 1
    return found
