"""Warm loads skip the hash of a file this machine verified, and only while it is unchanged."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

import attnzoo
from attnzoo import WeightsError, safe_weights


def _hashes(monkeypatch) -> list[int]:
    """Count the sha256 objects that the weights reader creates."""
    calls: list[int] = []
    real = hashlib.sha256

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(safe_weights.hashlib, "sha256", counting)
    return calls


@pytest.fixture
def saved(tmp_path):
    model = attnzoo.create_model("digits_cbam_tiny")
    return model, attnzoo.save_pretrained(model, tmp_path / "m")


def test_the_second_load_of_an_unchanged_file_is_not_hashed(saved, monkeypatch) -> None:
    model, folder = saved
    calls = _hashes(monkeypatch)
    attnzoo.create_model(folder)
    first = len(calls)
    assert first >= 1
    again = attnzoo.create_model(folder)
    assert len(calls) == first  # verified before, unchanged: read without hashing
    for key, value in again.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_a_file_changed_in_place_is_hashed_again_and_refused(saved) -> None:
    _, folder = saved
    attnzoo.create_model(folder)
    weights = folder / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size; mtime put back below, but ctime moves on
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(WeightsError, match="failed verification"):
        attnzoo.create_model(folder)
