"""tools/convert_timm.py: a timm checkpoint in, an attnzoo folder out that gives timm's
outputs and records where the weights came from."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import convert_timm
import timm
import torch
import yaml

import attnzoo
from tests._helpers.payloads import LeavesAMark
from tests._helpers.timm_twin import TIMM, ZOO, twin_input


def test_converted_folder_gives_timm_outputs(seresnet50, seresnet50_checkpoint: Path,
                                             tmp_path: Path) -> None:
    out = tmp_path / "converted"
    assert convert_timm.main([ZOO, "--checkpoint", str(seresnet50_checkpoint), "--out", str(out),
                              "--license", "apache-2.0", "--metric", "top1=12.5"]) == 0
    model = attnzoo.create_model(str(out)).eval()
    with torch.no_grad():
        ours, theirs = model(twin_input()), seresnet50(twin_input())
    assert (ours - theirs).abs().max().item() == 0.0
    source = yaml.safe_load((out / "attnzoo.yaml").read_text())["weights"]["source"]
    assert source["sha256"] == hashlib.sha256(seresnet50_checkpoint.read_bytes()).hexdigest()
    assert source["timm_model"] == TIMM and source["file"] == "model.safetensors"
    assert model.attnzoo_weights["metrics"] == {"top1": 12.5}


def test_convert_from_the_hub_records_repo_revision_and_license(seresnet50_checkpoint: Path,
                                                                 fake_hub, tmp_path: Path) -> None:
    commit = fake_hub.commit("timm/seresnet50.a1_in1k",
                             {"model.safetensors": seresnet50_checkpoint.read_bytes()})
    out = tmp_path / "from_hub"
    assert convert_timm.main([ZOO, "--repo", "timm/seresnet50.a1_in1k", "--out", str(out)]) == 0
    data = yaml.safe_load((out / "attnzoo.yaml").read_text())
    assert data["weights"]["source"]["repo"] == "timm/seresnet50.a1_in1k"
    assert data["weights"]["source"]["revision"] == commit
    assert data["license"] == timm.models.get_pretrained_cfg("seresnet50.a1_in1k").license


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "unpickled"
    bad = tmp_path / "seresnet50.pth"
    bad.write_bytes(pickle.dumps(LeavesAMark(marker)))
    assert convert_timm.main([ZOO, "--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "pickle" in capsys.readouterr().err
    assert not marker.exists()
