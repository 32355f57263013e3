"""The command line that the generators of committed files share (``make_docs.py``,
``make_catalog.py``): write the file, or ``--check`` that it is up to date."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def generator_main(argv: Sequence[str] | None, description: str, render: Callable[[], str],
                   output: Path, root: Path, tool: str) -> int:
    """``tool [--check] [--output FILE]``: 0 when written or up to date, 1 when stale."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when the file differs from a fresh render")
    parser.add_argument("--output", type=Path, default=output,
                        help=f"file to write or check (default: {output.relative_to(root)})")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        old = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if old == text:
            print(f"{args.output} is up to date")
            return 0
        diff = difflib.unified_diff(old.splitlines(), text.splitlines(), str(args.output),
                                    "fresh render", lineterm="", n=0)
        print("\n".join(list(diff)[:40]), file=sys.stderr)
        print(f"{args.output} is stale: run python tools/{tool}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0
