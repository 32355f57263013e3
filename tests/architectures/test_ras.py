"""RAS (attnzoo/architectures/ras.py): the zoo spec builds and trains at 64x64 with its
five side outputs, deep to shallow. The ``reverse`` block itself is tested with the
spatial blocks (tests/blocks/test_spatial.py)."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.architectures.ras import ReverseAttentionSaliency
from attnzoo.blocks.spatial import ReverseAttention


def _spec(**args):
    return {"name": "ras_test", "backbone": {"source": "attnzoo", "name": "ras", "args": args}}


def test_zoo_spec_trains_with_five_side_outputs_and_predicts_one_map():
    model = attnzoo.create_model("ras_resnet50")
    assert isinstance(model, ReverseAttentionSaliency)
    outputs = model.train()(torch.randn(2, 3, 64, 64))
    assert isinstance(outputs, tuple) and len(outputs) == 5
    assert all(o.shape == (2, 1, 64, 64) for o in outputs)
    sum(o.mean() for o in outputs).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.eval()(torch.randn(1, 3, 48, 40)).shape == (1, 1, 48, 40)


def test_side_outputs_go_from_deep_to_shallow_stages():
    model = attnzoo.create_model("ras_resnet50")
    assert all(isinstance(unit, ReverseAttention) for unit in model.sides)
    assert [unit.residual[0].in_channels for unit in model.sides] == [1024, 512, 256, 64]
    assert model.head.layers[0].in_channels == 2048


def test_wrong_side_block_and_classes_are_spec_errors():
    with pytest.raises(attnzoo.SpecError, match=r"backbone\.args\.side"):
        attnzoo.create_model(_spec(side={"type": "se"}))
    with pytest.raises(attnzoo.SpecError, match="num_classes"):
        attnzoo.create_model("ras_resnet50", num_classes=2)
