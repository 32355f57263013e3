"""One check per export path: torch.export's program, and onnxruntime running the ONNX
model of the dynamo exporter, each against eager outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn


def assert_export_matches(module: nn.Module, x: torch.Tensor) -> None:
    """``torch.export`` of ``module`` at ``x`` gives eager's outputs."""
    exported = torch.export.export(module, (x,))
    torch.testing.assert_close(exported.module()(x), module(x))


def assert_onnxruntime_matches(module: nn.Module, x: torch.Tensor, path: Path,
                               tol: float = 1e-5) -> None:
    """The ONNX model written to ``path`` gives eager's (single) output in onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    torch.onnx.export(module, (x,), dynamo=True).save(str(path))
    session = ort.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = module(x)
    torch.testing.assert_close(torch.from_numpy(out), want, atol=tol, rtol=tol)
