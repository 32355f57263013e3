"""``pretrained_backbone=`` and unpinned Hub files, against a loopback Hub playing timm's repos."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load, save

import attnzoo
from attnzoo import WeightsError, hub_trust
from tests._helpers.hub_server import go_offline
from tests._helpers.modules import with_random_bn_statistics

HERE = Path(__file__).resolve()


def _x(size: int = 64) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _timm_checkpoint(name: str, seed: int = 0, **kwargs) -> tuple[torch.nn.Module, bytes]:
    torch.manual_seed(seed)
    model = with_random_bn_statistics(timm.create_model(name, pretrained=False, **kwargs))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return model, save(state)


@pytest.fixture
def resnet18_repo(fake_hub):
    model, data = _timm_checkpoint("resnet18")
    commit = fake_hub.commit("timm/resnet18.a1_in1k", {"model.safetensors": data})
    return model, data, commit


def test_backbone_weights_give_the_backbones_outputs(resnet18_repo) -> None:
    timm_model, data, commit = resnet18_repo
    for name in ("resnet18_se", "resnet18_cbam"):
        model = attnzoo.create_model(name, pretrained_backbone=True).eval()
        with torch.no_grad():
            assert torch.equal(model(_x()), timm_model(_x())), name
        assert model.attnzoo_weights["repo"] == "timm/resnet18.a1_in1k"
        assert model.attnzoo_weights["commit"] == commit
        assert model.attnzoo_weights["sha256"] == hashlib.sha256(data).hexdigest()
        assert model.attnzoo_weights["file"] == "model.safetensors"
        assert all(ins.zero_init for ins in model.attnzoo_spec.insert)
        blocks = {b.name for b in model.attnzoo_blocks}
        assert all(any(k.startswith(b + ".") for b in blocks)
                   for k in model.attnzoo_weights["not_loaded"])
        model.train()  # the blocks learn: they are real parameters, not frozen
        model(_x()).sum().backward()


def test_a_new_head_warns_at_the_callers_line(resnet18_repo) -> None:
    timm_model, _, _ = resnet18_repo
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = attnzoo.create_model("resnet18_se", pretrained_backbone=True, num_classes=7)
    [warning] = [w for w in caught if "classifier was not loaded" in str(w.message)]
    assert Path(warning.filename).resolve() == HERE
    assert model.fc.out_features == 7
    with torch.no_grad():
        assert torch.equal(model.eval().forward_features(_x()), timm_model.forward_features(_x()))


def test_replaced_modules_keep_their_init_and_are_listed(fake_hub) -> None:
    timm_model, data = _timm_checkpoint("resnet18")
    fake_hub.commit("timm/resnet18.a1_in1k", {"model.safetensors": data})
    with pytest.warns(UserWarning, match=r"replaced by the spec keep their own init.*conv1"):
        model = attnzoo.create_model("resnet18_sk", pretrained_backbone=True)
    state = model.state_dict()
    assert torch.equal(state["conv1.weight"], timm_model.state_dict()["conv1.weight"])
    assert torch.equal(state["fc.weight"], timm_model.state_dict()["fc.weight"])
    assert any(k.startswith("layer1.0.conv1.") for k in model.attnzoo_weights["not_loaded"])


def test_a_tag_or_a_hub_repo_picks_other_weights(fake_hub) -> None:
    _, tv = _timm_checkpoint("resnet18", seed=1)
    _, mine = _timm_checkpoint("resnet18", seed=2)
    fake_hub.commit("timm/resnet18.tv_in1k", {"model.safetensors": tv})
    fake_hub.commit("me/r18", {"model.safetensors": mine})
    a = attnzoo.create_model("resnet18_se", pretrained_backbone="tv_in1k")
    b = attnzoo.create_model("resnet18_se", pretrained_backbone="hf-hub:me/r18")
    assert a.attnzoo_weights["repo"] == "timm/resnet18.tv_in1k"
    assert b.attnzoo_weights["repo"] == "me/r18"
    assert not torch.equal(a.conv1.weight, b.conv1.weight)
    with pytest.raises(WeightsError, match=r"no Hub checkpoint of timm's 'resnet18.nope'.*"
                                           r"a1_in1k"):
        attnzoo.create_model("resnet18_se", pretrained_backbone="nope")


def test_an_architecture_wrapping_a_timm_backbone_takes_it(resnet18_repo) -> None:
    timm_model, _, _ = resnet18_repo
    model = attnzoo.create_model("bisenetv1_resnet18", pretrained_backbone=True)
    expected = timm_model.state_dict()
    for key, value in model.context_path.state_dict().items():
        assert torch.equal(value, expected[key]), key
    with pytest.raises(WeightsError, match="no timm backbone"):
        attnzoo.create_model("resattnet56", pretrained_backbone=True)


def test_bytes_that_differ_from_the_hubs_record_are_refused(resnet18_repo, fake_hub) -> None:
    attnzoo.create_model("resnet18_se", pretrained_backbone=True)
    [blob] = list(Path(hf_cache()).rglob("blobs/*"))
    blob.write_bytes(blob.read_bytes()[:-4] + b"\0\0\0\0")  # same size, other bytes
    with pytest.raises(WeightsError, match="failed verification"):
        attnzoo.create_model("resnet18_se", pretrained_backbone=True)


def hf_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def test_first_use_is_recorded_and_a_changed_repo_is_refused(resnet18_repo, fake_hub) -> None:
    _, data, commit = resnet18_repo
    attnzoo.create_model("resnet18_se", pretrained_backbone=True)
    records = json.loads(hub_trust.records_path().read_text())
    [(key, record)] = records.items()
    assert key == "timm/resnet18.a1_in1k@main/model.safetensors"
    assert record["commit"] == commit
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    _, other = _timm_checkpoint("resnet18", seed=5)
    new = fake_hub.commit("timm/resnet18.a1_in1k", {"model.safetensors": other})
    with pytest.raises(WeightsError, match=rf"changed since it was first loaded here.*{new}.*"
                                           rf"{commit}.*remove the entry"):
        attnzoo.create_model("resnet18_se", pretrained_backbone=True)
    hub_trust.records_path().unlink()  # what the message says to do
    model = attnzoo.create_model("resnet18_se", pretrained_backbone=True)
    assert model.attnzoo_weights["commit"] == new


def test_offline_reloads_use_the_record(resnet18_repo, fake_hub, monkeypatch) -> None:
    timm_model, _, _ = resnet18_repo
    attnzoo.create_model("resnet18_se", pretrained_backbone=True)
    go_offline(monkeypatch)
    model = attnzoo.create_model("resnet18_se", pretrained_backbone=True).eval()
    with torch.no_grad():
        assert torch.equal(model(_x()), timm_model(_x()))
    hub_trust.records_path().unlink()
    with pytest.raises(WeightsError, match="not been loaded on this machine before.*offline"):
        attnzoo.create_model("resnet18_se", pretrained_backbone=True)


def test_pinned_only_refuses_unpinned_files(resnet18_repo, monkeypatch) -> None:
    with pytest.raises(WeightsError, match="pinned files only"):
        attnzoo.create_model("resnet18_se", pretrained_backbone=True, require_pinned=True)
    monkeypatch.setenv(hub_trust.REQUIRE_PINNED_ENV, "1")
    with pytest.raises(WeightsError, match="pinned files only"):
        attnzoo.create_model("resnet18_se", pretrained_backbone=True)
    assert attnzoo.create_model("resnet18_se", pretrained_backbone=True, require_pinned=False)


def test_an_unpinned_zoo_entry_loads_verified_by_the_hubs_record(fake_hub) -> None:
    timm_model, data = _timm_checkpoint("skresnet18")
    commit = fake_hub.commit("timm/skresnet18.ra_in1k", {"model.safetensors": data})
    model = attnzoo.create_model("resnet18_sk", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), timm_model(_x()), rtol=0, atol=1e-5)
    assert model.attnzoo_weights["revision"] == commit
    assert model.attnzoo_weights["sha256"] == hashlib.sha256(data).hexdigest()
    with pytest.raises(WeightsError, match="pinned files only"):
        attnzoo.create_model("resnet18_sk", pretrained=True, require_pinned=True)


def test_pretrained_and_pretrained_backbone_do_not_mix(resnet18_repo) -> None:
    with pytest.raises(WeightsError, match="cannot be combined"):
        attnzoo.create_model("resnet18_se", pretrained=True, pretrained_backbone=True)


def test_the_checkpoint_must_hold_every_backbone_key(fake_hub) -> None:
    _, data = _timm_checkpoint("resnet18")
    state = load(data)  # a checkpoint missing one tensor
    del state["layer2.0.conv1.weight"]
    fake_hub.commit("timm/resnet18.a1_in1k", {"model.safetensors": save(state)})
    with pytest.raises(WeightsError, match=r"missing from the file: layer2\.0\.conv1\.weight"):
        attnzoo.create_model("resnet18_se", pretrained_backbone=True)


def test_a_torchvision_backbone_is_told_to_use_timms_checkpoints() -> None:
    spec = {"name": "tv_se", "backbone": {"source": "torchvision", "name": "resnet18"},
            "insert": [{"block": {"type": "se"}, "at": "residual"}]}
    with pytest.raises(WeightsError, match=r"tv_se: pretrained_backbone= loads timm checkpoints"
                       r".*torchvision's 'resnet18'.*tv_in1k"):
        attnzoo.create_model(spec, pretrained_backbone=True)
