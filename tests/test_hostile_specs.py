"""Specs from strangers: nothing in a spec runs code, imports a path or downloads."""

from __future__ import annotations

import builtins
import importlib
import threading

import pytest
import torch
import yaml

import attnzoo
from attnzoo import ModelSpec, SpecError


def _payload_tags(marker):
    cmd = f"touch {marker}"
    return [
        f'!!python/object/apply:os.system ["{cmd}"]',
        f'!!python/object/apply:subprocess.call [["touch", "{marker}"]]',
        '!!python/name:os.system ""',
        "!!python/module:os",
        f'!!python/object/new:os.system ["{cmd}"]',
    ]


@pytest.mark.parametrize("index", range(5))
def test_python_tags_anywhere_are_refused(tmp_path, index):
    marker = tmp_path / "ran"
    tag = _payload_tags(marker)[index]
    for text in (
        f"name: {tag}\nbackbone: {{name: resnet18}}\n",
        f"name: x\nbackbone: {{name: resnet18, args: {{drop_rate: {tag}}}}}\n",
        f"name: x\nbackbone: {{name: resnet18}}\ninsert:\n  - block: {{type: se, reduction: "
        f"{tag}}}\n    at: residual\n",
    ):
        with pytest.raises(SpecError):
            attnzoo.create_model(text)
    assert not marker.exists()


@pytest.mark.parametrize("source", ["torchvision", "python", "os.system", "file"])
def test_unknown_backbone_source_is_refused(source):
    with pytest.raises(SpecError, match="source"):
        ModelSpec.from_dict({"name": "x", "backbone": {"source": source, "name": "resnet18"}})


@pytest.mark.parametrize("name", ["os.system", "torch.nn.Linear", "__import__('os')",
                                  "../../etc/passwd", "resnet18; rm -rf /"])
def test_backbone_names_are_names_not_paths(name):
    with pytest.raises(SpecError):
        attnzoo.create_model({"name": "x", "backbone": {"name": name}})


@pytest.mark.parametrize("block_type", ["os.system", "torch.nn.Identity",
                                        "attnzoo.blocks.channel.SqueezeExcite", "__class__"])
def test_block_types_are_names_not_paths(block_type):
    with pytest.raises(SpecError):
        attnzoo.create_model({"name": "x", "backbone": {"name": "resnet18"},
                              "insert": [{"block": {"type": block_type}, "at": "residual"}]})


def test_building_never_calls_eval_exec_or_import_module(monkeypatch):
    """A whole zoo build with eval/exec/import_module trapped: none is called with
    anything from the spec (timm itself may import its own modules beforehand)."""
    attnzoo.create_model("resnet18_cbam")  # warm imports
    calls = []

    def trap(name):
        real = getattr(builtins, name)

        def wrapper(*args, **kwargs):
            calls.append((name, args[:1]))
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "eval", trap("eval"))
    monkeypatch.setattr(builtins, "exec", trap("exec"))
    real_import = importlib.import_module

    def import_module(*args, **kwargs):
        calls.append(("import_module", args[:1]))
        return real_import(*args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", import_module)
    text = attnzoo.load_spec("resnet18_cbam").to_yaml().replace("resnet18_cbam", "os.system")
    attnzoo.create_model(text)
    assert calls == []


def test_spec_cannot_ask_timm_to_download_or_load_a_file():
    for key in ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay"):
        with pytest.raises(SpecError, match=key):
            attnzoo.create_model({"name": "x", "backbone": {"name": "resnet18",
                                                            "args": {key: "/etc/passwd"}}})


def test_yaml_bombs_are_not_expanded_into_a_model():
    # A billion-laughs alias bomb: safe_load keeps references (no copy), and the
    # spec is rejected by validation rather than built.
    text = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefg", "bcdefgh", strict=True)
    )
    with pytest.raises(SpecError):
        ModelSpec.from_yaml(text)


def test_not_a_mapping():
    for text in ("- a\n- b\n", "just a string\n", "42\n"):
        with pytest.raises(SpecError, match="mapping"):
            ModelSpec.from_yaml(text)


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(SpecError) as err:
        ModelSpec.from_yaml(path)
    assert str(path) in str(err.value)


def test_failed_build_leaves_the_zoo_usable():
    with pytest.raises(SpecError):
        attnzoo.create_model({"name": "x", "backbone": {"name": "resnet18"},
                              "insert": [{"block": {"type": "se"}, "at": "residual"},
                                         {"block": {"type": "se"}, "at": "nowhere"}]})
    model = attnzoo.create_model("resnet18_se")
    assert len(model.attnzoo_blocks) == 8


def test_create_model_from_eight_threads():
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    x = torch.randn(1, 3, 32, 32)
    names = ["resnet18_cbam", "resnet18_se"] * 4

    def work(i: int) -> None:
        try:
            torch.manual_seed(i)
            model = attnzoo.create_model(names[i]).eval()
            with torch.no_grad():
                results[i] = model(x)
            assert len(model.attnzoo_blocks) == 8
            assert not any(m._forward_hooks for m in model.modules())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == list(range(8))
    # Same-class dynamic wrappers are shared, not duplicated per thread.
    a = attnzoo.create_model("resnet18_cbam")
    b = attnzoo.create_model("resnet18_cbam")
    assert type(a.layer1[0].bn2) is type(b.layer1[0].bn2)


def test_safe_dump_of_spec_has_no_python_tags():
    for name in attnzoo.list_models():
        assert "!!python" not in attnzoo.load_spec(name).to_yaml()
        yaml.safe_load(attnzoo.load_spec(name).to_yaml())
