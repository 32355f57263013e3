"""The no-op block (attnzoo/blocks/identity.py)."""

from __future__ import annotations

import torch

import attnzoo


def test_identity_block_returns_its_input():
    x = torch.randn(1, 8, 3, 3)
    assert attnzoo.create_block("identity", 8)(x) is x
