"""What every block shares: its Pydantic config base and the shape of its site."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, get_args

from pydantic import BaseModel, ConfigDict
from torch import nn


@dataclass(frozen=True)
class Site:
    """The tensor a block sees where it is inserted, as the shape probe measured it.

    ``channels``/``size`` describe the block's input; ``out_channels``/``out_size``
    what it must return (they differ only when a block replaces a module, e.g.
    SK replacing a strided 3x3 conv). ``stride`` is the replaced module's stride.
    """

    channels: int
    size: tuple[int, ...] | None = None
    out_channels: int | None = None
    out_size: tuple[int, ...] | None = None
    stride: int = 1
    replaced: nn.Module | None = None

    @property
    def output_channels(self) -> int:
        return self.channels if self.out_channels is None else self.out_channels


class BlockConfig(BaseModel):
    """Base of every block config.

    A subclass declares ``type: Literal["name"]`` (required, so it is always
    written out), its paper's defaults as
    fields with descriptions, and ``module`` (the nn.Module it builds).
    ``build(site)`` turns the config into a module for that site; the default
    passes ``channels`` plus every field but ``type`` to ``module``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    module: ClassVar[type[nn.Module]]
    #: Residual-style blocks (out = x + f(x)) that can start as the identity by
    #: zeroing their last layer; gating blocks are blended instead (see builder).
    residual: ClassVar[bool] = False
    #: Ranks of the tensors the block takes: 4 = (N, C, H, W) maps, 3 = (B, N, C) tokens.
    input_ranks: ClassVar[tuple[int, ...]] = (4,)

    @classmethod
    def block_type(cls) -> str:
        """The registry name, read from the ``type: Literal[...]`` annotation."""
        return get_args(cls.model_fields["type"].annotation)[0]

    def input_layouts(self) -> tuple[str, ...]:
        """Where the configured module takes its channels: "nchw" (N, C, H, W) maps,
        "nhwc" (N, H, W, C) maps, "tokens" (B, N, C). By default from ``input_ranks``;
        a block whose layout depends on a field (outlook's ``channels_last``) overrides
        it. At a site of another layout the builder converts the block's input and
        output (``attnzoo.layouts``)."""
        return tuple({4: "nchw", 3: "tokens"}[r] for r in self.input_ranks if r in (3, 4))

    def module_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k != "type"}

    def build(self, site: Site) -> nn.Module:
        if site.output_channels != site.channels:
            raise ValueError(
                f"block {self.block_type()!r} keeps its channel count and cannot map "
                f"{site.channels} to {site.output_channels} channels"
            )
        return self.module(channels=site.channels, **self.module_kwargs())


def takes_one_tensor(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes exactly one tensor. Fusions of several maps
    (BiSeNet's FFM, PAN's GAU, RAS's reverse attention) live inside architectures and
    cannot be inserted at a single site."""
    params = inspect.signature(module.forward).parameters.values()
    required = [p for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var = any(p.kind is p.VAR_POSITIONAL for p in params)
    return len(required) == 1 and not var


def make_identity_(module: nn.Module) -> bool:
    """Call ``module.reset_identity_()`` if it has one; True when it did."""
    fn = getattr(module, "reset_identity_", None)
    if fn is None:
        return False
    fn()
    return True
