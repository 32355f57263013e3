"""Putting blocks into a model: the one routine behind ``build_model`` and ``insert``.

1. Resolve every insertion's sites against the model as it is (:mod:`attnzoo.sites`).
2. Probe the model once on the meta device: the shape of every site's input and
   output, and the channel count of the layer that produced it, from which each
   site's layout follows (:mod:`attnzoo.layouts`); a second dry run at twice the
   input size only where that does not tell.
3. Build each block for its site, in the layout it takes (converted at a site of
   another layout), and attach it: after or before a module (its class becomes a
   subclass that runs the block; its parameter names stay) or in place of it. No
   forward hooks remain on the model.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import BatchNormAct2d
from torch import nn

from .aliases import find_stages
from .blocks.base import BlockConfig, Site, takes_one_tensor
from .errors import SpecError
from .layouts import (
    AXES,
    RANKS,
    Layout,
    LayoutAdapter,
    Stated,
    block_layouts,
    decide,
    layer_features,
    run_layout,
    run_size,
    tensor_shape,
    token_hints,
)
from .settings import MAX_SITES_ENV, max_sites
from .sites import SiteRef, resolve_sites
from .spec import Insertion

AFTER, BEFORE = "attnzoo_after", "attnzoo_before"


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
    layout: str = "nchw"           # the site's layout (attnzoo.layouts)
    block_layout: str = "nchw"     # the layout the block runs in (converted when it differs)
    in_shape: tuple[int, ...] | None = None   # the site's tensors, batch axis left out
    out_shape: tuple[int, ...] | None = None


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


def _sequential_forward(self: nn.Sequential, x: Any) -> Any:
    """``nn.Sequential.forward`` without the attnzoo blocks attached to the Sequential
    (they are children too, and its forward would run every child)."""
    for name, module in self._modules.items():
        if name not in (AFTER, BEFORE):
            x = module(x)
    return x


def _make_attention_class(base: type[nn.Module], before: bool, after: bool) -> type[nn.Module]:
    run = _sequential_forward if base.forward is nn.Sequential.forward else base.forward

    def forward(self, x, *args, **kwargs):
        if before:
            x = self.attnzoo_before(x)
        y = run(self, x, *args, **kwargs)
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


# ---------------------------------------------------------------------------- probe


@dataclass
class Seen:
    """A module in one dry run: its input and output shapes (batch of one), the
    channel count of the last layer that ran before each, and how often it ran."""

    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    in_feature: int | None = None
    out_feature: int | None = None
    calls: int = 0
    done: bool = field(default=False, repr=False)


def probe(model: nn.Module, paths: set[str] | Sequence[str], input_size: tuple[int, ...], *,
          tolerate: bool = False) -> dict[str, Seen]:
    """What each module at ``paths`` sees in one forward pass on the meta device (no
    real compute, weights untouched). The temporary hooks are removed. With
    ``tolerate``, a pass that fails part-way returns what it saw until then."""
    seen = {p: Seen() for p in paths}
    trail = [input_size[0]]  # channel counts of the layers run so far (the image first)
    handles = []
    for module in model.modules():
        features = layer_features(module)
        if features is not None:
            handles.append(module.register_forward_hook(
                lambda *_, f=features: trail.append(f)))
    for path, rec in seen.items():
        module = model.get_submodule(path)

        def pre(_m, inputs, rec=rec):
            rec.calls += 1
            if rec.calls == 1:
                rec.in_shape = tensor_shape(inputs[0]) if inputs else None
                rec.in_feature = trail[-1]

        def post(_m, _inputs, output, rec=rec):
            if not rec.done:
                rec.done = True
                rec.out_shape, rec.out_feature = tensor_shape(output), trail[-1]

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
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
        if not tolerate:
            raise SpecError(f"shape probe of {type(model).__name__} at input {input_size} "
                            f"failed: {type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
        for m in norms:
            del m.forward
        for h in handles:
            h.remove()
    return seen


def _same_shape(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.empty_like(x)


# Forwards known to return a tensor shaped as their input. Exact functions, not
# isinstance: a subclass (timm's BatchNormAct2d: BN, then activation and dropout) may
# do more, and a shape-changing override must still run.
_SHAPE_KEEPING_FORWARDS = {nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward,
                           BatchNormAct2d.forward}


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The (C, H, W) a model is made for: its timm ``pretrained_cfg``'s, else 3x224x224;
    H and W of its patch embedding when it has a fixed one (a timm ViT or Swin built
    with ``img_size``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans, h, w = cfg.get("input_size", (3, 224, 224))
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(fixed, tuple | list) and len(fixed) == 2 and all(
            isinstance(v, int) for v in fixed):
        h, w = fixed
    return (chans, h, w)


def doubled(input_size: tuple[int, ...]) -> tuple[int, ...]:
    return (input_size[0], *(2 * s for s in input_size[1:]))


def site_layouts(model: nn.Module, path: str, first: Seen, second: Seen | None,
                 input_size: tuple[int, ...], stated: Stated | None = None
                 ) -> tuple[Layout | None, Layout | None]:
    """The layouts of the input and the output of the module at ``path``."""
    hints = token_hints(model, path)
    hw = tuple(input_size[1:3]) if len(input_size) >= 3 else None

    def one(shape, feature, shape2):
        if shape is None:
            return None
        if stated is not None and stated.kind is not None and RANKS[stated.kind] != len(shape):
            return Layout("unknown", shape)  # the caller names the mismatch
        return decide(shape, feature=feature, second=shape2, stated=stated, token_hints=hints,
                      input_hw=hw)

    return (one(first.in_shape, first.in_feature, second.in_shape if second else None),
            one(first.out_shape, first.out_feature, second.out_shape if second else None))


# ---------------------------------------------------------------------------- insert


@dataclass(frozen=True)
class _Planned:
    where: str
    index: int          # the insertion it comes from
    config: BlockConfig
    site: SiteRef
    zero_init: bool


Locate = Callable[..., AbstractContextManager[None]]


def _nowhere(*_loc: Any) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


def apply_insertions(model: nn.Module, insertions: Sequence[Insertion],
                     input_size: tuple[int, ...], label: str, *,
                     locate: Locate = _nowhere) -> list[InsertedBlock]:
    """Insert ``insertions`` (a spec's ``insert:``) into ``model`` in place; the blocks
    it put where, in order. ``label`` starts every error (``resnet50_cbam: insert[0]
    (cbam): ...``); ``locate("insert", i)`` / ``locate("insert")`` / ``locate("probe")``
    wrap the steps so that a caller can add where the insertion was written."""
    plan: list[_Planned] = []
    stages = find_stages(model)
    for i, ins in enumerate(insertions):
        where = f"{label}: insert[{i}] ({ins.block.block_type()})"
        with locate("insert", i):
            if ins.zero_init and not isinstance(ins.at, str) and ins.at.position == "replace":
                raise SpecError(f"{where}: zero_init cannot apply to a 'replace' site")
            for site in resolve_sites(model, ins, where, stages):
                plan.append(_Planned(where, i, ins.block, site, ins.zero_init))
            if len(plan) > (cap := max_sites()):
                raise SpecError(f"{where}: the inserts resolve to more than {cap} sites "
                                f"({len(plan)} after this one); a spec inserts at most {cap} "
                                f"blocks (${MAX_SITES_ENV} raises the limit)")
    with locate("insert"):
        _refuse_sites_inside_replacements(plan)
    if not plan:
        return []
    paths = sorted({p.site.path for p in plan})
    with locate("probe"):
        first = probe(model, paths, input_size)
    layouts = {p.site: site_layouts(model, p.site.path, first[p.site.path], None, input_size,
                                    p.site.stated) for p in plan}
    unsure = sorted({p.site.path for p in plan if _needs_second_look(p, layouts[p.site])})
    if unsure:
        second = probe(model, unsure, doubled(input_size), tolerate=True)
        for p in plan:
            if p.site.path in second:
                layouts[p.site] = site_layouts(model, p.site.path, first[p.site.path],
                                               second[p.site.path], input_size, p.site.stated)
    inserted = []
    for p in plan:
        with locate("insert", p.index):
            inserted.append(_insert(model, p, first[p.site.path], *layouts[p.site]))
    return inserted


def _needs_second_look(p: _Planned, layouts: tuple[Layout | None, Layout | None]) -> bool:
    lin, lout = layouts
    used = [lout] if p.site.position == "after" else [lin] if p.site.position == "before" \
        else [lin, lout]
    accepted = block_layouts(p.config)
    return any(lay is not None and (lay.kind == "unknown" or (
        lay.kind == "tokens" and lay.grid is None and "tokens" not in accepted))
        for lay in used)


def _refuse_sites_inside_replacements(plan: list[_Planned]) -> None:
    """A replaced module is gone from the built model: no other site may be it or lie
    inside it. A site that holds it (``after: layer1`` with ``layer1.0.conv2``
    replaced) is fine: a replacement is built for the replaced module's output shape,
    so what the holder takes and returns is unchanged."""
    for i, p in enumerate(plan):
        site = p.site
        if site.position != "replace":
            continue
        for j, q in enumerate(plan):
            other = q.site
            if i != j and (other.path == site.path or other.path.startswith(site.path + ".")):
                raise SpecError(
                    f"{p.where}: replaces {site.path!r}, and {q.where} uses "
                    f"{other.path!r} ({other.position}); a replaced module cannot also be "
                    "or hold another site")


def _what(layout: Layout) -> str:
    rank = len(layout.shape)
    axes = AXES.get(layout.kind, "")
    return f"{rank}-D {axes}{' ' if axes else ''}({layout.describe()})"


def _site_layout(p: _Planned, lin: Layout | None, lout: Layout | None) -> Layout:
    """The layout of the tensor the block takes at its site; errors when unknown."""
    site = p.site
    layout = lout if site.position == "after" else lin
    stated = site.stated
    if stated is not None and stated.kind is not None and \
            RANKS[stated.kind] != len(layout.shape):
        raise SpecError(f"{p.where}: layout {stated.kind} is for {RANKS[stated.kind]}-D "
                        f"tensors {AXES[stated.kind]}, but {site.position} {site.path!r} the "
                        f"tensor is {len(layout.shape)}-D {tuple(layout.shape)}")
    if layout.kind == "unknown":
        raise SpecError(
            f"{p.where}: cannot tell where the channels are {site.position} {site.path!r}: "
            f"the tensor is {tuple(layout.shape)}, and neither the layer before it nor a "
            "second dry run at twice the input size tells; state it: at: {path: "
            f"{site.path!r}, position: {site.position}, layout: "
            f"{'nchw|nhwc' if len(layout.shape) == 4 else 'tokens'}}}")
    return layout


def allocation_error(where: str, config: BlockConfig, exc: BaseException) -> BaseException:
    """The SpecError for a block whose build ran out of memory (a field far too large for
    the site), naming the fields the spec set; any other error is returned as it is."""
    text = str(exc)
    if not (isinstance(exc, MemoryError) or any(
            w in text for w in ("alloc", "out of memory", "overflow", "too large"))):
        return exc
    fields = {k: v for k, v in config.model_dump(exclude_defaults=True).items() if k != "type"}
    asked = ", ".join(f"{k}={v!r}" for k, v in fields.items()) or "its default fields"
    first = text.strip().splitlines()[-1][:200] if text.strip() else type(exc).__name__
    return SpecError(f"{where}: building the {config.block_type()!r} block ran out of memory "
                     f"({first}): with {asked} at this site it needs more than this machine "
                     "can allocate; use smaller values (or a smaller input_size)")


def _insert(model: nn.Module, p: _Planned, seen: Seen, lin: Layout | None,
            lout: Layout | None) -> InsertedBlock:
    site, config, where = p.site, p.config, p.where
    if seen.calls == 0 or lin is None or lout is None:
        raise SpecError(f"{where}: module {site.path!r} was not reached by a forward pass, "
                        "or does not take and return a tensor; pick another site")
    if seen.calls > 1:
        raise SpecError(f"{where}: module {site.path!r} runs {seen.calls} times in one "
                        "forward pass (a shared module, like the ReLU of torchvision's "
                        "ResNet blocks): a block there would run at every call; pick "
                        "another site")
    layout = _site_layout(p, lin, lout)
    accepted = block_layouts(config)
    kind = run_layout(layout, accepted)
    replacing = site.position == "replace"
    if kind is not None and replacing and kind != layout.kind and lin.kind != lout.kind:
        kind = None
    if kind is None:
        wanted = " or ".join(f"{RANKS[k]}-D {AXES[k]} tensors ({k})" for k in accepted)
        why = ""
        if layout.kind == "tokens" and layout.grid is None and \
                any(k in ("nchw", "nhwc") for k in accepted):
            why = ("; the tokens' grid is unknown: state it with layout: tokens, grid: "
                   "[h, w] and prefix_tokens (the class tokens before the grid)")
        raise SpecError(f"{where}: block {config.block_type()!r} takes {wanted}, but "
                        f"{site.position} {site.path!r} the tensor is {_what(layout)}{why}; "
                        "pick another site")
    target = model.get_submodule(site.path)
    if replacing:
        stride = getattr(target, "stride", 1)
        site_info = Site(channels=lin.channels, size=run_size(lin, kind),
                         out_channels=lout.channels, out_size=run_size(lout, kind),
                         stride=stride[0] if isinstance(stride, tuple) else int(stride),
                         replaced=target)
    else:
        site_info = Site(channels=layout.channels, size=run_size(layout, kind))
    try:
        block = config.build(site_info)
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{where}: cannot build at {site.path} ({site.position}, "
                        f"{site_info.channels} channels): {exc}") from None
    except (MemoryError, RuntimeError) as exc:
        size = f", {'x'.join(map(str, site_info.size))}" if site_info.size else ""
        raise allocation_error(f"{where}: at {site.path} ({site_info.channels} channels{size})",
                               config, exc) from None
    if not takes_one_tensor(block):
        raise SpecError(f"{where}: block {config.block_type()!r} fuses several inputs and "
                        f"cannot be inserted at one site ({site.path}); it is used inside "
                        "architectures")
    if p.zero_init:
        if config.residual and hasattr(block, "reset_identity_"):
            block.reset_identity_()
        else:
            block = IdentityBlend(block)
    params = sum(q.numel() for q in block.parameters())
    if kind != layout.kind:
        block = LayoutAdapter(block, layout.kind, kind, prefix=layout.prefix or 0,
                              grid=layout.grid)
    if replacing:
        name = _replace(model, site.path, block)
    else:
        name = _attach(model, site.path, AFTER if site.position == "after" else BEFORE, block)
    out = lout if replacing else layout
    return InsertedBlock(
        name, config.block_type(), site.path, site.position, site_info.channels,
        site_info.size, params,
        out_channels=site_info.out_channels if replacing else site_info.channels,
        out_size=site_info.out_size if replacing else site_info.size,
        layout=str(layout), block_layout=kind,
        in_shape=tuple(layout.shape[1:]), out_shape=tuple(out.shape[1:]))


__all__ = ["AFTER", "BEFORE", "IdentityBlend", "InsertedBlock", "Seen", "apply_insertions",
           "convert_sync_batchnorm", "default_input_size", "doubled", "probe",
           "reattach_blocks", "site_layouts"]
