"""Files a command writes for its user — billing and report CSVs, FHIR bundles: PHI, or close to it.

Always a new file, readable by its owner only, owned by whoever ran the command and put in place by a rename:
a symlink someone planted at the path is replaced, not followed, and an existing file of another account is
replaced, not written into (it would keep its owner, who could then read what we wrote). Where the folder's
sticky bit forbids replacing another account's file (/tmp), the export is refused instead, as is a path that
leads to anything but a regular file (a folder, /dev/null, a pipe): those are never replaced. Every text cell
of a CSV export goes through ``spreadsheet_safe`` first.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

# A spreadsheet runs a cell that starts like a formula (OWASP "CSV injection"): =, +, -, @, and a leading tab or
# carriage return that some importers strip before looking.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: object) -> object:
    """A CSV cell a spreadsheet shows instead of running: text that starts like a formula gets a leading
    apostrophe (numbers are written as numbers: -71.0 is a value, not a formula)."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def write_export(path: Path | str, data: bytes) -> Path:
    """Write ``data`` as a new 0600 file at ``path``, in a folder that already exists."""
    out = Path(path)
    if not out.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder (create it first)", str(out.parent))
    try:
        target = os.stat(out)  # what the path leads to, through a symlink
    except FileNotFoundError:
        pass  # nothing there, or a link to nothing (which would create its target if followed)
    else:
        if not stat.S_ISREG(target.st_mode):  # a folder, a device (/dev/null, /dev/stdout), a pipe
            raise ValueError(f"{out} is not a regular file: refusing to replace it (choose a file name)")
    # mkstemp: a random name, O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600 whatever the umask.
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, out)
        except PermissionError:
            raise PermissionError(errno.EPERM, "cannot replace this file (another account's, in a folder "
                                  "that protects it): choose another name", str(out)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
