"""Distributed data parallel training of a zoo model: 2 processes, gloo, CPU."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests._helpers.modules import live_batchnorm_

WORLD_SIZE = 2
STEPS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, port: int, out_dir: str) -> None:
    """One rank: resnet18_cbam under DDP, 2 SGD steps on this rank's own batch; saves
    the gradients of every step and the final parameters for the parent to compare."""
    import attnzoo  # in the child: spawn starts a fresh interpreter

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=WORLD_SIZE)
    try:
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        model = attnzoo.create_model("resnet18_cbam", num_classes=10)
        live_batchnorm_(model)  # timm zero-inits the last BNs, which would starve CBAM
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        data = torch.Generator().manual_seed(100 + rank)  # a different batch per rank
        grads = []
        for _ in range(STEPS):
            x = torch.randn(2, 3, 32, 32, generator=data)
            y = torch.randint(0, 10, (2,), generator=data)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            optimizer.step()
        torch.save({"grads": grads, "params": model.state_dict()},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_trains_resnet18_cbam_with_equal_gradients_on_both_ranks(tmp_path):
    mp.spawn(_train, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE))
    assert len(r0["grads"]) == STEPS
    for step in range(STEPS):
        g0, g1 = r0["grads"][step], r1["grads"][step]
        assert g0.keys() == g1.keys()
        cbam = [n for n in g0 if ".attnzoo_after." in n]
        assert cbam, "the inserted CBAM blocks have parameters that train"
        for name in g0:
            # every parameter got a gradient (no unused parameters), averaged over ranks
            assert g0[name] is not None, name
            torch.testing.assert_close(g0[name], g1[name], msg=f"step {step}: {name}")
        assert any(g0[n].abs().sum() > 0 for n in cbam)
    for name, value in r0["params"].items():
        if "running_" in name or "num_batches_tracked" in name:
            continue  # BN statistics are per rank unless SyncBatchNorm is used
        torch.testing.assert_close(value, r1["params"][name], msg=name)
