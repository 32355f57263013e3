"""Property-based tests: random specs either build or raise SpecError; YAML round trips
are lossless; random valid sizes pass through every block with the right shape."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo import ModelSpec, SpecError
from attnzoo.blocks.base import takes_one_tensor
from attnzoo.registry import block_configs
from attnzoo.sites import RESNET_ALIASES

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-4, 64), st.floats(-2, 64, allow_nan=False),
    st.sampled_from(["", "x", "parallel", "sequential", "top16", "additive", "soft"]),
)


@st.composite
def block_dicts(draw):
    block_type = draw(st.sampled_from([*attnzoo.list_blocks(), "nope"]))
    fields = list(block_configs()[block_type].model_fields) if block_type != "nope" else []
    fields = [f for f in fields if f != "type"] + ["bogus_field"]
    chosen = draw(st.lists(st.sampled_from(fields), max_size=2, unique=True))
    return {"type": block_type, **{f: draw(json_scalars) for f in chosen}}


sites = st.one_of(
    st.sampled_from([*RESNET_ALIASES, "nowhere"]),
    st.fixed_dictionaries({
        "path": st.sampled_from(["layer1.*", "layer2.0.conv1", "**.conv2", "layer9.*", "fc",
                                 "layer*.*.act1", "**", "conv1", "layer3.1.bn2"]),
        "position": st.sampled_from(["after", "before", "replace"]),
    }),
)

insertions = st.fixed_dictionaries(
    {"block": block_dicts(), "at": sites},
    optional={
        "stages": st.lists(st.integers(0, 5), max_size=3),
        "blocks": st.lists(st.integers(0, 3), max_size=2),
        "zero_init": st.booleans(),
    },
)

specs = st.fixed_dictionaries(
    {"name": st.sampled_from(["fuzz", "a.b-c_1"]),
     "backbone": st.fixed_dictionaries({"name": st.sampled_from(["resnet10t", "resnet18"])}),
     "insert": st.lists(insertions, max_size=2)},
    optional={"num_classes": st.integers(-1, 20), "description": st.text(max_size=20)},
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs)
def test_random_specs_build_or_raise_spec_error(data):
    try:
        model = attnzoo.create_model(data)
    except SpecError:
        return
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape[0] == 1
    assert ModelSpec.from_yaml(model.attnzoo_spec.to_yaml()) == model.attnzoo_spec


@settings(max_examples=80, deadline=None)
@given(specs)
def test_yaml_round_trip_of_any_valid_spec(data):
    try:
        spec = ModelSpec.from_dict(data)
    except SpecError:
        return
    text = spec.to_yaml()
    assert ModelSpec.from_yaml(text) == spec
    assert ModelSpec.from_yaml(text).to_yaml() == text


# Blocks that take something other than one (N, C, H, W) map (token sequences, or two
# maps to fuse) keep their own tests.
def takes_one_map(block_type: str) -> bool:
    if 4 not in block_configs()[block_type].input_ranks:
        return False
    try:
        return takes_one_tensor(attnzoo.create_block(block_type, 48, size=(8, 8)))
    except SpecError:
        return True  # refuses this width; the property test below tries others


MAP_BLOCKS = [b for b in attnzoo.list_blocks() if takes_one_map(b)]


@pytest.mark.parametrize("block_type", MAP_BLOCKS)
@settings(max_examples=8, deadline=None)
@given(channels=st.sampled_from([8, 12, 16, 24, 32, 48, 64]), height=st.integers(3, 17),
       width=st.integers(3, 17), batch=st.integers(1, 2))
def test_every_block_keeps_the_shape_of_any_valid_map(block_type, channels, height, width, batch):
    try:
        block = attnzoo.create_block(block_type, channels, size=(height, width)).eval()
    except SpecError:
        assume(False)  # a size this block refuses, with a clear error; not a "valid size"
    x = torch.randn(batch, channels, height, width)
    with torch.no_grad():
        y = block(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
