"""Compile a ModelSpec into an ordinary nn.Module.

1. Build the backbone (timm, or an attnzoo architecture) without weights.
2. Probe it once on the meta device: the input and output shape of every site.
3. Build each block for its site and insert it, keeping the backbone's class and
   its parameter names. No forward hooks remain on the model.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from .blocks.base import BlockConfig, Site, takes_one_tensor
from .errors import SpecError
from .meta_init import parameters_on_meta
from .registry import block_configs, did_you_mean, get_architecture
from .sites import SiteRef, resolve_sites
from .spec import ModelSpec
from .timm_cfg import apply_zoo_cfg
from .validation import parse_block

AFTER, BEFORE = "attnzoo_after", "attnzoo_before"
_RANK_NAMES = {4: "4-D (N, C, H, W)", 3: "3-D (B, N, C)", 2: "2-D (N, C)"}


@dataclass(frozen=True)
class InsertedBlock:
    """What the builder put where: one row of ``attnzoo summary``."""

    name: str           # the block's module path in the built model
    block_type: str
    site: str           # the backbone module path the block is attached to
    position: str
    channels: int       # the block's input: channels and spatial size (or token count)
    size: tuple[int, ...] | None
    params: int
    out_channels: int | None = None  # its output (differs from the input at replace sites)
    out_size: tuple[int, ...] | None = None


class IdentityBlend(nn.Module):
    """``x + alpha * (block(x) - x)`` with ``alpha = 0`` at init: makes a gating block
    (SE, CBAM, ...) start as the identity for ``zero_init``; training learns alpha."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * (self.block(x) - x)


_CLASSES: dict[tuple[type[nn.Module], bool, bool], type[nn.Module]] = {}
_CLASSES_LOCK = threading.Lock()


def _with_attention_class(base: type[nn.Module], before: bool, after: bool) -> type[nn.Module]:
    """A subclass of ``base`` whose forward runs ``attnzoo_before`` on its input and/or
    ``attnzoo_after`` on its output. One class per (base, before, after), shared by all
    models and threads."""
    key = (base, before, after)
    with _CLASSES_LOCK:
        if key not in _CLASSES:
            _CLASSES[key] = _make_attention_class(*key)
        return _CLASSES[key]


def _make_attention_class(base: type[nn.Module], before: bool, after: bool) -> type[nn.Module]:
    def forward(self, x, *args, **kwargs):
        if before:
            x = self.attnzoo_before(x)
        y = base.forward(self, x, *args, **kwargs)
        return self.attnzoo_after(y) if after else y

    suffix = "".join(s for s, on in (("Before", before), ("After", after)) if on)
    name = f"{base.__name__}WithAttention{suffix}"
    return type(name, (base,), {"forward": forward, "__module__": __name__, "_attnzoo_base": base,
                                "__doc__": f"{base.__name__} with attnzoo blocks attached."})


def _attach(model: nn.Module, path: str, child_name: str, block: nn.Module) -> str:
    module = model.get_submodule(path)
    existing = module._modules.get(child_name)
    if existing is None:
        module.add_module(child_name, block)
    elif isinstance(existing, _Chain):
        existing.append(block)
    else:
        module._modules[child_name] = _Chain(existing, block)
    base = getattr(type(module), "_attnzoo_base", type(module))
    module.__class__ = _with_attention_class(
        base, BEFORE in module._modules, AFTER in module._modules)
    chain = module._modules[child_name]
    index = f".{len(chain) - 1}" if isinstance(chain, _Chain) else ""
    return f"{path}.{child_name}{index}"


def reattach_blocks(model: nn.Module) -> list[str]:
    """Make every module that holds attnzoo blocks (``attnzoo_before`` /
    ``attnzoo_after`` children) run them again, after a utility replaced such modules
    by plain ones that keep the children but not attnzoo's forward (e.g.
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, FrozenBatchNorm conversion).
    Returns the paths it fixed."""
    fixed = []
    for path, module in model.named_modules():
        before, after = BEFORE in module._modules, AFTER in module._modules
        if not (before or after):
            continue
        cls = type(module)
        base = getattr(cls, "_attnzoo_base", None)
        if base is not None and cls is _with_attention_class(base, before, after):
            continue
        module.__class__ = _with_attention_class(base or cls, before, after)
        fixed.append(path)
    return fixed


def convert_sync_batchnorm(model: nn.Module, process_group: Any = None) -> nn.Module:
    """``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` for attnzoo models: the same
    conversion, with the blocks attached to BatchNorm layers still run (torch's
    function alone keeps them as children that nothing calls)."""
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    reattach_blocks(converted)
    return converted


class _Chain(nn.Sequential):
    """Several blocks attached at the same place, applied in spec order."""


def _replace(model: nn.Module, path: str, block: nn.Module) -> str:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[name] = block
    return path


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
    if not timm.is_model(spec.backbone.name):
        hint = did_you_mean(spec.backbone.name, timm.list_models())
        raise SpecError(f"{where}: timm has no model {spec.backbone.name!r}{hint}")
    try:
        return timm.create_model(spec.backbone.name, pretrained=False, **args)
    except _BACKBONE_ERRORS as exc:
        raise SpecError(f"{where}: bad args {sorted(args)}: {type(exc).__name__}: "
                        f"{exc}") from None


def probe_input_size(model: nn.Module, spec: ModelSpec, args: dict[str, Any]
                     ) -> tuple[int, ...]:
    """The (C, H, W) the model is made for: the spec's, else an ``img_size`` arg, else
    the backbone's pretrained_cfg, else 3x224x224."""
    if spec.input_size is not None:
        return tuple(spec.input_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans, h, w = cfg.get("input_size", (3, 224, 224))
    chans = args.get("in_chans", chans)
    if "img_size" in args:
        size = args["img_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (chans, h, w)


def _shape_of(t: Any) -> tuple[int, tuple[int, ...] | None, int] | None:
    """(channels, size, rank): NCHW maps give (C, (H, W), 4); token sequences
    (B, N, C) give (C, (N,), 3); anything else (C of the last dim, None, rank)."""
    if not isinstance(t, torch.Tensor) or t.dim() < 2:
        return None
    if t.dim() == 4:
        return t.shape[1], tuple(t.shape[2:]), 4
    if t.dim() == 3:
        return t.shape[-1], (t.shape[1],), 3
    return t.shape[-1], None, t.dim()


def probe(model: nn.Module, paths: set[str], input_size: tuple[int, ...]
          ) -> dict[str, tuple[Any, Any]]:
    """Input and output (channels, size) at each path, from one forward pass on the meta
    device (no real compute, weights untouched). The temporary hooks are removed."""
    found: dict[str, tuple[Any, Any]] = {}
    handles = []
    for path in paths:
        def hook(_m, inputs, output, path=path):
            if path not in found:
                found[path] = (_shape_of(inputs[0]) if inputs else None, _shape_of(output))
        handles.append(model.get_submodule(path).register_forward_hook(hook))
    meta = {k: torch.empty_like(v, device="meta")
            for k, v in [*model.named_parameters(), *model.named_buffers()]}
    # BatchNorm keeps the shape, and its meta kernel is a slow Python decomposition
    # (about half of a ResNet-50 build): the probe skips its arithmetic.
    norms = [m for m in model.modules() if type(m).forward in _SHAPE_KEEPING_FORWARDS]
    was_training = model.training
    try:
        for m in norms:
            m.forward = _same_shape
        model.eval()
        x = torch.empty((1, *input_size), device="meta")
        with torch.no_grad():
            torch.func.functional_call(model, meta, (x,), strict=False)
    except Exception as exc:  # noqa: BLE001 - any failure of the dry run is reported
        raise SpecError(f"shape probe of {type(model).__name__} at input {input_size} "
                        f"failed: {type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
        for m in norms:
            del m.forward
        for h in handles:
            h.remove()
    return found


def _same_shape(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.empty_like(x)


# Forwards known to return a tensor shaped as their input. Exact functions, not
# isinstance: a subclass (timm's BatchNormAct2d: BN, then activation and dropout) may
# do more, and a shape-changing override must still run.
_SHAPE_KEEPING_FORWARDS = {nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward,
                           BatchNormAct2d.forward}


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
        model = _make_backbone(spec, n_cls, backbone_args)
    plan: list[tuple[str, BlockConfig, SiteRef, bool]] = []
    plan_index: list[int] = []  # the insertion of each plan entry
    for i, ins in enumerate(spec.insert):
        where = f"{spec.name}: insert[{i}] ({ins.block.block_type()})"
        with _located(spec, "insert", i):
            if ins.zero_init and not isinstance(ins.at, str) and ins.at.position == "replace":
                raise SpecError(f"{where}: zero_init cannot apply to a 'replace' site")
            for site in resolve_sites(model, ins, where):
                plan.append((where, ins.block, site, ins.zero_init))
                plan_index.append(i)
    with _located(spec, "insert"):
        _refuse_sites_inside_replacements(plan)
    with _located(spec, "input_size" if spec.input_size is not None else "backbone"):
        input_size = probe_input_size(model, spec, {**spec.backbone.args, **backbone_args})
        shapes = probe(model, {s.path for _, _, s, _ in plan}, input_size) if plan else {}
    inserted: list[InsertedBlock] = []
    for (where, config, site, zero_init), i in zip(plan, plan_index, strict=True):
        with _located(spec, "insert", i):
            inserted.append(_insert(model, where, config, site, zero_init,
                                    shapes.get(site.path)))
    model.attnzoo_spec, model.attnzoo_unrecorded_args = _as_built(spec, num_classes,
                                                                   backbone_args)
    model.attnzoo_blocks = inserted
    apply_zoo_cfg(model, spec)
    return model


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


def _refuse_sites_inside_replacements(plan: list[tuple[str, BlockConfig, SiteRef, bool]]
                                      ) -> None:
    """A replaced module is gone from the built model: no other site may be it, lie
    inside it, or hold it."""
    for i, (where, _, site, _) in enumerate(plan):
        if site.position != "replace":
            continue
        for j, (other_where, _, other, _) in enumerate(plan):
            if i == j:
                continue
            if other.path == site.path or other.path.startswith(site.path + ".") or (
                    site.path.startswith(other.path + ".")):
                raise SpecError(
                    f"{where}: replaces {site.path!r}, and {other_where} uses "
                    f"{other.path!r} ({other.position}); a replaced module cannot also be, "
                    "contain or lie inside another site")


def _insert(model: nn.Module, where: str, config: BlockConfig, site: SiteRef, zero_init: bool,
            shape: tuple[Any, Any] | None) -> InsertedBlock:
    if shape is None or shape[0] is None or shape[1] is None:
        raise SpecError(f"{where}: module {site.path!r} was not reached by a forward pass, "
                        "or does not take and return a tensor; pick another site")
    (in_ch, in_size, in_rank), (out_ch, out_size, out_rank) = shape
    rank = out_rank if site.position == "after" else in_rank
    if rank not in config.input_ranks:
        wanted = " or ".join(_RANK_NAMES.get(r, f"{r}-D") for r in config.input_ranks)
        raise SpecError(f"{where}: block {config.block_type()!r} takes {wanted} tensors, but "
                        f"{site.position} {site.path!r} the tensor is "
                        f"{_RANK_NAMES.get(rank, f'{rank}-D')}; pick another site")
    target = model.get_submodule(site.path)
    if site.position == "replace":
        stride = getattr(target, "stride", 1)
        site_info = Site(channels=in_ch, size=in_size, out_channels=out_ch, out_size=out_size,
                         stride=stride[0] if isinstance(stride, tuple) else int(stride),
                         replaced=target)
    elif site.position == "before":
        site_info = Site(channels=in_ch, size=in_size)
    else:
        site_info = Site(channels=out_ch, size=out_size)
    try:
        block = config.build(site_info)
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{where}: cannot build at {site.path} ({site.position}, "
                        f"{site_info.channels} channels): {exc}") from None
    if not takes_one_tensor(block):
        raise SpecError(f"{where}: block {config.block_type()!r} fuses several inputs and "
                        f"cannot be inserted at one site ({site.path}); it is used inside "
                        "architectures")
    if zero_init:
        if config.residual and hasattr(block, "reset_identity_"):
            block.reset_identity_()
        else:
            block = IdentityBlend(block)
    params = sum(p.numel() for p in block.parameters())
    if site.position == "replace":
        name = _replace(model, site.path, block)
    else:
        name = _attach(model, site.path, AFTER if site.position == "after" else BEFORE, block)
    replaced = site.position == "replace"
    return InsertedBlock(name, config.block_type(), site.path, site.position,
                         site_info.channels, site_info.size, params,
                         out_channels=out_ch if replaced else site_info.channels,
                         out_size=out_size if replaced else site_info.size)


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
