"""attnzoo.insert: the builder's insertion on any model (torchvision, timm, a network
written here), torchvision as a spec backbone, saving and loading, features and the
summary of such models. Small inputs; each model is built once per module."""

from __future__ import annotations

import copy
import sys

import pytest
import timm
import torch
import torchvision
from torch import nn

import attnzoo
from attnzoo import AttnZooError, SpecError, WeightsError
from attnzoo.cli import summarize
from attnzoo.features import features_model
from attnzoo.layouts import LayoutAdapter

SIZE = 64
BLOCKS = ["cbam", "se", "eca", "non_local", "global_context"]
CHANNEL_AXIS = {"nchw": 1, "nhwc": 3, "tokens": 2}


# ------------------------------------------------------------- a network of one's own


class Basic(nn.Module):
    """A ResNet basic block written from scratch: attnzoo's resnet aliases find it by
    its children."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.ReLU()
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(y + (x if self.down is None else self.down(x)))


class Up(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.BatchNorm2d(cout)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.norm(self.conv(x))))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.layer1 = nn.Sequential(Basic(16, 16), Basic(16, 16))
        self.layer2 = nn.Sequential(Basic(16, 32, 2), Basic(32, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(self.stem(x)))


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.Sequential(nn.Sequential(Up(32, 16)), nn.Sequential(Up(16, 16)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)


class EncoderDecoder(nn.Module):
    """A small segmentation network: 3 classes per pixel at the input's size."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.head = nn.Conv2d(16, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)))


# ---------------------------------------------------------------------------- the matrix


def _make(name: str) -> tuple[nn.Module, int]:
    if name == "tv_resnet50":
        return torchvision.models.resnet50(), SIZE
    if name == "encoder_decoder":
        return EncoderDecoder(), 32
    if name in ("vit_small_patch16_224", "swin_tiny_patch4_window7_224"):
        return timm.create_model(name, img_size=SIZE), SIZE
    return timm.create_model(name), SIZE


# model -> (by alias: at, filters, site layout), (by glob: ...)
CASES = {
    "tv_resnet50": (("residual", {"stages": [4], "blocks": [0]}, "nchw"),
                    ({"path": "layer*.*.conv3"}, {"stages": [3], "blocks": [1]}, "nchw")),
    "convnext_tiny": (("residual", {"stages": [4], "blocks": [0]}, "nhwc"),
                      ({"path": "stages.*.blocks.*.conv_dw"}, {"stages": [3], "blocks": [1]},
                       "nchw")),
    "efficientnet_b0": (("after_se", {"stages": [6], "blocks": [0]}, "nchw"),
                        ({"path": "blocks.*.*.bn3"}, {"stages": [5], "blocks": [1]}, "nchw")),
    "mobilenetv3_small_100": (("after_se", {"stages": [4], "blocks": [0]}, "nchw"),
                              ({"path": "blocks.*.*.conv_pw"}, {"stages": [2], "blocks": [0]},
                               "nchw")),
    "regnety_008": (("residual", {"stages": [4], "blocks": [0]}, "nchw"),
                    ({"path": "s*.b*.se"}, {"stages": [3], "blocks": [1]}, "nchw")),
    "vit_small_patch16_224": (("after_attn", {"blocks": [5]}, "tokens"),
                              ({"path": "blocks.*.mlp"}, {"blocks": [0]}, "tokens")),
    "swin_tiny_patch4_window7_224": (("after_mlp", {"stages": [3], "blocks": [1]}, "tokens"),
                                     ({"path": "layers.*.blocks.*"}, {"stages": [2],
                                                                       "blocks": [0]}, "nhwc")),
    "encoder_decoder": (("residual", {"stages": [2]}, "nchw"),
                        ({"path": "decoder.stages.*.*"}, {"blocks": [0]}, "nchw")),
}


@pytest.fixture(scope="module")
def bare_models():
    """name -> (bare model in eval mode, input, its output): each built once."""
    cache: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(0)
            model, side = _make(name)
            for m in model.modules():  # timm zero-inits the last BN of a block: undo it
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    nn.init.uniform_(m.weight, 0.5, 1.5)
            model.eval()
            x = torch.randn(1, 3, side, side)
            with torch.no_grad():
                cache[name] = (model, x, model(x))
        return cache[name]

    return get


def true_channels(model: nn.Module, x: torch.Tensor, paths: list[str], layout: str
                  ) -> list[int]:
    """The channels of each module's output in a real forward pass, read on the axis
    that the test states for the site (not the builder's decision)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(p).register_forward_hook(
        lambda _m, _i, out, p=p: seen.setdefault(p, out)) for p in paths]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [seen[p].shape[CHANNEL_AXIS[layout]] for p in paths]


@pytest.mark.parametrize("how", ["alias", "glob"])
@pytest.mark.parametrize("name", list(CASES))
def test_blocks_into_any_model(bare_models, name, how):
    """CBAM, SE, ECA, non-local and GC at the same sites (chained), so that one forward
    and one backward pass cover them all."""
    bare, x, expected = bare_models(name)
    at, filters, layout = CASES[name][0 if how == "alias" else 1]
    model = copy.deepcopy(bare)
    attnzoo.insert(model, [{"block": {"type": block}, "at": at, **filters, "zero_init": True}
                           for block in BLOCKS], input_size=x.shape[-1])
    blocks = model.attnzoo_blocks
    sites = len(blocks) // len(BLOCKS)
    assert sites and [b.block_type for b in blocks] == [t for t in BLOCKS for _ in range(sites)]
    assert type(model) is type(bare)
    assert set(bare.state_dict()) <= set(model.state_dict())  # its own names kept
    assert [b.channels for b in blocks] == true_channels(bare, x, [b.site for b in blocks],
                                                         layout)
    assert all(b.layout.split("(")[0] == layout for b in blocks)
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # zero_init: the bare model's outputs
    model(x).sum().backward()
    for b in blocks:
        grads = [p.grad for p in model.get_submodule(b.name).parameters()]
        assert grads and all(g is not None for g in grads), b.name
        assert any(g.abs().sum() > 0 for g in grads), b.name
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_an_nchw_block_at_an_nhwc_site_runs_permuted(bare_models):
    bare, x, _ = bare_models("convnext_tiny")
    model = attnzoo.insert(copy.deepcopy(bare), [{"block": {"type": "cbam"}, "at": "residual",
                                                   "stages": [1], "blocks": [0]}],
                           input_size=SIZE)
    (b,) = model.attnzoo_blocks
    assert (b.layout, b.block_layout, b.channels, b.size) == ("nhwc", "nchw", 96, (16, 16))
    assert isinstance(model.get_submodule(b.name), LayoutAdapter)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 1000)  # any size


def test_a_vit_block_sees_the_patch_grid_and_leaves_the_class_token(bare_models):
    bare, x, _ = bare_models("vit_small_patch16_224")
    model = attnzoo.insert(copy.deepcopy(bare), [{"block": {"type": "cbam"},
                                                  "at": "post_add", "blocks": [3]}])
    (b,) = model.attnzoo_blocks
    assert (b.layout, b.block_layout, b.channels, b.size) == ("tokens(1+4x4)", "nchw", 384,
                                                              (4, 4))
    assert (b.in_shape, b.out_shape) == ((17, 384), (17, 384))
    seen = []
    model.blocks[3].register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        model(x)
        reference = bare.blocks[3](bare.blocks[:3](bare.norm_pre(bare._pos_embed(
            bare.patch_embed(x)))))
    assert torch.equal(seen[0][:, 0], reference[:, 0])  # the class token passes by
    assert not torch.equal(seen[0][:, 1:], reference[:, 1:])


# ---------------------------------------------------------------------------- insert API


def test_insertions_from_yaml_text_a_file_a_dict_and_a_spec(tmp_path):
    text = "- block: {type: se}\n  at: residual\n  stages: [2]\n"
    model = attnzoo.insert(EncoderDecoder(), text, input_size=32)
    assert [b.site for b in model.attnzoo_blocks] == ["encoder.layer2.0.bn2",
                                                      "encoder.layer2.1.bn2"]
    path = tmp_path / "ins.yaml"
    path.write_text("insert:\n" + "".join(f"  {line}\n" for line in text.splitlines()))
    assert len(attnzoo.insert(EncoderDecoder(), path, input_size=32).attnzoo_blocks) == 2
    one = {"block": {"type": "eca"}, "at": {"path": "decoder.stages.0.0"}}
    assert len(attnzoo.insert(EncoderDecoder(), one, input_size=32).attnzoo_blocks) == 1
    spec = attnzoo.ModelSpec.from_dict({"name": "x", "backbone": {"name": "resnet18"},
                                        "insert": [one]})
    assert len(attnzoo.insert(EncoderDecoder(), spec, input_size=(3, 32, 32)).attnzoo_blocks) == 1


def test_bad_insertions_are_spec_errors_that_say_where():
    with pytest.raises(SpecError, match=r"insert\[0\]\.block: unknown block type 'cbm'"):
        attnzoo.insert(EncoderDecoder(), [{"block": {"type": "cbm"}, "at": "residual"}],
                       input_size=32)
    with pytest.raises(SpecError, match="EncoderDecoder: insert\\[0\\] \\(se\\): stages=\\[3\\]: "
                                        "stage 3 out of range"):
        attnzoo.insert(EncoderDecoder(), [{"block": {"type": "se"}, "at": "residual",
                                           "stages": [3]}], input_size=32)
    with pytest.raises(SpecError, match="input_size must be"):
        attnzoo.insert(EncoderDecoder(), [], input_size=(3, 0, 4))


def test_insert_twice_adds_blocks_and_records_both_calls():
    model = EncoderDecoder()
    attnzoo.insert(model, [{"block": {"type": "se"}, "at": "post_add", "stages": [1]}],
                   input_size=32)
    attnzoo.insert(model, [{"block": {"type": "eca"}, "at": "post_add", "stages": [1]}],
                   input_size=48)
    assert [b.block_type for b in model.attnzoo_blocks] == ["se", "se", "eca", "eca"]
    assert [c["input_size"] for c in model.attnzoo_insertions] == [[3, 32, 32], [3, 48, 48]]
    assert model.encoder.layer1[0].attnzoo_after[1] is model.get_submodule(
        "encoder.layer1.0.attnzoo_after.1")


def test_a_model_built_from_a_spec_is_refused():
    model = attnzoo.create_model({"name": "r", "backbone": {"name": "resnet10t"}})
    with pytest.raises(AttnZooError, match="built from the spec 'r'"):
        attnzoo.insert(model, [{"block": {"type": "se"}, "at": "residual"}])


def test_a_shared_module_is_not_a_site():
    """torchvision's ResNet blocks call one ReLU module two or three times."""
    with pytest.raises(SpecError, match="'layer1.0.relu' runs 2 times in one forward pass"):
        attnzoo.insert(torchvision.models.resnet18(),
                       [{"block": {"type": "se"}, "at": {"path": "layer1.0.relu"}}],
                       input_size=SIZE)


def test_list_sites_does_not_change_the_model():
    model = EncoderDecoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = {s.path: s for s in attnzoo.list_sites(model, 32)}
    assert found["encoder.layer2.1.bn2"].aliases == ("after_conv2", "residual")
    assert (found["encoder.layer2.1"].stage, found["encoder.layer2.1"].block) == (2, 1)
    assert found["decoder.stages.1.0"].output.describe() == "nchw 16x32x32"
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert type(model.encoder.layer1[0]) is Basic


# ---------------------------------------------------------------------------- saving


def test_save_and_load_an_inserted_model_of_ones_own(tmp_path):
    model = attnzoo.insert(EncoderDecoder(), [
        {"block": {"type": "cbam", "reduction": 4}, "at": "residual"},
        {"block": {"type": "non_local"}, "at": {"path": "decoder.stages.0"}}], input_size=32)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    attnzoo.save_pretrained(model, tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "README.md", "attnzoo_insert.yaml", "model.safetensors"]
    text = (tmp_path / "saved" / "attnzoo_insert.yaml").read_text()
    assert "model_class: " in text and "EncoderDecoder" in text and "import" not in text
    loaded = attnzoo.load_inserted(EncoderDecoder(), tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert [b.name for b in loaded.attnzoo_blocks] == [b.name for b in model.attnzoo_blocks]
    with pytest.raises(AttnZooError, match="not a .*Encoder; pass a new instance"):
        attnzoo.load_inserted(Encoder(), tmp_path / "saved")
    with pytest.raises(WeightsError, match="attnzoo.load_inserted"):
        attnzoo.create_model(tmp_path / "saved")


def test_a_tampered_weights_file_is_refused(tmp_path):
    model = attnzoo.insert(EncoderDecoder(), [{"block": {"type": "se"}, "at": "post_add"}],
                           input_size=32)
    attnzoo.save_pretrained(model, tmp_path)
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        attnzoo.load_inserted(EncoderDecoder(), tmp_path)


def test_save_and_load_an_inserted_timm_model(bare_models, tmp_path):
    bare, x, _ = bare_models("convnext_tiny")
    model = attnzoo.insert(copy.deepcopy(bare), [{"block": {"type": "cbam"}, "at": "residual",
                                                   "stages": [4]}], input_size=SIZE)
    with torch.no_grad():
        for p in model.parameters():  # not the identity any more
            p.add_(0.01 * torch.randn_like(p))
        expected = model(x)
    attnzoo.save_pretrained(model, tmp_path)
    fresh = timm.create_model("convnext_tiny").eval()
    loaded = attnzoo.load_inserted(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


# ---------------------------------------------------------------------------- torchvision


TV_SPEC = {"name": "tv_resnet50_cbam", "input_size": [3, SIZE, SIZE],
           "backbone": {"source": "torchvision", "name": "resnet50"},
           "insert": [{"block": {"type": "cbam"}, "at": "residual", "stages": [4]}]}


@pytest.fixture(scope="module")
def tv_model():
    torch.manual_seed(0)
    return attnzoo.create_model(TV_SPEC).eval()


def test_a_torchvision_backbone_from_a_spec(tv_model):
    assert isinstance(tv_model, torchvision.models.ResNet)
    assert [b.site for b in tv_model.attnzoo_blocks] == ["layer4.0.bn3", "layer4.1.bn3",
                                                         "layer4.2.bn3"]
    assert {b.channels for b in tv_model.attnzoo_blocks} == {2048}


def test_a_saved_torchvision_model_loads_with_identical_outputs(tv_model, tmp_path):
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = tv_model(x)
    attnzoo.save_pretrained(tv_model, tmp_path)
    loaded = attnzoo.create_model(tmp_path).eval()
    assert loaded.attnzoo_spec.backbone.source == "torchvision"
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_features_of_a_torchvision_backbone(tv_model):
    model = attnzoo.create_model(TV_SPEC, features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, SIZE, SIZE))
    assert [tuple(f.shape[1:]) for f in feats] == [(256, 16, 16), (512, 8, 8), (1024, 4, 4),
                                                   (2048, 2, 2)]
    assert len(model.attnzoo_blocks) == 3
    assert [i["reduction"] for i in model.feature_info.get_dicts()] == [4, 8, 16, 32]


def test_features_of_an_inserted_timm_model(bare_models):
    bare, x, _ = bare_models("convnext_tiny")
    model = attnzoo.insert(copy.deepcopy(bare), [{"block": {"type": "eca"}, "at": "residual",
                                                   "stages": [2]}], input_size=SIZE)
    feats = features_model(model)
    with torch.no_grad():
        assert [f.shape[1] for f in feats(x)] == [96, 192, 384, 768]
    assert len(feats.attnzoo_blocks) == 3


@pytest.mark.parametrize("arg", ["weights", "weights_backbone", "pretrained"])
def test_a_torchvision_spec_cannot_name_weights(arg):
    spec = {**TV_SPEC, "backbone": {**TV_SPEC["backbone"], "args": {arg: "DEFAULT"}}}
    with pytest.raises(SpecError, match=f"backbone args may not set {arg}"):
        attnzoo.ModelSpec.from_dict(spec)


def test_an_unknown_torchvision_model_suggests_names():
    spec = {**TV_SPEC, "backbone": {"source": "torchvision", "name": "resnet5O"}, "insert": []}
    with pytest.raises(SpecError, match="torchvision has no model 'resnet5O'.*resnet50"):
        attnzoo.create_model(spec)


def test_without_torchvision_a_torchvision_spec_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(SpecError, match="needs torchvision, which is not installed"):
        attnzoo.create_model({**TV_SPEC, "insert": []})


def test_zoo_specs_stay_on_timm_and_attnzoo_backbones():
    sources = {attnzoo.load_spec(n).backbone.source for n in attnzoo.list_models()}
    assert sources <= {"timm", "attnzoo"}


# ---------------------------------------------------------------------------- summary


def test_attnzoo_summary_of_a_torchvision_spec(tmp_path, capsys):
    import yaml

    from attnzoo.cli import main

    path = tmp_path / "tv.yaml"
    path.write_text(yaml.safe_dump(TV_SPEC))
    assert main(["summary", str(path), "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "backbone: torchvision:resnet50 (ResNet)" in out and "inserted blocks: 3" in out
    row = next(line for line in out.splitlines() if line.startswith("layer4.0.bn3"))
    assert row.split()[1:6] == ["cbam", "after", "nchw", "2048@2x2", "2048@2x2"]


def test_the_summary_of_an_inserted_model_shows_layouts_and_shapes(bare_models, capsys):
    bare, _, _ = bare_models("convnext_tiny")
    model = attnzoo.insert(copy.deepcopy(bare), [{"block": {"type": "cbam"}, "at": "residual",
                                                   "stages": [4], "blocks": [0]}],
                           input_size=SIZE)
    summarize(model)
    out = capsys.readouterr().out
    assert "ConvNeXt: blocks inserted by attnzoo.insert" in out
    assert "backbone: timm.models.convnext.ConvNeXt (ConvNeXt)" in out
    row = next(line for line in out.splitlines() if line.startswith("stages.3.blocks.0.mlp"))
    assert row.split()[1:6] == ["cbam", "after", "nhwc->nchw", "768@2x2", "768@2x2"]
