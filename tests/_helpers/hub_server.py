"""A loopback HTTP server that plays the Hugging Face Hub for ``hf_hub_download``.

It answers ``HEAD``/``GET /{repo}/resolve/{revision}/{file}`` like the Hub does
for an LFS file: ``ETag`` (the file's sha256), ``X-Repo-Commit`` (the commit the
revision resolves to), ``Content-Length``, ``Accept-Ranges``/``Range``, and on a
miss a 404 whose ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound)
huggingface_hub turns into its own exceptions. Every request is recorded, so a
test can check what was (not) fetched.

``serve_fake_hub`` (for a fixture) starts one on a random port and points huggingface_hub at
it (``HF_ENDPOINT``, and the constants read at import) with a fresh ``HF_HOME``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest


@dataclass
class FakeRepo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)


class FakeHub:
    """In-memory repos served over HTTP on 127.0.0.1."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content
    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Add a commit holding exactly ``files`` on ``branch``; returns its 40-hex id."""
        repo = self.repos.setdefault(repo_id, FakeRepo())
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + files[name])
        digest.update(str(len(repo.commits)).encode())
        sha = digest.hexdigest()
        repo.commits[sha] = dict(files)
        repo.refs[branch] = sha
        return sha

    def commit_folder(self, repo_id: str, folder: str | Path, branch: str = "main") -> str:
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.commit(repo_id, files, branch)

    def fetched(self, suffix: str = "") -> list[str]:
        """Paths of GET requests (downloads), optionally ending with ``suffix``."""
        with self._lock:
            return [p for m, p in self.requests if m == "GET" and p.endswith(suffix)]

    # -- server
    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:  # noqa: N802
                hub._answer(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub._answer(self, body=True)

            def log_message(self, *args) -> None:  # keep test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _answer(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        path = urlsplit(req.path).path
        with self._lock:
            self.requests.append((req.command, path))
        parts = path.lstrip("/").split("/")
        if "resolve" not in parts:
            return self._error(req, 404, "NotFound", None)
        i = parts.index("resolve")
        repo_id = "/".join(parts[:i])
        revision = unquote(parts[i + 1]) if len(parts) > i + 1 else ""
        filename = unquote("/".join(parts[i + 2:]))
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(req, 404, "RepoNotFound", None)
        commit = revision if revision in repo.commits else repo.refs.get(revision)
        if commit is None:
            return self._error(req, 404, "RevisionNotFound", None)
        data = repo.commits[commit].get(filename)
        if data is None:
            return self._error(req, 404, "EntryNotFound", commit)
        start, status = 0, 200
        rng = req.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng[6:].split("-")[0].isdigit():
            start, status = int(rng[6:].split("-")[0]), 206
        payload = data[start:]
        req.send_response(status)
        req.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        req.send_header("X-Repo-Commit", commit)
        req.send_header("Content-Length", str(len(payload)))
        req.send_header("Content-Type", "application/octet-stream")
        req.send_header("Accept-Ranges", "bytes")
        if status == 206:
            req.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        req.end_headers()
        if body:
            req.wfile.write(payload)

    @staticmethod
    def _error(req: BaseHTTPRequestHandler, status: int, code: str, commit: str | None) -> None:
        message = f"{code}: {req.path}".encode()
        req.send_response(status)
        req.send_header("X-Error-Code", code)
        req.send_header("X-Error-Message", code)
        if commit:
            req.send_header("X-Repo-Commit", commit)
        req.send_header("Content-Type", "text/plain")
        req.send_header("Content-Length", str(len(message)))
        req.end_headers()
        if req.command == "GET":
            req.wfile.write(message)


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch huggingface_hub to offline mode (env and the constant read at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def serve_fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A running FakeHub, with huggingface_hub pointed at it and at an empty HF_HOME.

    tests/conftest.py's ``fake_hub`` fixture is one.
    """
    from huggingface_hub import constants

    hub = FakeHub().start()
    home = tmp_path / "hf_home"
    cache = home / "hub"
    for key, value in {"HF_ENDPOINT": hub.url, "HF_HOME": str(home),
                       "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0",
                       "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                       "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    # Every path constant under the real HF_HOME (cache, token, agent registry, ...) moves
    # under the temporary one, so a test writes nothing outside tmp_path.
    old_home = constants.HF_HOME
    for name, value in vars(constants).copy().items():
        if name.isupper() and isinstance(value, str) and value.startswith(old_home):
            monkeypatch.setattr(constants, name, str(home) + value[len(old_home):])
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        yield hub
    finally:
        hub.stop()

