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

import warnings
from typing import Any

import timm
from timm.models import (
    generate_default_cfgs,
    register_model,
)
from timm.models._registry import model_entrypoint
from torch import nn

from .errors import SpecError, WeightsError
from .features import features_model
from .manifests import load_manifest, weights_dir
from .pretrained import create_model
from .timm_cfg import WEIGHT_SOURCES, zoo_pretrained_cfg
from .zoo import load_spec, spec_files

#: Read by timm's ``register_model``: the pretrained (data) config of every zoo model.
default_cfgs: dict[str, Any] = {}
__all__: list[str] = []  # register_model appends each entry point's name

def _make_entrypoint(name: str):
    """A timm entry point that builds the zoo model ``name`` through attnzoo."""

    def entrypoint(pretrained: bool = False, pretrained_cfg: Any = None,
                   pretrained_cfg_overlay: dict[str, Any] | None = None,
                   cache_dir: Any = None, features_only: bool = False,
                   out_indices: Any = None, feature_cls: Any = None,
                   feature_cfg: dict[str, Any] | None = None, **kwargs: Any) -> nn.Module:
        tag = pretrained_cfg if isinstance(pretrained_cfg, str) else None
        given = {} if pretrained_cfg is None or tag else dict(_as_dict(pretrained_cfg))
        if pretrained and any((given.get(k) or (pretrained_cfg_overlay or {}).get(k))
                              for k in WEIGHT_SOURCES):
            raise WeightsError(
                f"{name}: a weight source in pretrained_cfg is not used for zoo models; "
                "load a state dict yourself or use pretrained=True (attnzoo's manifests)")
        if tag and "." in tag:  # timm passes the tag of "name.tag" alone; accept both
            tag = tag.split(".", 1)[1] if tag.startswith(f"{name}.") else tag
        model = create_model(name, pretrained=(tag or True) if pretrained else None,
                             num_classes=kwargs.pop("num_classes", None), **kwargs)
        if pretrained_cfg_overlay:
            model.pretrained_cfg = {**model.pretrained_cfg, **pretrained_cfg_overlay}
        if features_only:
            model = features_model(model, out_indices=out_indices, feature_cls=feature_cls,
                                   **(feature_cfg or {}))
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"The attnzoo model {name!r} (see `attnzoo show {name}`)."
    return entrypoint


def _as_dict(cfg: Any) -> dict[str, Any]:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _tagged_cfgs(name: str, cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name.tag: cfg}`` for every weights tag of zoo model ``name`` (the default tag
    first, as timm takes it), each naming its source so that
    ``timm.list_models(pretrained=True)`` lists it; ``{name: cfg}`` without weights."""
    try:
        manifest = load_manifest(name)
    except WeightsError as exc:
        warnings.warn(f"attnzoo: the weights manifest of {name!r} is invalid: {exc}",
                      stacklevel=3)
        manifest = None
    if manifest is None:
        return {name: cfg}
    tags = [manifest.default, *(t for t in manifest.tags if t != manifest.default)]
    out = {}
    for tag in tags:
        entry = manifest.tags[tag]
        source = ({"hf_hub_id": entry.repo} if entry.repo
                  else {"file": str(weights_dir() / entry.file)})
        out[f"{name}.{tag}"] = {**cfg, **source, "license": entry.license or cfg.get("license"),
                                "num_classes": entry.num_classes or cfg.get("num_classes")}
    return out


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
        default_cfgs.update(generate_default_cfgs(_tagged_cfgs(name, cfg)))
        entrypoint = _make_entrypoint(name)
        globals()[name] = entrypoint
        register_model(entrypoint)
        registered.append(name)
    return registered
