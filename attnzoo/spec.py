"""Pydantic models of a spec: which backbone, which blocks, and where they go.

A spec is data only. It is read with a stricter ``yaml.SafeLoader`` (plain YAML
values only: no Python or other tags, no repeated keys, no alias bombs); it names
registered blocks and backbones, never a Python path; nothing in it is evaluated.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import SpecError
from .registry import architectures, did_you_mean
from .safe_yaml import load_yaml, read_source
from .validation import BlockField, format_validation_error, yaml_line

Position = Literal["after", "before", "replace"]
#: The section of a saved folder's ``attnzoo.yaml`` that is not the spec.
WEIGHTS_KEY = "weights"
#: Specs read from files: id(spec) -> (file, its text), for errors at build time. Kept
#: beside the specs, not in them, so that equal fields still make equal specs.
_SOURCES: dict[int, tuple[str, str]] = {}
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
_FORBIDDEN_BACKBONE_ARGS = {
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
    "cache_dir", "scriptable", "exportable", "no_jit",
    "weights", "weights_backbone",  # torchvision's
}


class _Strict(BaseModel):
    # inf stays inf in to_yaml (JSON mode would write null): spec -> YAML -> spec is lossless.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class BackboneSpec(_Strict):
    """The network that blocks are inserted into."""

    source: Literal["timm", "attnzoo", "torchvision"] = Field(
        "timm", description="Where the backbone comes from: a timm model name, an "
        "attnzoo architecture (attnzoo/architectures/), or a torchvision model name "
        "(torchvision.models.get_model, always without weights; torchvision must be "
        "installed)."
    )
    name: str = Field(description="The backbone's registered name, e.g. 'resnet50'.",
                      pattern=_NAME, max_length=128)
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments forwarded to the backbone factory (plain YAML values).",
    )

    @field_validator("name")
    @classmethod
    def _registered_architecture(cls, name: str, info: ValidationInfo) -> str:
        # timm names are checked when the backbone is built (timm's registry depends on the
        # installed version); attnzoo's own are known now, so the error can point at the line.
        if info.data.get("source") == "attnzoo":
            archs = architectures()
            if name not in archs:
                raise ValueError(f"unknown attnzoo architecture {name!r}"
                                 f"{did_you_mean(name, archs)}; attnzoo has "
                                 f"{', '.join(archs)}")
        return name

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

    path: str = Field(description="Dotted module-path glob, e.g. 'layer3.*' or '**.conv2'.",
                      min_length=1, max_length=256)
    position: Position = Field(
        "after", description="Insert after the module, before it, or replace it."
    )
    layout: Literal["nchw", "nhwc", "tokens", "vectors"] | None = Field(
        None, description="Where the site's channels are, for a site where attnzoo cannot "
        "tell (its error says so): nchw (N, C, H, W), nhwc (N, H, W, C), tokens (B, N, C), "
        "vectors (N, C). Unset: decided from the module and the probed tensor.")
    prefix_tokens: int | None = Field(
        None, ge=0, le=65536, description="With layout tokens: how many leading tokens "
        "(class, distillation, register tokens) are not on the grid.")
    grid: tuple[PositiveInt, PositiveInt] | None = Field(
        None, description="With layout tokens: the (H, W) grid of the tokens after the "
        "prefix, for a block that takes maps.")

    @model_validator(mode="after")
    def _token_fields_need_tokens(self) -> SiteSelector:
        if (self.prefix_tokens is not None or self.grid is not None) and \
                self.layout != "tokens":
            raise ValueError("prefix_tokens and grid describe token sites: they need "
                             "layout: tokens")
        return self


class Insertion(_Strict):
    """One block type inserted at every site that ``at`` and the filters select."""

    block: BlockField = Field(description="The block and its config, chosen by its `type`.")
    at: str | SiteSelector = Field(
        description="A site alias of the block family (resnet: after_conv1, after_conv2, "
        "after_conv3, residual, post_add; convnext, mobile, regnet, transformer: see "
        "docs/sites.md or `attnzoo sites MODEL`) or a {path, position} selector."
    )
    stages: list[int] | None = Field(
        None, description="Keep only sites in these stages, numbered from 1 in every family "
        "(resnet: layer1..layer4 = 1..4; convnext, swin: stages.0 / layers.0 = 1; "
        "efficientnet: blocks.0 = 1; vit: 1). An index the model lacks is an error."
    )
    blocks: list[int] | None = Field(
        None, description="Keep only sites in these blocks of their stage, numbered from 0 "
        "(regnet's b1 = 0). An index no selected stage has is an error."
    )
    zero_init: bool = Field(
        False, description="Start the inserted block as the identity, so a pretrained "
        "backbone keeps its outputs until fine-tuned.",
    )


    @field_validator("at")
    @classmethod
    def _short_alias(cls, at: str | SiteSelector) -> str | SiteSelector:
        if isinstance(at, str) and len(at) > 64:
            raise ValueError(f"a site alias is a short name, not {len(at)} characters")
        return at


class ModelSpec(_Strict):
    """A whole model: a backbone plus attention blocks and where they go."""

    name: str = Field(description="The model's name, e.g. 'resnet50_cbam'.", pattern=_NAME,
                      max_length=128)
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
        """Read a spec from YAML text or from a ``.yaml``/``.yml`` file path.

        A saved folder's ``attnzoo.yaml`` is a spec too: its ``weights:`` section (the
        weights file and its sha256, see :meth:`read_yaml`) is set aside; every other
        key is validated as in any spec."""
        return cls.read_yaml(source)[0]

    @classmethod
    def read_yaml(cls, source: str | os.PathLike[str]
                  ) -> tuple[ModelSpec, dict[str, Any] | None]:
        """The spec and the ``weights:`` section (None when there is none) of YAML text or
        a file. ``weights:`` is the one key a spec file may hold besides the spec's
        fields: ``save_pretrained`` writes it into ``attnzoo.yaml``."""
        text, origin = read_source(source)
        data = load_yaml(text, origin)
        if not isinstance(data, dict):
            raise SpecError(f"{origin}: a spec must be a YAML mapping, got {type(data).__name__}")
        weights = None
        if WEIGHTS_KEY in data:
            weights = data.pop(WEIGHTS_KEY)
            if not isinstance(weights, dict):
                where = yaml_line(text, (WEIGHTS_KEY,))
                raise SpecError(f"{origin}: invalid spec (1 problem(s))\n  {WEIGHTS_KEY}"
                                f"{f' (line {where})' if where else ''}: a saved model's "
                                "weights section is a mapping {file, sha256}, not "
                                f"{type(weights).__name__}")
        spec = cls.from_dict(data, origin=origin, text=text)
        if origin != "spec":  # read from a file: build errors can name it and the line
            _SOURCES[id(spec)] = (origin, text)
            weakref.finalize(spec, _SOURCES.pop, id(spec), None)
        return spec, weights

    def source_line(self, *loc: str | int) -> str | None:
        """``"<file>, line N"`` of the YAML node at ``loc`` (``"insert", 0``; nothing:
        the spec itself) when this spec was read from a file, else None. The builder's
        errors start with it, as validation errors name the file and line."""
        found = _SOURCES.get(id(self))
        if found is None:
            return None
        origin, text = found
        line = yaml_line(text, loc)
        return f"{origin}, line {line}" if line else origin

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "spec", text: str | None = None
                  ) -> ModelSpec:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SpecError(format_validation_error(exc, origin, text, model=cls)) from None

    def to_yaml(self) -> str:
        """The spec as YAML; ``ModelSpec.from_yaml(spec.to_yaml()) == spec``."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
