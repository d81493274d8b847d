"""Temporary files for atomic writes: beside the target, never clobbering, with the mode the umask gives.

``tempfile.mkstemp`` creates files owner-only (0600), whatever the umask: images and checkpoints written through
it could not be read by the group or others even where the user's umask allows it. These files are created like
``open(path, "w")`` creates them (0666 minus the umask) and renamed over the target once complete.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["create_temp_beside"]


def create_temp_beside(path: Path) -> tuple[Path, int]:
    """Create ``.{name}.{pid}.{random}.tmp`` in ``path``'s folder; returns (its path, an fd open for writing).

    O_EXCL: never follows or overwrites something already there; mode 0o666 lets the umask decide, as open() does.
    """
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return tmp, fd
