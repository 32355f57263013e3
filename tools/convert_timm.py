"""Convert a timm safetensors checkpoint into an attnzoo folder (spec, weights, card).

    python tools/convert_timm.py resnet50_se --repo timm/seresnet50.a1_in1k --out out/resnet50_se
    python tools/convert_timm.py resnet50_se --checkpoint seresnet50.safetensors --out out/x

The keys are renamed by ``attnzoo.convert.from_timm`` (the zoo model must have an
entry in ``TIMM_EQUIVALENTS``) and loaded strictly; the folder records where the
weights came from: the source repo, its resolved revision, the file and its sha256.
Push the folder with ``attnzoo push out/x org/repo``. Pickle checkpoints are
refused without being opened.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from _convert_cli import add_card_arguments, metrics_of, run_conversion

ROOT = Path(__file__).resolve().parents[1]


def timm_license(repo: str | None) -> str | None:
    """The license timm states for a ``timm/<model>.<tag>`` repo, if it knows the tag."""
    import timm

    if not repo or not repo.startswith("timm/"):
        return None
    try:
        return timm.models.get_pretrained_cfg(repo.split("/", 1)[1]).license
    except Exception:  # noqa: BLE001 - an unknown tag simply has no known license
        return None


def convert(zoo_name: str, checkpoint: str | Path, out_dir: str | Path, *,
            source_repo: str | None = None, source_revision: str | None = None,
            license: str | None = None, metrics: dict[str, float] | None = None) -> Path:
    """timm checkpoint (safetensors) -> attnzoo folder for zoo model ``zoo_name``."""
    import attnzoo
    from attnzoo.convert import TIMM_EQUIVALENTS, from_timm
    from attnzoo.loading import classifier_names, load_checked
    from attnzoo.safe_weights import read_verified, sha256_file

    checkpoint = Path(checkpoint)
    where = f"convert_timm {zoo_name} ({checkpoint.name})"
    # attnzoo's reader: pickles refused, a regular file only, the header checked first
    state = from_timm(zoo_name, read_verified(checkpoint, None, where, require_hash=False))
    sha = sha256_file(checkpoint)
    model = attnzoo.create_model(zoo_name)
    heads = classifier_names(model)
    head_weight = state.get(f"{heads[0]}.weight") if heads else None
    if head_weight is not None and head_weight.shape[0] != model.num_classes:
        model = attnzoo.create_model(zoo_name, num_classes=head_weight.shape[0])
    load_checked(model, state, where)
    source: dict[str, Any] = {"converted_from": "timm",
                              "timm_model": TIMM_EQUIVALENTS[zoo_name].timm_name}
    if source_repo:
        source["repo"] = source_repo
    if source_revision:
        source["revision"] = source_revision
    source.update({"file": checkpoint.name, "sha256": sha, "tool": "tools/convert_timm.py"})
    return attnzoo.save_pretrained(model, out_dir, source=source, metrics=metrics,
                                   license=license or timm_license(source_repo))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="zoo model with a timm equivalent, e.g. resnet50_se")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a local timm .safetensors file")
    src.add_argument("--repo", help="Hub repo of the timm weights, e.g. timm/seresnet50.a1_in1k")
    parser.add_argument("--revision", default=None, help="Hub revision (default: main)")
    parser.add_argument("--file", default="model.safetensors", help="file in the Hub repo")
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    add_card_arguments(parser, "license of the weights (default: timm's, for timm/ repos)")
    args = parser.parse_args(argv)

    from attnzoo.hub import commit_of, hub_download

    def fetch_and_convert() -> Path:
        revision = args.revision
        checkpoint = args.checkpoint
        if args.repo:
            checkpoint = hub_download(args.repo, args.file, args.revision, "convert_timm",
                                      check_bytes=True)
            # The cache path names the commit the revision resolved to.
            revision = commit_of(checkpoint) or revision
        return convert(args.model, checkpoint, args.out, source_repo=args.repo,
                       source_revision=revision, license=args.license,
                       metrics=metrics_of(args))

    return run_conversion("convert_timm", fetch_and_convert)

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
