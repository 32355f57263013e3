"""Pin zoo weights: fill ``revision`` and ``sha256`` of manifest entries from the Hub.

    python tools/pin_weights.py                 # every manifest in weights/
    python tools/pin_weights.py resnet50_se     # some of them
    python tools/pin_weights.py --check         # verify pinned entries, change nothing

Run it on a machine with network access, then review the diff. For each entry
with a ``repo``: the entry's revision (or ``main`` when empty) is resolved to its
commit, and the file's sha256 is read from the Hub's LFS metadata (or, for a file
not in LFS, computed from a download). An entry already pinned is checked against
the Hub instead: a different sha256 at the same commit is reported, never
overwritten. Embedded entries (no ``repo``) are left alone.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def hub_facts(api: Any, repo: str, revision: str | None, file: str) -> tuple[str, str]:
    """(commit, sha256) of ``file`` in ``repo`` at ``revision`` (main when None)."""
    from attnzoo.hub import hub_download
    from attnzoo.safe_weights import sha256_file as sha256_of

    info = api.model_info(repo, revision=revision or "main", files_metadata=True)
    sibling = next((s for s in info.siblings or [] if s.rfilename == file), None)
    if sibling is None:
        raise LookupError(f"{repo}@{info.sha} has no file {file!r}")
    lfs = getattr(sibling, "lfs", None)
    sha = lfs.sha256 if lfs is not None else None
    if sha is None:  # a small file kept in git: hash it ourselves
        sha = sha256_of(hub_download(repo, file, info.sha, "pin_weights"))
    return info.sha, sha


def pin_manifest(path: Path, api: Any, check_only: bool) -> list[str]:
    """Pin (or check) the entries of one manifest; returns problems found."""
    text = path.read_text(encoding="utf-8")
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    data = yaml.safe_load(text)
    problems, changed = [], False
    for tag, entry in data.get("tags", {}).items():
        if not entry.get("repo"):
            continue
        where = f"{path.name}: {tag}"
        try:
            commit, sha = hub_facts(api, entry["repo"], entry.get("revision"),
                                    entry.get("file", "model.safetensors"))
        except Exception as exc:  # noqa: BLE001 - report and go on with the others
            problems.append(f"{where}: {type(exc).__name__}: {exc}")
            continue
        if entry.get("sha256") and entry["sha256"] != sha:
            problems.append(f"{where}: recorded sha256 {entry['sha256']} != Hub's {sha} "
                            f"at {commit}")
            continue
        if entry.get("revision") and entry["revision"] != commit:
            problems.append(f"{where}: revision {entry['revision']} resolves to {commit}")
            continue
        if not (entry.get("revision") and entry.get("sha256")):
            if check_only:
                problems.append(f"{where}: not pinned (Hub: {commit}, {sha})")
            else:
                entry["revision"], entry["sha256"] = commit, sha
                changed = True
                print(f"{where}: pinned {entry['repo']}@{commit} sha256 {sha}")
        else:
            print(f"{where}: ok")
    if changed:
        path.write_text(header + yaml.safe_dump(data, sort_keys=False, width=100),
                        encoding="utf-8")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="zoo models (default: every manifest)")
    parser.add_argument("--check", action="store_true", help="verify only, write nothing")
    parser.add_argument("--weights-dir", type=Path, default=ROOT / "weights")
    args = parser.parse_args(argv)

    from huggingface_hub import HfApi

    from attnzoo.manifests import load_manifest  # noqa: F401  (fails early if attnzoo is broken)

    paths = ([args.weights_dir / f"{m}.yaml" for m in args.models] if args.models
             else sorted(args.weights_dir.glob("*.yaml")))
    api = HfApi()
    problems: list[str] = []
    for path in paths:
        if not path.is_file() or not re.fullmatch(r"[\w.\-]+\.yaml", path.name):
            problems.append(f"{path}: no such manifest")
            continue
        problems += pin_manifest(path, api, args.check)
    for problem in problems:
        print(f"pin_weights: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
