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
import re
import struct
from pathlib import Path

import torch

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


def refuse_pickle(path: str | os.PathLike[str], where: str | None = None) -> None:
    """Raise WeightsError if ``path`` is a pickle-based checkpoint: by its name, then (when
    the file exists) by its first bytes. The file is never unpickled."""
    p = Path(path)
    prefix = f"{where}: " if where else ""
    if p.name.lower().endswith(PICKLE_SUFFIXES):
        raise WeightsError(
            f"{prefix}refusing {p}: pickle checkpoints (.bin, .pt, .pth, .ckpt) can run code "
            "when loaded and attnzoo never unpickles; use safetensors (convert a checkpoint "
            "you trust with tools/convert_timm.py or safetensors.torch.save_file)")
    if not p.is_file():
        return
    with open(p, "rb") as f:
        head = f.read(4)
    if head.startswith(_PICKLE_MAGIC):
        raise WeightsError(f"{prefix}{p}: file content is a pickle/zip checkpoint, not "
                           "safetensors; refusing to load it")


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


def check_weights_file_name(name: str, embedded: bool = False) -> None:
    """Raise ValueError unless ``name`` is a relative ``.safetensors`` path inside its repo
    or folder (a plain file name when ``embedded``)."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith("/") or ".." in parts or (embedded and len(parts) != 1):
        raise ValueError(f"file {name!r} must be a relative path inside its repo "
                         "(a plain file name for embedded weights)")
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(f"file {name!r} is a pickle file; attnzoo loads safetensors only")
    if not name.endswith(".safetensors"):
        raise ValueError(f"file {name!r} is not a .safetensors file")


# ------------------------------------------------------------------ reading tensors

SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
    "U32": torch.uint32, "F32": torch.float32, "I64": torch.int64, "U64": torch.uint64,
    "F64": torch.float64, "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
}
_READ_CHUNK = 16 << 20


def _mismatch(path: Path, actual: str, sha256: str, where: str) -> WeightsError:
    return WeightsError(
        f"{where}: weights file {path.name} ({path}) failed verification: sha256 "
        f"{actual} != expected {sha256}; it is corrupt, truncated or not the pinned "
        "file. Delete it (for a Hub download: `hf cache delete`) and download again.")


def _read_and_hash(path: Path, header: dict[str, dict]) -> tuple[dict[str, torch.Tensor], str]:
    """Read every tensor of a safetensors file whose header passed :func:`check_header`
    (so the tensors tile the data section), in one pass that also computes the file's
    sha256.

    Each tensor is read straight into memory from PyTorch's allocator: 64-byte aligned
    like any tensor a model allocates (CPU kernels may round differently on other
    alignments, e.g. on an mmap of the file), the weights held once, no page of the
    file mapped into the process.
    """
    digest = hashlib.sha256()
    spans = sorted((info["data_offsets"][0], name) for name, info in header.items())
    tensors: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as f:
        head = f.read(8)
        digest.update(head)
        size = int.from_bytes(head, "little")
        digest.update(f.read(size))
        for _, name in spans:
            info = header[name]
            dtype = _TORCH_DTYPES[info["dtype"]]
            if 0 in info["shape"]:  # no data; contiguous strides could overflow int64
                tensors[name] = torch.empty_strided(info["shape"], [0] * len(info["shape"]),
                                                    dtype=dtype)
                continue
            tensor = torch.empty(info["shape"], dtype=dtype)
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            done = 0
            while done < len(view):
                got = f.readinto(view[done:done + _READ_CHUNK])
                if not got:
                    raise WeightsError(f"{path}: ended inside tensor {name!r}")
                digest.update(view[done:done + got])
                done += got
            tensors[name] = tensor
        while rest := f.read(_READ_CHUNK):  # nothing, for a header that checked out
            digest.update(rest)
    return tensors, digest.hexdigest()


def read_verified(path: str | os.PathLike[str], sha256: str | None, where: str, *,
                  require_hash: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after checking its sha256: attnzoo's one reader.

    The header is validated first, then the file is read once: the tensors and the
    hash together. Nothing is returned unless the hash matches. Raises WeightsError
    naming the file when it is a pickle, missing, has another hash (corrupt,
    truncated, not the pinned file) or is not valid safetensors; a file that fails
    both the content checks and the hash is reported as failing the hash. With
    ``require_hash=False`` (a user's own file, read by a tool) ``sha256`` may be None.
    """
    path = Path(path)
    refuse_pickle(path, where)
    if sha256 is None and require_hash or sha256 is not None and not SHA256.match(sha256):
        raise WeightsError(f"{where}: no valid sha256 recorded for {path.name}; refusing to "
                           "load unverified weights")
    if not path.is_file():
        raise WeightsError(f"{where}: weights file {path} not found")
    try:
        # A recorded hash only says the file is the one recorded; a stranger may have
        # recorded a hostile file, so the content is checked before any tensor is read.
        header = check_header(path)
        unknown = sorted({i["dtype"] for i in header.values()} - set(_TORCH_DTYPES))
        if unknown:
            raise WeightsError(f"{path}: dtypes {unknown} are not supported")
    except WeightsError as exc:
        actual = sha256_file(path) if sha256 is not None else None
        if actual != sha256:
            raise _mismatch(path, actual, sha256, where) from None
        raise WeightsError(f"{where}: {exc}") from None
    try:
        tensors, actual = _read_and_hash(path, header)
    except WeightsError as exc:
        raise WeightsError(f"{where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a verified file can still be malformed
        raise WeightsError(f"{where}: weights file {path.name} ({path}) is not a valid "
                           f"safetensors file: {exc}") from None
    if sha256 is not None and actual != sha256:
        raise _mismatch(path, actual, sha256, where)
    return tensors


def load_safetensors(path: str | os.PathLike[str], expected_sha256: str | None = None
                     ) -> dict[str, torch.Tensor]:
    """Load a safetensors file to CPU tensors after refusing pickles, checking the sha256
    (when given) and validating the header (:func:`read_verified`)."""
    p = Path(path)
    return read_verified(p, expected_sha256.lower() if expected_sha256 else None, str(p),
                         require_hash=False)
