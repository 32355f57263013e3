"""Generate ``docs/models.md``, the table of every zoo model.

    python tools/make_docs.py            # (re)write docs/models.md
    python tools/make_docs.py --check    # exit 1 when the committed file is stale

One row per ``attnzoo.list_models()`` model: its name, paper, what it follows (the
authors' released code, the paper, or the zoo's own composition: read from the spec's
``description``), blocks and sites, parameter count and multiply-adds at its input
size. Every model is built on
the meta device (no memory, no initialisation) and run once there under
``torch.utils.flop_counter.FlopCounterMode``, which needs shapes only, so the
whole table takes well under a minute on a laptop CPU and is the same on every
machine: the output depends only on the specs, attnzoo, timm and torch.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from _generated import generator_main

if TYPE_CHECKING:
    from torch import nn

    from attnzoo.spec import Insertion, ModelSpec

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "models.md"
IMAGE_SIZE = 224

# Titles for the paper URLs the zoo's specs cite (a spec stores the URL only).
# A URL missing here is shown by its arXiv id or as it is.
PAPER_TITLES = {
    "https://arxiv.org/abs/1506.02025": "Spatial Transformer Networks",
    "https://arxiv.org/abs/1704.06904": "Residual Attention Network for Image Classification",
    "https://arxiv.org/abs/1706.03762": "Attention Is All You Need",
    "https://arxiv.org/abs/1709.01507": "Squeeze-and-Excitation Networks",
    "https://arxiv.org/abs/1711.07971": "Non-local Neural Networks",
    "https://arxiv.org/abs/1803.02579":
        "Concurrent Spatial and Channel 'Squeeze & Excitation' in Fully Convolutional Networks",
    "https://arxiv.org/abs/1805.10180": "Pyramid Attention Network for Semantic Segmentation",
    "https://arxiv.org/abs/1807.06514": "BAM: Bottleneck Attention Module",
    "https://arxiv.org/abs/1807.06521": "CBAM: Convolutional Block Attention Module",
    "https://arxiv.org/abs/1807.09940": "Reverse Attention for Salient Object Detection",
    "https://arxiv.org/abs/1808.00897":
        "BiSeNet: Bilateral Segmentation Network for Real-time Semantic Segmentation",
    "https://arxiv.org/abs/1809.02983": "Dual Attention Network for Scene Segmentation",
    "https://arxiv.org/abs/1810.11579": "A^2-Nets: Double Attention Networks",
    "https://arxiv.org/abs/1810.12348":
        "Gather-Excite: Exploiting Feature Context in Convolutional Neural Networks",
    "https://arxiv.org/abs/1811.11721": "CCNet: Criss-Cross Attention for Semantic Segmentation",
    "https://arxiv.org/abs/1811.12006": "Global Second-order Pooling Convolutional Networks",
    "https://arxiv.org/abs/1903.06586": "Selective Kernel Networks",
    "https://arxiv.org/abs/1904.05873":
        "An Empirical Study of Spatial Attention Mechanisms in Deep Networks",
    "https://arxiv.org/abs/1904.11492":
        "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
    "https://arxiv.org/abs/1905.09646":
        "Spatial Group-wise Enhance: Improving Semantic Feature Learning in Convolutional Networks",
    "https://arxiv.org/abs/1909.11519": "Gated Channel Transformation for Visual Recognition",
    "https://arxiv.org/abs/1910.03151":
        "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks",
    "https://arxiv.org/abs/1911.06667": "CenterMask: Real-Time Anchor-Free Instance Segmentation",
    "https://arxiv.org/abs/2004.08955": "ResNeSt: Split-Attention Networks",
    "https://arxiv.org/abs/2006.06668": "Disentangled Non-Local Neural Networks",
    "https://arxiv.org/abs/2010.03045": "Rotate to Attend: Convolutional Triplet Attention Module",
    "https://arxiv.org/abs/2012.11879": "FcaNet: Frequency Channel Attention Networks",
    "https://arxiv.org/abs/2101.11605": "Bottleneck Transformers for Visual Recognition",
    "https://arxiv.org/abs/2102.00240":
        "SA-Net: Shuffle Attention for Deep Convolutional Neural Networks",
    "https://arxiv.org/abs/2102.08602":
        "LambdaNetworks: Modeling Long-Range Interactions Without Attention",
    "https://arxiv.org/abs/2103.02907": "Coordinate Attention for Efficient Mobile Network Design",
    "https://arxiv.org/abs/2103.12731":
        "Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
    "https://arxiv.org/abs/2104.13188": "Rethinking BiSeNet For Real-time Semantic Segmentation",
    "https://arxiv.org/abs/2105.02358":
        "Beyond Self-attention: External Attention using Two Linear Layers for Visual Tasks",
    "https://arxiv.org/abs/2106.13112": "VOLO: Vision Outlooker for Visual Recognition",
    "https://arxiv.org/abs/2107.00782":
        "Polarized Self-Attention: Towards High-quality Pixel-wise Regression",
    "https://arxiv.org/abs/2107.12292": "Contextual Transformer Networks for Visual Recognition",
    "https://arxiv.org/abs/2305.13563":
        "Efficient Multi-Scale Attention Module with Cross-Spatial Learning",
    "https://proceedings.mlr.press/v139/yang21o.html":
        "SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural Networks",
}

HEADER = """\
# Model zoo

<!-- Generated by tools/make_docs.py from specs/; do not edit by hand.
     `python tools/make_docs.py` rewrites it, `--check` (and
     tests/tools/test_make_docs.py) fails when it is stale. -->

Every model that `attnzoo.list_models()` returns, as `attnzoo.create_model(name)`
builds it (random initialisation, the spec's default number of classes).

- **follows**: what the model reproduces, as its spec's description states it:
  *released code* (the network of the authors' released code or checkpoints, which
  produced the paper's numbers), *paper* (the paper's description, where no code was
  released or the zoo follows the text), or *zoo's own* (a composition of the zoo's,
  such as a block on a backbone its paper did not use), or *timm's `name`* (the
  network of that timm model, whose weights load into it; a test shows equal outputs).
- **blocks and sites**: for each insertion of the spec, the block type, how many
  blocks the builder placed (`×N`) and the site: an alias of the backbone family
  (resnet: `after_conv1`, `after_conv2`, `after_conv3`, `residual` = after the
  block's last BN, before the add, `post_add`) or a module-path glob with its
  position (after, before, replacing), then any stage/block filter. For networks
  that are attnzoo architectures (`source: attnzoo`), the attention blocks the
  architecture builds from its arguments, counted in the built model.
- **params**: every parameter of the model, classifier included.
- **input**: the C×H×W the multiply-adds are counted at: 224×224 unless the spec
  fixes its own input size (`digits_cbam_tiny` is made for 1×8×8 digit images).
- **GMACs (paper "FLOPs")**: billions of multiply-adds for one image in eval mode.
  `torch.utils.flop_counter.FlopCounterMode` counts 2 FLOPs per multiply-add; papers,
  timm and torchvision report multiply-adds and call them FLOPs, so the column is
  FlopCounterMode's total / 2 and compares directly with the papers' "GFLOPs".
  FlopCounterMode counts convolutions, matrix products (`mm`, `bmm`, `addmm`,
  `baddbmm`) and `scaled_dot_product_attention`; element-wise operations,
  normalisation, pooling, softmax, `grid_sample` and `unfold` are not counted, so a
  parameter-free block such as SimAM adds nothing here. The count runs on the meta
  device (shapes only) and equals the count of a real CPU forward pass.
  `attnzoo summary NAME --input-size N` gives the same figure at any size, per block.

"""

COLUMNS = ("model", "paper", "follows", "blocks and sites", "params", "input",
           'GMACs (paper "FLOPs")')

# What a spec's description says the model follows: the first pattern that matches,
# in this order (a description may name the paper while saying it is the zoo's own).
FOLLOWS = (
    ("zoo's own", re.compile(r"\bzoo's own composition\b", re.IGNORECASE)),
    ("released code", re.compile(r"\bfollows the (?:authors' )?released code\b",
                                 re.IGNORECASE)),
    ("paper", re.compile(r"\bfollows the paper\b", re.IGNORECASE)),
    ("timm's `{0}`", re.compile(r"\bequals timm's ([\w.]+)")),
)


def follows(description: str) -> str:
    """The "follows" cell: released code, paper, zoo's own or a timm model, from the
    description's wording ("follows the authors' released code", "follows the paper",
    "the zoo's own composition", "equals timm's NAME"); "-" when it says none of them."""
    for label, pattern in FOLLOWS:
        found = pattern.search(description)
        if found:
            return label.format(*found.groups())
    return "-"


@dataclass(frozen=True)
class ModelRow:
    """One line of the table."""

    name: str
    paper: str
    blocks: str
    params: int
    input_size: tuple[int, int, int]
    flops: int  # as FlopCounterMode counts them: 2 per multiply-add
    follows: str = "-"  # released code | paper | zoo's own (see FOLLOWS)

    def cells(self) -> list[str]:
        gmacs = self.flops / 2e9
        return [f"`{self.name}`", self.paper, self.follows, self.blocks, f"{self.params:,}",
                "×".join(map(str, self.input_size)),
                f"{gmacs:.3f}" if gmacs >= 0.01 else f"{gmacs:.5f}"]


def paper_link(url: str | None) -> str:
    """A markdown link for the spec's paper URL: its title when known, else its arXiv id."""
    if not url:
        return "-"
    title = PAPER_TITLES.get(url)
    arxiv = url.rsplit("/", 1)[-1] if "arxiv.org/abs/" in url else None
    if title:
        return f"[{title}]({url})" + (f" (arXiv:{arxiv})" if arxiv else "")
    return f"[arXiv:{arxiv}]({url})" if arxiv else f"<{url}>"


def _site_text(insertion: Insertion) -> str:
    """Where an insertion goes: its alias or path glob and position, then its filters."""
    at = insertion.at
    if isinstance(at, str):
        text = f"at `{at}`"
    else:
        verb = {"after": "after", "before": "before", "replace": "replacing"}[at.position]
        text = f"{verb} `{at.path}`"
    filters = []
    for label, values in (("stage", insertion.stages), ("block", insertion.blocks)):
        if values is not None:
            plural = "s" if len(values) > 1 else ""
            filters.append(f"{label}{plural} {', '.join(map(str, values))}")
    if filters:
        text += f" ({'; '.join(filters)})"
    if insertion.zero_init:
        text += ", zero-init"
    return text


def _architecture_blocks(model: nn.Module, inserted: Iterable[str]) -> dict[str, int]:
    """Registered attention blocks built by the architecture itself, by type: the
    outermost instances of registered block classes outside the inserted blocks."""
    from attnzoo.registry import block_configs

    classes = {cfg.module: name for name, cfg in block_configs().items()}
    skip = tuple(f"{name}." for name in inserted)
    counts: dict[str, int] = {}
    for path, module in model.named_modules():
        if path in inserted or f"{path}.".startswith(skip):
            continue
        block_type = next((classes[c] for c in type(module).__mro__ if c in classes), None)
        if block_type is not None:
            counts[block_type] = counts.get(block_type, 0) + 1
            skip += (f"{path}.",)
    return counts


def blocks_and_sites(spec: ModelSpec, model: nn.Module) -> str:
    """The "blocks and sites" cell: one line per insertion (its block type, how many
    blocks the builder placed and the spec's site), then the architecture's own blocks."""
    from attnzoo.sites import resolve_sites

    placed = {(b.block_type, b.site, b.position) for b in model.attnzoo_blocks}
    parts = []
    for i, insertion in enumerate(spec.insert):
        block_type = insertion.block.block_type()
        # Sites are resolved as the builder does; those already in the built model keep
        # their paths, so the ones that hold a block of this type are this insertion's.
        sites = resolve_sites(model, insertion, f"{spec.name}: insert[{i}]")
        count = sum((block_type, s.path, s.position) in placed for s in sites)
        parts.append(f"`{block_type}` ×{count} {_site_text(insertion)}")
    if spec.backbone.source == "attnzoo":
        own = _architecture_blocks(model, {b.name for b in model.attnzoo_blocks})
        if own:
            listed = ", ".join(f"`{t}` ×{n}" for t, n in own.items())
            parts.append(f"{listed} in the `{spec.backbone.name}` architecture")
        elif not parts:
            parts.append(f"`{spec.backbone.name}` architecture")
    return "<br>".join(parts) if parts else "-"


def model_row(name: str) -> ModelRow:
    """Build ``name`` on the meta device and measure it."""
    from attnzoo import load_spec
    from attnzoo.builder import build_model, probe_input_size
    from attnzoo.cli import count_flops

    spec = load_spec(name)
    model = build_model(spec, device="meta")
    if spec.input_size is not None:
        size = tuple(spec.input_size)
    else:
        chans = probe_input_size(model, spec, spec.backbone.args)[0]
        size = (chans, IMAGE_SIZE, IMAGE_SIZE)
    return ModelRow(
        name=spec.name,
        paper=paper_link(spec.paper),
        follows=follows(spec.description),
        blocks=blocks_and_sites(spec, model),
        params=sum(p.numel() for p in model.parameters()),
        input_size=size,
        flops=count_flops(model, size)[0],  # the same count as `attnzoo summary`
    )


def render(names: Iterable[str] | None = None) -> str:
    """The whole of docs/models.md."""
    import attnzoo

    rows = [model_row(n) for n in (attnzoo.list_models() if names is None else names)]
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join(["---"] * 4 + ["---:"] * 3) + "|"]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return HEADER + "\n".join(lines) + f"\n\n{len(rows)} models.\n"


def main(argv: Sequence[str] | None = None) -> int:
    return generator_main(argv, __doc__.split("\n\n")[0], render, OUTPUT, ROOT, "make_docs.py")


if __name__ == "__main__":
    sys.exit(main())
