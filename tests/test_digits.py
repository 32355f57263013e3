"""The embedded zoo model digits_cbam_tiny and its architecture tiny_cnn."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import attnzoo
from attnzoo.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights"


def held_out() -> tuple[torch.Tensor, np.ndarray]:
    """The held-out split of the issue: pixel values / 16, test_size 0.25, seed 0."""
    digits = load_digits()
    x = (digits.data / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)
    _, x_test, _, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0,
                                            stratify=digits.target)
    return torch.from_numpy(x_test), y_test


@pytest.fixture(scope="module")
def pretrained() -> torch.nn.Module:
    return attnzoo.create_model("digits_cbam_tiny", pretrained=True).eval()


def test_pretrained_digits_reach_097_on_the_held_out_split(pretrained) -> None:
    x, y = held_out()
    assert len(y) == 450
    with torch.no_grad():
        predicted = pretrained(x).argmax(1).numpy()
    accuracy = float((predicted == y).mean())
    assert accuracy >= 0.97
    # The manifest records what was measured, and this is it.
    manifest = yaml.safe_load((WEIGHTS / "digits_cbam_tiny.yaml").read_text())
    recorded = manifest["tags"][manifest["default"]]["metrics"]["accuracy_test"]
    assert accuracy == pytest.approx(recorded, abs=1e-9)


def test_embedded_weights_load_offline_and_match_their_sha256(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    model = attnzoo.create_model("digits_cbam_tiny", pretrained="sklearn_digits")
    manifest = yaml.safe_load((WEIGHTS / "digits_cbam_tiny.yaml").read_text())
    entry = manifest["tags"]["sklearn_digits"]
    assert entry.get("repo") is None  # embedded: no Hub involved
    data = (WEIGHTS / entry["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert model.attnzoo_weights["tag"] == "sklearn_digits"


def test_pretrained_digits_model_is_the_spec_with_cbam_after_every_block(pretrained) -> None:
    sites = [b.site for b in pretrained.attnzoo_blocks]
    assert sites == ["stages.0.0", "stages.0.1", "stages.1.0", "stages.1.1"]
    assert {b.block_type for b in pretrained.attnzoo_blocks} == {"cbam"}
    assert pretrained.pretrained_cfg["input_size"] == (1, 8, 8)


# ------------------------------------------------------------------------------ tiny_cnn


def test_tiny_cnn_behaves_like_a_timm_classifier() -> None:
    model = attnzoo.create_model({"name": "t", "backbone": {
        "source": "attnzoo", "name": "tiny_cnn", "args": {"widths": [8, 16, 24],
                                                           "depths": [1, 2, 1]}}}).eval()
    x = torch.rand(2, 1, 8, 8)
    feats = model.forward_features(x)
    assert feats.shape == (2, 24, 2, 2)  # 8 -> 4 -> 2: every stage after the first halves
    assert model.num_features == 24
    pooled = model.forward_head(feats, pre_logits=True)
    assert torch.allclose(pooled, feats.mean((2, 3)))
    assert torch.equal(model.forward_head(feats), model.get_classifier()(pooled))
    assert torch.equal(model(x), model.forward_head(feats))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 24)
    cfg = model.pretrained_cfg
    assert cfg["first_conv"] == "stem.conv" and cfg["classifier"] == "fc"
    assert model.get_submodule(cfg["first_conv"]).in_channels == 1


def test_tiny_cnn_stage_filters_select_its_blocks() -> None:
    spec = {"name": "t", "backbone": {"source": "attnzoo", "name": "tiny_cnn",
                                      "args": {"in_chans": 3, "img_size": 16}},
            "insert": [{"block": {"type": "se", "reduction": 4},
                        "at": {"path": "stages.*.*"}, "stages": [1], "blocks": [1]}]}
    model = attnzoo.create_model(spec)
    assert [(b.site, b.channels, b.size) for b in model.attnzoo_blocks] == [
        ("stages.1.1", 64, (8, 8))]
    assert model(torch.rand(1, 3, 16, 16)).shape == (1, 10)


@pytest.mark.parametrize("args, problem", [
    ({"widths": [8, 16], "depths": [1]}, "same length"),
    ({"widths": [8, 0], "depths": [1, 1]}, "positive"),
])
def test_tiny_cnn_bad_args_are_spec_errors(args: dict, problem: str) -> None:
    spec = {"name": "t", "backbone": {"source": "attnzoo", "name": "tiny_cnn", "args": args}}
    with pytest.raises(SpecError, match=problem):
        attnzoo.create_model(spec)


def test_digits_model_exports(pretrained) -> None:
    x, _ = held_out()
    exported = torch.export.export(pretrained, (x[:2],))
    assert torch.allclose(exported.module()(x[:2]), pretrained(x[:2]), atol=1e-6)


@pytest.mark.slow
def test_training_script_reproduces_the_recorded_accuracy(tmp_path: Path) -> None:
    # Reruns do not agree to the bit: CPU kernels round differently with the memory
    # alignment of their inputs and with the torch build, and 30 epochs amplify that
    # (seen: 448/450 and 446/450 from the same script). The recipe must still land
    # within a few held-out images of the recorded accuracy.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "tools" / "train_digits.py"), "--out",
                    str(tmp_path)], check=True, env=env, capture_output=True)
    ours = yaml.safe_load((tmp_path / "digits_cbam_tiny.yaml").read_text())
    shipped = yaml.safe_load((WEIGHTS / "digits_cbam_tiny.yaml").read_text())
    tag = shipped["default"]
    got, recorded = (m["tags"][tag]["metrics"]["accuracy_test"] for m in (ours, shipped))
    assert got >= 0.97 and abs(got - recorded) <= 3 / 450, (got, recorded)
