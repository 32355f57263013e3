"""The authors' released checkpoints: ``attnzoo.convert.from_official`` and
tools/convert_official.py.

Each release's state dict is built with the authors' key names and shapes (from their
released model definitions, see tests/_helpers/release_oracles.py) and random values;
it is converted, loaded strictly into the zoo model, and the outputs are compared with
an oracle of the released network that reads the authors' keys, in eval and training
mode, in float64 (max abs difference < 1e-5).
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import torch
import yaml

import attnzoo
from attnzoo.convert import OFFICIAL_RELEASES, from_official, official_model
from tests._helpers import release_oracles as ro

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import convert_official  # noqa: E402

TOL = 1e-5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bn(prefix: str, c: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    weight = torch.empty(c, dtype=torch.float64).uniform_(0.5, 1.5, generator=gen)
    return {f"{prefix}.weight": weight,
            f"{prefix}.bias": ro.randn(c, gen=gen, scale=0.1),
            f"{prefix}.running_mean": ro.randn(c, gen=gen, scale=0.1),
            f"{prefix}.running_var": torch.empty(c, dtype=torch.float64).uniform_(
                0.5, 1.5, generator=gen)}


# --- the releases' state dicts: (authors' keys and shapes, random values) ---------------


def cbam_release() -> dict[str, torch.Tensor]:
    """ResidualNet('ImageNet', 50, 1000, 'CBAM'), saved by PyTorch 0.4: no
    num_batches_tracked. CBAM(planes * 4, 16): mlp.1 Linear(C, C/16), mlp.3 Linear(C/16, C),
    SpatialGate.spatial = BasicConv(2, 1, 7): conv (no bias) and bn."""
    sd = ro.resnet50_release_state(seed=1, batch_count=False)
    gen = _gen(11)
    for p, planes in ro.blocks_50():
        c = planes * 4
        sd[f"{p}.cbam.ChannelGate.mlp.1.weight"] = ro.randn(c // 16, c, gen=gen, scale=c ** -0.5)
        sd[f"{p}.cbam.ChannelGate.mlp.1.bias"] = ro.randn(c // 16, gen=gen, scale=0.1)
        sd[f"{p}.cbam.ChannelGate.mlp.3.weight"] = ro.randn(c, c // 16, gen=gen,
                                                           scale=(c // 16) ** -0.5)
        sd[f"{p}.cbam.ChannelGate.mlp.3.bias"] = ro.randn(c, gen=gen, scale=0.1)
        sd[f"{p}.cbam.SpatialGate.spatial.conv.weight"] = ro.randn(1, 2, 7, 7, gen=gen, scale=0.1)
        sd.update(_bn(f"{p}.cbam.SpatialGate.spatial.bn", 1, gen))
    return sd


def eca_release() -> dict[str, torch.Tensor]:
    """eca_resnet50(k_size=[3, 5, 5, 7]): eca.conv = Conv1d(1, 1, k, bias=False)."""
    sd = ro.resnet50_release_state(seed=2)
    gen = _gen(12)
    for p, _ in ro.blocks_50():
        k = (3, 5, 5, 7)[int(p[len("layer")]) - 1]
        sd[f"{p}.eca.conv.weight"] = ro.randn(1, 1, k, gen=gen, scale=0.5)
    return sd


def simam_release() -> dict[str, torch.Tensor]:
    """resnet50(attention_module=simam): conv2 = Sequential(conv2, simam_module)."""
    return ro.resnet50_release_state(ro.SIMAM_RELEASE, seed=3)


def gct_release() -> dict[str, torch.Tensor]:
    """PyTorch/resnet.py: stem.conv1 = Sequential(GCT(3), conv), convN = Sequential(GCT,
    conv), downsample = Sequential(GCT, conv, BN); GCT has alpha, gamma, beta (1, C, 1, 1)."""
    sd = ro.resnet50_release_state(ro.GCT_RELEASE, seed=4)
    gen = _gen(14)

    def gct(name: str, c: int) -> None:
        sd[f"{name}.alpha"] = 1 + ro.randn(1, c, 1, 1, gen=gen, scale=0.2)
        sd[f"{name}.gamma"] = ro.randn(1, c, 1, 1, gen=gen, scale=0.5)
        sd[f"{name}.beta"] = ro.randn(1, c, 1, 1, gen=gen, scale=0.5)

    gct("stem.conv1.0", 3)
    inplanes = 64
    for p, planes in ro.blocks_50():
        gct(f"{p}.conv1.0", inplanes)
        gct(f"{p}.conv2.0", planes)
        gct(f"{p}.conv3.0", planes)
        if p.endswith(".0"):
            gct(f"{p}.downsample.0", inplanes)
        inplanes = planes * 4
    return sd


def fca_release() -> dict[str, torch.Tensor]:
    """fcanet50(): att = MultiSpectralAttentionLayer(planes * 4, c2wh[planes],
    c2wh[planes], 16, 'top16'): dct_layer.weight buffer (C, s, s), fc.0 Linear(C, C/16,
    no bias), fc.2 Linear(C/16, C, no bias)."""
    sd = ro.resnet50_release_state(seed=5)
    gen = _gen(15)
    filters = {}
    for p, planes in ro.blocks_50():
        c, s = planes * 4, ro.FCA_SIZES[planes]
        if c not in filters:
            filters[c] = ro.fca_dct_filter(c, s)
        sd[f"{p}.att.dct_layer.weight"] = filters[c].clone()
        sd[f"{p}.att.fc.0.weight"] = ro.randn(c // 16, c, gen=gen, scale=c ** -0.5)
        sd[f"{p}.att.fc.2.weight"] = ro.randn(c, c // 16, gen=gen, scale=(c // 16) ** -0.5)
    return sd


def gsop_release() -> dict[str, torch.Tensor]:
    """Bottleneck(attention='1', att_dim=128) on the GSoP-Net1 sites: conv_for_DR (1x1,
    bias), bn_for_DR, row_bn, row_conv_group (groups 128, kernel (128, 1), 512 outputs,
    bias), fc_adapt_channels (1x1 to C, bias)."""
    sd = ro.resnet50_release_state(seed=6)
    gen = _gen(16)
    d = 128
    for p, planes in ro.blocks_50():
        if p not in ro.GSOP_SITES:
            continue
        c = planes * 4
        sd[f"{p}.conv_for_DR.weight"] = ro.randn(d, c, 1, 1, gen=gen, scale=c ** -0.5)
        sd[f"{p}.conv_for_DR.bias"] = ro.randn(d, gen=gen, scale=0.1)
        sd.update(_bn(f"{p}.bn_for_DR", d, gen))
        sd.update(_bn(f"{p}.row_bn", d, gen))
        sd[f"{p}.row_conv_group.weight"] = ro.randn(4 * d, 1, d, 1, gen=gen, scale=d ** -0.5)
        sd[f"{p}.row_conv_group.bias"] = ro.randn(4 * d, gen=gen, scale=0.1)
        sd[f"{p}.fc_adapt_channels.weight"] = ro.randn(c, 4 * d, 1, 1, gen=gen,
                                                       scale=(4 * d) ** -0.5)
        sd[f"{p}.fc_adapt_channels.bias"] = ro.randn(c, gen=gen, scale=0.1)
    return sd


def _oracle(paper: str, sd, x, train):
    if paper == "cbam":
        return ro.resnet(sd, x, train=train, after_bn3=ro.cbam_hook(ro.CBAM_RELEASE))
    if paper == "eca":
        return ro.resnet(sd, x, train=train, after_bn3=ro.eca_hook(ro.ECA_RELEASE, (3, 5, 5, 7)))
    if paper == "simam":
        return ro.resnet(sd, x, train=train, naming=ro.SIMAM_RELEASE,
                         after_conv2=lambda _sd, _p, y, _t: ro.simam(y, 0.1))
    if paper == "gct":
        return ro.resnet(sd, x, train=train, naming=ro.GCT_RELEASE, stride_in_1x1=True,
                         before_conv=ro.gct_hook(ro.GCT_RELEASE_GCT))
    if paper == "fcanet":
        return ro.resnet(sd, x, train=train, after_bn3=ro.fca_hook(
            ro.FCA_RELEASE, lambda p, _c, _s: sd[f"{p}.att.dct_layer.weight"]))
    if paper == "gsop":
        return ro.resnet(sd, x, train=train, stage_strides=(1, 2, 2, 1),
                         after_bn3=ro.gsop_hook(ro.GSOP_RELEASE))
    raise AssertionError(paper)


RELEASES = {"cbam": cbam_release, "eca": eca_release, "simam": simam_release,
            "gct": gct_release, "fcanet": fca_release, "gsop": gsop_release}


@pytest.fixture(scope="module")
def converted():
    """paper -> (release state dict, zoo model loaded strictly from its conversion)."""
    out = {}
    for paper, make in RELEASES.items():
        sd = make()
        dp = {f"module.{k}": v for k, v in sd.items()}   # as saved from DataParallel
        model = attnzoo.create_model(official_model(paper)).double()
        model.load_state_dict(from_official(paper, dp), strict=True)
        out[paper] = sd, model
    return out


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("paper", sorted(RELEASES))
def test_converted_release_computes_the_released_network(converted, paper, train):
    sd, model = converted[paper]
    size = 48 if paper == "simam" else 32   # SimAM's variance needs res5 at 2x2
    # four images at 32x32: training-mode BN on res5's 1x1 maps is ill-conditioned with two
    x = torch.randn(2 if paper == "simam" else 4, 3, size, size, generator=_gen(7),
                    dtype=torch.float64)
    model.train(train)
    with torch.no_grad():
        ours = model(x)
    diff = (ours - _oracle(paper, sd, x, train)).abs().max().item()
    assert diff < TOL, f"{paper}: max abs difference {diff:.3g}"


def test_the_required_releases_are_covered():
    papers = {r.paper: name for name, r in OFFICIAL_RELEASES.items()}
    assert {"cbam": "resnet50_cbam", "eca": "resnet50_eca", "simam": "resnet50_simam",
            "gct": "resnet50_gct", "fcanet": "resnet50_fca"}.items() <= papers.items()
    assert official_model("resnet50_cbam") == "resnet50_cbam"


def test_eca101_release_loads_strictly():
    sd = {}
    base = {k: v for k, v in attnzoo.create_model("resnet101_eca").state_dict().items()
            if "attnzoo_after" not in k}
    sd.update(base)
    for stage, (n, k) in enumerate(zip((3, 4, 23, 3), (3, 3, 5, 7), strict=True), start=1):
        for j in range(n):
            sd[f"module.layer{stage}.{j}.eca.conv.weight"] = torch.randn(1, 1, k)
    model = attnzoo.create_model("resnet101_eca")
    model.load_state_dict(from_official("eca101", sd), strict=True)


def test_unknown_release_and_non_tensors_are_weights_errors():
    with pytest.raises(attnzoo.WeightsError, match="no official release"):
        from_official("cbma", {})
    with pytest.raises(attnzoo.WeightsError, match="not a tensor"):
        from_official("eca", {"epoch": 3})


def test_fcanet_dct_buffer_of_another_selection_is_refused():
    sd = fca_release()
    sd["layer1.0.att.dct_layer.weight"] = sd["layer1.0.att.dct_layer.weight"].flip(0)
    with pytest.raises(attnzoo.WeightsError, match="top16"):
        from_official("fcanet", sd)


def test_cbam_release_without_batch_counts_loads():
    state = from_official("cbam", cbam_release())
    assert state["layer1.0.bn1.num_batches_tracked"].item() == 0
    assert state["layer1.0.bn3.attnzoo_after.channel.fc1.weight"].dim() == 4


# --- the tool ---------------------------------------------------------------------------


def _checkpoint(tmp_path: Path, paper: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """A training checkpoint as the authors' scripts save one (float32)."""
    sd = {f"module.{k}": v.float() for k, v in RELEASES[paper]().items()}
    path = tmp_path / f"{paper}.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": sd,
                "best_acc1": torch.tensor(77.5)}, path)
    return path, sd


@pytest.mark.parametrize("paper", ["cbam", "fcanet"])
def test_tool_writes_a_folder_that_rebuilds_the_converted_model(tmp_path, paper):
    path, sd = _checkpoint(tmp_path, paper)
    out = tmp_path / "out"
    assert convert_official.main([paper, str(path), str(out), "--metric", "top1=77.5"]) == 0
    model = attnzoo.create_model(str(out)).eval()
    direct = attnzoo.create_model(official_model(paper)).eval()
    direct.load_state_dict(from_official(paper, sd), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), direct(x))
    saved = yaml.safe_load((out / "attnzoo.yaml").read_text())
    source = saved["weights"]["source"]
    assert source["paper"] == paper and source["file"] == path.name
    assert source["repo"] == f"https://github.com/{OFFICIAL_RELEASES[official_model(paper)].repo}"
    assert len(source["sha256"]) == 64 and source["tool"] == "tools/convert_official.py"
    assert model.attnzoo_weights["metrics"] == {"top1": 77.5}


def test_tool_refuses_a_pickle_that_would_run_code(tmp_path, capsys):
    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": RunsCode()}, f)
    assert convert_official.main(["cbam", str(path), str(tmp_path / "o")]) == 2
    assert "weights-only" in capsys.readouterr().err
    assert not marker.exists()


def test_tool_refuses_a_checkpoint_of_another_shape(tmp_path, capsys):
    sd = {f"module.{k}": v.float() for k, v in eca_release().items()}
    sd["module.layer1.0.eca.conv.weight"] = torch.randn(1, 1, 5)   # the paper's rule, not k3557
    path = tmp_path / "eca.pth.tar"
    torch.save({"state_dict": sd}, path)
    assert convert_official.main(["eca", str(path), str(tmp_path / "o")]) == 2
    assert "layer1.0.bn3.attnzoo_after.conv.weight" in capsys.readouterr().err


def test_tool_lists_the_releases(capsys):
    assert convert_official.main(["--list"]) == 0
    out = capsys.readouterr().out
    for paper in ("cbam", "eca", "simam", "gct", "fcanet"):
        assert paper in out
