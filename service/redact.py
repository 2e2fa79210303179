"""What a role that reads no PHI is shown of a registry change: which fields changed, never their values.

An administrator changes the registry and an auditor reads the audit log, but neither is on a care team: the
answer to an admin's change and the auditor's view of a record name the patient id, the fields changed and
who changed them. The audit log itself keeps the values before and after (for an investigation with the
keys), so only what is *shown* is redacted.
"""

from __future__ import annotations

from typing import Any

REDACTED = "[redacted]"
# Identify a patient or describe their health (HIPAA Safe Harbor names, record numbers, dates of birth; the
# diagnoses and free-text notes a clinician writes).
IDENTIFYING = frozenset({"mrn", "given_name", "family_name", "birth_date", "conditions", "note", "notes",
                         "ack_note"})


def changed_fields(before: dict | None, after: dict | None, ignore: tuple[str, ...] = ()) -> list[str]:
    """The fields whose value differs between two states of a record (every set field of a new one)."""
    before, after = before or {}, after or {}
    return sorted(k for k in (before.keys() | after.keys()) - set(ignore) if before.get(k) != after.get(k))


def redact(value: Any) -> Any:
    """``value`` with every identifying field's value replaced by ``REDACTED`` at any depth; a dict holding a
    ``before``/``after`` pair of records also says which fields changed (``changed``)."""
    if isinstance(value, list):
        return [redact(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: REDACTED if k in IDENTIFYING and v is not None else redact(v) for k, v in value.items()}
    before, after = value.get("before"), value.get("after")
    if "changed" not in value and (isinstance(before, dict) or isinstance(after, dict)):
        out["changed"] = changed_fields(before if isinstance(before, dict) else None,
                                        after if isinstance(after, dict) else None)
    return out
