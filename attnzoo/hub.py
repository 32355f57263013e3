"""Talking to the Hugging Face Hub: ``hf-hub:org/repo[@revision]`` names, downloads
(through huggingface_hub: its cache, offline mode and progress bars) and uploads."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, hf_hub_download
from torch import nn

from ._version import __version__
from .errors import WeightsError
from .hub_cache import cached_file_problem, forget_answer, quarantine, removal_advice
from .hub_http import deadline, describe, is_offline
from .loading import WeightsPlan
from .manifests import COMMIT
from .provenance import refuse_random_init
from .safe_weights import HashMismatch, read_verified
from .saved import SPEC_FILE, read_saved_spec, save_pretrained, saved_weights_plan
from .spec import ModelSpec
from .zoo import HUB_PREFIX

_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?", re.ASCII)
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def clip(text: str, n: int = 80) -> str:
    """``repr(text)``, cut to about ``n`` characters: a stranger's id in a message."""
    shown = repr(text)
    return shown if len(shown) <= n else f"{shown[:n]}... ({len(text):,} characters)"


def repo_id_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` is not a Hub repo id (``name`` or ``org/name``), or None: the Hub's
    rules (letters, digits, ``_.-``, at most 96 characters a part, no ``--`` or ``..``,
    starting and ending with a letter, digit or ``_``)."""
    parts = repo_id.split("/")
    if not 1 <= len(parts) <= 2:
        return "expected org/name"
    for part in parts:
        if len(part) > 96:
            return f"a part is {len(part):,} characters (the Hub allows 96)"
        if not _REPO_PART.fullmatch(part) or "--" in part or ".." in part:
            return ("a part is not letters, digits and _.- (starting and ending with a "
                    "letter, digit or _, no -- or ..)")
    return None


def revision_problem(revision: str) -> str | None:
    """Why ``revision`` is not a commit, branch or tag name (git's ref rules), or None."""
    if not isinstance(revision, str) or not revision:
        return "empty or not a string"
    if len(revision) > 255:
        return f"{len(revision):,} characters (at most 255)"
    if _REF_FORBIDDEN.search(revision):
        return "control characters, spaces and ~^:?*[\\ are not allowed"
    if (revision.startswith(("/", "-")) or revision.endswith(("/", ".")) or ".." in revision
            or "//" in revision or "@{" in revision or revision == "@"
            or any(p.startswith(".") or p.endswith(".lock") for p in revision.split("/"))):
        return "not a valid git ref name (.., //, a leading / or -, a part starting with .)"
    return None


def check_repo(repo_id: str, revision: str | None, where: str) -> None:
    """Refuse a repo id or revision that the Hub could not have, before any request."""
    problem = repo_id_problem(repo_id) if isinstance(repo_id, str) else "not a string"
    if problem:
        raise WeightsError(f"{clip(where)}: {clip(repo_id)} is not a Hub repo id: {problem}")
    problem = revision_problem(revision) if revision is not None else None
    if problem:
        raise WeightsError(f"{clip(where)}: revision {clip(revision)} is not a commit, branch "
                           f"or tag name: {problem}")


def parse_hub_name(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """``hf-hub:org/repo@rev`` -> (``org/repo``, rev); ``revision`` may give the rev. The
    repo id and the revision are checked (:func:`check_repo`) before any request."""
    body = name[len(HUB_PREFIX):] if name.startswith(HUB_PREFIX) else name
    repo_id, _, at_rev = body.partition("@")
    problem = repo_id_problem(repo_id)
    if problem:
        raise WeightsError(f"{clip(name)}: not a Hub repo id ({problem}); expected "
                           "hf-hub:org/name[@revision]")
    if at_rev and revision and at_rev != revision:
        raise WeightsError(f"{clip(name)}: revision given twice ({clip(at_rev)} in the name, "
                           f"{clip(revision)} as revision=)")
    rev = at_rev or revision or None
    check_repo(repo_id, rev, name)
    return repo_id, rev


def commit_of(path: Path) -> str | None:
    """The commit of a file in the Hub cache (``.../snapshots/<commit>/<file>``)."""
    parts = path.parts
    if "snapshots" in parts[:-1]:
        found = parts[len(parts) - 1 - parts[::-1].index("snapshots") + 1]
        return found if COMMIT.match(found) else None
    return None


def _fetch(repo_id: str, filename: str, revision: str | None, where: str) -> Path:
    with deadline() as call:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision,
                                        library_name="attnzoo", library_version=__version__))
        except Exception as exc:  # noqa: BLE001 - network, cache and Hub errors alike
            raise WeightsError(f"{clip(where, 200)}: cannot get {filename} from "
                               f"{repo_id}@{revision or 'main'}: "
                               f"{describe(exc, call, revision)}") from exc


def hub_download(repo_id: str, filename: str, revision: str | None, where: str, *,
                 check_bytes: bool = False) -> Path:
    """``hf_hub_download`` with its errors turned into WeightsError that say what
    happened, an overall deadline (``$ATTNZOO_DOWNLOAD_TIMEOUT``), the repo id and
    revision checked first, and the file checked: the commit a pinned revision names,
    a link into the cache's blobs and (``check_bytes``) bytes that hash to their ETag.
    A cached file that fails is taken out of the cache and, online, downloaded again."""
    check_repo(repo_id, revision, where)
    for attempt in (1, 2):
        path = _fetch(repo_id, filename, revision, where)
        if revision is not None and COMMIT.match(revision) and commit_of(path) != revision:
            forget_answer(path, revision)  # filed under the wrong commit: out of the cache
            raise WeightsError(f"{clip(where, 200)}: asked for {filename} at commit {revision}, "
                               f"the Hub answered commit {commit_of(path)}; refusing it")
        problem = cached_file_problem(path, check_bytes)
        if problem is None:
            return path
        advice = removal_advice(path)
        removed = quarantine(path)
        if attempt == 2 or not removed or is_offline():
            tail = ("it was removed from the Hub cache; load again online to download it "
                    "again" if removed else f"remove it from the Hub cache ({advice})")
            source = "the Hub sent" if attempt == 2 else "the cached copy"
            raise WeightsError(f"{clip(where, 200)}: {filename} of {repo_id}@"
                               f"{revision or 'main'}: {source} {problem}; {tail}")
    raise AssertionError("unreachable")


def hub_weights(name: str, revision: str | None = None) -> tuple[ModelSpec, WeightsPlan]:
    """The spec of an ``hf-hub:`` repo saved by attnzoo and the plan to load its verified
    weights, both from one commit (even if a branch moves in between)."""
    repo_id, rev = parse_hub_name(name, revision)
    spec_path = hub_download(repo_id, SPEC_FILE, rev, name, check_bytes=True)
    commit = commit_of(spec_path) or rev
    spec, info = read_saved_spec(spec_path)
    where = f"{name} ({info['file']})"
    weights_path = hub_download(repo_id, info["file"], commit, name)

    def read() -> dict[str, torch.Tensor]:
        try:
            return read_verified(weights_path, info["sha256"], where)
        except HashMismatch:  # taken out of the cache: online, one fresh download
            if is_offline() or weights_path.exists():
                raise
        return read_verified(hub_download(repo_id, info["file"], commit, name),
                             info["sha256"], where)

    return spec, saved_weights_plan(weights_path, info, where,
                                    {"repo": repo_id, "revision": commit}, read=read)


def push_to_hub(model: nn.Module, repo_id: str, *, revision: str | None = None,
                private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, create_pr: bool = False,
                license: str | None = None, metrics: dict[str, float] | None = None,
                source: dict[str, Any] | None = None, tags: list[str] | None = None,
                allow_random_init: bool = False) -> str:
    """Save the model (:func:`save_pretrained`) to a temporary folder and upload it to the
    Hub repo ``repo_id`` (created if missing; ``revision`` names a branch, created from
    main if missing). Returns the URL of the commit.

    ``license``, ``metrics``, ``source`` and ``tags`` go to :func:`save_pretrained` (the
    model card and ``attnzoo.yaml``); ``token`` (default: the logged-in one),
    ``private``, ``commit_message`` and ``create_pr`` to ``huggingface_hub.HfApi``. A
    model never loaded or trained is refused unless ``allow_random_init``."""
    save_kwargs = {"license": license, "metrics": metrics, "source": source, "tags": tags}
    check_repo(repo_id, revision, "push_to_hub")
    spec = getattr(model, "attnzoo_spec", None)
    refuse_random_init(model, f"push to {repo_id}", allow_random_init)
    api = HfApi(token=token, library_name="attnzoo", library_version=__version__)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="attnzoo-push-") as tmp:
        save_pretrained(model, tmp, repo_id=repo_id, **save_kwargs)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=tmp, revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload {getattr(spec, 'name', 'model')} "
            f"with attnzoo {__version__}")
    return str(getattr(info, "commit_url", info))


__all__ = ["HUB_PREFIX", "check_repo", "hub_download", "hub_weights", "parse_hub_name",
           "push_to_hub"]
