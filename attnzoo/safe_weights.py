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
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import WeightsError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: attnzoo's cap on the JSON header (the format allows 100 MB). A vision model's header
#: is a few hundred kB at most; parsing JSON takes ~25x its size in memory, so a larger
#: header could only be a way to make the loader allocate.
MAX_HEADER_BYTES = 8 * 1024 * 1024
_MAX_DIM = 2**63 - 1  # torch sizes are int64
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
# Pickle protocols 2-5 and the zip container of torch.save; protocol 0/1 pickles and
# anything else that is not safetensors fail the header-length check instead.
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


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _short(value: object, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int | None:
    """Bytes of a tensor of ``shape``, or None once the product passes ``limit`` (no
    huge integer arithmetic on a lying shape)."""
    if 0 in shape:
        return 0
    total = itemsize
    for d in shape:
        total *= d
        if total > limit:
            return None
    return total


def _parse_header(p: Path, raw: bytes) -> dict:
    try:
        # Strict UTF-8 (json.loads on bytes would also take UTF-16/32), strict JSON (no
        # NaN/Infinity), and no key given twice: safetensors and Python would each keep
        # one of two entries, and a header that says two things is a lie.
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                            parse_constant=_no_constant)
    except _DuplicateKey as exc:
        raise WeightsError(f"{p}: header gives the key {_short(exc.args[0])} twice") from None
    except UnicodeDecodeError as exc:
        raise WeightsError(f"{p}: header is not UTF-8 JSON: {exc}") from None
    except ValueError as exc:  # JSONDecodeError, NaN, ints past Python's digit limit
        raise WeightsError(f"{p}: header is not valid JSON: {exc}") from None
    except RecursionError:
        raise WeightsError(f"{p}: header is not valid JSON: nested too deeply") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{p}: header is not a JSON object")
    return header


def check_header(path: str | os.PathLike[str]) -> dict[str, dict]:
    """Parse and validate a safetensors header without reading any tensor data.

    Checks what safetensors itself checks, with an error that names the file and
    tensor: the header length fits the file, the header is UTF-8 JSON with no repeated
    key, ``__metadata__`` maps strings to strings, every entry has a known dtype, a
    shape and offsets whose span is exactly shape x dtype bytes, and the tensors tile
    the data section (no overlap, no gap, nothing after the last one).

    Returns the tensor entries (name -> {dtype, shape, data_offsets}).
    """
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightsError(f"{p}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise WeightsError(f"{p}: header length {n} does not fit a {size}-byte file "
                               "(truncated, or not a safetensors file)")
        if n > MAX_HEADER_BYTES:
            raise WeightsError(f"{p}: header length {n} is over attnzoo's limit of "
                               f"{MAX_HEADER_BYTES} bytes")
        header = _parse_header(p, f.read(n))
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise WeightsError(f"{p}: __metadata__ must map strings to strings, got "
                           f"{_short(metadata)}")
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        where = f"{p}: tensor {_short(name)}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise WeightsError(f"{where}: malformed entry {_short(info)}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise WeightsError(f"{where}: unknown dtype {_short(dtype)}")
        if not (isinstance(shape, list)
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM
                        for d in shape)):
            raise WeightsError(f"{where}: bad shape {_short(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise WeightsError(f"{where}: bad data_offsets {_short(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise WeightsError(f"{where}: data_offsets {_short(offsets)} outside the "
                               f"{data_size}-byte data section (truncated or lying file)")
        nbytes = _nbytes(shape, _DTYPE_BYTES[dtype], data_size)
        if nbytes != end - begin:
            needs = "more than the whole file" if nbytes is None else f"{nbytes} bytes"
            raise WeightsError(f"{where}: shape {_short(shape)} of {dtype} needs {needs} but "
                               f"its offsets span {end - begin}")
        spans.append((begin, end, name))
    spans.sort()
    covered = 0
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise WeightsError(f"{p}: tensors {_short(a)} and {_short(b)} overlap")
    for begin, end, name in spans:
        if begin != covered:
            raise WeightsError(f"{p}: {begin - covered} bytes before tensor {_short(name)} "
                               "belong to no tensor (lying offsets)")
        covered = end
    if covered != data_size:
        raise WeightsError(f"{p}: {data_size - covered} bytes after the last tensor belong "
                           "to no tensor (lying offsets, or data appended to the file)")
    return header


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
