"""Talking to the Hub (attnzoo/hub.py): ``hf-hub:`` sources load from a loopback fake Hub
(tests/_helpers/hub_server.py) and then offline, at a revision, and refuse damaged or
pickled files without downloading them; ``push_to_hub`` and ``attnzoo push`` upload a
loadable folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml

import attnzoo
from attnzoo import hub
from attnzoo.errors import WeightsError
from tests._helpers.digits import MODEL, outputs
from tests._helpers.hub_server import go_offline
from tests._helpers.payloads import evil_pickle


def test_hub_round_trip_then_offline(model, saved: Path, fake_hub, monkeypatch) -> None:
    commit = fake_hub.commit_folder("org/digits", saved)
    loaded = attnzoo.create_model("hf-hub:org/digits")
    assert torch.equal(outputs(loaded), outputs(model))
    # The weights come from the very commit the spec was read from.
    assert fake_hub.fetched("model.safetensors") == [
        f"/org/digits/resolve/{commit}/model.safetensors"]
    assert loaded.attnzoo_weights["loaded_from"] == {"repo": "org/digits", "revision": commit}

    fake_hub.stop()
    go_offline(monkeypatch)
    again = attnzoo.create_model("hf-hub:org/digits")
    assert torch.equal(outputs(again), outputs(model))


def test_hub_revision_by_at_or_keyword(model, saved: Path, fake_hub, tmp_path: Path) -> None:
    first = fake_hub.commit_folder("org/digits", saved)
    newer = attnzoo.create_model(MODEL)
    fake_hub.commit_folder("org/digits", attnzoo.save_pretrained(newer, tmp_path / "v2"))
    expected_old, expected_new = outputs(model), outputs(newer)
    assert not torch.equal(expected_old, expected_new)
    assert torch.equal(outputs(attnzoo.create_model("hf-hub:org/digits")), expected_new)
    assert torch.equal(outputs(attnzoo.create_model(f"hf-hub:org/digits@{first}")),
                       expected_old)
    assert torch.equal(outputs(attnzoo.create_model("hf-hub:org/digits", revision=first)),
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
    payload = evil_pickle(marker)
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
    assert torch.equal(outputs(attnzoo.create_model("hf-hub:me/digits")), outputs(model))


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


def test_push_of_random_weights_only_when_asked(fake_hub, monkeypatch) -> None:
    monkeypatch.setattr(_RecordingApi, "calls", [])
    monkeypatch.setattr(hub, "HfApi", _RecordingApi)
    fresh = attnzoo.create_model(MODEL)
    with pytest.raises(attnzoo.AttnZooError, match="random initialisation.*allow_random_init"):
        attnzoo.push_to_hub(fresh, "me/random")
    assert _RecordingApi.calls == []  # refused before the Hub is asked anything
    attnzoo.push_to_hub(fresh, "me/random", allow_random_init=True)
    assert b"random initialisation" in _RecordingApi.uploaded["README.md"]
    assert yaml.safe_load(_RecordingApi.uploaded["attnzoo.yaml"])["weights"]["init"] == "random"
