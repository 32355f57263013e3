"""Pydantic models of a spec: which backbone, which blocks, and where they go.

A spec is data only. It is read with a stricter ``yaml.SafeLoader`` (plain YAML
values only: no Python or other tags, no repeated keys, no alias bombs); it names
registered blocks and backbones, never a Python path; nothing in it is evaluated.
"""

from __future__ import annotations

import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

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
    # inf stays inf in to_yaml (JSON mode would write null): spec -> YAML -> spec is lossless.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class BackboneSpec(_Strict):
    """The network that blocks are inserted into."""

    source: Literal["timm", "attnzoo"] = Field(
        "timm", description="Where the backbone comes from: a timm model name, or an "
        "attnzoo architecture (attnzoo/architectures/)."
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
            from .registry import architectures, did_you_mean

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
        """Read a spec from YAML text or from a ``.yaml``/``.yml`` file path."""
        text, origin = read_source(source)
        data = load_yaml(text, origin)
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


# ------------------------------------------------------------------------------ YAML

#: Most YAML nodes a spec may expand to, counting every use of an alias. Zoo specs have
#: a few dozen; aliases that multiply (a "billion laughs") would otherwise blow up in
#: model_dump / to_yaml / comparisons long after loading.
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_NOT_PLAIN = ("binary", "set", "omap", "pairs", "timestamp")


class SpecLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` for specs, stricter still: only JSON-like values (mappings,
    lists, strings, numbers, booleans, null). Python tags and unknown tags are refused
    (SafeLoader already), and so are ``!!binary``, ``!!set``, ``!!omap``, ``!!pairs`` and
    ``!!timestamp``; an unquoted date stays a string; a key given twice is an error."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` may be overridden by the mapping's own keys
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key: SafeLoader reports it
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found the key {key!r} twice (first on line {first})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def fetch_flow_collection_start(self, TokenClass: type) -> None:  # noqa: N803
        # PyYAML's scanner slows down quadratically with the flow level (seconds for a
        # line of `[`); a spec is a few levels deep.
        if self.flow_level >= MAX_YAML_DEPTH:
            raise yaml.scanner.ScannerError(
                None, None, f"[ and {{ nested more than {MAX_YAML_DEPTH} deep", self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def _refuse_tag(self, node: yaml.Node) -> None:
        raise yaml.constructor.ConstructorError(
            None, None, f"tag {node.tag!r} is not allowed in a spec: plain YAML values only "
            "(mappings, lists, strings, numbers, booleans, null)", node.start_mark)


SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _name in _NOT_PLAIN:
    SpecLoader.add_constructor(f"tag:yaml.org,2002:{_name}", SpecLoader._refuse_tag)


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes in the document with every alias expanded (memoised per node, so a bomb
    is measured without being expanded); raises ValueError on a recursive alias."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        if done:
            active.discard(key)
            sizes[key] = min(limit + 1, 1 + sum(sizes[id(c)] for c in children))
            continue
        if key in sizes:
            continue
        if key in active:
            raise ValueError(f"recursive alias at line {node.start_mark.line + 1}")
        active.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in active:
                raise ValueError(f"recursive alias at line {child.start_mark.line + 1}")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def load_yaml(text: str, origin: str = "spec") -> Any:
    """Read one YAML document with :class:`SpecLoader`; any problem is a SpecError that
    names ``origin``. Use this (not ``yaml.safe_load``) for anything a stranger wrote."""
    try:
        loader = SpecLoader(text)  # the reader refuses control characters here
    except yaml.YAMLError as exc:
        raise SpecError(f"{origin}: not valid YAML (safe subset): {exc}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, MAX_YAML_NODES)
        if size > MAX_YAML_NODES:
            raise SpecError(f"{origin}: YAML expands to more than {MAX_YAML_NODES} nodes "
                            "(aliases that multiply); a spec is small")
        return loader.construct_document(node)
    except SpecError:
        raise
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: recursive alias, huge int
        raise SpecError(f"{origin}: not valid YAML (safe subset): {exc}") from None
    except RecursionError:
        raise SpecError(f"{origin}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def read_source(source: str | os.PathLike[str]) -> tuple[str, str]:
    if isinstance(source, os.PathLike) or (
        isinstance(source, str) and "\n" not in source
        and source.endswith((".yaml", ".yml"))
    ):
        path = Path(source)
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            raise SpecError(f"cannot read spec file {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise SpecError(f"{path}: a spec file is UTF-8 text: {exc}") from None
    return str(source), "spec"


def format_validation_error(exc: ValidationError, origin: str, text: str | None = None) -> str:
    """One line per problem: where (field path, and YAML line when known) and what."""
    lines = [f"{origin}: invalid spec ({exc.error_count()} problem(s))"]
    for err in exc.errors(include_url=False):
        loc = _loc_path(err["loc"])
        line = _yaml_line(text, err["loc"]) if text else None
        where = f"{loc} (line {line})" if line else loc or "<root>"
        lines.append(f"  {where}: {_message(err)}")
    return "\n".join(lines)


def _message(err: dict[str, Any]) -> str:
    """Pydantic's message, with close matches for an unknown block type or field."""
    from .registry import did_you_mean

    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "union_tag_invalid":
        tags = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
        tag = str(ctx.get("tag", ""))
        shown = repr(tag) if len(tag) <= 64 else repr(tag[:64]) + "..."
        return (f"unknown block type {shown}{did_you_mean(tag, tags)}; the registered types "
                f"are {', '.join(tags)}")
    if kind == "extra_forbidden" and err["loc"]:
        fields = _fields_at(err["loc"][:-1])
        name = str(err["loc"][-1])
        shown = repr(name) if len(name) <= 64 else repr(name[:64]) + "..."
        if fields:
            return (f"unknown field {shown}{did_you_mean(name, fields)}; the fields here are "
                    f"{', '.join(fields)}")
        return f"unknown field {shown}"
    return err["msg"]


def _members(annotation: Any) -> list[Any]:
    """The alternatives of an annotation: Annotated and unions unwrapped."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model that ``loc`` (a Pydantic error location in a
    ModelSpec) points into, or [] when the path does not lead to one model."""
    current: list[Any] = [ModelSpec]
    for part in loc:
        following: list[Any] = []
        for member in (m for a in current for m in _members(a)):
            if isinstance(member, type) and issubclass(member, BaseModel):
                if part in member.model_fields:
                    following.append(member.model_fields[part].annotation)
                elif part == member.__name__ or part == _block_tag(member):
                    following.append(member)  # the union member Pydantic tried
            elif typing.get_origin(member) in (list, tuple) and isinstance(part, int):
                following.extend(typing.get_args(member)[:1])
        current = following
    models = {m for a in current for m in _members(a)
              if isinstance(m, type) and issubclass(m, BaseModel)}
    if len(models) != 1:
        return []
    return [f for f in models.pop().model_fields if f != "type"]


def _block_tag(model: type[BaseModel]) -> str | None:
    block_type = getattr(model, "block_type", None)
    return block_type() if callable(block_type) else None


def _loc_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and len(part) > 64:
            part = part[:64] + "..."  # a stranger's key, not worth a megabyte of message
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
        node = yaml.compose(text, Loader=SpecLoader)
    except (yaml.YAMLError, RecursionError):
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
