"""Building a backbone whose random initialisation waits until the spec's replacements
are done, so that the modules a spec replaces are never initialised.

Inside :func:`deferred_init`, every tensor created uninitialised (``torch.empty`` and
its kin: how layers allocate their parameters) is "fresh", and in-place writes to a
fresh tensor (``uniform_``, ``normal_``, ``fill_``, ``zero_``, ``copy_`` ... : what
``nn.init`` and ``reset_parameters`` do) are recorded instead of run. The allocation
itself is cheap (the pages of an untouched tensor are not even mapped); the random
numbers are what costs. :meth:`DeferredInit.materialise` later replays the recorded
writes, in their original order, for the tensors the finished model still holds;
those of replaced modules are dropped unrun.

Anything else that touches a fresh tensor during construction (reading it, say, to
compute a buffer from a weight) cannot be deferred: the recorder notes it and
:attr:`DeferredInit.replayable` turns false, and the caller builds again normally.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_aten = torch.ops.aten
_FACTORIES = {_aten.empty.memory_format, _aten.empty_strided.default,
              _aten.new_empty.default, _aten.new_empty_strided.default,
              _aten.empty_like.default}


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _writes_first_argument(func: Any) -> bool:
    args = func._schema.arguments
    return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write


class DeferredInit(TorchDispatchMode):
    """Records in-place writes to tensors created uninitialised (see the module docs)."""

    def __init__(self) -> None:
        super().__init__()
        self.fresh: dict[int, torch.Tensor] = {}   # storage -> a tensor on it (kept alive)
        self.writes: list[tuple[int, Any, tuple[int, ...], tuple[int, ...], int, tuple,
                                dict]] = []
        self.replayable = True
        self.reason = ""

    def _fresh(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and _storage_key(t) in self.fresh

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES:
            out = func(*args, **kwargs)
            self.fresh[_storage_key(out)] = out
            return out
        flat, _ = tree_flatten((args, kwargs))
        if not any(self._fresh(a) for a in flat):
            return func(*args, **kwargs)
        if func.is_view:                      # .data, slices, reshapes: same storage
            return func(*args, **kwargs)
        target = args[0] if args else None
        others = [a for a in flat[1:] if isinstance(a, torch.Tensor)]
        if (self._fresh(target) and _writes_first_argument(func)
                and not any(self._fresh(a) for a in others)):
            self.writes.append((_storage_key(target), func, tuple(target.shape),
                                tuple(target.stride()), target.storage_offset(),
                                tuple(args[1:]), dict(kwargs)))
            return target
        # A fresh tensor read (or written from another fresh one): its values are not
        # there yet. Run it anyway (construction goes on); the caller builds again.
        if self.replayable:
            self.replayable = False
            self.reason = str(func)
        return func(*args, **kwargs)

    def materialise(self, model: nn.Module) -> int:
        """Replay the recorded writes, in order, for the fresh tensors that ``model``
        still holds (parameters and buffers); the others' are dropped. Returns the number
        of elements initialised."""
        kept: dict[int, torch.Tensor] = {}
        for t in [*model.parameters(), *model.buffers()]:
            key = _storage_key(t)
            if key in self.fresh:
                kept[key] = self.fresh[key]
        done = set()
        with torch.no_grad():
            for key, func, size, stride, offset, rest, kwargs in self.writes:
                if key not in kept:
                    continue
                base = kept[key]
                target = base.as_strided(size, stride, offset)
                func(target, *rest, **kwargs)
                done.add(key)
        self.fresh.clear()
        self.writes.clear()
        return sum(kept[k].untyped_storage().nbytes() // kept[k].element_size() for k in done)


@contextlib.contextmanager
def deferred_init() -> Iterator[DeferredInit]:
    """Construct modules inside; then ``recorder.materialise(model)`` (see the module
    docs). Per thread: a dispatch mode, nothing global is patched."""
    recorder = DeferredInit()
    with recorder:
        yield recorder


__all__ = ["DeferredInit", "deferred_init"]
