"""Zoo models under ``torch.compile(fullgraph=True)``, ``torch.export`` and ONNX: every
zoo model and every registered block type.

- Every zoo model compiles as one graph: with ``fullgraph=True`` dynamo raises on any
  graph break. The cheap ``eager`` backend runs the captured graph, which must agree
  with eager mode. Backbones whose depth is a repeat count (ResNet ``layers``, ViT
  ``depth``, ...) are trimmed to one block per stage first: repeated blocks run the
  same code, so depth only multiplies the tracing time. The one inductor compile is
  marked slow, as is the full-depth compile of every zoo model (about 2 minutes on 2 cores).
- Every registered block type goes through ``torch.export`` and the ONNX exporter
  inside a small model that holds it where the zoo puts it (one ResNet-50 holds all
  the blocks of the zoo ResNets), and onnxruntime's outputs match PyTorch's within 1e-4.

Block- and architecture-level export checks live with their own tests
(tests/blocks/test_self_attention.py, tests/architectures/test_stdc.py, ...); these
tests cover whole built models: the builder's attention subclasses, the backbones and
the architectures.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from typing import Any

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

import attnzoo
from attnzoo import ModelSpec
from attnzoo.registry import get_block_config
from attnzoo.sites import resolve_sites
from attnzoo.spec import Insertion
from tests._helpers.specs import build_small

ZOO = attnzoo.list_models()
SPECS = {name: attnzoo.load_spec(name) for name in ZOO}
BLOCKS = attnzoo.list_blocks()

# Backbone args that make every stage repeat its block once, by (source, name prefix).
_ONE_PER_STAGE: dict[tuple[str, str], dict[str, Any]] = {
    ("timm", "res"): {"layers": (1, 1, 1, 1)},            # resnet*, resnext*
    ("timm", "vit_"): {"depth": 1},
    ("attnzoo", "resattnet"): {"attention_modules": (1, 1, 1)},
    ("attnzoo", "stdc"): {"layers": (1, 1, 1)},           # stdcnet, stdc_seg
    # encoders: timm's ResNet with one basic block per stage
    ("attnzoo", "pan"): {"backbone": "resnet10t"},
    ("attnzoo", "ras"): {"backbone": "resnet10t"},
    ("attnzoo", "bisenet"): {"backbone": "resnet10t"},
}

# Blocks that an architecture builds in its own code, not from a spec field: a zoo
# model that holds them.
_ARCHITECTURE_PARTS = {"stdc": "stdc1"}


def trimmed(spec: ModelSpec) -> ModelSpec:
    """``spec`` with one block per backbone stage where the backbone allows it (see
    ``_ONE_PER_STAGE``). Insertions keep their blocks, sites and stage filters; their
    block-index filters go, as a trimmed stage has only its block 0."""
    extra = next((args for (source, prefix), args in _ONE_PER_STAGE.items()
                  if spec.backbone.source == source and spec.backbone.name.startswith(prefix)),
                 None)
    if extra is None or (spec.backbone.source == "timm" and timm.models.model_entrypoint(
            spec.backbone.name).__module__ == "timm.models.byobnet"):
        return spec  # timm's ByobNets named res* (resnet33ts, resnext26ts) have no `layers`
    backbone = spec.backbone.model_copy(update={"args": {**spec.backbone.args, **extra}})
    insert = [ins.model_copy(update={"blocks": None}) for ins in spec.insert]
    return spec.model_copy(update={"backbone": backbone, "insert": insert})


def inserted_types(spec: ModelSpec) -> set[str]:
    """The block types that ``spec`` inserts into its backbone."""
    return {ins.block.block_type() for ins in spec.insert}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test traces from scratch: ResNet.forward and friends serve many models, and
    their cached graphs would count against the recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --- torch.compile ------------------------------------------------------------------------

def _trimmed_key(spec: ModelSpec) -> str:
    """What ``trimmed(spec)`` builds, names aside. timm's resnet18 and resnet34 differ
    only in ``layers``, as do resnet50, resnet101 and resnet152, so trimmed they are
    the same network."""
    data = trimmed(spec).model_dump(mode="json", include={"backbone", "insert",
                                                          "num_classes", "input_size"})
    depth = re.fullmatch(r"resnet(\d+)", spec.backbone.name)
    if depth and spec.backbone.source == "timm":
        data["backbone"]["name"] = "resnet18" if int(depth[1]) < 50 else "resnet50"
    # VOLO-Dn for 384/448/512 is VOLO-Dn for 224 built for another input; build_small
    # builds both for its small input.
    volo = re.fullmatch(r"(volo_d\d)_\d+", spec.backbone.name)
    if volo and spec.backbone.source == "timm":
        data["backbone"]["name"], data["input_size"] = f"{volo[1]}_224", None
    return json.dumps(data, sort_keys=True)


def _compile_groups() -> dict[str, list[str]]:
    """Test id -> the zoo models that trim to one network (resnet50_se, resnet101_se)."""
    groups: dict[str, list[str]] = {}
    for name in ZOO:
        groups.setdefault(_trimmed_key(SPECS[name]), []).append(name)
    return {"+".join(names): names for names in groups.values()}


COMPILE_GROUPS = _compile_groups()


def check_compiles_fullgraph(spec: ModelSpec) -> nn.Module:
    """Compile ``spec``'s model (``fullgraph=True``, eager backend) and compare one batch
    of outputs with eager mode. Returns the model."""
    model, input_size = build_small(spec)
    assert {b.block_type for b in model.attnzoo_blocks} == inserted_types(spec)
    x = torch.randn(1, *input_size)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    return model


@pytest.mark.parametrize("names", COMPILE_GROUPS.values(), ids=COMPILE_GROUPS.keys())
def test_zoo_model_compiles_fullgraph(names: list[str]) -> None:
    """Each zoo model, trimmed; zoo models that only differ in depth trim to one network
    (checked here), compiled once."""
    model = check_compiles_fullgraph(trimmed(SPECS[names[0]]))
    for other in names[1:]:
        twin, _ = build_small(trimmed(SPECS[other]))
        assert repr(twin) == repr(model), f"{other} and {names[0]} trim to different models"


def _depth(spec: ModelSpec) -> int:
    """The depth in a timm backbone's name (resnet50 -> 50), 1000 when it has none."""
    found = re.match(r"[a-z]+?(\d+)", spec.backbone.name)
    return int(found[1]) if found and spec.backbone.source == "timm" else 1000


def _full_depth_models() -> list[str]:
    """Every attnzoo architecture, and for each block type that zoo models insert into
    a backbone, the shallowest of them: a block repeated at every depth is traced as
    often as the model holds it (recompiles, graph breaks in later copies), which a
    trimmed model does not show; the backbones themselves are timm's."""
    chosen = {name for name, spec in SPECS.items() if spec.backbone.source == "attnzoo"}
    for block_type in sorted({t for spec in SPECS.values() for t in inserted_types(spec)}):
        users = [name for name, spec in SPECS.items() if block_type in inserted_types(spec)]
        chosen.add(min(users, key=lambda name: (_depth(SPECS[name]), name)))
    return sorted(chosen)


@pytest.mark.slow
@pytest.mark.parametrize("name", _full_depth_models())
def test_zoo_model_compiles_fullgraph_at_full_depth(name: str) -> None:
    """The zoo model as the zoo builds it, not trimmed."""
    torch._dynamo.reset()
    check_compiles_fullgraph(SPECS[name])


def test_compiled_training_step_matches_eager() -> None:
    """AOTAutograd (functionalisation of in-place ops, the backward graph) on a model in
    training mode: same loss and gradients as eager."""
    model = attnzoo.create_model(trimmed(SPECS["resnet18_se"])).train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss, want = compiled(x).logsumexp(1).sum(), twin(x).logsumexp(1).sum()
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss, want)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_inductor_compiles_resnet18_cbam() -> None:
    """The one inductor compile (C++ codegen): a trimmed resnet18_cbam."""
    model = attnzoo.create_model(trimmed(SPECS["resnet18_cbam"])).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True)  # inductor
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


# --- torch.export and ONNX ----------------------------------------------------------------

RESNET = "resnet50"  # the blocks inserted into zoo ResNets go into one of these
RESNET_CASE = f"{RESNET}_blocks"


def _resnet_depth(spec: ModelSpec) -> int | None:
    """The depth of a zoo model's timm ResNet/ResNeXt backbone (50 for resnext50_32x4d)."""
    m = re.match(r"res(?:net|next)(\d+)", spec.backbone.name)
    return int(m[1]) if m and spec.backbone.source == "timm" else None


def _mentions_block(value: Any, block_type: str) -> bool:
    """Whether ``{type: block_type}`` appears anywhere in ``value`` (backbone args)."""
    if isinstance(value, dict):
        return value.get("type") == block_type or any(
            _mentions_block(v, block_type) for v in value.values())
    if isinstance(value, list):
        return any(_mentions_block(v, block_type) for v in value)
    return False


def resnet_insertions(block_type: str) -> list[Insertion] | None:
    """The insertions of ``block_type`` in a zoo ResNet that uses it (bottleneck ResNets
    first, the kind ``RESNET`` is), or None when no zoo ResNet does."""
    users = [spec for spec in SPECS.values() if _resnet_depth(spec)
             and block_type in inserted_types(spec)]
    if not users:
        return None
    spec = min(users, key=lambda spec: _resnet_depth(spec) < 50)
    return [ins for ins in spec.insert if ins.block.block_type() == block_type]


def zoo_model_for(block_type: str) -> str | None:
    """A zoo model other than a ResNet that holds ``block_type``: its architecture
    builds it (from a spec field or ``_ARCHITECTURE_PARTS``), or the model inserts it."""
    for spec in SPECS.values():
        if _mentions_block(spec.backbone.args, block_type) or block_type in inserted_types(
                spec) or _ARCHITECTURE_PARTS.get(block_type) == spec.name:
            return spec.name
    return None


def resnet_blocks_spec(block_types: list[str]) -> ModelSpec:
    """A ResNet-50 with one bottleneck per stage that holds each of ``block_types``
    once, with its zoo config and at the first site its zoo insertion selects (a block
    no zoo model uses: before the residual add of stage 3). One backbone for all keeps
    the exported graph small. Replacements take sites nothing else uses."""
    with torch.device("meta"):
        backbone = timm.create_model(RESNET, layers=(1, 1, 1, 1))
    wanted = []
    for block_type in block_types:
        wanted += resnet_insertions(block_type) or [Insertion.model_validate(
            {"block": {"type": block_type}, "at": "residual", "stages": [3]})]
    taken: set[str] = set()
    insert = []
    for ins in sorted(wanted, key=lambda ins: getattr(ins.at, "position", "") != "replace"):
        sites = resolve_sites(backbone, ins.model_copy(update={"blocks": None}), RESNET_CASE)
        site = next((site for site in sites if not _overlaps(site.path, taken)), None)
        if site is None and getattr(ins.at, "position", "") != "replace":
            # its zoo sites all lie in replaced modules: before a residual add instead
            residual = ins.model_copy(update={"at": "residual", "stages": [3], "blocks": None})
            site = resolve_sites(backbone, residual, RESNET_CASE)[0]
        if site is None:  # every site this replacement can take is taken by another
            continue
        if site.position == "replace":
            taken.add(site.path)
        insert.append({"block": ins.block.model_dump(), "zero_init": ins.zero_init,
                       "at": {"path": site.path, "position": site.position}})
    return ModelSpec.from_dict({"name": RESNET_CASE, "insert": insert, "backbone": {
        "name": RESNET, "args": {"layers": [1, 1, 1, 1]}}})


def _overlaps(path: str, replaced: set[str]) -> bool:
    """Whether ``path`` is or lies inside a replaced module (the builder refuses it)."""
    return any(path == r or path.startswith(f"{r}.") for r in replaced)


def _export_cases() -> dict[str, tuple[ModelSpec, list[str]]]:
    """case -> (a small model, the block types it is there for): one ResNet for the
    blocks of the zoo ResNets (and of no zoo model), the other zoo models trimmed."""
    cases: dict[str, tuple[ModelSpec, list[str]]] = {}
    in_resnet = []
    for block_type in BLOCKS:
        name = None if resnet_insertions(block_type) else zoo_model_for(block_type)
        if name is None:
            in_resnet.append(block_type)
        else:
            cases.setdefault(name, (trimmed(SPECS[name]), []))[1].append(block_type)
    cases[RESNET_CASE] = (resnet_blocks_spec(in_resnet), in_resnet)
    return cases


EXPORT_CASES = _export_cases()


def block_modules(model: nn.Module, block_type: str) -> list[nn.Module]:
    """The modules of ``block_type`` in ``model``: inserted by the builder, or built by
    its architecture."""
    inserted = [model.get_submodule(b.name) for b in model.attnzoo_blocks
                if b.block_type == block_type]
    module_cls = get_block_config(block_type).module
    return inserted or [m for m in model.modules() if type(m) is module_cls]


def wake_(blocks: list[nn.Module], std: float = 0.1) -> None:
    """Give the all-zero parameters of ``blocks`` small random values: blocks that start
    as the identity (zeroed gamma, BN weight, last conv, STN regressor) would otherwise
    hide their attention path from the comparison with onnxruntime."""
    with torch.no_grad():
        for block in blocks:
            for p in block.parameters():
                if not p.any():
                    p.normal_(0, std)


def test_every_block_type_has_an_export_case() -> None:
    """A new block type lands in some export case (the ResNet one by default)."""
    covered = [b for _, block_types in EXPORT_CASES.values() for b in block_types]
    assert sorted(covered) == sorted(BLOCKS)


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_torch_export_and_onnxruntime_match_eager(case: str) -> None:
    """torch.export gives a program equal to eager; the ONNX exporter turns that program
    into a model whose onnxruntime outputs are within 1e-4 of PyTorch's."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    spec, block_types = EXPORT_CASES[case]
    model, input_size = build_small(spec)
    for block_type in block_types:
        blocks = block_modules(model, block_type)
        assert blocks, f"{case} holds no {block_type}"
        wake_(blocks)
    x = torch.randn(1, *input_size)
    with torch.no_grad():
        want = tree_leaves(model(x))
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(tree_leaves(exported.module()(x)), want,
                                   atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(exported, (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_close_onnx(g, w, f"{case}: output {i}")


def assert_close_onnx(got: np.ndarray, want: torch.Tensor, what: str) -> None:
    """Within 1e-4, absolute and relative; outputs far below 1 in size (a classifier
    initialised with a tiny std) are held to 1e-4 of their largest value instead."""
    peak = float(want.abs().max())
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4 * min(1.0, peak),
                               err_msg=what)


def test_mhsa2d_exports_to_onnx_from_a_channels_last_input() -> None:
    """Regression: with channels-last strides, torch.export recorded mhsa2d's last
    reshape as a view that the ONNX exporter could not replay."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    block = attnzoo.create_block("mhsa2d", 32, size=(4, 4)).eval()
    x = torch.randn(1, 32, 4, 4).contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(block, (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = block(x)
    assert_close_onnx(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], want,
                      "mhsa2d")
