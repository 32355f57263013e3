"""Make the zoo part of timm: every spec becomes a timm model name.

``import attnzoo`` calls :func:`register_zoo_with_timm`, after which

    timm.list_models("*cbam*")
    timm.create_model("resnet50_cbam", features_only=True, out_indices=(1, 2, 3))
    timm.data.resolve_data_config(model=timm.create_model("resnet50_cbam"))

work as for timm's own models. Registration only reads the spec files (a fraction
of a millisecond each); models are built when ``timm.create_model`` asks for one.

:func:`features_model` wraps a built zoo model with the feature extractor timm
would use for its backbone (``FeatureListNet`` for a ResNet, ``FeatureGetterNet``
for a ViT, ...); ``attnzoo.create_model(..., features_only=True)`` uses it too.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

import timm
import torch
from timm.models import (
    FeatureDictNet,
    FeatureHookNet,
    FeatureListNet,
    generate_default_cfgs,
    get_pretrained_cfg,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models._features import FeatureGetterNet
from timm.models._registry import model_entrypoint
from torch import nn

from .errors import SpecError, WeightsError
from .spec import ModelSpec
from .zoo import load_spec, spec_files

#: Read by timm's ``register_model``: the pretrained (data) config of every zoo model.
default_cfgs: dict[str, Any] = {}
__all__: list[str] = []  # register_model appends each entry point's name

_FEATURE_CLASSES: dict[str, type[nn.Module]] = {
    "list": FeatureListNet, "dict": FeatureDictNet, "hook": FeatureHookNet,
    "getter": FeatureGetterNet,
}
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
        from . import create_model  # the package imports this module

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


# --- features_only ------------------------------------------------------------------


def features_model(model: nn.Module, out_indices: Any = None,
                   feature_cls: str | type[nn.Module] | None = None,
                   **feature_cfg: Any) -> nn.Module:
    """Wrap a built zoo model so that it returns feature maps, as timm's
    ``features_only=True`` does for the backbone.

    Args:
        model: a model from ``attnzoo.create_model``.
        out_indices: which entries of ``model.feature_info`` to return; the
            backbone's timm default when None.
        feature_cls: ``"list"``, ``"dict"``, ``"getter"``, ``"hook"`` or a class;
            the one timm uses for the backbone when None.
        **feature_cfg: further arguments of the feature class (``output_fmt``,
            ``flatten_sequential``, ``norm``, ...).

    Raises:
        SpecError: the backbone has no ``feature_info``, or the wrapper would skip an
            inserted block that lies before the last returned feature.
    """
    spec: ModelSpec | None = getattr(model, "attnzoo_spec", None)
    label = spec.name if spec else type(model).__name__
    if not getattr(model, "feature_info", None):
        source = (f"{spec.backbone.source}:{spec.backbone.name}" if spec
                  else type(model).__name__)
        raise SpecError(f"{label}: features_only needs the backbone to describe its "
                        f"feature maps (feature_info), and {source} "
                        f"({type(model).__name__}) does not")
    default_cls, default_indices, flatten = _timm_feature_defaults(model, spec)
    cls = _feature_class(feature_cls) if feature_cls is not None else default_cls
    cfg = {"out_indices": default_indices if out_indices is None else out_indices}
    output_fmt = getattr(model, "output_fmt", None)
    if output_fmt is not None and cls is not FeatureGetterNet:
        cfg["output_fmt"] = output_fmt
    if issubclass(cls, FeatureDictNet | FeatureHookNet):
        cfg["flatten_sequential"] = flatten
    cfg.update(feature_cfg)
    blocks = list(getattr(model, "attnzoo_blocks", []))
    block_modules = {b.name: model.get_submodule(b.name) for b in blocks}
    try:
        wrapper = cls(model, **cfg)
    except (AssertionError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"{label}: {cls.__name__} cannot wrap {type(model).__name__} with "
                        f"{cfg}: {type(exc).__name__}: {exc}") from None
    if not isinstance(wrapper, FeatureGetterNet):  # the getter runs the model's own forward
        _check_no_block_skipped(model, wrapper, block_modules, label, cls)
    from timm.models._builder import pretrained_cfg_for_features

    cfg_in = getattr(model, "pretrained_cfg", None) or {}
    wrapper.pretrained_cfg = wrapper.default_cfg = pretrained_cfg_for_features(cfg_in)
    if spec is not None:
        kept = {id(m) for m in wrapper.modules()}
        wrapper.attnzoo_spec = spec
        wrapper.attnzoo_blocks = [b for b in blocks if id(block_modules[b.name]) in kept]
    return wrapper


def _feature_class(feature_cls: str | type[nn.Module]) -> type[nn.Module]:
    if isinstance(feature_cls, str):
        try:
            return _FEATURE_CLASSES[feature_cls.lower()]
        except KeyError:
            raise SpecError(f"unknown feature_cls {feature_cls!r}; use one of "
                            f"{', '.join(_FEATURE_CLASSES)} or a class") from None
    return feature_cls


def _timm_feature_defaults(model: nn.Module, spec: ModelSpec | None
                           ) -> tuple[type[nn.Module], Any, bool]:
    """(feature class, out_indices, flatten_sequential) that timm picks for the backbone.

    For a timm backbone this asks timm itself: the backbone is built with
    ``features_only=True`` on the meta device (no memory, no compute) and the wrapper
    it returns is read. Backbones with a features-only class of their own
    (EfficientNetFeatures) and attnzoo architectures get the generic wrappers.
    """
    names = [info["module"] for info in model.feature_info]
    # FeatureListNet finds nested modules ('stages.0') only with flatten_sequential.
    flatten = any("." in n for n in names)
    fallback_cls = FeatureGetterNet if hasattr(model, "forward_intermediates") \
        and spec is not None and spec.backbone.source == "attnzoo" else FeatureListNet
    fallback = (fallback_cls, tuple(range(len(names))), flatten)
    if spec is None or spec.backbone.source != "timm":
        return fallback
    try:
        with torch.device("meta"):
            probe = timm.create_model(spec.backbone.name, features_only=True,
                                      **spec.backbone.args)
    except Exception:  # noqa: BLE001 - a backbone that cannot build on meta: generic
        return fallback
    indices = tuple(probe.feature_info.out_indices)
    if isinstance(probe, FeatureGetterNet):
        return FeatureGetterNet, indices, False
    if isinstance(probe, FeatureHookNet):
        return FeatureHookNet, indices, flatten
    if isinstance(probe, FeatureDictNet):
        return type(probe), indices, not set(probe._modules) <= set(model._modules)
    return FeatureListNet, indices, flatten


def _check_no_block_skipped(model: nn.Module, wrapper: nn.Module,
                            block_modules: dict[str, nn.Module], label: str,
                            cls: type[nn.Module]) -> None:
    """Refuse a wrapper that calls the backbone's modules one by one and so bypasses a
    block attached to a container it flattened (e.g. after the whole ``stages``).
    Blocks after the last returned feature are dropped with the unused layers."""
    kept = {id(m) for m in wrapper.modules()}
    top = list(model.named_children())
    used = [i for i, (_, child) in enumerate(top)
            if id(child) in kept or any(id(c) in kept for c in child.children())]
    last_used = max(used, default=-1)
    order = {n: i for i, (n, _) in enumerate(top)}
    for name, block in block_modules.items():
        if id(block) not in kept and order.get(name.split(".")[0], -1) <= last_used:
            raise SpecError(f"{label}: {cls.__name__} would skip the inserted block {name} "
                            "(it runs the backbone's modules one by one); use "
                            "feature_cls='getter' or insert the block inside a stage")
