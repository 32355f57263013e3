"""Specs and models for tests: a spec on a timm ResNet, the message of a spec error, and
a zoo model built for a small input."""

from __future__ import annotations

from typing import Any

import pytest
import timm
from torch import nn

import attnzoo
from attnzoo import ModelSpec, SpecError

SIZE = 64  # input side where the model allows it


def make_spec(*insert, backbone="resnet18", **extra) -> dict[str, Any]:
    """A spec named ``t``: timm's ``backbone`` with the insertions ``insert``."""
    return {"name": "t", "backbone": {"name": backbone}, "insert": list(insert), **extra}


def spec_error(source) -> str:
    """The message of the SpecError that ``create_model(source)`` raises."""
    with pytest.raises(SpecError) as err:
        attnzoo.create_model(source)
    return str(err.value)


def build_small(spec: ModelSpec, size: int = SIZE, *, img_size: bool = True
                ) -> tuple[nn.Module, tuple[int, ...]]:
    """The model, in eval mode, built for a ``size`` x ``size`` input where it can be,
    and the (C, H, W) of its input.

    Specs made for a smaller input keep theirs; a timm backbone with a fixed input size
    (ViT, VOLO) gets ``img_size=size`` (with ``img_size=False`` it is built at its own
    input size instead); a model whose blocks cannot work at ``size`` (FcaNet's DCT
    frequencies need a 7x7 last stage) keeps its own input size.
    """
    if spec.input_size is not None and max(spec.input_size[1:]) <= size:
        return attnzoo.create_model(spec).eval(), tuple(spec.input_size)
    chans = spec.input_size[0] if spec.input_size else 3
    small = spec.model_copy(update={"input_size": (chans, size, size)})
    fixed = img_size and spec.backbone.source == "timm" and getattr(
        timm.get_pretrained_cfg(spec.backbone.name), "fixed_input_size", False)
    try:
        model = attnzoo.create_model(small, **({"img_size": size} if fixed else {}))
        return model.eval(), (chans, size, size)
    except SpecError:
        model = attnzoo.create_model(spec).eval()
        return model, tuple(model.pretrained_cfg["input_size"])
