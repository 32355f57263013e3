"""Fast pretrained loading: parameters built on meta, the verified file's tensors assigned.

A pretrained load must give the same model as build-then-load, with no random
initialisation of weights that are overwritten anyway, no tensor left on the meta
device, buffers (non-persistent ones included) as a normal build makes them, and a
new classifier (another ``num_classes``) initialised as a normal build would.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import with_random_bn_statistics
from torch.utils._python_dispatch import TorchDispatchMode

import attnzoo
from attnzoo import loading, meta_init, safe_weights
from attnzoo.builder import build_model
from attnzoo.saved import write_safetensors

MODEL = "digits_cbam_tiny"
# A tiny CNN with FcaNet blocks: their DCT bases are non-persistent buffers (not saved).
FCA_SPEC = {
    "name": "tiny_fca", "num_classes": 10,
    "backbone": {"source": "attnzoo", "name": "tiny_cnn", "args": {"img_size": 8}},
    "insert": [{"block": {"type": "fca", "reduction": 4, "dct_size": [7, 7]},
                "at": {"path": "stages.*.*"}}],
}
_RANDOM_OPS = {"normal_", "uniform_", "bernoulli_", "random_", "exponential_",
               "cauchy_", "log_normal_", "geometric_", "randn", "rand", "randint",
               "normal", "randperm"}


def _x() -> torch.Tensor:
    return torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_x())


class _RandomOpCounter(TorchDispatchMode):
    """Counts random ops (what every weight initialiser runs) on real, non-meta tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        out = func(*args, **kwargs)
        tensors = [t for t in (*args, out) if isinstance(t, torch.Tensor)]
        if name in _RANDOM_OPS and any(not t.is_meta for t in tensors):
            self.calls.append(name)
        return out


@contextmanager
def _no_randomness_allowed() -> Iterator[_RandomOpCounter]:
    """Yields a counter of random ops; also checks the CPU generator did not move."""
    before = torch.random.get_rng_state()
    with _RandomOpCounter() as counter:
        yield counter
    assert counter.calls == [], f"random init ran during a pretrained load: {counter.calls}"
    assert torch.equal(torch.random.get_rng_state(), before), "the CPU generator moved"


@pytest.fixture
def model() -> torch.nn.Module:
    return with_random_bn_statistics(attnzoo.create_model(MODEL))


@pytest.fixture
def saved(model: torch.nn.Module, tmp_path: Path) -> Path:
    return attnzoo.save_pretrained(model, tmp_path / "saved")


@pytest.fixture
def zoo_weights(model: torch.nn.Module, tmp_path: Path, monkeypatch) -> Path:
    """A weights/ folder whose manifest serves ``model``'s state as MODEL's default."""
    folder = tmp_path / "weights"
    folder.mkdir()
    sha = write_safetensors(model.state_dict(), folder / "w.safetensors")
    (folder / f"{MODEL}.yaml").write_text(yaml.safe_dump({"model": MODEL, "default": "x", "tags": {
        "x": {"file": "w.safetensors", "sha256": sha, "num_classes": 10}}}))
    monkeypatch.setenv("ATTNZOO_WEIGHTS_DIR", str(folder))
    return folder


def _assert_loaded(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    assert meta_init.meta_tensors(loaded) == []
    assert type(loaded) is type(reference)
    state = loaded.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(state[key], value), key
    assert torch.equal(_out(loaded), _out(reference))
    assert all(p.requires_grad for p in loaded.parameters())


def test_the_detector_sees_a_normal_build_initialise() -> None:
    # The checks below rely on this: a normal build runs random init and moves the RNG.
    before = torch.random.get_rng_state()
    with _RandomOpCounter() as counter:
        build_model(attnzoo.load_spec(MODEL))
    assert counter.calls
    assert not torch.equal(torch.random.get_rng_state(), before)


def test_folder_load_initialises_nothing_and_matches_the_saved_model(model, saved) -> None:
    with _no_randomness_allowed():
        loaded = attnzoo.create_model(str(saved))
    _assert_loaded(loaded, model)


def test_zoo_pretrained_load_initialises_nothing_and_matches(model, zoo_weights) -> None:
    with _no_randomness_allowed():
        loaded = attnzoo.create_model(MODEL, pretrained=True)
    _assert_loaded(loaded, model)
    assert loaded.attnzoo_weights["tag"] == "x"


def test_loaded_parameters_are_the_file_tensors_not_copies(saved) -> None:
    from safetensors import safe_open

    loaded = attnzoo.create_model(str(saved))
    # assign=True: each parameter is a tensor read from the file, loaded once; a
    # build-then-copy would hold a second, separately allocated copy.
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    params = dict(loaded.named_parameters())
    assert set(params) <= keys
    assert all(p.is_leaf and isinstance(p, torch.nn.Parameter) for p in params.values())


def test_non_persistent_buffers_are_made_as_in_a_normal_build(tmp_path: Path) -> None:
    reference = with_random_bn_statistics(attnzoo.create_model(FCA_SPEC))
    persistent = set(reference.state_dict())
    dct = [n for n, _ in reference.named_buffers() if n not in persistent]
    assert dct and all(n.endswith("dct_filters") for n in dct)
    saved = attnzoo.save_pretrained(reference, tmp_path / "fca")
    with _no_randomness_allowed():
        loaded = attnzoo.create_model(str(saved))
    _assert_loaded(loaded, reference)
    buffers = dict(loaded.named_buffers())
    for name, value in reference.named_buffers():
        assert not buffers[name].is_meta and torch.equal(buffers[name], value), name


@pytest.mark.parametrize("source", ["folder", "zoo"])
def test_new_classifier_is_initialised_as_a_normal_build_would(model, saved, zoo_weights,
                                                               source: str) -> None:
    torch.manual_seed(123)
    with pytest.warns(UserWarning, match="classifier was not loaded"):
        if source == "folder":
            loaded = attnzoo.create_model(str(saved), num_classes=4)
        else:
            loaded = attnzoo.create_model(MODEL, pretrained=True, num_classes=4)
    after_load = torch.random.get_rng_state()
    torch.manual_seed(123)
    fresh = build_model(model.attnzoo_spec, num_classes=4)
    assert torch.equal(torch.random.get_rng_state(), after_load)
    assert meta_init.meta_tensors(loaded) == []
    head, fresh_head = loaded.get_classifier(), fresh.get_classifier()
    assert head.weight.shape == (4, 64) and head.weight.requires_grad
    assert torch.equal(head.weight, fresh_head.weight)
    assert torch.equal(head.bias, fresh_head.bias)
    assert head.weight.std() > 0  # random, not zeros or uninitialised memory
    reference = model.state_dict()
    for key, value in loaded.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, reference[key]), key
    loaded.eval()
    assert torch.equal(loaded.forward_features(_x()), model.forward_features(_x()))


def test_a_buffer_left_on_meta_is_taken_from_a_normal_build(model) -> None:
    spec = model.attnzoo_spec
    rng = torch.random.get_rng_state()
    built = build_model(spec, None, init="skip")
    assert all(p.is_meta for p in built.parameters())
    assert not any(b.is_meta for b in built.buffers())
    loading.load_checked(built, dict(model.state_dict()), "test", assign=True)
    # As if a module had made a buffer from one of its (meta) parameters.
    bn = built.get_submodule("stem.bn")
    bn._buffers["running_var"] = torch.empty(bn.running_var.shape, device="meta")
    torch.random.set_rng_state(rng)
    fixed = meta_init.fill_meta_tensors(built, build_model(spec))
    assert fixed == ["stem.bn.running_var"]
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))  # a fresh BN's
    assert meta_init.meta_tensors(built) == []


def test_assign_load_casts_to_the_model_dtype(model) -> None:
    built = build_model(model.attnzoo_spec, None, init="skip")
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    loading.load_checked(built, half, "test", assign=True)
    assert {p.dtype for p in built.parameters()} == {torch.float32}
    assert meta_init.meta_tensors(built) == []


def test_parameters_on_meta_affects_only_the_calling_thread() -> None:
    devices: dict[str, torch.device] = {}
    ready, done = threading.Event(), threading.Event()

    def other() -> None:
        ready.wait()
        devices["other"] = torch.nn.Linear(2, 2).weight.device
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with meta_init.parameters_on_meta():
        devices["here"] = torch.nn.Linear(2, 2).weight.device
        ready.set()
        done.wait(10)
    thread.join()
    assert devices == {"here": torch.device("meta"), "other": torch.device("cpu")}
    assert torch.nn.Linear(2, 2).weight.device == torch.device("cpu")


def test_read_verified_gives_aligned_tensors_read_once(saved) -> None:
    state = safe_weights.read_verified(saved / "model.safetensors",
                              safe_weights.sha256_file(saved / "model.safetensors"), "test")
    # Allocated like the model's own tensors: CPU kernels may round differently on
    # other alignments (an mmap of the file), and outputs must equal build-then-load's.
    assert all(t.data_ptr() % 64 == 0 for t in state.values() if t.numel())
    storages = {t.untyped_storage().data_ptr() for t in state.values() if t.numel()}
    assert len(storages) == sum(1 for t in state.values() if t.numel())


def test_a_bad_file_is_reported_before_a_bad_spec(saved) -> None:
    # The file is read while the model is built; when both fail, the file's error wins.
    spec_file = saved / "attnzoo.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    spec["backbone"]["args"]["widths"] = [32, 0]  # valid YAML spec, fails to build
    spec_file.write_text(yaml.safe_dump(spec))
    data = bytearray((saved / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (saved / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(attnzoo.WeightsError, match="failed verification"):
        attnzoo.create_model(str(saved))
    (saved / "model.safetensors").write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 0xFF]))
    spec["weights"]["sha256"] = safe_weights.sha256_file(saved / "model.safetensors")
    spec_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(attnzoo.SpecError, match="positive"):
        attnzoo.create_model(str(saved))
