"""The ``attnzoo`` command: list, show, summary, schema, push."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import __version__
from .errors import AttnZooError

if TYPE_CHECKING:
    from torch import nn


def _cmd_list(args: argparse.Namespace) -> int:
    from .zoo import list_models

    for name in list_models(args.pattern):
        print(name)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from .zoo import load_spec

    print(load_spec(args.name).to_yaml(), end="")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from .spec import ModelSpec

    print(json.dumps(ModelSpec.model_json_schema(), indent=2))
    return 0


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _use_rich() -> bool:
    """Rich tables on a terminal (when rich is installed); plain text when piped."""
    if not sys.stdout.isatty():
        return False
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]],
                 right: Sequence[str] = ()) -> None:
    """``rows`` under ``headers``; the ``right`` columns are right-aligned (rich only)."""
    if _use_rich():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for h in headers:
            # fold rather than cut long module paths when the terminal is narrow
            table.add_column(h, justify="right" if h in right else "left", overflow="fold")
        for row in rows:
            table.add_row(*map(str, row))
        Console().print(table)
        return
    print(title)
    if rows:
        print(_table(headers, rows))


def count_flops(model: nn.Module, input_size: Sequence[int]) -> tuple[int, dict[str, int]]:
    """FLOPs of one eval-mode forward pass of a batch of one, as
    ``torch.utils.flop_counter.FlopCounterMode`` counts them (2 per multiply-add): the
    total, and the count of every submodule by its path in ``model`` ("" = the model)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros((1, *input_size), device=device))
    finally:
        model.train(was_training)
    # FlopCounterMode names modules "<root class name>.<path>", plus "Global".
    root = type(model).__name__
    per_module = {}
    for name, ops in counter.get_flop_counts().items():
        if name == root or name.startswith(f"{root}."):
            per_module[name[len(root) + 1:]] = sum(ops.values())
    return counter.get_total_flops(), per_module


def _fmt(value: float) -> str:
    """Three decimals, or three significant digits for what would round to 0.000."""
    return f"{value:.3f}" if value >= 0.01 or value == 0 else f"{value:.3g}"


def _cmd_summary(args: argparse.Namespace) -> int:
    from .builder import probe_input_size
    from .pretrained import create_model

    model = create_model(args.name)
    spec = model.attnzoo_spec
    total = sum(p.numel() for p in model.parameters())
    added = sum(b.params for b in model.attnzoo_blocks)
    print(f"{spec.name}: {spec.description}")
    print(f"backbone: {spec.backbone.source}:{spec.backbone.name} ({type(model).__name__})")
    print(f"parameters: {total:,} ({total / 1e6:.2f}M), of which inserted blocks: {added:,}")
    size = probe_input_size(model, spec, spec.backbone.args)
    if args.input_size:
        size = (size[0], args.input_size, args.input_size)
    shown = "x".join(map(str, size))
    try:
        flops, per_module = count_flops(model, size)
    except Exception as exc:  # noqa: BLE001 - e.g. a ViT made for one image size
        raise AttnZooError(f"{spec.name} does not run at input {shown}: "
                           f"{type(exc).__name__}: {exc}") from None
    print(f"GMACs at {shown}: {_fmt(flops / 2e9)} (papers' \"GFLOPs\"; "
          f"{flops:,} FLOPs as torch.utils.flop_counter counts them, 2 per multiply-add)")
    rows = [(b.name, b.block_type, b.position, b.channels,
             "x".join(map(str, b.size)) if b.size else "-", f"{b.params:,}",
             _fmt(per_module.get(b.name, 0) / 2e6))
            for b in model.attnzoo_blocks]
    headers = ("module", "type", "position", "channels", "size", "params", "MMACs")
    _print_table(f"inserted blocks: {len(rows)}", headers, rows,
                 right=("channels", "params", "MMACs"))
    if rows and size != probe_input_size(model, spec, spec.backbone.args):
        print("(channels and size: the site as the builder probed it, at the model's own "
              "input size; MMACs: at the input above)")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub
    from .pretrained import create_model

    model = create_model(args.model, pretrained=args.pretrained)
    url = push_to_hub(model, args.repo_id, revision=args.revision, private=args.private)
    print(url)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnzoo", description="A model zoo of attention mechanisms for vision.")
    parser.add_argument("--version", action="version", version=f"attnzoo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list zoo models")
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. '*cbam*'")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("show", help="print a model's spec as YAML")
    p.add_argument("name", help="zoo name or spec file")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("summary",
                       help="parameters, multiply-adds and the table of inserted blocks")
    p.add_argument("name", help="zoo name, spec file, saved folder or hf-hub:org/repo")
    p.add_argument("--input-size", type=int, default=None, metavar="N",
                   help="count multiply-adds for an N x N input (default: the model's "
                   "own input size)")
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("schema", help="print the JSON Schema of a spec file")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("push", help="upload a model (spec + weights + card) to the Hub")
    p.add_argument("model", help="zoo name, spec file or saved folder")
    p.add_argument("repo_id", help="Hub repo, e.g. org/resnet50_cbam")
    p.add_argument("--pretrained", default=None, help="weights tag to push (zoo models)")
    p.add_argument("--revision", default=None, help="branch to push to")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.set_defaults(func=_cmd_push)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AttnZooError as exc:
        print(f"attnzoo: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `attnzoo schema | head`: the reader has gone. Point stdout at devnull so that
        # the interpreter's final flush does not raise again (as the Python docs advise).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
