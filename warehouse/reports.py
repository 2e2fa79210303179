"""Telehealth reports from the pseudonymised store: education, appointments, devices, adherence, pipeline.

The questions are answered by the ``mart_…`` views in ``telehealth_sql/``; this module picks a view, orders
it, and — for anything that leaves the practice (``publish=True``) — applies small-cell suppression and drops
every pseudonymous key. Without ``publish`` the practice sees its own raw counts.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from core.settings import Settings
from warehouse.db import rows as fetch_rows
from warehouse.exports import write_export
from warehouse.telehealth import open_telehealth

# CMS cell-size suppression policy: no cell counting fewer than 11 people (or events about them) is published,
# nor any figure from which such a cell could be computed.
SUPPRESS_BELOW = 11
SUPPRESSED = "<11"


@dataclass(frozen=True)
class Spec:
    """One report: its view, its order, and which columns suppression applies to."""

    view: str
    order_by: str
    counts: tuple[str, ...] = ()  # people, devices or appointments: shown as "<11" when small
    rates: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # rate -> the counts it is computed from
    stats: dict[str, str] = field(default_factory=dict)  # minutes/hours statistic -> the people it summarises
    limit: int | None = None


_APPOINTMENT_COUNTS = ("appointments", "scheduled", "attended", "no_show", "cancelled")
_APPOINTMENT_RATES = {"completion_rate": ("attended", "no_show"), "no_show_rate": ("attended", "no_show")}
_MODALITY_ORDER = ("CASE modality WHEN 'video' THEN 0 WHEN 'phone' THEN 1 WHEN 'in_person' THEN 2 "
                   "WHEN 'all' THEN 9 ELSE 5 END, modality")

REPORTS: dict[str, Spec] = {
    "education": Spec(
        "mart_education_weekly", "week, module",
        counts=("people_viewed", "people_completed", "people_engaged"),
        rates={"completion_rate": ("people_completed", "people_engaged")},
        stats={"total_minutes": "people_engaged", "median_minutes_per_person": "people_engaged"}),
    "appointments": Spec("mart_appointments_by_modality", _MODALITY_ORDER, counts=_APPOINTMENT_COUNTS,
                         rates=_APPOINTMENT_RATES),
    "appointments_weekly": Spec("mart_appointments_weekly", f"week, {_MODALITY_ORDER}",
                                counts=_APPOINTMENT_COUNTS, rates=_APPOINTMENT_RATES),
    # One row per device; its gap counts are events of that device, not counts of people.
    "connectivity": Spec("mart_device_connectivity",
                         "last_seen_at NULLS FIRST, device_kind, device_key"),
    "firmware": Spec("mart_firmware_spread", "device_kind, devices DESC, firmware NULLS LAST",
                     counts=("devices",)),
    "adherence": Spec(
        "mart_adherence", "window_end",
        counts=("enrolled_people", "adherent_people", "people_with_first_reading"),
        rates={"adherence_share": ("adherent_people", "enrolled_people")},
        stats={"median_hours_to_first_reading": "people_with_first_reading",
               "p90_hours_to_first_reading": "people_with_first_reading"}),
    "pipeline": Spec("mart_pipeline_health", "recency", limit=20),
}


def report(s: Settings, name: str, publish: bool = False) -> list[dict]:
    """Rows of report ``name`` from the telehealth store.

    publish: for release outside the practice — counts below ``SUPPRESS_BELOW`` become ``"<11"``, rates and
    statistics computed from them become None, and no ``*_key`` column is returned.
    """
    spec = REPORTS.get(name)
    if spec is None:
        raise ValueError(f"unknown report {name!r}; one of: {', '.join(REPORTS)}")
    con = open_telehealth(s)
    try:
        con.execute("SET TimeZone = 'UTC'")  # instants come back in UTC; 30-day windows are 720 h
        limit = f" LIMIT {int(spec.limit)}" if spec.limit else ""
        rows = fetch_rows(con.execute(f"SELECT * FROM {spec.view} ORDER BY {spec.order_by}{limit}"))
    finally:
        con.close()
    return [suppress(spec, row) for row in rows] if publish else rows


def suppress(spec: Spec, row: dict[str, Any]) -> dict[str, Any]:
    """The published form of one row: small cells hidden, figures derived from them withheld, keys dropped."""
    hidden = {c for c in spec.counts if row.get(c) is not None and row[c] < SUPPRESS_BELOW}
    out = {}
    for column, value in row.items():
        if column.endswith("_key"):
            continue
        if column in hidden:
            value = SUPPRESSED
        elif hidden.intersection(spec.rates.get(column, ())) or spec.stats.get(column) in hidden:
            value = None
        out[column] = value
    return out


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, float):
        return repr(value)  # round-trips exactly through float()
    return value


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """Write report rows as CSV (header from the rows' columns; empty cells for None). Owner only, like every
    export: a practice report carries pseudonymous keys and small counts (warehouse/exports.py)."""
    columns = list(dict.fromkeys(c for r in rows for c in r))
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _csv_value(row.get(c)) for c in columns})
    return write_export(path, out.getvalue().encode())
