"""Files this machine has already verified: a warm load reads them without hashing again.

After a file's bytes matched their sha256, attnzoo records the file's identity (its
resolved path, device, inode, size, mtime_ns and ctime_ns) with that sha256 in the
user's cache (``$ATTNZOO_HOME/verified.json``). A later read of a file with the same
identity, expecting the same sha256, skips the hash. Any change to the file (a write,
a rename over it, a chmod) changes its ctime or inode, and it is hashed again. The
record is a cache: losing it (or another process's concurrent update) costs one hash.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .settings import home

_FILE = "verified.json"
_MAX_ENTRIES = 256
_MAX_BYTES = 1 << 20


def _identity(path: Path, st: os.stat_result) -> tuple[str, list[int]]:
    return str(path.resolve()), [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                 st.st_ctime_ns]


def _load() -> dict[str, dict]:
    try:
        path = home() / _FILE
        if path.stat().st_size > _MAX_BYTES:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_verified(path: Path, st: os.stat_result, sha256: str) -> bool:
    """Whether the file at ``path`` (``st`` from the open file) was verified to have
    ``sha256`` and has not changed since."""
    key, ident = _identity(path, st)
    entry = _load().get(key)
    return isinstance(entry, dict) and entry.get("id") == ident and entry.get("sha256") == sha256


def remember(path: Path, st: os.stat_result, sha256: str) -> None:
    """Record that the file at ``path`` (as ``st`` describes it) has ``sha256``."""
    key, ident = _identity(path, st)
    records = _load()
    records.pop(key, None)
    records[key] = {"id": ident, "sha256": sha256}
    records = dict(list(records.items())[-_MAX_ENTRIES:])  # the most recent last
    folder = home()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".verified.", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(records, f)
            os.replace(tmp, folder / _FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass  # a read-only or full cache: the next load hashes again


__all__ = ["is_verified", "remember"]
