"""Atomic file replacement, the checks before a file is written, and a run's lock: every file
mlkd writes goes through here."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from mlkd_cli.core.errors import RunStopped, UserError
from mlkd_cli.core.safeload import shown


class WriteFailed(RunStopped):
    """A file could not be written (disk full, read-only folder); the previous one is intact."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain_file_mode() -> int:
    """The permissions a plain open() gives a new file (mkstemp's are 0600)."""
    return 0o666 & ~_umask()


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write` on a temporary file beside `path`, fsync it, then rename it over `path`.

    The rename is atomic on POSIX filesystems, so readers (and a crash at any moment) see either
    the previous file or the complete new one. On failure the temporary file is removed and the
    failure becomes `WriteFailed`, saying what was kept, the previous file untouched.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_failed(path, exc) from exc
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.fchmod(fd, plain_file_mode())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_failed(path, exc) from exc
        raise


def _write_failed(path: Path, exc: OSError) -> WriteFailed:
    kept = "the previous file is intact" if path.exists() else "nothing was written"
    return WriteFailed(
        f"could not write {path} ({exc.strerror or exc}); {kept}. Free disk space or fix the "
        "folder's permissions, then run again (a training run: with --resume)"
    )


def check_writable(folder: Path, flag: str = "--output-dir") -> None:
    """Refuse, before any work, a folder where files cannot be created (creating nothing)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(
            f"{flag} {shown(folder)}: {shown(existing)} is a file, not a folder; choose another"
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UserError(
            f"{flag} {shown(folder)} is not writable ({exc.strerror or exc}); choose another folder"
        ) from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write text so that `path` holds either the old or the new content, never a mix."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def _same_file(a: Path, b: Path) -> bool:
    """`a` and `b` name one file (the same path after resolving links, or one inode)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is absent: distinct
        return False


def check_new_files(
    paths: Iterable[Path], overwrite: bool, flag: str, sources: Iterable[Path] = ()
) -> None:
    """Refuse, before any work, to write any of `paths` over an existing file unless
    `overwrite`, over a folder, or over one of the command's `sources` (its inputs) ever.

    `flag` names the option that chose the paths (for the error line). Folders to be created
    are not checked here: `check_writable` does that.
    """
    inputs = list(sources)
    for path in paths:
        for source in inputs:
            if _same_file(path, source):
                raise UserError(
                    f"{flag} {shown(path)} is the input {shown(source)} itself; write the "
                    "output to another path (--overwrite never replaces an input)"
                )
        if path.is_dir():
            raise UserError(
                f"{flag} {shown(path)} is an existing folder; name a file that is not a folder"
            )
        if path.exists() and not overwrite:
            raise UserError(
                f"{shown(path)} already exists; pass --overwrite to replace it, or choose "
                f"another {flag}"
            )


# ------------------------------------------------------------------------------ a run's lock


def _process_start(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (Linux), so that a pid the system
    has since given to another process is not taken for the run; None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses; the fields after it do not
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(holder: dict[str, Any]) -> bool:
    """The lock's process still runs (on this host; on another host it cannot be told, so it
    counts as running)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    started = holder.get("process_start")
    return started is None or _process_start(pid) in (None, started)


# A lock mlkd writes is one short JSON line; more than this is someone else's file.
LOCK_BYTES = 4096


def _read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's record; None when it vanished meanwhile."""
    try:
        with path.open("rb") as handle:
            text = handle.read(LOCK_BYTES).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UserError(
            f"cannot read the lock {shown(path)} ({exc.strerror or exc}); fix its permissions"
        ) from None
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise UserError(
            f"{shown(path)} is not a lock mlkd wrote; delete it if no run of this name is going"
        )
    return record


def _holder(record: dict[str, Any]) -> str:
    return f"pid {record.get('pid')} on {record.get('host')} since {record.get('started')}"


def check_not_running(path: Path, what: str) -> None:
    """Refuse, before any work, a run whose lock at `path` a running process holds (a stale
    lock passes: the run takes it over when it starts)."""
    holder = _read_lock(path) if path.exists() else None
    if holder is not None and _alive(holder):
        raise _running(path, holder, what)


def _running(path: Path, holder: dict[str, Any], what: str) -> UserError:
    """`what` is already running: the error that says who runs it and what to do."""
    elsewhere = holder.get("host") != socket.gethostname()
    fix = (
        f"if that run is gone, delete {shown(path)}"
        if elsewhere
        else f"wait for it to end or choose another --name (lock {shown(path)})"
    )
    return UserError(f"{what} is already running ({_holder(holder)}); {fix}")


def _try_lock(path: Path, text: str) -> bool:
    """Create `path` holding `text`, atomically: False when it exists already.

    The record is written to a temporary file and hard-linked into place, which, like
    open(O_CREAT | O_EXCL), fails when the path exists, and leaves no half-written lock
    behind when a process is killed in between.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on `folder` itself for the block (the kernel drops it if the process
    dies); where flock is missing (not POSIX) the block runs unserialised."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _acquire(path: Path, what: str, say: Callable[[str], None]) -> str:
    """Take the lock at `path` (taking over one whose process is gone); returns its token."""
    token = uuid.uuid4().hex
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "process_start": _process_start(os.getpid()),
        "token": token,
    }
    text = json.dumps(record) + "\n"
    try:
        # Serialised with the other runs starting in this folder: two runs that both found the
        # same stale lock would otherwise each delete it, the second deleting the first's new one.
        with _folder_lock(path.parent):
            for _ in range(2):  # a lock that vanished meanwhile is simply tried again
                if _try_lock(path, text):
                    return token
                holder = _read_lock(path)
                if holder is None:
                    continue
                if _alive(holder):
                    raise _running(path, holder, what)
                say(
                    f"{shown(path)} was left by a run that is no longer running "
                    f"({_holder(holder)}); taking it over"
                )
                path.unlink(missing_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create the lock {shown(path)} ({exc.strerror or exc}); fix the folder's "
            "permissions or choose another --output-dir"
        ) from None
    raise UserError(
        f"another run took {shown(path)} meanwhile; wait for it or choose another --name"
    )


@contextlib.contextmanager
def run_lock(path: Path, what: str, say: Callable[[str], None]) -> Iterator[None]:
    """Hold a lock file (pid, host, start time) for a run's duration, so that a second run of
    the same name is refused; a lock whose process is gone is said (`say`) and taken over.

    The lock goes when the block ends, however it ends (an error, an interruption). A killed
    process leaves it behind, which the next run recognises as stale.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    token = _acquire(path, what, say)
    try:
        yield
    finally:
        with contextlib.suppress(UserError, OSError):
            held = _read_lock(path)
            if held is not None and held.get("token") == token:  # still ours: not taken over
                path.unlink(missing_ok=True)
