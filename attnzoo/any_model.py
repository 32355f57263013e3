"""Attention blocks in any model: :func:`insert` and :func:`list_sites`.

    import attnzoo, torchvision
    model = torchvision.models.resnet50()
    attnzoo.insert(model, [{"block": {"type": "cbam"}, "at": "residual", "stages": [3, 4]}])
    for site in attnzoo.list_sites(model):
        print(site.path, site.input, site.output, site.aliases)

``insert`` runs the builder's own insertion (:func:`attnzoo.insertion.apply_insertions`)
on a model from anywhere: torchvision, timm, another library, your own. The model
keeps its class and parameter names; the blocks it gained are recorded on
``model.attnzoo_blocks`` and the insertions on ``model.attnzoo_insertions``, so that
``attnzoo.save_pretrained`` can save them and :func:`attnzoo.load_inserted` put them
back into a fresh instance of the same class.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from torch import nn

from .aliases import alias_sites, find_stages, locate
from .errors import AttnZooError, SpecError
from .insertion import (
    apply_insertions,
    default_input_size,
    doubled,
    probe,
    site_layouts,
)
from .layouts import Layout
from .safe_yaml import load_yaml, read_source
from .spec import Insertion, ModelSpec, _Strict
from .validation import format_validation_error


class _Insertions(_Strict):
    insert: list[Insertion]


Insertions = (ModelSpec | Insertion | dict[str, Any] | list[Any] | str | os.PathLike[str])


def parse_insertions(insertions: Insertions) -> list[Insertion]:
    """What a spec's ``insert:`` holds, from a ModelSpec, an Insertion, a dict (one
    insertion, or a mapping with an ``insert:`` list), a list of those, or YAML text or
    a ``.yaml`` file holding a list or a mapping with ``insert:``."""
    if isinstance(insertions, ModelSpec):
        return list(insertions.insert)
    if isinstance(insertions, Insertion):
        return [insertions]
    text, origin = None, "insertions"
    data: Any = insertions
    if isinstance(insertions, str | os.PathLike):
        text, origin = read_source(insertions)
        data = load_yaml(text, origin)
    if isinstance(data, dict) and "insert" in data:
        extra = sorted(set(data) - {"insert"})
        if extra and not {"name", "backbone"} & set(data):
            raise SpecError(f"{origin}: a mapping of insertions holds only `insert:`, not "
                            f"{', '.join(extra)}")
        data = data["insert"]
    elif isinstance(data, dict):
        data, text = [data], None
    if not isinstance(data, list):
        raise SpecError(f"{origin}: insertions are a list (a spec's `insert:`), not "
                        f"{type(data).__name__}")
    items = [i.model_dump(mode="json", exclude_defaults=True) if isinstance(i, Insertion)
             else i for i in data]
    try:
        return _Insertions.model_validate({"insert": items}).insert
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, origin, None, model=_Insertions,
                                                what="insertions")) from None


def input_size_for(model: nn.Module, input_size: int | tuple[int, ...] | None
                   ) -> tuple[int, int, int]:
    """(C, H, W) from ``input_size`` (None: the model's timm pretrained_cfg, else
    3x224x224; N: NxN with the model's channels; (H, W); or (C, H, W))."""
    chans, h, w = default_input_size(model)
    if input_size is None:
        return (chans, h, w)
    if isinstance(input_size, int):
        size: tuple[int, ...] = (chans, input_size, input_size)
    else:
        size = tuple(input_size)
        size = (chans, *size) if len(size) == 2 else size
    if len(size) != 3 or not all(isinstance(s, int) and s > 0 for s in size):
        raise SpecError(f"input_size must be N, (H, W) or (C, H, W) of positive ints, not "
                        f"{input_size!r}")
    return size


def insert(model: nn.Module, insertions: Insertions, *,
           input_size: int | tuple[int, ...] | None = None) -> nn.Module:
    """Insert attention blocks into ``model`` (in place) and return it.

    Args:
        model: any ``nn.Module`` that takes one image batch: a torchvision or timm
            model, another library's, your own.
        insertions: what a spec's ``insert:`` holds (see :func:`parse_insertions`):
            ``[{"block": {"type": "cbam"}, "at": "residual"}]``, YAML text or file,
            or a spec.
        input_size: the (C, H, W), (H, W) or N the sites are probed at (on the meta
            device: no compute); the model's timm ``pretrained_cfg`` size, else
            3x224x224, when None.

    Sites, aliases, stage/block filters, layouts, block names and ``zero_init`` are
    those of a spec's insertions. The model keeps its class and parameter names;
    ``model.attnzoo_blocks`` records the blocks, ``model.attnzoo_insertions`` the
    insertions (with the input size), and no hook is left on it. Calling it again adds
    more blocks. A model built from a spec (``create_model``) is refused: add to its
    spec's ``insert:`` instead.
    """
    spec = getattr(model, "attnzoo_spec", None)
    if spec is not None:
        raise AttnZooError(f"the model was built from the spec {spec.name!r}: add the "
                           "insertions to its `insert:` and build it again (its saved spec "
                           "would not describe blocks inserted afterwards)")
    parsed = parse_insertions(insertions)
    size = input_size_for(model, input_size)
    blocks = apply_insertions(model, parsed, size, type(model).__name__)
    model.attnzoo_blocks = [*getattr(model, "attnzoo_blocks", []), *blocks]
    if parsed:
        calls = list(getattr(model, "attnzoo_insertions", []))
        calls.append({"input_size": list(size), "insert": parsed})
        model.attnzoo_insertions = calls
    return model


@dataclass(frozen=True)
class SiteInfo:
    """A module that a block can be inserted at (after, before or in place of it)."""

    path: str
    module_type: str
    stage: int | None            # numbered from 1 (attnzoo.aliases)
    block: int | None            # numbered from 0 within its stage
    input: Layout
    output: Layout
    aliases: tuple[str, ...]     # the aliases that select it ("se_slot (replace)")

    def row(self) -> tuple[str, ...]:
        where = "-" if self.stage is None else \
            f"{self.stage}" + ("" if self.block is None else f".{self.block}")
        return (self.path, self.module_type, where, self.input.describe(),
                self.output.describe(), ", ".join(self.aliases) or "-")


def list_sites(model: nn.Module, input_size: int | tuple[int, ...] | None = None
               ) -> list[SiteInfo]:
    """Every module of ``model`` that takes and returns a tensor in a forward pass at
    ``input_size`` (as :func:`insert` reads it), in module order, but those that run
    more than once per pass (a shared ReLU, which insert refuses): its type, stage and
    block, the layout and shape of its input and output, and the aliases that select
    it. Two dry runs on the meta device; the model is not changed."""
    size = input_size_for(model, input_size)
    paths = [p for p, _ in model.named_modules() if p]
    first = probe(model, paths, size)
    second = probe(model, paths, doubled(size), tolerate=True)
    stages = find_stages(model)
    named: dict[str, list[str]] = {}
    for alias, sites in alias_sites(model, stages).items():
        for site in sites:
            label = alias if site.position == "after" else f"{alias} ({site.position})"
            named.setdefault(site.path, []).append(label)
    modules = dict(model.named_modules())
    found = []
    for path in paths:
        seen = first[path]
        if seen.calls != 1 or seen.in_shape is None or seen.out_shape is None:
            continue  # not run, run more than once (shared), or not tensor in, tensor out
        lin, lout = site_layouts(model, path, seen, second[path], size)
        stage, block = locate(stages, path)
        found.append(SiteInfo(path, type(modules[path]).__name__, stage, block, lin, lout,
                              tuple(named.get(path, ()))))
    return found


__all__ = ["SiteInfo", "input_size_for", "insert", "list_sites",
           "parse_insertions"]
