"""Issue 17: saving and loading never lose, mix, leak or hang.

One test (or a few) per item of the issue, each for every way in that the item
concerns: ``create_model`` with a folder, ``hf-hub:``, a zoo manifest, ``attnzoo
push`` / ``push_to_hub``, ``tools/convert_timm.py``. The loopback Hub of
``hub_server`` is made hostile here (:class:`HostileHub`): it answers 500, drips
bytes, lies about the ETag and the commit, and serves wrong bytes. Crash tests run
saves in a subprocess that kills itself (SIGKILL) before, during and after each file
write. Writes are watched by a marker folder outside the target that must stay as
it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
import yaml

try:
    from tests._helpers.hub_server import FakeHub, go_offline, serve_fake_hub
except ImportError:  # before the test helpers moved (the code of 3d4761c)
    from hub_server import FakeHub, go_offline, serve_fake_hub

import attnzoo
from attnzoo.errors import AttnZooError, WeightsError

MODEL = "digits_cbam_tiny"  # 78k parameters, embedded pretrained weights
REPO_ROOT = Path(attnzoo.__file__).resolve().parents[1]
TOOLS = REPO_ROOT / "tools"
TIMEOUT_ENV, LOCK_ENV, SITES_ENV = ("ATTNZOO_DOWNLOAD_TIMEOUT", "ATTNZOO_LOCK_TIMEOUT",
                                    "ATTNZOO_MAX_SITES")
FILES = ("attnzoo.yaml", "model.safetensors", "README.md")


# ------------------------------------------------------------------ shared set-up


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    """Two different models of one spec: ``old`` (the zoo's weights), ``new`` (random)."""
    torch.manual_seed(1)
    return {"old": attnzoo.create_model(MODEL, pretrained=True).eval(),
            "new": attnzoo.create_model(MODEL).eval()}


def _out(model: torch.nn.Module) -> torch.Tensor:
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(x)


def _which(model: torch.nn.Module, models: dict[str, torch.nn.Module]) -> str:
    out = _out(model)
    found = [k for k, m in models.items() if torch.equal(out, _out(m))]
    assert len(found) == 1, "the loaded model is neither of the saved ones"
    return found[0]


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (links not followed): bytes and mtime."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


class Outside(type(Path())):
    """A folder outside every target, with a marker file. What a test puts there
    (:meth:`plant`) and the marker must be left untouched; nothing may be added."""

    def plant(self, name: str, data: bytes | str) -> Path:
        path = self / name
        if isinstance(data, str):
            path.write_text(data)
        else:
            path.write_bytes(data)
        self.baseline = _snapshot(self)
        return path


@pytest.fixture
def outside(tmp_path: Path):
    folder = Outside(tmp_path / "outside")
    folder.mkdir()
    folder.plant("marker.txt", "must stay untouched\n")
    yield folder
    assert _snapshot(folder) == folder.baseline, "something wrote outside the target folder"


class HostileHub(FakeHub):
    """hub_server's FakeHub that can misbehave for one file (``target``): ``mode`` is
    "honest", "500" (every request), "drip" (the body a byte at a time),
    "wrong_bytes" (``corrupt`` applied to the body; the ETag stays the true one),
    "lie_commit" (``X-Repo-Commit: fake_commit``), "bad_commit" / "bad_etag" (a path
    traversal in the header), "any_revision" (every unknown revision is main)."""

    mode = "honest"
    target = "model.safetensors"
    fake_commit = ""
    drip_pause = 0.02

    @staticmethod
    def corrupt(data: bytes) -> bytes:
        i = len(data) // 2
        return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]

    def _answer(self, req, body: bool) -> None:
        path = urlsplit(req.path).path
        if self.mode == "500":
            with self._lock:
                self.requests.append((req.command, path))
            return self._error(req, 500, "InternalError", None)
        parts = path.lstrip("/").split("/")
        if self.mode == "any_revision" and "resolve" in parts:
            i = parts.index("resolve")
            repo = self.repos.get("/".join(parts[:i]))
            rev = unquote(parts[i + 1])
            if repo is not None and rev not in repo.commits and rev not in repo.refs:
                parts[i + 1] = "main"
                req.path = "/" + "/".join(parts)
        if unquote(parts[-1]) == self.target and self.mode != "honest":
            self._misbehave(req)
        return super()._answer(req, body)

    def _misbehave(self, req) -> None:
        send_header, end_headers, wfile, hub = req.send_header, req.end_headers, req.wfile, self
        in_body = []

        def body_starts() -> None:
            end_headers()
            in_body.append(True)

        def header(key: str, value: str) -> None:
            if key == "X-Repo-Commit" and hub.mode == "lie_commit":
                value = hub.fake_commit
            elif key == "X-Repo-Commit" and hub.mode == "bad_commit":
                value = "../../../../../escaped"
            elif key == "ETag" and hub.mode == "bad_etag":
                value = '"../../../../../escaped"'
            send_header(key, value)

        class Body:
            def write(self, data: bytes) -> None:
                if not in_body:
                    wfile.write(data)
                elif hub.mode == "wrong_bytes":
                    wfile.write(hub.corrupt(bytes(data)))
                elif hub.mode == "drip":
                    for i in range(len(data)):
                        wfile.write(data[i:i + 1])
                        wfile.flush()
                        time.sleep(hub.drip_pause)
                else:
                    wfile.write(data)

            def __getattr__(self, name: str):
                return getattr(wfile, name)

        req.send_header, req.end_headers, req.wfile = header, body_starts, Body()


@pytest.fixture
def hub(monkeypatch, tmp_path: Path):
    served = serve_fake_hub(monkeypatch, tmp_path)
    fake = next(served)
    fake.__class__ = HostileHub
    yield fake
    with contextlib.suppress(StopIteration):
        next(served)


def _cache(tmp_path: Path) -> Path:
    return tmp_path / "hf_home" / "hub"


def _no_backoff_sleeps(monkeypatch) -> None:
    """huggingface_hub retries 5xx answers with backoff sleeps (23 s in all): skipped,
    so that a test sees the answer without waiting for it."""
    import types

    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    for module in (_http, file_download):
        shim = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time)
                                        if not k.startswith("_")})
        shim.sleep = lambda s: None
        monkeypatch.setattr(module, "time", shim)


def _error(fn, *args, **kwargs) -> tuple[BaseException, float]:
    """The exception ``fn`` raises and the seconds it took; a call still running after
    60 s (a hang) fails the test instead of holding it."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            box["exc"] = exc

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    took = time.monotonic() - start
    assert not thread.is_alive(), f"{fn.__name__} did not return within 60 s"
    assert "exc" in box, f"{fn.__name__} raised nothing"
    return box["exc"], took


def _commit_saved(hub: FakeHub, repo: str, model: torch.nn.Module, tmp_path: Path) -> str:
    folder = tmp_path / f"upload-{repo.replace('/', '-')}-{len(hub.repos)}"
    attnzoo.save_pretrained(model, folder)
    return hub.commit_folder(repo, folder)


def _manifest(tmp_path: Path, monkeypatch, entry: dict) -> None:
    folder = tmp_path / "weights_manifests"
    folder.mkdir(exist_ok=True)
    monkeypatch.setenv("ATTNZOO_WEIGHTS_DIR", str(folder))
    (folder / f"{MODEL}.yaml").write_text(yaml.safe_dump(
        {"model": MODEL, "default": "t", "tags": {"t": entry}}))


def _weights_file(model: torch.nn.Module, path: Path) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _convert_timm(*args: str) -> tuple[int, str]:
    sys.path.insert(0, str(TOOLS))
    try:
        import convert_timm
    finally:
        sys.path.remove(str(TOOLS))
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        code = convert_timm.main(list(args))
    return code, err.getvalue()


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory) -> Path:
    """A timm skresnet18 checkpoint (random weights), for tools/convert_timm.py."""
    import timm

    path = tmp_path_factory.mktemp("timm") / "model.safetensors"
    _weights_file(timm.create_model("skresnet18", num_classes=10), path)
    return path


# ------------------------------------------------------------------ 1. links


def test_1_a_save_replaces_links_in_the_folder_and_never_writes_through_them(
        tmp_path: Path, models, outside: Path) -> None:
    for first in ("fresh", "over_a_saved_model"):
        folder = tmp_path / first
        if first == "over_a_saved_model":
            attnzoo.save_pretrained(models["old"], folder)
        folder.mkdir(exist_ok=True)
        for name in FILES:
            victim = outside.plant(f"{first}-{name}", "a file elsewhere: must stay as it is\n")
            (folder / name).unlink(missing_ok=True)
            (folder / name).symlink_to(victim)
        attnzoo.save_pretrained(models["new"], folder)
        for name in FILES:
            assert not (folder / name).is_symlink() and (folder / name).is_file(), name
            assert (outside / f"{first}-{name}").read_text().startswith("a file elsewhere")
        assert _which(attnzoo.create_model(folder), models) == "new"
    # a link to a folder elsewhere, in place of a file: replaced too, never followed
    (tmp_path / "dir_link").mkdir()
    (tmp_path / "dir_link" / "attnzoo.yaml").symlink_to(outside, target_is_directory=True)
    attnzoo.save_pretrained(models["new"], tmp_path / "dir_link")
    assert not (outside / "attnzoo.yaml").exists()


def test_1_convert_timm_writes_no_file_through_a_link(tmp_path: Path, timm_checkpoint: Path,
                                                       outside: Path) -> None:
    out = tmp_path / "converted"
    out.mkdir()
    for name in FILES:
        (out / name).symlink_to(outside.plant(name, "elsewhere\n"))
    code, err = _convert_timm("resnet18_sk", "--checkpoint", str(timm_checkpoint),
                              "--out", str(out))
    assert code == 0, err
    assert all(not (out / n).is_symlink() for n in FILES)
    assert all((outside / n).read_text() == "elsewhere\n" for n in FILES)


# ------------------------------------------------------------------ 2. the Hub cache


def _cached(hub: HostileHub, tmp_path: Path, models) -> tuple[str, Path]:
    commit = _commit_saved(hub, "org/digits", models["old"], tmp_path)
    loaded = attnzoo.create_model(f"hf-hub:org/digits@{commit}")
    assert _which(loaded, models) == "old"
    snapshot = next(_cache(tmp_path).glob(f"models--org--digits/snapshots/{commit}"))
    return commit, snapshot


def test_2_saving_into_the_hub_cache_is_refused(hub, tmp_path: Path, models, outside,
                                                monkeypatch, timm_checkpoint: Path) -> None:
    commit, snapshot = _cached(hub, tmp_path, models)
    blobs = _snapshot(snapshot.parents[1] / "blobs")
    model = attnzoo.create_model(snapshot).eval()  # loading from the cache folder is fine
    assert _which(model, models) == "old"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for target in (snapshot, snapshot.parents[1], _cache(tmp_path) / "elsewhere_in_cache"):
        with pytest.raises(AttnZooError, match="Hub cache.*refusing to save"):
            attnzoo.save_pretrained(model, target)
    code, err = _convert_timm("resnet18_sk", "--checkpoint", str(timm_checkpoint),
                              "--out", str(snapshot))
    assert code == 2 and "Hub cache" in err
    assert _snapshot(snapshot.parents[1] / "blobs") == blobs
    for online in (True, False):
        if not online:
            go_offline(monkeypatch)
        assert _which(attnzoo.create_model(f"hf-hub:org/digits@{commit}"), models) == "old"


def test_2_a_pinned_hub_load_never_returns_bytes_written_into_the_cache(
        hub, tmp_path: Path, models, monkeypatch) -> None:
    """What an older attnzoo did (a save through the snapshot's links into the blobs):
    a pinned load gets the Hub's model again (online) or a refusal (offline)."""
    commit, snapshot = _cached(hub, tmp_path, models)
    local = tmp_path / "local"
    attnzoo.save_pretrained(models["new"], local)

    def write_through() -> None:
        for name in ("attnzoo.yaml", "model.safetensors"):
            with open(snapshot / name, "wb") as f:  # follows the cache's link
                f.write((local / name).read_bytes())

    write_through()
    assert _which(attnzoo.create_model(f"hf-hub:org/digits@{commit}"), models) == "old"
    write_through()
    go_offline(monkeypatch)
    with pytest.raises(WeightsError, match="removed from the Hub cache"):
        attnzoo.create_model(f"hf-hub:org/digits@{commit}")


# ------------------------------------------------------------------ 3. concurrent saves

_RACER = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
import attnzoo

root, trials = sys.argv[1], int(sys.argv[2])
models = []
for seed in (1, 2):
    torch.manual_seed(seed)
    models.append(attnzoo.create_model("digits_cbam_tiny"))
    attnzoo.save_pretrained(models[-1], os.path.join(root, f"ref{seed}"))
results = []
for trial in range(trials):
    folder = os.path.join(root, f"trial{trial}")
    start_r, start_w = os.pipe()
    pids = []
    for model in models:
        pid = os.fork()
        if pid == 0:  # a second process saving into the same folder
            os.close(start_w)
            os.read(start_r, 1)  # both start when the pipe closes
            try:
                attnzoo.save_pretrained(model, folder)
                code = 0
            except attnzoo.AttnZooError as exc:
                code = 3 if "another process" in str(exc) else 4
            except BaseException:
                code = 5
            os._exit(code)
        pids.append(pid)
    os.close(start_r)
    os.close(start_w)  # go
    results.append([os.waitpid(pid, 0)[1] >> 8 for pid in pids])
print(json.dumps(results))
"""


def _card_sha(folder: Path) -> str:
    text = (folder / "README.md").read_text()
    return text.split("sha256 `", 1)[1].split("`", 1)[0]


def test_3_two_processes_saving_into_one_folder_leave_one_whole_model(tmp_path: Path,
                                                                      outside) -> None:
    trials = 24
    done = subprocess.run([sys.executable, "-c", _RACER, str(tmp_path), str(trials)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                          env={**os.environ, LOCK_ENV: "60"})
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    refs = [tmp_path / "ref1", tmp_path / "ref2"]
    expected = {yaml.safe_load((r / "attnzoo.yaml").read_text())["weights"]["sha256"]: str(r)
                for r in refs}
    models = {str(r): attnzoo.create_model(r) for r in refs}
    for trial, answers in enumerate(codes):
        folder = tmp_path / f"trial{trial}"
        assert 0 in answers and set(answers) <= {0, 3}, (trial, answers)  # saved, or locked out
        sha = yaml.safe_load((folder / "attnzoo.yaml").read_text())["weights"]["sha256"]
        assert sha in expected and _card_sha(folder) == sha, f"trial {trial}: mixed"
        assert _which(attnzoo.create_model(folder), models) == expected[sha]
        assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)


def test_3_a_save_waits_for_the_lock_then_says_so(tmp_path: Path, models, monkeypatch) -> None:
    import fcntl

    folder = tmp_path / "locked"
    attnzoo.save_pretrained(models["old"], folder)
    monkeypatch.setenv(LOCK_ENV, "0.3")
    fd = os.open(folder, os.O_RDONLY)  # another save holds the folder's lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        exc, took = _error(attnzoo.save_pretrained, models["new"], folder)
        assert isinstance(exc, AttnZooError) and "another process" in str(exc), exc
        assert LOCK_ENV in str(exc) and 0.25 < took < 10
        exc, _ = _error(attnzoo.create_model, folder)  # a load waits for the save too
        assert "another process" in str(exc)
    finally:
        os.close(fd)
    assert _which(attnzoo.create_model(folder), models) == "old"


# ------------------------------------------------------------------ 4. kill -9

_CRASHER = r"""
import json, os, signal, sys
import torch
torch.set_num_threads(1)
import attnzoo

root = sys.argv[1]
old = attnzoo.create_model("digits_cbam_tiny", pretrained=True)
torch.manual_seed(1)
new = attnzoo.create_model("digits_cbam_tiny")
attnzoo.save_pretrained(old, os.path.join(root, "ref_old"))
attnzoo.save_pretrained(new, os.path.join(root, "ref_new"))
state = {"folder": None, "count": 0, "kill_at": None, "events": []}
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def hook(event, args):
    folder = state["folder"]
    if folder is None:
        return
    if event == "open":
        path, mode, flags = args
        writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                  else bool(isinstance(flags, int) and flags & WRITING))
        if not writes or not isinstance(path, (str, os.PathLike)):
            return
        target = os.fspath(path)
    elif event in ("os.rename", "os.remove", "os.unlink"):
        target = os.fspath(args[0])
    else:
        return
    if not os.path.abspath(target).startswith(folder + os.sep):
        return
    state["count"] += 1
    state["events"].append(f"{event} {os.path.basename(target)}")
    if state["count"] == state["kill_at"]:
        die()


sys.addaudithook(hook)


def run(folder, scenario, kill_at=None, during=None):
    if scenario == "over_old":
        attnzoo.save_pretrained(old, folder)
    pid = os.fork()
    if pid == 0:
        state.update(folder=folder, kill_at=kill_at)
        if during is not None:
            killing_writes(*during)
        attnzoo.save_pretrained(new, folder)
        die()  # after the save returned: nothing may be missing
    os.waitpid(pid, 0)


def killing_writes(name, nth):
    # kill in the middle of the nth write into the temp file of `name`
    import attnzoo.atomic as atomic
    make = atomic._new_temp

    def new_temp(folder, file_name):
        path, f = make(folder, file_name)
        if file_name != name:
            return path, f

        class Killing:
            calls = 0

            def write(self, data):
                Killing.calls += 1
                if Killing.calls >= nth:
                    data = bytes(data)
                    f.write(data[:max(1, len(data) // 2)])
                    f.flush()
                    die()
                return f.write(data)

            def __getattr__(self, attr):
                return getattr(f, attr)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return f.__exit__(*exc)

        return path, Killing()

    atomic._new_temp = new_temp


# a dry run counts the file events of one save
scratch = os.path.join(root, "scratch")
attnzoo.save_pretrained(old, scratch)
state["folder"] = scratch
attnzoo.save_pretrained(new, scratch)
events = state["events"]
state.update(folder=None, count=0, events=[])
cases = []
for scenario in ("fresh", "over_old"):
    for k in range(1, len(events) + 2):
        folder = os.path.join(root, f"{scenario}-{k}")
        what = f"before {events[k - 1]}" if k <= len(events) else "after the save"
        run(folder, scenario, kill_at=k)
        cases.append([folder, scenario, what])
    try:
        import attnzoo.atomic  # noqa: F401  (where the temp files are made)
    except ImportError:
        continue
    for name, nth in (("model.safetensors", 5), ("README.md", 1), ("attnzoo.yaml", 1)):
        folder = os.path.join(root, f"{scenario}-during-{name}")
        run(folder, scenario, during=(name, nth))
        cases.append([folder, scenario, f"during the write of {name}"])
print(json.dumps({"events": events, "cases": cases}))
"""


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("crashes")
    done = subprocess.run([sys.executable, "-c", _CRASHER, str(root)], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, **json.loads(done.stdout.strip().splitlines()[-1])}


def test_4_a_save_killed_at_any_point_leaves_the_old_model_the_new_one_or_a_clear_refusal(
        crashed: dict) -> None:
    root = crashed["root"]
    models = {"old": attnzoo.create_model(root / "ref_old"),
              "new": attnzoo.create_model(root / "ref_new")}
    seen = {}
    for folder, scenario, what in crashed["cases"]:
        folder = Path(folder)
        if scenario == "fresh" and not any(folder.iterdir() if folder.exists() else []):
            seen[what, scenario] = "nothing written"
            continue
        try:
            got = _which(attnzoo.create_model(folder), models)
        except WeightsError as exc:
            assert "an interrupted save" in str(exc), f"killed {what} ({scenario}): {exc}"
            assert "Save the model into it again" in str(exc)
            got = "refused: an interrupted save"
        assert got != "old" or scenario == "over_old"
        seen[what, scenario] = got
    assert len(crashed["cases"]) >= 20, crashed["events"]
    assert seen["after the save", "fresh"] == seen["after the save", "over_old"] == "new"
    assert any(v == "old" for (_, s), v in seen.items() if s == "over_old"), seen
    # saving again repairs a refused folder and clears what the killed save left
    for (what, scenario), got in seen.items():
        if got != "refused: an interrupted save":
            continue
        folder = next(Path(f) for f, s, w in crashed["cases"] if (w, s) == (what, scenario))
        attnzoo.save_pretrained(models["new"], folder)
        assert sorted(p.name for p in Path(folder).iterdir()) == sorted(FILES)
        assert _which(attnzoo.create_model(Path(folder)), models) == "new"


def test_4_a_failed_save_removes_its_temp_files_and_keeps_the_old_model(
        tmp_path: Path, models, monkeypatch, outside) -> None:
    folder = tmp_path / "disk_full"
    attnzoo.save_pretrained(models["old"], folder)

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        attnzoo.save_pretrained(models["new"], folder)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    assert _which(attnzoo.create_model(folder), models) == "old"


# ------------------------------------------------------------------ 5. file modes


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_5_every_saved_file_gets_the_mode_open_would_give(tmp_path: Path, models,
                                                          umask: int) -> None:
    from attnzoo.saved import write_safetensors

    old = os.umask(umask)
    try:
        folder = tmp_path / "saved"
        attnzoo.save_pretrained(models["old"], folder)
        attnzoo.save_pretrained(models["new"], folder)  # over an existing save too
        write_safetensors(models["new"].state_dict(), tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for path in [*(folder / n for n in FILES), tmp_path / "w.safetensors"]:
        assert stat.S_IMODE(path.stat().st_mode) == want, (path.name, oct(path.stat().st_mode))


# ------------------------------------------------------------------ 6. ids and revisions

BAD_REVISIONS = ["../../../../escaped", "a/../../b", "/abs", "-x", "x\x00y", "x y", "x:y",
                 "ref.lock", "a//b", "main.", "x" * 300]
BAD_REPOS = ["org/../x", "org/x--y", "org/.x", "a" * 97, "org/x/y", "\u00f8rg/x", "org/x.",
             "a" * 100_000]


def test_6_revisions_and_repo_ids_are_checked_before_any_request(hub, tmp_path: Path,
                                                                 models, outside) -> None:
    _commit_saved(hub, "org/digits", models["old"], tmp_path)
    hub.mode = "any_revision"  # a Hub that would answer any revision
    before = {p for p in tmp_path.rglob("*") if _cache(tmp_path) not in p.parents}
    for rev in BAD_REVISIONS:
        for name, revision in ((f"hf-hub:org/digits@{rev}", None), ("hf-hub:org/digits", rev)):
            with pytest.raises(WeightsError, match="not a commit, branch or tag name") as err:
                attnzoo.create_model(name, revision=revision)
            assert len(str(err.value)) < 400
    for repo in BAD_REPOS:
        with pytest.raises(WeightsError, match="not a Hub repo id") as err:
            attnzoo.create_model(f"hf-hub:{repo}")
        assert len(str(err.value)) < 400, len(str(err.value))
    with pytest.raises(WeightsError, match="revision given twice") as err:
        attnzoo.create_model("hf-hub:org/digits@" + "a" * 100_000, revision="b" * 100_000)
    assert len(str(err.value)) < 400
    assert hub.requests == []
    after = {p for p in tmp_path.rglob("*") if _cache(tmp_path) not in p.parents}
    assert after == before, sorted(map(str, after - before))


def test_6_every_way_to_the_hub_checks_the_repo_and_revision(hub, tmp_path: Path, models,
                                                            monkeypatch, outside) -> None:
    from attnzoo import cli

    _manifest(tmp_path, monkeypatch, {"repo": "org/../digits", "revision": "0" * 40,
                                      "sha256": "0" * 64})
    with pytest.raises(WeightsError, match="not a Hub repo id"):
        attnzoo.create_model(MODEL, pretrained=True)
    for repo, rev in (("org/../x", None), ("org/x", "../../../../escaped")):
        with pytest.raises(WeightsError, match="not a (Hub repo id|commit, branch or tag)"):
            attnzoo.push_to_hub(models["old"], repo, revision=rev)
    assert cli.main(["push", MODEL, "org/../x"]) == 2
    code, err = _convert_timm("resnet18_sk", "--repo", "timm/skresnet18",
                              "--revision", "../../../../escaped", "--out", str(tmp_path / "o"))
    assert code == 2 and "not a commit, branch or tag name" in err, err
    assert hub.requests == []


# ------------------------------------------------------------------ 7. confined reads

SECRET = "root:$6$SECRETHASH:19000:0:99999:7:::\nname: leaked\n"


def test_7_reads_of_a_folder_stay_inside_it(tmp_path: Path, models, outside) -> None:
    secret = outside.plant("shadow", SECRET)
    other_sha = _weights_file(models["new"], tmp_path / "other.safetensors")
    other = outside.plant("other.safetensors", (tmp_path / "other.safetensors").read_bytes())
    folder = tmp_path / "hostile"
    attnzoo.save_pretrained(models["old"], folder)
    (folder / "attnzoo.yaml").rename(tmp_path / "real.yaml")
    (folder / "attnzoo.yaml").symlink_to(secret)
    with pytest.raises(AttnZooError) as err:
        attnzoo.create_model(folder)
    assert "SECRETHASH" not in str(err.value) and "outside" in str(err.value)

    (folder / "attnzoo.yaml").unlink()
    (tmp_path / "real.yaml").rename(folder / "attnzoo.yaml")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(other)
    with pytest.raises(WeightsError) as err:
        attnzoo.create_model(folder)
    assert other_sha not in str(err.value) and "outside" in str(err.value)

    (folder / "model.safetensors").unlink()  # a linked folder on the weights' path
    (folder / "sub").symlink_to(outside, target_is_directory=True)
    spec = yaml.safe_load((folder / "attnzoo.yaml").read_text())
    spec["weights"]["file"] = "sub/other.safetensors"
    (folder / "attnzoo.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(WeightsError) as err:
        attnzoo.create_model(folder)
    assert other_sha not in str(err.value) and "outside" in str(err.value)
    # a link that stays inside the folder is fine
    (folder / "sub").unlink()
    (folder / "sub").mkdir()
    attnzoo.save_pretrained(models["new"], tmp_path / "src")
    (folder / "sub" / "other.safetensors").write_bytes(
        (tmp_path / "src" / "model.safetensors").read_bytes())
    spec["weights"]["sha256"] = yaml.safe_load(
        (tmp_path / "src" / "attnzoo.yaml").read_text())["weights"]["sha256"]
    (folder / "attnzoo.yaml").write_text(yaml.safe_dump(spec))
    (folder / "link.safetensors").symlink_to(folder / "sub" / "other.safetensors")
    spec["weights"]["file"] = "link.safetensors"
    (folder / "attnzoo.yaml").write_text(yaml.safe_dump(spec))
    assert _which(attnzoo.create_model(folder), models) == "new"


def test_7_embedded_zoo_weights_stay_in_the_manifests_folder(tmp_path: Path, models,
                                                            monkeypatch, outside) -> None:
    other_sha = _weights_file(models["new"], tmp_path / "other.safetensors")
    other = outside.plant("other.safetensors", (tmp_path / "other.safetensors").read_bytes())
    _manifest(tmp_path, monkeypatch, {"file": "w.safetensors", "sha256": "0" * 64})
    (tmp_path / "weights_manifests" / "w.safetensors").symlink_to(other)
    with pytest.raises(WeightsError) as err:
        attnzoo.create_model(MODEL, pretrained=True)
    assert other_sha not in str(err.value) and "outside" in str(err.value)
    manifest = tmp_path / "weights_manifests" / f"{MODEL}.yaml"
    manifest.unlink()
    manifest.symlink_to(outside.plant("shadow", SECRET))
    with pytest.raises(WeightsError) as err:
        attnzoo.create_model(MODEL, pretrained=True)
    assert "SECRETHASH" not in str(err.value) and "outside" in str(err.value)


# ------------------------------------------------------------------ 8. files that never end

_NEVER_ENDING = r"""
import json, os, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a leak ends in MemoryError
sys.path.insert(0, "tools")
import torch
import attnzoo
from attnzoo.safe_weights import load_safetensors, read_verified
import convert_timm

tmp = sys.argv[1]
fifo = os.path.join(tmp, "spec.yaml")
os.mkfifo(fifo)
folders = {}
for kind in ("spec_fifo", "weights_fifo", "weights_pagemap"):
    folder = folders[kind] = os.path.join(tmp, kind)
    attnzoo.save_pretrained(attnzoo.create_model("digits_cbam_tiny"), folder)
name = {"spec_fifo": "attnzoo.yaml", "weights_fifo": "model.safetensors"}
for kind, file in name.items():
    os.unlink(os.path.join(folders[kind], file))
    os.mkfifo(os.path.join(folders[kind], file))
os.unlink(os.path.join(folders["weights_pagemap"], "model.safetensors"))
os.symlink("/proc/self/pagemap", os.path.join(folders["weights_pagemap"], "model.safetensors"))
ckpt = os.path.join(tmp, "ckpt_fifo.safetensors")
os.mkfifo(ckpt)
cases = {
    "spec /dev/zero": lambda: attnzoo.create_model("/dev/zero"),
    "spec FIFO": lambda: attnzoo.create_model(fifo),
    "folder: attnzoo.yaml a FIFO": lambda: attnzoo.create_model(folders["spec_fifo"]),
    "folder: weights a FIFO": lambda: attnzoo.create_model(folders["weights_fifo"]),
    "folder: weights -> /proc/self/pagemap":
        lambda: attnzoo.create_model(folders["weights_pagemap"]),
    "pinned file /proc/self/pagemap": lambda: read_verified("/proc/self/pagemap", "0" * 64, "t"),
    "load_safetensors /proc/self/pagemap": lambda: load_safetensors("/proc/self/pagemap"),
    "convert_timm --checkpoint FIFO": lambda: convert_timm.convert("resnet18_sk", ckpt, tmp),
    "convert_timm --checkpoint /proc/self/pagemap":
        lambda: convert_timm.convert("resnet18_sk", "/proc/self/pagemap", tmp),
}
out = {}
for case, fn in cases.items():
    start = time.monotonic()
    try:
        fn()
        got = "no error"
    except attnzoo.AttnZooError as exc:
        got = f"refused: {str(exc)[:300]}"
    except Exception as exc:
        got = f"{type(exc).__name__}: {str(exc)[:300]}"
    out[case] = [round(time.monotonic() - start, 3), got]
    print(json.dumps({case: out[case]}), file=sys.stderr, flush=True)
print(json.dumps(out))
"""


def test_8_fifos_devices_and_proc_files_are_refused_at_once(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", _NEVER_ENDING, str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for case, (seconds, got) in results.items():
        assert got.startswith("refused: "), (case, got)
        assert seconds < 10, (case, seconds)
        assert re.search(r"not a regular file|outside|too short|FIFO|device", got), (case, got)


def test_8_a_huge_file_with_a_bad_header_is_refused_without_hashing_it(tmp_path: Path,
                                                                       models) -> None:
    folder = tmp_path / "sparse"
    attnzoo.save_pretrained(models["old"], folder)
    with open(folder / "model.safetensors", "wb") as f:
        f.truncate(8 << 30)  # 8 GiB of zeros, no disk used: header length 0
    start = time.monotonic()
    with pytest.raises(WeightsError, match="failed verification") as err:
        attnzoo.create_model(folder)
    assert time.monotonic() - start < 5  # hashing 8 GiB takes 20 s or more
    assert "not a safetensors file" in str(err.value)


def test_8_a_spec_file_over_the_size_cap_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with open(path, "wb") as f:
        f.truncate(64 << 20)  # over the 4 MiB cap (safe_yaml.MAX_SPEC_BYTES)
    with pytest.raises(AttnZooError, match="larger than"):
        attnzoo.create_model(str(path))


# ------------------------------------------------------------------ 9. what happened, by when


def _ways_in(hub: HostileHub, tmp_path: Path, monkeypatch, models) -> dict:
    """hf-hub:, a zoo manifest and convert_timm --repo, each at its own Hub repo holding
    the same files."""
    commit = _commit_saved(hub, "org/digits", models["old"], tmp_path)
    files = hub.repos["org/digits"].commits[commit]
    sha = yaml.safe_load(files["attnzoo.yaml"])["weights"]["sha256"]
    manifest_commit = hub.commit("org/manifest", files)
    hub.commit("org/ckpt", files)
    _manifest(tmp_path, monkeypatch, {"repo": "org/manifest", "revision": manifest_commit,
                                      "sha256": sha})
    return {
        "hf-hub": lambda: attnzoo.create_model("hf-hub:org/digits"),
        "manifest": lambda: attnzoo.create_model(MODEL, pretrained=True),
        "convert_timm": lambda: _convert_or_raise("--repo", "org/ckpt"),
    }


def _convert_or_raise(*args: str) -> None:
    code, err = _convert_timm("resnet18_sk", *args, "--out", "/nonexistent/never")
    raise WeightsError(err) if code else AssertionError("no error")


def test_9_a_hub_answering_500_is_reported_as_such(hub, tmp_path: Path, monkeypatch,
                                                   models) -> None:
    ways = _ways_in(hub, tmp_path, monkeypatch, models)
    _no_backoff_sleeps(monkeypatch)
    hub.mode = "500"
    for way, call in ways.items():
        exc, took = _error(call)
        assert isinstance(exc, WeightsError), (way, exc)
        assert "HTTP 500" in str(exc) and "server error" in str(exc), (way, str(exc))
        assert "offline" not in str(exc) and took < 20, (way, took)


def test_9_a_dripping_server_meets_the_download_deadline(hub, tmp_path: Path, monkeypatch,
                                                         models) -> None:
    ways = _ways_in(hub, tmp_path, monkeypatch, models)
    monkeypatch.setenv(TIMEOUT_ENV, "1.5")
    hub.mode = "drip"
    for way in ("hf-hub", "manifest"):
        exc, took = _error(ways[way])
        assert isinstance(exc, WeightsError), (way, exc)
        assert "timed out" in str(exc) and TIMEOUT_ENV in str(exc), (way, str(exc))
        assert 1.4 < took < 15, (way, took)
    leftovers = [p for p in _cache(tmp_path).rglob("*") if p.name.endswith(".incomplete")]
    assert leftovers == []
    hub.mode = "honest"  # the deadline is per download: a normal one still works
    assert _which(attnzoo.create_model("hf-hub:org/digits"), models) == "old"


def test_9_not_found_and_offline_are_told_apart(hub, tmp_path: Path, monkeypatch,
                                                models) -> None:
    _commit_saved(hub, "org/digits", models["old"], tmp_path)
    cases = {"hf-hub:org/nothing": "no such repo",
             "hf-hub:org/digits@nobranch": "no revision 'nobranch'"}
    for name, text in cases.items():
        with pytest.raises(WeightsError, match=text):
            attnzoo.create_model(name)
    go_offline(monkeypatch)
    with pytest.raises(WeightsError, match="offline mode is on"):
        attnzoo.create_model("hf-hub:org/digits")


def test_9_the_advice_for_a_bad_cache_entry_names_a_command_that_exists(
        hub, tmp_path: Path, monkeypatch, models) -> None:
    from huggingface_hub.cli import cache as cli_cache

    commit, snapshot = _cached(hub, tmp_path, models)
    blob = Path(os.path.realpath(snapshot / "model.safetensors"))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    # a cache that cannot be changed (read-only mount): the user is told how
    monkeypatch.setattr("attnzoo.safe_weights.quarantine", lambda path: False, raising=False)
    go_offline(monkeypatch)
    with pytest.raises(WeightsError, match="failed verification") as err:
        attnzoo.create_model(f"hf-hub:org/digits@{commit}")
    assert hasattr(cli_cache, "rm")
    assert f"hf cache rm {commit}" in str(err.value)
    assert str(snapshot / "model.safetensors") in str(err.value)
    assert "hf cache delete" not in str(err.value)


# ------------------------------------------------------------------ 10. bad downloads


def test_10_a_download_that_fails_verification_is_fetched_again_next_time(
        hub, tmp_path: Path, monkeypatch, models) -> None:
    ways = _ways_in(hub, tmp_path, monkeypatch, models)
    for way in ("hf-hub", "manifest"):
        hub.mode = "wrong_bytes"
        with pytest.raises(WeightsError, match="failed verification.*removed from the Hub "
                                               "cache"):
            ways[way]()
        assert list(_cache(tmp_path).rglob("*.incomplete")) == []
        hub.mode = "honest"
        fetched = len(hub.fetched("model.safetensors"))
        assert _which(ways[way](), models) == "old", way
        assert len(hub.fetched("model.safetensors")) == fetched + 1, way


def test_10_the_hub_lying_about_the_etag_or_the_commit_is_refused(
        hub, tmp_path: Path, monkeypatch, models, outside) -> None:
    first = _commit_saved(hub, "org/digits", models["old"], tmp_path)
    second = _commit_saved(hub, "org/digits", models["new"], tmp_path)
    hub.target, hub.mode, hub.fake_commit = "attnzoo.yaml", "lie_commit", second
    with pytest.raises(WeightsError, match=f"at commit {first}, the Hub answered commit "
                                           f"{second}"):
        attnzoo.create_model(f"hf-hub:org/digits@{first}")
    hub.mode = "honest"  # what the lie put in the cache is gone: each commit is its own
    assert _which(attnzoo.create_model(f"hf-hub:org/digits@{second}"), models) == "new"
    assert _which(attnzoo.create_model(f"hf-hub:org/digits@{first}"), models) == "old"
    other = _commit_saved(hub, "org/other", models["old"], tmp_path)
    hub.mode = "wrong_bytes"
    hub.corrupt = staticmethod(lambda data: data.replace(b"A tiny CNN", b"A tiny CNX", 1))
    with pytest.raises(WeightsError, match="the Hub sent.*not the .* the Hub's ETag named"):
        attnzoo.create_model(f"hf-hub:org/other@{other}")
    before = {p for p in tmp_path.rglob("*") if "hf_home" not in p.parts}
    for mode, text in (("bad_commit", "commit id"), ("bad_etag", "ETag")):
        hub.mode = mode
        with pytest.raises(WeightsError, match=f"the Hub answered the {text}"):
            attnzoo.create_model("hf-hub:org/digits")
    assert {p for p in tmp_path.rglob("*") if "hf_home" not in p.parts} == before
    assert not any(p.name == "escaped" for p in tmp_path.rglob("*"))
    hub.mode = "honest"
    assert _which(attnzoo.create_model(f"hf-hub:org/other@{other}"), models) == "old"



# ------------------------------------------------------------------ 11. valid but huge specs


def _bounded(prop: dict) -> bool:
    """Whether a JSON-schema property has an upper bound (a number's maximum, a string's
    enum or maxLength, an array's maxItems and bounded items); null and booleans are."""
    if "anyOf" in prop:
        return all(_bounded(p) for p in prop["anyOf"])
    if "enum" in prop or "const" in prop or prop.get("type") in ("null", "boolean"):
        return True
    if prop.get("type") in ("integer", "number"):
        return "maximum" in prop or "exclusiveMaximum" in prop
    if prop.get("type") == "string":
        return "maxLength" in prop
    if prop.get("type") == "array":
        items = prop.get("prefixItems") or [prop.get("items", {})]
        return ("maxItems" in prop or "prefixItems" in prop) and all(map(_bounded, items))
    return False


def test_11_every_block_field_has_an_upper_bound_that_the_schema_shows(capsys) -> None:
    from attnzoo import cli
    from attnzoo.registry import block_configs

    unbounded = []
    for name, config in block_configs().items():
        schema = config.model_json_schema()
        for field_name, prop in schema["properties"].items():
            if "$ref" in prop:
                prop = schema["$defs"][prop["$ref"].rsplit("/", 1)[1]]
            if not _bounded(prop):
                unbounded.append(f"{name}.{field_name}")
    assert unbounded == []
    assert cli.main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    cbam = next(d for d in schema["$defs"].values()
                if d.get("properties", {}).get("type", {}).get("const") == "cbam")
    assert cbam["properties"]["spatial_kernel"]["maximum"] == 31


def test_11_the_zoo_and_the_papers_values_are_within_the_bounds() -> None:
    from attnzoo.builder import build_model
    from attnzoo.registry import block_configs

    for config in block_configs().values():  # the papers' values are the defaults
        config.model_validate({"type": config.block_type(), **{
            k: f.default for k, f in config.model_fields.items()
            if k != "type" and f.default is not None}})
    for name in attnzoo.list_models():
        spec = attnzoo.load_spec(name)
        if spec.backbone.source == "attnzoo":  # architectures parse their block fields
            build_model(spec, device="meta")


def _tiny_spec(insert: list, input_size=(1, 8, 8), widths=(32, 64)) -> dict:
    return {"name": "huge", "num_classes": 10, "input_size": list(input_size), "insert": insert,
            "backbone": {"source": "attnzoo", "name": "tiny_cnn",
                         "args": {"in_chans": 1, "widths": list(widths), "depths": [1, 1]}}}


@pytest.mark.parametrize("block, field", [
    ({"type": "cbam", "spatial_kernel": 99999}, "spatial_kernel"),
    ({"type": "se", "reduction": 1e-9}, "reduction"),
    ({"type": "fca", "dct_size": [100000, 100000]}, "dct_size"),
    ({"type": "criss_cross", "recurrence": 10**9}, "recurrence"),
    ({"type": "reverse", "num_convs": 20000}, "num_convs"),
    ({"type": "sk", "kernel_sizes": [3] * 1000}, "kernel_sizes"),
])
def test_11_a_huge_field_is_a_spec_error_naming_the_insert_and_the_field(block, field) -> None:
    start = time.monotonic()
    with pytest.raises(attnzoo.SpecError) as err:
        attnzoo.create_model(_tiny_spec([{"block": block, "at": {"path": "stages.*.*"}}]))
    assert time.monotonic() - start < 10
    assert re.search(rf"insert\[0\]\.block\.{block['type']}\.{field}\b", str(err.value)), \
        str(err.value)


def test_11_an_allocation_failure_while_building_is_a_spec_error(monkeypatch) -> None:
    spec = _tiny_spec([{"block": {"type": "fca", "reduction": 4}, "at": {"path": "stages.*.*"}}],
                      input_size=(1, 65536, 65536))  # the DCT bases of a 65536 x 65536 map
    with pytest.raises(attnzoo.SpecError, match=r"insert\[0\] \(fca\): at stages\.0\.0 .*"
                       r"65536x65536.*ran out of memory.*reduction=4"):
        attnzoo.create_model(spec)
    with pytest.raises(attnzoo.SpecError, match="'se' block ran out of memory.*reduction=0.0625"):
        attnzoo.create_block("se", 10**7, reduction=0.0625)


def test_11_the_number_of_sites_per_spec_is_capped(monkeypatch) -> None:
    text = "name: many\nbackbone: {source: attnzoo, name: tiny_cnn, args: {in_chans: 1}}\n" \
           "input_size: [1, 8, 8]\ninsert:\n- &se {block: {type: se}, at: {path: stem}}\n" \
           + "- *se\n" * 10_000  # ~90k YAML nodes: under the YAML cap
    start = time.monotonic()
    with pytest.raises(attnzoo.SpecError, match=rf"more than 1024 sites.*\${SITES_ENV}"):
        attnzoo.create_model(text)
    assert time.monotonic() - start < 20
    monkeypatch.setenv(SITES_ENV, "3")
    insert = [{"block": {"type": "se"}, "at": {"path": "stages.*.*"}}] * 2  # 2 x 2 sites
    with pytest.raises(attnzoo.SpecError, match=r"insert\[1\] \(se\): the inserts resolve to "
                       r"more than 3 sites \(4 after this one\)"):
        attnzoo.create_model(_tiny_spec(insert))
    monkeypatch.setenv(SITES_ENV, "4")
    assert len(attnzoo.create_model(_tiny_spec(insert)).attnzoo_blocks) == 4


# ------------------------------------------------------------------ 12. batch 1 in training


def test_12_bisenet_in_training_with_batch_1_names_the_module_and_why() -> None:
    model = attnzoo.create_model("bisenetv1_resnet18").train()
    with pytest.raises(ValueError) as err:
        model(torch.rand(1, 3, 64, 64))
    msg = str(err.value)
    assert "context_head.global_context" in msg and "global average pooling" in msg, msg
    assert "batch size >= 2" in msg and "model.eval()" in msg
    logits, aux16, aux8 = model(torch.rand(2, 3, 64, 64))  # a batch of 2 trains
    assert logits.shape == (2, 19, 64, 64)
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 19, 64, 64)
