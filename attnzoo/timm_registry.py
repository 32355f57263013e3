"""Make the zoo part of timm: every spec becomes a timm model name.

``import attnzoo`` calls :func:`register_zoo_with_timm`, after which

    timm.list_models("*cbam*")
    timm.create_model("resnet50_cbam", features_only=True, out_indices=(1, 2, 3))
    timm.data.resolve_data_config(model=timm.create_model("resnet50_cbam"))

work as for timm's own models. Registration only reads the spec files (a fraction
of a millisecond each); models are built when ``timm.create_model`` asks for one.

``features_only`` goes through :func:`attnzoo.features.features_model`.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

import timm
from timm.models import (
    generate_default_cfgs,
    get_pretrained_cfg,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models._registry import model_entrypoint
from torch import nn

from .errors import SpecError, WeightsError
from .features import features_model
from .pretrained import create_model
from .spec import ModelSpec
from .zoo import load_spec, spec_files

#: Read by timm's ``register_model``: the pretrained (data) config of every zoo model.
default_cfgs: dict[str, Any] = {}
__all__: list[str] = []  # register_model appends each entry point's name

# Fields of the backbone's pretrained cfg that describe the input and the head, not a
# particular checkpoint; they carry over to the zoo model.
_DATA_FIELDS = ("input_size", "min_input_size", "fixed_input_size", "interpolation",
                "crop_pct", "crop_mode", "mean", "std", "num_classes", "pool_size",
                "first_conv", "classifier")
_WEIGHT_SOURCES = ("url", "file", "state_dict", "hf_hub_id")


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
    size = spec.backbone.args.get("img_size")
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        cfg["input_size"] = (cfg.get("input_size", (3,))[0], *hw)
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


def _make_entrypoint(name: str):
    """A timm entry point that builds the zoo model ``name`` through attnzoo."""

    def entrypoint(pretrained: bool = False, pretrained_cfg: Any = None,
                   pretrained_cfg_overlay: dict[str, Any] | None = None,
                   cache_dir: Any = None, features_only: bool = False,
                   out_indices: Any = None, feature_cls: Any = None,
                   feature_cfg: dict[str, Any] | None = None, **kwargs: Any) -> nn.Module:
        tag = pretrained_cfg if isinstance(pretrained_cfg, str) else None
        cfg = _resolve_cfg(name, None if tag else pretrained_cfg, pretrained_cfg_overlay)
        if pretrained and any(cfg.get(k) for k in _WEIGHT_SOURCES):
            raise WeightsError(
                f"{name}: a weight source in pretrained_cfg is not used for zoo models; "
                "load a state dict yourself or use pretrained=True (attnzoo's manifests)")
        model = create_model(name, pretrained=(tag or True) if pretrained else False,
                             num_classes=kwargs.pop("num_classes", None), **kwargs)
        model.pretrained_cfg = model.default_cfg = cfg
        if features_only:
            model = features_model(model, out_indices=out_indices, feature_cls=feature_cls,
                                   **(feature_cfg or {}))
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"The attnzoo model {name!r} (see `attnzoo show {name}`)."
    return entrypoint


def _resolve_cfg(name: str, pretrained_cfg: Any, overlay: dict[str, Any] | None
                 ) -> dict[str, Any]:
    try:
        return resolve_pretrained_cfg(name, pretrained_cfg, overlay).to_dict()
    except RuntimeError:  # a weights tag timm does not know: attnzoo resolves tags itself
        return resolve_pretrained_cfg(name, None, overlay).to_dict()


def register_zoo_with_timm() -> list[str]:
    """Register every zoo spec as a timm model; returns the names registered now.

    A zoo name that timm already uses for one of its own models is skipped with a
    warning (a test keeps the zoo free of such clashes). Re-running is cheap and
    registers only new spec files.
    """
    registered = []
    for name in spec_files():
        if name in default_cfgs:
            continue
        if timm.is_model(name) and model_entrypoint(name).__module__ != __name__:
            warnings.warn(f"attnzoo: zoo model {name!r} is not registered with timm: timm "
                          "already has a model of that name", stacklevel=2)
            continue
        try:
            cfg = zoo_pretrained_cfg(load_spec(name))
        except SpecError as exc:
            warnings.warn(f"attnzoo: zoo spec {name!r} is invalid and is not registered "
                          f"with timm: {exc}", stacklevel=2)
            continue
        default_cfgs.update(generate_default_cfgs({name: cfg}))
        entrypoint = _make_entrypoint(name)
        globals()[name] = entrypoint
        register_model(entrypoint)
        registered.append(name)
    return registered
