"""tools/bench.py works: naive references equal the blocks, timing and memory helpers,
the report renders. No timing is asserted."""

from __future__ import annotations

from pathlib import Path

import bench
import pytest
import torch


@pytest.mark.parametrize("name", ["non_local", "criss_cross", "mhsa2d"])
@pytest.mark.parametrize("size", [4, 6])
def test_naive_reference_equals_the_block(name: str, size: int) -> None:
    block = bench.make_block(name, 16, size)
    x = torch.randn(2, 16, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = block(x)
        naive = bench.NAIVE[name](block, x)
    assert not torch.equal(expected, x)  # not the identity: the attention path counts
    torch.testing.assert_close(naive, expected, rtol=1e-4, atol=1e-5)


def test_kernel_child_measures_time_and_memory() -> None:
    out = bench._kernel_child({"block": "criss_cross", "size": 8, "channels": 16,
                               "impl": "naive", "repeats": 2})
    assert out["seconds"] > 0 and out["peak_bytes"] >= 0


def test_peak_memory_sees_an_allocation() -> None:
    with bench.PeakMemory() as mem:
        t = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        del t
    if mem.reset:
        assert mem.peak >= 60 * bench.MIB


def test_interleaved_runs_in_turns_and_skips_warmup() -> None:
    calls: list[str] = []
    out = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                            repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert set(out) == {"a", "b"} and all(v >= 0 for v in out.values())


def test_peers_build_and_report_renders(tmp_path: Path) -> None:
    model = bench.timm_peer("resnet18", {"block_args": {"attn_layer": "eca"}}, num_classes=3)
    assert any("eca" in type(m).__name__.lower() for m in model.modules())
    results = {
        "settings": {"quick": True}, "machine": bench.machine(),
        "build": [{"zoo": "z", "peer": "p", "attnzoo_s": 1.0, "timm_s": 0.9, "ratio": 1.11,
                   "attnzoo_params": 10, "timm_params": 10}],
        "throughput": [{"zoo": "z", "peer": "p", "backend": "eager", "mode": "fwd",
                        "batch": 1, "attnzoo_ips": 10.0, "timm_ips": 10.1, "ratio": 0.99}],
        "load": {"file_bytes": 100 * bench.MIB, "peer_file_bytes": 100 * bench.MIB,
                 "times": {"attnzoo_folder": 0.2, "attnzoo_zoo": 0.2,
                           "timm_build_then_load": 0.7},
                 "memory": {"attnzoo_folder": {"peak_bytes": 110 * bench.MIB},
                            "attnzoo_zoo": {"error": "boom"},
                            "timm_build_then_load": {"peak_bytes": 220 * bench.MIB}}},
        "kernels": [{"block": "non_local", "channels": 512, "size": 32,
                     "attnzoo": {"seconds": 0.1, "peak_bytes": bench.MIB},
                     "naive": {"skipped": "skipped (needs ~9 GiB)"}}],
        "appendix": ["## Measured by hand\n\na table"],
        "notes": ["a reason"],
    }
    text = bench.render(results)
    assert text.index("## Measured by hand") < text.index("## Goals missed, and why")
    assert "| z | p | 1,000 ms | 900 ms | 1.11x | met |" in text
    assert "3.50x" in text and "1.10x" in text and "boom" in text
    assert "skipped (needs ~9 GiB)" in text and "- a reason" in text
    assert results["machine"]["torch"] in text
