"""Rotated copies of a log: ``name.log.1`` (newest) … ``name.log.<keep>`` (oldest)."""

from __future__ import annotations

import os
from pathlib import Path


def shift_rotated(path: Path, keep: int) -> None:
    """Make room for a new ``name.log.1``: each copy moves one number up, the one at ``keep`` is overwritten.
    Renames move a planted symlink itself, never its target."""
    for n in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.is_symlink() or older.exists():
            os.replace(older, path.with_name(f"{path.name}.{n + 1}"))
