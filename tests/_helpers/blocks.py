"""Blocks for the formula tests, and the pieces of those formulas written out."""

from __future__ import annotations

import torch

import attnzoo


def block(name: str, channels: int = 48, size=(6, 5), **cfg) -> torch.nn.Module:
    if name == "mhsa2d":
        cfg.setdefault("size", size)
    return attnzoo.create_block(name, channels, **cfg)


def conv1x1(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """A 1x1 conv on (N, C, P) positions, written as a matrix product."""
    out = torch.einsum("oc,ncp->nop", conv.weight.flatten(1), x)
    return out if conv.bias is None else out + conv.bias[:, None]

