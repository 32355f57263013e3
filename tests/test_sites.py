"""Sites (attnzoo/sites.py): module-path globs and positions, resnet aliases, stage and
block filters, and the errors when a site selects nothing."""

from __future__ import annotations

import time

import pytest
import torch

import attnzoo
from attnzoo import SpecError
from tests._helpers.specs import make_spec

X = torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("position", ["before", "after"])
def test_path_glob_positions(position):
    model = attnzoo.create_model(make_spec({"block": {"type": "simam"},
                                       "at": {"path": "layer*.*.conv2", "position": position}}))
    child = f"attnzoo_{position}"
    convs = [n for n, m in model.named_modules() if n.endswith("conv2") and hasattr(m, child)]
    assert len(convs) == 8
    assert model(X).shape == (2, 1000)


def test_stage_and_block_filters():
    model = attnzoo.create_model("resnet50_gc")
    assert [b.site for b in model.attnzoo_blocks][:2] == ["layer2.0.bn3", "layer2.1.bn3"]
    assert len(model.attnzoo_blocks) == 4 + 6 + 3
    model = attnzoo.create_model(make_spec({"block": {"type": "se"}, "at": "post_add",
                                       "stages": [2, 3], "blocks": [1]}))
    assert [b.site for b in model.attnzoo_blocks] == ["layer2.1", "layer3.1"]


def test_path_that_matches_nothing_shows_close_paths():
    with pytest.raises(SpecError) as err:
        attnzoo.create_model(make_spec({"block": {"type": "se"},
                                   "at": {"path": "layer1.0.bn22", "position": "after"}}))
    msg = str(err.value)
    assert "layer1.0.bn22" in msg and "layer1.0.bn2" in msg and "insert[0]" in msg


def test_alias_on_a_non_resnet_is_a_clear_error():
    with pytest.raises(SpecError, match="resnet"):
        attnzoo.create_model(make_spec({"block": {"type": "se"}, "at": "residual"},
                                  backbone="mobilenetv3_small_050"))


def test_unknown_alias_and_missing_conv3():
    with pytest.raises(SpecError, match="unknown site alias 'middle'"):
        attnzoo.create_model(make_spec({"block": {"type": "se"}, "at": "middle"}))
    with pytest.raises(SpecError, match="after_conv3"):
        attnzoo.create_model(make_spec({"block": {"type": "se"}, "at": "after_conv3"}))


def test_filters_that_keep_nothing_are_an_error():
    with pytest.raises(SpecError, match="stages=\\[9\\]"):
        attnzoo.create_model(make_spec({"block": {"type": "se"}, "at": "residual", "stages": [9]}))


@pytest.mark.parametrize("pattern", ["*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b", "*?" * 40 + ".x",
                                     ".".join(["**", "*"] * 40) + ".x",
                                     "**." * 60 + "zz"])
def test_site_globs_cannot_backtrack_catastrophically(pattern):
    """A regex translation of these globs takes seconds to hours per module path."""
    start = time.perf_counter()
    with pytest.raises(SpecError, match="matches no module"):
        attnzoo.create_model({"name": "x", "backbone": {"name": "resnet18"},
                              "insert": [{"block": {"type": "se"}, "at": {"path": pattern}}]})
    assert time.perf_counter() - start < 5
