"""The ``attnzoo`` command's entry point: help, ``list`` and ``blocks`` without torch.

``import attnzoo`` imports torch and timm and registers every zoo spec with timm (that is
what ``import attnzoo; timm.create_model("resnet50_cbam")`` relies on), which takes
seconds. ``attnzoo --help``, ``attnzoo list`` and ``attnzoo blocks`` need none of it:
this module lives outside the ``attnzoo`` package, so importing it does not run
``attnzoo/__init__.py``, and it reads the package's data files directly:

- the spec files (``specs/*.yaml``) and the weight manifests (``weights/*.yaml``,
  or ``$ATTNZOO_WEIGHTS_DIR``), found where ``attnzoo.zoo.data_dir`` finds them;
- the block catalogue ``attnzoo/catalog.json``, generated from the registered block
  configs by ``tools/make_catalog.py`` (a test fails when it is stale).

The other commands (``show``, ``summary``, ``schema``, ``push``) import
:mod:`attnzoo.cli`, and with it torch, timm and the zoo.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PROG = "attnzoo"
CATALOG_FILE = "catalog.json"
WEIGHTS_DIR_ENV = "ATTNZOO_WEIGHTS_DIR"
#: Width of plain-text output (piped, or no rich): tables wrap their long columns to it.
PLAIN_WIDTH = 100


class CommandError(Exception):
    """A problem that the light commands report in one line (exit status 2)."""


# ------------------------------------------------------------------ the package's files


def package_dir() -> Path:
    """The ``attnzoo`` package folder, found without importing it."""
    found = importlib.util.find_spec("attnzoo")
    if found is None or not found.submodule_search_locations:
        raise CommandError("the attnzoo package is not installed")
    return Path(next(iter(found.submodule_search_locations))).resolve()


def data_dir(name: str) -> Path:
    """The ``specs`` or ``weights`` folder: inside the package in an installed wheel,
    beside it in a source checkout (the same rule as ``attnzoo.zoo.data_dir``)."""
    here = package_dir()
    for candidate in (here / name, here.parent / name):
        if candidate.is_dir():
            return candidate
    raise CommandError(f"attnzoo's {name}/ folder is missing from {here}")


def weights_dir() -> Path:
    override = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(override) if override else data_dir("weights")


def _read_yaml(path: Path) -> Any:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=loader)  # noqa: S506 - a safe loader


def load_catalog() -> dict[str, Any]:
    """Every block type of attnzoo's catalogue: family, title, papers, fields.

    From the live registry (plugins included) when ``attnzoo`` is already imported in
    this process, else from the generated ``attnzoo/catalog.json``."""
    if "attnzoo" in sys.modules:
        from attnzoo.cli import block_catalog

        return block_catalog()
    path = package_dir() / CATALOG_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))["blocks"]
    except (OSError, ValueError, KeyError) as exc:
        raise CommandError(f"cannot read the block catalogue {path}: {exc}; "
                           "`python tools/make_catalog.py` writes it") from None


def paper_id(url: str | None) -> str:
    """``arXiv:1807.06521`` for an arXiv URL, the site for another (``mlr.press``),
    ``-`` for none."""
    if not url:
        return "-"
    m = re.search(r"arxiv\.org/(?:abs|pdf)/([0-9]{4}\.[0-9]{4,5})", url)
    if m:
        return f"arXiv:{m[1]}"
    host = re.sub(r"^https?://", "", url).split("/")[0]
    return ".".join(host.split(".")[-2:])


# -------------------------------------------------------------------------- tables


def _use_rich() -> bool:
    """Rich tables on a terminal (when rich is installed); plain text when piped."""
    if not sys.stdout.isatty():
        return False
    return importlib.util.find_spec("rich") is not None


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                right: Sequence[str] = (), wrap: str | None = None,
                width: int = PLAIN_WIDTH) -> str:
    """Columns separated by two spaces; the ``right`` columns right-aligned; the ``wrap``
    column folded over several lines when the table would be wider than ``width``."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    col = list(headers).index(wrap) if wrap in headers else None
    if col is not None and sum(widths) + 2 * (len(widths) - 1) > width:
        others = sum(w for i, w in enumerate(widths) if i != col) + 2 * (len(widths) - 1)
        widths[col] = max(len(headers[col]), 16, width - others)
    aligned = {i for i, h in enumerate(headers) if h in right}

    def lines_of(row: list[str]) -> list[str]:
        parts = [textwrap.wrap(c, widths[i], break_on_hyphens=False) or [""]
                 if i == col else [c] for i, c in enumerate(row)]
        out = []
        for k in range(max(len(p) for p in parts)):
            out.append("  ".join(
                (p[k] if k < len(p) else "").rjust(w) if i in aligned
                else (p[k] if k < len(p) else "").ljust(w)
                for i, (p, w) in enumerate(zip(parts, widths, strict=True))).rstrip())
        return out

    lines = lines_of(cells[0])
    lines.append("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        lines += lines_of(row)
    return "\n".join(lines)


def print_table(title: str | None, headers: Sequence[str], rows: Sequence[Sequence[object]],
                right: Sequence[str] = (), wrap: str | None = None) -> None:
    """``rows`` under ``headers``: a rich table on a terminal, plain text otherwise."""
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
    if title:
        print(title)
    if rows:
        print(plain_table(headers, rows, right, wrap))


# -------------------------------------------------------------------- list, blocks


def model_rows(pattern: str = "*") -> list[tuple[str, str, str, str]]:
    """(name, family, paper, weights) of every zoo model matching ``pattern``."""
    families = {name: entry["family"] for name, entry in load_catalog().items()}
    folder = weights_dir()
    rows = []
    for path in sorted(data_dir("specs").glob("*.yaml")):
        if not fnmatch.fnmatch(path.stem, pattern):
            continue
        try:
            spec = _read_yaml(path)
            types = [ins["block"]["type"] for ins in spec.get("insert") or []]
            found = dict.fromkeys(families.get(t, "?") for t in types)
            if len(found) > 1:
                found.pop("identity", None)  # removes a layer next to the attention (SK)
            family = "+".join(found)
            if not family and spec["backbone"].get("source") == "attnzoo":
                family = "architecture"
            paper = paper_id(spec.get("paper"))
        except Exception as exc:  # noqa: BLE001 - one broken file must not hide the rest
            family, paper = "-", f"invalid spec ({type(exc).__name__})"
        rows.append((path.stem, family or "-", paper, _weights_cell(folder, path.stem)))
    return rows


def _weights_cell(folder: Path, name: str) -> str:
    """The default weight tag of a zoo model and how many more it has: ``tag``
    (loads), ``tag +3 (not pinned)`` (listed, refused until tools/pin_weights.py
    records its revision and sha256), or ``-``. ``attnzoo show NAME`` lists every tag."""
    path = folder / f"{name}.yaml"
    if not path.is_file():
        return "-"
    try:
        manifest = _read_yaml(path)
        tags, first = manifest["tags"], manifest["default"]
        entry = tags[first]
    except Exception:  # noqa: BLE001
        return "invalid manifest"
    pinned = entry.get("sha256") and (entry.get("repo") is None or entry.get("revision"))
    more = f" +{len(tags) - 1}" if len(tags) > 1 else ""
    return f"{first}{more}" + ("" if pinned else " (not pinned)")


def _cmd_list(args: argparse.Namespace) -> int:
    rows = model_rows(args.pattern)
    if not rows:
        total = len(model_rows())
        print(f"{PROG}: no zoo model matches {args.pattern!r} ({total} models; "
              f"`{PROG} list` shows them all)", file=sys.stderr)
        return 1
    if args.names:
        print("\n".join(r[0] for r in rows))
        return 0
    print_table(None, ("model", "family", "paper", "weights"), rows, wrap="weights")
    if any("not pinned" in r[3] for r in rows):
        print("(not pinned: pretrained= refuses them until tools/pin_weights.py records "
              "their revision and sha256)")
    return 0


def _fields_text(fields: list[dict[str, Any]]) -> str:
    return ", ".join(f"{f['name']}={json.dumps(f['default'])}" for f in fields) or "-"


def _cmd_blocks(args: argparse.Namespace) -> int:
    catalog = load_catalog()
    if args.pattern in catalog:
        return _show_block(args.pattern, catalog[args.pattern])
    names = [n for n in catalog if fnmatch.fnmatch(n, args.pattern)]
    if not names:
        print(f"{PROG}: no block type matches {args.pattern!r} ({len(catalog)} types; "
              f"`{PROG} blocks` shows them all)", file=sys.stderr)
        return 1
    rows = []
    for name in names:
        entry = catalog[name]
        papers = entry["papers"]
        paper = paper_id(papers[0] if papers else None)
        if len(papers) > 1:
            paper += f" +{len(papers) - 1}"
        rows.append((name, entry["family"], paper, _fields_text(entry["fields"])))
    print_table(None, ("block", "family", "paper", "fields (defaults)"), rows,
                wrap="fields (defaults)")
    print(f"`{PROG} blocks TYPE` shows a block's fields with their descriptions.")
    return 0


def _show_block(name: str, entry: dict[str, Any]) -> int:
    print(f"{name} ({entry['family']}): {entry['title']}")
    for url in entry["papers"]:
        print(f"paper: {url}")
    if not entry["single_input"]:
        print("takes several inputs: used inside architectures, not inserted at a site")
    rows = [(f["name"], f["type"], json.dumps(f["default"]), f["description"])
            for f in entry["fields"]]
    if rows:
        print_table("fields:", ("field", "type", "default", "description"), rows,
                    wrap="description")
    else:
        print("fields: none")
    return 0


# --------------------------------------------------------------------- the parser


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of pixels, not {value}")
    return value


def _version() -> str:
    """``attnzoo/_version.py``'s version, read without importing the package."""
    try:
        text = (package_dir() / "_version.py").read_text(encoding="utf-8")
    except (OSError, CommandError):
        return "unknown"
    m = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
    return m[1] if m else "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="A model zoo of attention mechanisms for vision.",
        epilog="`attnzoo COMMAND --help` describes a command.")
    parser.add_argument("--version", action="version", version=f"attnzoo {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="zoo models: family, paper, weights")
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. '*cbam*'")
    p.add_argument("--names", action="store_true", help="print the names only")

    p = sub.add_parser("blocks", help="block types: family, paper, fields")
    p.add_argument("pattern", nargs="?", default="*",
                   help="a block type (its fields and their descriptions) or a shell pattern")

    p = sub.add_parser("show", help="print a model's spec as YAML")
    p.add_argument("name", help="zoo name, spec file, or saved folder (or its attnzoo.yaml)")

    p = sub.add_parser("summary",
                       help="parameters, multiply-adds and the table of inserted blocks")
    p.add_argument("name", help="zoo name, spec file, saved folder or hf-hub:org/repo")
    p.add_argument("--input-size", type=positive_int, default=None, metavar="N",
                   help="count multiply-adds for an N x N input (default: the model's "
                   "own input size)")

    p = sub.add_parser("sites", help="where blocks can go: every site of a model, its "
                       "layout, shapes and aliases")
    p.add_argument("model", help="zoo name, spec file or saved folder, or a bare backbone: "
                   "timm:NAME, torchvision:NAME (a timm name alone works too)")
    p.add_argument("--input-size", type=positive_int, default=None, metavar="N",
                   help="probe the sites at an N x N input (default: the model's own size)")

    sub.add_parser("schema", help="print the JSON Schema of a spec file")

    p = sub.add_parser("maps", help="overlay a model's spatial attention maps on an image")
    p.add_argument("model", help="zoo name, spec file, saved folder or hf-hub:org/repo")
    p.add_argument("image", help="an image file (anything Pillow reads)")
    p.add_argument("--out", default="maps.png", help="the picture to write (default maps.png)")
    p.add_argument("--pretrained", default=None, help="weights tag (zoo models)")
    p.add_argument("--input-size", type=positive_int, default=None, metavar="N",
                   help="resize the image to N x N (default: the model's input size)")
    p.add_argument("--columns", type=positive_int, default=4, help="panels per row")

    p = sub.add_parser("push", help="upload a model (spec + weights + card) to the Hub")
    p.add_argument("model", help="zoo name, spec file or saved folder")
    p.add_argument("repo_id", help="Hub repo, e.g. org/resnet50_cbam")
    p.add_argument("--pretrained", default=None, help="weights tag to push (zoo models)")
    p.add_argument("--revision", default=None, help="branch to push to")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--allow-random-init", action="store_true",
                   help="push a model whose weights are its random initialisation (refused "
                   "otherwise; the card says so)")
    return parser


#: Commands that read files only; the others run in attnzoo.cli (torch, timm, the zoo).
LIGHT_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "list": _cmd_list, "blocks": _cmd_blocks}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in LIGHT_COMMANDS:
            try:
                return LIGHT_COMMANDS[args.command](args)
            except CommandError as exc:
                print(f"{PROG}: error: {exc}", file=sys.stderr)
                return 2
        from attnzoo import cli  # torch, timm and the zoo

        return cli.run(args)
    except BrokenPipeError:
        # `attnzoo schema | head`: the reader has gone. Point stdout at devnull so that
        # the interpreter's final flush does not raise again (as the Python docs advise).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
