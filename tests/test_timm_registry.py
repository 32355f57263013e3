"""The zoo in timm (attnzoo/timm_registry.py): zoo names are timm models, with pretrained
cfgs; ``features_only`` is tested in test_features.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import timm.data
import torch
from timm.models._registry import model_entrypoint

import attnzoo
from attnzoo.timm_registry import zoo_pretrained_cfg

ZOO = attnzoo.list_models()


def load_same_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    dst.load_state_dict(src.state_dict(), strict=True)


def test_every_zoo_model_is_a_timm_model_and_clashes_with_none_of_timms():
    for name in ZOO:
        assert timm.is_model(name), name
        # registered by attnzoo, not one of timm's own models of the same name
        assert model_entrypoint(name).__module__ == "attnzoo.timm_registry", name
    assert set(timm.list_models("*cbam*")) >= {"resnet18_cbam", "resnet50_cbam"}
    assert set(timm.list_models(module="timm_registry")) == set(ZOO)


def test_import_builds_no_model():
    """Registration reads spec files only: importing attnzoo constructs no nn.Module."""
    code = (
        "import torch.nn as nn, timm\n"
        "count = [0]\n"
        "init = nn.Module.__init__\n"
        "def counting(self, *a, **k):\n"
        "    count[0] += 1\n"
        "    init(self, *a, **k)\n"
        "nn.Module.__init__ = counting\n"
        "import attnzoo\n"
        "assert timm.is_model('resnet50_cbam')\n"
        "print(count[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["0"]


def test_timm_create_model_is_the_zoo_model():
    via_timm = timm.create_model("resnet18_cbam", num_classes=7).eval()
    ours = attnzoo.create_model("resnet18_cbam", num_classes=7).eval()
    assert type(via_timm) is type(ours)
    assert via_timm.attnzoo_spec == ours.attnzoo_spec
    load_same_weights(ours, via_timm)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(via_timm(x), ours(x))
    assert via_timm(x).shape == (2, 7)


def test_timm_forwards_backbone_args():
    model = timm.create_model("resnet18_cbam", drop_path_rate=0.1, in_chans=1)
    assert model.conv1.in_channels == 1
    assert model.layer4[1].drop_path.drop_prob == pytest.approx(0.1)


def test_pretrained_cfg_and_data_config():
    cfg = timm.models.get_pretrained_cfg("resnet50_cbam")
    assert cfg.architecture == "resnet50_cbam" and not cfg.has_weights
    assert cfg.paper_ids == "arXiv:1807.06521"
    assert (cfg.first_conv, cfg.classifier) == ("conv1", "fc")
    model = timm.create_model("resnet50_cbam")
    data = timm.data.resolve_data_config(model=model)
    resnet = timm.data.resolve_data_config(model=timm.create_model("resnet50"))
    assert data == resnet  # the zoo model is fed as its backbone is
    transform = timm.data.create_transform(**data)
    assert transform is not None


def test_pretrained_cfg_takes_the_specs_input_size_and_classes():
    spec = attnzoo.ModelSpec.from_dict({
        "name": "t", "backbone": {"name": "resnet18"}, "input_size": [3, 96, 96],
        "num_classes": 10, "license": "apache-2.0"})
    cfg = zoo_pretrained_cfg(spec)
    assert cfg["input_size"] == (3, 96, 96) and cfg["num_classes"] == 10
    assert cfg["mean"] == timm.models.get_pretrained_cfg("resnet18").mean
    assert cfg["license"] == "apache-2.0"
    assert not {"url", "hf_hub_id", "file"} & set(cfg)
