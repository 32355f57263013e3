"""The zoo (attnzoo/zoo.py): the spec files shipped with attnzoo, found by name or by path,
and the foundation's zoo models (SE, ECA, CBAM, SimAM, GC): they build, run, insert the
right number of blocks, and have the parameter counts their papers report. The zoo
models of one block family are checked with that family (tests/blocks/), those of an
architecture with it (tests/architectures/)."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo import SpecError

# name -> (inserted blocks, parameters reported by the paper, in millions)
PAPER = {
    "resnet18_se": (8, 11.78),      # SENet, Table 2
    "resnet34_se": (16, 21.96),     # SENet, Table 2
    "resnet50_se": (16, 28.09),     # SENet, Table 2
    "resnet101_se": (33, 49.33),    # SENet, Table 2
    "resnet50_eca": (16, 25.56),    # ResNet-50 (25.56M) plus 80 ECA kernel weights
    "resnet101_eca": (33, 44.55),   # ResNet-101 (44.55M) plus 99 ECA kernel weights
    "resnet18_cbam": (8, 11.78),    # CBAM, Table 4
    "resnet50_cbam": (16, 28.09),   # CBAM, Table 4
    "resnet50_simam": (16, 25.56),  # SimAM adds no parameters to ResNet-50 (25.56M)
    "resnet50_gc": (13, 28.08),     # GCNet, Table 2(b): r16, c3-c5, after add1x1
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_zoo_model_builds_runs_and_matches_the_paper(name):
    n_blocks, params_m = PAPER[name]
    model = attnzoo.create_model(name)
    assert len(model.attnzoo_blocks) == n_blocks
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / 1e6 - params_m) < 0.01 * params_m, params
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert model.attnzoo_spec.paper.startswith("https://")


def test_list_models_pattern():
    cbam = attnzoo.list_models("*cbam*")
    assert {"resnet18_cbam", "resnet50_cbam"} <= set(cbam)
    assert all("cbam" in name for name in cbam) and cbam == sorted(cbam)
    assert set(PAPER) <= set(attnzoo.list_models())


def test_unknown_zoo_name():
    with pytest.raises(SpecError, match="resnet50_cbam"):
        attnzoo.create_model("resnet50_cbm")


@pytest.mark.parametrize("name", ["resnet50_cbam", "resnet50_gc"])
def test_spec_file_by_path_builds_the_zoo_model(tmp_path, name):
    path = tmp_path / "mine.yaml"
    path.write_text(attnzoo.load_spec(name).to_yaml())
    from_file = attnzoo.create_model(path).state_dict()
    from_name = attnzoo.create_model(name).state_dict()
    assert {k: v.shape for k, v in from_file.items()} == {
        k: v.shape for k, v in from_name.items()}
