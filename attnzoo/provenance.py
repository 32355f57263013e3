"""What a model's weights are, for the files and cards that describe them: the
random initialisation attnzoo built, the weights it loaded (unchanged), or weights
changed since then (fine-tuned, trained, replaced).

``create_model`` takes a fingerprint of every parameter and buffer when it returns:
its storage and its version counter, which every in-place update bumps (an optimizer
step, ``load_state_dict``, a BatchNorm's running statistics in a training forward).
Comparing it later costs one pass over the state dict, no hashing."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from .errors import AttnZooError

_FINGERPRINT = "_attnzoo_weights_fingerprint"

WeightsState = Literal["random", "loaded", "changed", "unknown"]


def _fingerprint(model: nn.Module) -> tuple[tuple[str, int, int], ...]:
    return tuple((name, t.data_ptr(), t._version)
                 for name, t in model.state_dict(keep_vars=True).items())


def remember_weights(model: nn.Module) -> None:
    """Record the weights ``model`` holds now as the ones attnzoo built or loaded."""
    object.__setattr__(model, _FINGERPRINT, _fingerprint(model))


def weights_state(model: nn.Module) -> WeightsState:
    """``random``: attnzoo's initialisation, never loaded or trained; ``loaded``: the
    weights of ``model.attnzoo_weights``, unchanged; ``changed``: updated or replaced
    since; ``unknown``: the model was not made by ``create_model``."""
    seen = getattr(model, _FINGERPRINT, None)
    if seen is None:
        return "unknown"
    if seen != _fingerprint(model):
        return "changed"
    record: dict[str, Any] = getattr(model, "attnzoo_weights", None) or {}
    if not record or record.get("init") == "random":
        return "random"
    return "loaded"


def refuse_random_init(model: nn.Module, what: str, allowed: bool) -> None:
    """Refuse to publish weights that are attnzoo's random initialisation, unless
    ``allowed``."""
    if weights_state(model) == "random" and not allowed:
        raise AttnZooError(
            f"{what}: the model's weights are its random initialisation (never loaded or "
            "trained since create_model); train or load it first, or pass "
            "allow_random_init=True (CLI: --allow-random-init) to push it as such")


def derived_from(record: dict[str, Any]) -> dict[str, Any]:
    """The identity of the loaded weights that new weights start from."""
    keys = ("model", "backbone", "tag", "repo", "revision", "file", "sha256", "loaded_from")
    return {k: record[k] for k in keys if record.get(k) is not None}


__all__ = ["WeightsState", "derived_from", "refuse_random_init", "remember_weights",
           "weights_state"]
