"""Registry changes, each audited with its actor and the state before and after.

Granting a care team, changing a threshold, moving a device or editing a patient decides who reads which
patient and which alerts fire, so every change lands in the audit log like a read of PHI: who (an
authenticated service account or the local operator proven by the kernel), what, and the values before and
after. A change that cannot be audited is not made (the log is checked first).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

import duckdb

from core.settings import Settings
from warehouse import registry
from warehouse.audit import AuditLog, AuditTampered, os_user
from warehouse.db import clinical, transaction
from warehouse.db import rows as fetch_rows
from warehouse.serving import publish_snapshot

PATIENT_FIELDS = ("mrn", "given_name", "family_name", "birth_date", "time_zone", "conditions")


def operator() -> str:
    """The audit actor of a change made at the command line by the account that holds the keys: the local
    operator, named by the kernel (no flag or variable can claim another name)."""
    return f"os:{os_user()}"


def _audited_log(s: Settings) -> AuditLog:
    log = AuditLog(s)
    problem = log.check()
    if problem:
        raise AuditTampered(problem)
    return log


def _patient(con: duckdb.DuckDBPyConnection, patient_id: str) -> dict | None:
    found = fetch_rows(con.execute(f"SELECT patient_id, {', '.join(PATIENT_FIELDS)} FROM patients "
                                   "WHERE patient_id = ?", [patient_id]))
    return found[0] if found else None


def _on_team(con: duckdb.DuckDBPyConnection, clinician_id: str, patient_id: str) -> bool:
    return con.execute("SELECT 1 FROM care_team WHERE clinician_id = ? AND patient_id = ? AND until IS NULL",
                       [clinician_id, patient_id]).fetchone() is not None


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def save_patient(s: Settings, actor: str, patient_id: str, **fields: Any) -> dict:
    """Create or update a patient (fields left None keep their value)."""
    unknown = set(fields) - set(PATIENT_FIELDS)
    if unknown:
        raise ValueError(f"unknown patient field(s): {', '.join(sorted(unknown))}")
    log = _audited_log(s)
    with clinical(s) as con:
        before = _patient(con, patient_id)
        with transaction(con):
            registry.upsert_patient(con, patient_id, **fields)
        after = _patient(con, patient_id)
        publish_snapshot(s, con)
    change = {"before": _jsonable(before), "after": _jsonable(after)}
    log.append(actor, "registry:patient", [patient_id], change, 1)
    return change


def set_threshold(s: Settings, actor: str, patient_id: str, rule: str, value: float) -> dict:
    """Override one alert threshold of one patient, within its clinically sensible range."""
    log = _audited_log(s)
    with clinical(s) as con:
        old = con.execute("SELECT threshold FROM alert_thresholds WHERE patient_id = ? AND rule = ?",
                          [patient_id, rule]).fetchone()
        with transaction(con):
            registry.set_threshold(con, patient_id, rule, value, actor)
        publish_snapshot(s, con)
    change = {"rule": rule, "before": None if old is None else old[0], "after": value}
    log.append(actor, "registry:threshold", [patient_id], change, 1)
    return {"patient_id": patient_id, **change}


def assign(s: Settings, actor: str, clinician_id: str, patient_id: str | None = None, *,
           name: str | None = None, role: str | None = None) -> dict:
    """Create (or rename) a clinician and/or put them on a patient's care team."""
    log = _audited_log(s)
    with clinical(s) as con:
        existed = con.execute("SELECT name, role FROM clinicians WHERE clinician_id = ?",
                              [clinician_id]).fetchone()
        before = patient_id is not None and existed is not None and _on_team(con, clinician_id, patient_id)
        with transaction(con):  # an unknown patient leaves no new clinician behind either
            registry.add_clinician(con, clinician_id, name, role)
            added = registry.assign(con, clinician_id, patient_id) if patient_id else False
        publish_snapshot(s, con)
    change: dict[str, Any] = {"clinician_id": clinician_id,
              "clinician_before": None if existed is None else {"name": existed[0], "role": existed[1]},
              "clinician_after": {"name": name if name is not None else (existed or (None,))[0],
                                  "role": role if role is not None else (existed or (None, None))[1]}}
    if patient_id:
        change.update({"on_care_team_before": before, "on_care_team_after": True})
    log.append(actor, "registry:care-team-add", [patient_id] if patient_id else [], change, 1)
    return {"clinician_id": clinician_id, "patient_id": patient_id, "added": added}


def unassign(s: Settings, actor: str, clinician_id: str, patient_id: str) -> dict:
    """Take a clinician off a patient's care team."""
    log = _audited_log(s)
    with clinical(s) as con:
        with transaction(con):
            removed = registry.unassign(con, clinician_id, patient_id)
        publish_snapshot(s, con)
    change = {"clinician_id": clinician_id, "on_care_team_before": removed, "on_care_team_after": False}
    log.append(actor, "registry:care-team-remove", [patient_id], change, 1)
    return {"clinician_id": clinician_id, "patient_id": patient_id, "removed": removed}


def _enrollment(con: duckdb.DuckDBPyConnection, device_id: str) -> dict | None:
    row = con.execute("""SELECT d.kind, e.patient_id, e.valid_from FROM devices d LEFT JOIN enrollments e
                         ON e.device_id = d.device_id AND e.valid_to IS NULL WHERE d.device_id = ?""",
                      [device_id]).fetchone()
    return None if row is None else {"kind": row[0], "patient_id": row[1],
                                     "since": row[2].isoformat() if row[2] else None}


def enroll_device(s: Settings, actor: str, device_id: str, patient_id: str, *, kind: str | None = None,
                  since: datetime | None = None, must_exist: bool = False, publish: bool = True) -> dict:
    """Assign a device to a patient (registry.enroll's rules), audited with the enrollment before and after.
    ``must_exist``: only a device already provisioned (the service cannot create broker logins);
    ``publish``: refresh the serving snapshot (a fleet being provisioned publishes once, at the end)."""
    log = _audited_log(s)
    with clinical(s) as con:
        registry.require_patient(con, patient_id)
        before = _enrollment(con, device_id)
        if must_exist and before is None:
            raise KeyError(f"unknown device {device_id}: provision it with `rpm devices add`")
        enrollment = registry.enroll(con, device_id, patient_id, kind=kind, valid_from=since)
        after = _enrollment(con, device_id)
        if publish:
            publish_snapshot(s, con)
    patients = sorted({p for p in ((before or {}).get("patient_id"), patient_id) if p})
    log.append(actor, "registry:device", patients, {"device_id": device_id, "before": before, "after": after}, 1)
    return {"enrollment": enrollment, "before": before, "after": after}


def import_patients(s: Settings, actor: str, path: str) -> dict:
    """A practice's patient list (CSV, all rows or none), audited as one change naming every patient."""
    log = _audited_log(s)
    result = registry.import_patients_csv(s, path)
    log.append(actor, "registry:patients-import", result["patient_ids"], {"rows": result["patients"]},
               result["patients"])
    return {"patients": result["patients"]}
