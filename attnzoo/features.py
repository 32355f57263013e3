"""``features_only``: a built zoo model wrapped to return feature maps, as timm wraps
its own backbones (``FeatureListNet`` for a ResNet, ``FeatureGetterNet`` for a ViT, ...).
``attnzoo.create_model(..., features_only=True)`` and timm's entry points use it."""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models import FeatureDictNet, FeatureHookNet, FeatureListNet
from timm.models._features import FeatureGetterNet
from torch import nn

from .aliases import find_stages
from .errors import SpecError
from .insertion import default_input_size, probe
from .spec import ModelSpec

_FEATURE_CLASSES: dict[str, type[nn.Module]] = {
    "list": FeatureListNet, "dict": FeatureDictNet, "hook": FeatureHookNet,
    "getter": FeatureGetterNet,
}


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
    if not getattr(model, "feature_info", None) and (info := stage_feature_info(model, spec)):
        model.feature_info = info  # a torchvision ResNet, a user's net: from its stages
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
    kept = {id(m) for m in wrapper.modules()}
    if spec is not None:
        wrapper.attnzoo_spec = spec
    if spec is not None or blocks:
        wrapper.attnzoo_blocks = [b for b in blocks if id(block_modules[b.name]) in kept]
    return wrapper


def stage_feature_info(model: nn.Module, spec: ModelSpec | None) -> list[dict[str, Any]]:
    """``feature_info`` for a model without one (torchvision's ResNets, a user's
    network) whose stages (:mod:`attnzoo.aliases`) are its own children: one entry per
    stage output, its channels and reduction measured by a dry run on the meta
    device. Empty when it has no such stages."""
    stages = [s for s in find_stages(model) if "." not in s.path]
    if not stages:
        return []
    size = tuple(spec.input_size) if spec is not None and spec.input_size else \
        default_input_size(model)
    try:
        seen = probe(model, [s.path for s in stages], size)
    except SpecError:
        return []
    info = []
    for stage in stages:
        shape = seen[stage.path].out_shape
        if shape is None or len(shape) != 4:
            return []
        info.append({"module": stage.path, "num_chs": shape[1],
                     "reduction": max(1, size[1] // shape[2])})
    return info


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
    if spec is not None and spec.backbone.source == "timm":
        name, args = spec.backbone.name, spec.backbone.args
    elif spec is None and timm.is_model(arch := (getattr(model, "pretrained_cfg", None)
                                                 or {}).get("architecture", "")):
        name, args = arch, {}  # a timm model changed by attnzoo.insert
    else:
        return fallback
    try:
        with torch.device("meta"):
            made = timm.create_model(name, features_only=True, **args)
    except Exception:  # noqa: BLE001 - a backbone that cannot build on meta: generic
        return fallback
    indices = tuple(made.feature_info.out_indices)
    if isinstance(made, FeatureGetterNet):
        return FeatureGetterNet, indices, False
    if isinstance(made, FeatureHookNet):
        return FeatureHookNet, indices, flatten
    if isinstance(made, FeatureDictNet):
        return type(made), indices, not set(made._modules) <= set(model._modules)
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


def as_features(model: nn.Module, features_only: bool, out_indices: Any = None,
                feature_cls: Any = None) -> nn.Module:
    """``model`` itself, or with ``features_only`` its :func:`features_model`."""
    if not features_only:
        return model
    return features_model(model, out_indices=out_indices, feature_cls=feature_cls)
