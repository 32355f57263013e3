"""The Hugging Face Hub cache as attnzoo sees it: whether a path lies in it, whether a
cached file still holds the bytes the Hub sent, and taking out one that does not.

huggingface_hub keeps each file once, as ``<repo folder>/blobs/<etag>``, and links it
from ``<repo folder>/snapshots/<commit>/<file>``. The ETag is the file's sha256 (LFS
files) or its git blob sha1 (small files), so a cached file can be checked against
the name it is stored under: nothing written into the cache after the download
(a save through its links, a user's edit) passes for the Hub's bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
from pathlib import Path

from huggingface_hub import constants

_REPO_FOLDER = re.compile(r"^(models|datasets|spaces)--[^/\\]+$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: A Hub answer (a file's ETag, a commit id) becomes one path component of the cache.
SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def hub_cache_dir() -> Path:
    """The Hub cache folder huggingface_hub uses now (``$HF_HUB_CACHE``), links resolved."""
    return Path(os.path.realpath(constants.HF_HUB_CACHE))


def cache_repo_folder(path: str | os.PathLike[str]) -> Path | None:
    """The repo folder (``models--org--name``) of a Hub cache that ``path`` lies in, as
    given or with its links resolved; None outside any Hub cache."""
    for p in (Path(os.path.abspath(path)), Path(os.path.realpath(path))):
        for folder in (p, *p.parents):
            if _REPO_FOLDER.match(folder.name) and (
                    (folder / "snapshots").is_dir() or (folder / "blobs").is_dir()):
                return folder
    return None


def in_hub_cache(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is or lies inside the Hub cache (huggingface_hub's current one, or
    any folder laid out as a cached repo)."""
    cache = hub_cache_dir()
    for p in (Path(os.path.abspath(path)), Path(os.path.realpath(path))):
        if p == cache or cache in p.parents:
            return True
    return cache_repo_folder(path) is not None


def blob_roots(folder: str | os.PathLike[str]) -> list[Path]:
    """Where files read from ``folder`` may lead besides the folder itself: for a
    snapshot folder of the Hub cache, its repo's ``blobs/``."""
    repo = cache_repo_folder(folder)
    return [Path(os.path.realpath(repo / "blobs"))] if repo is not None else []


def _git_blob_sha1(path: Path, size: int) -> str:
    digest = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    return _digest(path, digest, size)


def _digest(path: Path, digest: hashlib._Hash, size: int) -> str:
    with open(path, "rb", buffering=0) as f:
        left = size
        while left > 0 and (chunk := f.read(min(left, 1 << 20))):
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def cached_file_problem(pointer: str | os.PathLike[str], check_bytes: bool = True) -> str | None:
    """What is wrong with a file huggingface_hub returned from its cache, or None.

    The snapshot entry must link to a blob of its own repo; with ``check_bytes``, the
    blob's bytes must hash to the ETag it is named by (sha256 or git sha1). A path
    outside any cache, or a cache made without links (no symlinks on the platform),
    is not checked."""
    pointer = Path(pointer)
    repo = cache_repo_folder(pointer)
    if repo is None:
        return None
    if not pointer.is_symlink():
        from huggingface_hub.file_download import are_symlinks_supported

        if not are_symlinks_supported(str(repo.parent)):
            return None
        return "is a plain file where the cache keeps a link to the downloaded blob"
    blob = Path(os.path.realpath(pointer))
    if blob.parent != Path(os.path.realpath(repo / "blobs")):
        return f"links to {blob}, outside the cache's blobs/ folder of the repo"
    try:
        st = os.stat(blob)
    except OSError:
        return "links to a blob that is missing"
    if not stat.S_ISREG(st.st_mode):
        return "links to something that is not a regular file"
    if not check_bytes:
        return None
    if _SHA256.match(blob.name):
        actual, kind = _digest(blob, hashlib.sha256(), st.st_size), "sha256"
    elif _SHA1.match(blob.name):
        actual, kind = _git_blob_sha1(blob, st.st_size), "git sha1"
    else:
        return None  # an ETag that is not a content hash: nothing to check it against
    if actual != blob.name:
        return (f"holds bytes whose {kind} is {actual[:16]}..., not the {blob.name[:16]}... "
                "the Hub's ETag named (changed after the download, or not what the Hub said)")
    return None


def quarantine(pointer: str | os.PathLike[str]) -> bool:
    """Take a bad file out of the Hub cache (its snapshot link and the blob it links to),
    so that the next online load downloads it again. Returns whether it did."""
    pointer = Path(pointer)
    repo = cache_repo_folder(pointer)
    if repo is None:
        return False
    blob = Path(os.path.realpath(pointer)) if pointer.is_symlink() else None
    removed = False
    try:
        pointer.unlink()
        removed = True
        if blob is not None and blob.parent == Path(os.path.realpath(repo / "blobs")):
            blob.unlink(missing_ok=True)
    except OSError:
        pass
    return removed


def forget_answer(pointer: str | os.PathLike[str], revision: str) -> None:
    """Undo what huggingface_hub cached from an answer that named another commit than
    the one asked for: the file filed under that commit and the ref from ``revision``."""
    pointer = Path(pointer)
    repo = cache_repo_folder(pointer)
    if repo is None:
        return
    with contextlib.suppress(OSError):
        pointer.unlink()
    if SAFE_COMPONENT.match(revision):
        with contextlib.suppress(OSError):
            (repo / "refs" / revision).unlink()


def removal_advice(pointer: str | os.PathLike[str]) -> str:
    """How to remove a cached file: the command of the installed huggingface_hub, and
    the paths themselves."""
    pointer = Path(pointer)
    repo = cache_repo_folder(pointer)
    if repo is None:
        return f"delete {pointer}"
    parts = pointer.relative_to(repo).parts if pointer.is_relative_to(repo) else ()
    kind, *names = repo.name.split("--")
    commit = (parts[1] if len(parts) > 2 and parts[0] == "snapshots"
              else f"{kind[:-1]}/{'/'.join(names)}")
    paths = f"delete {pointer}" + (f" and {os.path.realpath(pointer)}"
                                    if pointer.is_symlink() else "")
    try:
        from huggingface_hub.cli import cache as cli_cache

        if hasattr(cli_cache, "rm"):
            return f"run `hf cache rm {commit} --cache-dir {repo.parent}`, or {paths}"
    except Exception:  # noqa: BLE001, S110 - an older huggingface_hub: paths only
        pass
    return paths


__all__ = ["SAFE_COMPONENT", "blob_roots", "cache_repo_folder", "cached_file_problem",
           "forget_answer", "hub_cache_dir", "in_hub_cache", "quarantine", "removal_advice"]
