"""Compile a ModelSpec into an ordinary nn.Module.

1. Build the backbone (timm, torchvision, or an attnzoo architecture) without weights.
2. Insert the spec's blocks with :func:`attnzoo.insertion.apply_insertions`, the
   routine that :func:`attnzoo.insert` runs on any model: probe the sites on the meta
   device, build each block for its site and layout, attach it keeping the backbone's
   class and parameter names. No forward hooks remain on the model.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator
from typing import Any, Literal

import timm
import torch
from torch import nn

from .blocks.base import Site
from .deferred_init import deferred_init
from .errors import SpecError
from .insertion import (  # noqa: F401  (AFTER, BEFORE, IdentityBlend, probe: re-exported)
    AFTER,
    BEFORE,
    IdentityBlend,
    InsertedBlock,
    allocation_error,
    apply_insertions,
    convert_sync_batchnorm,
    default_input_size,
    probe,
    reattach_blocks,
)
from .meta_init import parameters_on_meta
from .registry import block_configs, did_you_mean, get_architecture
from .spec import ModelSpec
from .timm_cfg import apply_zoo_cfg
from .validation import parse_block

# What a backbone factory raises for args it cannot take: an unknown layer name
# (KeyError), a negative size (RuntimeError, ValueError), a failed assert.
_BACKBONE_ERRORS = (TypeError, KeyError, ValueError, RuntimeError, AssertionError)


def _make_backbone(spec: ModelSpec, num_classes: int | None, extra: dict[str, Any]
                   ) -> nn.Module:
    args = {**spec.backbone.args, **extra}
    if num_classes is not None:
        args["num_classes"] = num_classes
    where = f"{spec.name}: backbone {spec.backbone.source}:{spec.backbone.name}"
    if spec.backbone.source == "attnzoo":
        factory = get_architecture(spec.backbone.name)
        try:
            return factory(**args)
        except _BACKBONE_ERRORS as exc:
            raise SpecError(f"{where}: bad args {sorted(args)}: {exc}") from None
    if spec.backbone.source == "torchvision":
        return _torchvision_backbone(spec.backbone.name, args, where)
    if not timm.is_model(spec.backbone.name):
        hint = did_you_mean(spec.backbone.name, timm.list_models())
        raise SpecError(f"{where}: timm has no model {spec.backbone.name!r}{hint}")
    try:
        return timm.create_model(spec.backbone.name, pretrained=False, **args)
    except _BACKBONE_ERRORS as exc:
        raise SpecError(f"{where}: bad args {sorted(args)}: {type(exc).__name__}: "
                        f"{exc}") from None


def _torchvision_backbone(name: str, args: dict[str, Any], where: str) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, **args)``; a backbone that would
    load weights of its own (detection models' ``weights_backbone``) gets None there too.
    torchvision is imported only here: it is not a dependency of attnzoo."""
    try:
        import torchvision.models as models
    except ImportError as exc:
        raise SpecError(f"{where}: a torchvision backbone needs torchvision, which is not "
                        f"installed ({exc}); `pip install torchvision`") from None
    known = models.list_models()
    if name not in known:
        raise SpecError(f"{where}: torchvision has no model {name!r}"
                        f"{did_you_mean(name, known)}")
    builder = models.get_model_builder(name)
    extra = {"weights_backbone": None} if "weights_backbone" in inspect.signature(
        builder).parameters else {}
    try:
        return models.get_model(name, weights=None, **extra, **args)
    except _BACKBONE_ERRORS as exc:
        raise SpecError(f"{where}: bad args {sorted(args)}: {type(exc).__name__}: "
                        f"{exc}") from None


def probe_input_size(model: nn.Module, spec: ModelSpec, args: dict[str, Any]
                     ) -> tuple[int, ...]:
    """The (C, H, W) the model is made for: the spec's, else an ``img_size`` arg, else
    the backbone's pretrained_cfg, else 3x224x224."""
    if spec.input_size is not None:
        return tuple(spec.input_size)
    chans, h, w = default_input_size(model)
    chans = args.get("in_chans", chans)
    if "img_size" in args:
        size = args["img_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (chans, h, w)


def build_model(spec: ModelSpec, num_classes: int | None = None, *,
                init: Literal["random", "skip"] = "random",
                device: str | torch.device | None = None, **backbone_args: Any) -> nn.Module:
    """Build the model a spec describes.

    ``init="random"`` initialises it as timm and the blocks' papers do. ``init="skip"``
    is for weights that will be assigned to it (``load_state_dict(..., assign=True)``):
    every parameter is on the meta device (no memory, no init), buffers are real.
    ``device="meta"`` puts everything, buffers too, on the meta device.
    """
    if init == "skip":
        with parameters_on_meta():
            return build_model(spec, num_classes, device=device, **backbone_args)
    if init != "random":
        raise ValueError(f"init must be 'random' or 'skip', not {init!r}")
    if device is not None:
        with torch.device(device):
            return build_model(spec, num_classes, **backbone_args)
    n_cls = num_classes if num_classes is not None else spec.num_classes
    with _located(spec, "backbone"):
        model, deferred = _make_backbone_deferring_init(spec, n_cls, backbone_args)
    with _located(spec, "input_size" if spec.input_size is not None else "backbone"):
        input_size = probe_input_size(model, spec, {**spec.backbone.args, **backbone_args})

    def locate(*loc: str | int) -> contextlib.AbstractContextManager[None]:
        if loc == ("probe",):
            return _located(spec, "input_size" if spec.input_size is not None else "backbone")
        return _located(spec, *loc)

    inserted = apply_insertions(model, spec.insert, input_size, spec.name, locate=locate)
    model.attnzoo_spec, model.attnzoo_unrecorded_args = _as_built(spec, num_classes,
                                                                   backbone_args)
    model.attnzoo_blocks = inserted
    if deferred is not None:  # initialise what the blocks did not replace
        deferred.materialise(model)
    apply_zoo_cfg(model, spec)
    return model


def _make_backbone_deferring_init(spec: ModelSpec, num_classes: int | None,
                                  extra: dict[str, Any]) -> tuple[nn.Module, Any]:
    """The backbone, with its random initialisation deferred (``deferred_init``) when
    the spec replaces modules, so that the replaced ones are never initialised; the
    recorder to materialise after the insertions, or None (initialised already)."""
    if not any(not isinstance(ins.at, str) and ins.at.position == "replace"
               for ins in spec.insert):
        return _make_backbone(spec, num_classes, extra), None
    with deferred_init() as recorder:
        model = _make_backbone(spec, num_classes, extra)
    if recorder.replayable:
        return model, recorder
    return _make_backbone(spec, num_classes, extra), None  # it read its own init


@contextlib.contextmanager
def _located(spec: ModelSpec, *loc: str | int) -> Iterator[None]:
    """A SpecError raised inside starts with the spec's file and the line of ``loc``
    when the spec was read from a file (as validation errors name them)."""
    try:
        yield
    except SpecError as exc:
        place = spec.source_line(*loc)
        if place is None:
            raise
        raise SpecError(f"{place}: {exc}") from exc.__cause__


def _as_built(spec: ModelSpec, num_classes: int | None, backbone_args: dict[str, Any]
              ) -> tuple[ModelSpec, list[str]]:
    """The spec of the network actually built: call-time ``num_classes`` and backbone
    args written in, so that saving the model and rebuilding from the saved spec gives
    the same network. Args that are not plain YAML values (a norm layer class, say)
    cannot be written; their names are returned so that saving can refuse them."""
    plain: dict[str, Any] = {}
    unrecorded: list[str] = []
    for key, value in backbone_args.items():
        if _is_plain(value):
            plain[key] = json.loads(json.dumps(value))  # tuples as YAML writes them: lists
        else:
            unrecorded.append(key)
    update: dict[str, Any] = {}
    if plain:
        update["backbone"] = spec.backbone.model_copy(
            update={"args": {**spec.backbone.args, **plain}})
    if num_classes is not None and num_classes != spec.num_classes:
        update["num_classes"] = num_classes
    return (spec.model_copy(update=update) if update else spec), sorted(unrecorded)


def _is_plain(value: Any) -> bool:
    """Whether ``value`` is made of YAML scalars, lists and string-keyed dicts."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def list_blocks() -> list[str]:
    """Names of every registered block type, plugins included."""
    return list(block_configs())


def create_block(type: str, channels: int, **cfg: Any) -> nn.Module:  # noqa: A002
    """Build one block on its own, e.g. ``create_block("se", 64, reduction=8)``.

    ``cfg`` holds the block's config fields; ``size=(H, W)`` gives the spatial size
    for blocks that need it (FcaNet's DCT).
    """
    size = cfg.pop("size", None)
    config = parse_block({"type": type, **cfg}, f"block {type!r}")
    try:
        return config.build(Site(channels=channels, size=tuple(size) if size else None))
    except (ValueError, TypeError) as exc:
        raise SpecError(f"block {type!r} cannot be built for {channels} channels"
                        f"{f' at size {tuple(size)}' if size else ''}: {exc}") from None
    except (MemoryError, RuntimeError) as exc:
        raise allocation_error(f"block {type!r} for {channels} channels", config, exc) from None
