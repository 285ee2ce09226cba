"""Writing files: atomically (a crash never leaves half a file under the final name) and with
the permissions the user's umask gives any ordinary file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
