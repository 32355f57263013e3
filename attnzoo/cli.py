"""The ``attnzoo`` command: list, show, summary, schema, push."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__
from .errors import AttnZooError


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


def _cmd_summary(args: argparse.Namespace) -> int:
    import torch

    from . import create_model

    model = create_model(args.name)
    spec = model.attnzoo_spec
    total = sum(p.numel() for p in model.parameters())
    added = sum(b.params for b in model.attnzoo_blocks)
    print(f"{spec.name}: {spec.description}")
    print(f"backbone: {spec.backbone.source}:{spec.backbone.name} ({type(model).__name__})")
    print(f"parameters: {total:,} ({total / 1e6:.2f}M), of which inserted blocks: {added:,}")
    if args.input_size:
        from torch.utils.flop_counter import FlopCounterMode

        chans = getattr(model, "pretrained_cfg", {}).get("input_size", (3,))[0]
        x = torch.zeros(1, chans, args.input_size, args.input_size)
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        flops = counter.get_total_flops()
        print(f"FLOPs at {args.input_size}x{args.input_size}: {flops / 1e9:.2f} G "
              f"({flops / 2e9:.2f} GMACs)")
    rows = [(b.name, b.block_type, b.position, b.channels,
             "x".join(map(str, b.size)) if b.size else "-", f"{b.params:,}")
            for b in model.attnzoo_blocks]
    print(f"inserted blocks: {len(rows)}")
    if rows:
        print(_table(("module", "type", "position", "channels", "size", "params"), rows))
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from . import create_model, hub

    model = create_model(args.model, pretrained=args.pretrained or False)
    url = hub.push_to_hub(model, args.repo_id, revision=args.revision, private=args.private)
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

    p = sub.add_parser("summary", help="parameters and the table of inserted blocks")
    p.add_argument("name", help="zoo name or spec file")
    p.add_argument("--input-size", type=int, default=None, metavar="N",
                   help="also count FLOPs for an N x N input")
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


if __name__ == "__main__":
    sys.exit(main())
