"""Putting verified tensors into a model (attnzoo/loading.py): parameters built on meta,
the verified file's tensors assigned.

A pretrained load must give the same model as build-then-load, with no random
initialisation of weights that are overwritten anyway, no tensor left on the meta
device, buffers (non-persistent ones included) as a normal build makes them, and a
new classifier (another ``num_classes``) initialised as a normal build would.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

import attnzoo
from attnzoo import loading, meta_init, safe_weights
from attnzoo.builder import build_model
from attnzoo.saved import write_safetensors
from tests._helpers.digits import MODEL, digits_input, outputs, write_manifest
from tests._helpers.modules import with_random_bn_statistics

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
def zoo_weights(model: torch.nn.Module, weights_folder: Path) -> Path:
    """A weights/ folder whose manifest serves ``model``'s state as MODEL's default."""
    sha = write_safetensors(model.state_dict(), weights_folder / "w.safetensors")
    write_manifest(weights_folder, default="x", tags={
        "x": {"file": "w.safetensors", "sha256": sha, "num_classes": 10}})
    return weights_folder


def _assert_loaded(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    assert meta_init.meta_tensors(loaded) == []
    assert type(loaded) is type(reference)
    state = loaded.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(state[key], value), key
    assert torch.equal(outputs(loaded), outputs(reference))
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
    assert torch.equal(loaded.forward_features(digits_input()),
                       model.forward_features(digits_input()))


def test_assign_load_casts_to_the_model_dtype(model) -> None:
    built = build_model(model.attnzoo_spec, None, init="skip")
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    loading.load_checked(built, half, "test", assign=True)
    assert {p.dtype for p in built.parameters()} == {torch.float32}
    assert meta_init.meta_tensors(built) == []


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
