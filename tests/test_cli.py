"""The `attnzoo` command."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import attnzoo
from attnzoo import cli
from attnzoo.cli import main


def test_list_and_pattern(capsys):
    assert main(["list", "*_se"]) == 0
    out = capsys.readouterr().out.split()
    assert "resnet50_se" in out and all(n.endswith("_se") for n in out)


def test_show_prints_the_spec_yaml(capsys):
    assert main(["show", "resnet50_cbam"]) == 0
    text = capsys.readouterr().out
    assert attnzoo.ModelSpec.from_yaml(text) == attnzoo.load_spec("resnet50_cbam")


def test_summary_reports_params_and_sites(capsys):
    assert main(["summary", "resnet18_cbam", "--input-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "11,779,392" in out and "inserted blocks: 8" in out
    assert "layer4.1.bn2.attnzoo_after  cbam" in out and "GMACs at 3x64x64" in out


def test_summary_flops_match_timm_seresnet50(capsys):
    """resnet50_se is timm's seresnet50 network (same SE widths and placement), so the
    summary's count must equal FlopCounterMode's on timm's own model, run here on the
    meta device while the CLI runs attnzoo's model on the CPU."""
    assert main(["summary", "resnet50_se", "--input-size", "224"]) == 0
    out = capsys.readouterr().out
    with torch.device("meta"):
        reference = timm.create_model("seresnet50")
    reference.eval()
    with FlopCounterMode(display=False) as counter:
        reference(torch.empty(1, 3, 224, 224, device="meta"))
    flops = counter.get_total_flops()
    assert f"{flops:,} FLOPs" in out
    assert f"GMACs at 3x224x224: {flops / 2e9:.3f} " in out
    assert f"parameters: {sum(p.numel() for p in reference.parameters()):,} " in out
    # the per-block multiply-adds are those of timm's SE modules
    se = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()
          if name.endswith(".se")}
    rows = re.findall(r"^(layer\S+)\s+se\s.*\s(\S+)$", out, re.MULTILINE)
    assert len(rows) == len(se) == 16
    for (module, mmacs), ref in zip(rows, se.values(), strict=True):
        assert mmacs == cli._fmt(ref / 2e6), module


def test_summary_defaults_to_the_models_own_input_size(capsys):
    assert main(["summary", "digits_cbam_tiny"]) == 0
    out = capsys.readouterr().out
    assert "GMACs at 1x8x8: " in out and "stages.1.1.attnzoo_after" in out


def test_summary_is_plain_text_when_piped(capsys):
    assert main(["summary", "digits_cbam_tiny"]) == 0
    out = capsys.readouterr().out
    assert "module" in out and not set("┃│━─") & set(out)


def test_summary_uses_rich_on_a_terminal(capsys, monkeypatch):
    pytest.importorskip("rich")
    monkeypatch.setattr(cli, "_use_rich", lambda: True)
    assert main(["summary", "digits_cbam_tiny"]) == 0
    out = capsys.readouterr().out
    assert "┃" in out and "cbam" in out and "MMACs" in out


def test_summary_at_a_size_the_model_cannot_take_is_an_error(capsys):
    assert main(["summary", "vit_small_mha", "--input-size", "64"]) == 2
    assert "does not run at input 3x64x64" in capsys.readouterr().err


def test_schema_is_json(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "ModelSpec"


def test_errors_exit_2_with_a_message(capsys):
    assert main(["show", "resnet50_cbm"]) == 2
    assert "unknown model 'resnet50_cbm'" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "attnzoo.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for cmd in ("list", "show", "summary", "schema", "push"):
        assert cmd in out
