"""Where a block can go: module-path globs, stage/block filters and family aliases.

A site is a module path in the backbone plus a position (after / before /
replace). Sites are resolved against the backbone as built, before anything
is inserted, so the order of insertions never changes where later ones land.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from torch import nn

from .errors import SpecError
from .spec import Insertion, SiteSelector

# (stage, block) of a module path, tried in order; the first match wins.
_STAGE_BLOCK_PATTERNS = (
    re.compile(r"(?:^|\.)layer(?P<stage>\d+)\.(?P<block>\d+)(?=\.|$)"),               # resnet
    re.compile(r"(?:^|\.)stages\.(?P<stage>\d+)\.(?:blocks\.)?(?P<block>\d+)(?=\.|$)"),
    re.compile(r"(?:^|\.)network\.(?P<stage>\d+)\.(?P<block>\d+)(?=\.|$)"),           # volo
    re.compile(r"(?:^|\.)blocks\.(?P<block>\d+)(?=\.|$)"),                            # vit
)

RESNET_ALIASES = ("after_conv1", "after_conv2", "after_conv3", "residual", "post_add")


@dataclass(frozen=True)
class SiteRef:
    """A resolved site: the module at ``path`` and where the block goes relative to it."""

    path: str
    position: str  # "after" | "before" | "replace"


def stage_and_block(path: str) -> tuple[int | None, int | None]:
    """The (stage, block index) a module path lies in, or (None, None)."""
    for pattern in _STAGE_BLOCK_PATTERNS:
        m = pattern.search(path)
        if m:
            stage = m.groupdict().get("stage")
            return (int(stage) if stage is not None else None, int(m["block"]))
    return None, None


def _segment_match(pattern: str, name: str) -> bool:
    """One path segment against a glob segment (``*`` any run, ``?`` one character), in
    O(len(pattern) * len(name)) time: no regex, so no catastrophic backtracking on a
    pattern like ``*a*a*a*a*a*a*a*a*b`` from a stranger's spec."""
    i = j = 0
    star, mark = -1, 0
    while j < len(name):
        if i < len(pattern) and pattern[i] == "*":
            star, mark = i, j
            i += 1
        elif i < len(pattern) and pattern[i] in ("?", name[j]):
            i += 1
            j += 1
        elif star >= 0:
            i, mark = star + 1, mark + 1
            j = mark
        else:
            return False
    return all(ch == "*" for ch in pattern[i:])


def glob_match(pattern: str, path: str) -> bool:
    """Whether a dotted module path matches a dotted glob: ``*`` and ``?`` within one
    segment, a ``**`` segment for any number of segments (zero included, so ``a.**.b``
    matches ``a.b``). Linear in segments x pattern segments."""
    names = path.split(".")
    reach = {0}  # how many path segments the pattern so far can consume
    for segment in pattern.split("."):
        if segment == "**":
            reach = set(range(min(reach), len(names) + 1)) if reach else set()
        else:
            reach = {i + 1 for i in reach
                     if i < len(names) and _segment_match(segment, names[i])}
        if not reach:
            return False
    return len(names) in reach


def _keep(path: str, insertion: Insertion) -> bool:
    if insertion.stages is None and insertion.blocks is None:
        return True
    stage, block = stage_and_block(path)
    if insertion.stages is not None and stage not in insertion.stages:
        return False
    return insertion.blocks is None or block in insertion.blocks


def _is_resnet_block(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("conv1", "bn1", "conv2", "bn2", "act1"))


def _resnet_alias(block_path: str, block: nn.Module, alias: str) -> SiteRef:
    bottleneck = hasattr(block, "conv3")
    last_bn = "bn3" if bottleneck else "bn2"
    table = {
        "after_conv1": ("act1", "after"),
        "after_conv2": ("act2" if bottleneck else "bn2", "after"),
        "residual": (last_bn, "after"),
        "post_add": ("", "after"),
    }
    if bottleneck:
        table["after_conv3"] = ("bn3", "after")
    if alias not in table:
        raise SpecError(f"site alias {alias!r} does not exist in {type(block).__name__} "
                        f"({block_path}); it has {', '.join(sorted(table))}")
    child, position = table[alias]
    return SiteRef(f"{block_path}.{child}" if child else block_path, position)


def resolve_sites(model: nn.Module, insertion: Insertion, where: str) -> list[SiteRef]:
    """Every site the insertion selects, in module order. ``where`` names the
    insertion in errors (e.g. 'resnet50_cbam: insert[0]')."""
    modules = dict(model.named_modules())
    if isinstance(insertion.at, SiteSelector):
        matched = [p for p in modules if p and glob_match(insertion.at.path, p)]
        if not matched:
            close = difflib.get_close_matches(insertion.at.path, [p for p in modules if p], n=5,
                                              cutoff=0.4)
            hint = f"; close paths: {', '.join(close)}" if close else ""
            raise SpecError(f"{where}: site path {insertion.at.path!r} matches no module of "
                            f"{type(model).__name__}{hint}")
        sites = [SiteRef(p, insertion.at.position) for p in matched if _keep(p, insertion)]
        pattern = f"path {insertion.at.path!r}"
    else:
        alias = insertion.at
        blocks = [(p, m) for p, m in modules.items()
                  if re.search(r"(?:^|\.)layer\d+\.\d+$", p) and _is_resnet_block(m)]
        if not blocks:
            raise SpecError(
                f"{where}: site alias {alias!r} needs a resnet-family backbone, and "
                f"{type(model).__name__} has no resnet blocks; use {{path: <glob>, "
                "position: after|before|replace} instead"
            )
        if alias not in RESNET_ALIASES:
            raise SpecError(f"{where}: unknown site alias {alias!r}; resnet aliases are "
                            f"{', '.join(RESNET_ALIASES)}, or give {{path, position}}")
        sites = [_resnet_alias(p, m, alias) for p, m in blocks if _keep(p, insertion)]
        pattern = f"alias {alias!r}"
    if not sites:
        raise SpecError(f"{where}: {pattern} matches modules, but none in stages="
                        f"{insertion.stages} blocks={insertion.blocks}")
    return sites
