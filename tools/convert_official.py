"""Convert an author's released checkpoint into an attnzoo folder (spec, weights, card).

    python tools/convert_official.py cbam RESNET50_CBAM_new_name_wrap.pth out/resnet50_cbam
    python tools/convert_official.py fcanet fca50.pth out/resnet50_fca --metric top1=78.57
    python tools/convert_official.py --list

PAPER names the release (cbam, eca, eca101, simam, gct, fcanet, gsop) or its zoo model
(resnet50_cbam, ...). The checkpoint is a PyTorch pickle, so this tool, and only this
tool, reads it: with ``torch.load(weights_only=True)``, which unpickles tensors and plain
containers and refuses anything else (no code from the file runs). Training checkpoints
(``{"state_dict": ..., "epoch": ..., "optimizer": ...}``) and DataParallel's
``module.`` prefix are handled. ``attnzoo.convert.from_official`` maps the authors'
keys to the zoo model's; the weights are loaded strictly (every key, every shape) and
written as safetensors with the spec and a card that records where they came from
(the release, the file, its sha256). The attnzoo package itself never unpickles.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from _convert_cli import add_card_arguments, metrics_of, run_conversion

ROOT = Path(__file__).resolve().parents[1]

# Keys under which training scripts store the model's weights in a checkpoint.
_STATE_KEYS = ("state_dict", "model", "model_state_dict", "net")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The tensors of a released checkpoint: ``torch.load(weights_only=True)``, then the
    model's state dict out of a training checkpoint's dict."""
    import torch

    from attnzoo.errors import WeightsError

    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"convert_official: no file {path}") from None
    except Exception as exc:  # noqa: BLE001 - refused pickles, truncated files, ...
        raise WeightsError(f"convert_official: cannot read {path.name} as a weights-only "
                           f"PyTorch checkpoint: {type(exc).__name__}: {exc}") from None
    for _ in range(2):  # e.g. {"state_dict": {...}} or {"model": {"state_dict": ...}}
        if isinstance(data, dict):
            inner = next((data[k] for k in _STATE_KEYS if isinstance(data.get(k), dict)), None)
            if inner is not None:
                data = inner
    if not isinstance(data, dict) or not data:
        raise WeightsError(f"convert_official: {path.name} holds no state dict "
                           f"(got {type(data).__name__})")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"convert_official: {path.name} holds no tensors at its top "
                           f"level or under {', '.join(_STATE_KEYS)}")
    return tensors


def convert(paper: str, checkpoint: str | Path, out_dir: str | Path, *,
            license: str | None = None, metrics: dict[str, float] | None = None) -> Path:
    """Released checkpoint -> attnzoo folder for the zoo model of ``paper``."""
    import attnzoo
    from attnzoo.convert import OFFICIAL_RELEASES, from_official, official_model
    from attnzoo.loading import classifier_names, load_checked
    from attnzoo.safe_weights import sha256_file

    zoo_name = official_model(paper)
    release = OFFICIAL_RELEASES[zoo_name]
    checkpoint = Path(checkpoint)
    where = f"convert_official {release.paper} ({checkpoint.name})"
    state = from_official(zoo_name, read_checkpoint(checkpoint))
    model = attnzoo.create_model(zoo_name)
    heads = classifier_names(model)
    head_weight = state.get(f"{heads[0]}.weight") if heads else None
    if head_weight is not None and head_weight.shape[0] != model.num_classes:
        model = attnzoo.create_model(zoo_name, num_classes=head_weight.shape[0])
    load_checked(model, state, where)
    source: dict[str, Any] = {
        "converted_from": "official release", "paper": release.paper,
        "repo": f"https://github.com/{release.repo}", "release": release.checkpoint,
        "file": checkpoint.name, "sha256": sha256_file(checkpoint),
        "tool": "tools/convert_official.py",
    }
    if release.notes:
        source["notes"] = release.notes
    return attnzoo.save_pretrained(model, out_dir, source=source, metrics=metrics,
                                   license=license)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paper", nargs="?", help="the release (cbam, eca, simam, gct, "
                        "fcanet, ...) or its zoo model name")
    parser.add_argument("checkpoint", nargs="?", type=Path,
                        help="the authors' checkpoint (.pth / .pth.tar)")
    parser.add_argument("out_dir", nargs="?", type=Path, help="folder to write")
    add_card_arguments(parser, "license of the weights (the authors' repository states it)")
    parser.add_argument("--list", action="store_true", help="list the known releases")
    args = parser.parse_args(argv)

    from attnzoo.convert import OFFICIAL_RELEASES

    if args.list:
        for name, release in OFFICIAL_RELEASES.items():
            print(f"{release.paper:8} {name:16} {release.repo}: {release.checkpoint}")
        return 0
    if args.paper is None or args.checkpoint is None or args.out_dir is None:
        parser.error("PAPER, CHECKPOINT and OUT_DIR are required (or --list)")
    return run_conversion("convert_official", lambda: convert(
        args.paper, args.checkpoint, args.out_dir, license=args.license,
        metrics=metrics_of(args)))

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
