"""Talking to the Hugging Face Hub: ``hf-hub:org/repo[@revision]`` names, downloads
(through huggingface_hub: its cache, offline mode and progress bars) and uploads."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, hf_hub_download
from torch import nn

from ._version import __version__
from .errors import WeightsError
from .loading import WeightsPlan
from .manifests import COMMIT
from .saved import SPEC_FILE, read_saved_spec, save_pretrained, saved_weights_plan
from .spec import ModelSpec
from .zoo import HUB_PREFIX


def parse_hub_name(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """``hf-hub:org/repo@rev`` -> (``org/repo``, rev); ``revision`` may give the rev."""
    body = name[len(HUB_PREFIX):] if name.startswith(HUB_PREFIX) else name
    repo_id, _, at_rev = body.partition("@")
    if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?", repo_id):
        raise WeightsError(f"{name!r}: not a Hub repo id (expected hf-hub:org/name[@revision])")
    if at_rev and revision and at_rev != revision:
        raise WeightsError(f"{name!r}: revision given twice ({at_rev!r} in the name, "
                           f"{revision!r} as revision=)")
    return repo_id, (at_rev or revision or None)


def hub_download(repo_id: str, filename: str, revision: str | None, where: str) -> Path:
    """``hf_hub_download`` with its errors turned into WeightsError."""
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision,
                                    library_name="attnzoo", library_version=__version__))
    except Exception as exc:  # noqa: BLE001 - network, cache and Hub errors alike
        kind = type(exc).__name__
        hint = ""
        if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            hint = (" (it is not in the local cache and the Hub cannot be reached: offline "
                    "mode or no network)")
        elif kind in ("RemoteEntryNotFoundError", "EntryNotFoundError"):
            hint = " (the repo has no such file at that revision)"
        raise WeightsError(f"{where}: cannot get {filename} from {repo_id}@{revision or 'main'}"
                           f"{hint}: {kind}: {exc}") from exc


def hub_weights(name: str, revision: str | None = None) -> tuple[ModelSpec, WeightsPlan]:
    """The spec of an ``hf-hub:`` repo saved by attnzoo and the plan to load its verified
    weights, both from one commit (even if a branch moves in between)."""
    repo_id, rev = parse_hub_name(name, revision)
    spec_path = hub_download(repo_id, SPEC_FILE, rev, name)
    commit = spec_path.parent.name if COMMIT.match(spec_path.parent.name) else rev
    spec, info = read_saved_spec(spec_path)
    where = f"{name} ({info['file']})"
    weights_path = hub_download(repo_id, info["file"], commit, name)
    return spec, saved_weights_plan(weights_path, info, where,
                                    {"repo": repo_id, "revision": commit})


def push_to_hub(model: nn.Module, repo_id: str, *, revision: str | None = None,
                private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, create_pr: bool = False,
                license: str | None = None, metrics: dict[str, float] | None = None,
                source: dict[str, Any] | None = None, tags: list[str] | None = None) -> str:
    """Save the model (:func:`save_pretrained`) to a temporary folder and upload it to the
    Hub repo ``repo_id`` (created if missing; ``revision`` names a branch, created from
    main if missing). Returns the URL of the commit.

    ``license``, ``metrics``, ``source`` and ``tags`` go to :func:`save_pretrained` (the
    model card and ``attnzoo.yaml``); ``token`` (default: the logged-in one),
    ``private``, ``commit_message`` and ``create_pr`` to ``huggingface_hub.HfApi``."""
    save_kwargs = {"license": license, "metrics": metrics, "source": source, "tags": tags}
    spec = getattr(model, "attnzoo_spec", None)
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


__all__ = ["HUB_PREFIX", "hub_download", "hub_weights", "parse_hub_name", "push_to_hub"]
