"""Pretrained weights: resolve, download, verify and load them; save and share models.

Three sources of weights, all safetensors, all checked against a sha256 before a
single tensor reaches the model:

* a saved folder or a Hub repo written by :func:`save_pretrained` /
  :func:`push_to_hub`: ``attnzoo.yaml`` (the spec plus ``weights: {file, sha256}``),
  ``model.safetensors`` and a model card ``README.md``;
* zoo manifests ``weights/<model>.yaml``: one entry per tag naming a Hub repo, a
  pinned 40-hex revision, a file and its sha256 (``format: timm`` entries are timm's
  own checkpoints, renamed by :func:`attnzoo.convert.from_timm` after verification);
* embedded files: an entry without ``repo`` names a safetensors file shipped in the
  ``weights/`` folder itself (``digits_cbam_tiny``).

Pickle files (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) are refused by name and never
opened. Downloads go through ``hf_hub_download`` (cache, offline mode, progress bars).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData, hf_hub_download
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from . import safe_weights
from .errors import AttnZooError, SpecError, WeightsError
from .registry import did_you_mean
from .safe_weights import PICKLE_SUFFIXES
from .safe_weights import sha256_file as sha256_of
from .spec import ModelSpec, format_validation_error, load_yaml, read_source
from .zoo import data_dir

SPEC_FILE = "attnzoo.yaml"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
HUB_PREFIX = "hf-hub:"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_PIN_HINT = ("run `python tools/pin_weights.py {name}` on a machine with network access to "
             "fill `revision` and `sha256` from the Hub, then check the diff in")


def _version() -> str:
    from . import __version__

    return __version__


# --------------------------------------------------------------------------- manifests


class WeightsEntry(BaseModel):
    """One tag of a zoo model's weights: where the file is and what is known about it.

    Unknown facts stay empty (``None``); an entry missing its ``sha256`` (or, for a
    Hub file, its pinned ``revision``) is refused until ``tools/pin_weights.py`` fills it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    repo: str | None = Field(None, description="Hub repo id; empty for a file embedded in "
                             "attnzoo's weights/ folder.")
    revision: str | None = Field(None, description="Pinned 40-hex commit of the repo.")
    file: str = Field(WEIGHTS_FILE, description="The safetensors file (in the repo, or in "
                      "weights/ when embedded).")
    sha256: str | None = Field(None, description="sha256 of the file, checked before loading.")
    format: Literal["attnzoo", "timm"] = Field(
        "attnzoo", description="Key layout of the file: attnzoo's own, or timm's (renamed "
        "with attnzoo.convert.from_timm after verification).")
    num_classes: int | None = Field(None, description="Classifier outputs of these weights.")
    source: dict[str, Any] = Field(default_factory=dict, description="Provenance: where the "
                                   "weights come from and how they were made.")
    license: str | None = Field(None, description="License of the weights.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Measured metrics "
                                      "(name -> value), with the dataset in `source`.")
    notes: str = Field("", description="Anything else a user should know.")

    @model_validator(mode="after")
    def _check(self) -> WeightsEntry:
        if self.revision is not None and not _COMMIT.match(self.revision):
            raise ValueError(f"revision must be a 40-hex commit, got {self.revision!r}")
        if self.sha256 is not None and not _SHA256.match(self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        _check_file_name(self.file, embedded=self.repo is None)
        return self

    @property
    def pinned(self) -> bool:
        return self.sha256 is not None and (self.repo is None or self.revision is not None)


class WeightsManifest(BaseModel):
    """``weights/<model>.yaml``: the tags of one zoo model's weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="The zoo model the weights are for.")
    default: str = Field(description="The tag that pretrained=True picks.")
    tags: dict[str, WeightsEntry] = Field(description="tag -> weights entry.")

    @model_validator(mode="after")
    def _default_exists(self) -> WeightsManifest:
        if self.default not in self.tags:
            raise ValueError(f"default tag {self.default!r} is not one of the tags "
                             f"{sorted(self.tags)}")
        return self


def _check_file_name(name: str, embedded: bool) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith("/") or ".." in parts or (embedded and len(parts) != 1):
        raise ValueError(f"file {name!r} must be a relative path inside its repo "
                         "(a plain file name for embedded weights)")
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(f"file {name!r} is a pickle file; attnzoo loads safetensors only")
    if not name.endswith(".safetensors"):
        raise ValueError(f"file {name!r} is not a .safetensors file")


def weights_dir() -> Path:
    """The folder of manifests and embedded weights (``attnzoo.weights`` in a wheel)."""
    return data_dir("weights")


def load_manifest(name: str) -> WeightsManifest | None:
    """The manifest of zoo model ``name``, or None when it has no weights."""
    path = weights_dir() / f"{name}.yaml"
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        return WeightsManifest.model_validate(data)
    except yaml.YAMLError as exc:
        raise WeightsError(f"weights manifest {path}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        msg = format_validation_error(exc, f"weights manifest {path}", text)
        raise WeightsError(msg.replace("invalid spec", "invalid manifest")) from None


def list_pretrained(pattern: str = "*") -> list[str]:
    """``model.tag`` of every zoo weights entry matching a shell pattern."""
    out = []
    for path in sorted(weights_dir().glob("*.yaml")):
        manifest = load_manifest(path.stem)
        if manifest is not None:
            out += [f"{manifest.model}.{tag}" for tag in manifest.tags]
    return [n for n in out if fnmatch.fnmatch(n, pattern)]


def resolve_zoo_weights(model_name: str, pretrained: bool | str
                        ) -> tuple[str, WeightsEntry]:
    """The (tag, entry) that ``pretrained`` picks for zoo model ``model_name``:
    True = the default tag, ``"tag"`` or ``"model.tag"`` = that tag."""
    manifest = load_manifest(model_name)
    if manifest is None:
        have = [p.stem for p in sorted(weights_dir().glob("*.yaml"))]
        raise WeightsError(f"zoo model {model_name!r} has no pretrained weights; models "
                           f"with weights: {', '.join(have) or 'none'}")
    if pretrained is True:
        tag = manifest.default
    elif isinstance(pretrained, str) and pretrained:
        tag = pretrained
        if pretrained.startswith(f"{model_name}."):
            tag = pretrained[len(model_name) + 1:]
        elif "." in pretrained and pretrained not in manifest.tags:
            other = pretrained.rsplit(".", 1)[0]
            raise WeightsError(f"weights {pretrained!r} are for model {other!r}, not "
                               f"{model_name!r}; tags of {model_name}: "
                               f"{', '.join(sorted(manifest.tags))}")
    else:
        raise WeightsError(f"pretrained must be True or a tag string, got {pretrained!r}")
    if tag not in manifest.tags:
        raise WeightsError(f"zoo model {model_name!r} has no weights tag {tag!r}"
                           f"{did_you_mean(tag, manifest.tags)}; tags: "
                           f"{', '.join(sorted(manifest.tags))}")
    return tag, manifest.tags[tag]


# ------------------------------------------------------------------------ verification


def refuse_pickle(path: str | os.PathLike[str], where: str) -> None:
    """Raise WeightsError if ``path`` is named like a pickle file (it is never opened)."""
    name = os.fspath(path)
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise WeightsError(
            f"{where}: refusing {name}: pickle checkpoints (.bin, .pt, .pth, .ckpt) can run "
            "code when loaded and attnzoo never unpickles; use safetensors (convert a "
            "checkpoint you trust with safetensors.torch.save_file)")


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
    """Read every tensor of a safetensors file whose header passed
    :func:`attnzoo.safe_weights.check_header` (so the tensors tile the data section), in
    one pass that also computes the file's sha256.

    Each tensor is read straight into memory from PyTorch's allocator: 64-byte aligned
    like any tensor a model allocates (CPU kernels may round differently on other
    alignments, e.g. on an mmap of the file), the weights held once, no page of the
    file mapped into the process.
    """
    import hashlib

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
            tensor = torch.empty(info["shape"], dtype=_TORCH_DTYPES[info["dtype"]])
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


def read_verified(path: str | os.PathLike[str], sha256: str | None, where: str
                  ) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after checking its sha256.

    The header is validated first (``safe_weights``), then the file is read once: the
    tensors and the hash together. Nothing is returned unless the hash matches.
    Raises WeightsError naming the file when it is a pickle, missing, has another
    hash (corrupt, truncated, not the pinned file) or is not valid safetensors; a
    file that fails both the content checks and the hash is reported as failing the
    hash.
    """
    path = Path(path)
    refuse_pickle(path, where)
    if sha256 is None or not _SHA256.match(sha256):
        raise WeightsError(f"{where}: no valid sha256 recorded for {path.name}; refusing to "
                           "load unverified weights")
    if not path.is_file():
        raise WeightsError(f"{where}: weights file {path} does not exist")
    try:
        # The pinned hash only says the file is the one recorded; a stranger may have
        # recorded a hostile file, so the content is checked before any tensor is read.
        safe_weights.refuse_pickle(path)
        header = safe_weights.check_header(path)
        header.pop("__metadata__", None)
        unknown = sorted({i["dtype"] for i in header.values()} - set(_TORCH_DTYPES))
        if unknown:
            raise WeightsError(f"{path}: dtypes {unknown} are not supported")
    except WeightsError as exc:
        actual = sha256_of(path)
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
    if actual != sha256:
        raise _mismatch(path, actual, sha256, where)
    return tensors


def classifier_names(model: nn.Module) -> list[str]:
    """Module paths of the classifier, from ``pretrained_cfg['classifier']`` (timm style),
    else from ``get_classifier()``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    if isinstance(names, str):
        return [names]
    if names:
        return list(names)
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    return [n for n, m in model.named_modules() if m is head and n]


def _short(keys: list[str], n: int = 8) -> str:
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], where: str,
                 allow_new_head: bool = False, assign: bool = False) -> list[str]:
    """Load ``state`` into ``model`` after checking keys and shapes; the model is
    untouched when anything does not fit.

    With ``allow_new_head``, classifier tensors that do not fit (another number of
    classes) are left at their initialisation, with a warning; the dropped keys are
    returned. Any other missing, unexpected or mis-shaped key is a WeightsError that
    names it.

    With ``assign``, the model's tensors are replaced by the file's own (cast to the
    model's dtype where they differ) instead of being copied into: no second copy of
    the weights, and the model may have been built with its parameters on the meta
    device (see :func:`build_for_weights`).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    dropped: list[str] = []
    if allow_new_head and (missing or unexpected or mismatched):
        heads = classifier_names(model)

        def in_head(key: str) -> bool:
            return any(key == h or key.startswith(h + ".") for h in heads)

        dropped = sorted({k for k in (*missing, *unexpected, *mismatched) if in_head(k)})
        missing = [k for k in missing if not in_head(k)]
        unexpected = [k for k in unexpected if not in_head(k)]
        mismatched = [k for k in mismatched if not in_head(k)]
        # A head key that fits still belongs to the old classifier: leave it out too.
        dropped = sorted({*dropped, *(k for k in state if in_head(k))})
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + _short(
            [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
             for k in mismatched]))
    if missing:
        problems.append(f"missing from the file: {_short(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_short(unexpected)}")
    if problems:
        raise WeightsError(f"{where}: the weights do not fit the model: " + "; ".join(problems))
    if dropped:
        state = {k: v for k, v in state.items() if k not in dropped}
        warnings.warn(f"{where}: the classifier was not loaded (another number of classes), "
                      f"it keeps its random initialisation: {_short(dropped)}", stacklevel=3)
    if assign:
        state = {k: v if v.dtype == expected[k].dtype else v.to(expected[k].dtype)
                 for k, v in state.items()}
    result = model.load_state_dict(state, strict=not dropped, assign=assign)
    left = set(result.missing_keys) - set(dropped)
    if left or result.unexpected_keys:  # cannot happen after the checks above
        raise WeightsError(f"{where}: load_state_dict left keys out: {_short(sorted(left))}")
    return dropped


# ------------------------------------------------------------------ building for weights


class _ParametersOnMeta(threading.local):
    """Per-thread switch of :func:`parameters_on_meta` (other threads build normally)."""

    depth: int = 0


_META = _ParametersOnMeta()
_PATCH_LOCK = threading.Lock()
_PATCH_USERS = 0
_ORIGINAL_REGISTER = nn.Module.register_parameter


def _register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    if _META.depth and type(param) is nn.Parameter and not param.is_meta:
        # The real tensor (``torch.empty`` in a layer's __init__, not yet initialised)
        # is dropped here; the layer's initialisation then runs on meta: a no-op.
        param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    _ORIGINAL_REGISTER(module, name, param)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with every ``nn.Parameter`` on the meta device, buffers as usual.

    Parameters take no memory and are never initialised (init functions on meta
    tensors do nothing), while buffers (BatchNorm statistics, FcaNet's DCT bases,
    relative position indices, non-persistent or not) are computed on the CPU exactly
    as in a normal build. Only the calling thread is affected.
    """
    global _PATCH_USERS
    with _PATCH_LOCK:
        if _PATCH_USERS == 0:
            nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign]
        _PATCH_USERS += 1
    _META.depth += 1
    try:
        yield
    finally:
        _META.depth -= 1
        with _PATCH_LOCK:
            _PATCH_USERS -= 1
            if _PATCH_USERS == 0:
                nn.Module.register_parameter = _ORIGINAL_REGISTER  # type: ignore[method-assign]


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` still on the meta device."""
    return [name for name, t in _named_tensors(model) if t.is_meta]


def build_for_weights(spec: ModelSpec, num_classes: int | None,
                      backbone_args: dict[str, Any]) -> nn.Module:
    """Build ``spec`` for weights that will be assigned to it: parameters on meta
    (nothing allocated, nothing initialised), buffers real. Load the weights with
    :func:`load_checked` (``assign=True``), then call :func:`finish_weights_build`."""
    from .builder import build_model

    with parameters_on_meta():
        model = build_model(spec, num_classes=num_classes, **backbone_args)
    return model


def finish_weights_build(model: nn.Module, spec: ModelSpec, num_classes: int | None,
                         backbone_args: dict[str, Any],
                         rng_state: torch.Tensor) -> list[str]:
    """Give real tensors to whatever the weights file did not hold (a new classifier, a
    buffer made from a parameter): they are taken from a normal build of the same spec,
    run from ``rng_state`` (the CPU generator's state before the load), so they are
    initialised exactly as ``build_model`` with that seed would. Returns their names.

    A normal build costs a second copy of the model, so this runs only when needed.
    """
    from .builder import build_model

    left = meta_tensors(model)
    if not left:
        return []
    torch.random.set_rng_state(rng_state)
    fresh = dict(_named_tensors(build_model(spec, num_classes=num_classes, **backbone_args)))
    for name in left:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        tensor = fresh[name]
        if leaf in module._parameters:
            module._parameters[leaf] = tensor  # type: ignore[assignment]
        else:
            module._buffers[leaf] = tensor
    still = meta_tensors(model)
    if still:  # the normal build has them on meta too: a bug in that module
        raise WeightsError(f"{spec.name}: cannot materialise {_short(still)}")
    return left


def _load_into_new_model(spec: ModelSpec, read_state: Callable[[], dict[str, torch.Tensor]],
                         where: str, *, num_classes: int | None, backbone_args: dict[str, Any],
                         allow_new_head: bool | Callable[[nn.Module], bool]) -> nn.Module:
    """Build ``spec`` on meta and assign the verified state that ``read_state`` returns.

    The file is read and hashed in a worker thread while this one builds the model
    (reading and hashing release the GIL), so a load costs about the longer of the
    two, not their sum. No tensor reaches the model before its hash is checked; when
    both fail, the weights error is the one raised. ``allow_new_head`` may be a
    function of the built model.
    """
    rng_state = torch.random.get_rng_state()
    with ThreadPoolExecutor(1, thread_name_prefix="attnzoo-read") as pool:
        reading = pool.submit(read_state)
        try:
            model = build_for_weights(spec, num_classes, backbone_args)
        except BaseException:
            reading.result()  # a bad file is reported first, as when reading came first
            raise
        state = reading.result()
    if callable(allow_new_head):
        allow_new_head = allow_new_head(model)
    load_checked(model, state, where, allow_new_head=allow_new_head, assign=True)
    del state
    finish_weights_build(model, spec, num_classes, backbone_args, rng_state)
    return model


# --------------------------------------------------------------------- Hub & folders


def is_pretrained_source(name: str) -> bool:
    """True for ``hf-hub:org/repo[@rev]`` and for a folder holding ``attnzoo.yaml`` (or
    only checkpoint files, so that pickle-only folders get a clear refusal)."""
    if name.startswith(HUB_PREFIX):
        return True
    path = Path(name)
    if not path.is_dir():
        return False
    if (path / SPEC_FILE).is_file():
        return True
    return any(p.name.lower().endswith((*PICKLE_SUFFIXES, ".safetensors"))
               for p in path.iterdir())


def parse_hub_name(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """``hf-hub:org/repo@rev`` -> (``org/repo``, rev); ``revision`` may give the rev."""
    body = name[len(HUB_PREFIX):] if name.startswith(HUB_PREFIX) else name
    repo_id, _, at_rev = body.partition("@")
    if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?", repo_id):
        raise WeightsError(f"{name!r}: not a Hub repo id (expected hf-hub:org/name[@revision])")
    if at_rev and revision and at_rev != revision:
        raise WeightsError(f"{name!r}: revision given twice ({at_rev!r} in the name, "
                           f"{revision!r} as revision=)")
    return repo_id, (at_rev or revision or None)


def hub_download(repo_id: str, filename: str, revision: str | None, where: str) -> Path:
    """``hf_hub_download`` with its errors turned into WeightsError."""
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision,
                                    library_name="attnzoo", library_version=_version()))
    except Exception as exc:  # noqa: BLE001 - network, cache and Hub errors alike
        kind = type(exc).__name__
        hint = ""
        if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            hint = (" (it is not in the local cache and the Hub cannot be reached: offline "
                    "mode or no network)")
        elif kind in ("RemoteEntryNotFoundError", "EntryNotFoundError"):
            hint = " (the repo has no such file at that revision)"
        raise WeightsError(f"{where}: cannot get {filename} from {repo_id}@{revision or 'main'}"
                           f"{hint}: {kind}: {exc}") from exc


def read_saved_spec(path: str | os.PathLike[str]) -> tuple[ModelSpec, dict[str, Any]]:
    """The spec and the ``weights`` section of an ``attnzoo.yaml``."""
    path = Path(path)
    text, origin = read_source(path)  # a stranger's file: the spec reader's strict loader
    data = load_yaml(text, origin)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: must be a YAML mapping, got {type(data).__name__}")
    weights = data.pop("weights", None)
    spec = ModelSpec.from_dict(data, origin=origin, text=text)
    if not isinstance(weights, dict) or "sha256" not in weights:
        raise WeightsError(f"{path}: no `weights: {{file, sha256}}` section; it was not "
                           "written by attnzoo.save_pretrained")
    file = str(weights.get("file", WEIGHTS_FILE))
    try:
        _check_file_name(file, embedded=False)
    except ValueError as exc:
        raise WeightsError(f"{path}: weights.file: {exc}; attnzoo never unpickles") from None
    return spec, {**weights, "file": file}


def create_from_source(name: str, *, revision: str | None = None,
                       num_classes: int | None = None, **backbone_args: Any) -> nn.Module:
    """Build a model from a saved folder or ``hf-hub:`` repo and load its verified weights.

    With ``num_classes`` different from the saved classifier, every weight but the
    classifier's is loaded (with a warning). The model is built with its parameters
    on the meta device and the file's tensors are assigned to it: nothing is
    initialised only to be overwritten, and the weights are in memory once.
    """
    if name.startswith(HUB_PREFIX):
        repo_id, rev = parse_hub_name(name, revision)
        spec_path = hub_download(repo_id, SPEC_FILE, rev, name)
        # Read the weights from the same commit as the spec, even if a branch moves.
        commit = spec_path.parent.name if _COMMIT.match(spec_path.parent.name) else rev
        spec, info = read_saved_spec(spec_path)
        where = f"{name} ({info['file']})"
        weights_path = hub_download(repo_id, info["file"], commit, name)
        source = {"repo": repo_id, "revision": commit}
    else:
        folder = Path(name)
        spec_path = folder / SPEC_FILE
        if not spec_path.is_file():
            pickles = sorted(p.name for p in folder.iterdir()
                             if p.name.lower().endswith(PICKLE_SUFFIXES))
            if pickles:
                refuse_pickle(folder / pickles[0], f"{folder} (no {SPEC_FILE}; holds "
                              f"{', '.join(pickles)})")
            raise WeightsError(f"{folder}: no {SPEC_FILE}; an attnzoo folder is written by "
                               "attnzoo.save_pretrained (timm checkpoints: tools/convert_timm.py)")
        spec, info = read_saved_spec(spec_path)
        weights_path = folder / info["file"]
        where = f"{folder} ({info['file']})"
        source = {"folder": str(folder)}
    model = _load_into_new_model(spec, lambda: read_verified(weights_path, info.get("sha256"),
                                                             where),
                                 where, num_classes=num_classes,
                                 backbone_args=backbone_args,
                                 allow_new_head=num_classes is not None)
    model.attnzoo_weights = {**{k: v for k, v in info.items() if k not in ("file",)},
                             "loaded_from": source}
    return model


def _unpinned(entry: WeightsEntry) -> list[str]:
    needed = ("sha256",) if entry.repo is None else ("revision", "sha256")
    return [k for k in needed if getattr(entry, k) is None]


def _zoo_file(spec: ModelSpec, pretrained: bool | str
              ) -> tuple[str, WeightsEntry, Callable[[], dict[str, torch.Tensor]], str]:
    """(tag, entry, reader, where) of the zoo weights that ``pretrained`` picks for
    ``spec``: the file is found (downloaded if needed) now; ``reader()`` returns its
    verified state dict in attnzoo's layout."""
    tag, entry = resolve_zoo_weights(spec.name, pretrained)
    where = f"weights {spec.name}.{tag}"
    if not entry.pinned:
        raise WeightsError(
            f"{where} are not pinned yet (unknown: {', '.join(_unpinned(entry))}); attnzoo "
            "loads only files whose revision and sha256 are recorded. To pin them, "
            + _PIN_HINT.format(name=spec.name) + f" weights/{spec.name}.yaml.")
    if entry.repo is None:
        path = weights_dir() / entry.file
    else:
        path = hub_download(entry.repo, entry.file, entry.revision, where)
    where = f"{where} ({entry.file})"

    def reader() -> dict[str, torch.Tensor]:
        state = read_verified(path, entry.sha256, where)
        if entry.format == "timm":
            from .convert import from_timm

            state = from_timm(spec.name, state)
        return state

    return tag, entry, reader, where


def _needs_new_head(entry: WeightsEntry, num_classes: int | None) -> bool:
    return entry.num_classes is not None and num_classes is not None and (
        num_classes != entry.num_classes)


def load_zoo_weights(model: nn.Module, spec: ModelSpec, pretrained: bool | str) -> None:
    """Load the zoo weights that ``pretrained`` picks for ``spec`` into an existing
    ``model``: look up the manifest, download (or find the embedded file), verify, then
    load strictly (copying into the model's tensors). On any problem a WeightsError is
    raised and the model is left untouched. :func:`create_pretrained` is the fast way
    to build and load in one go."""
    tag, entry, reader, where = _zoo_file(spec, pretrained)
    new_head = _needs_new_head(entry, getattr(model, "num_classes", None))
    load_checked(model, reader(), where, allow_new_head=new_head)
    model.attnzoo_weights = {"tag": tag, **entry.model_dump(exclude_defaults=True)}


def create_pretrained(spec: ModelSpec, pretrained: bool | str, num_classes: int | None = None,
                      **backbone_args: Any) -> nn.Module:
    """Build zoo model ``spec`` with the weights ``pretrained`` picks, verified first.

    The model is built with its parameters on the meta device and the file's tensors
    are assigned to it (``load_state_dict(assign=True)``): no random initialisation of
    weights that are about to be overwritten, and no second copy of them in memory.
    With ``num_classes`` other than the weights', the classifier is initialised as a
    normal build would and everything else is loaded (with a warning).
    """
    tag, entry, reader, where = _zoo_file(spec, pretrained)
    model = _load_into_new_model(
        spec, reader, where, num_classes=num_classes, backbone_args=backbone_args,
        allow_new_head=lambda m: _needs_new_head(entry, getattr(m, "num_classes", None)))
    model.attnzoo_weights = {"tag": tag, **entry.model_dump(exclude_defaults=True)}
    return model


# ---------------------------------------------------------------------------- saving


def write_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike[str],
                      metadata: dict[str, str] | None = None) -> str:
    """Write tensors as safetensors (contiguous, shared storage split) and return the
    file's sha256."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    tensors = {}
    for key, value in state_dict.items():
        t = value.detach().cpu().contiguous()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and (ident in seen or t.untyped_storage().nbytes() != t.nbytes):
            t = t.clone()  # tied or viewed tensors: safetensors stores each one whole
        seen.add(ident)
        tensors[key] = t
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    return sha256_of(path)


def save_pretrained(model: nn.Module, directory: str | os.PathLike[str], *,
                    license: str | None = None, metrics: dict[str, float] | None = None,
                    source: dict[str, Any] | None = None, tags: list[str] | None = None,
                    repo_id: str | None = None) -> Path:
    """Write ``attnzoo.yaml``, ``model.safetensors`` and a model card ``README.md``.

    ``create_model(directory)`` (or ``"hf-hub:<repo>"`` once pushed) rebuilds the model
    from the spec and loads the weights after checking their sha256.

    Args:
        model: a model built by attnzoo (it carries ``attnzoo_spec``).
        directory: created if missing; files in it are overwritten.
        license: license of the weights (default: the spec's, or the loaded weights').
        metrics: measured metrics, name -> value, for the card.
        source: provenance (where the weights come from, how they were made).
        tags: extra tags for the card.
        repo_id: the Hub repo, for the card's usage snippet.
    """
    spec: ModelSpec | None = getattr(model, "attnzoo_spec", None)
    if not isinstance(spec, ModelSpec):
        raise AttnZooError("save_pretrained saves models built by attnzoo.create_model "
                           "(the model has no attnzoo_spec)")
    unrecorded = getattr(model, "attnzoo_unrecorded_args", None)
    if unrecorded:  # the saved spec would rebuild a different network
        raise AttnZooError(
            f"cannot save: the model was built with backbone args {unrecorded} that are not "
            "plain YAML values, so the saved spec could not rebuild it; pass plain values "
            "(numbers, strings, lists) or set them in the spec's backbone.args")
    loaded = getattr(model, "attnzoo_weights", None) or {}
    license = license or spec.license or loaded.get("license")
    metrics = metrics if metrics is not None else loaded.get("metrics") or {}
    source = source if source is not None else loaded.get("source") or {}
    update: dict[str, Any] = {}
    n_classes = getattr(model, "num_classes", None)
    if isinstance(n_classes, int) and n_classes != spec.num_classes:
        update["num_classes"] = n_classes  # a replaced head must be rebuilt the same
    if license and license != spec.license:
        update["license"] = license
    spec = spec.model_copy(update=update) if update else spec

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    sha = write_safetensors(model.state_dict(), out / WEIGHTS_FILE,
                            {"attnzoo_version": _version(), "attnzoo_model": spec.name})
    weights: dict[str, Any] = {"file": WEIGHTS_FILE, "sha256": sha}
    if source:
        weights["source"] = source
    if metrics:
        weights["metrics"] = {k: float(v) for k, v in metrics.items()}
    text = spec.to_yaml() + yaml.safe_dump({"weights": weights}, sort_keys=False, width=100)
    (out / SPEC_FILE).write_text(text, encoding="utf-8")
    card = model_card(model, spec, weights, license=license, tags=tags, repo_id=repo_id)
    card.save(out / CARD_FILE)
    return out


def model_card(model: nn.Module, spec: ModelSpec, weights: dict[str, Any], *,
               license: str | None = None, tags: list[str] | None = None,
               repo_id: str | None = None) -> ModelCard:
    """The model card: Hub metadata (library_name attnzoo, tags, license) and a body
    with the spec, provenance and metrics."""
    blocks = getattr(model, "attnzoo_blocks", [])
    block_types = sorted({b.block_type for b in blocks})
    all_tags = ["attnzoo", "pytorch", "safetensors", "image-classification", *block_types,
                *spec.tags, *(tags or [])]
    data = ModelCardData(library_name="attnzoo", license=license, tags=all_tags,
                         model_name=spec.name, pipeline_tag="image-classification",
                         metrics=sorted(weights.get("metrics", {})) or None)
    params = sum(p.numel() for p in model.parameters())
    target = f"hf-hub:{repo_id}" if repo_id else "path/to/this/folder"
    lines = [
        f"# {spec.name}", "", spec.description or "", "",
        f"An [attnzoo](https://github.com/attnzoo/attnzoo) model: the "
        f"`{spec.backbone.source}:{spec.backbone.name}` backbone with {len(blocks)} inserted "
        f"attention block(s) ({', '.join(block_types) or 'none'}); {params:,} parameters.",
    ]
    if spec.paper:
        lines += ["", f"Paper: {spec.paper}"]
    lines += ["", "## Usage", "", "```python", "import attnzoo", "",
              f'model = attnzoo.create_model("{target}")', "```", "",
              "The weights are checked against the sha256 in `attnzoo.yaml` before loading.",
              "", "## Spec", "", "```yaml", spec.to_yaml().rstrip(), "```", "",
              "## Weights", "", f"- file: `{weights['file']}`, sha256 `{weights['sha256']}`",
              f"- license: {license or 'not stated'}"]
    source = weights.get("source") or {}
    lines += ["", "## Provenance", ""]
    lines += [f"- {k}: {v}" for k, v in source.items()] or ["- not recorded"]
    metrics = weights.get("metrics") or {}
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
    return ModelCard(content)


def push_to_hub(model: nn.Module, repo_id: str, *, revision: str | None = None,
                private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, create_pr: bool = False,
                **save_kwargs: Any) -> str:
    """Save the model (:func:`save_pretrained`) to a temporary folder and upload it to the
    Hub repo ``repo_id`` (created if missing; ``revision`` names a branch, created from
    main if missing). Returns the URL of the commit."""
    spec = getattr(model, "attnzoo_spec", None)
    api = HfApi(token=token, library_name="attnzoo", library_version=_version())
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="attnzoo-push-") as tmp:
        save_pretrained(model, tmp, repo_id=repo_id, **save_kwargs)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=tmp, revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload {getattr(spec, 'name', 'model')} "
            f"with attnzoo {_version()}")
    return str(getattr(info, "commit_url", info))


__all__ = [
    "WeightsEntry", "WeightsManifest", "build_for_weights", "classifier_names",
    "create_from_source", "create_pretrained", "finish_weights_build",
    "is_pretrained_source", "list_pretrained", "load_checked", "load_manifest",
    "load_zoo_weights", "meta_tensors", "parameters_on_meta", "push_to_hub",
    "read_saved_spec", "read_verified", "resolve_zoo_weights", "save_pretrained",
    "sha256_of", "write_safetensors",
]
