"""attnzoo against its hand-written peers, measured side by side; writes BENCHMARKS.md.

Sections (issue 12):

* ``build``: ``attnzoo.create_model(zoo)`` vs ``timm.create_model(peer)`` for four pairs;
* ``throughput``: forward (eval, no grad) and forward+backward (train) images/s at
  224x224, batch 1 and 8, eager and ``torch.compile`` (inductor), same pairs;
* ``load``: pretrained load of resnet50_se, ``create_model(folder)`` and
  ``create_model("resnet50_se", pretrained=True)`` vs building timm's seresnet50 and
  loading its safetensors file: time, and peak memory in a fresh process each;
* ``kernels``: ``non_local``, ``criss_cross`` and ``mhsa2d`` against naive references
  that form the HW x HW attention explicitly, 32x32 to 128x128: time and peak memory
  (a fresh process per point), as curves over resolution.

Every time is the median of repeated runs after warm-up runs that are not counted;
the two sides of a comparison run interleaved (A B A B ...) so that drift of the
machine (other processes, clocks, heat) hits both. Peak memory is the growth of the
process's peak resident set (``VmHWM`` of /proc/self/status, reset through
/proc/self/clear_refs where the kernel allows) in a fresh interpreter per figure.

    python tools/bench.py                       # everything, writes BENCHMARKS.md
    python tools/bench.py --quick               # fewer repeats, no torch.compile
    python tools/bench.py --compile-all         # compile every pair, fwd and fwd+bwd
    python tools/bench.py --sections build load --out /tmp/b.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 ** 2

# (attnzoo zoo model, timm peer, timm kwargs)
PAIRS: list[tuple[str, str, dict[str, Any]]] = [
    ("resnet50_se", "seresnet50", {}),
    ("resnet50_cbam", "resnet50", {"block_args": {"attn_layer": "cbam"}}),
    ("resnet18_sk", "skresnet18", {}),
    ("resnet50_eca", "resnet50", {"block_args": {"attn_layer": "eca"}}),
]
KERNEL_CHANNELS = {"non_local": 512, "criss_cross": 512, "mhsa2d": 512}


# ------------------------------------------------------------------------------ timing


def median(values: list[float]) -> float:
    """The median of a non-empty list."""
    return statistics.median(values)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
                ) -> dict[str, float]:
    """Median seconds per call of each function, run in turns (A B A B ...).

    ``warmup`` rounds run first and are not counted.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: median(v) for k, v in times.items()}


def timm_peer(name: str, kwargs: dict[str, Any], **extra: Any) -> nn.Module:
    """The timm model a zoo model is compared with."""
    import timm

    return timm.create_model(name, pretrained=False, **kwargs, **extra)


def _zoo(name: str, **extra: Any) -> nn.Module:
    import attnzoo

    return attnzoo.create_model(name, **extra)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------- build


def bench_build(repeats: int) -> list[dict[str, Any]]:
    """Build time of each zoo model and its timm peer (random init, CPU)."""
    rows = []
    for zoo, peer, kwargs in PAIRS:
        t = interleaved({"attnzoo": lambda z=zoo: _zoo(z),
                         "timm": lambda p=peer, k=kwargs: timm_peer(p, k)}, repeats)
        rows.append({"zoo": zoo, "peer": _peer_name(peer, kwargs), "attnzoo_s": t["attnzoo"],
                     "timm_s": t["timm"], "ratio": t["attnzoo"] / t["timm"],
                     "attnzoo_params": param_count(_zoo(zoo)),
                     "timm_params": param_count(timm_peer(peer, kwargs))})
        print(f"build {zoo}: {rows[-1]['ratio']:.2f}x", file=sys.stderr, flush=True)
    return rows


def _peer_name(peer: str, kwargs: dict[str, Any]) -> str:
    attn = kwargs.get("block_args", {}).get("attn_layer")
    return f"{peer} + attn_layer={attn}" if attn else peer


# -------------------------------------------------------------------------- throughput


def _step(model: nn.Module, x: torch.Tensor, train: bool) -> Callable[[], None]:
    if train:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            model(x).float().mean().backward()
    else:
        def run() -> None:
            with torch.no_grad():
                model(x)
    return run


def bench_throughput(batches: list[int], size: int, repeats: int, compile_pairs: list[str],
                     compile_train: bool, pairs: list[str] | None = None
                     ) -> list[dict[str, Any]]:
    """Images/s of each pair: forward (eval, no grad) and forward+backward (train), eager
    for every pair, ``torch.compile`` for the pairs in ``compile_pairs``."""
    rows = []
    for zoo, peer, kwargs in PAIRS:
        if pairs is not None and zoo not in pairs:
            continue
        torch.manual_seed(0)
        models = {"attnzoo": _zoo(zoo), "timm": timm_peer(peer, kwargs)}
        backends = ["eager"] + (["compile"] if zoo in compile_pairs else [])
        for backend in backends:
            for train in (False, True):
                if backend == "compile" and train and not compile_train:
                    continue
                for batch in batches:
                    x = torch.randn(batch, 3, size, size, generator=torch.Generator()
                                    .manual_seed(batch))
                    fns = {}
                    for side, model in models.items():
                        model.train(train)
                        run_model = torch.compile(model) if backend == "compile" else model
                        fns[side] = _step(run_model, x, train)
                    warm = 2 if backend == "compile" else 1  # compile, then one clean run
                    try:
                        t = interleaved(fns, repeats, warmup=warm)
                    except (ValueError, RuntimeError) as exc:  # e.g. BN on 1x1 at batch 1
                        rows.append({"zoo": zoo, "peer": _peer_name(peer, kwargs),
                                     "backend": backend, "mode": "fwd+bwd" if train else "fwd",
                                     "batch": batch, "error": str(exc).splitlines()[0][:120]})
                        torch._dynamo.reset()
                        continue
                    rows.append({"zoo": zoo, "peer": _peer_name(peer, kwargs),
                                 "backend": backend, "mode": "fwd+bwd" if train else "fwd",
                                 "batch": batch, "attnzoo_ips": batch / t["attnzoo"],
                                 "timm_ips": batch / t["timm"],
                                 "ratio": t["timm"] / t["attnzoo"]})
                    torch._dynamo.reset()
                    print(f"throughput {zoo} {backend} {rows[-1]['mode']} b{batch}: "
                          f"{rows[-1]['ratio']:.3f}", file=sys.stderr, flush=True)
    return rows


# -------------------------------------------------------------------- memory (children)


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS, where Linux allows."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Collect garbage and hand free heap memory back to the OS (glibc ``malloc_trim``),
    so that memory freed by a warm-up is not silently reused inside a measurement."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Growth of the peak resident set (``peak``, from VmHWM) over the resident set at
    entry, after freeing what the process no longer uses; and the growth of anonymous
    memory (``anon_peak``, RssAnon sampled every millisecond by a thread).

    VmHWM counts file-backed pages too (an mmap of a weights file) but can understate
    a peak when the kernel drops pages of shared libraries under memory pressure
    while the measurement runs; anonymous memory (every tensor torch allocates) is
    immune to that, but misses mmap'd files. Both are reported.
    """

    def __enter__(self) -> PeakMemory:
        import threading

        release_free_memory()
        self.reset = reset_peak()
        self.base = _proc_status_bytes("VmRSS")
        self.anon_base = _proc_status_bytes("RssAnon")
        self._anon_max = self.anon_base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._anon_max = max(self._anon_max, _proc_status_bytes("RssAnon"))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._anon_max = max(self._anon_max, _proc_status_bytes("RssAnon"))
        self.peak = _proc_status_bytes("VmHWM") - self.base
        self.anon_peak = self._anon_max - self.anon_base


def _run_child(args: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """Run ``bench.py --child`` with ``args`` in a fresh interpreter; its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)],
                          capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- pretrained load


def prepare_load_files(folder: Path) -> dict[str, str]:
    """Write the files the load benchmark reads: an attnzoo folder of resnet50_se
    (``save_pretrained``), the same weights as a zoo manifest's embedded file, and a
    timm seresnet50 safetensors file; the small resnet18_se / seresnet18 equivalents
    serve as warm-up loads."""
    import attnzoo
    from attnzoo.saved import write_safetensors

    paths: dict[str, str] = {}
    weights = folder / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    for zoo, peer, key in (("resnet50_se", "seresnet50", "big"),
                           ("resnet18_se", "seresnet18", "small")):
        torch.manual_seed(0)
        model = attnzoo.create_model(zoo)
        saved = attnzoo.save_pretrained(model, folder / zoo)
        sha = write_safetensors(model.state_dict(), weights / f"{zoo}.safetensors")
        (weights / f"{zoo}.yaml").write_text(json.dumps({
            "model": zoo, "default": "bench", "tags": {"bench": {
                "file": f"{zoo}.safetensors", "sha256": sha, "num_classes": 1000,
                "license": "apache-2.0"}}}))
        peer_file = folder / f"{peer}.safetensors"
        write_safetensors(timm_peer(peer, {}).state_dict(), peer_file)
        paths[f"{key}_zoo"], paths[f"{key}_peer"] = zoo, peer
        paths[f"{key}_folder"], paths[f"{key}_peer_file"] = str(saved), str(peer_file)
    paths["weights"] = str(weights)
    paths["file_bytes"] = str((folder / "resnet50_se" / "model.safetensors").stat().st_size)
    paths["peer_file_bytes"] = str((folder / "seresnet50.safetensors").stat().st_size)
    return paths


def _load_fn(kind: str, files: dict[str, str], key: str) -> Callable[[], nn.Module]:
    import attnzoo

    if kind == "attnzoo_folder":
        return lambda: attnzoo.create_model(files[f"{key}_folder"])
    if kind == "attnzoo_zoo":
        return lambda: attnzoo.create_model(files[f"{key}_zoo"], pretrained=True)

    def timm_build_then_load() -> nn.Module:
        from safetensors.torch import load_file

        model = timm_peer(files[f"{key}_peer"], {})
        model.load_state_dict(load_file(files[f"{key}_peer_file"]))
        return model

    return timm_build_then_load


def _load_child(args: dict[str, Any]) -> dict[str, Any]:
    from attnzoo.manifests import WEIGHTS_DIR_ENV

    files = args["files"]
    os.environ[WEIGHTS_DIR_ENV] = files["weights"]  # the benchmark's own manifests
    if args["what"] == "time":
        fns = {k: _load_fn(k, files, "big") for k in args["kinds"]}
        return interleaved(fns, args["repeats"], warmup=1)
    kind = args["kinds"][0]
    # No warm-up load: memory it frees stays partly resident and would be reused inside
    # the measurement, hiding weights. So the first load is measured, with its
    # first-use imports: a conservative figure.
    fn = _load_fn(kind, files, "big")
    with PeakMemory() as mem:
        model = fn()
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    return {"peak_bytes": mem.peak, "anon_peak_bytes": mem.anon_peak, "reset": mem.reset}


def bench_load(repeats: int) -> dict[str, Any]:
    """Pretrained load of resnet50_se (attnzoo folder, attnzoo zoo name) vs timm's
    seresnet50 built then loaded from its safetensors file."""
    kinds = ["attnzoo_folder", "attnzoo_zoo", "timm_build_then_load"]
    with tempfile.TemporaryDirectory(prefix="attnzoo-bench-") as tmp:
        files = prepare_load_files(Path(tmp))
        times = _run_child({"section": "load", "what": "time", "files": files,
                            "kinds": kinds, "repeats": repeats})
        memory = {k: _run_child({"section": "load", "what": "memory", "files": files,
                                 "kinds": [k]}) for k in kinds}
    print(f"load times {times}", file=sys.stderr, flush=True)
    return {"file_bytes": int(files["file_bytes"]),
            "peer_file_bytes": int(files["peer_file_bytes"]), "times": times,
            "memory": memory}


# ----------------------------------------------------------------- attention kernels


def naive_non_local(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """attnzoo's ``non_local`` computed with the attention matrix formed explicitly:
    ``softmax(theta^T phi) g`` as a (HW x HW') matrix product, HW' = HW/4 with the
    block's subsampling (HW with ``subsample=False``)."""
    n, _, h, w = x.shape
    theta = block.theta(x).flatten(2).transpose(1, 2)                  # (N, HW, C')
    phi = block.pool(block.phi(x)).flatten(2)                          # (N, C', HW')
    g = block.pool(block.g(x)).flatten(2).transpose(1, 2)              # (N, HW', C')
    attn = torch.softmax(torch.bmm(theta, phi) * block.scale, dim=-1)  # (N, HW, HW')
    y = torch.bmm(attn, g).transpose(1, 2).reshape(n, -1, h, w)
    return x + block.out_norm(block.out_conv(y))


def naive_criss_cross(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """attnzoo's ``criss_cross`` as full HW x HW attention masked to each position's
    row and column (the position itself once)."""
    n, _, h, w = x.shape
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    allowed = (rows[:, None] == rows[None, :]) | (cols[:, None] == cols[None, :])
    for _ in range(block.recurrence):
        q = block.query(x).flatten(2).transpose(1, 2)                  # (N, HW, C')
        k = block.key(x).flatten(2)                                    # (N, C', HW)
        v = block.value(x).flatten(2).transpose(1, 2)                  # (N, HW, C)
        logits = torch.bmm(q, k).masked_fill(~allowed, float("-inf"))  # (N, HW, HW)
        out = torch.bmm(logits.softmax(dim=-1), v).transpose(1, 2).reshape(n, -1, h, w)
        x = block.gamma * out + x
    return x


def naive_mhsa2d(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """attnzoo's ``mhsa2d`` with ``softmax(q k^T / sqrt(d) + q r^T)`` formed explicitly
    per head, relative logits gathered from full (HW x HW x d) embedding tables."""
    from attnzoo.blocks.self_attention import _relative_table

    n, _, h, w = x.shape
    heads, d, dv = block.num_heads, block.dim_head, block.dim_value
    q, k, v = block.qkv(x).split([heads * d, heads * d, heads * dv], dim=1)
    q = q.reshape(n, heads, d, h * w).transpose(-1, -2)
    k = k.reshape(n, heads, d, h * w).transpose(-1, -2)
    v = v.reshape(n, heads, dv, h * w).transpose(-1, -2)
    rel_h = _relative_table(block.height_rel, h)                       # (H, H, d)
    rel_w = _relative_table(block.width_rel, w)                        # (W, W, d)
    qm = q.reshape(n, heads, h, w, d)
    pos = (torch.einsum("nhxyd,xrd->nhxyr", qm, rel_h)[..., None]
           + torch.einsum("nhxyd,ysd->nhxys", qm, rel_w)[..., None, :])
    logits = q @ k.transpose(-1, -2) * d ** -0.5 + pos.reshape(n, heads, h * w, h * w)
    out = logits.softmax(dim=-1) @ v
    return block.pool(out.transpose(-1, -2).reshape(n, heads * dv, h, w))


NAIVE = {"non_local": naive_non_local, "criss_cross": naive_criss_cross,
         "mhsa2d": naive_mhsa2d}


def make_block(name: str, channels: int, size: int) -> nn.Module:
    """The block with non-trivial weights (not the identity it starts as)."""
    import attnzoo

    torch.manual_seed(0)
    extra = {"size": (size, size)} if name == "mhsa2d" else {}
    block = attnzoo.create_block(name, channels, **extra).eval()
    with torch.no_grad():
        if name == "non_local":
            block.out_norm.weight.fill_(1.0)
        elif name == "criss_cross":
            block.gamma.fill_(0.5)
    return block


def _kernel_child(args: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    size, channels = args["size"], args["channels"]
    block = make_block(args["block"], channels, size)
    x = torch.randn(1, channels, size, size)
    fn = block if args["impl"] == "attnzoo" else lambda t: NAIVE[args["block"]](block, t)
    with torch.no_grad():
        if args.get("warmup", True):
            fn(x)  # warm-up, not counted
        with PeakMemory() as mem:  # without a warm-up, this run is the warm-up
            fn(x)
        times = []
        for _ in range(args["repeats"]):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    return {"seconds": median(times), "peak_bytes": mem.peak,
            "anon_peak_bytes": mem.anon_peak, "reset": mem.reset}


def estimated_bytes(name: str, impl: str, size: int) -> int:
    """Rough peak of a run: the HW x HW float32 matrices it holds at once (attnzoo's
    mhsa2d forms its (heads, HW, HW) position logits too; the others form none)."""
    hw = size * size
    if impl == "attnzoo":
        return 2 * 4 * hw * hw * 4 if name == "mhsa2d" else 0
    if name == "mhsa2d":
        return 4 * 4 * hw * hw * 4  # logits, position logits, their sum, softmax: 4 heads
    if name == "non_local":
        return 2 * hw * (hw // 4) * 4
    return 3 * hw * hw * 4


def bench_kernels(sizes: list[int], repeats: int, max_bytes: int) -> list[dict[str, Any]]:
    """Time and peak memory of each attention block and its naive reference per size;
    runs estimated to need more than ``max_bytes`` are skipped (a shared machine)."""
    rows = []
    for name, channels in KERNEL_CHANNELS.items():
        for size in sizes:
            row: dict[str, Any] = {"block": name, "channels": channels, "size": size}
            for impl in ("attnzoo", "naive"):
                if estimated_bytes(name, impl, size) > max_bytes:
                    need = estimated_bytes(name, impl, size) / 2 ** 30
                    row[impl] = {"skipped": f"skipped (needs ~{need:.0f} GiB)"}
                    continue
                # Large maps take tens of seconds a run on 2 CPU cores: the memory run
                # is their warm-up, and one timed run follows.
                big = size >= 96
                row[impl] = _run_child({"section": "kernels", "block": name, "size": size,
                                        "channels": channels, "impl": impl,
                                        "repeats": 1 if big else repeats,
                                        "warmup": not big})
            rows.append(row)
            print(f"kernel {name} {size}: {row}", file=sys.stderr, flush=True)
    return rows


# ------------------------------------------------------------------------------ report


def machine() -> dict[str, str]:
    """CPU model, cores, versions, date."""
    import timm

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return {"cpu": cpu, "cores": str(os.cpu_count()),
            "torch_threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "os": platform.platform(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average": load, "device": "cpu (no GPU on this machine)"}


def _mib(n: float) -> str:
    return f"{n / MIB:,.0f} MiB"


def _ms(s: float) -> str:
    return f"{s * 1000:,.0f} ms" if s < 10 else f"{s:,.1f} s"


def render(results: dict[str, Any]) -> str:
    """BENCHMARKS.md from the results of :func:`run`."""
    m = results["machine"]
    out = ["# Benchmarks", "",
           "Generated by `python tools/bench.py` "
           f"({'quick settings' if results['settings']['quick'] else 'full settings'}); "
           "figures as measured, goals from issue 12.", "",
           f"- machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
           f"{m['device']}", f"- torch {m['torch']}, timm {m['timm']}, Python {m['python']}, "
           f"{m['os']}", f"- date: {m['date']}; load average at the end: {m['load_average']}",
           f"- settings: `{json.dumps(results['settings'])}`", "",
           "Times are medians of repeated runs after uncounted warm-up runs; the two sides "
           "of each comparison ran interleaved (A B A B ...). Peak memory is the growth of "
           "the peak resident set (VmHWM) in a fresh process per figure.", ""]
    if "build" in results:
        out += ["## Build time (random init, CPU)", "",
                "Goal: attnzoo within 1.2x of the timm peer.", "",
                "| attnzoo | timm peer | attnzoo | timm | ratio | goal | params (attnzoo / timm) |",
                "| --- | --- | ---: | ---: | ---: | --- | --- |"]
        for r in results["build"]:
            out.append(f"| {r['zoo']} | {r['peer']} | {_ms(r['attnzoo_s'])} | "
                       f"{_ms(r['timm_s'])} | {r['ratio']:.2f}x | "
                       f"{'met' if r['ratio'] <= 1.2 else 'missed'} | "
                       f"{r['attnzoo_params']:,} / {r['timm_params']:,} |")
        out.append("")
    if "throughput" in results:
        out += ["## Throughput at 224x224", "",
                "Images/s; ratio = attnzoo / timm (1.00 = level, above 1 = attnzoo faster). "
                "Goal (forward): within 3% of the peer (ratio >= 0.97).", "",
                "| attnzoo | timm peer | backend | mode | batch | attnzoo img/s | "
                "timm img/s | ratio | goal |",
                "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
        for r in results["throughput"]:
            if "error" in r:
                out.append(f"| {r['zoo']} | {r['peer']} | {r['backend']} | {r['mode']} | "
                           f"{r['batch']} | - | - | - | not run: {r['error']} |")
                continue
            goal = ("met" if r["ratio"] >= 0.97 else "missed") if r["mode"] == "fwd" else "-"
            out.append(f"| {r['zoo']} | {r['peer']} | {r['backend']} | {r['mode']} | "
                       f"{r['batch']} | {r['attnzoo_ips']:.2f} | {r['timm_ips']:.2f} | "
                       f"{r['ratio']:.3f} | {goal} |")
        out.append("")
    if "load" in results:
        ld = results["load"]
        t, mem = ld["times"], ld["memory"]
        size = ld["file_bytes"]
        out += ["## Pretrained load (resnet50_se vs seresnet50)", "",
                f"Weights file: {_mib(size)} (attnzoo), {_mib(ld['peer_file_bytes'])} (timm). "
                "Goals: peak memory within 1.3x of the file; `create_model(name, "
                "pretrained=True)` at least 3x faster than timm's build-then-load.", "",
                "Peak memory: growth of VmHWM, and of sampled anonymous memory (RssAnon); "
                "peak / file uses the larger of the two.", "",
                "| load | time | speed-up vs timm | peak (VmHWM) | peak (anon) | peak / file |",
                "| --- | ---: | ---: | ---: | ---: | ---: |"]
        labels = {"attnzoo_folder": "`attnzoo.create_model(folder)`",
                  "attnzoo_zoo": "`attnzoo.create_model(\"resnet50_se\", pretrained=True)`",
                  "timm_build_then_load": "`timm.create_model(\"seresnet50\")` + "
                  "`load_state_dict(load_file(...))`"}
        base = t.get("timm_build_then_load")
        for kind, label in labels.items():
            got = mem.get(kind, {})
            peak, anon = got.get("peak_bytes"), got.get("anon_peak_bytes")
            peak_s = _mib(peak) if peak is not None else got.get("error", "?")
            anon_s = _mib(anon) if anon is not None else "-"
            top = max(v for v in (peak, anon, 0) if v is not None)
            ratio = f"{top / size:.2f}x" if peak is not None else "-"
            speed = f"{base / t[kind]:.2f}x" if kind in t and base else "-"
            out.append(f"| {label} | {_ms(t[kind]) if kind in t else '-'} | {speed} | "
                       f"{peak_s} | {anon_s} | {ratio} |")
        out.append("")
    if "kernels" in results:
        out += ["## Attention kernels vs naive references (batch 1, forward, no grad)", "",
                "Naive references form the HW x HW attention explicitly "
                "(`tools/bench.py`: `naive_non_local`, `naive_criss_cross` = full attention "
                "masked to the row and column, `naive_mhsa2d`). Speed-up = naive time / "
                "attnzoo time. Goals at 128x128, C=512: non_local >= 2x, criss_cross >= 10x.",
                ""]
        for name in KERNEL_CHANNELS:
            rows = [r for r in results["kernels"] if r["block"] == name]
            if not rows:
                continue
            out += [f"### {name} (C={rows[0]['channels']})", "",
                    "| size | attnzoo time | naive time | speed-up | attnzoo peak | naive peak |",
                    "| --- | ---: | ---: | ---: | ---: | ---: |"]
            for r in rows:
                a, n = r["attnzoo"], r["naive"]
                speed = (f"{n['seconds'] / a['seconds']:.1f}x"
                         if "seconds" in a and "seconds" in n else "-")
                out.append(
                    f"| {r['size']}x{r['size']} | {_fmt_time(a)} | {_fmt_time(n)} | {speed} | "
                    f"{_fmt_mem(a)} | {_fmt_mem(n)} |")
            out.append("")
    if results.get("notes"):
        out += ["## Goals missed, and why", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(out)


def _fmt_time(r: dict[str, Any]) -> str:
    if "seconds" in r:
        return _ms(r["seconds"])
    return r.get("skipped") or r.get("error", "?")


def _fmt_mem(r: dict[str, Any]) -> str:
    if "peak_bytes" not in r:
        return "-"
    return _mib(max(r["peak_bytes"], r.get("anon_peak_bytes", 0)))


def run(sections: list[str], quick: bool, compile_all: bool = False) -> dict[str, Any]:
    """Run the sections and return their results (plus machine and settings)."""
    settings = {
        "quick": quick, "sections": sections,
        "build_repeats": 3 if quick else 5,
        "throughput_repeats": 3 if quick else 4, "batches": [1, 8], "size": 224,
        # inductor takes ~2.5 min per model and batch size on 2 busy CPU cores: by
        # default one pair, forward only (--compile-all: every pair, and fwd+bwd).
        "compile_pairs": [] if quick else [p[0] for p in PAIRS] if compile_all
        else ["resnet50_se"],
        "compile_train": compile_all,
        "load_repeats": 3 if quick else 5,
        "kernel_sizes": [32, 64, 96, 128], "kernel_repeats": 2 if quick else 3,
        "max_gib": 6,
    }
    results: dict[str, Any] = {"settings": settings}
    if "build" in sections:
        results["build"] = bench_build(settings["build_repeats"])
    if "load" in sections:
        results["load"] = bench_load(settings["load_repeats"])
    if "kernels" in sections:
        results["kernels"] = bench_kernels(settings["kernel_sizes"], settings["kernel_repeats"],
                                           settings["max_gib"] << 30)
    if "throughput" in sections:
        results["throughput"] = bench_throughput(
            settings["batches"], settings["size"], settings["throughput_repeats"],
            settings["compile_pairs"], settings["compile_train"])
    results["machine"] = machine()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["build", "load", "kernels",
                                                          "throughput"],
                        choices=["build", "load", "kernels", "throughput"])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, no torch.compile")
    parser.add_argument("--compile-all", action="store_true",
                        help="torch.compile every pair, forward and forward+backward (slow)")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--notes", default=None,
                        help="a text file of notes (one per line) for 'Goals missed, and why'")
    parser.add_argument("--from-json", nargs="+", default=None,
                        help="render saved --json results (several merge), run nothing")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child = json.loads(args.child)
        section = {"load": _load_child, "kernels": _kernel_child}[child["section"]]
        print(json.dumps(section(child)))
        return 0
    if args.from_json:
        results = {}
        for path in args.from_json:  # several partial runs merge, later ones win
            part = json.loads(Path(path).read_text())
            sections = results.get("settings", {}).get("sections", [])
            results.update(part)
            results["settings"]["sections"] = sections + part["settings"]["sections"]
    else:
        results = run(args.sections, args.quick, args.compile_all)
    if args.notes:
        results["notes"] = [n.strip() for n in Path(args.notes).read_text().splitlines()
                            if n.strip()]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    Path(args.out).write_text(render(results))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
