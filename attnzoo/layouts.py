"""Where a site's channels are: its layout, and running a block in another one.

Every tensor a block can be inserted at has one of four layouts:

- ``nchw``: maps (N, C, H, W), torch's convolutions;
- ``nhwc``: maps (N, H, W, C), ConvNeXt's MLP, Swin and VOLO blocks;
- ``tokens``: sequences (B, N, C), with ``prefix`` leading tokens that are not on the
  grid (ViT's class token, DeiT's distillation token, register tokens) and the
  ``grid`` (H, W) of the others when it is known;
- ``vectors``: (N, C), after a global pool.

The layout is decided from the probed tensor and the module (:func:`decide`), in this
order: what the site states (``layout:``); the channel count of the last layer that
produced the tensor (a conv's ``out_channels``, a linear's ``out_features``, a norm's
features) matched against the axes that can hold channels; a second dry run at twice
the input size (the axes that grow are spatial). When none of them tells, the layout
is ``unknown`` and inserting there is refused with an error that asks for
``layout:``; nothing is guessed.

A block runs in a layout it takes (:func:`block_layouts`); at a site of another
layout :class:`LayoutAdapter` converts its input and converts its output back
(permutes for NHWC <-> NCHW, reshapes for maps <-> tokens, the prefix tokens passed
by), so a block never reads the wrong axis as its channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

KINDS = ("nchw", "nhwc", "tokens", "vectors")
RANKS = {"nchw": 4, "nhwc": 4, "tokens": 3, "vectors": 2}
AXES = {"nchw": "(N, C, H, W)", "nhwc": "(N, H, W, C)", "tokens": "(B, N, C)",
        "vectors": "(N, C)"}
_RANK_LAYOUTS = {4: "nchw", 3: "tokens"}


@dataclass(frozen=True)
class Layout:
    """A probed tensor (batch of one) and where its channels are."""

    kind: str                           # one of KINDS, or "unknown"
    shape: tuple[int, ...]
    prefix: int | None = None           # tokens: leading tokens that are not on the grid
    grid: tuple[int, int] | None = None  # tokens: (H, W) of the tokens after the prefix
    how: str = ""                       # what decided it: stated, layer, probe, rank

    @property
    def channels(self) -> int | None:
        axis = {"nchw": 1, "nhwc": 3, "tokens": 2, "vectors": 1}.get(self.kind)
        return None if axis is None else self.shape[axis]

    @property
    def spatial(self) -> tuple[int, int] | None:
        """(H, W) of a map, or the token grid when known."""
        if self.kind == "nchw":
            return (self.shape[2], self.shape[3])
        if self.kind == "nhwc":
            return (self.shape[1], self.shape[2])
        return self.grid if self.kind == "tokens" else None

    def __str__(self) -> str:
        if self.kind == "tokens" and self.grid is not None:
            return f"tokens({self.prefix or 0}+{self.grid[0]}x{self.grid[1]})"
        return self.kind

    def describe(self) -> str:
        """``nhwc 56x56x96``: the layout and the shape without the batch axis."""
        return f"{self} {'x'.join(map(str, self.shape[1:]))}"


@dataclass(frozen=True)
class Stated:
    """What a site says about its layout (``layout``, ``prefix_tokens``, ``grid``)."""

    kind: str | None = None
    prefix: int | None = None
    grid: tuple[int, int] | None = None


def tensor_shape(t: Any) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) and t.dim() >= 2 else None


def layer_features(module: nn.Module) -> int | None:
    """The channel count a layer produces: conv out_channels, linear out_features,
    norm features; None for other modules."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0]
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    return None


def _one(hits: list[str]) -> str | None:
    return hits[0] if len(hits) == 1 else None


def _by_layer(shape: tuple[int, ...], feature: int | None) -> str | None:
    if feature is None:
        return None
    if len(shape) == 4:
        return _one([k for k, axis in (("nchw", 1), ("nhwc", 3)) if shape[axis] == feature])
    if len(shape) == 3:
        kind = _one([k for k, axis in (("tokens", 2), ("channels_first", 1))
                     if shape[axis] == feature])
        return kind if kind == "tokens" else None
    return None


def _by_probe(shape: tuple[int, ...], second: tuple[int, ...] | None) -> str | None:
    """The layout from the axes that grow when the input doubles: they are spatial
    (or windows); the channel axis keeps its size."""
    if second is None or len(second) != len(shape):
        return None
    grows = {i for i in range(1, len(shape)) if second[i] != shape[i]}
    if len(shape) == 4:
        return {frozenset({2, 3}): "nchw", frozenset({1, 2}): "nhwc"}.get(frozenset(grows))
    if len(shape) == 3 and (grows == {1} or (not grows and second[0] != shape[0])):
        return "tokens"  # more tokens, or more windows of tokens
    return None


def decide(shape: tuple[int, ...], *, feature: int | None = None,
           second: tuple[int, ...] | None = None, stated: Stated | None = None,
           token_hints: list[tuple[int, tuple[int, int]]] = (),
           input_hw: tuple[int, int] | None = None) -> Layout:
    """The layout of a probed tensor (see the module docstring); ``unknown`` when it
    cannot be told. ``stated`` must fit the tensor's rank (checked by the caller)."""
    if stated is not None and stated.kind is not None:
        kind, how = stated.kind, "stated"
    elif len(shape) == 2:
        kind, how = "vectors", "rank"
    elif (kind := _by_layer(shape, feature)) is not None:
        how = "layer"
    elif (kind := _by_probe(shape, second)) is not None:
        how = "probe"
    else:
        return Layout("unknown", shape)
    if kind != "tokens":
        return Layout(kind, shape, how=how)
    prefix, grid = _token_grid(shape, second, stated, token_hints, input_hw)
    return Layout(kind, shape, prefix=prefix, grid=grid, how=how)


def _token_grid(shape: tuple[int, ...], second: tuple[int, ...] | None, stated: Stated | None,
                hints: list[tuple[int, tuple[int, int]]], input_hw: tuple[int, int] | None
                ) -> tuple[int | None, tuple[int, int] | None]:
    """(prefix, grid) of a token tensor: stated; else from the modules around the site
    (``hints``: ViT's ``num_prefix_tokens`` and patch grid, Swin's resolution and
    window); else from the token counts of the two dry runs. None where unknown."""
    n = shape[1]
    if stated is not None and stated.grid is not None:
        h, w = stated.grid
        return (n - h * w if stated.prefix is None else stated.prefix), (h, w)
    for prefix, (h, w) in hints:
        if (stated is None or stated.prefix in (None, prefix)) and n == prefix + h * w:
            return prefix, (h, w)
    if second is not None and input_hw is not None and len(second) == 3 and second[0] == shape[0]:
        # At twice the input size the grid has 4x the tokens: n2 - p = 4 (n - p).
        p3 = 4 * n - second[1]
        if p3 >= 0 and p3 % 3 == 0 and (stated is None or stated.prefix in (None, p3 // 3)):
            prefix, cells = p3 // 3, n - p3 // 3
            height, width = input_hw
            h = round(math.sqrt(cells * height / width)) if cells else 0
            if h and cells % h == 0:
                return prefix, (h, cells // h)
    return (stated.prefix if stated is not None else None), None


def block_layouts(config: Any) -> tuple[str, ...]:
    """The layouts a block config's module takes: its ``input_layouts()`` when it
    defines one, else from ``input_ranks`` (4: nchw, 3: tokens)."""
    own = getattr(config, "input_layouts", None)
    if callable(own):
        return tuple(own())
    return tuple(_RANK_LAYOUTS[r] for r in config.input_ranks if r in _RANK_LAYOUTS)


_PREFERENCE = {"nhwc": ("nchw", "tokens"), "nchw": ("nhwc", "tokens"),
               "tokens": ("nchw", "nhwc"), "vectors": ()}


def run_layout(site: Layout, accepted: tuple[str, ...]) -> str | None:
    """The layout the block runs in at ``site``: the site's own when it takes it, else
    one it can be converted to (tokens -> a map needs the grid); None when none."""
    if site.kind in accepted:
        return site.kind
    for kind in _PREFERENCE.get(site.kind, ()):
        if kind in accepted and not (site.kind == "tokens" and site.grid is None):
            return kind
    return None


def run_size(site: Layout, kind: str) -> tuple[int, ...] | None:
    """The ``size`` a block built for ``kind`` gets at ``site``: (H, W) for maps, the
    token count for tokens."""
    if kind in ("nchw", "nhwc"):
        return site.spatial
    if kind == "tokens":
        if site.kind == "tokens":
            return (site.shape[1],)
        hw = site.spatial
        return (hw[0] * hw[1],) if hw else None
    return None


class LayoutAdapter(nn.Module):
    """Runs ``block`` in the layout it takes (``block_layout``) at a site of another
    layout (``site_layout``): the input is converted to the block's layout, the block's
    output back to the site's. Token prefixes (class tokens) pass by the block."""

    def __init__(self, block: nn.Module, site_layout: str, block_layout: str,
                 prefix: int = 0, grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        if (site_layout, block_layout) not in _CONVERSIONS:
            raise ValueError(f"no conversion from {site_layout} to {block_layout}")
        self.block = block
        self.site_layout, self.block_layout = site_layout, block_layout
        self.prefix = int(prefix or 0)
        self.grid = tuple(grid) if grid is not None else None

    def extra_repr(self) -> str:
        grid = f", prefix={self.prefix}, grid={self.grid}" if self.site_layout == "tokens" \
            else ""
        return f"site={self.site_layout}, block={self.block_layout}{grid}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CONVERSIONS[(self.site_layout, self.block_layout)](self, x)

    def _grid_for(self, cells: int) -> tuple[int, int]:
        h, w = self.grid
        if h * w == cells:
            return h, w
        side = math.isqrt(cells)
        if h == w and side * side == cells:  # a square grid at another input size
            return side, side
        raise RuntimeError(f"attnzoo block at a token site: {cells} tokens after the "
                           f"{self.prefix} prefix token(s) do not form the {h}x{w} grid the "
                           "block was inserted for")

    def _nhwc_in_nchw(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)

    def _nchw_in_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2)

    def _map_in_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.site_layout == "nchw":
            b, _, h, w = x.shape
            y = self.block(x.flatten(2).transpose(1, 2))
            return y.transpose(1, 2).reshape(b, -1, h, w)
        b, h, w, c = x.shape
        return self.block(x.reshape(b, h * w, c)).reshape(b, h, w, -1)

    def _tokens_in_map(self, x: torch.Tensor) -> torch.Tensor:
        head, body = x[:, :self.prefix], x[:, self.prefix:]
        b, cells, c = body.shape
        h, w = self._grid_for(cells)
        if self.block_layout == "nchw":
            y = self.block(body.transpose(1, 2).reshape(b, c, h, w))
            body = y.flatten(2).transpose(1, 2)
        else:
            body = self.block(body.reshape(b, h, w, c)).flatten(1, 2)
        return torch.cat([head, body], dim=1) if self.prefix else body


_CONVERSIONS = {
    ("nhwc", "nchw"): LayoutAdapter._nhwc_in_nchw,
    ("nchw", "nhwc"): LayoutAdapter._nchw_in_nhwc,
    ("nchw", "tokens"): LayoutAdapter._map_in_tokens,
    ("nhwc", "tokens"): LayoutAdapter._map_in_tokens,
    ("tokens", "nchw"): LayoutAdapter._tokens_in_map,
    ("tokens", "nhwc"): LayoutAdapter._tokens_in_map,
}


def token_hints(model: nn.Module, path: str) -> list[tuple[int, tuple[int, int]]]:
    """(prefix, grid) candidates for a token tensor at ``path``, from the module and
    its ancestors, nearest first: ViT-style ``num_prefix_tokens`` with
    ``patch_embed.grid_size``, Swin-style ``input_resolution`` and ``window_size``."""
    hints: list[tuple[int, tuple[int, int]]] = []
    parts = path.split(".") if path else []
    for depth in range(len(parts), -1, -1):
        try:
            module = model.get_submodule(".".join(parts[:depth]))
        except AttributeError:
            continue
        for attr in ("input_resolution", "window_size"):
            value = getattr(module, attr, None)
            if _pair(value):
                hints.append((0, tuple(value)))
        prefix = getattr(module, "num_prefix_tokens", None)
        grid = getattr(getattr(module, "patch_embed", None), "grid_size", None)
        if isinstance(prefix, int) and _pair(grid):
            hints.append((prefix, tuple(grid)))
    return hints


def _pair(value: Any) -> bool:
    return isinstance(value, tuple | list) and len(value) == 2 and all(
        isinstance(v, int) and v > 0 for v in value)


__all__ = ["AXES", "KINDS", "RANKS", "Layout", "LayoutAdapter", "Stated", "block_layouts",
           "decide", "layer_features", "run_layout", "run_size", "tensor_shape",
           "token_hints"]
