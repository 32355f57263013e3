"""The `attnzoo` command."""

from __future__ import annotations

import json
import subprocess
import sys

import attnzoo
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
    assert "layer4.1.bn2.attnzoo_after  cbam" in out and "FLOPs at 64x64" in out


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
