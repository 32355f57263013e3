"""Hub downloads that end, and that say what went wrong.

:func:`deadline` puts one overall limit (``$ATTNZOO_DOWNLOAD_TIMEOUT``) on everything
huggingface_hub does for one file: every request's timeouts are cut to the time left,
and a body that arrives too slowly (a server that drips bytes) is stopped between
chunks. It also checks the Hub's answers before huggingface_hub turns them into cache
paths: a commit id must be 40 hex digits and an ETag one plain path component.

It works through huggingface_hub's shared HTTP client (httpx event hooks, installed
once; they do nothing outside a :func:`deadline`). :func:`describe` turns what
huggingface_hub raised into what happened: an HTTP status, not found, offline, timed
out, no connection.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import constants

from .hub_cache import SAFE_COMPONENT
from .settings import DOWNLOAD_TIMEOUT_ENV, download_timeout

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TIMEOUT_KEYS = ("connect", "read", "write", "pool")


class DownloadTimeout(Exception):
    """The download's deadline passed (not an httpx error: huggingface_hub must not retry)."""


class BadHubAnswer(Exception):
    """The Hub answered something that cannot be right (and must not become a path)."""


@dataclass
class Call:
    """One file's download: its deadline and the last HTTP status seen."""

    limit: float
    start: float = field(default_factory=time.monotonic)
    status: int | None = None

    @property
    def deadline(self) -> float:
        return self.start + self.limit

    def elapsed(self) -> float:
        return time.monotonic() - self.start


_CALL: ContextVar[Call | None] = ContextVar("attnzoo_hub_call", default=None)


def _on_request(request: Any) -> None:
    call = _CALL.get()
    if call is None:
        return
    left = call.deadline - time.monotonic()
    if left <= 0:
        raise DownloadTimeout()
    timeout = dict(request.extensions.get("timeout") or {})
    request.extensions = {**request.extensions, "timeout": {
        k: left if timeout.get(k) is None else min(timeout[k], left) for k in _TIMEOUT_KEYS}}


def _on_response(response: Any) -> None:
    call = _CALL.get()
    if call is None:
        return
    call.status = response.status_code
    commit = response.headers.get(constants.HUGGINGFACE_HEADER_X_REPO_COMMIT)
    if commit is not None and not _COMMIT.match(commit):
        raise BadHubAnswer(f"the Hub answered the commit id {commit[:60]!r}, not 40 hex "
                           "digits")
    for header in ("ETag", constants.HUGGINGFACE_HEADER_X_LINKED_ETAG):
        value = response.headers.get(header)
        if value is not None and not SAFE_COMPONENT.match(value.lstrip("W/").strip('"')):
            raise BadHubAnswer(f"the Hub answered the {header} {value[:60]!r}, which is "
                               "not a file hash")
    response.stream = _timed_stream(response.stream, call)


_STREAM_CLASSES: dict[type, type] = {}


def _timed_stream(stream: Any, call: Call) -> Any:
    """``stream`` (an httpx SyncByteStream) that stops once the deadline has passed."""
    httpx = sys.modules.get(type(stream).__module__.split(".")[0])  # httpx, or httpx2
    base = getattr(httpx, "SyncByteStream", None)
    if base is None or not isinstance(stream, base):
        return stream
    cls = _STREAM_CLASSES.get(base)
    if cls is None:
        def __iter__(self: Any) -> Iterator[bytes]:  # noqa: N807
            for chunk in self.inner:
                if time.monotonic() > self.call.deadline:
                    raise DownloadTimeout()
                yield chunk

        def close(self: Any) -> None:
            self.inner.close()

        cls = _STREAM_CLASSES[base] = type("DeadlineStream", (base,),
                                           {"__iter__": __iter__, "close": close})
    timed = cls()
    timed.inner, timed.call = stream, call
    return timed


def _install() -> None:
    """The hooks on huggingface_hub's shared client (which it may re-create)."""
    from huggingface_hub.utils import get_session

    hooks = getattr(get_session(), "event_hooks", None)
    if hooks is None:  # a requests-based huggingface_hub: its own timeouts only
        return
    if _on_request not in hooks["request"]:
        hooks["request"].append(_on_request)
    if _on_response not in hooks["response"]:
        hooks["response"].append(_on_response)


@contextlib.contextmanager
def deadline() -> Iterator[Call]:
    """Everything huggingface_hub does in the body, for this thread, ends by
    ``$ATTNZOO_DOWNLOAD_TIMEOUT`` seconds from now (give or take one of its own
    per-read timeouts, 10 s by default)."""
    call = Call(download_timeout())
    _install()
    token = _CALL.set(call)
    try:
        yield call
    finally:
        _CALL.reset(token)


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _find(chain: list[BaseException], *names: str) -> BaseException | None:
    for exc in chain:
        if any(cls.__name__ in names for cls in type(exc).__mro__):
            return exc
    return None


def is_offline() -> bool:
    check = getattr(constants, "is_offline_mode", None)
    return bool(check()) if callable(check) else bool(constants.HF_HUB_OFFLINE)


def describe(exc: BaseException, call: Call, revision: str | None) -> str:
    """What went wrong in a download, in words (with the time it took)."""
    chain = _chain(exc)
    took = f"after {call.elapsed():.1f} s"
    status = f"; the Hub's last answer was HTTP {call.status}" if (
        call.status and call.status >= 400) else ""
    if _find(chain, "DownloadTimeout"):
        return (f"timed out: the download did not finish within {call.limit:g} s "
                f"(${DOWNLOAD_TIMEOUT_ENV}){status}")
    bad = _find(chain, "BadHubAnswer")
    if bad is not None:
        return f"{bad} ({took}); refusing the answer"
    if _find(chain, "GatedRepoError"):
        return (f"the repo is gated: accept its terms on the Hub and log in (`hf auth login`) "
                f"({took})")
    if _find(chain, "RepositoryNotFoundError"):
        return (f"no such repo on the Hub (or it is private: log in with `hf auth login`) "
                f"({took})")
    if _find(chain, "RevisionNotFoundError"):
        return f"the repo has no revision {str(revision)[:80]!r} ({took})"
    if _find(chain, "RemoteEntryNotFoundError") or any(  # older huggingface_hub's name
            type(e).__name__ == "EntryNotFoundError" for e in chain):
        return f"the repo has no such file at that revision ({took})"
    http = _find(chain, "HfHubHTTPError", "HTTPError")
    code = getattr(getattr(http, "response", None), "status_code", None)
    if code is not None:
        kind = ("a server error; try again later" if code >= 500 else "not authorised: log "
                "in with `hf auth login`" if code in (401, 403) else "a refused request")
        return f"the Hub answered HTTP {code} ({kind}), {took}"
    if _find(chain, "OfflineModeIsEnabled") or is_offline():
        return ("offline mode is on (HF_HUB_OFFLINE) and the file is not in the local "
                "Hub cache")
    if _find(chain, "TimeoutException", "Timeout", "ReadTimeout", "ConnectTimeout"):
        return f"timed out waiting for {constants.ENDPOINT} ({took})"
    if _find(chain, "ConnectError", "NetworkError", "ConnectionError"):
        return (f"cannot connect to {constants.ENDPOINT} (no network, or the Hub is down) "
                f"({took})")
    if _find(chain, "LocalEntryNotFoundError"):
        return (f"the Hub could not be reached and the file is not in the local cache "
                f"({took})")
    if isinstance(exc, ValueError) and "pointer path" in str(exc):
        return f"the Hub answered a commit id that is not a plain name ({took})"
    return f"{type(exc).__name__}: {str(exc)[:300]} ({took})"


__all__ = ["BadHubAnswer", "Call", "DownloadTimeout", "deadline", "describe", "is_offline"]
