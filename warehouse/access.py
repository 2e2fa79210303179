"""Clinician access: care-team scope enforced on every query, and every PHI read audited.

Reads come from the published serving snapshot (readers never block the pipeline). A request for a patient
outside the clinician's care team is refused — and the refusal is audited too. Writes a clinician makes
(acknowledging an alert, logging time) go to the warehouse and publish a fresh snapshot.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import duckdb

from core.settings import Settings
from transforms.vocab import CGM_LOINC
from warehouse import alerts as alerts_mod
from warehouse.audit import AuditLog
from warehouse.db import clinical
from warehouse.db import rows as _rows
from warehouse.registry import care_team_patients
from warehouse.serving import publish_snapshot, serving


class AccessDenied(PermissionError):
    pass


ALERT_STATUSES = ("open", "resolved", "all")
# How far back a clinician may date logged time: this month and the one before (a call on the 31st logged
# on the 1st still counts where it happened); never into the future.
BACKDATE_MONTHS = 1
NOTE_MAX = 1000  # characters of a clinician's note (the service's forms and API allow as many)
# The panel compares CGM time in ranges over the last 14 days with the 14 before (the consensus window).
PANEL_GLUCOSE_DAYS = 14
VIEW_GLUCOSE_DAYS = 14  # the patient view's CGM summary: the consensus minimum of 14 days
# The alert rules whose thresholds are levels of each vital (shaded on its chart). Weight rules are gains and
# NEWS2 scores several vitals together: neither is a level of one vital.
VITAL_RULES: dict[str, tuple[str, ...]] = {
    "blood_pressure": ("bp_stage2", "bp_severe"),
    "blood_glucose": ("glucose_level2_low", "glucose_level1_low", "glucose_level2_high"),
    "spo2": ("spo2_urgent", "spo2_low"),
    "heart_rate": ("hr_low", "hr_high"),
    "body_temperature": ("fever",),
    "respiratory_rate": (),
    "body_weight": (),
}


# The care team's patients from the per-patient-day rollup (patient_days): the last reading and the readings
# of the last 30 days without reading their readings. The window starts at an instant inside a day, so a day
# that straddles it counts its readings' own instants (at_us); days wholly after it count whole. Fetching
# at_us for every day of the team read ~49M instants at 50M readings (490 ms of a 396 ms p95 panel,
# BENCHMARKS.md §4): a vector of rows whose list column is touched at all is read whole. So the days are
# picked from the small columns first, and at_us is read only for the straddling ones, joined back by rowid
# (the join's bloom filter reaches the scan: ~100 rows of 2M). The team joins `patients` rather than
# unnesting $1 for the same reason: a table on the build side lets the scan of patient_days skip the other
# patients' rows. Open alerts are counted once for the team and joined, not by a subquery per patient (its
# delim join cost ~2 of the query's ~28 ms of CPU at 50M readings, measured side by side).
PATIENTS_SQL = """
WITH days AS MATERIALIZED (
    SELECT d.rowid AS day_row, d.patient_id, d.first_at, d.last_at, d.readings
    FROM patients s JOIN patient_days d ON d.patient_id = s.patient_id
    WHERE list_contains($1, s.patient_id)
), straddling AS (
    SELECT d.patient_id, len(list_filter(pd.at_us, x -> x >= epoch_us(now() - INTERVAL 30 DAY))) AS in_window
    FROM patient_days pd JOIN days d ON pd.rowid = d.day_row
    WHERE d.first_at < now() - INTERVAL 30 DAY AND d.last_at >= now() - INTERVAL 30 DAY
), per_patient AS (
    SELECT patient_id, max(last_at) AS last_reading_at,
           CAST(sum(readings) FILTER (first_at >= now() - INTERVAL 30 DAY) AS BIGINT) AS whole_days
    FROM days GROUP BY patient_id
), partial_days AS (
    SELECT patient_id, CAST(sum(in_window) AS BIGINT) AS in_window FROM straddling GROUP BY patient_id
), open_alerts AS (
    SELECT patient_id, count(*) AS open_alerts FROM alerts
    WHERE resolved_at IS NULL AND list_contains($1, patient_id) GROUP BY patient_id
)
SELECT p.patient_id, p.mrn, p.given_name, p.family_name, p.birth_date, p.time_zone, p.conditions,
       d.last_reading_at, coalesce(d.whole_days, 0) + coalesce(w.in_window, 0) AS readings_30d,
       coalesce(a.open_alerts, 0) AS open_alerts
FROM patients p LEFT JOIN per_patient d USING (patient_id) LEFT JOIN partial_days w USING (patient_id)
     LEFT JOIN open_alerts a USING (patient_id)
WHERE list_contains($1, p.patient_id)
ORDER BY p.patient_id"""


class ClinicianSession:
    """One clinician's reads and writes. ``via`` names the door they came through ("api", "web", "cli"):
    it is recorded with every audit record, beside the authenticated actor."""

    def __init__(self, s: Settings, clinician_id: str, via: str = "cli"):
        self.s = s
        self.clinician_id = clinician_id
        self.via = via
        self.audit = _Audit(AuditLog(s), via)

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
            rows = _rows(con.execute(PATIENTS_SQL, [scope]))
        self.audit.append(self.clinician_id, "patients", [r["patient_id"] for r in rows], query, len(rows))
        return rows

    def patient(self, patient_id: str, days: int = 30) -> dict:
        query = {"view": "patient", "patient_id": patient_id, "days": days}
        glucose_since = datetime.now(UTC) - timedelta(days=VIEW_GLUCOSE_DAYS)  # at or before the window's start
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
            # Most patients wear no CGM: their latest glucose (if any) says the 14-day window is empty, and
            # the scan of their readings that would say so is skipped.
            glucose = _glucose(con, patient_id, VIEW_GLUCOSE_DAYS) if any(
                r["metric"] == "blood_glucose" and r["measured_at"] > glucose_since for r in latest) else None
        out = {"patient": demo[0] if demo else {"patient_id": patient_id}, "latest": latest, "daily": daily,
               "trends": trends, "alerts": open_alerts, "glucose": glucose}
        rows = len(latest) + len(daily) + len(trends) + len(open_alerts) + (1 if glucose else 0)
        self.audit.append(self.clinician_id, "patient", [patient_id], query, rows)
        return out

    def alerts(self, status: str = "open", patient_id: str | None = None) -> list[dict]:
        """Alerts of the care team (or of one patient): open ones most severe first; resolved ones newest
        first, each with why it resolved."""
        if status not in ALERT_STATUSES:
            raise ValueError(f"status must be one of {', '.join(ALERT_STATUSES)}, not {status!r}")
        query = {"view": "alerts", "status": status, **({"patient_id": patient_id} if patient_id else {})}
        with serving(self.s) as con:
            if patient_id is not None:
                self._require(con, patient_id, "alerts", query)
                scope = [patient_id]
            else:
                scope = self._scope(con, "alerts", query)
            rows = alerts_mod.open_alerts(con, scope) if status == "open" else _alerts(con, scope, status)
        self.audit.append(self.clinician_id, "alerts", sorted({r["patient_id"] for r in rows}), query, len(rows))
        return rows

    def billing_evidence(self, patient_id: str, month: str | None) -> dict:
        """The counted days behind a patient's device-supply periods reported for ``month``, each with the
        readings (time, metric, value, device) that made it count."""
        from warehouse.billing import billing_evidence, billing_report

        query = {"view": "billing-evidence", "patient_id": patient_id, "month": month}
        with serving(self.s) as con:
            self._require(con, patient_id, "billing-evidence", query)
            report = billing_report(con, month, [patient_id], practice_tz=self.s.practice_tz)[0]
            periods = []
            for period in report["periods"]:
                days = billing_evidence(con, patient_id, period["period_no"])
                ids = [rid for d in days for rid in d["reading_ids"]]
                readings = {r["reading_id"]: r for r in _rows(con.execute("""
                    SELECT reading_id, measured_at, metric, value, diastolic, unit, device_id FROM readings
                    WHERE list_contains(?, reading_id) ORDER BY measured_at""", [ids]))} if ids else {}
                for d in days:
                    d["readings_count"] = d["readings"]
                    d["readings"] = [readings[rid] for rid in d.pop("reading_ids") if rid in readings]
                periods.append({**period, "days": days})
        out = {"patient_id": patient_id, "month": report["month"], "device_codes": report["device_codes"],
               "periods": periods, "management_minutes": report["management_minutes"],
               "interactive_count": report["interactive_count"],
               "management_codes": report["management_codes"], "flags": report["flags"]}
        self.audit.append(self.clinician_id, "billing-evidence", [patient_id], query,
                          sum(len(d["readings"]) for p in periods for d in p["days"]))
        return out

    def billing(self, month: str | None) -> list[dict]:
        from warehouse.billing import billing_report

        query = {"view": "billing", "month": month}
        with serving(self.s) as con:
            scope = self._scope(con, "billing", query)
            rows = billing_report(con, month, scope, practice_tz=self.s.practice_tz)
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

    def panel(self, month: str | None = None) -> list[dict]:
        """The care team's patients with what triage weighs (the dashboard's panel): open alerts, the last
        reading, CGM time in ranges over the last 14 days and the 14 before, and billing progress in
        ``month`` (default: the practice's current month) — one read, one audit record."""
        from warehouse.billing import billing_report

        query = {"view": "panel", "month": month}
        now = datetime.now(UTC)
        with serving(self.s) as con:
            scope = self._scope(con, "panel", query)
            rows = _rows(con.execute("""
                SELECT p.patient_id, p.mrn, p.given_name, p.family_name, p.birth_date, p.time_zone, p.conditions,
                       (SELECT max(last_at) FROM patient_days d WHERE d.patient_id = p.patient_id)
                           AS last_reading_at
                FROM patients p WHERE list_contains(?, p.patient_id) ORDER BY p.patient_id""", [scope]))
            open_by_patient: dict[str, list[dict]] = {}
            for alert in alerts_mod.open_alerts(con, scope):
                open_by_patient.setdefault(alert["patient_id"], []).append(alert)
            # CGM wearers of the last 28 days: the two 14-day windows compared (Tidepool's TIDE compares
            # time in range with the previous period).
            cgm = {pid for (pid,) in con.execute("""
                SELECT DISTINCT patient_id FROM readings
                WHERE list_contains(?, patient_id) AND metric = 'blood_glucose'
                  AND (source = 'cgm' OR loinc = ?) AND measured_at > ?""",
                [scope, CGM_LOINC, now - timedelta(days=2 * PANEL_GLUCOSE_DAYS)]).fetchall()}
            billing = {r["patient_id"]: r for r in billing_report(con, month, scope,
                                                                  practice_tz=self.s.practice_tz)}
            for row in rows:
                pid = row["patient_id"]
                row["alerts"] = open_by_patient.get(pid, [])
                row["glucose"] = row["glucose_before"] = None
                if pid in cgm:
                    row["glucose"] = _glucose(con, pid, PANEL_GLUCOSE_DAYS, now)
                    row["glucose_before"] = _glucose(con, pid, PANEL_GLUCOSE_DAYS,
                                                     now - timedelta(days=PANEL_GLUCOSE_DAYS))
                row["billing"] = billing.get(pid)
        self.audit.append(self.clinician_id, "panel", [r["patient_id"] for r in rows], query, len(rows))
        return rows

    def vital_series(self, patient_id: str, metric: str, days: int = 30) -> dict:
        """One vital's readings over the last ``days`` (patient-local time) with the thresholds of the alert
        rules on it as they apply to this patient (its overrides, else the defaults) — a chart's data."""
        if metric not in VITAL_RULES:
            raise KeyError(f"no chart for {metric!r}")
        query = {"view": "chart", "patient_id": patient_id, "metric": metric, "days": days}
        with serving(self.s) as con:
            self._require(con, patient_id, "chart", query)
            readings = _rows(con.execute("""
                WITH w AS (SELECT patient_id, measured_at, utc_offset_min, value, diastolic, unit,
                                  coalesce(source, CASE WHEN loinc = $cgm THEN 'cgm' END) AS source
                           FROM readings WHERE patient_id = $patient AND metric = $metric
                             AND measured_at > $since)
                SELECT measured_at, measured_local, value, diastolic, unit, source FROM with_local_time('w')
                ORDER BY measured_at""", {"cgm": CGM_LOINC, "patient": patient_id, "metric": metric,
                                          "since": datetime.now(UTC) - timedelta(days=days)}))
            (zone,) = con.execute("SELECT time_zone FROM patients WHERE patient_id = ?", [patient_id]).fetchone() \
                or (None,)
            thresholds = _thresholds(con, patient_id, metric)
        self.audit.append(self.clinician_id, "chart", [patient_id], query, len(readings))
        return {"patient_id": patient_id, "metric": metric, "days": days, "time_zone": zone, "readings": readings,
                "thresholds": thresholds}

    def glucose_profile(self, patient_id: str, days: int = 14) -> dict:
        """The ambulatory glucose profile of the last ``days`` of CGM data: the 5th, 25th, 50th, 75th and
        95th percentiles of each patient-local hour of the day, and the consensus time in ranges."""
        query = {"view": "chart", "patient_id": patient_id, "metric": "glucose-profile", "days": days}
        end = datetime.now(UTC)
        with serving(self.s) as con:
            self._require(con, patient_id, "chart", query)
            hours = _rows(con.execute("""
                WITH w AS (SELECT patient_id, measured_at, utc_offset_min, value FROM readings
                           WHERE patient_id = $patient AND metric = 'blood_glucose'
                             AND (source = 'cgm' OR loinc = $cgm) AND measured_at > $since
                             AND measured_at <= $end)
                SELECT hour(measured_local) AS hour, count(*) AS readings,
                       quantile_cont(value, [0.05, 0.25, 0.5, 0.75, 0.95]) AS percentiles
                FROM with_local_time('w') GROUP BY ALL ORDER BY hour""",
                {"patient": patient_id, "cgm": CGM_LOINC, "since": end - timedelta(days=days), "end": end}))
            summary = _glucose(con, patient_id, days, end)
            thresholds = _thresholds(con, patient_id, "blood_glucose")
        self.audit.append(self.clinician_id, "chart", [patient_id], query, sum(h["readings"] for h in hours))
        return {"patient_id": patient_id, "days": days, "hours": hours, "summary": summary,
                "thresholds": thresholds}

    # --- writes --------------------------------------------------------------------------------------
    def acknowledge(self, alert_id: str, note: str | None = None) -> dict:
        """Acknowledge an alert. Every acknowledgement is kept (a second clinician's adds to the first's), and
        its audit record holds the note and the acknowledgement the alert showed before."""
        _check_note(note)
        query = {"action": "ack", "alert_id": alert_id}
        with clinical(self.s) as con:
            patient_id = alerts_mod.alert_patient(con, alert_id)
            if patient_id is None:
                raise KeyError(f"no alert {alert_id}")
            self._require(con, patient_id, "ack", query)
            shown = con.execute("SELECT acknowledged_by, acknowledged_at, ack_note FROM alerts WHERE alert_id = ?",
                                [alert_id]).fetchone()
            result = alerts_mod.acknowledge(con, alert_id, self.clinician_id, note)
            publish_snapshot(self.s, con)
        before = None if shown is None or shown[0] is None else {
            "acknowledged_by": shown[0], "acknowledged_at": shown[1].isoformat() if shown[1] else None,
            "ack_note": shown[2]}
        self.audit.append(self.clinician_id, "ack", [patient_id], {**query, "note": note, "before": before}, 1)
        return result  # type: ignore[return-value]

    def log_time(self, patient_id: str, minutes: int, interactive: bool, note: str | None = None,
                 occurred_at: datetime | None = None, on: date | None = None) -> dict:
        """Log treatment-management minutes; ``on`` back-dates them to a day of this month or the previous
        one (the practice's calendar), never into the future."""
        if not 0 < minutes <= 24 * 60:
            raise ValueError("minutes must be between 1 and 1440 (one entry covers at most a day)")
        _check_note(note)
        if on is not None:
            occurred_at = _backdated(on, self.s)
        query = {"action": "log-time", "patient_id": patient_id, "minutes": minutes, "interactive": interactive,
                 **({"date": on.isoformat()} if on else {})}
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
                "interactive": interactive,
                "occurred_at": (occurred_at or datetime.now(UTC)).isoformat(timespec="seconds")}


class _Audit:
    """The audit log with the door each record came through added to its query."""

    def __init__(self, log: AuditLog, via: str):
        self.log, self.via = log, via

    def append(self, actor: str, action: str, patient_ids: list[str], query: dict, rows: int,
               outcome: str = "ok") -> dict:
        return self.log.append(actor, action, patient_ids, {**query, "via": self.via}, rows, outcome=outcome)

    def check(self) -> str | None:
        return self.log.check()


def _alerts(con: duckdb.DuckDBPyConnection, patient_ids: list[str], status: str) -> list[dict]:
    where = "resolved_at IS NOT NULL AND " if status == "resolved" else ""
    return _rows(con.execute(f"""
        SELECT alert_id, patient_id, rule, severity, description, opened_at, last_breach_at, last_observed,
               breaches, acknowledged_by, acknowledged_at, ack_note, resolved_at, resolution, opened_rule,
               escalated_at
        FROM alerts WHERE {where}list_contains(?, patient_id)
        ORDER BY resolved_at IS NOT NULL, coalesce(resolved_at, opened_at) DESC, severity, patient_id, rule
        LIMIT 1000""", [patient_ids]))


def _check_note(note: str | None) -> None:
    if note is not None and not note.isprintable():
        raise ValueError("a note may not contain control characters")
    if note is not None and len(note) > NOTE_MAX:
        raise ValueError(f"a note may hold at most {NOTE_MAX} characters")


def _practice_tz(s: Settings) -> ZoneInfo:
    return ZoneInfo(getattr(s, "practice_tz", "") or "UTC")


def _backdated(on: date, s: Settings) -> datetime:
    """Noon of ``on`` in the practice's zone, if ``on`` lies in this month or the previous one."""
    tz = _practice_tz(s)
    today = datetime.now(tz).date()
    first_allowed = date(today.year - (today.month == 1), (today.month - 2) % 12 + 1, 1)
    if on > today:
        raise ValueError(f"time cannot be logged on a future day ({on.isoformat()})")
    if on < first_allowed:
        raise ValueError(f"time can be back-dated to this month or the previous one (from "
                         f"{first_allowed.isoformat()}), not to {on.isoformat()}")
    return datetime.combine(on, time(12, 0), tz)


def _thresholds(con: duckdb.DuckDBPyConnection, patient_id: str, metric: str) -> dict[str, float]:
    """The thresholds of the rules on one vital as they apply to this patient: ``rule.param`` -> value."""
    return {f"{rule}.{param}": value for rule, param, value in con.execute("""
        SELECT rule, param, value FROM patient_alert_params WHERE patient_id = ? AND list_contains(?, rule)""",
        [patient_id, list(VITAL_RULES[metric])]).fetchall()}


def _glucose(con: duckdb.DuckDBPyConnection, patient_id: str, days: int = VIEW_GLUCOSE_DAYS,
             end: datetime | None = None) -> Any:
    from warehouse.glucose import glucose_summary

    return glucose_summary(con, patient_id, days, end)
