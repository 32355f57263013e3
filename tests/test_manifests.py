"""Zoo weight manifests (attnzoo/manifests.py): ``weights/<model>.yaml`` lists the tags of a
zoo model's weights, each a file on the Hub (a loopback fake here) at a pinned revision,
or embedded, with its sha256; timm-format entries hold timm's own checkpoint."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import attnzoo
from attnzoo import manifests, zoo
from attnzoo.errors import WeightsError
from attnzoo.saved import write_safetensors
from attnzoo.zoo import data_dir
from tests._helpers.digits import MODEL, outputs, write_manifest
from tests._helpers.hub_server import go_offline
from tests._helpers.timm_twin import ZOO, twin_input


def test_zoo_weights_from_the_hub_by_tag_then_offline(model, fake_hub, weights_folder,
                                                      tmp_path, monkeypatch) -> None:
    other = attnzoo.create_model(MODEL).eval()
    sha_a = write_safetensors(model.state_dict(), tmp_path / "a.safetensors")
    sha_b = write_safetensors(other.state_dict(), tmp_path / "b.safetensors")
    commit = fake_hub.commit("attnzoo/digits", {
        "a.safetensors": (tmp_path / "a.safetensors").read_bytes(),
        "b.safetensors": (tmp_path / "b.safetensors").read_bytes()})
    entry = {"repo": "attnzoo/digits", "revision": commit, "num_classes": 10,
             "metrics": {"accuracy_test": 0.25}}
    write_manifest(weights_folder, default="first", tags={
        "first": {**entry, "file": "a.safetensors", "sha256": sha_a},
        "second": {**entry, "file": "b.safetensors", "sha256": sha_b}})
    assert manifests.list_pretrained() == [f"{MODEL}.first", f"{MODEL}.second"]

    assert torch.equal(outputs(attnzoo.create_model(MODEL, pretrained=True)), outputs(model))
    for tag in ("second", f"{MODEL}.second"):
        loaded = attnzoo.create_model(MODEL, pretrained=tag)
        assert torch.equal(outputs(loaded), outputs(other))
    assert loaded.attnzoo_weights["tag"] == "second"
    with pytest.raises(WeightsError, match="no weights tag 'secnd'.*did you mean 'second'"):
        attnzoo.create_model(MODEL, pretrained="secnd")
    with pytest.raises(WeightsError, match="for model 'resnet50_se'"):
        attnzoo.create_model(MODEL, pretrained="resnet50_se.in1k")

    fake_hub.stop()
    go_offline(monkeypatch)
    assert torch.equal(outputs(attnzoo.create_model(MODEL, pretrained=True)), outputs(model))


def test_unpinned_zoo_weights_are_refused_when_pinned_only(fake_hub, weights_folder) -> None:
    fake_hub.commit("attnzoo/digits", {"model.safetensors": b"whatever"})
    write_manifest(weights_folder, default="x", tags={"x": {"repo": "attnzoo/digits"}})
    with pytest.raises(WeightsError, match=r"not pinned.*pinned files only"):
        attnzoo.create_model(MODEL, pretrained=True, require_pinned=True)
    assert fake_hub.requests == []


@pytest.mark.parametrize("entry, problem", [
    ({"file": "model.bin", "sha256": "0" * 64}, "pickle"),
    ({"file": "../model.safetensors", "sha256": "0" * 64}, "relative path"),
    ({"repo": "a/b", "revision": "main", "sha256": "0" * 64}, "40-hex"),
    ({"sha256": "ABC"}, "64 lowercase hex"),
])
def test_bad_manifest_entries_are_refused(weights_folder, entry: dict, problem: str) -> None:
    write_manifest(weights_folder, default="x", tags={"x": entry})
    with pytest.raises(WeightsError, match=problem):
        attnzoo.create_model(MODEL, pretrained=True)


def test_model_without_weights_says_which_have_them(weights_folder) -> None:
    shutil.copy(data_dir("weights") / f"{MODEL}.yaml", weights_folder)
    with pytest.raises(WeightsError, match=f"no pretrained weights.*{MODEL}"):
        attnzoo.create_model("resnet18_se", pretrained=True)


def test_shipped_manifests_are_valid_and_unpinned_ones_need_the_hub_once() -> None:
    paths = sorted(data_dir("weights").glob("*.yaml"))
    assert paths
    zoo = set(attnzoo.list_models())
    for path in paths:
        manifest = manifests.load_manifest(path.stem)
        assert manifest is not None and manifest.model == path.stem
        for tag, entry in manifest.tags.items():
            assert entry.license, f"{path.name}: {tag} has no license"
            if not entry.pinned and manifest.model in zoo:
                with pytest.raises(WeightsError, match="not been loaded on this machine "
                                                       "before.*load it once online"):
                    attnzoo.create_model(manifest.model, pretrained=tag)


# --- timm-format entries: timm's checkpoint, converted on load --------------------------


def test_timm_format_zoo_manifest_loads_timm_weights(seresnet50, seresnet50_checkpoint: Path,
                                                     fake_hub, weights_folder: Path) -> None:
    commit = fake_hub.commit("timm/seresnet50.a1_in1k",
                             {"model.safetensors": seresnet50_checkpoint.read_bytes()})
    folder = weights_folder
    manifest = yaml.safe_load((zoo.data_dir("weights") / f"{ZOO}.yaml").read_text())
    entry = manifest["tags"][manifest["default"]]
    assert entry["format"] == "timm" and entry["repo"] == "timm/seresnet50.a1_in1k"
    entry.update(revision=commit,
                 sha256=hashlib.sha256(seresnet50_checkpoint.read_bytes()).hexdigest())
    (folder / f"{ZOO}.yaml").write_text(yaml.safe_dump(manifest))
    model = attnzoo.create_model(ZOO, pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(model(twin_input()), seresnet50(twin_input()))


def test_a_wrong_pin_is_refused(seresnet50_checkpoint: Path, fake_hub,
                                weights_folder: Path) -> None:
    commit = fake_hub.commit("timm/seresnet50.a1_in1k", {"model.safetensors": b"not it"})
    write_manifest(weights_folder, model=ZOO, default="a", tags={
        "a": {"repo": "timm/seresnet50.a1_in1k", "revision": commit, "format": "timm",
              "sha256": hashlib.sha256(seresnet50_checkpoint.read_bytes()).hexdigest()}})
    with pytest.raises(WeightsError, match=r"model\.safetensors.*failed verification"):
        attnzoo.create_model(ZOO, pretrained=True)
