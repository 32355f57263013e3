"""tools/convert_timm.py and timm-format zoo manifests: timm weights in, same outputs out."""

from __future__ import annotations

import hashlib
import pickle
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from hub_server import serve_fake_hub
from safetensors.torch import save_file

import attnzoo
from attnzoo import zoo
from attnzoo.errors import WeightsError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import convert_timm  # noqa: E402

ZOO, TIMM = "resnet50_se", "seresnet50"  # the cheapest pair TIMM_EQUIVALENTS has


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    yield from serve_fake_hub(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def timm_model() -> torch.nn.Module:
    torch.manual_seed(3)
    model = timm.create_model(TIMM, pretrained=False).eval()
    with torch.no_grad():  # non-trivial BN statistics, so that a mixed-up key shows
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def checkpoint(timm_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("timm") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, str(path))
    return path


def _x() -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_converted_folder_gives_timm_outputs(timm_model, checkpoint: Path,
                                             tmp_path: Path) -> None:
    out = tmp_path / "converted"
    assert convert_timm.main([ZOO, "--checkpoint", str(checkpoint), "--out", str(out),
                              "--license", "apache-2.0", "--metric", "top1=12.5"]) == 0
    model = attnzoo.create_model(str(out)).eval()
    with torch.no_grad():
        ours, theirs = model(_x()), timm_model(_x())
    assert (ours - theirs).abs().max().item() == 0.0
    source = yaml.safe_load((out / "attnzoo.yaml").read_text())["weights"]["source"]
    assert source["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert source["timm_model"] == TIMM and source["file"] == "model.safetensors"
    assert model.attnzoo_weights["metrics"] == {"top1": 12.5}


def test_convert_from_the_hub_records_repo_revision_and_license(checkpoint: Path, fake_hub,
                                                                 tmp_path: Path) -> None:
    commit = fake_hub.commit("timm/seresnet50.a1_in1k",
                             {"model.safetensors": checkpoint.read_bytes()})
    out = tmp_path / "from_hub"
    assert convert_timm.main([ZOO, "--repo", "timm/seresnet50.a1_in1k", "--out", str(out)]) == 0
    data = yaml.safe_load((out / "attnzoo.yaml").read_text())
    assert data["weights"]["source"]["repo"] == "timm/seresnet50.a1_in1k"
    assert data["weights"]["source"]["revision"] == commit
    assert data["license"] == timm.models.get_pretrained_cfg("seresnet50.a1_in1k").license


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "unpickled"

    class LeavesAMark:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "seresnet50.pth"
    bad.write_bytes(pickle.dumps(LeavesAMark()))
    assert convert_timm.main([ZOO, "--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "pickle" in capsys.readouterr().err
    assert not marker.exists()


def test_timm_format_zoo_manifest_loads_timm_weights(timm_model, checkpoint: Path, fake_hub,
                                                     tmp_path: Path, monkeypatch) -> None:
    commit = fake_hub.commit("timm/seresnet50.a1_in1k",
                             {"model.safetensors": checkpoint.read_bytes()})
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("ATTNZOO_WEIGHTS_DIR", str(folder))
    manifest = yaml.safe_load((zoo.data_dir("weights") / f"{ZOO}.yaml").read_text())
    entry = manifest["tags"][manifest["default"]]
    assert entry["format"] == "timm" and entry["repo"] == "timm/seresnet50.a1_in1k"
    entry.update(revision=commit, sha256=hashlib.sha256(checkpoint.read_bytes()).hexdigest())
    (folder / f"{ZOO}.yaml").write_text(yaml.safe_dump(manifest))
    model = attnzoo.create_model(ZOO, pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(model(_x()), timm_model(_x()))


def test_a_wrong_pin_is_refused(checkpoint: Path, fake_hub, tmp_path: Path,
                                monkeypatch) -> None:
    commit = fake_hub.commit("timm/seresnet50.a1_in1k", {"model.safetensors": b"not it"})
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("ATTNZOO_WEIGHTS_DIR", str(folder))
    (folder / f"{ZOO}.yaml").write_text(yaml.safe_dump({"model": ZOO, "default": "a", "tags": {
        "a": {"repo": "timm/seresnet50.a1_in1k", "revision": commit, "format": "timm",
              "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}}}))
    with pytest.raises(WeightsError, match=r"model\.safetensors.*failed verification"):
        attnzoo.create_model(ZOO, pretrained=True)
