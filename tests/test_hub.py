"""Saving, sharing and loading weights: folders, the Hub (a loopback fake), zoo manifests.

Every test is offline: ``fake_hub`` (tests/hub_server.py) plays the Hub on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import go_offline, serve_fake_hub, with_random_bn_statistics
from huggingface_hub import ModelCard
from safetensors import safe_open

import attnzoo
from attnzoo import hub, manifests, pretrained
from attnzoo.errors import WeightsError
from attnzoo.saved import write_safetensors
from attnzoo.zoo import data_dir

MODEL = "digits_cbam_tiny"  # small and fast: a tiny CNN with 4 CBAM blocks


def _x() -> torch.Tensor:
    return torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_x())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    yield from serve_fake_hub(monkeypatch, tmp_path)


@pytest.fixture
def model() -> torch.nn.Module:
    """A randomly initialised zoo model with non-trivial BN statistics."""
    return with_random_bn_statistics(attnzoo.create_model(MODEL))


@pytest.fixture
def saved(model: torch.nn.Module, tmp_path: Path) -> Path:
    return attnzoo.save_pretrained(model, tmp_path / "saved", metrics={"accuracy": 0.5},
                                   source={"trained_by": "a test"})


class _LeavesAMark:
    """Unpickling this creates the file ``path``: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": _LeavesAMark(marker)})


def test_the_evil_pickle_really_leaves_a_mark(tmp_path: Path) -> None:
    # The refusal tests below rely on this payload doing something when unpickled.
    marker = tmp_path / "mark"
    pickle.loads(_evil_pickle(marker))  # noqa: S301 - on purpose, on our own payload
    assert marker.exists()


# --------------------------------------------------------------------- save_pretrained


def test_save_pretrained_writes_spec_weights_and_card(model, saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "attnzoo.yaml",
                                                       "model.safetensors"]
    data = yaml.safe_load((saved / "attnzoo.yaml").read_text())
    weights = data.pop("weights")
    assert weights["file"] == "model.safetensors"
    assert weights["sha256"] == _sha256(saved / "model.safetensors")
    assert weights["source"] == {"trained_by": "a test"}
    assert weights["metrics"] == {"accuracy": 0.5}
    assert attnzoo.ModelSpec.from_dict(data) == model.attnzoo_spec
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(model.state_dict())
    assert meta["attnzoo_model"] == MODEL
    assert meta["attnzoo_version"] == attnzoo.__version__
    card = ModelCard.load(saved / "README.md")
    assert card.data.library_name == "attnzoo"
    assert card.data.license == "apache-2.0"
    assert {"attnzoo", "cbam"} <= set(card.data.tags)
    assert weights["sha256"] in card.text and "a test" in card.text


def test_save_pretrained_refuses_a_model_not_built_by_attnzoo(tmp_path: Path) -> None:
    with pytest.raises(attnzoo.AttnZooError, match="attnzoo_spec"):
        attnzoo.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")


# ----------------------------------------------------------------------------- folders


def test_folder_round_trip_gives_identical_outputs(model, saved: Path) -> None:
    loaded = attnzoo.create_model(str(saved))
    assert type(loaded) is type(model)
    assert torch.equal(_outputs(loaded), _outputs(model))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.attnzoo_weights["metrics"] == {"accuracy": 0.5}


def test_save_records_a_replaced_classifier(model, tmp_path: Path) -> None:
    model.reset_classifier(3)
    saved = attnzoo.save_pretrained(model, tmp_path / "three")
    loaded = attnzoo.create_model(str(saved))
    assert loaded.num_classes == 3
    assert torch.equal(_outputs(loaded), _outputs(model))


def test_other_num_classes_loads_everything_but_the_classifier(model, saved: Path) -> None:
    with pytest.warns(UserWarning, match="classifier was not loaded.*fc.weight"):
        loaded = attnzoo.create_model(str(saved), num_classes=5).eval()
    assert loaded.get_classifier().weight.shape == (5, 64)
    reference = model.state_dict()
    for key, value in loaded.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, reference[key]), key
    feats = loaded.forward_head(loaded.forward_features(_x()), pre_logits=True)
    assert torch.equal(feats, model.forward_head(model.forward_features(_x()), pre_logits=True))


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate"])
def test_damaged_weights_in_a_folder_raise_naming_the_file(saved: Path, damage: str) -> None:
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip_a_byte":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) - 100]
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"model\.safetensors.*sha256"):
        attnzoo.create_model(str(saved))


def test_shape_mismatch_names_the_offending_keys(saved: Path) -> None:
    spec_file = saved / "attnzoo.yaml"
    text = spec_file.read_text()
    assert "reduction: 8.0" in text
    spec_file.write_text(text.replace("reduction: 8.0", "reduction: 4.0"))
    with pytest.raises(WeightsError, match="shape mismatch") as info:
        attnzoo.create_model(str(saved))
    message = str(info.value)
    assert ("stages.0.0.attnzoo_after.channel.fc1.weight (file (4, 32, 1, 1), "
            "model (8, 32, 1, 1))") in message
    assert "model.safetensors" in message


def test_missing_blocks_are_named_as_unexpected_keys(saved: Path) -> None:
    spec_file = saved / "attnzoo.yaml"
    data = yaml.safe_load(spec_file.read_text())
    data.pop("insert")
    spec_file.write_text(yaml.safe_dump(data))
    with pytest.raises(WeightsError, match=r"not in the model: stages\.0\.0\.attnzoo_after\."):
        attnzoo.create_model(str(saved))


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    folder = tmp_path / "pickles"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(_evil_pickle(marker))
    with pytest.raises(WeightsError, match=r"pytorch_model\.bin.*never unpickles"):
        attnzoo.create_model(str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "last.ckpt"])
def test_spec_naming_a_pickle_file_is_refused_without_unpickling(saved: Path, tmp_path: Path,
                                                                 name: str) -> None:
    marker = tmp_path / "unpickled"
    payload = _evil_pickle(marker)
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
    payload = _evil_pickle(marker)
    (saved / "model.safetensors").write_bytes(payload)
    spec_file = saved / "attnzoo.yaml"
    data = yaml.safe_load(spec_file.read_text())
    data["weights"]["sha256"] = hashlib.sha256(payload).hexdigest()
    spec_file.write_text(yaml.safe_dump(data))
    with pytest.raises(WeightsError, match=r"model\.safetensors.*content is a pickle"):
        attnzoo.create_model(str(saved))
    assert not marker.exists()


# ------------------------------------------------------------------------------- Hub


def test_hub_round_trip_then_offline(model, saved: Path, fake_hub, monkeypatch) -> None:
    commit = fake_hub.commit_folder("org/digits", saved)
    loaded = attnzoo.create_model("hf-hub:org/digits")
    assert torch.equal(_outputs(loaded), _outputs(model))
    # The weights come from the very commit the spec was read from.
    assert fake_hub.fetched("model.safetensors") == [
        f"/org/digits/resolve/{commit}/model.safetensors"]
    assert loaded.attnzoo_weights["loaded_from"] == {"repo": "org/digits", "revision": commit}

    fake_hub.stop()
    go_offline(monkeypatch)
    again = attnzoo.create_model("hf-hub:org/digits")
    assert torch.equal(_outputs(again), _outputs(model))


def test_hub_revision_by_at_or_keyword(model, saved: Path, fake_hub, tmp_path: Path) -> None:
    first = fake_hub.commit_folder("org/digits", saved)
    newer = attnzoo.create_model(MODEL)
    fake_hub.commit_folder("org/digits", attnzoo.save_pretrained(newer, tmp_path / "v2"))
    expected_old, expected_new = _outputs(model), _outputs(newer)
    assert not torch.equal(expected_old, expected_new)
    assert torch.equal(_outputs(attnzoo.create_model("hf-hub:org/digits")), expected_new)
    assert torch.equal(_outputs(attnzoo.create_model(f"hf-hub:org/digits@{first}")),
                       expected_old)
    assert torch.equal(_outputs(attnzoo.create_model("hf-hub:org/digits", revision=first)),
                       expected_old)
    with pytest.raises(WeightsError, match="revision given twice"):
        attnzoo.create_model(f"hf-hub:org/digits@{first}", revision="main")


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate"])
def test_damaged_weights_on_the_hub_raise_naming_the_file(saved: Path, fake_hub,
                                                          damage: str) -> None:
    files = {p.name: p.read_bytes() for p in saved.iterdir()}
    data = bytearray(files["model.safetensors"])
    if damage == "flip_a_byte":
        data[100] ^= 0x01
    else:
        data = data[:1000]
    files["model.safetensors"] = bytes(data)
    fake_hub.commit("org/damaged", files)
    with pytest.raises(WeightsError, match=r"model\.safetensors.*failed verification"):
        attnzoo.create_model("hf-hub:org/damaged")


def test_hub_repo_naming_a_pickle_is_refused_and_never_downloads_it(saved: Path, fake_hub,
                                                                    tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payload = _evil_pickle(marker)
    data = yaml.safe_load((saved / "attnzoo.yaml").read_text())
    data["weights"] = {"file": "pytorch_model.bin", "sha256": hashlib.sha256(payload).hexdigest()}
    fake_hub.commit("org/pickled", {"attnzoo.yaml": yaml.safe_dump(data).encode(),
                                    "pytorch_model.bin": payload})
    with pytest.raises(WeightsError, match="pickle"):
        attnzoo.create_model("hf-hub:org/pickled")
    fake_hub.commit("org/only-pickle", {"pytorch_model.bin": payload})
    with pytest.raises(WeightsError, match=r"attnzoo\.yaml"):
        attnzoo.create_model("hf-hub:org/only-pickle")
    assert fake_hub.fetched(".bin") == []
    assert not marker.exists()


def test_unknown_hub_repo_is_a_weights_error(fake_hub) -> None:
    with pytest.raises(WeightsError, match="org/nothing"):
        attnzoo.create_model("hf-hub:org/nothing")


# ------------------------------------------------------------------------ zoo manifests


@pytest.fixture
def weights_folder(tmp_path: Path, monkeypatch) -> Path:
    """An empty weights/ folder that the zoo manifests are read from."""
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("ATTNZOO_WEIGHTS_DIR", str(folder))
    return folder


def _write_manifest(folder: Path, tags: dict, default: str) -> None:
    (folder / f"{MODEL}.yaml").write_text(
        yaml.safe_dump({"model": MODEL, "default": default, "tags": tags}))


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
    _write_manifest(weights_folder, default="first", tags={
        "first": {**entry, "file": "a.safetensors", "sha256": sha_a},
        "second": {**entry, "file": "b.safetensors", "sha256": sha_b}})
    assert manifests.list_pretrained() == [f"{MODEL}.first", f"{MODEL}.second"]

    assert torch.equal(_outputs(attnzoo.create_model(MODEL, pretrained=True)), _outputs(model))
    for tag in ("second", f"{MODEL}.second"):
        loaded = attnzoo.create_model(MODEL, pretrained=tag)
        assert torch.equal(_outputs(loaded), _outputs(other))
    assert loaded.attnzoo_weights["tag"] == "second"
    with pytest.raises(WeightsError, match="no weights tag 'secnd'.*did you mean 'second'"):
        attnzoo.create_model(MODEL, pretrained="secnd")
    with pytest.raises(WeightsError, match="for model 'resnet50_se'"):
        attnzoo.create_model(MODEL, pretrained="resnet50_se.in1k")

    fake_hub.stop()
    go_offline(monkeypatch)
    assert torch.equal(_outputs(attnzoo.create_model(MODEL, pretrained=True)), _outputs(model))


def test_unpinned_zoo_weights_are_refused_when_pinned_only(fake_hub, weights_folder) -> None:
    fake_hub.commit("attnzoo/digits", {"model.safetensors": b"whatever"})
    _write_manifest(weights_folder, default="x", tags={"x": {"repo": "attnzoo/digits"}})
    with pytest.raises(WeightsError, match=r"not pinned.*pinned files only"):
        attnzoo.create_model(MODEL, pretrained=True, require_pinned=True)
    assert fake_hub.requests == []


def test_failed_zoo_load_leaves_the_model_untouched(model, weights_folder, tmp_path) -> None:
    donor = attnzoo.create_model(MODEL)
    sha = write_safetensors(donor.state_dict(), weights_folder / "w.safetensors")
    _write_manifest(weights_folder, default="x", tags={"x": {"file": "w.safetensors",
                                                             "sha256": "0" * 64}})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match=r"w\.safetensors.*failed verification"):
        pretrained.load_zoo_weights(model, model.attnzoo_spec, True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # With the right sha256 the same embedded file loads.
    _write_manifest(weights_folder, default="x", tags={"x": {"file": "w.safetensors",
                                                             "sha256": sha}})
    pretrained.load_zoo_weights(model, model.attnzoo_spec, True)
    assert torch.equal(_outputs(model), _outputs(donor.eval()))


@pytest.mark.parametrize("entry, problem", [
    ({"file": "model.bin", "sha256": "0" * 64}, "pickle"),
    ({"file": "../model.safetensors", "sha256": "0" * 64}, "relative path"),
    ({"repo": "a/b", "revision": "main", "sha256": "0" * 64}, "40-hex"),
    ({"sha256": "ABC"}, "64 lowercase hex"),
])
def test_bad_manifest_entries_are_refused(weights_folder, entry: dict, problem: str) -> None:
    _write_manifest(weights_folder, default="x", tags={"x": entry})
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


# ------------------------------------------------------------------------------ push


class _RecordingApi:
    """Stands in for HfApi: records calls and what upload_folder would upload."""

    calls: list[tuple[str, dict]] = []
    uploaded: dict[str, bytes] = {}

    def __init__(self, **kwargs) -> None:
        self.calls.append(("init", kwargs))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", {"repo_id": repo_id, **kwargs}))
        type(self).uploaded = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}

        class Info:
            commit_url = f"https://hub.example/{repo_id}/commit/0123"
        return Info()


def test_push_to_hub_uploads_a_loadable_folder(model, fake_hub, monkeypatch) -> None:
    monkeypatch.setattr(_RecordingApi, "calls", [])
    monkeypatch.setattr(hub, "HfApi", _RecordingApi)
    url = attnzoo.push_to_hub(model, "me/digits", revision="dev", private=True)
    assert url == "https://hub.example/me/digits/commit/0123"
    names = [c[0] for c in _RecordingApi.calls]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    assert _RecordingApi.calls[1][1]["private"] is True
    assert _RecordingApi.calls[3][1]["revision"] == "dev"
    files = _RecordingApi.uploaded
    assert sorted(files) == ["README.md", "attnzoo.yaml", "model.safetensors"]
    assert b'create_model("hf-hub:me/digits")' in files["README.md"]
    fake_hub.commit("me/digits", files)
    assert torch.equal(_outputs(attnzoo.create_model("hf-hub:me/digits")), _outputs(model))


def test_cli_push_of_a_saved_folder_keeps_its_provenance(saved: Path, monkeypatch,
                                                         capsys) -> None:
    from attnzoo.cli import main

    monkeypatch.setattr(_RecordingApi, "calls", [])
    monkeypatch.setattr(hub, "HfApi", _RecordingApi)
    assert main(["push", str(saved), "me/digits"]) == 0
    assert "me/digits/commit" in capsys.readouterr().out
    pushed = yaml.safe_load(_RecordingApi.uploaded["attnzoo.yaml"])
    assert pushed["weights"]["source"] == {"trained_by": "a test"}
    assert pushed["weights"]["metrics"] == {"accuracy": 0.5}


# ------------------------------------------------------------------------- pin_weights


def test_pin_weights_fills_revision_and_sha256_then_the_entry_loads(
        model, fake_hub, weights_folder, tmp_path, monkeypatch) -> None:
    import sys
    from types import SimpleNamespace

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import pin_weights

    sha = write_safetensors(model.state_dict(), tmp_path / "w.safetensors")
    commit = fake_hub.commit("attnzoo/digits",
                             {"model.safetensors": (tmp_path / "w.safetensors").read_bytes()})

    class FakeApi:  # what HfApi.model_info(files_metadata=True) tells about the repo
        def model_info(self, repo, revision, files_metadata):
            assert (repo, revision, files_metadata) == ("attnzoo/digits", "main", True)
            lfs = SimpleNamespace(sha256=sha)
            return SimpleNamespace(sha=commit, siblings=[
                SimpleNamespace(rfilename="model.safetensors", lfs=lfs)])

    manifest = weights_folder / f"{MODEL}.yaml"
    manifest.write_text("# keep me\n" + yaml.safe_dump(
        {"model": MODEL, "default": "x", "tags": {"x": {"repo": "attnzoo/digits"}}}))
    with pytest.raises(WeightsError, match="not pinned"):
        attnzoo.create_model(MODEL, pretrained=True, require_pinned=True)
    assert pin_weights.pin_manifest(manifest, FakeApi(), check_only=True) != []
    assert pin_weights.pin_manifest(manifest, FakeApi(), check_only=False) == []
    text = manifest.read_text()
    assert text.startswith("# keep me\n")
    entry = yaml.safe_load(text)["tags"]["x"]
    assert (entry["revision"], entry["sha256"]) == (commit, sha)
    assert torch.equal(_outputs(attnzoo.create_model(MODEL, pretrained=True)), _outputs(model))
    # A pinned entry is checked, not overwritten, when the Hub disagrees.
    sha = "f" * 64
    problems = pin_weights.pin_manifest(manifest, FakeApi(), check_only=False)
    assert len(problems) == 1 and "!=" in problems[0]
    assert yaml.safe_load(manifest.read_text())["tags"]["x"]["sha256"] != sha


def test_zoo_weights_with_another_num_classes_keep_all_but_the_classifier(
        model, weights_folder) -> None:
    sha = write_safetensors(model.state_dict(), weights_folder / "w.safetensors")
    _write_manifest(weights_folder, default="x", tags={"x": {
        "file": "w.safetensors", "sha256": sha, "num_classes": 10}})
    with pytest.warns(UserWarning, match="classifier was not loaded"):
        loaded = attnzoo.create_model(MODEL, pretrained=True, num_classes=4).eval()
    assert loaded.get_classifier().out_features == 4
    assert torch.equal(loaded.forward_features(_x()), model.forward_features(_x()))
