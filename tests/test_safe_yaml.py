"""Reading YAML that a stranger wrote (attnzoo/safe_yaml.py): plain values only, bounded
in size and depth; nothing in a spec runs code.

Every payload here would leave a mark if it ran (a file, an environment variable);
each test asserts the refusal *and* that no mark was left. The same reader takes
specs, saved folders' attnzoo.yaml and weight manifests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import attnzoo
from attnzoo import ModelSpec, SpecError

ENV_MARK = "ATTNZOO_PWNED"


def _env_mark_set() -> bool:
    """Whether ``os.putenv(ENV_MARK, ...)`` ran in this process: putenv changes the C
    environment (not ``os.environ``), which a child process inherits."""
    code = f"import os; print(os.environ.get({ENV_MARK!r}, ''))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip() != ""


def _payload_tags(marker):
    cmd = f"touch {marker}"
    return [
        f'!!python/object/apply:os.system ["{cmd}"]',
        f'!!python/object/apply:subprocess.call [["touch", "{marker}"]]',
        '!!python/name:os.system ""',
        "!!python/module:os",
        f'!!python/object/new:os.system ["{cmd}"]',
        f'!!python/object/apply:builtins.open ["{marker}", "w"]',
        f'!!python/object/apply:builtins.exec ["open(\'{marker}\', \'w\')"]',
        f'!!python/object/apply:builtins.eval ["open(\'{marker}\', \'w\')"]',
        f'!!python/object/apply:os.putenv ["{ENV_MARK}", "1"]',
        '!!python/object:builtins.object {}',
        "!!python/tuple [1, 2]",
        f'!<tag:yaml.org,2002:python/object/apply:os.system> ["{cmd}"]',
    ]


N_TAGS = len(_payload_tags("x"))


@pytest.mark.parametrize("index", range(N_TAGS))
def test_python_tags_anywhere_are_refused(tmp_path, index):
    marker = tmp_path / "ran"
    tag = _payload_tags(marker)[index]
    for text in (
        f"name: {tag}\nbackbone: {{name: resnet18}}\n",
        f"name: x\nbackbone: {{name: resnet18, args: {{drop_rate: {tag}}}}}\n",
        f"name: x\nbackbone: {{name: resnet18}}\ninsert:\n  - block: {{type: se, reduction: "
        f"{tag}}}\n    at: residual\n",
        f"name: x\nbackbone: {{name: resnet18}}\ninsert:\n  - block: {{type: se}}\n"
        f"    at: {{path: {tag}}}\n",
        f"? {tag}\n: 1\nname: x\nbackbone: {{name: resnet18}}\n",  # a tag as a mapping key
        f"name: x\ntags: [a, {tag}]\nbackbone: {{name: resnet18}}\n",
    ):
        with pytest.raises(SpecError, match="not valid YAML"):
            attnzoo.create_model(text)
    assert not marker.exists()
    if "putenv" in tag:
        assert not _env_mark_set()


def test_tag_directive_cannot_smuggle_python_tags(tmp_path):
    marker = tmp_path / "ran"
    text = ("%TAG !py! tag:yaml.org,2002:python/object/apply:\n---\n"
            f'name: !py!os.system ["touch {marker}"]\nbackbone: {{name: resnet18}}\n')
    with pytest.raises(SpecError, match="not valid YAML"):
        attnzoo.create_model(text)
    assert not marker.exists()


def test_python_tags_in_a_spec_file_are_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\n'
                    "backbone: {name: resnet18}\n")
    with pytest.raises(SpecError, match="evil.yaml"):
        attnzoo.create_model(str(path))
    with pytest.raises(SpecError, match="evil.yaml"):
        attnzoo.load_spec(path)
    assert not marker.exists()


@pytest.mark.parametrize("value", [
    "!!binary aGVsbG8=", "!!set {a, b}", "!!omap [{a: 1}]", "!!pairs [{a: 1}]",
    "!!timestamp 2020-01-01", "!include /etc/passwd", "!env HOME", "!!foo bar",
])
def test_non_plain_tags_are_refused(value):
    """Only JSON-like values: no bytes, sets, ordered pairs, dates or custom tags (they
    would not survive spec -> YAML -> spec, and custom tags are how loaders grow
    includes and environment lookups)."""
    for text in (f"name: x\nbackbone: {{name: resnet18, args: {{a: {value}}}}}\n",
                 f"name: x\ndescription: {value}\nbackbone: {{name: resnet18}}\n"):
        with pytest.raises(SpecError, match="not valid YAML"):
            ModelSpec.from_yaml(text)


def test_plain_standard_tags_and_dates_are_plain_values():
    spec = ModelSpec.from_yaml("name: !!str x\ndescription: 2018-07-17\nnum_classes: !!int 10\n"
                               "backbone: !!map {name: resnet18, args: {drop_rate: !!float 0}}\n")
    assert spec.description == "2018-07-17"  # an unquoted date stays the string it reads as
    assert spec.num_classes == 10
    assert spec.backbone.args == {"drop_rate": 0.0}
    assert ModelSpec.from_yaml(spec.to_yaml()) == spec


@pytest.mark.parametrize("text", [
    "name: x\nname: y\nbackbone: {name: resnet18}\n",
    "name: x\nbackbone: {name: resnet18, name: os.system}\n",
    "name: x\nbackbone: {name: resnet18}\ninsert:\n  - block: {type: se, type: cbam}\n"
    "    at: residual\n",
    "name: x\nbackbone: {name: resnet18, args: {drop_rate: 0.1, drop_rate: 0.9}}\n",
])
def test_a_key_given_twice_is_refused(text):
    """A reviewer reads the first value, a last-wins loader builds the second."""
    with pytest.raises(SpecError, match=r"found the key '\w+' twice \(first on line \d\)"):
        ModelSpec.from_yaml(text)


def test_merge_keys_are_not_duplicates():
    spec = ModelSpec.from_yaml("name: x\nbackbone:\n  <<: {name: resnet34, args: {}}\n"
                               "  name: resnet18\n")
    assert spec.backbone.name == "resnet18"


def _bomb(levels: int = 8) -> str:
    """A billion-laughs alias bomb inside backbone args: 9**levels strings once expanded."""
    lines = ["    a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"    a{i}: &a{i} [{refs}]")
    return "name: x\nbackbone:\n  name: resnet18\n  args:\n" + "\n".join(lines) + "\n"


def test_yaml_alias_bombs_are_refused_before_anything_expands_them():
    # Valid as a spec (args are free-form), so only the loader can stop it: model_dump,
    # to_yaml and == would otherwise walk 9**8 = 43 million strings.
    start = time.perf_counter()
    with pytest.raises(SpecError, match="expands to more than"):
        ModelSpec.from_yaml(_bomb())
    with pytest.raises(SpecError, match="expands to more than"):
        attnzoo.create_model(_bomb(12))
    assert time.perf_counter() - start < 5
    # A few shared anchors are fine.
    spec = ModelSpec.from_yaml("name: x\nbackbone: {name: resnet18, args: {a: &a [1, 2], "
                               "b: *a}}\n")
    assert spec.backbone.args == {"a": [1, 2], "b": [1, 2]}


def test_recursive_aliases_are_refused():
    with pytest.raises(SpecError, match="recursive alias"):
        ModelSpec.from_yaml("name: x\nbackbone: {name: resnet18, args: {a: &a [1, *a]}}\n")
    with pytest.raises(SpecError, match="recursive alias"):
        ModelSpec.from_yaml("name: x\nbackbone: &b {name: resnet18, args: {self: *b}}\n")


@pytest.mark.parametrize("text", [
    "name: x\nbackbone: {name: resnet18, args: {a: " + "[" * 1000 + "]" * 1000 + "}}\n",
    "name: x\nbackbone: {name: resnet18, args: {a: " + "{a: " * 1000 + "1" + "}" * 1000 + "}}\n",
    "name: x\nbackbone: {name: resnet18, args: {a: " + "9" * 5000 + "}}\n",  # > int digit limit
    "name: x\nbackbone: {name: resnet18}\n---\nname: y\nbackbone: {name: resnet18}\n",
    "\x00name: x\n", "name: [unclosed\n", "name: 'x\n", "- a\n- b\n", "", "   ", "~\n",
    "name: x\n  bad: indent\n", "{" * 100_000, "[" * 100_000,
    "name: x\nbackbone:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 600)),
])
def test_malformed_yaml_is_a_spec_error(text):
    with pytest.raises(SpecError):
        ModelSpec.from_yaml(text)


def test_not_a_mapping():
    for text in ("- a\n- b\n", "just a string\n", "42\n"):
        with pytest.raises(SpecError, match="mapping"):
            ModelSpec.from_yaml(text)


def test_spec_file_that_is_not_utf8_is_a_spec_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\nbackbone: {name: resnet18}\n".encode("latin-1"))
    with pytest.raises(SpecError, match="latin1.yaml.*UTF-8"):
        ModelSpec.from_yaml(path)
    with pytest.raises(SpecError, match="cannot read"):
        ModelSpec.from_yaml(tmp_path / "absent.yaml")


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(SpecError) as err:
        ModelSpec.from_yaml(path)
    assert str(path) in str(err.value)


def test_the_env_mark_detector_works():
    # The putenv payload above is only proof if a putenv that did run would be seen.
    os.putenv(ENV_MARK, "1")
    try:
        assert _env_mark_set()
    finally:
        os.unsetenv(ENV_MARK)
    assert not _env_mark_set()


# ------------------------------------------------- attnzoo.yaml of a saved folder / Hub


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "model"
    attnzoo.save_pretrained(attnzoo.create_model("resnet18_se", num_classes=3), folder)
    return folder


_SAVED_SPEC_CASES = {
    "not UTF-8": lambda t: t.encode().replace(b"\nbackbone:", b"\nlicense: caf\xe9\nbackbone:"),
    "key twice": lambda t: t.replace("\nbackbone:", "\nname: os.system\nbackbone:").encode(),
    "nested too deeply": lambda t: (t + "tags: " + "[" * 2000 + "]" * 2000 + "\n").encode(),
    "binary tag": lambda t: t.replace("\nbackbone:", "\nlicense: !!binary aGk=\nbackbone:")
    .encode(),
}


@pytest.mark.parametrize("case", list(_SAVED_SPEC_CASES))
def test_hostile_attnzoo_yaml_in_a_folder_is_a_spec_error(saved_folder, tmp_path, case):
    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((saved_folder / "model.safetensors").read_bytes())
    text = (saved_folder / "attnzoo.yaml").read_text()
    (folder / "attnzoo.yaml").write_bytes(_SAVED_SPEC_CASES[case](text))
    with pytest.raises(SpecError, match="attnzoo.yaml"):
        attnzoo.create_model(str(folder))
