"""Weight files from strangers: pickles are never opened, lying safetensors headers
are refused before any allocation, and every error names the file."""

from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from attnzoo import WeightsError
from attnzoo.safe_weights import check_header, load_safetensors, sha256_file


class _Payload:
    """Unpickling this touches a marker file: proof that something was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_raw(path, header: dict, data: bytes = b"") -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickle_checkpoints_are_refused_unopened(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(WeightsError, match="pickle") as err:
        load_safetensors(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_pickle_renamed_to_safetensors_is_refused(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(WeightsError, match="pickle"):
        load_safetensors(path)
    torch_zip = tmp_path / "zip.safetensors"
    torch.save({"w": torch.zeros(1)}, torch_zip)
    with pytest.raises(WeightsError, match="pickle"):
        load_safetensors(torch_zip)
    assert not marker.exists()


def test_valid_file_round_trips_and_sha_is_checked(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_file(tensors, str(path))
    loaded = load_safetensors(path, expected_sha256=sha256_file(path))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with pytest.raises(WeightsError, match="sha256 mismatch") as err:
        load_safetensors(path, expected_sha256="0" * 64)
    assert str(path) in str(err.value)


def test_truncated_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsError, match="outside") as err:
        load_safetensors(path)
    assert str(path) in str(err.value)
    path.write_bytes(data[:5])
    with pytest.raises(WeightsError, match="too short"):
        load_safetensors(path)


@pytest.mark.parametrize(("header", "data", "message"), [
    ({"a": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}, b"\0" * 8,
     "outside"),
    ({"a": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 8]}}, b"\0" * 8,
     "needs"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "bad shape"),
    ({"a": {"dtype": "OBJ", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "dtype"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "outside"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
    ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "malformed"),
    ({"a": "nope"}, b"", "malformed"),
])
def test_lying_headers(tmp_path, header, data, message):
    path = tmp_path / "lie.safetensors"
    _write_raw(path, header, data)
    with pytest.raises(WeightsError, match=message) as err:
        load_safetensors(path)
    assert str(path) in str(err.value)


def test_header_length_that_lies(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(WeightsError, match="header length"):
        check_header(path)
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    with pytest.raises(WeightsError, match="JSON"):
        check_header(path)
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(WeightsError, match="JSON object"):
        check_header(path)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_safetensors(tmp_path / "absent.safetensors")


def test_no_unpickling_eval_or_dynamic_import_in_the_package():
    banned = re.compile(r"torch\.load\(|pickle\.loads?\(|(?<![.\w])(?:eval|exec)\(|"
                        r"import_module\(|__import__\(")
    root = Path(__file__).resolve().parent.parent / "attnzoo"
    for path in root.rglob("*.py"):
        hits = banned.findall(path.read_text(encoding="utf-8"))
        assert not hits, f"{path} uses {hits}"
