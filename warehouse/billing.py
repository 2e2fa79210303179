"""RPM billing eligibility for one calendar month: device-supply and treatment-management codes, with flags.

The rules live in ``sql/040_billing.sql`` (``billing_periods_for``, views ``billing_days``, ``billing_time``); this
module selects the periods and month a report covers and shapes them for the CLI. Callers pass the patients a
clinician may see (care-team scope is theirs to enforce): only those are queried, always as parameters.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb

from warehouse.exports import spreadsheet_safe, write_export

CSV_FIELDS = [
    "patient_id", "month", "period_no", "period_start", "period_end", "days_with_data", "device_code",
    "is_current", "device_codes", "management_minutes", "interactive_count", "management_codes", "codes",
    "flags", "reading_ids_count", "periods",
]


def _month_bounds(month: str) -> tuple[date, date]:
    try:
        first = datetime.strptime(month, "%Y-%m").date()
    except ValueError as exc:
        raise ValueError(f"month must be YYYY-MM, got {month!r}") from exc
    nxt = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return first, nxt


def _iso(value: date | None) -> str | None:
    return value.isoformat() if value is not None else None


def practice_month(practice_tz: str, now: datetime | None = None) -> str:
    """The calendar month (YYYY-MM) it is at ``now`` (default: the current instant) in the practice's IANA
    zone: what "this month" means to the practice billing it, whatever month it already is in UTC."""
    return (now or datetime.now(UTC)).astimezone(ZoneInfo(practice_tz)).strftime("%Y-%m")


def billing_report(con: duckdb.DuckDBPyConnection, month: str | None, patient_ids: list[str], *,
                   practice_tz: str) -> list[dict]:
    """One row per requested patient: the codes earned and the flags to act on in calendar month ``month``.

    Device periods reported are those whose period_end falls in the month, plus the current (open) period
    when ``month`` is the practice's current month; each period once. The top-level period fields describe
    the latest reported period; ``periods`` holds them all and ``device_codes`` the code of each that earned
    one. ``month`` defaults to the practice's current month.

    practice_tz: the practice's IANA zone (the ``practice_tz`` setting, ``RPM_PRACTICE_TZ``).
    """
    this_month = practice_month(practice_tz)
    month = month or this_month
    first, nxt = _month_bounds(month)
    ids = list(dict.fromkeys(patient_ids))
    if not ids:
        return []

    periods = con.execute("""
        SELECT p.patient_id, p.period_no, p.period_start, p.period_end, p.days_with_data, p.device_code,
               p.is_current, p.days_left, p.days_needed_99454, p.at_risk_99454, p.readings
        FROM billing_periods_for($ids) p
        WHERE ((p.period_end >= $first AND p.period_end < $next) OR (p.is_current AND $include_current))
        ORDER BY p.patient_id, p.period_no""",
        {"ids": ids, "first": first, "next": nxt, "include_current": month == this_month}).fetchall()
    time = con.execute("""
        SELECT patient_id, minutes, interactive_count, codes, needs_interactive_communication, minutes_to_99457
        FROM billing_time
        WHERE list_contains($ids, patient_id) AND month = $first""", {"ids": ids, "first": first}).fetchall()

    by_patient: dict[str, list[dict[str, Any]]] = {pid: [] for pid in ids}
    for (pid, no, start, end, days, code, current, left, needed, at_risk, n_readings) in periods:
        by_patient[pid].append({
            "period_no": no, "period_start": _iso(start), "period_end": _iso(end), "days_with_data": days,
            "device_code": code, "is_current": current, "days_left": left, "days_needed_99454": needed,
            "at_risk_99454": at_risk, "reading_ids_count": n_readings,
        })
    time_by_patient = {row[0]: row[1:] for row in time}

    report = []
    for pid in ids:
        reported = by_patient[pid]
        latest = reported[-1] if reported else {}
        minutes, interactive, mgmt_codes, needs_interactive, to_99457 = time_by_patient.get(
            pid, (0, 0, [], False, None))
        flags = [f"at_risk_99454: needs {p['days_needed_99454']} more days in {p['days_left']} days left"
                 for p in reported if p["at_risk_99454"]]
        if to_99457 is not None:
            flags.append(f"near_99457: {to_99457} more minutes")
        if needs_interactive:
            flags.append("needs_interactive_communication")
        device_codes = [p["device_code"] for p in reported if p["device_code"]]
        report.append({
            "patient_id": pid,
            "month": month,
            "period_no": latest.get("period_no"),
            "period_start": latest.get("period_start"),
            "period_end": latest.get("period_end"),
            "days_with_data": latest.get("days_with_data", 0),
            "device_code": latest.get("device_code"),
            "is_current": latest.get("is_current", False),
            "device_codes": device_codes,
            "management_minutes": minutes,
            "interactive_count": interactive,
            "management_codes": list(mgmt_codes),
            "codes": device_codes + list(mgmt_codes),
            "flags": flags,
            "reading_ids_count": sum(p["reading_ids_count"] for p in reported),
            "periods": reported,
        })
    return report


def billing_evidence(con: duckdb.DuckDBPyConnection, patient_id: str, period_no: int) -> list[dict]:
    """The counted days of one device-supply period, each with the reading ids behind it."""
    rows = con.execute("""
        SELECT patient_id, period_no, period_start, period_end, local_date, reading_ids, readings
        FROM billing_days WHERE patient_id = ? AND period_no = ? ORDER BY local_date""",
        [patient_id, period_no]).fetchall()
    return [{"patient_id": pid, "period_no": no, "period_start": _iso(start), "period_end": _iso(end),
             "local_date": _iso(day), "reading_ids": list(reading_ids), "readings": n}
            for pid, no, start, end, day, reading_ids, n in rows]


def _csv_value(key: str, value: Any) -> Any:
    if key == "flags":
        return " | ".join(value)
    if key == "periods":
        return ";".join(f"{p['period_no']}:{p['period_start']}..{p['period_end']}:{p['days_with_data']}d:"
                        f"{p['device_code'] or '-'}" for p in value)
    if isinstance(value, list):
        return ";".join(value)
    return "" if value is None else value


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """Write a billing report as CSV, one row per patient: codes joined with ';', flags with ' | '. It names
    patients: a new file only its owner reads (warehouse/exports.py)."""
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: spreadsheet_safe(_csv_value(key, row.get(key))) for key in CSV_FIELDS})
    return write_export(path, out.getvalue().encode())
