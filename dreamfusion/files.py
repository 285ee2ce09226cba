"""Writing files: atomically (a crash never leaves half a file under the final name), with the
permissions the user's umask gives any ordinary file, into folders that one process at a time
writes (:func:`folder_lock`), named after what they hold (:func:`slug`)."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

SLUG_LENGTH = 60


class FolderInUse(ValueError):
    """Another live process is writing the folder."""


def slug(text: str, length: int = SLUG_LENGTH) -> str:
    """A folder name for a text (a prompt): lower-case letters, digits and single dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length].strip("-") or "prompt"


def ordinary_file_mode() -> int:
    """The permissions the user's umask gives a new ordinary file (0666 & ~umask). Read from
    /proc where it can be (setting the umask to read it would race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path`` (same suffix, so writers that go by
    suffix still work), then move it into place with ordinary permissions; on failure the
    temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, ordinary_file_mode())  # mkstemp (and safetensors) make 0600; a finished file reads like any other
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:  # a failed write names no file: name ours
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    return path


def staging_folder(out: Path) -> Path:
    """Where a run into ``out`` is written until it is whole: ``DIR.partial``."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def lock_path(folder: Path) -> Path:
    """The lock file of a folder: ``DIR.lock`` beside it (the folder itself may not exist yet, or be
    replaced whole by its staging folder)."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".lock")


def _lock_owner(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        return "?"
    return text if text.isdigit() else "?"


@contextmanager
def folder_lock(folder: Path) -> Iterator[Path]:
    """Hold ``DIR.lock`` (:func:`lock_path`) while writing ``DIR``: a second process that asks for
    it while this one lives gets a :class:`FolderInUse` naming this one's pid. The file holds the
    owner's pid and an advisory ``flock``, which the kernel drops when the owner dies, however it
    dies: a lock left by a killed process is taken over. The file is removed on release."""
    import fcntl

    lock = lock_path(folder)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = _lock_owner(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise FolderInUse(f"{folder} is being written by another run (pid {owner}, lock {lock}); wait for it to finish "
                              "or choose another folder") from None
        try:  # the last owner may have removed the file (and a third process made a new one) between our open and our lock
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)
