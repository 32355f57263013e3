"""The closed registries: block type -> config model, backbone source/name -> factory.

Only names live here. A spec can pick a registered entry by name; it can never
name a Python path, so nothing in a spec is imported or evaluated. This module imports
nothing else of attnzoo's but its errors: the block and architecture modules import it
to register themselves, and ``attnzoo/__init__.py`` imports those modules.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from .errors import SpecError

if TYPE_CHECKING:
    from torch import nn

    from .blocks.base import BlockConfig

_BLOCKS: dict[str, type[BlockConfig]] = {}
_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}
_BACKBONES: dict[str, tuple[str, str]] = {}

C = TypeVar("C", bound="type[BlockConfig]")
F = TypeVar("F", bound=Callable[..., "nn.Module"])


def register_block(config_cls: C) -> C:
    """Class decorator: register a block config under its ``type`` literal."""
    name = config_cls.block_type()
    if name in _BLOCKS and _BLOCKS[name] is not config_cls:
        raise RuntimeError(f"block type {name!r} is registered twice")
    _BLOCKS[name] = config_cls
    return config_cls


def register_architecture(name: str, *, timm_backbone: tuple[str, str] | None = None
                          ) -> Callable[[F], F]:
    """Decorator: register a factory as the attnzoo backbone ``name``.

    ``timm_backbone=(module_path, arg)`` declares that the built network holds a timm
    model at ``module_path``, named by the factory's argument ``arg``: then
    ``pretrained_backbone=`` loads that timm model's checkpoint there.
    """

    def wrap(factory: F) -> F:
        if name in _ARCHITECTURES and _ARCHITECTURES[name] is not factory:
            raise RuntimeError(f"architecture {name!r} is registered twice")
        _ARCHITECTURES[name] = factory
        if timm_backbone is not None:
            _BACKBONES[name] = timm_backbone
        return factory

    return wrap


def block_configs() -> dict[str, type[BlockConfig]]:
    """Every registered block type -> its config class, sorted by name. ``import attnzoo``
    registers the catalogue (``attnzoo.blocks``, ``attnzoo.architectures``); plugins
    add theirs with :func:`register_block` at any time."""
    return dict(sorted(_BLOCKS.items()))


def get_block_config(name: str) -> type[BlockConfig]:
    configs = block_configs()
    if not isinstance(name, str) or name not in configs:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:80] + "..."
        raise SpecError(f"unknown block type {shown}{did_you_mean(name, configs)}")
    return configs[name]


def architectures() -> dict[str, Callable[..., nn.Module]]:
    """Every registered attnzoo architecture -> its factory, sorted by name."""
    return dict(sorted(_ARCHITECTURES.items()))


def get_architecture(name: str) -> Callable[..., nn.Module]:
    archs = architectures()
    if not isinstance(name, str) or name not in archs:
        raise SpecError(f"unknown attnzoo architecture {name!r}{did_you_mean(name, archs)}")
    return archs[name]


def architecture_backbone(name: str) -> tuple[str, str] | None:
    """(module path, factory arg) of the timm backbone inside architecture ``name``."""
    return _BACKBONES.get(name)


def did_you_mean(name: str, choices, n: int = 3) -> str:
    """A ' (did you mean ...?)' suffix listing the closest choices, or ''."""
    if not isinstance(name, str) or len(name) > 256:
        return ""  # not a name anyone mistyped
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
