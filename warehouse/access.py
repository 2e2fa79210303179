"""Clinician access: care-team scope enforced on every query, and every PHI read audited.

Reads come from the published serving snapshot (readers never block the pipeline). A request for a patient
outside the clinician's care team is refused — and the refusal is audited too. Writes a clinician makes
(acknowledging an alert, logging time) go to the warehouse and publish a fresh snapshot.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import duckdb

from core.settings import Settings
from warehouse import alerts as alerts_mod
from warehouse.audit import AuditLog
from warehouse.db import clinical
from warehouse.db import rows as _rows
from warehouse.registry import care_team_patients
from warehouse.serving import publish_snapshot, serving


class AccessDenied(PermissionError):
    pass


class ClinicianSession:
    def __init__(self, s: Settings, clinician_id: str):
        self.s = s
        self.clinician_id = clinician_id
        self.audit = AuditLog(s)

    # --- scope ---------------------------------------------------------------------------------------
    def _scope(self, con: duckdb.DuckDBPyConnection, action: str, query: dict) -> list[str]:
        patients = care_team_patients(con, self.clinician_id)
        if patients is None:
            self.audit.append(self.clinician_id, action, [], query, 0, outcome="denied: unknown clinician")
            raise AccessDenied(f"unknown clinician {self.clinician_id!r}")
        return patients

    def _require(self, con: duckdb.DuckDBPyConnection, patient_id: str, action: str, query: dict) -> None:
        if patient_id not in self._scope(con, action, query):
            self.audit.append(self.clinician_id, action, [patient_id], query, 0,
                              outcome="denied: not on care team")
            raise AccessDenied(f"clinician {self.clinician_id} is not on the care team of patient {patient_id}: "
                               "access refused (and recorded)")

    # --- reads ---------------------------------------------------------------------------------------
    def patients(self) -> list[dict]:
        """The care team's patients with their latest activity and open alerts."""
        query = {"view": "patients"}
        with serving(self.s) as con:
            scope = self._scope(con, "patients", query)
            rows = _rows(con.execute("""
                SELECT p.patient_id, p.mrn, p.given_name, p.family_name, p.birth_date, p.time_zone,
                       p.conditions, max(r.measured_at) AS last_reading_at,
                       count(DISTINCT r.reading_id) FILTER (r.measured_at >= now() - INTERVAL 30 DAY)
                           AS readings_30d,
                       (SELECT count(*) FROM alerts a WHERE a.patient_id = p.patient_id
                          AND a.resolved_at IS NULL) AS open_alerts
                FROM patients p LEFT JOIN readings r USING (patient_id)
                WHERE list_contains(?, p.patient_id)
                GROUP BY ALL ORDER BY p.patient_id""", [scope]))
        self.audit.append(self.clinician_id, "patients", [r["patient_id"] for r in rows], query, len(rows))
        return rows

    def patient(self, patient_id: str, days: int = 30) -> dict:
        query = {"view": "patient", "patient_id": patient_id, "days": days}
        with serving(self.s) as con:
            self._require(con, patient_id, "patient", query)
            demo = _rows(con.execute("""SELECT patient_id, mrn, given_name, family_name, birth_date, time_zone,
                                               conditions FROM patients WHERE patient_id = ?""", [patient_id]))
            latest = _rows(con.execute("""SELECT metric, value, diastolic, unit, measured_at, measured_local,
                                                 device_id FROM mart_latest_vitals WHERE patient_id = ?
                                          ORDER BY metric""", [patient_id]))
            daily = _rows(con.execute("""SELECT local_date, metric, readings, min_value, mean_value, max_value,
                                                mean_diastolic, unit FROM mart_daily_vitals
                                         WHERE patient_id = ? AND local_date >= current_date - ?::INTEGER
                                         ORDER BY local_date DESC, metric""", [patient_id, days]))
            trends = _rows(con.execute("SELECT * EXCLUDE (patient_id) FROM mart_trends WHERE patient_id = ? "
                                       "ORDER BY metric", [patient_id]))
            open_alerts = alerts_mod.open_alerts(con, [patient_id])
            glucose = _glucose(con, patient_id)
        out = {"patient": demo[0] if demo else {"patient_id": patient_id}, "latest": latest, "daily": daily,
               "trends": trends, "alerts": open_alerts, "glucose": glucose}
        rows = len(latest) + len(daily) + len(trends) + len(open_alerts) + (1 if glucose else 0)
        self.audit.append(self.clinician_id, "patient", [patient_id], query, rows)
        return out

    def alerts(self) -> list[dict]:
        query = {"view": "alerts"}
        with serving(self.s) as con:
            scope = self._scope(con, "alerts", query)
            rows = alerts_mod.open_alerts(con, scope)
        self.audit.append(self.clinician_id, "alerts", sorted({r["patient_id"] for r in rows}), query, len(rows))
        return rows

    def billing(self, month: str | None) -> list[dict]:
        from warehouse.billing import billing_report

        query = {"view": "billing", "month": month}
        with serving(self.s) as con:
            scope = self._scope(con, "billing", query)
            rows = billing_report(con, month, scope)
        self.audit.append(self.clinician_id, "billing", [r["patient_id"] for r in rows], query, len(rows))
        return rows

    def export_fhir(self, patient_id: str, days: int | None = None) -> dict:
        from warehouse.fhir import export_bundle

        query = {"view": "export-fhir", "patient_id": patient_id, "days": days}
        with serving(self.s) as con:
            self._require(con, patient_id, "export-fhir", query)
            bundle = export_bundle(con, patient_id, days)
        self.audit.append(self.clinician_id, "export-fhir", [patient_id], query, len(bundle.get("entry", [])))
        return bundle

    # --- writes --------------------------------------------------------------------------------------
    def acknowledge(self, alert_id: str, note: str | None = None) -> dict:
        query = {"action": "ack", "alert_id": alert_id}
        with clinical(self.s) as con:
            patient_id = alerts_mod.alert_patient(con, alert_id)
            if patient_id is None:
                raise KeyError(f"no alert {alert_id}")
            self._require(con, patient_id, "ack", query)
            result = alerts_mod.acknowledge(con, alert_id, self.clinician_id, note)
            publish_snapshot(self.s, con)
        self.audit.append(self.clinician_id, "ack", [patient_id], query, 1)
        return result  # type: ignore[return-value]

    def log_time(self, patient_id: str, minutes: int, interactive: bool, note: str | None = None,
                 occurred_at: datetime | None = None) -> dict:
        if minutes <= 0:
            raise ValueError("minutes must be positive")
        query = {"action": "log-time", "patient_id": patient_id, "minutes": minutes, "interactive": interactive}
        with clinical(self.s) as con:
            self._require(con, patient_id, "log-time", query)
            row = con.execute("""INSERT INTO interactions (patient_id, clinician_id, minutes, interactive,
                                                          occurred_at, note)
                                 VALUES (?, ?, ?, ?, ?, ?) RETURNING interaction_id""",
                              [patient_id, self.clinician_id, minutes, interactive,
                               occurred_at or datetime.now(UTC), note]).fetchone()
            publish_snapshot(self.s, con)
        self.audit.append(self.clinician_id, "log-time", [patient_id], query, 1)
        return {"interaction_id": str(row[0]), "patient_id": patient_id, "minutes": minutes,  # type: ignore[index]
                "interactive": interactive}


def _glucose(con: duckdb.DuckDBPyConnection, patient_id: str) -> Any:
    from warehouse.glucose import glucose_summary

    return glucose_summary(con, patient_id)
