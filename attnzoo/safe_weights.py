"""Reading weight files safely: safetensors only, header checked before any tensor.

A weights file comes from a stranger. Pickle formats are refused by name and by
content, never opened with ``torch.load``. A safetensors header is parsed and
checked here (size, JSON, dtypes, shapes, offsets) before safetensors reads it,
so a lying header is a ``WeightsError`` naming the file, not a crash or a huge
allocation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import WeightsError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def refuse_pickle(path: str | os.PathLike[str]) -> None:
    """Raise WeightsError if ``path`` is a pickle-based checkpoint (by name or content)."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(f"{p}: refusing a pickle checkpoint ({p.suffix}); attnzoo loads "
                           "safetensors only (convert it where you trust it, e.g. "
                           "tools/convert_timm.py)")
    with open(p, "rb") as f:
        head = f.read(4)
    if head.startswith(_PICKLE_MAGIC):
        raise WeightsError(f"{p}: file content is a pickle/zip checkpoint, not safetensors; "
                           "refusing to load it")


def check_header(path: str | os.PathLike[str]) -> dict[str, dict]:
    """Parse and validate a safetensors header without reading any tensor data.

    Returns the tensor entries (name -> {dtype, shape, data_offsets}).
    """
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightsError(f"{p}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise WeightsError(f"{p}: header length {n} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsError(f"{p}: header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{p}: header is not a JSON object")
    data_size = size - 8 - n
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    spans = []
    for name, info in entries.items():
        where = f"{p}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise WeightsError(f"{where}: malformed entry {str(info)[:80]}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPE_BYTES:
            raise WeightsError(f"{where}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                        for d in shape)):
            raise WeightsError(f"{where}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise WeightsError(f"{where}: bad data_offsets {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
        if not 0 <= begin <= end <= data_size:
            raise WeightsError(f"{where}: data_offsets {offsets} outside the {data_size}-byte "
                               "data section (truncated or lying file)")
        if end - begin != nbytes:
            raise WeightsError(f"{where}: shape {shape} of {dtype} needs {nbytes} bytes but "
                               f"its offsets span {end - begin}")
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise WeightsError(f"{p}: tensors {a!r} and {b!r} overlap")
    return entries


def load_safetensors(path: str | os.PathLike[str], expected_sha256: str | None = None
                     ) -> dict[str, torch.Tensor]:
    """Load a safetensors file to CPU tensors after refusing pickles, checking the sha256
    (when given) and validating the header."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: weights file not found")
    refuse_pickle(p)
    if expected_sha256 is not None:
        actual = sha256_file(p)
        if actual != expected_sha256.lower():
            raise WeightsError(f"{p}: sha256 mismatch: expected {expected_sha256}, got "
                               f"{actual} (tampered, truncated or the wrong file)")
    check_header(p)
    try:
        return load_file(str(p), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise WeightsError(f"{p}: not a readable safetensors file: {exc}") from None
