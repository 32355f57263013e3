"""Building a model whose parameters a weights file will provide: no init, no memory.

Inside :func:`parameters_on_meta` every ``nn.Parameter`` a module registers is put on
the meta device, so it takes no memory and its initialisation is a no-op, while
buffers (BatchNorm statistics, FcaNet's DCT bases, relative position indices) are
computed on the CPU exactly as in a normal build. ``build_model(..., init="skip")``
uses it; the loader then assigns the file's tensors.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


class _ParametersOnMeta(threading.local):
    """Per-thread switch of :func:`parameters_on_meta` (other threads build normally)."""

    depth: int = 0


_META = _ParametersOnMeta()
_PATCH_LOCK = threading.Lock()
_PATCH_USERS = 0
_ORIGINAL_REGISTER = nn.Module.register_parameter


def _register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    if _META.depth and type(param) is nn.Parameter and not param.is_meta:
        # The real tensor (``torch.empty`` in a layer's __init__, not yet initialised)
        # is dropped here; the layer's initialisation then runs on meta: a no-op.
        param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    _ORIGINAL_REGISTER(module, name, param)


class _SkipInitOnMeta(TorchFunctionMode):
    """In-place ops on meta tensors (``normal_``, ``uniform_``, ``fill_``: a layer's
    initialisation) return at once instead of running torch's Python decompositions,
    which cost about half of a ResNet-50 build and change nothing on meta."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (args and isinstance(args[0], torch.Tensor) and args[0].is_meta
                and getattr(func, "__name__", "").endswith("_")
                and not getattr(func, "__name__", "").startswith("__")):
            return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with every ``nn.Parameter`` on the meta device, buffers as usual.

    Only the calling thread is affected. ``nn.Module.register_parameter`` is swapped
    while any thread is inside (the only way to reach parameters created by arbitrary
    third-party layers before their init runs) and restored when the last one leaves.
    """
    global _PATCH_USERS
    with _PATCH_LOCK:
        if _PATCH_USERS == 0:
            nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign]
        _PATCH_USERS += 1
    _META.depth += 1
    try:
        with _SkipInitOnMeta():
            yield
    finally:
        _META.depth -= 1
        with _PATCH_LOCK:
            _PATCH_USERS -= 1
            if _PATCH_USERS == 0:
                nn.Module.register_parameter = _ORIGINAL_REGISTER  # type: ignore[method-assign]


def named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``model`` by name, shared ones under each name."""
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` still on the meta device."""
    return [name for name, t in named_tensors(model) if t.is_meta]


def fill_meta_tensors(model: nn.Module, source: nn.Module) -> list[str]:
    """Give the meta tensors of ``model`` the tensors of the same name in ``source`` (a
    normal build of the same network). Returns the names filled."""
    left = meta_tensors(model)
    fresh = dict(named_tensors(source))
    for name in left:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if leaf in module._parameters:
            module._parameters[leaf] = fresh[name]  # type: ignore[assignment]
        else:
            module._buffers[leaf] = fresh[name]
    return left


__all__ = ["fill_meta_tensors", "meta_tensors", "named_tensors", "parameters_on_meta"]
