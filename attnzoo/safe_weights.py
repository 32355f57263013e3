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
from typing import BinaryIO

import torch

from . import verified_files
from .atomic import open_regular
from .errors import WeightsError
from .hub_cache import in_hub_cache, quarantine, removal_advice

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
    """The sha256 of a regular file, read up to the size it has when opened (a FIFO or
    device is refused, a ``/proc`` file that never ends is read as empty)."""
    digest = hashlib.sha256()
    with open_regular(path, WeightsError) as f:
        left = os.fstat(f.fileno()).st_size
        while left > 0 and (block := f.read(min(chunk, left))):
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def refuse_pickle(path: str | os.PathLike[str], where: str | None = None, *,
                  content: bool = True) -> None:
    """Raise WeightsError if ``path`` is a pickle-based checkpoint: by its name, then (when
    ``content`` and it is a regular file) by its first bytes. The file is never unpickled."""
    p = Path(path)
    prefix = f"{where}: " if where else ""
    if p.name.lower().endswith(PICKLE_SUFFIXES):
        raise WeightsError(
            f"{prefix}refusing {p}: pickle checkpoints (.bin, .pt, .pth, .ckpt) can run code "
            "when loaded and attnzoo never unpickles; use safetensors (convert a checkpoint "
            "you trust with tools/convert_timm.py or safetensors.torch.save_file)")
    if not content or not p.is_file():
        return
    with open_regular(p, WeightsError) as f:
        head = _read_exactly(f, 4)
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
    with open_regular(p, WeightsError) as f:
        return _check_header(f, p, os.fstat(f.fileno()).st_size)


def _read_exactly(f: BinaryIO, n: int) -> bytes:
    chunks, got = [], 0
    while got < n and (chunk := f.read(n - got)):
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _check_header(f: BinaryIO, p: Path, size: int) -> dict[str, dict]:
    """:func:`check_header` of an open regular file of ``size`` bytes."""
    f.seek(0)
    raw = _read_exactly(f, 8) if size >= 8 else b""  # nothing past the size (a /proc file)
    if len(raw) < 8:
        raise WeightsError(f"{p}: too short to be a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8:
        raise WeightsError(f"{p}: header length {n} does not fit a {size}-byte file "
                           "(truncated, or not a safetensors file)")
    if n > MAX_HEADER_BYTES:
        raise WeightsError(f"{p}: header length {n} is over attnzoo's limit of "
                           f"{MAX_HEADER_BYTES} bytes")
    header = _parse_header(p, _read_exactly(f, n))
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
TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
    "U32": torch.uint32, "F32": torch.float32, "I64": torch.int64, "U64": torch.uint64,
    "F64": torch.float64, "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
}
_READ_CHUNK = 16 << 20


class HashMismatch(WeightsError):
    """A weights file that is not the one whose sha256 was recorded."""


def _mismatch(path: Path, problem: str, where: str,
              what: str = "corrupt, truncated or not the recorded file") -> HashMismatch:
    """The error for a file that failed verification. A file of the Hub cache is taken
    out of it, so that the next online load downloads it again."""
    if in_hub_cache(path):
        advice = removal_advice(path)
        if quarantine(path):
            tail = ("It was removed from the Hub cache; the next load downloads it again "
                    "(online).")
        else:
            tail = f"Remove it from the Hub cache ({advice}) and load again."
    else:
        tail = "Save or download it again."
    return HashMismatch(f"{where}: weights file {path.name} ({path}) failed verification: "
                        f"{problem}; it is {what}. {tail}")


class _NoHash:
    """Stands in for a hash object when the file is already known to be verified."""

    def update(self, data: object) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def _read_and_hash(f: BinaryIO, path: Path, header: dict[str, dict], size: int,
                   digest: object = None) -> tuple[dict[str, torch.Tensor], str]:
    """Read every tensor of an open safetensors file of ``size`` bytes whose header passed
    :func:`check_header` (so the tensors tile the data section), in one pass that also
    computes the file's sha256. Nothing past ``size`` is read.

    Each tensor is read straight into memory from PyTorch's allocator: 64-byte aligned
    like any tensor a model allocates (CPU kernels may round differently on other
    alignments, e.g. on an mmap of the file), the weights held once, no page of the
    file mapped into the process. ``digest`` may be :class:`_NoHash` to skip hashing.
    """
    digest = digest or hashlib.sha256()
    spans = sorted((info["data_offsets"][0], name) for name, info in header.items())
    tensors: dict[str, torch.Tensor] = {}
    f.seek(0)
    head = _read_exactly(f, 8)
    digest.update(head)
    n = int.from_bytes(head, "little")
    digest.update(_read_exactly(f, n))
    left = size - 8 - n
    for _, name in spans:
        info = header[name]
        dtype = TORCH_DTYPES[info["dtype"]]
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
        left -= done
        tensors[name] = tensor
    while left > 0 and (rest := f.read(min(left, _READ_CHUNK))):
        digest.update(rest)  # nothing, for a header that checked out
        left -= len(rest)
    return tensors, digest.hexdigest()


def read_verified(path: str | os.PathLike[str], sha256: str | None, where: str, *,
                  require_hash: bool = True,
                  within: str | os.PathLike[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after checking its sha256: attnzoo's one reader.

    The file must be a regular file (inside the folder ``within``, links resolved, when
    given); its header is validated before anything else is read, then the file is
    read once: the tensors and the hash together. Nothing is returned unless the hash
    matches. Raises WeightsError naming the file when it is a pickle, missing, not a
    regular file, has another hash (corrupt, truncated, not the pinned file) or is not
    valid safetensors; a pinned file whose header is invalid fails verification without
    being hashed. A file of the Hub cache that fails verification is removed from it.
    A file this machine verified before and that has not changed since (same inode,
    size, mtime and ctime: :mod:`attnzoo.verified_files`) is read without hashing.
    With ``require_hash=False`` (a user's own file, read by a tool) ``sha256`` may be None.
    """
    path = Path(path)
    refuse_pickle(path, where, content=False)
    if sha256 is None and require_hash or sha256 is not None and not SHA256.match(sha256):
        raise WeightsError(f"{where}: no valid sha256 recorded for {path.name}; refusing to "
                           "load unverified weights")
    try:
        f = open_regular(path, WeightsError, within=within)
    except FileNotFoundError:
        raise WeightsError(f"{where}: weights file {path} not found") from None
    except WeightsError as exc:
        raise WeightsError(f"{where}: weights file {exc}") from None
    except OSError as exc:
        raise WeightsError(f"{where}: cannot read weights file {path}: {exc.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        try:
            return _verified_tensors(f, path, size, sha256, where)
        except OSError as exc:  # EIO, or a /proc file that refuses plain reads
            raise WeightsError(f"{where}: cannot read weights file {path}: "
                               f"{exc.strerror or exc}") from None


def _verified_tensors(f: BinaryIO, path: Path, size: int, sha256: str | None, where: str
                      ) -> dict[str, torch.Tensor]:
    """:func:`read_verified` of an open regular file of ``size`` bytes."""
    if _read_exactly(f, min(4, size)).startswith(_PICKLE_MAGIC):
        raise WeightsError(f"{where}: {path}: file content is a pickle/zip checkpoint, "
                           "not safetensors; refusing to load it")
    try:
        # A recorded hash only says the file is the one recorded; a stranger may have
        # recorded a hostile file, so the content is checked before any tensor is read.
        header = _check_header(f, path, size)
        unknown = sorted({i["dtype"] for i in header.values()} - set(TORCH_DTYPES))
        if unknown:
            raise WeightsError(f"{path}: dtypes {unknown} are not supported")
    except WeightsError as exc:
        if sha256 is not None:  # not the pinned file: no need to hash it to know
            raise _mismatch(path, f"{exc} (the recorded file has sha256 {sha256})", where,
                            "corrupt, truncated or not a safetensors file") from None
        raise WeightsError(f"{where}: {exc}") from None
    stat = os.fstat(f.fileno())
    known = sha256 is not None and verified_files.is_verified(path, stat, sha256)
    try:
        tensors, actual = _read_and_hash(f, path, header, size,
                                         _NoHash() if known else None)
    except WeightsError as exc:
        raise WeightsError(f"{where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a verified file can still be malformed
        raise WeightsError(f"{where}: weights file {path.name} ({path}) is not a valid "
                           f"safetensors file: {exc}") from None
    if known:
        return tensors
    if sha256 is not None and actual != sha256:
        raise _mismatch(path, f"sha256 {actual} != expected {sha256}", where)
    if sha256 is not None:
        verified_files.remember(path, stat, sha256)
    return tensors


def load_safetensors(path: str | os.PathLike[str], expected_sha256: str | None = None
                     ) -> dict[str, torch.Tensor]:
    """Load a safetensors file to CPU tensors after refusing pickles, checking the sha256
    (when given) and validating the header (:func:`read_verified`)."""
    p = Path(path)
    return read_verified(p, expected_sha256.lower() if expected_sha256 else None, str(p),
                         require_hash=False)
