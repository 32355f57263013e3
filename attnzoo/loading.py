"""Putting verified tensors into a model: keys and shapes checked first, the model
untouched when anything does not fit; the classifier may be left out for a new head.

:func:`reading` starts reading (and verifying) a weights file in a worker thread
while the model is built; :func:`load_weights` assigns the tensors to a model built
with ``init="skip"`` and gives real tensors to whatever the file did not hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .builder import build_model
from .errors import WeightsError, warn_user
from .meta_init import fill_meta_tensors, meta_tensors
from .spec import ModelSpec
from .timm_cfg import apply_zoo_cfg


def classifier_names(model: nn.Module) -> list[str]:
    """Module paths of the classifier, from ``pretrained_cfg['classifier']`` (timm style),
    else from ``get_classifier()``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    if isinstance(names, str):
        return [names]
    if names:
        return list(names)
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    return [n for n, m in model.named_modules() if m is head and n]


def _short(keys: list[str], n: int = 8) -> str:
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], where: str,
                 allow_new_head: bool = False, assign: bool = False) -> list[str]:
    """Load ``state`` into ``model`` after checking keys and shapes; the model is
    untouched when anything does not fit.

    With ``allow_new_head``, classifier tensors that do not fit (another number of
    classes) are left at their initialisation, with a warning; the dropped keys are
    returned. Any other missing, unexpected or mis-shaped key is a WeightsError that
    names it.

    With ``assign``, the model's tensors are replaced by the file's own (cast to the
    model's dtype where they differ) instead of being copied into: no second copy of
    the weights, and the model may have been built with its parameters on the meta
    device (see :func:`build_for_weights`).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    dropped: list[str] = []
    if allow_new_head and (missing or unexpected or mismatched):
        heads = classifier_names(model)

        def in_head(key: str) -> bool:
            return any(key == h or key.startswith(h + ".") for h in heads)

        dropped = sorted({k for k in (*missing, *unexpected, *mismatched) if in_head(k)})
        missing = [k for k in missing if not in_head(k)]
        unexpected = [k for k in unexpected if not in_head(k)]
        mismatched = [k for k in mismatched if not in_head(k)]
        # A head key that fits still belongs to the old classifier: leave it out too.
        dropped = sorted({*dropped, *(k for k in state if in_head(k))})
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + _short(
            [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
             for k in mismatched]))
    if missing:
        problems.append(f"missing from the file: {_short(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_short(unexpected)}")
    if problems:
        raise WeightsError(f"{where}: the weights do not fit the model: " + "; ".join(problems))
    if dropped:
        state = {k: v for k, v in state.items() if k not in dropped}
        # attributed to the user's call (create_model, load_zoo_weights, timm.create_model
        # through attnzoo's entry point...), however deep in attnzoo the load runs
        warn_user(f"{where}: the classifier was not loaded (another number of classes), "
                  f"it keeps its random initialisation: {_short(dropped)}")
    if assign:
        state = {k: v if v.dtype == expected[k].dtype else v.to(expected[k].dtype)
                 for k, v in state.items()}
    result = model.load_state_dict(state, strict=not dropped, assign=assign)
    left = set(result.missing_keys) - set(dropped)
    if left or result.unexpected_keys:  # cannot happen after the checks above
        raise WeightsError(f"{where}: load_state_dict left keys out: {_short(sorted(left))}")
    return dropped


# ------------------------------------------------------------------ reading and loading


@dataclass
class WeightsPlan:
    """Which weights a model gets: ``read()`` returns the verified state dict in
    attnzoo's layout; ``record`` becomes ``model.attnzoo_weights``."""

    where: str
    read: Callable[[], dict[str, torch.Tensor]]
    record: dict[str, Any] = field(default_factory=dict)
    #: Classes the weights were trained for (None: unknown, any new num_classes works).
    num_classes: int | None = None
    #: True when a saved folder's head may be replaced for another ``num_classes``.
    new_head_on_request: bool = False
    #: How the model is built for these weights: "skip" (parameters on meta, the file
    #: holds all of them) or "random" (the file holds a part, e.g. a backbone).
    init: str = "skip"
    #: Loads a partial state dict instead of the whole-model load (see backbone.py).
    apply: Callable[[nn.Module, dict[str, torch.Tensor], int | None], None] | None = None

    def allows_new_head(self, model: nn.Module, num_classes: int | None) -> bool:
        if self.new_head_on_request:
            return num_classes is not None
        model_classes = getattr(model, "num_classes", None)
        return (self.num_classes is not None and model_classes is not None
                and model_classes != self.num_classes)


@dataclass
class PendingWeights:
    """Weights being read in a worker thread (see :func:`reading`)."""

    plan: WeightsPlan
    future: Future
    rng_state: torch.Tensor


@contextlib.contextmanager
def reading(plan: WeightsPlan | None) -> Iterator[PendingWeights | None]:
    """Read and verify ``plan``'s file in a worker thread while the body builds the model
    (reading and hashing release the GIL, so a load costs about the longer of the two).
    No tensor reaches a model before its hash is checked; when both the file and the
    build fail, the weights error is the one raised."""
    if plan is None:
        yield None
        return
    with ThreadPoolExecutor(1, thread_name_prefix="attnzoo-read") as pool:
        pending = PendingWeights(plan, pool.submit(plan.read), torch.random.get_rng_state())
        try:
            yield pending
        except BaseException:
            pending.future.result()  # a bad file is reported first
            raise
        pending.future.result()


def build_init(pending: PendingWeights | None) -> str:
    """The ``init`` mode of ``build_model`` for these weights ("random" without any)."""
    return "random" if pending is None else pending.plan.init


def load_weights(model: nn.Module, pending: PendingWeights | None, spec: ModelSpec,
                 num_classes: int | None, backbone_args: dict[str, Any]) -> None:
    """Assign the verified tensors of ``pending`` to ``model`` (built from ``spec`` with
    ``init="skip"``), then give real tensors to whatever the file did not hold (a new
    classifier): they come from a normal build of the same spec run from the random
    state before the load, so they are initialised as ``build_model`` with that seed
    would. Nothing when ``pending`` is None."""
    if pending is None:
        return
    plan = pending.plan
    state = pending.future.result()
    if plan.apply is not None:
        plan.apply(model, state, num_classes)
        _record(model, spec, plan)
        return
    load_checked(model, state, plan.where, assign=True,
                 allow_new_head=plan.allows_new_head(model, num_classes))
    del state
    if meta_tensors(model):  # a normal build costs a second copy: only when needed
        torch.random.set_rng_state(pending.rng_state)
        fill_meta_tensors(model, build_model(spec, num_classes, **backbone_args))
        still = meta_tensors(model)
        if still:  # the normal build has them on meta too: a bug in that module
            raise WeightsError(f"{spec.name}: cannot materialise {_short(still)}")
    _record(model, spec, plan)


def _record(model: nn.Module, spec: ModelSpec, plan: WeightsPlan) -> None:
    model.attnzoo_weights = dict(plan.record)
    apply_zoo_cfg(model, spec, model.attnzoo_weights)


__all__ = ["PendingWeights", "WeightsPlan", "build_init", "classifier_names", "load_checked",
           "load_weights", "reading"]
