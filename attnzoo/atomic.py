"""All-or-nothing writes into a folder, a lock per folder, and reads that stay inside it.

A save (:func:`write_folder`) writes every file to a temp file in the folder
(``.attnzoo-tmp-*``), fsyncs it, then renames the temp files over the old files, the
commit record (``attnzoo.yaml``) last. A rename replaces a link instead of writing
through it, so nothing outside the folder is ever written. While files are being
replaced a journal (``.attnzoo-saving``) exists: a folder that still has one after
its writer died is "an interrupted save", refused until it is saved again. Saves
into one folder run one at a time under the folder's lock (``flock`` on the folder
itself, so no lock file is left in it); loads take the lock shared while they open
the files, so they see one whole model.

Reads of a stranger's folder go through :func:`open_regular`: a regular file only (no
FIFO, device or ``/proc`` file), inside the folder once links are resolved.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from .errors import AttnZooError
from .hub_cache import blob_roots
from .settings import LOCK_TIMEOUT_ENV, lock_timeout

try:
    import fcntl
except ImportError:  # Windows: a lock file instead (filelock comes with huggingface_hub)
    fcntl = None  # type: ignore[assignment]

TEMP_PREFIX = ".attnzoo-tmp-"
JOURNAL = ".attnzoo-saving"
_LOCK_FILE = ".attnzoo.lock"  # platforms without flock only
_O = {name: getattr(os, name, 0) for name in
      ("O_CLOEXEC", "O_NOFOLLOW", "O_NONBLOCK", "O_DIRECTORY", "O_BINARY")}

Writer = Callable[[BinaryIO], None]


class FolderLock:
    """``with FolderLock(folder, exclusive)``: a save holds the folder exclusively, a
    load shares it. Waits up to ``$ATTNZOO_LOCK_TIMEOUT`` seconds, then raises
    AttnZooError. Filesystems without locks (some network mounts) are not locked."""

    def __init__(self, folder: Path, exclusive: bool) -> None:
        self.folder, self.exclusive = folder, exclusive
        self._fd: int | None = None
        self._filelock = None

    def __enter__(self) -> FolderLock:
        timeout = lock_timeout()
        if fcntl is None:
            if self.exclusive:
                from filelock import FileLock, Timeout

                self._filelock = FileLock(str(self.folder / _LOCK_FILE))
                try:
                    self._filelock.acquire(timeout=timeout)
                except Timeout:
                    raise self._busy(timeout) from None
            return self
        try:
            self._fd = os.open(self.folder, os.O_RDONLY | _O["O_CLOEXEC"] | _O["O_DIRECTORY"])
        except OSError:  # unreadable, or not a folder: what comes next reports it
            return self
        op = (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline, pause = time.monotonic() + timeout, 0.005
        while True:
            try:
                fcntl.flock(self._fd, op)
                return self
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self._close()
                    raise self._busy(timeout) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.1)
            except OSError:  # no locks on this filesystem: go on unlocked
                self._close()
                return self

    def _busy(self, timeout: float) -> AttnZooError:
        doing = "save into" if self.exclusive else "load from"
        return AttnZooError(
            f"{self.folder}: cannot {doing} this folder: another process has been saving "
            f"into it for {timeout:g} s (${LOCK_TIMEOUT_ENV}); try again when that save "
            "has finished")

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __exit__(self, *exc: object) -> None:
        self._close()
        if self._filelock is not None:
            self._filelock.release()


def _sync_dir(folder: Path) -> None:
    if fcntl is None:
        return  # no directory fsync on Windows
    fd = os.open(folder, os.O_RDONLY | _O["O_CLOEXEC"] | _O["O_DIRECTORY"])
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_temp(folder: Path, name: str) -> tuple[Path, BinaryIO]:
    """A new file in ``folder``, created (never opened through a link) with the mode
    ``open()`` would give it: 0666 less the umask."""
    path = folder / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{name}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O["O_NOFOLLOW"]
                 | _O["O_CLOEXEC"] | _O["O_BINARY"], 0o666)
    return path, os.fdopen(fd, "wb")


def _finish_temp(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _write_temp(folder: Path, name: str, write: Writer) -> Path:
    path, f = _new_temp(folder, name)
    try:
        with f:
            write(f)
            _finish_temp(f)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _commit(temp: Path, target: Path) -> None:
    os.replace(temp, target)  # replaces a link at ``target``, never writes through it


def _remove_leftovers(folder: Path) -> None:
    """Temp files of saves that were killed (the folder's lock is held: none is live)."""
    for entry in os.scandir(folder):
        if entry.name.startswith(TEMP_PREFIX) and not entry.is_dir(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)


def write_folder(folder: str | os.PathLike[str], files: Sequence[tuple[str, Writer]]) -> Path:
    """Write ``files`` (plain name, writer of its bytes) into ``folder`` all or nothing.

    The folder is created if missing and locked for the save. Each file goes to a temp
    file that is fsynced; then the temp files replace the files, in order, the last
    one being the commit record. On any error the temp files are removed and the
    folder keeps its old files (or, if the error came while files were being
    replaced, stays marked as an interrupted save)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, _ in files:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            raise AttnZooError(f"{target}: is a folder; cannot save {name} there")
    with FolderLock(folder, exclusive=True):
        _remove_leftovers(folder)
        temps: dict[str, Path] = {}
        try:
            for name, write in files:
                temps[name] = _write_temp(folder, name, write)
            if not os.path.lexists(folder / JOURNAL):
                temps[JOURNAL] = _write_temp(folder, JOURNAL, _journal_text)
                _commit(temps.pop(JOURNAL), folder / JOURNAL)
                _sync_dir(folder)
            for name, _ in files:  # from here until the journal goes, the folder is mixed
                _commit(temps.pop(name), folder / name)
            _sync_dir(folder)
            os.unlink(folder / JOURNAL)
            _sync_dir(folder)
        finally:
            for temp in temps.values():
                temp.unlink(missing_ok=True)
    return folder


def write_file(path: str | os.PathLike[str], write: Writer) -> Path:
    """Write one file all or nothing: a temp file beside it, fsynced, renamed over it (a
    link at ``path`` is replaced, not written through). No lock, no journal."""
    path = Path(path)
    temp = _write_temp(path.parent, path.name, write)
    try:
        _commit(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _sync_dir(path.parent)
    return path


def _journal_text(f: BinaryIO) -> None:
    f.write(f"a save by process {os.getpid()} started {time.strftime('%Y-%m-%d %H:%M:%S')}; "
            "if this file is still here, that save was interrupted\n".encode())


def interrupted_save(folder: Path, record: str) -> str | None:
    """Why ``folder`` holds an interrupted save (call it holding the folder's lock), or
    None. ``record`` is the commit record's name."""
    advice = ("Save the model into it again (that replaces every file and clears the "
              "leftovers), or delete the folder.")
    if os.path.lexists(folder / JOURNAL):
        return (f"{folder}: an interrupted save: a save into this folder stopped while it "
                f"was replacing the files (its journal {JOURNAL} is still there), so they may "
                f"belong to two different models. {advice}")
    if os.path.lexists(folder / record):
        return None
    try:
        temps = [e for e in os.scandir(folder) if e.name.startswith(TEMP_PREFIX)]
    except OSError:
        return None
    if not temps:
        return None
    size = sum(e.stat(follow_symlinks=False).st_size for e in temps)
    return (f"{folder}: an interrupted save: the first save into this folder stopped before "
            f"it wrote {record} ({len(temps)} leftover temp file(s), {size:,} bytes). {advice}")


# ------------------------------------------------------------------ confined reads


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def open_regular(path: str | os.PathLike[str], error: type[AttnZooError], *,
                 within: str | os.PathLike[str] | None = None) -> BinaryIO:
    """Open ``path`` for reading, unbuffered. It must be a regular file (a FIFO would
    block, a device or ``/proc`` file never end) and, with ``within``, lie inside that
    folder once every link is resolved (or, for a Hub cache snapshot folder, in its
    repo's blobs). Raises ``error`` naming the path; FileNotFoundError when missing."""
    path = Path(path)
    if within is not None:
        real = Path(os.path.realpath(path))
        roots = [Path(os.path.realpath(within)), *blob_roots(within)]
        if not any(real == r or r in real.parents for r in roots):
            raise error(f"{path}: links to {real}, outside {within}; attnzoo reads only "
                        "files inside the folder")
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: is a {_kind(st.st_mode)}, not a regular file")
    # O_NONBLOCK: a FIFO swapped in after the check cannot block the open.
    fd = os.open(path, os.O_RDONLY | _O["O_CLOEXEC"] | _O["O_NONBLOCK"] | _O["O_BINARY"])
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(
            opened.st_mode):
        os.close(fd)
        raise error(f"{path}: changed while it was being opened")
    return os.fdopen(fd, "rb", buffering=0)


def read_capped(path: str | os.PathLike[str], limit: int, error: type[AttnZooError], what: str,
                *, within: str | os.PathLike[str] | None = None) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see :func:`open_regular`)."""
    chunks, size = [], 0
    with open_regular(path, error, within=within) as f:
        while size <= limit and (chunk := f.read(limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    data = b"".join(chunks)
    if size > limit:
        raise error(f"{path}: larger than {limit:,} bytes; {what} is small")
    return data


__all__ = ["JOURNAL", "TEMP_PREFIX", "FolderLock", "interrupted_save", "open_regular",
           "read_capped", "write_file", "write_folder"]
