"""Peak memory of attnzoo's criss_cross block on a large map (default 1x512x128x128).

CCNet's point is that criss-cross attention needs memory ~ H*W*(H+W), not (H*W)^2: at
128x128 one HW x HW float32 matrix alone is 1 GiB. This tool runs the block in a fresh
subprocess per measurement and reports the peak it needed:

* CPU: the growth of the process's peak resident set size (``getrusage`` maxrss) over
  the baseline taken after the block and the input exist (so it counts what the
  forward pass and, with ``--backward``, the backward pass allocate);
* CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated`` over the same baseline.

    python tools/bench_criss_cross_memory.py                 # forward, no grad
    python tools/bench_criss_cross_memory.py --backward      # forward + backward
    python tools/bench_criss_cross_memory.py --device cuda --size 256

Exit status 1 when the peak exceeds ``--limit-gib`` (2 GiB by default).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

GIB = 1024 ** 3


def _maxrss_bytes() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure(channels: int, size: int, device: str, backward: bool, recurrence: int) -> dict:
    """Run once in this process and return the peak figures (call in a fresh process)."""
    import time

    import torch

    import attnzoo

    torch.manual_seed(0)
    block = attnzoo.create_block("criss_cross", channels, recurrence=recurrence).to(device)
    with torch.no_grad():
        block.gamma.fill_(0.5)  # not the identity: the attention path runs and matters
    x = torch.randn(1, channels, size, size, device=device, requires_grad=backward)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _maxrss_bytes()
    start = time.perf_counter()
    if backward:
        block(x).square().mean().backward()
    else:
        with torch.no_grad():
            block(x)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _maxrss_bytes() - base
    return {
        "input": [1, channels, size, size], "device": device, "backward": backward,
        "recurrence": recurrence, "peak_bytes": peak, "peak_gib": round(peak / GIB, 3),
        "seconds": round(time.perf_counter() - start, 2),
        "hw_by_hw_matrix_gib": round((size * size) ** 2 * 4 / GIB, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--size", type=int, default=128, help="H = W of the input map")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--recurrence", type=int, default=2)
    parser.add_argument("--backward", action="store_true", help="also run a backward pass")
    parser.add_argument("--limit-gib", type=float, default=2.0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    params = (args.channels, args.size, args.device, args.backward, args.recurrence)
    if args.child:
        print(json.dumps(measure(*params)))
        return 0
    # A fresh interpreter, so the peak RSS is this measurement's and nobody else's.
    cmd = [sys.executable, __file__, "--child", "--channels", str(args.channels),
           "--size", str(args.size), "--device", args.device,
           "--recurrence", str(args.recurrence)] + (["--backward"] if args.backward else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        return done.returncode
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["limit_gib"] = args.limit_gib
    result["within_limit"] = result["peak_bytes"] < args.limit_gib * GIB
    print(json.dumps(result, indent=2))
    return 0 if result["within_limit"] else 1


if __name__ == "__main__":
    sys.exit(main())
