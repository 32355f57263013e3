"""Specs from strangers: nothing in a spec runs code, imports a path or downloads.

Every payload here would leave a mark if it ran (a file, an environment variable);
each test asserts the refusal *and* that no mark was left.
"""

from __future__ import annotations

import builtins
import importlib
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml

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


@pytest.mark.parametrize("source", ["torchvision", "python", "os.system", "file", "hf-hub",
                                    "ATTNZOO", ""])
def test_unknown_backbone_source_is_refused(source):
    with pytest.raises(SpecError, match="source"):
        ModelSpec.from_dict({"name": "x", "backbone": {"source": source, "name": "resnet18"}})


@pytest.mark.parametrize("name", ["os.system", "torch.nn.Linear", "__import__('os')",
                                  "../../etc/passwd", "resnet18; rm -rf /",
                                  "hf-hub:timm/resnet18.a1_in1k", "local-dir:/tmp",
                                  "timm.models.resnet.resnet18", "attnzoo.builder.build_model"])
@pytest.mark.parametrize("source", ["timm", "attnzoo"])
def test_backbone_names_are_names_not_paths(name, source):
    with pytest.raises(SpecError):
        attnzoo.create_model({"name": "x", "backbone": {"source": source, "name": name}})


@pytest.mark.parametrize("block_type", ["os.system", "torch.nn.Identity",
                                        "attnzoo.blocks.channel.SqueezeExcite", "__class__",
                                        "SqueezeExcite", "SE", ""])
def test_block_types_are_names_not_paths(block_type):
    with pytest.raises(SpecError, match="block type"):
        attnzoo.create_model({"name": "x", "backbone": {"name": "resnet18"},
                              "insert": [{"block": {"type": block_type}, "at": "residual"}]})


TOKEN = "attnzoo_payload_7f3a"


def _code_strings(marker) -> list[str]:
    return [
        f"__import__('os').system('touch {marker}')",
        f"open('{marker}', 'w')",
        f"os.system('touch {marker}')",
        f"$(touch {marker})",
        f"`touch {marker}`",
        f"{TOKEN}.evil",
    ]


def test_no_spec_string_reaches_eval_exec_compile_or_an_import(tmp_path, monkeypatch):
    """Every string field of a spec (names, sources, block types, site paths, backbone
    args, keys and values) carries code or a module name that would leave a mark if
    evaluated or imported; with eval/exec/compile/__import__/import_module trapped,
    none of them ever reaches one."""
    marker = tmp_path / "ran"
    attnzoo.create_model("resnet18_se")  # warm imports
    calls: list[tuple[str, str]] = []
    strings = _code_strings(marker)

    def trap(name, real):
        def wrapper(*args, **kwargs):
            calls.append((name, repr(args)[:500]))
            return real(*args, **kwargs)
        return wrapper

    for name in ("eval", "exec", "compile", "__import__"):
        monkeypatch.setattr(builtins, name, trap(name, getattr(builtins, name)))
    monkeypatch.setattr(importlib, "import_module", trap("import_module",
                                                         importlib.import_module))
    specs = [
        {"name": TOKEN, "description": strings[0], "paper": strings[1], "license": strings[2],
         "tags": strings, "backbone": {"name": "resnet18"}},
        {"name": "x", "backbone": {"name": TOKEN}},
        {"name": "x", "backbone": {"source": "attnzoo", "name": TOKEN}},
        {"name": "x", "backbone": {"name": "resnet18", "args": {TOKEN: strings[0]}}},
        {"name": "x", "backbone": {"name": "resnet18",
                                   "args": {"act_layer": f"{TOKEN}.act",
                                            "norm_layer": strings[0]}}},
        {"name": "x", "backbone": {"name": "resnet18"},
         "insert": [{"block": {"type": TOKEN}, "at": "residual"}]},
        {"name": "x", "backbone": {"name": "resnet18"},
         "insert": [{"block": {"type": "se"}, "at": {"path": f"{TOKEN}.*"}}]},
        {"name": "x", "backbone": {"name": "resnet18"},
         "insert": [{"block": {"type": "se"}, "at": TOKEN}]},
        {"name": "x", "backbone": {"name": "resnet18"},
         "insert": [{"block": {"type": "attention", "score": strings[0]}, "at": "residual"}]},
    ]
    for data in specs:
        for source in (data, yaml.safe_dump(data)):
            try:
                model = attnzoo.create_model(source)
            except SpecError:
                continue
            except (KeyError, ValueError, RuntimeError):
                continue  # an unknown timm layer name: see test_bad_backbone_args_...
            with torch.no_grad():
                model.eval()(torch.randn(1, 3, 32, 32))
    monkeypatch.undo()
    assert not marker.exists()
    leaked = [c for c in calls if TOKEN in c[1] or str(marker) in c[1]]
    assert leaked == []
    assert not any(TOKEN in m for m in sys.modules)


@pytest.mark.parametrize("args", [{"act_layer": "no_such_act"}, {"in_chans": -3},
                                  {"norm_layer": "no_such_norm"}])
def test_bad_backbone_args_are_spec_errors(args):
    with pytest.raises(SpecError, match="backbone"):
        attnzoo.create_model({"name": "x", "backbone": {"name": "resnet18", "args": args}})


def test_building_a_zoo_spec_calls_no_eval_exec_or_import_module(monkeypatch):
    """A whole zoo build with eval/exec/import_module trapped: none is called (timm
    itself may import its own modules beforehand)."""
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
    for key in ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay",
                "cache_dir"):
        with pytest.raises(SpecError, match=key):
            attnzoo.create_model({"name": "x", "backbone": {"name": "resnet18",
                                                            "args": {key: "/etc/passwd"}}})


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


@pytest.mark.parametrize("pattern", ["*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b", "*?" * 40 + ".x",
                                     ".".join(["**", "*"] * 40) + ".x",
                                     "**." * 60 + "zz"])
def test_site_globs_cannot_backtrack_catastrophically(pattern):
    """A regex translation of these globs takes seconds to hours per module path."""
    start = time.perf_counter()
    with pytest.raises(SpecError, match="matches no module"):
        attnzoo.create_model({"name": "x", "backbone": {"name": "resnet18"},
                              "insert": [{"block": {"type": "se"}, "at": {"path": pattern}}]})
    assert time.perf_counter() - start < 5


def test_site_paths_have_a_length_limit():
    with pytest.raises(SpecError, match=r"at\.SiteSelector\.path"):
        ModelSpec.from_dict({"name": "x", "backbone": {"name": "resnet18"},
                             "insert": [{"block": {"type": "se"},
                                         "at": {"path": "a" * 10_000}}]})


@pytest.mark.parametrize("data", [
    {"name": "x" * 10**6, "backbone": {"name": "resnet18"}},
    {"name": "x", "backbone": {"name": "resnet" * 10**5}},
    {"name": "x", "backbone": {"source": "attnzoo", "name": "tiny" * 10**5}},
    {"name": "x", "backbone": {"name": "resnet18"},
     "insert": [{"block": {"type": "se" * 10**5}, "at": "residual"}]},
    {"name": "x", "backbone": {"name": "resnet18"},
     "insert": [{"block": {"type": "se", "q" * 10**5: 1}, "at": "residual"}]},
    {"name": "x", "backbone": {"name": "resnet18"},
     "insert": [{"block": {"type": "se"}, "at": "residual" * 10**5}]},
    {"name": "x", "backbone": {"name": "resnet18"}, "q" * 10**5: 1},
])
def test_huge_names_are_refused_with_a_short_message(data):
    """Names have length limits, and a stranger's megabyte-long key or value is not
    copied (let alone fuzzy-matched) into the error message."""
    start = time.perf_counter()
    msg = _error_of(data)
    assert len(msg) < 2000
    assert time.perf_counter() - start < 5


def _error_of(data) -> str:
    with pytest.raises(SpecError) as err:
        attnzoo.create_model(data)
    return str(err.value)


def test_create_block_with_a_non_string_type_is_a_spec_error():
    for bad in (None, 3, ["se"]):
        with pytest.raises(SpecError, match="unknown block type"):
            attnzoo.create_block(bad, 8)


def test_failed_build_leaves_the_zoo_usable():
    with pytest.raises(SpecError):
        attnzoo.create_model({"name": "x", "backbone": {"name": "resnet18"},
                              "insert": [{"block": {"type": "se"}, "at": "residual"},
                                         {"block": {"type": "se"}, "at": "nowhere"}]})
    model = attnzoo.create_model("resnet18_se")
    assert len(model.attnzoo_blocks) == 8


def test_safe_dump_of_spec_has_no_python_tags():
    for name in attnzoo.list_models():
        text = attnzoo.load_spec(name).to_yaml()
        assert "!!" not in text
        assert ModelSpec.from_yaml(text) == attnzoo.load_spec(name)


# --------------------------------------------------------------------- concurrency


def test_create_model_from_eight_threads_at_once():
    """Eight threads released together by a barrier build models at the same time (the
    test checks their build intervals overlap); every model is correct (the blocks,
    parameter names and shapes of a model built alone) and independent (no shared
    parameter storage, no shared submodule; its outputs are its own)."""
    names = ["resnet18_cbam", "resnet18_se"] * 4
    barrier = threading.Barrier(len(names), timeout=120)
    models: dict[int, torch.nn.Module] = {}
    spans: dict[int, tuple[float, float]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            start = time.perf_counter()
            model = attnzoo.create_model(names[i], num_classes=5 + i)
            spans[i] = (start, time.perf_counter())
            models[i] = model
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    assert sorted(models) == list(range(len(names)))
    # They really ran at the same time: every build started before any one ended.
    assert max(s for s, _ in spans.values()) < min(e for _, e in spans.values())

    alone = {n: attnzoo.create_model(n) for n in set(names)}
    storages: set[int] = set()
    modules: set[int] = set()
    for i, model in models.items():
        ref = alone[names[i]]
        assert type(model) is type(ref)
        assert [(b.name, b.block_type, b.site, b.channels) for b in model.attnzoo_blocks] == \
            [(b.name, b.block_type, b.site, b.channels) for b in ref.attnzoo_blocks]
        got = {k: v.shape for k, v in model.state_dict().items()}
        want = {k: v.shape for k, v in ref.state_dict().items()}
        assert got.keys() == want.keys()
        assert all(got[k] == want[k] for k in got if not k.startswith("fc."))
        assert got["fc.weight"] == (5 + i, 512)  # its own num_classes, not a neighbour's
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        for p in model.parameters():
            assert p.untyped_storage().data_ptr() not in storages
            storages.add(p.untyped_storage().data_ptr())
        own = {id(m) for m in model.modules()}
        assert not own & modules
        modules |= own
    # Their forward is their own: a model built alone with a thread-built model's weights
    # gives the same outputs; zeroing one model's classifier leaves the others' alone.
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for i in (0, 1):
            ref = attnzoo.create_model(names[i], num_classes=5 + i).eval()
            ref.load_state_dict(models[i].state_dict())
            assert torch.allclose(models[i].eval()(x), ref(x), atol=1e-5)
        models[0].fc.weight.zero_()
        models[0].fc.bias.zero_()
        assert torch.count_nonzero(models[0](x)) == 0
        assert all(torch.count_nonzero(models[i].eval()(x)) > 0 for i in (1, 2))
    # Same-class dynamic wrappers are shared across threads, not duplicated per thread.
    wrapped = {type(m.layer1[0].bn2) for i, m in models.items() if names[i] == "resnet18_cbam"}
    assert len(wrapped) == 1


def test_spec_errors_from_eight_threads_stay_in_their_thread():
    """Concurrent failing and succeeding builds: each thread gets its own outcome."""
    barrier = threading.Barrier(8, timeout=120)
    outcomes: dict[int, str] = {}

    def work(i: int) -> None:
        barrier.wait()
        data = {"name": f"t{i}", "backbone": {"name": "resnet10t"},
                "insert": [{"block": {"type": "se"},
                            "at": "residual" if i % 2 else f"nowhere{i}"}]}
        try:
            model = attnzoo.create_model(data)
            outcomes[i] = model.attnzoo_spec.name
        except SpecError as exc:
            outcomes[i] = str(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for i in range(8):
        if i % 2:
            assert outcomes[i] == f"t{i}"
        else:
            assert f"t{i}: insert[0] (se)" in outcomes[i] and f"nowhere{i}" in outcomes[i]


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
