"""Attention maps: what each block computes as attention, recorded during a forward pass.

    with attnzoo.record_attention(model) as maps:
        model(x)
    maps["layer1.0.bn3.attnzoo_after"]        # a tensor, e.g. SE's (N, C, 1, 1) weights
    maps.kinds["layer1.0.bn3.attnzoo_after"]  # "channel"

How it works: a block calls :func:`record` where it computes its attention (one line).
Outside ``record_attention`` that call returns at once (one global read), so a model
runs as before: nothing is attached to it, no hook, no buffer, and ``torch.compile``,
``torch.export`` and ONNX see no difference. Inside, the call stores the value under the
block's module path in the model. Nothing stays attached when the ``with`` ends.

Keys. A block's map is stored under its module path; a block with several maps names
them, ``"<path>:<name>"`` (for the recorded module itself, whose path is ``""``: the
bare name, or ``""`` for its one map). CBAM's gates are submodules, so their paths
differ: ``"...attnzoo_after.channel"`` and ``"...attnzoo_after.spatial"``.
A key recorded again in the same ``with`` (a recurrent block such as criss-cross, a
module called twice, two forward passes) gets ``#1``, ``#2``, ... appended.

Kinds (``maps.kinds[key]``) and shapes, N the batch:

- ``"channel"``: a weight per channel, (N, C, 1, 1) (SE, ECA, FcaNet, GSoP, GCT's gate,
  CBAM's channel gate, eSE, GE, ...); in [0, 1] where the block gates with a sigmoid or
  softmax (GCT's ``1 + tanh`` lies in [0, 2]).
- ``"spatial"``: a weight per position, (N, 1 or C, H, W) (CBAM's spatial gate, SimAM,
  coordinate attention, BAM, triplet, SGE, ...), or a softmax over the H*W positions
  (GCNet's context map, (N, 1, H, W), summing to 1).
- ``"affinity"``: pairwise attention for chosen query positions, (N, [heads,] Q, Hk, Wk):
  row q is the softmax over the key grid (Hk, Wk) of query ``queries[q]``, so it sums to
  1. The full (HW x HW) matrix is formed only with ``queries="all"`` (then Q = H*W).
- ``"other"``: anything else, documented by the block (STN's theta (N, 2, 3) and grid
  (N, H, W, 2), outlook weights, token-sequence weights (B, heads, Nq, Nk), ...).

What each block records (N batch, C channels, (H, W) its map, Q the chosen queries;
``name``: the map's name after the ``:``, none for a block's one map):

- channel weights (N, C, 1, 1): se, eca, fca, gsop, effective_se, gather_excite (global
  extent; with an extent, spatial (N, C, H, W)), arm, ffm (sigmoid, in [0, 1]); gct
  (``1 + tanh``, in [0, 2]); gau (its ReLU'd gate, >= 0); cbam's ``channel`` gate,
  polarized ``channel``, scse ``channel``.
- spatial weights in [0, 1]: cbam's ``spatial`` gate, polarized ``spatial``, scse
  ``spatial`` (N, 1, H, W); simam (N, C, H, W), its ``sigmoid(1 / e*)`` from the minimal
  energies; reverse (N, 1, H, W), ``1 - sigmoid(coarse)``; residual_attention's soft mask,
  bam's M(F), coordinate_attention's ``a_h * a_w``, triplet_attention's mean gate,
  shuffle_attention's gate in the output's channel order (all (N, C, H, W));
  spatial_group_enhance (N, G, H, W), efficient_multiscale_attention (N, G, H, W); fpa's
  pyramid attention (N, 1 or C, H, W, not normalised).
- softmax maps: global_context (N, 1, H, W) over the positions; double_attention
  ``gather`` (N, n, H, W) over the positions and ``distribute`` (N, n, H, W) over the n
  descriptors; external_attention (N, S, H, W), normalised over the S memory units;
  lambda_layer's keys (N, k, H, W), each a softmax over the positions.
- affinities (kind ``affinity``, rows summing to 1): non_local (N, Q, Hk, Wk) over its
  (sub-sampled) keys; disentangled_non_local ``pairwise`` (N, Q, Hk, Wk) and ``unary``
  (N, 1, Hk, Wk); danet_position (N, Q, H, W); criss_cross (N, Q, H, W) per pass, zero
  off the query's row and column; mhsa2d, generalized_attention, halo_attention (each
  window placed on the map; weights on the zero padding beyond the border are cut) and
  multi_head_attention on a map: (N, heads, Q, Hk, Wk).
- other: stn ``theta`` (N, 2, 3) and ``grid`` (N, H, W, 2) (``affine_grid(theta)``); sk
  and split_attention (N, M, C, 1, 1), softmax over the M branches; contextual_transformer
  (N, 2, C, 1, 1), dynamic vs static context; danet_channel (N, C, C); outlook (N, heads,
  L, K*K, K*K) per window; attention (B, Nq, Nk) and multi_head_attention on tokens (B,
  heads, Nq, Nk). identity and stdc record nothing.

``spatial_maps(maps)`` reduces the spatial and affinity maps to one (H, W) heat map each
(first image of the batch; mean over channels, heads and queries), and
``render_maps(image, maps)`` overlays them on a picture in a grid, one panel per map
(``attnzoo maps MODEL IMAGE --out maps.png``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from PIL import Image

Kind = Literal["channel", "spatial", "affinity", "other"]
KINDS: tuple[str, ...] = ("channel", "spatial", "affinity", "other")
Queries = Sequence[tuple[float, float]] | Literal["all"]
CENTRE: tuple[tuple[float, float], ...] = ((0.5, 0.5),)


class AttentionMaps(dict):
    """``{key: tensor}`` of one recording, with ``kinds`` (key -> kind) and ``queries``
    (the query positions of the affinity maps, as given)."""

    def __init__(self, queries: Queries) -> None:
        super().__init__()
        self.kinds: dict[str, str] = {}
        self.queries = queries


class _Recorder:
    def __init__(self, paths: dict[nn.Module, str], maps: AttentionMaps, detach: bool,
                 previous: _Recorder | None) -> None:
        self.paths = paths
        self.maps = maps
        self.detach = detach
        self.previous = previous

    def add(self, module: nn.Module, name: str, value: Any, args: tuple, kind: str) -> None:
        path = self.paths.get(module)
        if path is None:
            if self.previous is not None:
                self.previous.add(module, name, value, args, kind)
            return
        if callable(value):
            global _QUERIES
            saved, _QUERIES = _QUERIES, self.maps.queries
            try:
                with torch.no_grad():
                    value = value(*args)
            finally:
                _QUERIES = saved
        if self.detach:
            value = value.detach()
        key = f"{path}:{name}" if path and name else path or name
        if key in self.maps:
            i = 1
            while f"{key}#{i}" in self.maps:
                i += 1
            key = f"{key}#{i}"
        self.maps[key] = value
        self.maps.kinds[key] = kind


_ACTIVE: _Recorder | None = None
_QUERIES: Queries = CENTRE  # the queries of the recording a lazy map is computed for


def recording() -> bool:
    """Whether a ``record_attention`` is active (anywhere in the process)."""
    return _ACTIVE is not None


def record(module: nn.Module, name: str, value: torch.Tensor | Callable[..., torch.Tensor],
           *args: Any, kind: Kind = "spatial") -> None:
    """Store ``value`` as the attention map ``name`` of ``module``, if a
    ``record_attention`` over a model holding ``module`` is active; else do nothing.

    ``value`` is a tensor, or a function called as ``value(*args)`` only while recording
    (so a block computes an expensive map lazily, under ``no_grad``); inside it,
    :func:`chosen_queries` gives the query positions the recording asks for.
    """
    recorder = _ACTIVE
    if recorder is None:
        return
    if torch.compiler.is_compiling():
        return
    recorder.add(module, name, value, args, kind)


def query_index(queries: Queries, height: int, width: int,
                device: torch.device | None = None) -> torch.Tensor | None:
    """Flat indices of ``queries`` ((y, x) fractions of the map's height and width, in
    [0, 1]) on a (height, width) grid; None for ``"all"``."""
    if isinstance(queries, str):
        if queries != "all":
            raise ValueError(f"queries must be (y, x) fractions or 'all', got {queries!r}")
        return None
    flat = []
    for y, x in queries:
        row = min(max(int(y * height), 0), height - 1)
        col = min(max(int(x * width), 0), width - 1)
        flat.append(row * width + col)
    return torch.tensor(flat, dtype=torch.long, device=device)


def chosen_queries(height: int, width: int, device: torch.device | None = None
                   ) -> torch.Tensor | None:
    """For a lazy map being recorded: the flat indices (row * width + col) of the query
    positions the recording asks for on a (height, width) grid, or None for all."""
    return query_index(_QUERIES, height, width, device)


def select_queries(index: torch.Tensor | None, tokens: torch.Tensor, dim: int = -2
                   ) -> torch.Tensor:
    """The rows of ``tokens`` (queries along ``dim``) that ``index`` picks; all for None."""
    return tokens if index is None else tokens.index_select(dim, index.to(tokens.device))


def key_grid(keys: int, height: int, width: int) -> tuple[int, int]:
    """The (Hk, Wk) grid of ``keys`` key positions for an (H, W) query map: the same
    grid, or one subsampled by 2 (rounding down, a side of 1 kept, or rounding up), else
    a single row."""
    for grid in ((height, width), (max(1, height // 2), max(1, width // 2)),
                 (-(-height // 2), -(-width // 2))):
        if grid[0] * grid[1] == keys:
            return grid
    return 1, keys


def dot_product_affinity(q: torch.Tensor, k: torch.Tensor, size: tuple[int, int],
                         scale: float = 1.0,
                         extra: Callable[[torch.Tensor | None], torch.Tensor] | None = None,
                         key_size: tuple[int, int] | None = None) -> torch.Tensor:
    """A lazy affinity map for ``record``: ``softmax(q k^T * scale [+ extra(index)])`` for
    the chosen queries of an (H, W) = ``size`` query grid, as maps over the key grid:
    q (..., H*W, d), k (..., Hk*Wk, d) -> (..., Q, Hk, Wk). ``extra(index)`` adds logits
    (relative positions) for the chosen rows (``index`` None: all rows)."""
    index = chosen_queries(*size, q.device)
    logits = select_queries(index, q) @ k.transpose(-1, -2) * scale
    if extra is not None:
        logits = logits + extra(index)
    hk, wk = key_size or key_grid(k.shape[-2], *size)
    return logits.softmax(-1).unflatten(-1, (hk, wk))


@contextmanager
def record_attention(model: nn.Module, queries: Queries = CENTRE, detach: bool = True
                     ) -> Iterator[AttentionMaps]:
    """Record the attention maps of every block in ``model`` during the forward passes
    run inside the ``with``: ``{module path[:name]: tensor}`` (see the module docs for
    keys, kinds and shapes).

    ``queries``: the query positions of pairwise (affinity) maps, as (y, x) fractions of
    each map's height and width (default: the centre), or ``"all"`` for the full
    attention matrix. ``detach``: store detached tensors (default), or keep them in the
    autograd graph (e.g. to regularise attention). Recording runs in eager mode; inside
    ``torch.compile`` nothing is recorded. One recording per model at a time; nested
    recordings over different models each get their own blocks' maps.
    """
    global _ACTIVE
    query_index(queries, 1, 1)  # validate early
    maps = AttentionMaps(queries)
    recorder = _Recorder({m: p for p, m in model.named_modules()}, maps, detach, _ACTIVE)
    _ACTIVE = recorder
    try:
        yield maps
    finally:
        _ACTIVE = recorder.previous


# --- pictures ---------------------------------------------------------------------------

SPATIAL_KINDS = ("spatial", "affinity")


def spatial_maps(maps: AttentionMaps, index: int = 0) -> dict[str, torch.Tensor]:
    """One (H, W) heat map per spatial or affinity map of ``maps`` (of batch element
    ``index``): channels, heads and queries averaged. Maps smaller than 2x2 are left out
    (a 1x1 map is a channel weight, not a place)."""
    out = {}
    for key, value in maps.items():
        if maps.kinds.get(key) not in SPATIAL_KINDS or value.dim() < 3:
            continue
        if value.shape[-1] < 2 or value.shape[-2] < 2:
            continue
        heat = value[index].float()
        out[key] = heat.reshape(-1, *heat.shape[-2:]).mean(0)
    return out


def _colormap(values: torch.Tensor) -> torch.Tensor:
    """(H, W) in [0, 1] -> (H, W, 3) RGB in [0, 1]: a blue-cyan-yellow-red ramp."""
    stops = torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.5, 1.0], [0.2, 1.0, 0.8], [1.0, 1.0, 0.0],
                          [1.0, 0.3, 0.0], [0.6, 0.0, 0.0]])
    pos = values.clamp(0, 1) * (len(stops) - 1)
    low = pos.floor().long().clamp(max=len(stops) - 2)
    frac = (pos - low).unsqueeze(-1)
    return stops[low] * (1 - frac) + stops[low + 1] * frac


def overlay(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``image`` (3, H, W) in [0, 1] blended with ``heat`` (h, w), min-max normalised and
    bilinearly resized to (H, W): (3, H, W) in [0, 1]."""
    heat = heat.float()
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    heat = nn.functional.interpolate(heat[None, None], size=image.shape[-2:], mode="bilinear",
                                     align_corners=False)[0, 0]
    color = _colormap(heat).permute(2, 0, 1)
    return (1 - alpha) * image + alpha * color


def grid_layout(count: int, columns: int = 4) -> tuple[int, int]:
    """(rows, columns) of a grid of ``count`` panels (at least one row and column)."""
    columns = max(1, min(columns, count))
    return max(1, math.ceil(count / columns)), columns


def render_maps(image: torch.Tensor, maps: AttentionMaps, panel: int = 160, columns: int = 4,
                alpha: float = 0.5, label_height: int = 14) -> Image.Image:
    """A grid of ``panel`` x ``panel`` tiles, one per spatial map of ``maps`` (in
    recording order), each the image overlaid with that map and labelled with its key.
    ``image`` is (3, H, W) in [0, 1]. Each tile is ``panel + label_height`` pixels high.
    With no spatial map, one tile shows the image alone, labelled so."""
    from PIL import Image, ImageDraw

    heats = spatial_maps(maps)
    small = nn.functional.interpolate(image[None].float(), size=(panel, panel),
                                      mode="bilinear", align_corners=False)[0].clamp(0, 1)
    tiles = [(key, overlay(small, heat, alpha)) for key, heat in heats.items()]
    if not tiles:
        tiles = [("(no spatial attention maps)", small)]
    rows, cols = grid_layout(len(tiles), columns)
    tile_h = panel + label_height
    canvas = Image.new("RGB", (cols * panel, rows * tile_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (key, tile) in enumerate(tiles):
        r, c = divmod(i, cols)
        pixels = (tile.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        canvas.paste(Image.fromarray(pixels), (c * panel, r * tile_h + label_height))
        text = key if len(key) <= panel // 6 else "..." + key[-(panel // 6 - 3):]
        draw.text((c * panel + 2, r * tile_h + 1), text, fill="black")
    return canvas


def load_image(path: str, input_size: tuple[int, int, int], mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An image file resized (bilinear) to ``input_size`` (C, H, W): the model input
    (1, C, H, W), normalised by ``mean``/``std`` when given, and the picture (3, H, W)
    in [0, 1] to draw on. One channel: the image in grey."""
    from PIL import Image

    chans, h, w = input_size
    with Image.open(path) as img:
        img = img.convert("L" if chans == 1 else "RGB").resize((w, h), Image.BILINEAR)
        pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    picture = pixels.view(h, w, -1).permute(2, 0, 1).float() / 255
    x = picture.clone()
    if mean is not None and std is not None:
        x = (x - torch.tensor(mean[:chans]).view(-1, 1, 1)) / torch.tensor(
            std[:chans]).view(-1, 1, 1)
    return x[None], picture.expand(3, h, w)
