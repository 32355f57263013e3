"""The command line that the checkpoint converters share (``convert_timm.py``,
``convert_official.py``): the card's ``--license`` and ``--metric``, and one way to
report the result."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def _metric(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}") from None


def add_card_arguments(parser: argparse.ArgumentParser, license_help: str) -> None:
    """``--license`` and ``--metric NAME=VALUE`` (repeatable), for the model card."""
    parser.add_argument("--license", default=None, help=license_help)
    parser.add_argument("--metric", type=_metric, action="append", default=[],
                        metavar="NAME=VALUE", help="a measured metric for the card")


def metrics_of(args: argparse.Namespace) -> dict[str, float] | None:
    return dict(args.metric) or None


def run_conversion(tool: str, convert: Callable[[], Path]) -> int:
    """Run ``convert``: 0 and the folder written, or 2 and the error in one line."""
    from attnzoo.errors import AttnZooError

    try:
        out = convert()
    except AttnZooError as exc:
        print(f"{tool}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
