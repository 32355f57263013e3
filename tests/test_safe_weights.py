"""Reading weight files that a stranger wrote (attnzoo/safe_weights.py): pickles are
never opened, lying safetensors headers are refused before any allocation, every file
is checked against its sha256, and every error names the file."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import attnzoo
from attnzoo import WeightsError, safe_weights
from attnzoo.safe_weights import check_header, load_safetensors, sha256_file
from tests._helpers.payloads import LeavesAMark, evil_pickle


def _write_raw(path, header: dict | bytes, data: bytes = b"") -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _pickles(marker: Path) -> dict[str, bytes]:
    """Every pickle-based checkpoint format, each carrying the marker payload."""
    out = {f"protocol{p}": pickle.dumps({"w": LeavesAMark(str(marker))}, protocol=p)
           for p in range(pickle.HIGHEST_PROTOCOL + 1)}
    return out


def test_the_payload_really_leaves_a_mark(tmp_path):
    # The refusals below prove something only if unpickling these files leaves a mark.
    for name, blob in _pickles(tmp_path / "m").items():
        marker = tmp_path / "m"
        pickle.loads(blob)  # noqa: S301 - on purpose, on our own payload
        assert marker.exists(), name
        marker.unlink()
    path = tmp_path / "zip.pt"
    torch.save({"w": LeavesAMark(str(tmp_path / "m"))}, path)
    torch.load(path, weights_only=False)  # noqa: S614 - on purpose, on our own payload
    assert (tmp_path / "m").exists()


def test_the_evil_pickle_really_leaves_a_mark(tmp_path: Path) -> None:
    # The refusal tests below rely on this payload doing something when unpickled.
    marker = tmp_path / "mark"
    pickle.loads(evil_pickle(marker))  # noqa: S301 - on purpose, on our own payload
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".PT"])
def test_pickle_checkpoints_are_refused_by_name_unopened(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(LeavesAMark(str(marker))))
    with pytest.raises(WeightsError, match="pickle") as err:
        load_safetensors(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def _disguised(tmp_path: Path, marker: Path) -> dict[str, Path]:
    """Pickle checkpoints of every kind, named model.safetensors."""
    files = {}
    for name, blob in _pickles(marker).items():
        files[name] = tmp_path / f"{name}.safetensors"
        files[name].write_bytes(blob)
    files["torch_zip"] = tmp_path / "torch_zip.safetensors"
    torch.save({"w": LeavesAMark(str(marker))}, files["torch_zip"])
    files["torch_legacy"] = tmp_path / "torch_legacy.safetensors"
    torch.save({"w": LeavesAMark(str(marker))}, files["torch_legacy"],
               _use_new_zipfile_serialization=False)
    return files


def test_pickles_named_safetensors_are_refused_by_content(tmp_path, monkeypatch):
    """Protocols 0-5, torch.save's zip and its legacy format, all renamed .safetensors:
    refused, and no unpickler is even called (so ``weights_only`` never comes into it)."""
    marker = tmp_path / "unpickled"
    calls = []

    def trap(name):
        def refuse(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called")
        return refuse

    monkeypatch.setattr(torch, "load", trap("torch.load"))
    monkeypatch.setattr(pickle, "load", trap("pickle.load"))
    monkeypatch.setattr(pickle, "loads", trap("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", trap("pickle.Unpickler"))
    for kind, path in _disguised(tmp_path, marker).items():
        with pytest.raises(WeightsError) as err:
            load_safetensors(path)
        assert str(path) in str(err.value), kind
        assert re.search("pickle|header length", str(err.value)), (kind, str(err.value))
    assert calls == []
    assert not marker.exists()


def test_a_pinned_pickle_in_a_saved_folder_is_refused(tmp_path):
    """A stranger's folder may record the sha256 of a hostile file: the hash matches,
    the content is still refused."""
    marker = tmp_path / "unpickled"
    folder = tmp_path / "saved"
    attnzoo.save_pretrained(attnzoo.create_model("resnet18_se", num_classes=3), folder)
    spec_file = folder / "attnzoo.yaml"
    for kind, path in _disguised(tmp_path, marker).items():
        (folder / "model.safetensors").write_bytes(path.read_bytes())
        data = yaml.safe_load(spec_file.read_text())
        data["weights"]["sha256"] = sha256_file(folder / "model.safetensors")
        spec_file.write_text(yaml.safe_dump(data))
        with pytest.raises(WeightsError, match="model.safetensors") as err:
            attnzoo.create_model(str(folder))
        assert re.search("pickle|header length", str(err.value)), kind
    assert not marker.exists()


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    folder = tmp_path / "pickles"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(evil_pickle(marker))
    with pytest.raises(WeightsError, match=r"pytorch_model\.bin.*never unpickles"):
        attnzoo.create_model(str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "last.ckpt"])
def test_spec_naming_a_pickle_file_is_refused_without_unpickling(saved: Path, tmp_path: Path,
                                                                 name: str) -> None:
    marker = tmp_path / "unpickled"
    payload = evil_pickle(marker)
    (saved / "model.safetensors").unlink()
    (saved / name).write_bytes(payload)
    spec_file = saved / "attnzoo.yaml"
    data = yaml.safe_load(spec_file.read_text())
    data["weights"] = {"file": name, "sha256": hashlib.sha256(payload).hexdigest()}
    spec_file.write_text(yaml.safe_dump(data))
    with pytest.raises(WeightsError, match="pickle"):
        attnzoo.create_model(str(saved))
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_refused_without_unpickling(saved: Path,
                                                                       tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payload = evil_pickle(marker)
    (saved / "model.safetensors").write_bytes(payload)
    spec_file = saved / "attnzoo.yaml"
    data = yaml.safe_load(spec_file.read_text())
    data["weights"]["sha256"] = hashlib.sha256(payload).hexdigest()
    spec_file.write_text(yaml.safe_dump(data))
    with pytest.raises(WeightsError, match=r"model\.safetensors.*content is a pickle"):
        attnzoo.create_model(str(saved))
    assert not marker.exists()


def test_valid_file_round_trips_and_sha_is_checked(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "empty": torch.zeros(0, 7),
               "half": torch.randn(2, dtype=torch.bfloat16)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert check_header(path).keys() == tensors.keys()
    loaded = load_safetensors(path, expected_sha256=sha256_file(path))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with pytest.raises(WeightsError, match="failed verification") as err:
        load_safetensors(path, expected_sha256="0" * 64)
    assert str(path) in str(err.value)


def test_read_verified_gives_aligned_tensors_read_once(saved) -> None:
    state = safe_weights.read_verified(saved / "model.safetensors",
                              safe_weights.sha256_file(saved / "model.safetensors"), "test")
    # Allocated like the model's own tensors: CPU kernels may round differently on
    # other alignments (an mmap of the file), and outputs must equal build-then-load's.
    assert all(t.data_ptr() % 64 == 0 for t in state.values() if t.numel())
    storages = {t.untyped_storage().data_ptr() for t in state.values() if t.numel()}
    assert len(storages) == sum(1 for t in state.values() if t.numel())


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
    path.write_bytes(data[:20])  # the header cut short
    with pytest.raises(WeightsError, match="does not fit"):
        load_safetensors(path)
    path.write_bytes(b"")
    with pytest.raises(WeightsError, match="too short"):
        load_safetensors(path)


def _entry(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


LYING_HEADERS = [
    # offsets out of range, reversed, negative, wrongly typed
    ("offsets past the end", {"a": _entry(shape=[10**12], offsets=[0, 4 * 10**12])},
     b"\0" * 8, "outside"),
    ("offsets past 2**64", {"a": _entry(shape=[2**62], offsets=[0, 2**64])}, b"\0" * 4,
     "outside"),
    ("offsets reversed", {"a": _entry(offsets=[4, 0])}, b"\0" * 4, "outside"),
    ("offset negative", {"a": _entry(offsets=[-4, 0])}, b"\0" * 4, "outside"),
    ("offsets floats", {"a": _entry(offsets=[0.0, 4.0])}, b"\0" * 4, "bad data_offsets"),
    ("three offsets", {"a": _entry(offsets=[0, 4, 8])}, b"\0" * 8, "bad data_offsets"),
    ("offsets bool", {"a": _entry(offsets=[False, 4])}, b"\0" * 4, "bad data_offsets"),
    # overlap, gaps, uncovered data
    ("overlap", {"a": _entry(shape=[2], offsets=[0, 8]), "b": _entry(shape=[2], offsets=[4, 12])},
     b"\0" * 12, "overlap"),
    ("same bytes twice", {"a": _entry(), "b": _entry()}, b"\0" * 4, "overlap"),
    ("gap before", {"a": _entry(offsets=[4, 8])}, b"\0" * 8, "belong to no tensor"),
    ("gap between", {"a": _entry(), "b": _entry(offsets=[8, 12])}, b"\0" * 12,
     "belong to no tensor"),
    ("bytes after", {"a": _entry()}, b"\0" * 8, "belong to no tensor"),
    ("data but no tensor", {}, b"\0" * 4, "belong to no tensor"),
    # dtype
    ("unknown dtype", {"a": _entry(dtype="OBJ")}, b"\0" * 4, "unknown dtype"),
    ("dtype not a string", {"a": _entry(dtype=4)}, b"\0" * 4, "unknown dtype"),
    ("dtype lower case", {"a": _entry(dtype="f32")}, b"\0" * 4, "unknown dtype"),
    # shape vs span
    ("shape bigger than span", {"a": _entry(shape=[1000000, 1000000], offsets=[0, 8])},
     b"\0" * 8, "needs"),
    ("shape smaller than span", {"a": _entry(shape=[1], offsets=[0, 8])}, b"\0" * 8, "needs"),
    ("dtype wider than span", {"a": _entry(dtype="F64", shape=[1], offsets=[0, 4])},
     b"\0" * 4, "needs"),
    ("huge shape, product overflows", {"a": _entry(shape=[2**32] * 64, offsets=[0, 4])},
     b"\0" * 4, "needs more than the whole file"),
    ("dim past int64", {"a": _entry(shape=[0, 2**64], offsets=[0, 0])}, b"", "bad shape"),
    ("dim past digit limit", b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000
     + b'],"data_offsets":[0,4]}}', b"\0" * 4, "not valid JSON"),
    ("negative dim", {"a": _entry(shape=[-1])}, b"\0" * 4, "bad shape"),
    ("float dim", {"a": _entry(shape=[1.0])}, b"\0" * 4, "bad shape"),
    ("bool dim", {"a": _entry(shape=[True])}, b"\0" * 4, "bad shape"),
    ("shape not a list", {"a": _entry(shape=4)}, b"\0" * 4, "bad shape"),
    # malformed entries
    ("entry without offsets", {"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "malformed"),
    ("entry with extra key", {"a": {**_entry(), "code": "os.system('x')"}}, b"\0" * 4,
     "malformed"),
    ("entry not an object", {"a": "nope"}, b"", "malformed"),
    # duplicate keys: json and safetensors would each silently keep one
    ("tensor given twice", b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
     b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8, "twice"),
    ("field given twice", b'{"a":{"dtype":"F32","dtype":"F64","shape":[1],'
     b'"data_offsets":[0,4]}}', b"\0" * 4, "twice"),
    ("metadata given twice", b'{"__metadata__":{"k":"a"},"__metadata__":{"k":"b"}}', b"",
     "twice"),
    # __metadata__
    ("metadata int value", {"__metadata__": {"k": 1}}, b"", "__metadata__"),
    ("metadata nested", {"__metadata__": {"k": {"x": "y"}}}, b"", "__metadata__"),
    ("metadata null", {"__metadata__": {"k": None}}, b"", "__metadata__"),
    ("metadata list", {"__metadata__": ["k"]}, b"", "__metadata__"),
    ("metadata string", {"__metadata__": "k"}, b"", "__metadata__"),
    # not UTF-8 JSON
    ("utf-16 header", '{"a": 1}'.encode("utf-16"), b"", "not UTF-8"),
    ("invalid utf-8", b'{"a\xff": 1}', b"", "not UTF-8"),
    ("utf-8 BOM", b'\xef\xbb\xbf{}', b"", "not valid JSON"),
    ("NaN", b'{"__metadata__": {"k": NaN}}', b"", "not valid JSON"),
    ("Infinity", b'{"a": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 4]}}',
     b"\0" * 4, "not valid JSON"),
    ("not JSON", b"import os; os.system('x')", b"", "not valid JSON"),
    ("empty header", b"", b"", "not valid JSON"),
    ("JSON list", b"[]", b"", "JSON object"),
    ("JSON string", b'"x"', b"", "JSON object"),
    ("deep nesting", b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"",
     "not valid JSON"),
]


@pytest.mark.parametrize(("header", "data", "message"), [c[1:] for c in LYING_HEADERS],
                         ids=[c[0] for c in LYING_HEADERS])
def test_lying_headers(tmp_path, header, data, message):
    path = tmp_path / "lie.safetensors"
    _write_raw(path, header, data)
    with pytest.raises(WeightsError, match=message) as err:
        load_safetensors(path)
    assert str(path) in str(err.value)
    assert len(str(err.value)) < 1000  # a huge lying value is not copied into the message


def test_zero_sized_tensors_with_huge_dims_allocate_nothing(tmp_path):
    path = tmp_path / "zero.safetensors"
    _write_raw(path, {"a": _entry(shape=[0, 2**62, 2**62], offsets=[0, 0]), "b": _entry()},
               b"\0" * 4)
    loaded = load_safetensors(path)
    assert loaded["a"].numel() == 0 and loaded["b"].shape == (1,)


def test_header_length_that_lies(tmp_path):
    path = tmp_path / "huge.safetensors"
    for n in (2**60, 2**62, 2**64 - 1, 10**6):
        path.write_bytes(struct.pack("<Q", n) + b"{}")
        with pytest.raises(WeightsError, match="header length"):
            check_header(path)


def test_header_over_attnzoo_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(safe_weights, "MAX_HEADER_BYTES", 64)
    path = tmp_path / "big.safetensors"
    _write_raw(path, {"__metadata__": {"k": "x" * 100}})
    with pytest.raises(WeightsError, match="over attnzoo's limit"):
        check_header(path)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_safetensors(tmp_path / "absent.safetensors")


_MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys, types

    # attnzoo.safe_weights alone, without the package's __init__ (timm, the zoo): fast.
    package = types.ModuleType("attnzoo")
    package.__path__ = [sys.argv[1]]
    sys.modules["attnzoo"] = package
    from attnzoo.errors import WeightsError
    from attnzoo.safe_weights import load_safetensors

    def vm_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1])

    # From here on, any allocation of more than 1 GiB fails outright.
    limit = (vm_kib() + 1024 * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes = {}
    for path in sys.argv[2:]:
        try:
            load_safetensors(path)
            outcomes[path] = "loaded"
        except WeightsError:
            outcomes[path] = "WeightsError"
        except BaseException as exc:
            outcomes[path] = type(exc).__name__ + ": " + str(exc)[:200]
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    try:
        bytearray(2 * 1024**3)
        limited = False
    except MemoryError:
        limited = True  # the limit is real: a huge allocation above would have failed
    print(json.dumps({"outcomes": outcomes, "grown_kib": grown, "limited": limited}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc needed")
def test_lying_sizes_never_allocate(tmp_path):
    """In a process that cannot allocate more than 1 GiB beyond what it holds, tiny
    files declaring terabytes (by shape, by offsets, by header length) are refused with
    WeightsError, and peak memory grows by less than 32 MiB."""
    files = []
    for i, (header, data) in enumerate([
        ({"a": _entry(shape=[2**40], offsets=[0, 4 * 2**40])}, b"\0" * 16),
        ({"a": _entry(shape=[2**20, 2**20], offsets=[0, 4])}, b"\0" * 4),
        ({"a": _entry(dtype="F64", shape=[2**61], offsets=[0, 2**64])}, b"\0" * 4),
        ({"a": _entry(shape=[2**32] * 64, offsets=[0, 4])}, b"\0" * 4),
        ({f"t{j}": _entry(shape=[2**40], offsets=[0, 4 * 2**40]) for j in range(100)}, b""),
    ]):
        path = tmp_path / f"lie{i}.safetensors"
        _write_raw(path, header, data)
        files.append(path)
    for n in (2**40, 2**60, 2**64 - 1):
        path = tmp_path / f"len{n}.safetensors"
        path.write_bytes(struct.pack("<Q", n) + b'{"a": 1}')
        files.append(path)
    package = Path(safe_weights.__file__).parent
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(package), *map(str, files)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["limited"]
    assert set(result["outcomes"].values()) == {"WeightsError"}, result["outcomes"]
    assert result["grown_kib"] < 32 * 1024


# ----------------------------------------------------------------- fuzzing the reader


def _valid_file() -> bytes:
    import safetensors.torch

    return safetensors.torch.save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                                   "b": torch.arange(4, dtype=torch.int64),
                                   "c": torch.zeros(0, 3)}, metadata={"format": "pt"})


_VALID = _valid_file()


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]),
                                st.integers(0, 10**6), st.integers(0, 255)),
                      min_size=1, max_size=4))
def test_mutated_files_load_correctly_or_raise_weights_error(tmp_path, edits):
    """Random byte edits of a valid file: either WeightsError, or tensors that are
    exactly what the (edited) header declares."""
    blob = bytearray(_VALID)
    for op, pos, byte in edits:
        if not blob and op != "insert":
            continue
        pos %= max(len(blob), 1)
        if op == "flip":
            blob[pos] = byte
        elif op == "insert":
            blob[pos:pos] = bytes([byte])
        elif op == "delete":
            del blob[pos]
        else:
            del blob[pos:]
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(bytes(blob))
    try:
        loaded = load_safetensors(path)
    except WeightsError as err:
        assert str(path) in str(err)
        return
    header = check_header(path)
    assert loaded.keys() == header.keys()
    for name, info in header.items():
        assert list(loaded[name].shape) == info["shape"]


dims = st.lists(st.one_of(st.integers(0, 4), st.integers(-2, 2**65), st.just(2**40)),
                max_size=3)

entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "I64", "U8", "BOOL", "F8_E4M3", "OBJ", "f32"]),
    "shape": dims,
    "data_offsets": st.lists(st.integers(-2, 64), min_size=2, max_size=2),
})

headers = st.dictionaries(st.sampled_from(["a", "b", "c", "__metadata__"]),
                          entries, max_size=3)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=headers, data_size=st.integers(0, 64))
def test_what_check_header_accepts_safetensors_loads(tmp_path, header, data_size):
    """Differential: every header attnzoo's check accepts, safetensors' own reader
    accepts too, with exactly the declared shapes (attnzoo is the stricter of the two)."""
    path = tmp_path / "random.safetensors"
    _write_raw(path, header, bytes(range(data_size)))
    try:
        declared = check_header(path)
    except WeightsError:
        return
    loaded = load_file(str(path))
    assert {k: list(v.shape) for k, v in loaded.items()} == \
        {k: v["shape"] for k, v in declared.items()}
