"""``create_model``: what its argument names, and what ``pretrained`` and ``revision`` do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attnzoo
from attnzoo import SpecError, WeightsError
from attnzoo.pretrained import load_zoo_weights
from attnzoo.saved import write_safetensors
from tests._helpers.digits import digits_input, outputs, write_manifest

MODEL = "digits_cbam_tiny"


def _x() -> torch.Tensor:
    return torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def folder_named_like_a_zoo_model(tmp_path: Path, monkeypatch) -> Path:
    torch.manual_seed(3)
    other = attnzoo.create_model(MODEL, num_classes=4)  # not the zoo model's 10 classes
    attnzoo.save_pretrained(other, tmp_path / MODEL)
    monkeypatch.chdir(tmp_path)
    return tmp_path / MODEL


def test_zoo_names_win_over_a_folder_of_the_same_name(folder_named_like_a_zoo_model) -> None:
    assert attnzoo.create_model(MODEL).num_classes == 10  # the zoo model
    for path in (f"./{MODEL}", Path(MODEL), str(folder_named_like_a_zoo_model)):
        loaded = attnzoo.create_model(path)  # a path: the folder
        assert loaded.num_classes == 4 and "loaded_from" in loaded.attnzoo_weights


def test_a_bare_folder_name_that_is_not_a_zoo_name_says_how_to_load_it(tmp_path, monkeypatch):
    attnzoo.save_pretrained(attnzoo.create_model(MODEL), tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=r"unknown model 'mine'.*pass './mine'"):
        attnzoo.create_model("mine")
    assert attnzoo.create_model("./mine").num_classes == 10


def test_pretrained_defaults_to_the_folders_weights_and_false_builds_random(tmp_path) -> None:
    torch.manual_seed(0)
    model = attnzoo.create_model(MODEL).eval()
    saved = attnzoo.save_pretrained(model, tmp_path / "saved")
    with torch.no_grad():
        expected = model(_x())
        for pretrained in (None, True):
            loaded = attnzoo.create_model(saved, pretrained=pretrained).eval()
            assert torch.equal(loaded(_x()), expected)
        torch.manual_seed(1)
        random = attnzoo.create_model(saved, pretrained=False).eval()
        assert not hasattr(random, "attnzoo_weights")
        assert random.attnzoo_spec == model.attnzoo_spec
        assert not torch.equal(random(_x()), expected)
    with pytest.raises(WeightsError, match="one set of weights"):
        attnzoo.create_model(saved, pretrained="in1k")


def test_a_zoo_name_is_random_by_default_and_pretrained_loads_its_weights() -> None:
    assert not hasattr(attnzoo.create_model(MODEL), "attnzoo_weights")
    assert attnzoo.create_model(MODEL, pretrained=True).attnzoo_weights["tag"]


@pytest.mark.parametrize("source", [MODEL, "folder"])
def test_revision_is_only_for_hub_sources(source: str, tmp_path: Path) -> None:
    if source == "folder":
        source = str(attnzoo.save_pretrained(attnzoo.create_model(MODEL), tmp_path / "f"))
    with pytest.raises(WeightsError, match=r"revision='v1' is for 'hf-hub:' sources"):
        attnzoo.create_model(source, revision="v1")


# --- zoo weights: a failed load changes nothing; another head -------------------------


def test_failed_zoo_load_leaves_the_model_untouched(model, weights_folder, tmp_path) -> None:
    donor = attnzoo.create_model(MODEL)
    sha = write_safetensors(donor.state_dict(), weights_folder / "w.safetensors")
    write_manifest(weights_folder, default="x", tags={"x": {"file": "w.safetensors",
                                                             "sha256": "0" * 64}})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match=r"w\.safetensors.*failed verification"):
        load_zoo_weights(model, model.attnzoo_spec, True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # With the right sha256 the same embedded file loads.
    write_manifest(weights_folder, default="x", tags={"x": {"file": "w.safetensors",
                                                             "sha256": sha}})
    load_zoo_weights(model, model.attnzoo_spec, True)
    assert torch.equal(outputs(model), outputs(donor.eval()))


def test_zoo_weights_with_another_num_classes_keep_all_but_the_classifier(
        model, weights_folder) -> None:
    sha = write_safetensors(model.state_dict(), weights_folder / "w.safetensors")
    write_manifest(weights_folder, default="x", tags={"x": {
        "file": "w.safetensors", "sha256": sha, "num_classes": 10}})
    with pytest.warns(UserWarning, match="classifier was not loaded"):
        loaded = attnzoo.create_model(MODEL, pretrained=True, num_classes=4).eval()
    assert loaded.get_classifier().out_features == 4
    assert torch.equal(loaded.forward_features(digits_input()),
                       model.forward_features(digits_input()))

