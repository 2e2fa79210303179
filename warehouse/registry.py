"""Device and enrollment registry: which patient a device's readings belong to, and since when."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb


@dataclass(frozen=True)
class Enrollment:
    device_id: str
    patient_id: str
    valid_from: datetime
    changed: bool  # False when the device was already enrolled to this patient


def enroll(con: duckdb.DuckDBPyConnection, device_id: str, patient_id: str, *, kind: str | None = None,
           valid_from: datetime | None = None) -> Enrollment:
    """Enrol ``device_id`` to ``patient_id`` from ``valid_from`` (default now).

    Re-enrolling to the same patient changes nothing. Enrolling to another patient closes the current
    enrollment at ``valid_from``: readings measured before stay with the previous patient.
    """
    start = (valid_from or datetime.now(UTC)).astimezone(UTC)
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("INSERT INTO patients (patient_id) VALUES (?) ON CONFLICT DO NOTHING", [patient_id])
        con.execute("INSERT INTO devices (device_id, kind) VALUES (?, ?) ON CONFLICT DO UPDATE SET "
                    "kind = coalesce(excluded.kind, devices.kind)", [device_id, kind])
        current = con.execute(
            "SELECT patient_id, valid_from FROM enrollments WHERE device_id = ? AND valid_to IS NULL",
            [device_id]).fetchone()
        if current and current[0] == patient_id:
            con.execute("COMMIT")
            return Enrollment(device_id, patient_id, current[1], changed=False)
        if current:
            con.execute("UPDATE enrollments SET valid_to = ? WHERE device_id = ? AND valid_to IS NULL",
                        [start, device_id])
        con.execute("INSERT INTO enrollments VALUES (?, ?, ?, NULL)", [device_id, patient_id, start])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return Enrollment(device_id, patient_id, start, changed=True)


def list_devices(con: duckdb.DuckDBPyConnection) -> list[dict]:
    rows = con.execute("""
        SELECT d.device_id, d.kind, e.patient_id, e.valid_from
        FROM devices d LEFT JOIN enrollments e ON e.device_id = d.device_id AND e.valid_to IS NULL
        ORDER BY d.device_id""").fetchall()
    return [dict(device_id=r[0], kind=r[1], patient_id=r[2], enrolled_since=r[3]) for r in rows]
