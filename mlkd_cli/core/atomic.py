"""Atomic file replacement: every file mlkd writes goes through here."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from mlkd_cli.core.errors import RunStopped, UserError


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
        raise UserError(f"{flag} {folder}: {existing} is a file, not a folder; choose another")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UserError(
            f"{flag} {folder} is not writable ({exc.strerror or exc}); choose another folder"
        ) from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write text so that `path` holds either the old or the new content, never a mix."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
