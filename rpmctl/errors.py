"""What the CLI reports to its user: one clear line on stderr (or ``{"error": ...}`` under --json) and an
exit code a script can act on. Never a traceback."""

from __future__ import annotations

# Exit codes shared by every command (documented in the README).
INTERNAL = 1     # a failure the user cannot fix by changing the input (the traceback goes to a private file)
USAGE = 2        # bad input: an argument, an id, a file, a missing state folder
UNBALANCED = 3   # `rpm accounting`: the identity does not hold
DENIED = 4       # access refused (care-team scope, no session)
TAMPERED = 5     # `rpm audit verify`: the log was altered (and PHI reads refused because of it)
QUALITY = 6      # `rpm pipeline run`: the batch was loaded, but its quarantine rate is above RPM_QUARANTINE_FAIL
PIPE_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for any tool whose reader went away (`rpm … | head`)


class UserError(Exception):
    """Input or state the user can fix. ``str(exc)`` is the one line shown; ``code`` the exit code."""

    def __init__(self, message: str, code: int = USAGE):
        super().__init__(message)
        self.code = code


def printable(value: object) -> str:
    """``value`` as text that cannot forge terminal output: control characters (newline, carriage return,
    escape sequences, Unicode line separators) are shown escaped instead of acted on."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def one_line(message: str) -> str:
    """A message as the single line an error report is: its lines joined with " | ", the rest escaped."""
    return printable(" | ".join(part.strip() for part in str(message).splitlines() if part.strip()))
