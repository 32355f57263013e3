"""attnzoo against its hand-written peers, measured side by side; writes BENCHMARKS.md.

Sections (issues 12 and 23):

* ``build``: ``attnzoo.create_model(zoo)`` vs ``timm.create_model(peer)`` for four pairs;
* ``throughput``: forward (eval, no grad) and forward+backward (train) images/s at
  224x224, batch 1 and 8, eager and ``torch.compile`` (inductor), same pairs;
* ``load``: pretrained load of resnet50_se, ``create_model(folder)`` and
  ``create_model("resnet50_se", pretrained=True)`` vs building timm's seresnet50 and
  loading its safetensors file: time, and peak memory in a fresh process each;
* ``kernels``: ``non_local``, ``criss_cross`` and ``mhsa2d`` against naive references
  that form the HW x HW attention explicitly, 32x32 to 128x128: time (both run
  interleaved in one process), peak memory (a fresh process per figure), GFLOP/s by
  formula against the machine's matmul throughput (the roofline, a large ``torch.mm``
  measured before and after), and criss_cross with R = 1 and R = 2 passes (issue 23);
* ``training``: forward+backward at batch 8, 224x224, of resnet50_se/cbam/nl/cca against
  the same network in timm's layers (or with the blocks' naive formulas), eager, and
  each compiled (inductor) against itself eager (issue 23).

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
    paths["home"] = str(folder / "home")
    paths["file_bytes"] = str((folder / "resnet50_se" / "model.safetensors").stat().st_size)
    paths["peer_file_bytes"] = str((folder / "seresnet50.safetensors").stat().st_size)
    return paths


def _load_fn(kind: str, files: dict[str, str], key: str) -> Callable[[], nn.Module]:
    import attnzoo

    if kind.endswith("_first"):  # the file not yet verified on this machine: hashed
        warm = _load_fn(kind.removesuffix("_first"), files, key)

        def first_load() -> nn.Module:
            # an empty attnzoo home of its own: the warm loads' records stay untouched
            shared = os.environ["ATTNZOO_HOME"]
            os.environ["ATTNZOO_HOME"] = tempfile.mkdtemp(dir=shared, prefix="cold-")
            try:
                return warm()
            finally:
                os.environ["ATTNZOO_HOME"] = shared

        return first_load
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
    os.environ["ATTNZOO_HOME"] = files["home"]      # its own verified-files cache
    os.makedirs(files["home"], exist_ok=True)
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
    kinds = ["attnzoo_folder_first", "attnzoo_zoo_first", "attnzoo_folder", "attnzoo_zoo",
             "timm_build_then_load"]
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
    block's subsampling (HW with ``subsample=False``), pooling before phi and g in the
    ``released`` variant."""
    n, _, h, w = x.shape
    theta = block.theta(x).flatten(2).transpose(1, 2)                  # (N, HW, C')
    if block.variant == "released":                                    # pool, then convs
        phi = block.phi(block.pool(x)).flatten(2)                      # (N, C', HW')
        g = block.g(block.pool(x)).flatten(2).transpose(1, 2)          # (N, HW', C')
    else:
        phi = block.pool(block.phi(x)).flatten(2)
        g = block.pool(block.g(x)).flatten(2).transpose(1, 2)
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


def make_block(name: str, channels: int, size: int, **cfg: Any) -> nn.Module:
    """The block with non-trivial weights (not the identity it starts as)."""
    import attnzoo

    torch.manual_seed(0)
    extra = {"size": (size, size)} if name == "mhsa2d" else {}
    block = attnzoo.create_block(name, channels, **extra, **cfg).eval()
    with torch.no_grad():
        if name == "non_local":
            block.out_norm.weight.fill_(1.0)
        elif name == "criss_cross":
            block.gamma.fill_(0.5)
    return block


# FLOPs of one forward pass at batch 1 (2 per multiply-add; matrix products only:
# softmax, masks, pooling and normalisation are not counted), by formula. C' is the
# reduced width, HW' = HW/4 the sub-sampled keys, d the head width.
FLOP_FORMULAS = {
    "non_local": "2HW(3CC' + C'C) convs + 4HW·HW'·C' attention (C' = C/2, HW' = HW/4), "
                 "both implementations",
    "criss_cross": "R x [2HW·C(2C' + C) convs + 2HW(H+W)(C' + C) row/column attention] "
                   "(C' = C/8, R = 2); naive: R x [same convs + 2HW·HW(C' + C)]",
    "mhsa2d": "2HW·C·3C qkv + 2HW·C(H+W) relative logits + 4HW·HW·C attention "
              "(4 heads of d = C/4), both implementations",
}


def kernel_flops(name: str, impl: str, channels: int, size: int, recurrence: int = 2
                 ) -> int:
    """FLOPs of a block (``impl`` "attnzoo") or its naive reference at batch 1, by the
    formula of ``FLOP_FORMULAS``."""
    c, h, w = channels, size, size
    hw = h * w
    if name == "non_local":
        inner, keys = c // 2, (h // 2) * (w // 2)
        return 2 * hw * (3 * c * inner + inner * c) + 4 * hw * keys * inner
    if name == "criss_cross":
        inner = c // 8
        convs = 2 * hw * c * (2 * inner + c)
        attention = (2 * hw * (h + w) * (inner + c) if impl == "attnzoo"
                     else 2 * hw * hw * (inner + c))
        return recurrence * (convs + attention)
    if name == "mhsa2d":
        return 2 * hw * c * 3 * c + 2 * hw * c * (h + w) + 4 * hw * hw * c
    raise ValueError(name)


def _kernel_fn(name: str, impl: str, block: nn.Module) -> Callable[[torch.Tensor], Any]:
    return block if impl == "attnzoo" else (lambda t: NAIVE[name](block, t))


def _kernel_child(args: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one implementation (fresh process), and its time."""
    torch.manual_seed(0)
    size, channels = args["size"], args["channels"]
    block = make_block(args["block"], channels, size, **args.get("cfg", {}))
    x = torch.randn(1, channels, size, size)
    fn = _kernel_fn(args["block"], args["impl"], block)
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
    out = {"peak_bytes": mem.peak, "anon_peak_bytes": mem.anon_peak, "reset": mem.reset}
    return {"seconds": median(times), **out} if times else out


def _kernel_time_child(args: dict[str, Any]) -> dict[str, Any]:
    """Median time of several implementations (``impls``: name -> (block, impl, cfg)),
    run interleaved in one process after one uncounted warm-up round; rounds stop once
    ``budget_s`` has passed (at least ``min_rounds``, at most ``repeats``)."""
    torch.manual_seed(0)
    size, channels = args["size"], args["channels"]
    x = torch.randn(1, channels, size, size)
    fns = {}
    for key, (name, impl, cfg) in args["impls"].items():
        fns[key] = _kernel_fn(name, impl, make_block(name, channels, size, **cfg))
    if args.get("matmul"):  # the roofline, measured in the same rounds
        n = args["matmul"]
        a, b = torch.randn(n, n), torch.randn(n, n)
        fns["matmul"] = lambda _x: torch.mm(a, b)
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn(x)
        begin = time.perf_counter()
        for i in range(args["repeats"]):
            for key, fn in fns.items():
                start = time.perf_counter()
                fn(x)
                times[key].append(time.perf_counter() - start)
            if i + 1 >= args.get("min_rounds", 1) and (
                    time.perf_counter() - begin > args.get("budget_s", float("inf"))):
                break
    out = {k: {"seconds": median(v), "runs": len(v)} for k, v in times.items()}
    if "matmul" in out:
        out["matmul"]["gflops"] = 2 * args["matmul"] ** 3 / out["matmul"]["seconds"] / 1e9
    return out


def _matmul_child(args: dict[str, Any]) -> dict[str, Any]:
    """GFLOP/s of a large float32 ``torch.mm`` (n x n), median of ``repeats`` runs."""
    n = args["n"]
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(args["repeats"]):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return {"n": n, "gflops": 2 * n ** 3 / median(times) / 1e9,
            "best_gflops": 2 * n ** 3 / min(times) / 1e9, "threads": torch.get_num_threads()}


def bench_matmul(repeats: int, n: int = 3072) -> dict[str, Any]:
    """The machine's matrix-product throughput (the roofline of the kernel table)."""
    out = _run_child({"section": "matmul", "n": n, "repeats": repeats})
    print(f"matmul {out}", file=sys.stderr, flush=True)
    return out


def estimated_bytes(name: str, impl: str, size: int) -> int:
    """Rough peak of a run: the HW x HW float32 matrices it holds at once (attnzoo's
    blocks form none: mhsa2d's position logits are formed 32 MiB at a time)."""
    hw = size * size
    if impl == "attnzoo":
        return 0
    if name == "mhsa2d":
        return 4 * 4 * hw * hw * 4  # logits, position logits, their sum, softmax: 4 heads
    if name == "non_local":
        return 2 * hw * (hw // 4) * 4
    return 3 * hw * hw * 4


def bench_kernels(sizes: list[int], repeats: int, max_bytes: int, budget_s: float = 60.0
                  ) -> list[dict[str, Any]]:
    """Time and peak memory of each attention block and its naive reference per size:
    peak memory in a fresh process per figure, time with both run interleaved in one
    process. Runs estimated to need more than ``max_bytes`` are skipped (a shared
    machine)."""
    rows = []
    for name, channels in KERNEL_CHANNELS.items():
        for size in sizes:
            row: dict[str, Any] = {"block": name, "channels": channels, "size": size}
            timed = {}
            for impl in ("attnzoo", "naive"):
                if estimated_bytes(name, impl, size) > max_bytes:
                    need = estimated_bytes(name, impl, size) / 2 ** 30
                    row[impl] = {"skipped": f"skipped (needs ~{need:.0f} GiB)"}
                    continue
                # The memory run is a large map's warm-up (tens of seconds a run).
                row[impl] = _run_child({"section": "kernels", "block": name, "size": size,
                                        "channels": channels, "impl": impl, "repeats": 0,
                                        "warmup": size < 96})
                row[impl].pop("seconds", None)
                row[impl]["flops"] = kernel_flops(name, impl, channels, size)
                timed[impl] = (name, impl, {})
            if timed:
                got = _run_child({"section": "kernel_time", "size": size,
                                  "channels": channels, "impls": timed, "repeats": repeats,
                                  "min_rounds": 2, "budget_s": budget_s, "matmul": 2048})
                for impl in timed:
                    row[impl].update(got.get(impl, {"error": got.get("error", "?")}))
                if "gflops" in got.get("matmul", {}):
                    row["matmul_gflops"] = got["matmul"]["gflops"]
            rows.append(row)
            print(f"kernel {name} {size}: {row}", file=sys.stderr, flush=True)
    return rows


def bench_recurrence(size: int, repeats: int, channels: int = 512) -> dict[str, Any]:
    """criss_cross with R = 1 and R = 2 passes at ``size``, interleaved: time and FLOPs."""
    impls = {f"R={r}": ("criss_cross", "attnzoo", {"recurrence": r}) for r in (1, 2)}
    got = _run_child({"section": "kernel_time", "size": size, "channels": channels,
                      "impls": impls, "repeats": repeats, "min_rounds": 3, "matmul": 2048})
    for r in (1, 2):
        if f"R={r}" in got:
            got[f"R={r}"]["flops"] = kernel_flops("criss_cross", "attnzoo", channels, size, r)
    print(f"recurrence {got}", file=sys.stderr, flush=True)
    return {"size": size, "channels": channels, **got}


# --------------------------------------------------------------- training (issue 23)

# (zoo model, peer kind, timm name, timm kwargs): the peer is the same network written
# with timm's layers, or (no timm layer) the zoo model with each block computed by the
# naive formula of NAIVE, same weights.
TRAINING_PAIRS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("resnet50_se", "timm", "seresnet50", {}),
    ("resnet50_cbam", "timm", "resnet50", {"block_args": {"attn_layer": "cbam"}}),
    ("resnet50_nl", "naive", "non_local", {}),
    ("resnet50_cca", "naive", "criss_cross", {}),
]


class NaiveBlock(nn.Module):
    """A zoo block computed by its naive formula (``NAIVE``), with the block's weights."""

    def __init__(self, block: nn.Module, name: str) -> None:
        super().__init__()
        self.block = block
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NAIVE[self.name](self.block, x)


def naive_peer(model: nn.Module, name: str) -> nn.Module:
    """A copy of a zoo model whose ``name`` blocks run their naive formula."""
    import copy

    peer = copy.deepcopy(model)
    for inserted in model.attnzoo_blocks:
        if inserted.block_type != name:
            continue
        parent_path, _, leaf = inserted.name.rpartition(".")
        parent = peer.get_submodule(parent_path)
        parent._modules[leaf] = NaiveBlock(parent._modules[leaf], name)
    return peer


def _training_models(zoo: str, kind: str, peer: str, kwargs: dict[str, Any]
                     ) -> tuple[nn.Module, nn.Module, str]:
    torch.manual_seed(0)
    model = _zoo(zoo)
    if kind == "timm":
        return model, timm_peer(peer, kwargs), _peer_name(peer, kwargs)
    with torch.no_grad():  # leave the identity start, so the attention path runs
        for inserted in model.attnzoo_blocks:
            block = model.get_submodule(inserted.name)
            for p in block.parameters():
                if p.dim() <= 1:
                    p.normal_(0.5, 0.1)
    return model, naive_peer(model, peer), f"{zoo} with naive {peer} (same weights)"


def bench_training(batch: int, size: int, repeats: int, compile_too: bool
                   ) -> list[dict[str, Any]]:
    """Forward+backward images/s at ``batch``, ``size``: each zoo model against its peer
    (eager, interleaved), and with ``compile_too`` the zoo model compiled (inductor)
    against itself eager."""
    rows = []
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    for zoo, kind, peer, kwargs in TRAINING_PAIRS:
        model, other, label = _training_models(zoo, kind, peer, kwargs)
        model.train()
        other.train()
        fns = {"attnzoo": _step(model, x, True), "peer": _step(other, x, True)}
        t = interleaved(fns, repeats)
        row = {"zoo": zoo, "peer": label, "batch": batch, "attnzoo_ips": batch / t["attnzoo"],
               "peer_ips": batch / t["peer"], "ratio": t["attnzoo"] / t["peer"]}
        print(f"training {zoo}: {row['ratio']:.3f}", file=sys.stderr, flush=True)
        if compile_too:
            compiled = torch.compile(model)
            fns = {"compiled": _step(compiled, x, True), "eager": _step(model, x, True)}
            try:
                t = interleaved(fns, repeats, warmup=2)
                row.update({"compiled_ips": batch / t["compiled"],
                            "eager_ips": batch / t["eager"],
                            "compile_ratio": t["compiled"] / t["eager"]})
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                row["compile_error"] = str(exc).splitlines()[0][:160]
            torch._dynamo.reset()
            print(f"training {zoo} compiled: {row.get('compile_ratio')}", file=sys.stderr,
                  flush=True)
        rows.append(row)
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
           "figures as measured, goals from issues 12 and 23.", "",
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
                "Goals: peak memory within 1.3x of the file; a warm load (the file verified "
                "before on this machine) at least 3x faster than timm's build-then-load; a "
                "first load (sha256 of the file included) no slower than it.", "",
                "Peak memory: growth of VmHWM, and of sampled anonymous memory (RssAnon); "
                "peak / file uses the larger of the two.", "",
                "| load | time | speed-up vs timm | peak (VmHWM) | peak (anon) | peak / file |",
                "| --- | ---: | ---: | ---: | ---: | ---: |"]
        labels = {"attnzoo_folder_first": "`attnzoo.create_model(folder)`, first load "
                  "(sha256 of the file)",
                  "attnzoo_zoo_first": "`attnzoo.create_model(\"resnet50_se\", "
                  "pretrained=True)`, first load",
                  "attnzoo_folder": "`attnzoo.create_model(folder)`, warm (file verified "
                  "before, unchanged)",
                  "attnzoo_zoo": "`attnzoo.create_model(\"resnet50_se\", pretrained=True)`, "
                  "warm",
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
        out += _render_kernels(results)
    if "training" in results:
        out += _render_training(results["training"])
    for section in results.get("appendix", []):
        out += [section, ""]
    if results.get("notes"):
        out += ["## Goals missed, and why", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(out)


def _roofline(results: dict[str, Any]) -> float | None:
    """The machine's matmul GFLOP/s for this run: the larger of the measurements before
    and after the kernels (the machine's ability, not a busy moment's)."""
    values = [m.get("gflops") for m in results.get("matmul", []) if m.get("gflops")]
    return max(values) if values else None


def _rate(r: dict[str, Any], peak: float | None) -> tuple[str, str]:
    if "seconds" not in r or "flops" not in r:
        return "-", "-"
    rate = r["flops"] / r["seconds"] / 1e9
    return f"{rate:,.0f}", (f"{rate / peak:.0%}" if peak else "-")


def _render_kernels(results: dict[str, Any]) -> list[str]:
    peak = _roofline(results)
    out = ["## Attention kernels vs naive references (batch 1, forward, no grad)", "",
           "Naive references form the HW x HW attention explicitly "
           "(`tools/bench.py`: `naive_non_local`, `naive_criss_cross` = full attention "
           "masked to the row and column, `naive_mhsa2d`). Speed-up = naive time / "
           "attnzoo time, the two run interleaved in one process; peak memory in a fresh "
           "process per figure. GFLOP/s = the implementation's own FLOPs (by the formulas "
           "below) / its time; roofline = that as a share of the machine's matmul "
           "throughput: a 2048x2048 float32 `torch.mm` timed in the same interleaved rounds "
           "as the row's two implementations (so a busy moment slows all three), or, where "
           "a row has none, the run's matmul measurement below.", ""]
    for m in results.get("matmul", []):
        if "gflops" in m:
            out.append(f"- matmul roofline ({m.get('when', '?')}): {m['n']}x{m['n']} float32 "
                       f"`torch.mm`, {m['threads']} threads: {m['gflops']:,.0f} GFLOP/s "
                       f"(median; best {m['best_gflops']:,.0f})")
    if peak:
        out.append(f"- roofline used below: {peak:,.0f} GFLOP/s (the larger median)")
    out += ["", "Goals at C=512 (issue 23): non_local at least as fast as the naive "
            "reference at every size, >= 70% of the roofline at 128x128, peak memory <= "
            "50% of the reference's; criss_cross >= 20x faster than masked full attention "
            "at 128x128, memory growing as HW(H+W), R = 2 costing <= 2x one pass; mhsa2d "
            "peak memory at 96x96 <= 60% of the reference's, 128x128 under 6 GiB.", ""]
    for name in KERNEL_CHANNELS:
        rows = [r for r in results["kernels"] if r["block"] == name]
        if not rows:
            continue
        out += [f"### {name} (C={rows[0]['channels']})", "",
                f"FLOPs: {FLOP_FORMULAS.get(name, '?')}.", "",
                "| size | attnzoo time | naive time | speed-up | attnzoo GFLOP/s (roofline) "
                "| naive GFLOP/s (roofline) | attnzoo peak | naive peak | peak ratio |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            a, n = r["attnzoo"], r["naive"]
            speed = (f"{n['seconds'] / a['seconds']:.1f}x"
                     if "seconds" in a and "seconds" in n else "-")
            row_peak = r.get("matmul_gflops", peak)
            (ar, af), (nr, nf) = _rate(a, row_peak), _rate(n, row_peak)
            ratio = (f"{_peak(a) / _peak(n):.2f}" if _peak(a) is not None and _peak(n) else "-")
            out.append(
                f"| {r['size']}x{r['size']} | {_fmt_time(a)} | {_fmt_time(n)} | {speed} | "
                f"{ar} ({af}) | {nr} ({nf}) | {_fmt_mem(a)} | {_fmt_mem(n)} | {ratio} |")
        out.append("")
    rec = results.get("recurrence")
    if rec and "R=1" in rec and "R=2" in rec and "seconds" in rec["R=1"]:
        r1, r2 = rec["R=1"], rec["R=2"]
        out += [f"### criss_cross recurrence at {rec['size']}x{rec['size']} (C={rec['channels']})",
                "", "| passes | time | FLOPs | time / one pass | FLOPs / one pass | "
                "GFLOP/s (roofline) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        rec_peak = rec.get("matmul", {}).get("gflops", peak)
        for key, r in (("R=1", r1), ("R=2", r2)):
            rate, frac = _rate(r, rec_peak)
            out.append(f"| {key} | {_ms(r['seconds'])} | {r['flops'] / 1e9:.1f} G | "
                       f"{r['seconds'] / r1['seconds']:.2f}x | {r['flops'] / r1['flops']:.2f}x | "
                       f"{rate} ({frac}) |")
        out.append("")
    return out


def _render_training(rows: list[dict[str, Any]]) -> list[str]:
    out = ["## Training: forward+backward at 224x224 (eager, and torch.compile)", "",
           "Images/s; ratio = attnzoo time / peer time (goal <= 1.03). The peer is the same "
           "network written with timm's layers, or, where timm has no such layer, the zoo "
           "model with each block computed by its naive formula (same weights). Compiled: "
           "inductor against the same model eager (goal: compiled time / eager time <= "
           "1.00).", "",
           "| attnzoo | peer | batch | attnzoo img/s | peer img/s | ratio | goal | "
           "compiled img/s | eager img/s | compiled / eager | goal |",
           "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        goal = "met" if r["ratio"] <= 1.03 else "missed"
        if "compile_ratio" in r:
            comp = (f"{r['compiled_ips']:.2f} | {r['eager_ips']:.2f} | "
                    f"{r['compile_ratio']:.3f} | "
                    f"{'met' if r['compile_ratio'] <= 1.0 else 'missed'}")
        else:
            comp = f"- | - | - | {r.get('compile_error', 'not run')}"
        out.append(f"| {r['zoo']} | {r['peer']} | {r['batch']} | {r['attnzoo_ips']:.2f} | "
                   f"{r['peer_ips']:.2f} | {r['ratio']:.3f} | {goal} | {comp} |")
    out.append("")
    return out


def _peak(r: dict[str, Any]) -> int | None:
    if "peak_bytes" not in r:
        return None
    return max(r["peak_bytes"], r.get("anon_peak_bytes", 0))


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
        "kernel_sizes": [32, 64, 96, 128], "kernel_repeats": 3 if quick else 5,
        "matmul_repeats": 5 if quick else 9,
        "training_batch": 8, "training_repeats": 3 if quick else 5,
        # inductor compiles each model for forward+backward in minutes on 2 cores
        "training_compile": not quick or compile_all,
        "max_gib": 6,
    }
    results: dict[str, Any] = {"settings": settings}
    if "build" in sections:
        results["build"] = bench_build(settings["build_repeats"])
    if "load" in sections:
        results["load"] = bench_load(settings["load_repeats"])
    if "kernels" in sections:
        results["matmul"] = [{**bench_matmul(settings["matmul_repeats"]), "when": "before"}]
        results["kernels"] = bench_kernels(settings["kernel_sizes"], settings["kernel_repeats"],
                                           settings["max_gib"] << 30)
        results["recurrence"] = bench_recurrence(128, settings["kernel_repeats"] + 2)
        results["matmul"].append({**bench_matmul(settings["matmul_repeats"]), "when": "after"})
    if "training" in sections:
        results["training"] = bench_training(settings["training_batch"], settings["size"],
                                             settings["training_repeats"],
                                             settings["training_compile"])
    if "throughput" in sections:
        results["throughput"] = bench_throughput(
            settings["batches"], settings["size"], settings["throughput_repeats"],
            settings["compile_pairs"], settings["compile_train"])
    results["machine"] = machine()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["build", "load", "kernels",
                                                          "throughput", "training"],
                        choices=["build", "load", "kernels", "throughput", "training"])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, no torch.compile")
    parser.add_argument("--compile-all", action="store_true",
                        help="torch.compile every pair, forward and forward+backward (slow)")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--append", nargs="+", type=Path, default=[],
                        help="Markdown files of hand-measured sections, appended as they are "
                        "(before 'Goals missed')")
    parser.add_argument("--notes", default=None,
                        help="a text file of notes (one per line) for 'Goals missed, and why'")
    parser.add_argument("--from-json", nargs="+", default=None,
                        help="render saved --json results (several merge), run nothing")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child = json.loads(args.child)
        section = {"load": _load_child, "kernels": _kernel_child,
                   "kernel_time": _kernel_time_child, "matmul": _matmul_child,
                   }[child["section"]]
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
    if args.append:
        results["appendix"] = [p.read_text(encoding="utf-8").strip() for p in args.append]
    Path(args.out).write_text(render(results))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
