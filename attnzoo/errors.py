"""The exceptions attnzoo raises. Every message says what was wrong and where."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent) + os.sep


class AttnZooError(Exception):
    """Base class of every error that attnzoo raises on purpose."""


class SpecError(AttnZooError, ValueError):
    """A spec (YAML, dict or ModelSpec) is invalid, or cannot be built."""


class WeightsError(AttnZooError):
    """Weights are missing, refused (pickle), corrupt, or do not fit the model."""


def short_list(items: list[str], n: int = 8) -> str:
    """The first ``n`` items, comma-separated, and how many more."""
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _library_folders() -> tuple[str, ...]:
    """attnzoo's folder, and timm's when it is imported (``timm.create_model`` of a zoo
    model runs attnzoo below timm's factory)."""
    timm = sys.modules.get("timm")
    timm_file = getattr(timm, "__file__", None)
    extra = (str(Path(timm_file).resolve().parent) + os.sep,) if timm_file else ()
    return (_PACKAGE, *extra)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside attnzoo (and timm, when
    timm called attnzoo): the user's call, so the warning points at the line that asked
    for it."""
    folders = _library_folders()
    level, frame = 2, sys._getframe(1)
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(
            folders):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)
