"""Mixed channel-and-spatial attention (attnzoo/blocks/mixed.py): CBAM and SimAM, equal
to their timm peer given the same weights and to their papers' formulas written out here."""

from __future__ import annotations

import pytest
import torch
from timm.layers.cbam import CbamModule

import attnzoo
from attnzoo import SpecError
from tests._helpers.modules import copy_by_order

X = torch.randn(2, 64, 9, 7)


def test_cbam_equals_timm_without_mlp_bias():
    ours = attnzoo.create_block("cbam", 64, mlp_bias=False, pool_order="mean_max").eval()
    peer = CbamModule(64, rd_ratio=1 / 16).eval()
    copy_by_order(ours, peer)
    torch.testing.assert_close(ours(X), peer(X))


def test_cbam_rejects_even_kernel():
    with pytest.raises(SpecError, match="spatial_kernel"):
        attnzoo.create_block("cbam", 64, spatial_kernel=4)


def test_simam_formula():
    out = attnzoo.create_block("simam", 64)(X)
    n = X.shape[2] * X.shape[3] - 1
    mu = X.mean((2, 3), keepdim=True)
    var = ((X - mu) ** 2).sum((2, 3), keepdim=True) / n
    e_inv = (X - mu) ** 2 / (4 * (var + 1e-4)) + 0.5
    torch.testing.assert_close(out, X * torch.sigmoid(e_inv))
    assert sum(p.numel() for p in attnzoo.create_block("simam", 64).parameters()) == 0
