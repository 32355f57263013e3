"""Site aliases for every family and one numbering of stages and blocks
(attnzoo/aliases.py), on each family's smallest model, built on the meta device."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

import attnzoo
from attnzoo import SpecError
from attnzoo.aliases import FAMILIES, block_family, find_stages
from attnzoo.cli import main
from attnzoo.sites import resolve_sites
from attnzoo.spec import Insertion

DOCS = Path(__file__).resolve().parents[1] / "docs" / "sites.md"

# family -> its smallest models: (source, name)
MODELS = {
    "resnet": [("timm", "resnet18"), ("timm", "resnet26"), ("torchvision", "resnet18"),
               ("torchvision", "resnext50_32x4d"), ("timm", "resnext50_32x4d")],
    "convnext": [("timm", "convnext_atto")],
    "mobile": [("timm", "efficientnet_b0"), ("timm", "mobilenetv3_small_050")],
    "regnet": [("timm", "regnetx_002"), ("timm", "regnety_002")],
    "transformer": [("timm", "vit_tiny_patch16_224"), ("timm", "deit_tiny_distilled_patch16_224"),
                    ("timm", "swin_tiny_patch4_window7_224")],
}
_BUILT: dict[tuple[str, str], nn.Module] = {}


def meta_model(source: str, name: str) -> nn.Module:
    key = (source, name)
    if key not in _BUILT:
        with torch.device("meta"):
            _BUILT[key] = (timm.create_model(name) if source == "timm"
                           else torchvision.models.get_model(name, weights=None))
    return _BUILT[key]


def sites(model: nn.Module, at, **filters) -> list[tuple[str, str]]:
    ins = Insertion.model_validate({"block": {"type": "se"}, "at": at, **filters})
    return [(s.path, s.position) for s in resolve_sites(model, ins, "t")]


CASES = [(family, source, name) for family, models in MODELS.items()
         for source, name in models]


@pytest.mark.parametrize(("family", "source", "name"), CASES)
def test_every_alias_of_the_family_resolves_in_every_block(family, source, name):
    model = meta_model(source, name)
    stages = find_stages(model)
    blocks = [model.get_submodule(b) for s in stages for b in s.blocks]
    families = [block_family(b) for b in blocks]
    assert any(f is not None and f[0] == family for f in families)
    for alias in FAMILIES[family][1]:
        if alias == "after_conv3" and not any(hasattr(b, "conv3") for b in blocks):
            continue  # basic blocks have no third conv
        found = sites(model, alias)
        having = [b for b, f in zip(blocks, families, strict=True)
                  if f is not None and alias in f[1]]
        assert len(found) == len(having) > 0, alias


# The module each alias names in one block of the family: (model, block, alias) -> site.
SPOTS = [
    (("timm", "resnet18"), "layer2.1", {"after_conv1": "act1", "after_conv2": "bn2",
                                        "residual": "bn2", "post_add": ""}),
    (("timm", "resnet26"), "layer2.1", {"after_conv1": "act1", "after_conv2": "act2",
                                        "after_conv3": "bn3", "residual": "bn3"}),
    (("torchvision", "resnet18"), "layer2.1", {"after_conv1": "bn1", "after_conv2": "bn2",
                                               "residual": "bn2"}),
    (("torchvision", "resnext50_32x4d"), "layer2.1", {"after_conv2": "bn2", "residual": "bn3"}),
    (("timm", "convnext_atto"), "stages.1.blocks.1", {"after_dwconv": "conv_dw",
                                                      "residual": "mlp", "post_add": ""}),
    (("timm", "efficientnet_b0"), "blocks.1.1", {"after_dwconv": "bn2", "after_se": "se",
                                                 "after_project": "bn3"}),
    (("timm", "efficientnet_b0"), "blocks.0.0", {"after_dwconv": "bn1", "after_project": "bn2"}),
    (("timm", "regnety_002"), "s2.b1", {"after_conv1": "conv1", "after_conv2": "conv2",
                                        "after_se": "se", "residual": "conv3"}),
    (("timm", "vit_tiny_patch16_224"), "blocks.3", {"after_attn": "attn", "after_mlp": "mlp",
                                                    "post_add": ""}),
    (("timm", "swin_tiny_patch4_window7_224"), "layers.2.blocks.1",
     {"after_attn": "attn", "after_mlp": "mlp"}),
]


@pytest.mark.parametrize(("model_id", "block", "expected"), SPOTS)
def test_aliases_name_the_modules_of_the_papers_places(model_id, block, expected):
    model = meta_model(*model_id)
    for alias, child in expected.items():
        path = f"{block}.{child}" if child else block
        assert (path, "after") in sites(model, alias), alias


@pytest.mark.parametrize("model_id", [("timm", "efficientnet_b0"), ("timm", "regnetx_002"),
                                      ("timm", "mobilenetv3_small_050")])
def test_se_slot_replaces_the_se_module_or_its_identity(model_id):
    model = meta_model(*model_id)
    found = sites(model, "se_slot")
    assert found and all(p.endswith(".se") and pos == "replace" for p, pos in found)


# ---------------------------------------------------------------------------- numbering


@pytest.mark.parametrize(("model_id", "stage", "first_block"), [
    (("timm", "resnet18"), 1, "layer1.0"),
    (("torchvision", "resnet18"), 4, "layer4.0"),
    (("timm", "convnext_atto"), 1, "stages.0.blocks.0"),
    (("timm", "efficientnet_b0"), 7, "blocks.6.0"),
    (("timm", "mobilenetv3_small_050"), 1, "blocks.0.0"),
    (("timm", "regnetx_002"), 1, "s1.b1"),
    (("timm", "vit_tiny_patch16_224"), 1, "blocks.0"),
    (("timm", "swin_tiny_patch4_window7_224"), 4, "layers.3.blocks.0"),
])
def test_stages_count_from_1_and_blocks_from_0_in_every_family(model_id, stage, first_block):
    model = meta_model(*model_id)
    numbers = [s.number for s in find_stages(model)]
    assert numbers == list(range(1, len(numbers) + 1))
    found = sites(model, {"path": "**"}, stages=[stage], blocks=[0])
    assert found[0][0] == first_block


def test_volo_numbers_its_block_groups_and_skips_the_downsampling():
    with torch.device("meta"):
        model = timm.create_model("volo_d1_224")
    assert [(s.number, s.path, len(s.blocks)) for s in find_stages(model)] == [
        (1, "network.0", 4), (2, "network.2", 4), (3, "network.3", 8), (4, "network.4", 2)]


def test_resnet_stage_numbers_are_the_layer_names():
    model = meta_model("timm", "resnet18")
    assert sites(model, "post_add", stages=[2, 3], blocks=[1]) == [
        ("layer2.1", "after"), ("layer3.1", "after")]


@pytest.mark.parametrize(("model_id", "filters", "message"), [
    (("timm", "resnet18"), {"stages": [0, 1]},
     "stages=[0, 1]: stage 0 out of range; ResNet has stages 1, 2, 3, 4 (numbered from 1): "
     "1 (layer1, 2 blocks), 2 (layer2, 2 blocks)"),
    (("timm", "vit_tiny_patch16_224"), {"stages": [2]},
     "stage 2 out of range; VisionTransformer has stages 1 (numbered from 1): "
     "1 (blocks, 12 blocks)"),
    (("timm", "resnet18"), {"stages": [1], "blocks": [1, 2]},
     "blocks=[1, 2]: block 2 out of range in the selected stages (blocks are numbered from 0 "
     "in each stage): stage 1 has blocks 0-1"),
    (("timm", "regnetx_002"), {"blocks": [7]}, "stage 3 has blocks 0-3; stage 4 has blocks 0-6"),
])
def test_an_index_out_of_range_is_an_error_that_lists_the_valid_ones(model_id, filters,
                                                                     message):
    with pytest.raises(SpecError) as err:
        sites(meta_model(*model_id), "post_add", **filters)
    assert message in str(err.value)


def test_a_block_index_that_some_selected_stage_has_is_kept():
    """resnet50_nl's blocks [1, 3, 5] over stages 2 and 3: 5 exists in stage 3 only."""
    model = meta_model("timm", "resnet26")  # stages of 2 blocks: 5 exists nowhere
    with pytest.raises(SpecError, match="block 5 out of range"):
        sites(model, "post_add", stages=[2, 3], blocks=[1, 5])
    with torch.device("meta"):
        r50 = timm.create_model("resnet50")
    assert sites(r50, "post_add", stages=[2, 3], blocks=[1, 3, 5]) == [
        ("layer2.1", "after"), ("layer2.3", "after"), ("layer3.1", "after"),
        ("layer3.3", "after"), ("layer3.5", "after")]


def test_a_filter_on_a_model_without_stages_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(SpecError, match="has no stages attnzoo can number"):
        sites(model, {"path": "0"}, stages=[1])


def test_stages_of_an_encoder_and_a_decoder_are_each_numbered_from_1():
    def stage() -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))

    model = nn.Module()
    model.encoder = nn.Module()
    model.encoder.stages = nn.Sequential(stage(), stage())
    model.decoder = nn.Module()
    model.decoder.stages = nn.Sequential(stage())
    assert [(s.number, s.path) for s in find_stages(model)] == [
        (1, "encoder.stages.0"), (2, "encoder.stages.1"), (1, "decoder.stages.0")]


# ---------------------------------------------------------------------------- messages


def test_an_alias_of_another_family_says_which_families_have_it():
    with pytest.raises(SpecError) as err:
        sites(meta_model("timm", "convnext_atto"), "se_slot")
    msg = str(err.value)
    assert "site alias 'se_slot' needs a mobile-family backbone (or regnet)" in msg
    assert "its convnext blocks (ConvNeXtBlock) have after_dwconv, residual, post_add" in msg


def test_an_unknown_alias_lists_the_models_aliases():
    with pytest.raises(SpecError) as err:
        sites(meta_model("timm", "swin_tiny_patch4_window7_224"), "after_atn")
    assert "unknown site alias 'after_atn'; transformer aliases are after_attn, after_mlp, " \
           "post_add, or give {path, position}" in str(err.value)


def test_aliases_follow_structure_not_class_names():
    class MyBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.relu = nn.ReLU()

    assert block_family(MyBlock())[0] == "resnet"
    assert block_family(nn.Conv2d(3, 3, 1)) is None


# ---------------------------------------------------------------------------- docs, CLI


def test_docs_list_every_family_and_alias():
    text = DOCS.read_text(encoding="utf-8")
    sections = dict(re.findall(r"^### (\w+)\n(.*?)(?=^### |\Z)", text, re.M | re.S))
    assert set(sections) == set(FAMILIES)
    for family, (_, aliases) in FAMILIES.items():
        listed = re.findall(r"^\| `(\w+)` \|", sections[family], re.M)
        assert listed == list(aliases), family


def test_attnzoo_sites_lists_sites_layouts_and_aliases(capsys):
    assert main(["sites", "torchvision:resnet18", "--input-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "resnet18: torchvision:resnet18 (ResNet) at input 3x64x64" in out
    row = next(line for line in out.splitlines() if line.startswith("layer2.1.bn2 "))
    assert row.split()[1:] == ["BatchNorm2d", "2.1", "nchw", "128x8x8", "nchw", "128x8x8",
                               "after_conv2,"]  # the aliases wrap to the next line
    assert "residual" in out.splitlines()[out.splitlines().index(row) + 1]
    assert not any(line.startswith("layer1.0.relu ") for line in out.splitlines())  # shared


def test_attnzoo_sites_on_a_timm_name(capsys):
    """convnext_atto runs its MLP as 1x1 convs (NCHW), convnext_tiny as linears (NHWC):
    the same alias, each site's own layout."""
    assert main(["sites", "convnext_atto", "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("stages.0.blocks.0.mlp "))
    assert row.split()[1:] == ["Mlp", "1.0", "nchw", "40x8x8", "nchw", "40x8x8", "residual"]
    with torch.device("meta"):
        tiny = timm.create_model("convnext_tiny")
    site = next(s for s in attnzoo.list_sites(tiny, 32) if s.path == "stages.0.blocks.0.mlp")
    assert site.row()[3:] == ("nhwc 8x8x96", "nhwc 8x8x96", "residual")


def test_list_sites_marks_tokens_with_their_prefix_and_grid():
    with torch.device("meta"):
        model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32)
    found = {s.path: s for s in attnzoo.list_sites(model)}
    site = found["blocks.0.attn"]
    assert (str(site.output), site.output.shape, site.aliases) == (
        "tokens(2+2x2)", (1, 6, 192), ("after_attn",))
    assert (site.stage, site.block) == (1, 0)
