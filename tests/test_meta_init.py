"""Building a model whose parameters a weights file will provide (attnzoo/meta_init.py):
parameters on meta in the calling thread only, and the tensors a file did not hold
taken from a normal build."""

from __future__ import annotations

import threading

import torch

from attnzoo import loading, meta_init
from attnzoo.builder import build_model


def test_a_buffer_left_on_meta_is_taken_from_a_normal_build(model) -> None:
    spec = model.attnzoo_spec
    rng = torch.random.get_rng_state()
    built = build_model(spec, None, init="skip")
    assert all(p.is_meta for p in built.parameters())
    assert not any(b.is_meta for b in built.buffers())
    loading.load_checked(built, dict(model.state_dict()), "test", assign=True)
    # As if a module had made a buffer from one of its (meta) parameters.
    bn = built.get_submodule("stem.bn")
    bn._buffers["running_var"] = torch.empty(bn.running_var.shape, device="meta")
    torch.random.set_rng_state(rng)
    fixed = meta_init.fill_meta_tensors(built, build_model(spec))
    assert fixed == ["stem.bn.running_var"]
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))  # a fresh BN's
    assert meta_init.meta_tensors(built) == []


def test_parameters_on_meta_affects_only_the_calling_thread() -> None:
    devices: dict[str, torch.device] = {}
    ready, done = threading.Event(), threading.Event()

    def other() -> None:
        ready.wait()
        devices["other"] = torch.nn.Linear(2, 2).weight.device
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with meta_init.parameters_on_meta():
        devices["here"] = torch.nn.Linear(2, 2).weight.device
        ready.set()
        done.wait(10)
    thread.join()
    assert devices == {"here": torch.device("meta"), "other": torch.device("cpu")}
    assert torch.nn.Linear(2, 2).weight.device == torch.device("cpu")
