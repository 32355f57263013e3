"""Property-based tests: random specs either build or raise SpecError; YAML round trips
are lossless; random valid sizes pass through every block with the right shape."""

from __future__ import annotations

import math
import typing
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo import ModelSpec, SpecError
from attnzoo.blocks.base import takes_one_tensor
from attnzoo.blocks.spatial import SpatialTransformer
from attnzoo.builder import probe_input_size
from attnzoo.registry import block_configs
from attnzoo.sites import RESNET_ALIASES

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-4, 64), st.floats(-2, 64, allow_nan=False),
    st.sampled_from(["", "x", "parallel", "sequential", "top16", "additive", "soft"]),
)


def _literal_choices(annotation) -> list | None:
    """The values a Literal (or an optional Literal / bool) field may take, else None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation is bool or bool in args:
        return [True, False]
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    literals = [a for a in args if typing.get_origin(a) is typing.Literal]
    return [v for lit in literals for v in typing.get_args(lit)] or None


def _field_value(block_type: str, field: str):
    """Values for one block field: its Literal/bool choices when it has them (drawn from
    the schema), else JSON scalars (mostly invalid: they must give SpecError)."""
    info = block_configs()[block_type].model_fields[field]
    choices = _literal_choices(info.annotation)
    return st.sampled_from(choices) if choices else json_scalars


@st.composite
def block_dicts(draw):
    """A registered block with its Literal/bool fields drawn from their choices."""
    block_type = draw(st.sampled_from(attnzoo.list_blocks()))
    fields = [f for f, info in block_configs()[block_type].model_fields.items()
              if f != "type" and _literal_choices(info.annotation)]
    chosen = draw(st.lists(st.sampled_from(fields), max_size=2, unique=True)) if fields else []
    return {"type": block_type, **{f: draw(_field_value(block_type, f)) for f in chosen}}


RESNET_PATHS = ["layer1.*", "layer2.0.conv1", "**.conv2", "layer*.*.act1", "conv1",
                "layer3.1.bn2", "layer4.0", "**.bn1"]
TINY_PATHS = ["stages.*.*", "stages.0.1.conv", "**.act", "stem", "stages.1.0", "**.bn"]
RESNET_ALIASES_BASIC = [a for a in RESNET_ALIASES if a != "after_conv3"]


def _site(paths: list[str], aliases: list[str]):
    selector = st.fixed_dictionaries({
        "path": st.sampled_from(paths),
        "position": st.sampled_from(["after", "after", "before", "replace"])})
    return st.one_of(st.sampled_from(aliases), selector) if aliases else selector


def _insertions(paths: list[str], aliases: list[str]):
    return st.fixed_dictionaries(
        {"block": block_dicts(), "at": _site(paths, aliases)},
        optional={"stages": st.lists(st.integers(1, 4), min_size=1, max_size=3, unique=True),
                  "blocks": st.lists(st.integers(0, 1), min_size=1, max_size=2, unique=True),
                  "zero_init": st.booleans()},
    )


timm_specs = st.fixed_dictionaries({
    "backbone": st.fixed_dictionaries(
        {"name": st.sampled_from(["resnet10t", "resnet18"])},
        optional={"args": st.dictionaries(st.sampled_from(["drop_rate", "drop_path_rate"]),
                                          st.floats(0, 0.5), max_size=2)}),
    "insert": st.lists(_insertions(RESNET_PATHS, RESNET_ALIASES_BASIC), min_size=1, max_size=2),
})
tiny_specs = st.fixed_dictionaries({
    "backbone": st.fixed_dictionaries(
        {"source": st.just("attnzoo"), "name": st.just("tiny_cnn")},
        optional={"args": st.fixed_dictionaries({}, optional={
            "in_chans": st.integers(1, 3),
            "widths": st.lists(st.sampled_from([8, 12, 16, 24]), min_size=2, max_size=2),
            "img_size": st.integers(6, 12),
            "drop_rate": st.floats(0, 0.5)})}),
    "insert": st.lists(_insertions(TINY_PATHS, []), min_size=1, max_size=2),
})

free_text = st.text(max_size=30)

# What can go wrong, one at a time: every corruption must give a SpecError.
CORRUPTIONS = [
    ("backbone", "name", "resnet_nope"), ("backbone", "source", "pip"),
    ("backbone", "args", {"bogus": 1}), ("backbone", "args", {"pretrained": True}),
    ("block", "type", "nope"), ("block", "bogus_field", 1), ("block", "*", "x"),
    ("block", "*", -3), ("block", "*", None), ("block", "*", 10**9),
    ("insertion", "at", "nowhere"), ("insertion", "at", {"path": "layer9.*"}),
    ("insertion", "at", {"path": "fc", "position": "sideways"}),
    ("insertion", "stages", [9]), ("insertion", "blocks", "all"),
    ("spec", "num_classes", -1), ("spec", "name", "../x"), ("spec", "input_size", [3, 0]),
    ("spec", "bogus", 1),
]


@st.composite
def specs(draw):
    """Specs that mostly build (sites valid for the backbone), optionally with one
    corruption; optional fields of the schema drawn at random."""
    data = draw(st.one_of(timm_specs, tiny_specs))
    data = {"name": draw(st.sampled_from(["fuzz", "a.b-c_1", "9lives"])), **data}
    replacing = [i for i in data["insert"]
                 if isinstance(i["at"], dict) and i["at"]["position"] == "replace"]
    if replacing:  # one insertion only: test_builder.py's test_sites_inside_a_replaced_...
        data["insert"] = replacing[:1]
    for key, value in draw(st.fixed_dictionaries({}, optional={
            "num_classes": st.integers(0, 20), "description": free_text,
            "paper": st.one_of(st.none(), free_text), "license": st.one_of(st.none(), free_text),
            "tags": st.lists(free_text, max_size=3),
            "input_size": st.tuples(st.sampled_from([1, 3]), st.integers(1, 40),
                                    st.integers(1, 40))})).items():
        data[key] = value
    if draw(st.integers(0, 3)) == 3:  # (hypothesis favours small draws: 0 = intact)
        where, key, value = draw(st.sampled_from(CORRUPTIONS))
        ins = data["insert"][0]
        if where == "backbone":
            data["backbone"][key] = value
        elif where == "insertion":
            ins[key] = value
        elif where == "spec":
            data[key] = value
        elif key == "*":  # any field of the block, to an arbitrary value
            fields = [f for f in block_configs()[ins["block"]["type"]].model_fields
                      if f != "type"]
            if fields:
                ins["block"][draw(st.sampled_from(fields))] = value
        else:
            ins["block"][key] = value
    return data


def _input_for(model, spec: ModelSpec) -> tuple[int, ...]:
    """The size the builder probed the model at; 32x32 for size-agnostic timm nets (an
    STN without loc_resolution is sized for its site, so it keeps the probed size)."""
    args = spec.backbone.args
    chans, h, w = probe_input_size(model, spec, args)
    sized = any(isinstance(m, SpatialTransformer) and m.input_size for m in model.modules())
    if spec.input_size is None and spec.backbone.source == "timm" and not sized:
        h = w = 32
    return (chans, h, w)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_random_specs_build_or_raise_spec_error(data):
    try:
        model = attnzoo.create_model(data)
    except SpecError:
        return
    model.eval()
    spec = model.attnzoo_spec
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(torch.randn(1, *_input_for(model, spec)))
    assert out.shape[0] == 1
    assert ModelSpec.from_yaml(spec.to_yaml()) == spec


# ------------------------------------------------------------------ YAML round trips

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63),
              st.floats(allow_nan=False), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)
tricky_strings = st.sampled_from(["yes", "no", "on", "off", "null", "~", "1e3", "0x10", "0o7",
                                  "2020-01-01", "2020-01-01T00:00:00Z", "12:30:00", ".inf",
                                  "-.nan", "'", '"', "#", "- a", "a: b", "&a", "*a", "!!str",
                                  "!tag", "%TAG", "---", "...", "\ufeff", "\x85", "\u2028",
                                  " lead", "trail ", "\t", "", "<<"])
round_trip_specs = st.fixed_dictionaries(
    {"name": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,12}", fullmatch=True),
     "backbone": st.fixed_dictionaries(
         {"name": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,12}", fullmatch=True)},
         optional={"source": st.just("timm"),
                   "args": st.dictionaries(st.one_of(st.text(max_size=8), tricky_strings),
                                           json_values, max_size=3)}),
     "insert": st.lists(_insertions(RESNET_PATHS + ["**", "a.b"], [*RESNET_ALIASES, "x"]),
                        max_size=3)},
    optional={"description": st.one_of(st.text(), tricky_strings),
              "paper": st.one_of(st.none(), st.text(), tricky_strings),
              "license": st.one_of(st.none(), tricky_strings),
              "tags": st.lists(st.one_of(st.text(max_size=10), tricky_strings), max_size=4),
              "num_classes": st.one_of(st.none(), st.integers(0, 10**6)),
              "input_size": st.tuples(st.integers(1, 4), st.integers(1, 512),
                                      st.integers(1, 512))},
)


@settings(max_examples=150, deadline=None)
@given(round_trip_specs)
def test_yaml_round_trip_of_any_valid_spec(data):
    try:
        spec = ModelSpec.from_dict(data)
    except SpecError:
        return
    text = spec.to_yaml()
    again = ModelSpec.from_yaml(text)
    assert again == spec
    assert again.model_dump() == spec.model_dump()  # types too (1.0 vs 1, '1' vs 1)
    assert again.to_yaml() == text


def test_every_zoo_spec_round_trips():
    for name in attnzoo.list_models():
        spec = attnzoo.load_spec(name)
        assert ModelSpec.from_yaml(spec.to_yaml()) == spec


# ------------------------------------------------------------- any text as a spec

_YAML_TOKENS = ["name", "backbone", "insert", "block", "type", "at", "se", "resnet18", ": ",
                "\n", "  ", "- ", "[", "]", "{", "}", ", ", "&a ", "*a", "<<: ", "!!str ",
                "!!python/object/apply:os.system ", "!!binary ", "? ", "|", ">", "'", '"',
                "#", "---\n", "%YAML 1.1\n", "\t", "\x00", "\ufeff", "9" * 5000, "@"]


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=80),
                 st.lists(st.sampled_from(_YAML_TOKENS), max_size=40).map("".join)))
def test_any_text_is_a_spec_or_a_spec_error(text):
    try:
        spec = ModelSpec.from_yaml(text)
    except SpecError:
        return
    assert ModelSpec.from_yaml(spec.to_yaml()) == spec


_ZOO_TEXT = {name: attnzoo.load_spec(name).to_yaml() for name in attnzoo.list_models()}


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(sorted(_ZOO_TEXT)),
       edits=st.lists(st.tuples(st.integers(0, 10**4), st.sampled_from(_YAML_TOKENS + ["x"]),
                                st.booleans()), min_size=1, max_size=4))
def test_mutated_zoo_specs_are_specs_or_spec_errors(name, edits):
    text = _ZOO_TEXT[name]
    for pos, token, delete in edits:
        pos %= len(text) + 1
        text = text[:pos] + text[pos + 1:] if delete else text[:pos] + token + text[pos:]
    try:
        spec = ModelSpec.from_yaml(text)
    except SpecError:
        return
    assert ModelSpec.from_yaml(spec.to_yaml()) == spec


# ------------------------------------------------------------------ blocks and shapes


def takes_one_map(block_type: str) -> bool:
    if 4 not in block_configs()[block_type].input_ranks:
        return False
    try:
        return takes_one_tensor(attnzoo.create_block(block_type, 48, size=(8, 8)))
    except SpecError:
        return True  # refuses this width; the property test below tries others


MAP_BLOCKS = [b for b in attnzoo.list_blocks() if takes_one_map(b)]
SEQUENCE_BLOCKS = [b for b in attnzoo.list_blocks() if 3 in block_configs()[b].input_ranks]


def _random_config(draw, block_type: str) -> dict:
    """Literal and bool fields of the block drawn from their choices; the rest default."""
    cfg = {}
    for field, info in block_configs()[block_type].model_fields.items():
        choices = _literal_choices(info.annotation) if field != "type" else None
        if choices and draw(st.booleans()):
            cfg[field] = draw(st.sampled_from(choices))
    return cfg


@pytest.mark.parametrize("block_type", MAP_BLOCKS)
@settings(max_examples=8, deadline=None)
@given(channels=st.sampled_from([8, 12, 16, 24, 32, 48, 64]), height=st.integers(3, 17),
       width=st.integers(3, 17), batch=st.integers(1, 2), data=st.data())
def test_every_block_keeps_the_shape_of_any_valid_map(block_type, channels, height, width, batch,
                                                      data):
    cfg = _random_config(data.draw, block_type)
    try:
        block = attnzoo.create_block(block_type, channels, size=(height, width), **cfg).eval()
    except SpecError:
        assume(False)  # a size this block refuses, with a clear error; not a "valid size"
    x = torch.randn(batch, channels, height, width)
    if cfg.get("channels_last"):  # the block takes and returns NHWC (timm VOLO's layout)
        x = x.permute(0, 2, 3, 1)
    with torch.no_grad():
        y = block(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("block_type", SEQUENCE_BLOCKS)
@settings(max_examples=25, deadline=None)
@given(channels=st.sampled_from([8, 16, 24, 32, 48]), length=st.integers(1, 20),
       key_length=st.integers(1, 20), batch=st.integers(1, 3), cross=st.booleans(),
       data=st.data())
def test_sequence_blocks_keep_the_shape_of_any_token_sequence(block_type, channels, length,
                                                             key_length, batch, cross, data):
    """(N, L, C) in, (N, L, C) out, for self-attention and for cross-attention to keys
    and values of another length; every Literal/bool config drawn at random."""
    cfg = _random_config(data.draw, block_type)
    if block_type == "multi_head_attention":
        cfg["num_heads"] = data.draw(st.sampled_from([1, 2, 4, 8]))
    try:
        block = attnzoo.create_block(block_type, channels, **cfg).eval()
    except SpecError:
        assume(False)
    x = torch.randn(batch, length, channels)
    kv = torch.randn(batch, key_length, channels) if cross else None
    with torch.no_grad():
        y = block(x, kv) if cross else block(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def _split(total: int, parts: int) -> list[int]:
    cuts = [total * i // parts for i in range(parts + 1)]
    return [b - a for a, b in zip(cuts, cuts[1:], strict=False)]


# Blocks that fuse several maps: how to feed them, and the shape they must return.
FUSIONS = {
    # ffm(*features): maps whose channels sum to ``channels`` -> (N, channels, H, W)
    "ffm": lambda n, c, h, w, hh, ww: (
        [torch.randn(n, k, h, w) for k in _split(c, 1 + (hh % 3)) if k], (n, c, h, w)),
    # gau(low, high): high is coarser, same width -> (N, C, H, W) of the low level
    "gau": lambda n, c, h, w, hh, ww: (
        [torch.randn(n, c, h, w), torch.randn(n, c, hh, ww)], (n, c, h, w)),
    # reverse(features, coarse logits) -> refined logits (N, 1, H, W) at the side's size
    "reverse": lambda n, c, h, w, hh, ww: (
        [torch.randn(n, c, h, w), torch.randn(n, 1, hh, ww)], (n, 1, h, w)),
}


@pytest.mark.parametrize("block_type", sorted(FUSIONS))
@settings(max_examples=10, deadline=None)
@given(channels=st.sampled_from([6, 8, 16, 32]), height=st.integers(2, 17),
       width=st.integers(2, 17), coarse=st.integers(1, 9), batch=st.integers(1, 2))
def test_fusion_blocks_return_the_shape_of_their_definition(block_type, channels, height,
                                                            width, coarse, batch):
    block = attnzoo.create_block(block_type, channels).eval()
    hh, ww = max(1, math.ceil(height / coarse)), max(1, math.ceil(width / coarse))
    inputs, shape = FUSIONS[block_type](batch, channels, height, width, hh, ww)
    with torch.no_grad():
        y = block(*inputs)
    assert tuple(y.shape) == shape
    assert torch.isfinite(y).all()


def test_every_registered_block_has_a_shape_property():
    """A new block cannot slip past the shape tests: each is a one-map block, a
    sequence block (both, for attention and multi_head_attention) or a listed fusion."""
    covered = set(MAP_BLOCKS) | set(SEQUENCE_BLOCKS) | set(FUSIONS)
    assert covered == set(attnzoo.list_blocks())
    assert not set(MAP_BLOCKS) & set(FUSIONS)
    assert {"attention", "multi_head_attention"} <= set(SEQUENCE_BLOCKS) & set(MAP_BLOCKS)
