"""The embedded zoo model digits_cbam_tiny: the weights tools/train_digits.py trained,
their recorded accuracy, and the script itself. Its architecture, tiny_cnn, is tested
in tests/architectures/test_tiny.py."""

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
from tests._helpers.paths import REPO, TOOLS, WEIGHTS


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
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(TOOLS / "train_digits.py"), "--out",
                    str(tmp_path)], check=True, env=env, capture_output=True)
    ours = yaml.safe_load((tmp_path / "digits_cbam_tiny.yaml").read_text())
    shipped = yaml.safe_load((WEIGHTS / "digits_cbam_tiny.yaml").read_text())
    tag = shipped["default"]
    got, recorded = (m["tags"][tag]["metrics"]["accuracy_test"] for m in (ours, shipped))
    assert got >= 0.97 and abs(got - recorded) <= 3 / 450, (got, recorded)
