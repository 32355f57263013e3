"""Where a block can go: module-path globs, stage/block filters and family aliases.

A site is a module path in the backbone plus a position (after / before /
replace). Sites are resolved against the backbone as built, before anything
is inserted, so the order of insertions never changes where later ones land.
Stages and aliases are found by module structure (:mod:`attnzoo.aliases`): stages
are numbered from 1 and blocks from 0 in every family, and a stage or block index
that the model does not have is an error that lists the ones it has.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from .aliases import FAMILIES, Stage, describe_stages, find_stages, locate, resolve_alias
from .errors import SpecError
from .layouts import Stated
from .spec import Insertion, SiteSelector

RESNET_ALIASES = tuple(FAMILIES["resnet"][1])


@dataclass(frozen=True)
class SiteRef:
    """A resolved site: the module at ``path`` and where the block goes relative to it;
    ``stated``: the layout the site's spec states (``layout:``), if any."""

    path: str
    position: str  # "after" | "before" | "replace"
    stated: Stated | None = None


def stage_and_block(model: nn.Module, path: str) -> tuple[int | None, int | None]:
    """The (stage, block index) a module path lies in, or (None, None)."""
    return locate(find_stages(model), path)


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


def _stated(selector: SiteSelector) -> Stated | None:
    layout = getattr(selector, "layout", None)
    if layout is None:
        return None
    grid = getattr(selector, "grid", None)
    return Stated(layout, getattr(selector, "prefix_tokens", None),
                  tuple(grid) if grid is not None else None)


def _check_filters(model: nn.Module, insertion: Insertion, stages: list[Stage],
                   where: str) -> None:
    """Every stage and block index of the filters exists in ``model``."""
    name = type(model).__name__
    filters = f"stages={insertion.stages} blocks={insertion.blocks}"
    if not stages:
        raise SpecError(f"{where}: {filters}, but {name} has no stages attnzoo can number "
                        "(docs/sites.md says which it finds); select sites with a path glob")
    if insertion.stages is not None:
        valid = sorted({s.number for s in stages})
        bad = [n for n in insertion.stages if n not in valid]
        if bad:
            raise SpecError(f"{where}: stages={insertion.stages}: stage "
                            f"{', '.join(map(str, bad))} out of range; {name} has stages "
                            f"{', '.join(map(str, valid))} (numbered from 1): "
                            f"{describe_stages(stages)}")
    if insertion.blocks is not None:
        chosen = [s for s in stages if insertion.stages is None or s.number in insertion.stages]
        bad = [b for b in insertion.blocks if not any(0 <= b < len(s.blocks) for s in chosen)]
        if bad:
            have = "; ".join(f"stage {s.number} has blocks 0-{len(s.blocks) - 1}"
                             if s.blocks else f"stage {s.number} has no blocks"
                             for s in chosen)
            raise SpecError(f"{where}: blocks={insertion.blocks}: block "
                            f"{', '.join(map(str, bad))} out of range in the selected "
                            f"stages (blocks are numbered from 0 in each stage): {have}")


def _keep(path: str, insertion: Insertion, stages: list[Stage]) -> bool:
    if insertion.stages is None and insertion.blocks is None:
        return True
    stage, block = locate(stages, path)
    if insertion.stages is not None and stage not in insertion.stages:
        return False
    return insertion.blocks is None or block in insertion.blocks


def resolve_sites(model: nn.Module, insertion: Insertion, where: str,
                  stages: list[Stage] | None = None) -> list[SiteRef]:
    """Every site the insertion selects, in module order. ``where`` names the
    insertion in errors (e.g. 'resnet50_cbam: insert[0]')."""
    if stages is None:
        stages = find_stages(model)
    if insertion.stages is not None or insertion.blocks is not None:
        _check_filters(model, insertion, stages, where)
    if isinstance(insertion.at, SiteSelector):
        modules = dict(model.named_modules())
        matched = [p for p in modules if p and glob_match(insertion.at.path, p)]
        if not matched:
            close = difflib.get_close_matches(insertion.at.path, [p for p in modules if p], n=5,
                                              cutoff=0.4)
            hint = f"; close paths: {', '.join(close)}" if close else ""
            raise SpecError(f"{where}: site path {insertion.at.path!r} matches no module of "
                            f"{type(model).__name__}{hint}")
        stated = _stated(insertion.at)
        sites = [SiteRef(p, insertion.at.position, stated) for p in matched
                 if _keep(p, insertion, stages)]
        pattern = f"path {insertion.at.path!r}"
    else:
        found = resolve_alias(model, insertion.at, stages, where)
        sites = [SiteRef(s.path, s.position) for s in found
                 if _keep(s.block, insertion, stages)]
        pattern = f"alias {insertion.at!r}"
    if not sites:
        raise SpecError(f"{where}: {pattern} matches modules, but none in stages="
                        f"{insertion.stages} blocks={insertion.blocks}")
    return sites
