"""Stages, blocks and site aliases, found by module structure.

**Stages** are numbered from 1, in the order the network runs them, in every family:

==============================  =========================================
family                          stage N is
==============================  =========================================
ResNet/ResNeXt (timm, tv)       ``layerN``
RegNet (timm)                   ``sN``
ConvNeXt, CSPNet, attnzoo nets  ``stages.<N-1>`` (its ``blocks`` if any)
Swin                            ``layers.<N-1>.blocks``
EfficientNet, MobileNetV3       ``blocks.<N-1>``
ViT, DeiT                       ``blocks`` (one stage: stage 1)
VOLO                            the N-th block group of ``network``
==============================  =========================================

**Blocks** are numbered from 0 within their stage, in order (RegNet's ``b1`` is
block 0). A network with stages in several places (an encoder and a decoder) numbers
each group from 1.

**Aliases** name a place inside a block. They are found by the block's children
(not its class name), so they work on timm's, torchvision's and your own blocks of
the same structure; :data:`FAMILIES` lists them, ``docs/sites.md`` explains them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .errors import SpecError

_CONTAINERS = (nn.Sequential, nn.ModuleList)
_OURS = ("attnzoo_before", "attnzoo_after")


@dataclass(frozen=True)
class Stage:
    """One stage: its number (from 1), its module path and its blocks' paths."""

    number: int
    path: str
    blocks: tuple[str, ...]


# family -> (which blocks, {alias: what it is}); aliases in the order they run.
FAMILIES: dict[str, tuple[str, dict[str, str]]] = {
    "resnet": ("ResNet/ResNeXt basic and bottleneck blocks, timm's and torchvision's "
               "(children conv1, bn1, conv2, bn2, act1 or relu; conv3, bn3)", {
                   "after_conv1": "after the first conv's BN and ReLU (torchvision: after "
                                  "bn1, its ReLU module is shared)",
                   "after_conv2": "after the second conv (bottleneck: its BN and ReLU; "
                                  "basic block and torchvision: after bn2)",
                   "after_conv3": "after the bottleneck's last BN (bn3)",
                   "residual": "end of the residual branch (last BN), before the add",
                   "post_add": "after the block: the residual add and its ReLU"}),
    "convnext": ("ConvNeXt blocks (conv_dw, norm, mlp)", {
        "after_dwconv": "after the 7x7 depthwise conv (NCHW)",
        "residual": "after the MLP, before layer scale and the add (NHWC in timm's "
                    "ConvNeXt: blocks that take NCHW are run permuted)",
        "post_add": "after the block"}),
    "mobile": ("EfficientNet / MobileNetV3 / MnasNet inverted-residual and depthwise-"
               "separable blocks (conv_dw, se; conv_pwl+bn3 or conv_pw+bn2)", {
                   "after_dwconv": "after the depthwise conv's BN and activation (the SE "
                                   "slot's input)",
                   "se_slot": "replaces the SE module (or the Identity where a block has "
                              "none)",
                   "after_se": "after the SE slot (its output; the depthwise output "
                               "where the slot is empty)",
                   "after_project": "after the projection conv's BN, before the skip add",
                   "post_add": "after the block"}),
    "regnet": ("RegNet bottlenecks (conv1, conv2, se, conv3; conv-norm-act modules)", {
        "after_conv1": "after the 1x1 conv-BN-ReLU",
        "after_conv2": "after the grouped 3x3 conv-BN-ReLU",
        "se_slot": "replaces the SE module (the Identity in RegNetX)",
        "after_se": "after the SE slot",
        "residual": "after conv3 (1x1 conv-BN), before the add",
        "post_add": "after the block"}),
    "transformer": ("transformer blocks with attn and mlp children: ViT, DeiT, Swin, "
                    "VOLO, ...", {
                        "after_attn": "after the attention (ViT: tokens with the class "
                                      "token; Swin: the tokens of each window)",
                        "after_mlp": "after the MLP, before its residual add",
                        "post_add": "after the block"}),
}


def _has(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Module) for n in names)


def block_family(block: nn.Module) -> tuple[str, dict[str, tuple[str, str]]] | None:
    """(family, {alias: (child path, position)}) of a block, by its children; None for
    a block of no known family."""
    if _has(block, "conv1", "bn1", "conv2", "bn2") and (_has(block, "act1")
                                                       or _has(block, "relu")):
        bottleneck, timm_style = _has(block, "conv3", "bn3"), _has(block, "act1")
        table = {"after_conv1": ("act1" if timm_style else "bn1", "after"),
                 "after_conv2": ("act2" if bottleneck and timm_style else "bn2", "after")}
        if bottleneck:
            table["after_conv3"] = ("bn3", "after")
        table["residual"] = ("bn3" if bottleneck else "bn2", "after")
        table["post_add"] = ("", "after")
        return "resnet", table
    if _has(block, "attn", "mlp"):
        return "transformer", {"after_attn": ("attn", "after"), "after_mlp": ("mlp", "after"),
                               "post_add": ("", "after")}
    if _has(block, "conv_dw", "mlp"):
        return "convnext", {"after_dwconv": ("conv_dw", "after"), "residual": ("mlp", "after"),
                            "post_add": ("", "after")}
    if _has(block, "conv_dw", "se"):
        inverted = _has(block, "conv_pwl", "bn3")
        dw_bn, proj_bn = ("bn2", "bn3") if inverted else ("bn1", "bn2")
        if _has(block, dw_bn, proj_bn):
            return "mobile", {"after_dwconv": (dw_bn, "after"), "se_slot": ("se", "replace"),
                              "after_se": ("se", "after"), "after_project": (proj_bn, "after"),
                              "post_add": ("", "after")}
    if _has(block, "conv1", "conv2", "conv3", "se"):
        return "regnet", {"after_conv1": ("conv1", "after"), "after_conv2": ("conv2", "after"),
                          "se_slot": ("se", "replace"), "after_se": ("se", "after"),
                          "residual": ("conv3", "after"), "post_add": ("", "after")}
    return None


# ---------------------------------------------------------------------------- stages


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _numbered(module: nn.Module | None) -> list[tuple[str, nn.Module]] | None:
    """The children of a Sequential/ModuleList named 0..n-1 (attnzoo's own blocks
    attached to it left out); None for anything else."""
    if not isinstance(module, _CONTAINERS):
        return None
    items = [(n, c) for n, c in module.named_children() if n not in _OURS]
    if not items or any(not n.isdigit() for n, _ in items):
        return None
    return items


def _stage_blocks(path: str, stage: nn.Module) -> tuple[str, ...] | None:
    inner = getattr(stage, "blocks", None)
    items = _numbered(inner) if isinstance(inner, nn.Module) else None
    if items is not None:
        return tuple(_join(path, f"blocks.{n}") for n, _ in items)
    items = _numbered(stage)
    return None if items is None else tuple(_join(path, n) for n, _ in items)


def _groups(prefix: str, module: nn.Module) -> list[Stage]:
    """The stages whose containers are children of ``module`` (at ``prefix``)."""
    kids = {n: c for n, c in module.named_children() if n not in _OURS}
    found = []
    for name, child in kids.items():  # ResNet: layer1..layerN, numbered by their name
        m = re.fullmatch(r"layer(\d+)", name)
        if m and (items := _numbered(child)):
            found.append(Stage(int(m[1]), _join(prefix, name),
                               tuple(_join(prefix, f"{name}.{n}") for n, _ in items)))
    if found:
        return sorted(found, key=lambda s: s.number)
    for name, child in kids.items():  # RegNet: s1..sN holding b1..bM
        m = re.fullmatch(r"s(\d+)", name)
        blocks = sorted(((int(b[1]), n) for n, _ in child.named_children()
                         if (b := re.fullmatch(r"b(\d+)", n))))
        if m and blocks and len(blocks) == len([n for n in child._modules if n not in _OURS]):
            found.append(Stage(int(m[1]), _join(prefix, name),
                               tuple(_join(prefix, f"{name}.{n}") for _, n in blocks)))
    if found:
        return sorted(found, key=lambda s: s.number)
    for name in ("stages", "layers", "blocks", "network"):
        items = _numbered(kids.get(name))
        if not items:
            continue
        path = _join(prefix, name)
        inner = [(_join(path, n), _stage_blocks(_join(path, n), c)) for n, c in items]
        if name == "network":  # VOLO: block groups between downsampling layers
            inner = [(p, b) for p, b in inner if b is not None]
        if name == "blocks" and not all(b is not None for _, b in inner):
            inner = []  # ViT: a flat list of blocks
        if any(b is not None for _, b in inner):
            return [Stage(i + 1, p, b or ()) for i, (p, b) in enumerate(inner)]
        return [Stage(1, path, tuple(_join(path, n) for n, _ in items))]
    return []


def find_stages(model: nn.Module) -> list[Stage]:
    """Every stage of ``model``, in module order (see the module docstring)."""
    stages: list[Stage] = []
    claimed: list[str] = []
    for path, module in model.named_modules():
        if any(path == c or path.startswith(c + ".") for c in claimed):
            continue
        group = _groups(path, module)
        stages += group
        claimed += [s.path for s in group]
    return stages


def locate(stages: list[Stage], path: str) -> tuple[int | None, int | None]:
    """(stage number, block index) of a module path; None where it lies in none."""
    for stage in stages:
        for index, block in enumerate(stage.blocks):
            if path == block or path.startswith(block + "."):
                return stage.number, index
        if path == stage.path or path.startswith(stage.path + "."):
            return stage.number, None
    return None, None


def describe_stages(stages: list[Stage]) -> str:
    """``1 (layer1, 3 blocks), 2 (layer2, 4 blocks)``: for error messages."""
    return ", ".join(f"{s.number} ({s.path}, {len(s.blocks)} block"
                     f"{'' if len(s.blocks) == 1 else 's'})" for s in stages)


# ---------------------------------------------------------------------------- aliases


@dataclass(frozen=True)
class AliasSite:
    """Where an alias puts a block: the module at ``path``, ``position`` of it."""

    path: str
    position: str
    block: str        # the block the alias lies in
    family: str


def alias_sites(model: nn.Module, stages: list[Stage] | None = None) -> dict[str, list[AliasSite]]:
    """alias -> its sites in every block of every stage, in module order."""
    stages = find_stages(model) if stages is None else stages
    modules = dict(model.named_modules())
    found: dict[str, list[AliasSite]] = {}
    for stage in stages:
        for block_path in stage.blocks:
            family = block_family(modules[block_path])
            if family is None:
                continue
            name, table = family
            for alias, (child, position) in table.items():
                found.setdefault(alias, []).append(
                    AliasSite(_join(block_path, child) if child else block_path, position,
                              block_path, name))
    return found


def families_in(model: nn.Module, stages: list[Stage]) -> dict[str, tuple[str, str]]:
    """family -> (first block path, its class name) for the families of ``model``."""
    modules = dict(model.named_modules())
    seen: dict[str, tuple[str, str]] = {}
    for stage in stages:
        for block_path in stage.blocks:
            family = block_family(modules[block_path])
            if family is not None and family[0] not in seen:
                seen[family[0]] = (block_path, type(modules[block_path]).__name__)
    return seen


def resolve_alias(model: nn.Module, alias: str, stages: list[Stage], where: str
                  ) -> list[AliasSite]:
    """The sites of ``alias`` in ``model``; a SpecError that lists the aliases the
    model's blocks have when it has none."""
    sites = alias_sites(model, stages).get(alias)
    if sites:
        return sites
    present = families_in(model, stages)
    owners = [f for f, (_, table) in FAMILIES.items() if alias in table]
    name = type(model).__name__
    if not owners:
        listed = "; ".join(f"{f} aliases are {', '.join(FAMILIES[f][1])}"
                           for f in (present or FAMILIES))
        raise SpecError(f"{where}: unknown site alias {alias!r}; {listed}, or give "
                        "{path, position}")
    mine = [f for f in owners if f in present]
    if mine:
        block_path, cls = present[mine[0]]
        have = sorted(block_family(model.get_submodule(block_path))[1])
        raise SpecError(f"{where}: site alias {alias!r} does not exist in {cls} "
                        f"({block_path}); it has {', '.join(have)}")
    others = f" (or {', '.join(owners[1:])})" if owners[1:] else ""
    theirs = "; ".join(f"its {f} blocks ({cls}) have {', '.join(FAMILIES[f][1])}"
                       for f, (_, cls) in present.items()) or "it has no blocks of a " \
        f"family attnzoo knows ({', '.join(FAMILIES)})"
    raise SpecError(f"{where}: site alias {alias!r} needs a {owners[0]}-family "
                    f"backbone{others}, and {name} has no {owners[0]} blocks; {theirs}; "
                    "use {path: <glob>, position: after|before|replace} instead")


__all__ = ["FAMILIES", "AliasSite", "Stage", "alias_sites", "block_family",
           "describe_stages", "families_in", "find_stages", "locate", "resolve_alias"]
