"""Attention blocks, one file per family. Importing this package registers them all."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter, ValidationError

from ..errors import SpecError
from . import channel, mixed, self_attention, sequence, spatial  # noqa: F401  (registration)
from .base import BlockConfig, Site


def block_union() -> Any:
    """The discriminated union of every registered block config (on ``type``)."""
    from ..registry import block_configs

    configs = tuple(block_configs().values())
    return Annotated[Union[configs], Field(discriminator="type")]  # noqa: UP007


@lru_cache(maxsize=1)
def _adapter() -> TypeAdapter:
    return TypeAdapter(block_union())


def parse_block(data: Any, where: str = "block") -> BlockConfig:
    """Validate a block config given as a dict (or a BlockConfig) into its model.

    Used by architectures whose attention modules are spec fields.
    """
    if isinstance(data, BlockConfig):
        return data
    try:
        return _adapter().validate_python(data)
    except ValidationError as exc:
        from ..spec import format_validation_error

        raise SpecError(format_validation_error(exc, where)) from None


__all__ = ["BlockConfig", "Site", "block_union", "parse_block"]
