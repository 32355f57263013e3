"""The ``attnzoo`` command's heavy half: ``show``, ``summary``, ``schema``, ``push``.

The entry point is :mod:`attnzoo_cli` (outside this package, so that ``attnzoo --help``,
``list`` and ``blocks`` do not import torch); it parses the arguments and calls
:func:`run` here for the commands that need the zoo. ``main`` and ``build_parser``
are re-exported from there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import textwrap
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from attnzoo_cli import PLAIN_WIDTH, build_parser, main, print_table

from .errors import AttnZooError

if TYPE_CHECKING:
    from torch import nn


def _cmd_show(args: argparse.Namespace) -> int:
    from .manifests import load_manifest
    from .zoo import list_models, load_spec

    print(load_spec(args.name).to_yaml(), end="")
    manifest = load_manifest(args.name) if args.name in list_models() else None
    if manifest is not None:  # as YAML comments: the output stays a spec
        print("# weights (pretrained=TAG):")
        for tag, entry in manifest.tags.items():
            state = "" if entry.pinned else f"  (not pinned: no {', '.join(entry.unpinned())})"
            default = "  [default]" if tag == manifest.default else ""
            print(f"#   {tag}{default}{state}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from .spec import ModelSpec

    print(json.dumps(ModelSpec.model_json_schema(), indent=2))
    return 0


def sdpa_flops(query_shape: Sequence[int], key_shape: Sequence[int],
               value_shape: Sequence[int], *args: Any, out_shape: Any = None,
               **kwargs: Any) -> int:
    """FLOPs of ``scaled_dot_product_attention`` as torch counts its CUDA kernels: the
    two matrix products ``Q K^T`` and ``A V``, 2 per multiply-add, over every leading
    (batch, head) dimension of the query; softmax and scaling are not counted."""
    *lead, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    batch = 1
    for n in lead:
        batch *= n
    return 2 * batch * s_q * s_k * d_q + 2 * batch * s_q * s_k * d_v


def fused_attention_formulas() -> dict[Any, Any]:
    """FLOP formulas for the fused attention kernels that ``FlopCounterMode`` leaves out.

    ``scaled_dot_product_attention`` runs a different kernel on each device. torch
    counts the CUDA ones (flash, memory-efficient, cuDNN) by the formula of
    :func:`sdpa_flops`, and the meta device runs the unfused maths whose ``bmm``s it
    counts the same; the CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``),
    the MPS one and the backend-overridable one it does not count at all. They get the
    same formula here, so that a model's count does not depend on where it runs."""
    import torch
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    names = ("_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_attention_math_for_mps",
             "_scaled_dot_product_fused_attention_overrideable")
    return {getattr(aten, n): sdpa_flops for n in names
            if hasattr(aten, n) and getattr(aten, n) not in flop_registry}


def count_flops(model: nn.Module, input_size: Sequence[int]) -> tuple[int, dict[str, int]]:
    """FLOPs of one eval-mode forward pass of a batch of one, as
    ``torch.utils.flop_counter.FlopCounterMode`` counts them (2 per multiply-add), with
    fused attention counted by its formula on every device
    (:func:`fused_attention_formulas`): the total, and the count of every submodule by
    its path in ``model`` ("" = the model)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(
                display=False, custom_mapping=fused_attention_formulas()) as counter:
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


def _shape(channels: int | None, size: Sequence[int] | None) -> str:
    """``64@56x56`` for a feature map, ``384@197`` for a token sequence (N tokens)."""
    if channels is None:
        return "-"
    return f"{channels}@{'x'.join(map(str, size))}" if size else str(channels)


def _layout(block: Any) -> str:
    """``nchw``, or ``nhwc->nchw`` for a block run converted at a site of another layout."""
    site, runs = getattr(block, "layout", "nchw"), getattr(block, "block_layout", "nchw")
    return site if site.split("(")[0] == runs else f"{site}->{runs}"


class Progress:
    """What a slow command is doing, on one line of stderr that the next step
    overwrites: only when stderr is a terminal (nothing in pipes, logs or tests)."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.shown = False

    def step(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(f"\r\033[K{text}...")
            sys.stderr.flush()
            self.shown = True

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


@contextlib.contextmanager
def progress() -> Iterator[Progress]:
    shown = Progress()
    try:
        yield shown
    finally:
        shown.done()


def _cmd_summary(args: argparse.Namespace) -> int:
    from .pretrained import create_model

    with progress() as shown:
        shown.step(f"building {args.name} (backbone, shape probe, blocks)")
        # The architecture only: a saved folder's or Hub repo's weights change no count.
        model = create_model(args.name, pretrained=False)
    summarize(model, args.input_size)
    return 0


def summarize(model: nn.Module, input_size: int | None = None) -> None:
    """Print ``attnzoo summary`` of a model built by attnzoo or changed by
    ``attnzoo.insert``: parameters, multiply-adds at ``input_size`` (N x N; the
    model's own size when None) and a row per inserted block (layout, input, output)."""
    from .builder import probe_input_size
    from .inserted import class_name

    spec = getattr(model, "attnzoo_spec", None)
    if spec is not None:
        own_size = probe_input_size(model, spec, spec.backbone.args)
        name, about = spec.name, spec.description
        backbone = f"{spec.backbone.source}:{spec.backbone.name}"
    elif getattr(model, "attnzoo_insertions", None):
        own_size = tuple(model.attnzoo_insertions[0]["input_size"])
        name, about = type(model).__name__, "blocks inserted by attnzoo.insert"
        backbone = class_name(model)
    else:
        raise AttnZooError(f"{type(model).__name__} was neither built by attnzoo nor "
                           "changed by attnzoo.insert")
    size = (own_size[0], input_size, input_size) if input_size else own_size
    shown_size = "x".join(map(str, size))
    with progress() as shown:
        shown.step(f"counting multiply-adds of {name} at {shown_size}")
        try:
            flops, per_module = count_flops(model, size)
        except Exception as exc:  # noqa: BLE001 - e.g. a ViT made for one image size
            raise AttnZooError(f"{name} does not run at input {shown_size}: "
                               f"{type(exc).__name__}: {exc}") from None
    total = sum(p.numel() for p in model.parameters())
    added = sum(b.params for b in model.attnzoo_blocks)
    print(textwrap.fill(f"{name}: {about}", PLAIN_WIDTH, subsequent_indent="  "))
    print(f"backbone: {backbone} ({type(model).__name__})")
    print(f"parameters: {total:,} ({total / 1e6:.2f}M), of which inserted blocks: {added:,}")
    print(f"GMACs at {shown_size}: {_fmt(flops / 2e9)} (papers' \"GFLOPs\"; {flops:,} FLOPs, "
          "2 per multiply-add,")
    print("  as torch.utils.flop_counter counts them; fused attention by its formula)")
    rows = [(b.name, b.block_type, b.position, _layout(b), _shape(b.channels, b.size),
             _shape(b.out_channels, b.out_size), f"{b.params:,}",
             _fmt(per_module.get(b.name, 0) / 2e6))
            for b in model.attnzoo_blocks]
    headers = ("module", "type", "position", "layout", "in", "out", "params", "MMACs")
    print_table(f"inserted blocks: {len(rows)}", headers, rows,
                right=("in", "out", "params", "MMACs"), wrap="module")
    if rows:
        print(textwrap.fill(
            "(in, out: channels@HxW of each block's input and output; channels@tokens for "
            "token sequences; layout: the site's, -> the block's where it runs converted)",
            PLAIN_WIDTH, subsequent_indent=" "))
        if size != own_size:
            print(f"(in, out: at the model's own input size {'x'.join(map(str, own_size))}; "
                  "MMACs: at the input above)")


def _push_error(exc: Exception, repo_id: str) -> AttnZooError:
    """One line for a failed upload: what failed, and what to check."""
    kind = type(exc).__name__
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        hint = (f"check that you are logged in (`hf auth login` or HF_TOKEN) with write "
                f"access to {repo_id}")
    elif status is not None:
        hint = f"the Hub answered HTTP {status}; check the repo id {repo_id!r}"
    elif "Token" in kind or "token" in str(exc).lower():
        hint = "log in first (`hf auth login`, or set HF_TOKEN)"
    else:
        hint = ("check the network connection (and HF_ENDPOINT, proxies, HF_HUB_OFFLINE) "
                "and that you are logged in (`hf auth login` or HF_TOKEN)")
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(detail) > 160:
        detail = detail[:160] + "..."
    return AttnZooError(f"push to {repo_id} failed ({kind}{': ' + detail if detail else ''}); "
                        f"{hint}")


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub
    from .pretrained import create_model

    model = create_model(args.model, pretrained=args.pretrained)
    try:
        url = push_to_hub(model, args.repo_id, revision=args.revision, private=args.private,
                          allow_random_init=args.allow_random_init)
    except AttnZooError:
        raise
    except Exception as exc:  # noqa: BLE001 - network, auth and Hub errors alike
        raise _push_error(exc, args.repo_id) from None
    print(url)
    return 0


def _sites_model(name: str) -> tuple[nn.Module, Any]:
    """The model ``attnzoo sites NAME`` lists, built on the meta device, and its spec: a
    zoo name, spec file or saved folder, or a bare timm/torchvision backbone."""
    from .builder import build_model
    from .pretrained import resolve
    from .spec import ModelSpec

    source, _, backbone = name.partition(":")
    if source in ("timm", "torchvision") and backbone:
        spec = ModelSpec.from_dict({"name": backbone,
                                    "backbone": {"source": source, "name": backbone}})
    else:
        try:
            spec = resolve(name, pretrained=False).spec
        except AttnZooError:
            import timm

            if not timm.is_model(name):
                raise
            spec = ModelSpec.from_dict({"name": name, "backbone": {"name": name}})
    return build_model(spec, device="meta"), spec


def _cmd_sites(args: argparse.Namespace) -> int:
    from .any_model import list_sites
    from .builder import probe_input_size

    with progress() as shown:
        shown.step(f"building {args.model} on the meta device")
        model, spec = _sites_model(args.model)
        size = probe_input_size(model, spec, spec.backbone.args)
        if args.input_size:
            size = (size[0], args.input_size, args.input_size)
        shown.step("probing every module")
        sites = list_sites(model, size)
    print(f"{spec.name}: {spec.backbone.source}:{spec.backbone.name} "
          f"({type(model).__name__}) at input {'x'.join(map(str, size))}")
    print_table(f"sites: {len(sites)}", ("module", "type", "stage.block", "input", "output",
                                         "aliases"), [s.row() for s in sites], wrap="aliases")
    print("(stages from 1, blocks from 0; input, output: layout and shape without the batch "
          "axis: nchw CxHxW, nhwc HxWxC, tokens(prefix+HxW) NxC, vectors C. A block goes "
          "after, before or in place of a module: {path: MODULE, position: ...}, or at an "
          "alias: at: ALIAS, with stages: and blocks: to choose)")
    return 0


def _cmd_maps(args: argparse.Namespace) -> int:
    """``attnzoo maps MODEL IMAGE --out maps.png``: the model's spatial attention maps
    over the image, one panel each (``attnzoo.attention_maps``)."""
    import torch

    from .attention_maps import load_image, record_attention, render_maps, spatial_maps
    from .pretrained import create_model

    model = create_model(args.model, pretrained=args.pretrained).eval()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans, h, w = cfg.get("input_size", (3, 224, 224))
    if args.input_size:
        h = w = args.input_size
    try:
        x, picture = load_image(args.image, (chans, h, w), cfg.get("mean"), cfg.get("std"))
    except OSError as exc:
        raise AttnZooError(f"cannot read image {args.image}: {exc}") from None
    with torch.no_grad(), record_attention(model) as maps:
        model(x)
    render_maps(picture, maps, columns=args.columns).save(args.out)
    print(f"{args.out}: {len(spatial_maps(maps))} spatial maps of {len(maps)} recorded")
    return 0


COMMANDS = {"show": _cmd_show, "summary": _cmd_summary, "schema": _cmd_schema,
            "push": _cmd_push, "sites": _cmd_sites, "maps": _cmd_maps}


def run(args: argparse.Namespace) -> int:
    """Run a parsed command that needs the zoo (see :mod:`attnzoo_cli`); an AttnZooError
    is one line on stderr and exit status 2."""
    try:
        return COMMANDS[args.command](args)
    except AttnZooError as exc:
        print(f"attnzoo: error: {exc}", file=sys.stderr)
        return 2


def block_catalog() -> dict[str, dict[str, Any]]:
    """Every registered block type (plugins included): its family (the module that
    defines it: ``channel``, ``non_local``, ...; ``architecture`` for blocks that
    architectures build), title and papers (from its config's docstring), whether it
    takes one tensor (insertable at a site) and its fields with defaults, types and
    descriptions. ``attnzoo blocks`` prints it; ``tools/make_catalog.py`` writes it to
    ``attnzoo/catalog.json`` for a CLI that does not import torch."""
    import inspect

    from .registry import block_configs

    out = {}
    for name, config in block_configs().items():
        module = config.__module__
        if module.startswith("attnzoo.architectures."):
            family = "architecture"
        elif module.startswith("attnzoo.blocks."):
            family = module.rsplit(".", 1)[-1]
        else:
            family = f"plugin ({module})"
        title, papers = _title_and_papers(inspect.getdoc(config) or name)
        out[name] = {
            "family": family, "title": title, "papers": papers,
            "single_input": _takes_one_input(config.module),
            "fields": [{"name": field, "type": _type_name(info.annotation),
                        "default": _plain(info.get_default(call_default_factory=True)),
                        "description": info.description or ""}
                       for field, info in config.model_fields.items() if field != "type"],
        }
    return out


def _title_and_papers(doc: str) -> tuple[str, list[str]]:
    """A block's title (its docstring's first paragraph up to the first URL, without an
    unclosed parenthesis) and every URL of that paragraph."""
    import re

    para = " ".join(doc.split("\n\n")[0].split())
    urls = [u.rstrip(".") for u in re.findall(r"https?://[^\s,;)]+", para)]
    head = para[:para.index(urls[0])] if urls else para
    if head.count("(") > head.count(")"):
        head = head[:head.rindex("(")]
    return head.strip().rstrip(",;:. ") or para, urls


def _takes_one_input(module: type) -> bool:
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())[1:]  # not self
    required = [p for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 1 and not any(p.kind is p.VAR_POSITIONAL for p in params)


def _type_name(annotation: Any) -> str:
    import re

    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    text = re.sub(r"\btyping\.", "", text)
    while (start := text.find("Annotated[")) >= 0:  # the type, not its bounds
        depth, end, comma = 0, start + len("Annotated"), None
        for end in range(start + len("Annotated"), len(text)):
            if text[end] in "[(":
                depth += 1
            elif text[end] in "])":
                depth -= 1
            if depth == 1 and text[end] == "," and comma is None:
                comma = end
            if depth == 0:
                break
        text = text[:start] + text[start + len("Annotated["):comma] + text[end + 1:]
    text = re.sub(r"Literal\[([^\]]*)\]", lambda m: m[1].replace(", ", "|"), text)
    text = re.sub(r"^Optional\[(.*)\]$", r"\1 | None", text)
    return text.replace("NoneType", "None")


def _plain(value: Any) -> Any:
    """A default as JSON writes it (tuples as lists)."""
    return json.loads(json.dumps(value, default=str))


__all__ = ["block_catalog", "build_parser", "count_flops", "main", "run"]


if __name__ == "__main__":
    sys.exit(main())
