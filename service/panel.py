"""Triage of a clinician's panel, after Tidepool's TIDE view: each patient is placed in the most urgent category
it meets, the categories in a fixed order, and patients within one by how far they are from where they should
be. Pure functions over the rows ``ClinicianSession.panel`` returns.

Order of the categories (most urgent first):

1. open alerts, by the most severe (1 urgent, 2 high, 3 watch) — the no-data rules are category 2, not this one;
2. no reading for 72 hours, then for 24 hours (the ``no_data_*`` rules' thresholds);
3. CGM glucose: time below range over the consensus limits (< 54 mg/dL over 1 % or < 70 mg/dL over 4 % of
   readings, Battelino 2019), or time in range down 15 points or more against the 14 days before (TIDE's
   default "drop in time in range");
4. billing to do this month: the current 30-day period has fewer than 16 device days (99454), or fewer than
   20 minutes of treatment management (99457) or no interactive communication were logged this month;
5. on track.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

NO_DATA_RULES = ("no_data_24h", "no_data_72h")
TBR_54_LIMIT = 1.0      # % of readings below 54 mg/dL (consensus target: < 1 %)
TBR_70_LIMIT = 4.0      # % of readings below 70 mg/dL (consensus target: < 4 %)
TIR_DROP_POINTS = 15.0  # TIDE's default "drop in time in range"
DEVICE_DAYS_99454 = 16  # distinct days with device data in the 30-day period
MINUTES_99457 = 20      # treatment-management minutes in the calendar month


@dataclass(frozen=True)
class Category:
    key: str
    label: str
    group: str   # what the panel's filter selects: alerts, no-data, glucose, billing, on-track
    tone: str    # the badge's colour class


CATEGORIES = [
    Category("alert-1", "Urgent alert", "alerts", "urgent"),
    Category("alert-2", "High alert", "alerts", "high"),
    Category("alert-3", "Alert", "alerts", "watch"),
    Category("no-data-72h", "No data 72 h", "no-data", "high"),
    Category("no-data-24h", "No data 24 h", "no-data", "watch"),
    Category("glucose-low", "Time below range", "glucose", "high"),
    Category("glucose-tir-drop", "Time in range dropped", "glucose", "watch"),
    Category("billing", "Billing to do", "billing", "info"),
    Category("on-track", "On track", "on-track", "ok"),
]
RANK = {c.key: n for n, c in enumerate(CATEGORIES)}
BY_KEY = {c.key: c for c in CATEGORIES}
GROUPS = {"alerts": "Open alerts", "no-data": "No data", "glucose": "Glucose", "billing": "Billing",
          "on-track": "On track"}
SORTS = {"triage": "Triage", "name": "Name", "last-reading": "Last reading", "device-days": "Device days",
         "minutes": "Minutes this month"}


@dataclass
class PanelRow:
    """One patient on the panel: the row from the warehouse, its category, and every flag it raises."""
    patient: dict[str, Any]
    category: Category
    flags: list[str] = field(default_factory=list)
    hours_silent: float | None = None
    clinical_alerts: list[dict] = field(default_factory=list)
    tir: float | None = None
    tir_change: float | None = None
    tbr_70: float | None = None
    tbr_54: float | None = None
    device_days: int = 0
    days_left: int | None = None
    minutes: int = 0
    interactive: int = 0
    key: tuple = ()

    @property
    def name(self) -> str:
        p = self.patient
        return f"{p.get('family_name') or ''}, {p.get('given_name') or ''}".strip(", ") or p["patient_id"]


def triage(row: dict[str, Any], now: datetime | None = None) -> PanelRow:
    """Place one patient: its category, its flags (every category it meets) and its place within the category."""
    now = now or datetime.now(UTC)
    out = PanelRow(patient=row, category=BY_KEY["on-track"])
    met: list[str] = []

    out.clinical_alerts = [a for a in row.get("alerts") or [] if a["rule"] not in NO_DATA_RULES]
    worst = min((a["severity"] for a in out.clinical_alerts), default=None)
    if worst is not None:
        met.append(f"alert-{min(max(worst, 1), 3)}")
        out.flags.append(f"{len(out.clinical_alerts)} open alert{'s' if len(out.clinical_alerts) != 1 else ''}")

    last = row.get("last_reading_at")
    if last is not None:
        out.hours_silent = (now - last).total_seconds() / 3600
    if out.hours_silent is None or out.hours_silent > 72:
        met.append("no-data-72h")
        out.flags.append("no data 72 h" if last is not None else "no readings yet")
    elif out.hours_silent > 24:
        met.append("no-data-24h")
        out.flags.append("no data 24 h")

    glucose, before = row.get("glucose"), row.get("glucose_before")
    if glucose and glucose.get("cgm_readings"):
        out.tir, out.tbr_70, out.tbr_54 = (glucose.get("tir_70_180"), glucose.get("tbr_below_70"),
                                           glucose.get("tbr_below_54"))
        if (out.tbr_54 or 0) > TBR_54_LIMIT or (out.tbr_70 or 0) > TBR_70_LIMIT:
            met.append("glucose-low")
            out.flags.append("time below range")
        if before and before.get("cgm_readings") and out.tir is not None and before.get("tir_70_180") is not None:
            out.tir_change = out.tir - before["tir_70_180"]
            if out.tir_change <= -TIR_DROP_POINTS:
                met.append("glucose-tir-drop")
                out.flags.append("time in range dropped")

    billing = row.get("billing") or {}
    current = next((p for p in billing.get("periods") or [] if p.get("is_current")), None)
    out.device_days = (current or billing).get("days_with_data") or 0
    out.days_left = current.get("days_left") if current else None
    out.minutes, out.interactive = billing.get("management_minutes") or 0, billing.get("interactive_count") or 0
    billing_todo = False
    if current is not None and out.device_days < DEVICE_DAYS_99454:
        billing_todo = True
        reachable = out.device_days + (out.days_left or 0) >= DEVICE_DAYS_99454
        out.flags.append("99454 at risk" if reachable else "99454 out of reach")
    if out.minutes < MINUTES_99457:
        billing_todo = True
        out.flags.append(f"{MINUTES_99457 - out.minutes} min to 99457")
    elif not out.interactive:
        billing_todo = True
        out.flags.append("needs an interactive call")
    if billing_todo:
        met.append("billing")

    out.category = BY_KEY[min(met, key=RANK.__getitem__)] if met else BY_KEY["on-track"]
    out.key = (RANK[out.category.key], *_within(out), out.name, row["patient_id"])
    return out


def _within(r: PanelRow) -> tuple:
    """The order inside a category: the furthest from target first."""
    group = r.category.group
    if group == "alerts":
        oldest = min(a["opened_at"].timestamp() for a in r.clinical_alerts)
        return (-len(r.clinical_alerts), oldest)
    if group == "no-data":
        return (-(r.hours_silent or float("inf")),)
    if group == "glucose":
        return (-(r.tbr_54 or 0), -(r.tbr_70 or 0), r.tir_change or 0)
    if group == "billing":
        return (r.device_days - DEVICE_DAYS_99454, r.minutes)
    return ()


def build_panel(rows: list[dict], *, group: str | None = None, condition: str | None = None,
                sort: str = "triage", now: datetime | None = None) -> list[PanelRow]:
    """The panel's rows, filtered to one category group and/or condition, in ``sort`` order (SORTS)."""
    placed = [triage(r, now) for r in rows]
    if group:
        placed = [p for p in placed if p.category.group == group]
    if condition:
        placed = [p for p in placed if condition in (p.patient.get("conditions") or [])]
    if sort == "name":
        return sorted(placed, key=lambda p: (p.name.lower(), p.patient["patient_id"]))
    if sort == "last-reading":  # the longest silence first
        return sorted(placed, key=lambda p: (-(p.hours_silent if p.hours_silent is not None else float("inf")),
                                             p.patient["patient_id"]))
    if sort == "device-days":   # the fewest device days first
        return sorted(placed, key=lambda p: (p.device_days, p.patient["patient_id"]))
    if sort == "minutes":       # the fewest minutes first
        return sorted(placed, key=lambda p: (p.minutes, p.patient["patient_id"]))
    return sorted(placed, key=lambda p: p.key)


def counts(rows: list[PanelRow]) -> dict[str, int]:
    """Patients per category group (the panel's summary tiles), before any filter."""
    out = dict.fromkeys(GROUPS, 0)
    for r in rows:
        out[r.category.group] += 1
    return out
