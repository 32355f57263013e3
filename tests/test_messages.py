"""What a newcomer meets outside the command line: error messages that name the file
and line, warnings that point at the caller, a clean ``dir(attnzoo)`` and real
signatures, a saved folder's ``attnzoo.yaml`` as a spec, and the SE widths of
resnet18_se/resnet34_se against timm's."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import pytest
import timm
import torch

import attnzoo
from attnzoo import SpecError, WeightsError
from attnzoo.spec import ModelSpec

# ------------------------------------------------------------------- spec messages


def _error(source) -> str:
    with pytest.raises(SpecError) as exc:
        attnzoo.create_model(source)
    return str(exc.value)


def _write(tmp_path: Path, text: str, name: str = "my.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_a_position_typo_is_one_problem_with_a_suggestion(tmp_path):
    path = _write(tmp_path, "name: t\nbackbone: {name: resnet18}\ninsert:\n"
                  "  - block: {type: se}\n    at: {path: 'layer3.*', position: afer}\n")
    msg = _error(path)
    assert msg == (f"{path}: invalid spec (1 problem(s))\n"
                   "  insert[0].at.SiteSelector.position (line 5): Input should be 'after', "
                   "'before' or 'replace' (did you mean 'after'?)")


def test_a_value_that_fits_no_alternative_still_lists_them():
    msg = _error({"name": "t", "backbone": {"name": "resnet18"},
                  "insert": [{"block": {"type": "se"}, "at": 5}]})
    assert "insert[0].at.str: Input should be a valid string" in msg
    assert "insert[0].at.SiteSelector: Input should be a valid dictionary" in msg


def test_the_path_selector_hint_has_balanced_braces():
    msg = _error({"name": "v", "backbone": {"name": "vit_tiny_patch16_224"},
                  "insert": [{"block": {"type": "se"}, "at": "residual"}]})
    assert "use {path: <glob>, position: after|before|replace} instead" in msg
    assert "}}" not in msg


SPEC = """\
name: t
description: two insertions
backbone:
  name: resnet18
insert:
  - block: {type: se}
    at: residual
  - block: {type: cbam}
    at: {path: "layer9.*"}
"""


def test_build_errors_name_the_spec_file_and_the_line(tmp_path):
    path = _write(tmp_path, SPEC)
    msg = _error(path)
    assert msg.startswith(f"{path}, line 8: t: insert[1] (cbam): site path 'layer9.*' "
                          "matches no module of ResNet")
    # given as text or a dict, there is no file: the message is as before
    assert _error(SPEC).startswith("t: insert[1] (cbam): site path 'layer9.*'")


def test_backbone_errors_name_the_spec_file_and_the_line(tmp_path):
    path = _write(tmp_path, "name: t\nbackbone:\n  name: resnet18\n  args: {block_args: 3}\n")
    assert _error(path).startswith(f"{path}, line 3: t: backbone timm:resnet18: bad args")
    path = _write(tmp_path, "name: t\nbackbone:\n  name: resnet_18\n", "typo.yaml")
    assert _error(path).startswith(f"{path}, line 3: t: backbone timm:resnet_18: timm has "
                                   "no model 'resnet_18'")


def test_block_build_errors_name_the_insertion_line(tmp_path):
    path = _write(tmp_path, "name: t\nbackbone: {name: resnet18}\ninsert:\n"
                  "  - block: {type: se}\n    at: residual\n"
                  "  - block: {type: multi_head_attention, num_heads: 7}\n"
                  "    at: {path: layer1.0}\n")
    assert _error(path).startswith(f"{path}, line 6: t: insert[1] (multi_head_attention): "
                                   "cannot build at layer1.0")


def test_specs_read_from_files_are_equal_to_the_same_spec_from_text(tmp_path):
    path = _write(tmp_path, SPEC)
    assert ModelSpec.from_yaml(path) == ModelSpec.from_yaml(SPEC)
    assert ModelSpec.from_yaml(path).source_line("insert", 1) == f"{path}, line 8"
    assert ModelSpec.from_yaml(SPEC).source_line("insert", 1) is None


# ---------------------------------------------------------------- warning location


def test_the_new_head_warning_points_at_the_callers_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attnzoo.create_model("digits_cbam_tiny", pretrained=True, num_classes=3)
    (warning,) = [w for w in caught if "classifier was not loaded" in str(w.message)]
    assert warning.filename == __file__
    assert warning.category is UserWarning


def test_the_new_head_warning_through_timm_points_at_the_caller_too():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        timm.create_model("digits_cbam_tiny", pretrained=True, num_classes=3)
    (warning,) = [w for w in caught if "classifier was not loaded" in str(w.message)]
    assert warning.filename == __file__


# ------------------------------------------------------------------- the API's edges


def test_dir_of_attnzoo_is_the_public_api():
    names = dir(attnzoo)
    assert set(attnzoo.__all__) <= set(names)
    for stray in ("annotations", "Any", "nn", "os", "register_zoo_with_timm", "builder",
                  "safe_yaml"):
        assert stray not in names
    for name in names:
        assert getattr(attnzoo, name) is not None
    assert attnzoo.convert.from_timm  # documented submodules are still listed


@pytest.mark.parametrize("function", [attnzoo.save_pretrained, attnzoo.push_to_hub])
def test_save_and_push_show_their_keyword_arguments(function):
    params = inspect.signature(function).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
    assert {"license", "metrics", "source", "tags"} <= set(params)
    for name in ("license", "metrics", "source", "tags"):
        assert params[name].kind is params[name].KEYWORD_ONLY


def test_push_to_hub_passes_the_card_arguments_to_save_pretrained(monkeypatch):
    from attnzoo import hub

    saved = {}

    class _Api:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def create_repo(self, *args, **kwargs) -> None:
            pass

        def upload_folder(self, folder_path, **kwargs):
            saved["yaml"] = (Path(folder_path) / "attnzoo.yaml").read_text(encoding="utf-8")
            saved["card"] = (Path(folder_path) / "README.md").read_text(encoding="utf-8")
            return "url"

    monkeypatch.setattr(hub, "HfApi", _Api)
    model = attnzoo.create_model("digits_cbam_tiny", pretrained=True)
    assert attnzoo.push_to_hub(model, "me/x", license="mit", metrics={"acc": 0.5},
                               source={"by": "a test"}, tags=["extra"]) == "url"
    assert "acc: 0.5" in saved["yaml"] and "by: a test" in saved["yaml"]
    assert "license: mit" in saved["card"] and "- extra" in saved["card"]


# ---------------------------------------------------- a saved folder's attnzoo.yaml


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    model = attnzoo.create_model("digits_cbam_tiny", pretrained=True)
    return attnzoo.save_pretrained(model, tmp_path_factory.mktemp("saved") / "my_model")


def test_a_saved_attnzoo_yaml_is_a_spec(saved):
    spec = attnzoo.load_spec(saved / "attnzoo.yaml")
    assert spec == attnzoo.load_spec("digits_cbam_tiny")
    assert attnzoo.load_spec(saved) == spec  # the folder names the same spec
    _, weights = ModelSpec.read_yaml(saved / "attnzoo.yaml")
    assert set(weights) >= {"file", "sha256"}


def test_create_model_of_a_saved_attnzoo_yaml_loads_its_weights(saved):
    from_folder = attnzoo.create_model(saved)
    from_file = attnzoo.create_model(str(saved / "attnzoo.yaml"))
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(from_file.eval()(x), from_folder.eval()(x))
    assert from_file.attnzoo_weights["sha256"] == from_folder.attnzoo_weights["sha256"]
    spec_only = attnzoo.create_model(saved / "attnzoo.yaml", pretrained=False)
    assert getattr(spec_only, "attnzoo_weights", None) is None


def test_a_saved_attnzoo_yaml_keeps_its_other_keys_strict(saved, tmp_path):
    text = (saved / "attnzoo.yaml").read_text(encoding="utf-8")
    bad = _write(tmp_path, text + "weigths: {}\n", "attnzoo.yaml")
    with pytest.raises(SpecError, match=r"weigths \(line \d+\): unknown field 'weigths'"):
        attnzoo.load_spec(bad)
    with pytest.raises(SpecError, match=r"weigths \(line \d+\): unknown field"):
        attnzoo.create_model(bad)
    not_a_mapping = _write(tmp_path, "name: x\nbackbone: {name: resnet18}\nweights: 3\n",
                           "other.yaml")
    with pytest.raises(SpecError, match=r"weights \(line 3\): a saved model's weights section"):
        attnzoo.load_spec(not_a_mapping)


def test_a_saved_attnzoo_yaml_whose_weights_are_missing_says_so(saved, tmp_path):
    copy = _write(tmp_path, (saved / "attnzoo.yaml").read_text(encoding="utf-8"),
                  "attnzoo.yaml")
    with pytest.raises(WeightsError, match="model.safetensors"):
        attnzoo.create_model(copy)
    assert attnzoo.create_model(copy, pretrained=False).attnzoo_spec.name == "digits_cbam_tiny"


# ------------------------------------------------------ resnet18/34_se and timm's SE


def _se_widths(state: dict[str, torch.Tensor], key: str) -> list[int]:
    return [tuple(v.shape)[0] for k, v in state.items() if k.endswith(key)]


@pytest.mark.parametrize("depth", [18, 34])
def test_resnet_se_has_the_papers_width_and_divisor_8_gives_timms(depth):
    """As the specs' descriptions say: C/16 (4 in layer1) against timm's seresnet's
    multiple of 8 (8 in layer1); an se block with divisor 8 is timm's network."""
    name = f"resnet{depth}_se"
    spec = attnzoo.load_spec(name)
    assert "not timm's" in spec.description and "divisor 8" in spec.description
    with torch.device("meta"):
        ours = attnzoo.build_model(spec).state_dict()
        theirs = timm.create_model(f"seresnet{depth}").state_dict()
        data = spec.model_dump(mode="json", exclude_defaults=True)
        data["insert"][0]["block"]["divisor"] = 8
        like_timm = attnzoo.build_model(ModelSpec.from_dict(data)).state_dict()
    assert _se_widths(ours, "attnzoo_after.fc1.weight")[0] == 4
    assert _se_widths(theirs, "se.fc1.weight")[0] == 8
    assert (_se_widths(like_timm, "attnzoo_after.fc1.weight")
            == _se_widths(theirs, "se.fc1.weight"))
    assert (_se_widths(ours, "attnzoo_after.fc1.weight")
            != _se_widths(theirs, "se.fc1.weight"))
    assert sum(v.numel() for v in like_timm.values()) == sum(v.numel() for v in theirs.values())
