"""Hub files that no manifest pins: verified by the Hub's own record, trusted on first use.

A weights file on the Hub that attnzoo has no pinned ``revision``/``sha256`` for (a
timm backbone's checkpoint, an unpinned zoo manifest entry) is resolved at load
time: the requested revision to its commit, and the file's sha256 from the Hub's
LFS record at that commit (the ``X-Linked-Etag`` huggingface_hub reads). The
downloaded bytes are checked against it. The first resolution is recorded in the
user's cache (``$ATTNZOO_HOME``, default ``~/.cache/attnzoo``), and later loads use
the record: offline, and to refuse a repo whose file changed under the same
revision. ``ATTNZOO_REQUIRE_PINNED=1`` (or ``require_pinned=True``) refuses every
unpinned file instead.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

from ._version import __version__
from .errors import WeightsError
from .safe_weights import SHA256
from .settings import HOME_ENV, home

REQUIRE_PINNED_ENV = "ATTNZOO_REQUIRE_PINNED"
_RECORDS = "hub_files.json"
_MAX_RECORDS_BYTES = 16 << 20


@dataclass(frozen=True)
class HubFile:
    """A Hub file resolved to one commit and the sha256 its bytes must have."""

    repo: str
    revision: str
    file: str
    commit: str
    sha256: str

    def record(self) -> dict[str, str]:
        return {"repo": self.repo, "revision": self.revision, "commit": self.commit,
                "file": self.file, "sha256": self.sha256}


def records_path() -> Path:
    return home() / _RECORDS


def pinned_only(require_pinned: bool | None = None) -> bool:
    """The setting: the argument when given, else ``$ATTNZOO_REQUIRE_PINNED``."""
    if require_pinned is not None:
        return require_pinned
    return os.environ.get(REQUIRE_PINNED_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _key(repo: str, revision: str, file: str) -> str:
    return f"{repo}@{revision}/{file}"


def _load_records() -> dict[str, dict[str, str]]:
    path = records_path()
    try:
        if path.stat().st_size > _MAX_RECORDS_BYTES:
            raise WeightsError(f"{path}: larger than {_MAX_RECORDS_BYTES} bytes; not attnzoo's")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: attnzoo's record of Hub files cannot be read ({exc}); "
                           "delete it to start afresh") from None
    return data if isinstance(data, dict) else {}


def _store_record(entry: HubFile) -> None:
    """Add one record, all-or-nothing (temp file, fsync, rename)."""
    path = records_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    records = _load_records()
    records[_key(entry.repo, entry.revision, entry.file)] = {
        **entry.record(), "first_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    fd, tmp = tempfile.mkstemp(prefix=".hub_files.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remember(entry: HubFile) -> None:
    """Record ``entry`` as trusted (after its bytes were verified), unless it already is."""
    if _key(entry.repo, entry.revision, entry.file) not in _load_records():
        _store_record(entry)


def _hub_metadata(repo: str, file: str, revision: str) -> tuple[str, str | None]:
    """(commit, sha256 or None) of ``file`` at ``revision``, from the Hub's headers."""
    meta = get_hf_file_metadata(hf_hub_url(repo, file, revision=revision),
                                library_name="attnzoo", library_version=__version__)
    etag = (meta.etag or "").strip('"').lower()
    return meta.commit_hash or "", etag if SHA256.match(etag) else None


def _offline_reason(exc: Exception) -> str | None:
    """Why the Hub could not be asked, when that is the failure (else None)."""
    name = type(exc).__name__
    if constants.HF_HUB_OFFLINE or name in ("OfflineModeIsEnabled", "LocalEntryNotFoundError"):
        return "offline mode (HF_HUB_OFFLINE)"
    if name in ("ConnectError", "ConnectTimeout", "ConnectionError", "ReadTimeout",
                "TimeoutException", "NetworkError"):
        return f"no network ({name})"
    return None


def resolve_hub_file(repo: str, file: str, revision: str | None, where: str, *,
                     require_pinned: bool | None = None) -> HubFile:
    """The commit and sha256 that ``file`` of ``repo`` at ``revision`` must have.

    Online: from the Hub's record, checked against attnzoo's record of the first use
    (a file that changed under the same revision is refused). Offline: the record.
    """
    revision = revision or "main"
    pin_hint = ("pin it in a manifest (tools/pin_weights.py) or unset "
                f"{REQUIRE_PINNED_ENV}")
    if pinned_only(require_pinned):
        raise WeightsError(f"{where}: {repo}@{revision} {file} is not pinned, and pinned "
                           f"files only are allowed (require_pinned); {pin_hint}")
    key = _key(repo, revision, file)
    known = _load_records().get(key)
    try:
        commit, sha256 = _hub_metadata(repo, file, revision)
    except Exception as exc:  # noqa: BLE001 - classified below
        reason = _offline_reason(exc)
        if reason is None:
            raise WeightsError(f"{where}: cannot resolve {repo}@{revision} {file} on the Hub: "
                               f"{type(exc).__name__}: {str(exc)[:300]}") from None
        if known is None:
            raise WeightsError(f"{where}: {repo}@{revision} {file} has not been loaded on this "
                               f"machine before, and the Hub cannot be asked for its sha256: "
                               f"{reason}; load it once online") from None
        return HubFile(repo, revision, file, known["commit"], known["sha256"])
    if sha256 is None:
        raise WeightsError(f"{where}: the Hub records no sha256 for {repo}@{revision} {file} "
                           f"(not an LFS file), so attnzoo cannot verify it; {pin_hint}")
    if known is not None and known.get("sha256") != sha256:
        raise WeightsError(
            f"{where}: {repo}@{revision} {file} changed since it was first loaded here: the "
            f"Hub now serves commit {commit} with sha256 {sha256}, attnzoo recorded commit "
            f"{known.get('commit')} with sha256 {known.get('sha256')} on "
            f"{known.get('first_used', 'first use')}. If the change is expected, remove "
            f"the entry {key!r} from {records_path()} and load again; or pin a commit.")
    return HubFile(repo, revision, file, commit, sha256)


def describe(entry: HubFile) -> dict[str, str]:
    """What ``model.attnzoo_weights`` records of a resolved Hub file."""
    return asdict(entry)


__all__ = ["HOME_ENV", "REQUIRE_PINNED_ENV", "HubFile", "describe", "home", "pinned_only",
           "records_path", "remember", "resolve_hub_file"]
