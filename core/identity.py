"""Who started this process, as the kernel says, kept across the CLI giving up root.

A command started as root hands the state to the service account and becomes it (rpmctl/services/account.py)
before doing any work; the audit records of what it then changes still name the operator who ran it (root),
not the account it runs as. The uid comes from the kernel before the switch — no variable or flag sets it.
"""

from __future__ import annotations

import os
import pwd

_started_as: int | None = None


def remember_caller() -> None:
    """Called once, just before the process gives up root."""
    global _started_as
    if _started_as is None:
        _started_as = os.getuid()


def caller_uid() -> int:
    return _started_as if _started_as is not None else os.getuid()


def caller_name() -> str:
    uid = caller_uid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
