"""attnzoo's settings: environment variables read when they are needed (so a test or a
long-running process can change them), each with a default that suits a normal user.

=============================  =======  ====================================================
variable                       default  what it bounds
=============================  =======  ====================================================
``ATTNZOO_DOWNLOAD_TIMEOUT``   1800     seconds one Hub file download may take, all retries
                                        included (a stalled or dripping server ends in an error)
``ATTNZOO_LOCK_TIMEOUT``       120      seconds a save or load waits for another process's
                                        save into the same folder to finish
``ATTNZOO_MAX_SITES``          1024     blocks one spec may insert, once aliases and globs
                                        are resolved to sites (the zoo's largest: 53)
``ATTNZOO_HOME``               (cache)  attnzoo's folder in the user's cache: records of Hub
                                        files trusted on first use, files already verified;
                                        ``$XDG_CACHE_HOME/attnzoo`` or ``~/.cache/attnzoo``
=============================  =======  ====================================================
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import AttnZooError

DOWNLOAD_TIMEOUT_ENV = "ATTNZOO_DOWNLOAD_TIMEOUT"
LOCK_TIMEOUT_ENV = "ATTNZOO_LOCK_TIMEOUT"
MAX_SITES_ENV = "ATTNZOO_MAX_SITES"

DEFAULTS: dict[str, float] = {
    DOWNLOAD_TIMEOUT_ENV: 1800.0,
    LOCK_TIMEOUT_ENV: 120.0,
    MAX_SITES_ENV: 1024,
}


def _number(name: str) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return DEFAULTS[name]
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise AttnZooError(f"${name}={text[:40]!r}: must be a positive number "
                           f"(default {DEFAULTS[name]:g})")
    return value


def download_timeout() -> float:
    """Seconds one Hub file download may take in all (``$ATTNZOO_DOWNLOAD_TIMEOUT``)."""
    return _number(DOWNLOAD_TIMEOUT_ENV)


def lock_timeout() -> float:
    """Seconds to wait for another process's save into a folder (``$ATTNZOO_LOCK_TIMEOUT``)."""
    return _number(LOCK_TIMEOUT_ENV)


def max_sites() -> int:
    """Most blocks one spec may insert (``$ATTNZOO_MAX_SITES``)."""
    return int(_number(MAX_SITES_ENV))


HOME_ENV = "ATTNZOO_HOME"


def home() -> Path:
    """attnzoo's folder in the user's cache (``$ATTNZOO_HOME``)."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "attnzoo"


__all__ = ["DEFAULTS", "DOWNLOAD_TIMEOUT_ENV", "HOME_ENV", "LOCK_TIMEOUT_ENV", "MAX_SITES_ENV",
           "download_timeout", "home", "lock_timeout", "max_sites"]
