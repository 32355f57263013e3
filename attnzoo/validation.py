"""Validation errors that say what was wrong and where, and block configs parsed by type.

``format_validation_error`` turns a Pydantic ``ValidationError`` into one line per
problem (field path, YAML line, close matches), naming the fields of the model the
error is about: a spec, one block's config, a weights manifest. ``parse_block`` and
``BlockField`` look a block ``type`` up in the live registry, so a block registered
by a plugin after import is valid in every spec, ``create_block`` and the schema.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError, core_schema

from .blocks.base import BlockConfig
from .errors import SpecError
from .registry import block_configs, did_you_mean
from .safe_yaml import SpecLoader

#: Block fields that the builder fills from the site where a block is inserted.
SITE_FIELDS = {
    "channels": "channels are taken from the site",
    "in_channels": "channels are taken from the site",
    "out_channels": "output channels are taken from the site (the replaced module's)",
    "size": "the spatial size is taken from the site",
    "stride": "the stride is taken from the replaced module",
}
_LONG = 64


def _shown(text: str) -> str:
    return repr(text) if len(text) <= _LONG else repr(text[:_LONG]) + "..."


def format_validation_error(exc: ValidationError, origin: str, text: str | None = None, *,
                            model: type[BaseModel] | None = None, what: str = "spec") -> str:
    """One line per problem: where (field path, and YAML line when known) and what.

    ``model`` is the Pydantic model that was validated (the root of every error
    location); unknown-field messages list its fields at that location.
    """
    errors = _without_union_noise(_plain_tags(exc.errors(include_url=False)))
    lines = [f"{origin}: invalid {what} ({len(errors)} problem(s))"]
    for err in errors:
        loc = _loc_path(err["loc"])
        line = yaml_line(text, err["loc"]) if text else None
        where = f"{loc} (line {line})" if line else loc or "<root>"
        lines.append(f"  {where}: {_message(err, model)}")
    return "\n".join(lines)


_VALIDATOR_TAG = re.compile(r"^function-(?:after|before|wrap|plain)\[.*,\s*([A-Za-z_]\w*)\]$")


def _plain_tags(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Union members in error locations by their class name: Pydantic tags a model
    with a model validator ``function-after[<validator>(), SiteSelector]``."""

    def plain(part: Any) -> Any:
        m = _VALIDATOR_TAG.match(part) if isinstance(part, str) else None
        return m[1] if m else part

    return [{**e, "loc": tuple(plain(p) for p in e["loc"])} for e in errors]


def _without_union_noise(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic reports every alternative of a union that failed. When the value got
    further in one alternative (``at: {path, position: afer}`` is a mapping: its
    problem is the position) the others' "should be a valid <type>" is noise: drop
    it. When no alternative got further, all are kept (the value fits none)."""

    def is_type_error(err: dict[str, Any]) -> bool:
        return err["type"].endswith("_type") or err["type"] == "is_instance_of"

    kept = []
    for err in errors:
        loc = err["loc"]
        if is_type_error(err) and loc and any(
                len(other["loc"]) > len(loc) and other["loc"][:len(loc) - 1] == loc[:-1]
                and other["loc"][len(loc) - 1] != loc[-1] for other in errors):
            continue
        kept.append(err)
    return kept


def _message(err: dict[str, Any], model: type[BaseModel] | None) -> str:
    """Pydantic's message, with close matches for an unknown block type or field, or
    for a value that is not one of the allowed words."""
    if err["type"] == "literal_error" and isinstance(err.get("input"), str):
        allowed = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
        return err["msg"] + did_you_mean(err["input"], allowed)
    if err["type"] == "extra_forbidden" and err["loc"]:
        name = str(err["loc"][-1])
        fields = _fields_at(model, err["loc"][:-1]) if model is not None else []
        if name in SITE_FIELDS and name not in fields and _is_block_location(model, err["loc"]):
            return f"{SITE_FIELDS[name]}; remove the field {name!r}"
        if fields:
            return (f"unknown field {_shown(name)}{did_you_mean(name, fields)}; the fields here "
                    f"are {', '.join(fields)}")
        return f"unknown field {_shown(name)}"
    return err["msg"]


def _members(annotation: Any) -> list[Any]:
    """The alternatives of an annotation: Annotated and unions unwrapped."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _models_at(model: type[BaseModel], loc: tuple[Any, ...]) -> set[type[BaseModel]]:
    """The Pydantic models that ``loc`` (an error location under ``model``) points into.
    A block field is followed through the registry: its next location part is the
    block type, as :class:`BlockField` reports it."""
    current: list[Any] = [model]
    for part in loc:
        following: list[Any] = []
        for member in (m for a in current for m in _members(a)):
            if member is BlockField:
                config = block_configs().get(part) if isinstance(part, str) else None
                following += [config] if config else []
            elif isinstance(member, type) and issubclass(member, BaseModel):
                if part in member.model_fields:
                    following.append(member.model_fields[part].annotation)
                elif part == member.__name__:
                    following.append(member)  # the union member Pydantic tried
            elif typing.get_origin(member) in (list, tuple) and isinstance(part, int):
                following.extend(typing.get_args(member)[:1])
            elif typing.get_origin(member) is dict:
                following.extend(typing.get_args(member)[1:2])
        current = following
    return {m for a in current for m in _members(a)
            if isinstance(m, type) and issubclass(m, BaseModel)}


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    models = _models_at(model, loc)
    if len(models) != 1:
        return []
    return [f for f in models.pop().model_fields if f != "type"]


def _is_block_location(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> bool:
    if model is None:
        return False
    models = _models_at(model, loc[:-1])
    return len(models) == 1 and issubclass(models.pop(), BlockConfig)


def _loc_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and len(part) > _LONG:
            part = part[:_LONG] + "..."  # a stranger's key, not worth a megabyte of message
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and re.fullmatch(r"[A-Za-z_][\w-]*", part):
            # The block type (e.g. 'se') is part of the path of a block's fields; keep it,
            # it says which block type the error is about.
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def yaml_line(text: str, loc: tuple[Any, ...]) -> int | None:
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
                continue  # a block type in the path, not a YAML key
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
        else:
            continue
        found = node.start_mark.line + 1
    return found


# ------------------------------------------------------------------- blocks by type


def _validate_block(data: Any) -> BlockConfig:
    """A block config from ``{type: ..., fields}``, its type looked up now (so plugins
    registered after import count). Errors carry the type in their location."""
    if isinstance(data, BlockConfig):
        return data
    if not isinstance(data, dict) or "type" not in data:
        raise PydanticCustomError(
            "block_type_missing", "a block is a mapping with a `type`, e.g. `type: se`")
    tag = data["type"]
    configs = block_configs()
    if not isinstance(tag, str) or tag not in configs:
        shown = _shown(str(tag))
        hint = did_you_mean(tag, configs) if isinstance(tag, str) else ""
        raise PydanticCustomError(
            "unknown_block_type", "unknown block type {tag}{hint}; the registered types are "
            "{types}", {"tag": shown, "hint": hint, "types": ", ".join(configs)})
    try:
        return configs[tag].model_validate(data)
    except ValidationError as exc:
        raise ValidationError.from_exception_data(exc.title, [
            {"type": e["type"], "loc": (tag, *e["loc"]), "input": e["input"],
             **({"ctx": e["ctx"]} if "ctx" in e else {})}
            for e in exc.errors(include_url=False)]) from None


class BlockField:
    """The type of a spec's ``block`` field: any registered block config, by ``type``.

    Validation looks the type up in the registry at validation time; the JSON schema
    is the discriminated union of the block types registered when it is generated.
    """

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _validate_block,
            serialization=core_schema.plain_serializer_function_ser_schema(
                _dump_block, info_arg=True))

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> Any:
        from pydantic import Field, TypeAdapter

        configs = tuple(block_configs().values())
        union = typing.Annotated[typing.Union[configs], Field(discriminator="type")]  # noqa: UP007
        return handler(TypeAdapter(union).core_schema)


def _dump_block(block: BlockConfig, info: Any) -> dict[str, Any]:
    return block.model_dump(mode=info.mode, exclude_defaults=info.exclude_defaults,
                            exclude_none=info.exclude_none)


def parse_block(data: Any, where: str = "block") -> BlockConfig:
    """Validate a block config given as a dict (or a BlockConfig) into its model.

    Raises SpecError naming ``where`` and the block's own fields. Used by the spec's
    ``block`` field, ``create_block`` and architectures whose attention modules are
    spec fields.
    """
    try:
        return _validate_block(data)
    except ValidationError as exc:
        tag = data.get("type") if isinstance(data, dict) else None
        config = block_configs().get(tag) if isinstance(tag, str) else None
        raise SpecError(_block_error(exc, where, config)) from None
    except PydanticCustomError as exc:
        raise SpecError(f"{where}: invalid block config: {exc.message()}") from None


def _block_error(exc: ValidationError, where: str, config: type[BlockConfig] | None) -> str:
    # The locations start with the block type (see _validate_block); strip it so the
    # messages read `reduction: ...`, and name the fields of that block's config.
    errors = [{**e, "loc": e["loc"][1:]}
              for e in _without_union_noise(_plain_tags(exc.errors(include_url=False)))]
    lines = [f"{where}: invalid block config ({len(errors)} problem(s))"]
    for err in errors:
        loc = _loc_path(err["loc"]) or "<root>"
        lines.append(f"  {loc}: {_message(err, config)}")
    return "\n".join(lines)


__all__ = ["SITE_FIELDS", "BlockField", "format_validation_error", "parse_block", "yaml_line"]
