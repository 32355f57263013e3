"""The builder (attnzoo/builder.py): what a built model is, where blocks go, how bad specs
fail, and that nothing in a stranger's spec is evaluated or imported. Which module a
site names is tested in test_sites.py."""

from __future__ import annotations

import builtins
import copy
import importlib
import sys
import threading
import time

import pytest
import timm
import torch
import yaml
from timm.models.resnet import ResNet

import attnzoo
from attnzoo import SpecError
from attnzoo.blocks.channel import SqueezeExcite
from attnzoo.blocks.mixed import CBAM
from tests._helpers.modules import live_batchnorm_
from tests._helpers.specs import make_spec

X = torch.randn(2, 3, 64, 64)


def live_bare(name="resnet18"):
    """A timm backbone whose last BNs are not zero (timm zero-inits them, which would
    make every residual branch output 0 and hide what an inserted block does)."""
    return live_batchnorm_(timm.create_model(name).eval())


def test_resnet50_cbam_is_a_timm_resnet_with_unchanged_names():
    model = attnzoo.create_model("resnet50_cbam")
    assert isinstance(model, ResNet)
    plain = timm.create_model("resnet50")
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys, "CBAM parameters should be missing from a plain resnet50"
    assert all(".attnzoo_after." in k for k in result.missing_keys)
    # 16 bottlenecks, CBAM before the add in each: after bn3.
    cbams = [n for n, m in model.named_modules() if isinstance(m, CBAM)]
    assert cbams == [f"layer{s}.{b}.bn3.attnzoo_after"
                     for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3), strict=True) for b in range(n)]
    assert model.attnzoo_spec.name == "resnet50_cbam"


def test_no_forward_hooks_and_timm_api_still_works():
    model = attnzoo.create_model("resnet18_cbam")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert model.forward_features(X).shape == (2, 512, 2, 2)
    model.reset_classifier(7)
    assert model(X).shape == (2, 7)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)


def test_inserted_block_changes_the_output_where_it_says():
    bare = timm.create_model("resnet18").eval()
    torch.nn.init.uniform_(bare.layer4[1].bn2.weight, 0.5, 1.5)  # timm zero-inits it
    model = attnzoo.create_model(make_spec({"block": {"type": "se"}, "at": "residual",
                                       "stages": [4], "blocks": [1]})).eval()
    model.load_state_dict(bare.state_dict(), strict=False)
    se = model.layer4[1].bn2.attnzoo_after
    assert isinstance(se, SqueezeExcite)
    x = torch.randn(1, 512, 4, 4)
    expected = se(bare.layer4[1].bn2(bare.layer4[1].conv2(x)))
    got = model.layer4[1].bn2(model.layer4[1].conv2(x))
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, bare.layer4[1].bn2(bare.layer4[1].conv2(x)))
    assert len(model.attnzoo_blocks) == 1


def test_num_classes_from_call_and_from_spec():
    assert attnzoo.create_model("resnet18_se", num_classes=10)(X).shape == (2, 10)
    assert attnzoo.create_model(make_spec(num_classes=3))(X).shape == (2, 3)


def test_backbone_args_are_forwarded():
    model = attnzoo.create_model("resnet18_se", in_chans=1)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 1000)


def test_before_sees_input_channels_and_after_output_channels():
    model = attnzoo.create_model(make_spec(
        {"block": {"type": "se"}, "at": {"path": "layer2.0.conv1", "position": "before"}},
        {"block": {"type": "se"}, "at": {"path": "layer2.0.conv1", "position": "after"}},
    ))
    rows = {b.position: b for b in model.attnzoo_blocks}
    assert rows["before"].channels == 64 and rows["after"].channels == 128
    assert rows["before"].size == (56, 56) and rows["after"].size == (28, 28)
    assert model(X).shape == (2, 1000)


def test_replace_puts_the_block_at_the_path():
    model = attnzoo.create_model(make_spec({"block": {"type": "cbam"},
                                       "at": {"path": "layer1.*.act2", "position": "replace"}}))
    assert isinstance(model.layer1[0].act2, CBAM)
    assert model(X).shape == (2, 1000)


def test_two_blocks_at_one_site_chain_in_order():
    model = attnzoo.create_model(make_spec({"block": {"type": "se"}, "at": "residual"},
                                      {"block": {"type": "cbam"}, "at": "residual"}))
    chain = model.layer1[0].bn2.attnzoo_after
    assert isinstance(chain[0], SqueezeExcite) and isinstance(chain[1], CBAM)
    assert model(X).shape == (2, 1000)


# Found by test_random_specs_build_or_raise_spec_error (test_properties.py; builder.py,
# reported): sites are resolved before anything is inserted, so a replace and another
# insertion in the same subtree collide.
REPLACE_COLLISIONS = {
    "insert inside a module replaced before": [
        {"block": {"type": "se"}, "at": {"path": "layer1.0", "position": "replace"}},
        {"block": {"type": "se"}, "at": {"path": "layer1.0.conv1"}}],  # AttributeError
    "replace a module that holds an insertion": [
        {"block": {"type": "se"}, "at": {"path": "layer1.0.conv1"}},
        {"block": {"type": "se"}, "at": {"path": "layer1.0", "position": "replace"}}],
    "replace one module twice": [
        {"block": {"type": "se"}, "at": {"path": "layer1.0", "position": "replace"}},
        {"block": {"type": "eca"}, "at": {"path": "layer1.0", "position": "replace"}}],
}


@pytest.mark.parametrize("insert", list(REPLACE_COLLISIONS.values()),
                         ids=list(REPLACE_COLLISIONS))
def test_sites_inside_a_replaced_module_are_spec_errors(insert):
    with pytest.raises(SpecError, match="replace"):
        attnzoo.create_model({"name": "x", "backbone": {"name": "resnet10t"}, "insert": insert})


def test_a_site_may_hold_a_replaced_module():
    """resnet50_cot's replaced 3x3 conv and a BAM after the stage that holds it."""
    model = attnzoo.create_model({"name": "x", "backbone": {"name": "resnet10t"}, "insert": [
        {"block": {"type": "contextual_transformer"},
         "at": {"path": "layer1.0.conv2", "position": "replace"}},
        {"block": {"type": "bam"}, "at": {"path": "layer1", "position": "after"}}]})
    assert [b.block_type for b in model.attnzoo_blocks] == ["contextual_transformer", "bam"]
    assert type(model.layer1[0].conv2).__name__ == "ContextualTransformer"
    assert model(X).shape == (2, 1000)


@pytest.mark.parametrize("block", ["se", "cbam", "eca", "simam", "global_context"])
def test_zero_init_keeps_the_backbone_outputs(block):
    bare = live_bare()
    model = attnzoo.create_model(make_spec({"block": {"type": block}, "at": "residual",
                                       "zero_init": True})).eval()
    model.load_state_dict(bare.state_dict(), strict=False)
    torch.testing.assert_close(model(X), bare(X))
    if block != "global_context":  # GC starts as the identity even without zero_init
        plain = attnzoo.create_model(make_spec({"block": {"type": block}, "at": "residual"})).eval()
        plain.load_state_dict(bare.state_dict(), strict=False)
        assert not torch.allclose(plain(X), bare(X))


def test_unknown_backbone_suggests_names():
    with pytest.raises(SpecError, match="resnet50"):
        attnzoo.create_model(make_spec(backbone="resnet5O"))


def test_bad_backbone_arg_is_a_spec_error():
    with pytest.raises(SpecError, match="bad args"):
        attnzoo.create_model(make_spec(), not_an_arg=1)


@pytest.mark.parametrize("args", [{"act_layer": "no_such_act"}, {"in_chans": -3},
                                  {"norm_layer": "no_such_norm"}])
def test_bad_backbone_args_are_spec_errors(args):
    with pytest.raises(SpecError, match="backbone"):
        attnzoo.create_model({"name": "x", "backbone": {"name": "resnet18", "args": args}})


def test_deepcopy_and_state_dict_round_trip():
    model = attnzoo.create_model("resnet18_cbam").eval()
    clone = copy.deepcopy(model)
    other = attnzoo.create_model("resnet18_cbam").eval()
    other.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(clone(X), model(X))
    torch.testing.assert_close(other(X), model(X))


def test_backward_reaches_inserted_blocks():
    model = attnzoo.create_model("resnet18_cbam")
    live_batchnorm_(model)  # timm zero-inits the last BN of each block; undo it
    model(X).sum().backward()
    grad = model.layer1[0].bn2.attnzoo_after.channel.fc1.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_block_at_a_site_of_the_wrong_rank_is_refused():
    with pytest.raises(SpecError, match=r"takes 4-D \(N, C, H, W\) tensors.*'fc'.*2-D"):
        attnzoo.create_model(make_spec({"block": {"type": "se"},
                                   "at": {"path": "fc", "position": "after"}}))


def test_a_two_input_block_cannot_be_inserted_at_one_site():
    for block in ("gau", "ffm"):
        with pytest.raises(SpecError, match=f"'{block}' fuses several inputs"):
            attnzoo.create_model(make_spec({"block": {"type": block}, "at": "post_add"}))


def test_call_time_args_are_written_into_the_recorded_spec(tmp_path):
    model = attnzoo.create_model("resnet18_cbam", num_classes=7, drop_rate=0.25,
                                 drop_path_rate=0.1).eval()
    recorded = model.attnzoo_spec
    assert recorded.num_classes == 7
    assert recorded.backbone.args == {"drop_rate": 0.25, "drop_path_rate": 0.1}
    assert attnzoo.load_spec("resnet18_cbam").backbone.args == {}  # the zoo's is untouched
    rebuilt = attnzoo.create_model(attnzoo.ModelSpec.from_yaml(recorded.to_yaml()))
    assert rebuilt.drop_rate == 0.25 and rebuilt.fc.out_features == 7
    attnzoo.save_pretrained(model, tmp_path / "saved")
    loaded = attnzoo.create_model(tmp_path / "saved").eval()
    assert loaded.drop_rate == 0.25
    torch.testing.assert_close(loaded(X), model(X))


def test_resnet50_cbam_forward_with_default_and_custom_classes():
    assert attnzoo.create_model("resnet50_cbam")(X).shape == (2, 1000)
    assert attnzoo.create_model("resnet50_cbam", num_classes=10)(X).shape == (2, 10)


def test_sync_batchnorm_conversion_keeps_the_blocks_running():
    model = attnzoo.create_model("resnet18_cbam").eval()
    live_batchnorm_(model)  # un-zero timm's last BNs so the blocks matter
    expected = model(X)
    # torch's conversion alone keeps the blocks as children that nothing calls
    plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert not torch.allclose(plain(X), expected)
    assert len(attnzoo.reattach_blocks(plain)) == 8
    torch.testing.assert_close(plain(X), expected)
    synced = attnzoo.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert isinstance(synced.layer1[0].bn2, torch.nn.SyncBatchNorm)
    assert isinstance(synced.layer1[0].bn2.attnzoo_after, CBAM)
    torch.testing.assert_close(synced(X), expected)
    assert attnzoo.reattach_blocks(synced) == []


def test_failed_build_leaves_the_zoo_usable():
    with pytest.raises(SpecError):
        attnzoo.create_model({"name": "x", "backbone": {"name": "resnet18"},
                              "insert": [{"block": {"type": "se"}, "at": "residual"},
                                         {"block": {"type": "se"}, "at": "nowhere"}]})
    model = attnzoo.create_model("resnet18_se")
    assert len(model.attnzoo_blocks) == 8


# --- specs from strangers: no string of a spec is evaluated or imported -----------------


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


# --- concurrency ------------------------------------------------------------------------


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
