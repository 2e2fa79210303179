"""The demo's clinician summary: latest vitals per monitored patient (from mart_latest_vitals)."""

from __future__ import annotations

from core.settings import Settings
from rpmctl.views.table import table

COLUMNS = [("blood_pressure", "BP mm[Hg]"), ("heart_rate", "HR /min"), ("spo2", "SpO2 %"),
           ("respiratory_rate", "RR /min"), ("body_temperature", "Temp Cel"), ("body_weight", "Wt kg"),
           ("blood_glucose", "Glu mg/dL")]


def latest_vitals(s: Settings) -> list[dict]:
    """Latest vitals of every patient — a PHI read, so it is audited like a clinician's."""
    from warehouse.admin import operator
    from warehouse.audit import AuditLog
    from warehouse.serving import serving

    with serving(s) as con:
        rows = con.execute("""
            SELECT patient_id, metric, value, diastolic, measured_local, readings_total
            FROM mart_latest_vitals ORDER BY patient_id, metric""").fetchall()
        days = dict(con.execute("""
            SELECT patient_id, count(DISTINCT local_date) FROM stg_readings GROUP BY patient_id""").fetchall())
    out: dict[str, dict] = {}
    for pid, metric, value, dia, local, total in rows:
        p = out.setdefault(pid, {"patient_id": pid, "days_with_readings": days.get(pid, 0), "readings": 0,
                                 "last_local": None, "latest": {}})
        p["latest"][metric] = f"{value:.0f}/{dia:.0f}" if metric == "blood_pressure" else f"{value:.1f}"
        p["readings"] += total
        p["last_local"] = max(filter(None, [p["last_local"], local]))
    AuditLog(s).append(operator(), "summary", sorted(out), {"view": "latest vitals, all patients"}, len(rows))
    return list(out.values())


def render(patients: list[dict]) -> str:
    header = ["patient", "days", "readings", *(label for _, label in COLUMNS), "last reading (local)"]
    return table(header, ([p["patient_id"], p["days_with_readings"], p["readings"],
                           *(p["latest"].get(m) for m, _ in COLUMNS),
                           p["last_local"].strftime("%Y-%m-%d %H:%M") if p["last_local"] else None]
                          for p in patients), empty="no patients")
