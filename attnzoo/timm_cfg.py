"""timm's pretrained config of a zoo model: its backbone's data config (input size,
mean/std, crop, first conv, classifier) with the zoo model's name, classes, paper and
license. Every model that attnzoo builds carries it as ``model.pretrained_cfg``, the
same one ``timm.create_model`` gives for the zoo name."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from timm.models import get_pretrained_cfg
from torch import nn

from .spec import ModelSpec

# Fields of the backbone's pretrained cfg that describe the input and the head, not a
# particular checkpoint; they carry over to the zoo model.
_DATA_FIELDS = ("input_size", "min_input_size", "fixed_input_size", "interpolation",
                "crop_pct", "crop_mode", "mean", "std", "num_classes", "pool_size",
                "first_conv", "classifier")
#: Fields that name a weights file; a zoo model's cfg holds them only for its own weights.
WEIGHT_SOURCES = ("url", "file", "state_dict", "hf_hub_id")


def zoo_pretrained_cfg(spec: ModelSpec) -> dict[str, Any]:
    """The timm pretrained cfg of a zoo model: the data config of its backbone (input
    size, mean/std, crop, first conv, classifier), the spec's own input size and class
    count, and the spec's description, paper and license. It names no weight source:
    zoo weights are loaded by attnzoo from pinned, checksummed manifests."""
    cfg: dict[str, Any] = {}
    if spec.backbone.source == "timm":
        backbone_cfg = get_pretrained_cfg(spec.backbone.name)
        if backbone_cfg is not None:
            cfg = {k: v for k, v in dataclasses.asdict(backbone_cfg).items()
                   if k in _DATA_FIELDS and v is not None}
    size, chans = spec.backbone.args.get("img_size"), spec.backbone.args.get("in_chans")
    if size is not None or chans is not None:
        c, *hw = cfg.get("input_size", (3, 224, 224))
        if size is not None:
            hw = [size, size] if isinstance(size, int) else list(size)
        cfg["input_size"] = (c if chans is None else chans, *hw)
    if spec.input_size is not None:
        cfg["input_size"] = tuple(spec.input_size)
    if spec.num_classes is not None:
        cfg["num_classes"] = spec.num_classes
    cfg.update(architecture=spec.name, description=spec.description or None,
               license=spec.license, paper_ids=_paper_id(spec.paper))
    return {k: v for k, v in cfg.items() if v is not None}


def _paper_id(url: str | None) -> str | None:
    if not url:
        return None
    m = re.search(r"arxiv\.org/(?:abs|pdf)/([0-9]{4}\.[0-9]{4,5})", url)
    return f"arXiv:{m[1]}" if m else url




def apply_zoo_cfg(model: nn.Module, spec: ModelSpec, weights: dict[str, Any] | None = None
                  ) -> None:
    """Give ``model`` the zoo model's pretrained cfg: the data fields the network already
    has (an attnzoo architecture's own mean/std, say) under the spec's, plus the tag and
    Hub repo of ``weights`` (a ``model.attnzoo_weights`` record) when it has some."""
    own = getattr(model, "pretrained_cfg", None) or {}
    zoo = zoo_pretrained_cfg(spec)
    if spec.backbone.source != "timm" and spec.input_size is None and "input_size" in own:
        zoo["input_size"] = tuple(own["input_size"])  # the architecture's, args applied
    cfg = {**{k: v for k, v in own.items() if k in _DATA_FIELDS and v is not None}, **zoo}
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int):
        cfg["num_classes"] = num_classes
    if weights:
        cfg.update({k: v for k, v in (("tag", weights.get("tag")),
                                      ("hf_hub_id", weights.get("repo"))) if v})
    model.pretrained_cfg = cfg
    if not isinstance(getattr(type(model), "default_cfg", None), property):
        model.default_cfg = cfg  # timm's older name, a plain attribute on its models
