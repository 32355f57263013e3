"""The saved-model folder (attnzoo/saved.py): ``save_pretrained`` writes the spec, the
weights and a model card; ``create_model(folder)`` rebuilds the same model, and says
which file and which keys do not fit. Refusals of pickles are in test_safe_weights.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors import safe_open

import attnzoo
from attnzoo.errors import WeightsError
from tests._helpers.digits import MODEL, digits_input, outputs


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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


def test_a_model_built_with_non_yaml_args_is_not_saved(tmp_path):
    model = attnzoo.create_model("resnet18_cbam", act_layer=torch.nn.ReLU6)
    assert model.attnzoo_spec.backbone.args == {}
    with pytest.raises(attnzoo.AttnZooError, match=r"\['act_layer'\].*not plain YAML"):
        attnzoo.save_pretrained(model, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


# ----------------------------------------------------------------------------- folders


def test_folder_round_trip_gives_identical_outputs(model, saved: Path) -> None:
    loaded = attnzoo.create_model(str(saved))
    assert type(loaded) is type(model)
    assert torch.equal(outputs(loaded), outputs(model))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.attnzoo_weights["metrics"] == {"accuracy": 0.5}


def test_save_records_a_replaced_classifier(model, tmp_path: Path) -> None:
    model.reset_classifier(3)
    saved = attnzoo.save_pretrained(model, tmp_path / "three")
    loaded = attnzoo.create_model(str(saved))
    assert loaded.num_classes == 3
    assert torch.equal(outputs(loaded), outputs(model))


def test_other_num_classes_loads_everything_but_the_classifier(model, saved: Path) -> None:
    with pytest.warns(UserWarning, match="classifier was not loaded.*fc.weight"):
        loaded = attnzoo.create_model(str(saved), num_classes=5).eval()
    assert loaded.get_classifier().weight.shape == (5, 64)
    reference = model.state_dict()
    for key, value in loaded.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, reference[key]), key
    feats = loaded.forward_head(loaded.forward_features(digits_input()), pre_logits=True)
    assert torch.equal(feats, model.forward_head(model.forward_features(digits_input()),
                                                 pre_logits=True))


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


# --------------------------------------------------------------------------- provenance


def _one_step(model: torch.nn.Module) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()(digits_input()).logsumexp(1).mean().backward()
    optimizer.step()


def test_saving_loaded_weights_unchanged_keeps_their_record(tmp_path: Path) -> None:
    loaded = attnzoo.create_model(MODEL, pretrained=True)
    saved = attnzoo.save_pretrained(loaded, tmp_path / "same")
    weights = yaml.safe_load((saved / "attnzoo.yaml").read_text())["weights"]
    assert weights["metrics"] == loaded.attnzoo_weights["metrics"]
    assert weights["source"] == loaded.attnzoo_weights["source"]
    assert "derived_from" not in weights and "init" not in weights


def test_fine_tuned_weights_say_what_they_derive_from_and_drop_old_metrics(
        tmp_path: Path) -> None:
    loaded = attnzoo.create_model(MODEL, pretrained=True)
    original = dict(loaded.attnzoo_weights)
    _one_step(loaded)
    saved = attnzoo.save_pretrained(loaded, tmp_path / "tuned")
    weights = yaml.safe_load((saved / "attnzoo.yaml").read_text())["weights"]
    assert "metrics" not in weights and "source" not in weights
    assert weights["derived_from"] == {"model": MODEL, "tag": original["tag"],
                                       "file": original["file"], "sha256": original["sha256"]}
    card = ModelCard.load(saved / "README.md")
    assert f"derived from: model `{MODEL}`, tag `{original['tag']}`" in card.text
    assert "## Metrics" not in card.text
    for name, value in original["metrics"].items():
        assert f"{value:.4f}" not in card.text, name
    again = attnzoo.save_pretrained(loaded, tmp_path / "tuned2", metrics={"accuracy": 0.25})
    assert yaml.safe_load((again / "attnzoo.yaml").read_text())["weights"]["metrics"] == {
        "accuracy": 0.25}
    # reloaded and saved again unchanged, the folder still says where it came from
    reloaded = attnzoo.create_model(str(saved))
    resaved = attnzoo.save_pretrained(reloaded, tmp_path / "resaved")
    assert yaml.safe_load((resaved / "attnzoo.yaml").read_text())["weights"][
        "derived_from"] == weights["derived_from"]


def test_random_initialisation_is_said_in_the_file_and_the_card(tmp_path: Path) -> None:
    fresh = attnzoo.create_model(MODEL)
    saved = attnzoo.save_pretrained(fresh, tmp_path / "random")
    assert yaml.safe_load((saved / "attnzoo.yaml").read_text())["weights"]["init"] == "random"
    assert "random initialisation" in ModelCard.load(saved / "README.md").text
    reloaded = attnzoo.create_model(str(saved))
    with pytest.raises(attnzoo.AttnZooError, match="random initialisation"):
        attnzoo.push_to_hub(reloaded, "me/random")
    _one_step(fresh)  # trained from scratch: no longer random, nothing derived
    weights = yaml.safe_load((attnzoo.save_pretrained(fresh, tmp_path / "trained")
                              / "attnzoo.yaml").read_text())["weights"]
    assert "init" not in weights and "derived_from" not in weights
