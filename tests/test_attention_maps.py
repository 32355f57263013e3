"""attnzoo.record_attention: what each block records (shapes and the values attention
must have), the recorder itself (keys, queries, nothing left attached, compile), and
``attnzoo maps``'s picture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo import attention_maps
from attnzoo.attention_maps import record_attention, render_maps, spatial_maps
from tests._helpers.modules import randomize_ as rand_


def maps_of(name: str, channels: int = 64, size=(8, 8), batch: int = 2, queries=None, **cfg):
    block = rand_(attnzoo.create_block(name, channels, size=size, **cfg))
    x = torch.randn(batch, channels, *size)
    kwargs = {} if queries is None else {"queries": queries}
    with torch.no_grad(), record_attention(block, **kwargs) as maps:
        y = block(x)
    return block, x, y, maps


def in_unit_interval(t: torch.Tensor) -> bool:
    return bool(((t >= 0) & (t <= 1)).all())


# --- the new blocks: shapes and values --------------------------------------------------------

# block -> (key, kind, shape for channels 64, size 8x8, batch 2)
GATES = {
    "coordinate_attention": ("", "spatial", (2, 64, 8, 8)),
    "triplet_attention": ("", "spatial", (2, 64, 8, 8)),
    "bam": ("", "spatial", (2, 64, 8, 8)),
    "shuffle_attention": ("", "spatial", (2, 64, 8, 8)),
    "spatial_group_enhance": ("", "spatial", (2, 64, 8, 8)),
    "efficient_multiscale_attention": ("", "spatial", (2, 32, 8, 8)),
    "effective_se": ("", "channel", (2, 64, 1, 1)),
    "gather_excite": ("", "channel", (2, 64, 1, 1)),
}


@pytest.mark.parametrize("name", sorted(GATES))
def test_gates_are_weights_in_the_unit_interval(name):
    key, kind, shape = GATES[name]
    _, _, _, maps = maps_of(name)
    assert list(maps) == [key] and maps.kinds[key] == kind
    assert maps[key].shape == shape
    assert in_unit_interval(maps[key])


@pytest.mark.parametrize("name", ["bam", "coordinate_attention", "triplet_attention",
                                  "effective_se", "shuffle_attention"])
def test_a_gate_is_what_multiplies_the_input(name):
    block, x, y, maps = maps_of(name)
    gate = maps[""]
    want = x + x * gate if name == "bam" else x * gate
    if name == "shuffle_attention":  # the gate is given in the output's (shuffled) order
        want = attnzoo.blocks.grouped.channel_shuffle(x, 2) * gate
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_scse_records_its_channel_and_spatial_gates():
    _, x, y, maps = maps_of("scse")
    assert (maps.kinds["channel"], maps.kinds["spatial"]) == ("channel", "spatial")
    assert maps["channel"].shape == (2, 64, 1, 1) and maps["spatial"].shape == (2, 1, 8, 8)
    torch.testing.assert_close(y, x * maps["channel"] + x * maps["spatial"])


def test_gather_excite_with_an_extent_records_a_spatial_gate():
    _, _, _, maps = maps_of("gather_excite", extent=2, extra_params=False)
    assert maps.kinds[""] == "spatial" and maps[""].shape == (2, 64, 8, 8)
    assert in_unit_interval(maps[""])


def test_danet_position_affinity_rows_are_softmaxes_over_the_keys():
    block, x, _, maps = maps_of("danet_position", 32, (6, 5), queries="all")
    full = maps[""]
    assert maps.kinds[""] == "affinity" and full.shape == (2, 30, 6, 5)
    torch.testing.assert_close(full.sum((-2, -1)), torch.ones(2, 30))
    q = block.query_conv(x).flatten(2).transpose(1, 2)
    k = block.key_conv(x).flatten(2)
    torch.testing.assert_close(full.flatten(2), (q @ k).softmax(-1), atol=1e-5, rtol=1e-5)
    # default: the centre query only, one row of the full matrix
    with torch.no_grad(), record_attention(block) as centre:
        block(x)
    assert centre[""].shape == (2, 1, 6, 5)
    torch.testing.assert_close(centre[""][:, 0], full[:, 3 * 5 + 2])
    with torch.no_grad(), record_attention(block, queries=[(0, 0), (1, 1)]) as corners:
        block(x)
    torch.testing.assert_close(corners[""], full[:, [0, 29]])


def test_danet_channel_affinity_rows_sum_to_one():
    _, _, _, maps = maps_of("danet_channel", 16)
    assert maps[""].shape == (2, 16, 16) and maps.kinds[""] == "other"
    torch.testing.assert_close(maps[""].sum(-1), torch.ones(2, 16))


def test_generalized_attention_affinity_is_per_head_over_the_subsampled_keys():
    _, _, _, maps = maps_of("generalized_attention", 32, (8, 6), queries=[(0.5, 0.5), (0, 0)])
    assert maps[""].shape == (2, 8, 2, 4, 3)          # heads, queries, keys at kv_stride 2
    torch.testing.assert_close(maps[""].sum((-2, -1)), torch.ones(2, 8, 2))


def test_halo_affinity_places_each_window_on_the_map():
    block, x, _, maps = maps_of("halo_attention", 32, (16, 16), num_heads=4, block_size=4,
                                halo_size=1, queries=[(0.4, 0.4), (0, 0)])
    a = maps[""]
    assert a.shape == (2, 4, 2, 16, 16)
    # an inner query's window lies inside the map: its weights sum to 1
    torch.testing.assert_close(a[:, :, 0].sum((-2, -1)), torch.ones(2, 4))
    # the corner query's window reaches into the zero padding: less than 1 on the map,
    # and nothing outside its block grown by the halo (rows/cols 0..4)
    assert (a[:, :, 1].sum((-2, -1)) < 1).all()
    assert a[:, :, 1, 5:].abs().sum() == 0 and a[:, :, 1, :, 5:].abs().sum() == 0


def test_lambda_keys_are_softmaxes_over_the_positions():
    _, _, _, maps = maps_of("lambda_layer", 32, (6, 7), r=5)
    assert maps[""].shape == (2, 16, 6, 7)
    torch.testing.assert_close(maps[""].sum((-2, -1)), torch.ones(2, 16))


def test_external_attention_is_normalised_over_the_memory_units():
    _, _, _, maps = maps_of("external_attention", 32, (6, 5))
    assert maps[""].shape == (2, 64, 6, 5)
    torch.testing.assert_close(maps[""].sum(1), torch.ones(2, 6, 5))


@pytest.mark.parametrize(("name", "shape"), [("split_attention", (2, 2, 64, 1, 1)),
                                            ("contextual_transformer", (2, 2, 64, 1, 1))])
def test_branch_weights_are_softmaxes_over_the_branches(name, shape):
    _, _, _, maps = maps_of(name)
    assert maps[""].shape == shape and maps.kinds[""] == "other"
    torch.testing.assert_close(maps[""].sum(1), torch.ones(shape[0], *shape[2:]))


# --- the recorder -------------------------------------------------------------------------


def small_model() -> nn.Module:
    spec = {"name": "maps", "input_size": [3, 32, 32],
            "backbone": {"source": "attnzoo", "name": "tiny_cnn",
                         "args": {"in_chans": 3, "widths": [16, 32], "depths": [1, 1]}},
            "insert": [{"block": {"type": "bam"}, "at": {"path": "stages.*.*"}},
                       {"block": {"type": "scse"}, "at": {"path": "stages.1.0"}}]}
    return rand_(attnzoo.create_model(spec))


def test_keys_are_module_paths_in_the_model_and_nothing_stays_attached():
    model = small_model()
    before = ({k: v.clone() for k, v in model.state_dict().items()},
              [n for n, _ in model.named_modules()])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        with record_attention(model) as maps:
            got = model(x)
    torch.testing.assert_close(got, want)
    assert list(maps) == ["stages.0.0.attnzoo_after", "stages.1.0.attnzoo_after.0",
                          "stages.1.0.attnzoo_after.1:channel",
                          "stages.1.0.attnzoo_after.1:spatial"]
    assert attention_maps._ACTIVE is None
    assert [n for n, _ in model.named_modules()] == before[1]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[0][k])
    with torch.no_grad():
        model(x)
    assert len(maps) == 4  # a forward pass outside the ``with`` records nothing


def test_repeated_keys_are_numbered_and_other_models_are_not_recorded():
    model, other = small_model(), small_model()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), record_attention(model) as maps:
        model(x)
        model(x)
        other(x)
    assert "stages.0.0.attnzoo_after#1" in maps and len(maps) == 8
    with torch.no_grad(), record_attention(model) as outer, record_attention(other) as inner:
        model(x)
        other(x)
    assert len(outer) == len(inner) == 4


def test_recorded_maps_keep_their_graph_when_asked():
    model = small_model()
    with record_attention(model, detach=False) as maps:
        model(torch.randn(1, 3, 32, 32))
    maps["stages.0.0.attnzoo_after"].mean().backward()
    assert model.stages[0][0].attnzoo_after.spatial[0].weight.grad is not None


def test_bad_queries_are_refused():
    with pytest.raises(ValueError, match="queries"), record_attention(nn.Identity(),
                                                                      queries="centre"):
        pass


def test_models_with_record_calls_compile_as_one_graph():
    model = small_model()
    x = torch.randn(1, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
        with record_attention(model) as maps:
            compiled(x)  # inside a compiled graph nothing is recorded
    assert maps == {}
    torch._dynamo.reset()


def test_spatial_maps_reduce_to_one_heat_map_each():
    model = small_model()
    with torch.no_grad(), record_attention(model) as maps:
        model(torch.randn(2, 3, 32, 32))
    heats = spatial_maps(maps)
    assert list(heats) == ["stages.0.0.attnzoo_after", "stages.1.0.attnzoo_after.0",
                           "stages.1.0.attnzoo_after.1:spatial"]
    assert heats["stages.0.0.attnzoo_after"].shape == (32, 32)
    torch.testing.assert_close(heats["stages.0.0.attnzoo_after"],
                               maps["stages.0.0.attnzoo_after"][0].mean(0))


def test_render_maps_draws_one_panel_per_spatial_map():
    model = small_model()
    with torch.no_grad(), record_attention(model) as maps:
        model(torch.randn(1, 3, 32, 32))
    picture = render_maps(torch.rand(3, 40, 50), maps, panel=64, columns=2, label_height=10)
    assert picture.size == (2 * 64, 2 * 74)  # 3 panels in 2 columns: 2 rows


def test_maps_command_writes_the_picture(tmp_path, capsys):
    from PIL import Image

    from attnzoo_cli import main

    spec = tmp_path / "maps.yaml"
    spec.write_text(
        "name: maps\ninput_size: [3, 32, 32]\n"
        "backbone: {source: attnzoo, name: tiny_cnn,\n"
        "           args: {in_chans: 3, widths: [16, 32], depths: [1, 1]}}\n"
        "insert:\n  - block: {type: bam}\n    at: {path: 'stages.*.*'}\n"
        "  - block: {type: effective_se}\n    at: {path: 'stages.1.0'}\n", encoding="utf-8")
    image = tmp_path / "cat.png"
    Image.new("RGB", (50, 40), (120, 60, 30)).save(image)
    out = tmp_path / "maps.png"
    assert main(["maps", str(spec), str(image), "--out", str(out), "--columns", "1"]) == 0
    assert "2 spatial maps of 3 recorded" in capsys.readouterr().out
    with Image.open(out) as picture:
        assert picture.size == (160, 2 * 174)  # two panels (bam x2; eSE is a channel gate)
    assert main(["maps", str(spec), str(tmp_path / "none.png"), "--out", str(out)]) == 2
    assert "cannot read image" in capsys.readouterr().err


# --- every block type of the zoo ----------------------------------------------------------

# Blocks that compute no attention: the no-op, and STDC's conv module.
NO_ATTENTION = {"identity", "stdc"}
# Blocks that fuse several maps: their inputs (N = 2, C = 48, 8x8).
FUSION_INPUTS = {
    "ffm": lambda: (torch.randn(2, 16, 8, 8), torch.randn(2, 32, 8, 8)),
    "gau": lambda: (torch.randn(2, 48, 8, 8), torch.randn(2, 48, 4, 4)),
    "reverse": lambda: (torch.randn(2, 48, 8, 8), torch.randn(2, 1, 4, 4)),
}


# Fields that make a block take 48 channels.
FITS_48 = {"sk": {"groups": 16}}


def record_block(name: str, queries=None, block=None, inputs=None, **cfg):
    if block is None:
        block = rand_(attnzoo.create_block(name, 48, size=(8, 8),
                                           **{**FITS_48.get(name, {}), **cfg}))
    if inputs is None:
        inputs = FUSION_INPUTS[name]() if name in FUSION_INPUTS else (
            torch.randn(2, 48, 8, 8),)
    kwargs = {} if queries is None else {"queries": queries}
    with torch.no_grad(), record_attention(block, **kwargs) as maps:
        block(*inputs)
    return block, inputs, maps


@pytest.mark.parametrize("name", attnzoo.list_blocks())
def test_every_block_type_records_its_attention(name):
    _, _, maps = record_block(name)
    if name in NO_ATTENTION:
        assert maps == {}
        return
    assert maps, f"{name} records no attention map"
    for key, value in maps.items():
        assert maps.kinds[key] in attention_maps.KINDS
        assert value.shape[0] == 2 and torch.isfinite(value).all(), key


CHANNEL_WEIGHTS = ["se", "eca", "fca", "gsop", "arm", "ffm", "effective_se"]


@pytest.mark.parametrize("name", CHANNEL_WEIGHTS)
def test_channel_weights_lie_in_the_unit_interval(name):
    _, _, maps = record_block(name)
    (key,) = maps
    assert maps.kinds[key] == "channel" and maps[key].shape == (2, 48, 1, 1)
    assert in_unit_interval(maps[key])


def test_cbam_gct_and_gau_channel_weights():
    _, _, maps = record_block("cbam")
    assert maps.kinds["channel"] == "channel" and in_unit_interval(maps["channel"])
    assert maps["spatial"].shape == (2, 1, 8, 8) and in_unit_interval(maps["spatial"])
    _, _, maps = record_block("gct")
    assert ((maps[""] >= 0) & (maps[""] <= 2)).all()            # 1 + tanh
    _, _, maps = record_block("gau")
    assert maps[""].shape == (2, 48, 1, 1) and (maps[""] >= 0).all()  # ReLU'd gate


@pytest.mark.parametrize(("name", "key", "shape"), [
    ("simam", "", (2, 48, 8, 8)), ("reverse", "", (2, 1, 8, 8)),
    ("polarized", "spatial", (2, 1, 8, 8)), ("residual_attention", "", (2, 48, 8, 8))])
def test_spatial_weights_lie_in_the_unit_interval(name, key, shape):
    _, _, maps = record_block(name)
    assert maps[key].shape == shape and in_unit_interval(maps[key])


def test_global_context_map_is_a_softmax_over_the_positions():
    _, _, maps = record_block("global_context")
    assert maps[""].shape == (2, 1, 8, 8)
    torch.testing.assert_close(maps[""].sum((-2, -1)), torch.ones(2, 1))


@pytest.mark.parametrize(("name", "cfg", "key", "keys"), [
    ("non_local", {}, "", (4, 4)), ("non_local", {"subsample": False}, "", (8, 8)),
    ("disentangled_non_local", {}, "pairwise", (8, 8)),
    ("mhsa2d", {}, "", (8, 8)), ("multi_head_attention", {}, "", (8, 8))])
def test_pairwise_affinities_are_softmax_rows_for_the_chosen_queries(name, cfg, key, keys):
    block, inputs, maps = record_block(name, queries="all", **cfg)
    full = maps[key]
    assert maps.kinds[key] == "affinity" and full.shape[-2:] == keys and full.shape[-3] == 64
    torch.testing.assert_close(full.sum((-2, -1)), torch.ones(full.shape[:-2]))
    _, _, centre = record_block(name, block=block, inputs=inputs)
    torch.testing.assert_close(centre[key][..., 0, :, :], full[..., 4 * 8 + 4, :, :],
                               atol=1e-5, rtol=1e-5)


def test_disentangled_unary_map_is_one_softmax_over_the_keys():
    _, _, maps = record_block("disentangled_non_local")
    assert maps["unary"].shape == (2, 1, 8, 8)
    torch.testing.assert_close(maps["unary"].sum((-2, -1)), torch.ones(2, 1))


def test_criss_cross_weights_lie_on_the_querys_row_and_column():
    _, _, maps = record_block("criss_cross", queries=[(0.25, 0.5)])
    assert set(maps) == {"", "#1"}  # one map per pass (R = 2)
    cross = maps[""][:, 0]                                          # query (2, 4)
    torch.testing.assert_close(cross.sum((-2, -1)), torch.ones(2))
    off = cross.clone()
    off[:, 2, :] = 0
    off[:, :, 4] = 0
    assert off.abs().sum() == 0


def test_double_attention_gathers_over_positions_and_distributes_over_descriptors():
    _, _, maps = record_block("double_attention")
    torch.testing.assert_close(maps["gather"].sum((-2, -1)), torch.ones(2, 24))
    torch.testing.assert_close(maps["distribute"].sum(1), torch.ones(2, 8, 8))


def test_outlook_sk_and_sequence_weights_are_softmaxes():
    _, _, maps = record_block("outlook")
    assert maps[""].shape == (2, 6, 16, 9, 9)                     # heads, windows, K^2, K^2
    torch.testing.assert_close(maps[""].sum(-1), torch.ones(2, 6, 16, 9))
    _, _, maps = record_block("sk")
    torch.testing.assert_close(maps[""].sum(1), torch.ones(2, 48, 1, 1))
    _, _, maps = record_block("attention")
    torch.testing.assert_close(maps[""].sum(-1), torch.ones(2, 64))
    block = rand_(attnzoo.create_block("multi_head_attention", 48))
    with torch.no_grad(), record_attention(block) as maps:
        block(torch.randn(2, 7, 48))
    assert maps[""].shape == (2, 8, 7, 7) and maps.kinds[""] == "other"
    torch.testing.assert_close(maps[""].sum(-1), torch.ones(2, 8, 7))


def test_stn_records_theta_and_the_grid_it_samples_with():
    block = attnzoo.create_block("stn", 3, size=(16, 16))
    with torch.no_grad():
        block.theta.bias.copy_(torch.tensor([0.8, 0.1, 0.05, -0.2, 0.9, 0.1]))
        block.theta.weight.normal_(0, 0.01)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), record_attention(block) as maps:
        y = block(x)
    theta, grid = maps["theta"], maps["grid"]
    assert theta.shape == (2, 2, 3) and grid.shape == (2, 16, 16, 2)
    torch.testing.assert_close(grid, torch.nn.functional.affine_grid(theta, list(x.shape),
                                                                     align_corners=False))
    torch.testing.assert_close(y, torch.nn.functional.grid_sample(x, grid, align_corners=False))
