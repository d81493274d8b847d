"""Atomic file writes: a temporary file beside the target, never clobbering, with the mode the umask gives,
fsynced and renamed over the target once complete (checkpoints, run-folder state, images, samples.npz).

``tempfile.mkstemp`` creates files owner-only (0600), whatever the umask: images and checkpoints written through
it could not be read by the group or others even where the user's umask allows it. These files are created like
``open(path, "w")`` creates them (0666 minus the umask).
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "create_temp_beside"]


def create_temp_beside(path: Path) -> tuple[Path, int]:
    """Create ``.{name}.{pid}.{random}.tmp`` in ``path``'s folder; returns (its path, an fd open for writing).

    O_EXCL: never follows or overwrites something already there; mode 0o666 lets the umask decide, as open() does.
    """
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return tmp, fd


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); platforms that cannot open directories simply skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary file beside ``path`` (its folder must exist), which is then fsynced and
    renamed over ``path``. Whatever fails or interrupts it, no half-written file is left under either name and a
    previous ``path`` stays as it was; the error propagates."""
    tmp, fd = create_temp_beside(path)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        os.close(fd)
        write(tmp)
        # A writer may re-create the file (safetensors makes it owner-only): give it the mode open() would have.
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path
