"""The auditor's view of the audit log: filtered records and the verdict of the chain's verification.

Reading the log is itself a read of PHI (it names patients), so it is audited like any other. An auditor
sees who did what to which patient id, and which fields a change touched — not the names, record numbers,
birth dates, diagnoses or notes themselves (service/redact.py): the auditor is on no care team.
"""

from __future__ import annotations

from core.settings import Settings
from service.redact import redact
from warehouse.audit import AuditLog


def read_audit(s: Settings, reader: str, via: str, *, actor: str | None = None, patient: str | None = None,
               outcome: str | None = None, action: str | None = None, limit: int = 200) -> dict:
    log = AuditLog(s)
    verdict = log.verify()
    records = log.readable_records()
    total = len(records)

    def keep(r: dict) -> bool:
        if "unreadable" in r:
            return True  # an altered line is always shown: the auditor must see it
        return ((actor is None or r.get("actor") == actor)
                and (patient is None or patient in (r.get("patients") or []))
                and (outcome is None or str(r.get("outcome", "")).split(":")[0] == outcome)
                and (action is None or r.get("action") == action))

    shown = [_shown(r) for r in [r for r in reversed(records) if keep(r)][:limit]]
    filters = {k: v for k, v in (("actor", actor), ("patient", patient), ("outcome", outcome),
                                 ("action", action)) if v is not None}
    log.append(reader, "audit-read", sorted({p for r in shown for p in r.get("patients") or []}),
               {"filters": filters, "limit": limit, "via": via}, len(shown))
    return {"verify": verdict, "total": total, "records": shown, "filters": filters}


def _shown(record: dict) -> dict:
    """A record as the auditor sees it: its query's identifying values redacted."""
    return {**record, "query": redact(record["query"])} if "query" in record else record
