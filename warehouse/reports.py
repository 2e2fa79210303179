"""Telehealth reports: education, appointments, devices, adherence from the telehealth store; pipeline runs.

The questions are answered by the ``mart_…`` views in ``telehealth_sql/``; this module picks a view and orders
it. Without ``publish`` the practice sees its own figures from a limited data set (warehouse/telehealth.py). For
anything that leaves the practice (``publish=True``) a report is an aggregate table: no pseudonymous key, no row
about one device or person (connectivity is published by device kind instead, firmware with its rare versions
merged into "other"), every count below 11 suppressed, and more cells suppressed with them (complementary
suppression) until the published cells, totals and sums — with what a reader knows of the table's structure —
tell no more about a suppressed count than that it is below 11 (``audit``).

The pipeline report is the ops view of the pipeline's runs, from the run records of the serving snapshot (run
ids and instants are needed to find a run in Airflow, and the telehealth store holds no instant): it holds no
patient data and is never published.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from core.settings import Settings
from warehouse.db import rows as fetch_rows
from warehouse.exports import spreadsheet_safe, write_export
from warehouse.telehealth import HIPAA_ROUTE, open_telehealth

# CMS cell-size suppression policy: no cell counting fewer than 11 people (or events about them) is published,
# nor any figure from which such a cell could be computed.
SUPPRESS_BELOW = 11
SUPPRESSED = "<11"
WITHHELD = "suppressed"  # a count of 11 or more hidden so that a small one cannot be computed back

PUBLISHED_ROUTE = ("published aggregate, no expert determination: counts per week or kind, none per person or "
                   "device, < 11 suppressed")
OPS_ROUTE = "operations records of the pipeline's runs: no patient data"


@dataclass(frozen=True)
class Spec:
    """One report: its view, its order, and how suppression applies to it."""

    view: str
    order_by: str
    counts: tuple[str, ...] = ()  # people, devices or appointments: shown as "<11" when small
    rates: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # rate -> the counts it is computed from
    stats: Mapping[str, str] = field(default_factory=dict)  # minutes/hours statistic -> the people it summarises
    sums: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # count -> the counts of its row it sums
    within: Mapping[str, str] = field(default_factory=dict)  # count -> the count of its row it cannot exceed
    exists: str | None = None  # a count that is >= 1 in every row (a row is there because something was counted)
    total: tuple[str, str] | None = None  # (column, label) of the rows that sum the other rows of their group
    group_by: tuple[str, ...] = ()  # the columns that delimit such a group
    published: Spec | None = None  # what is published instead (the report itself has a row per device)


_APPOINTMENT_COUNTS = ("appointments", "scheduled", "attended", "no_show", "cancelled")
_APPOINTMENT_RATES = {"completion_rate": ("attended", "no_show"), "no_show_rate": ("attended", "no_show")}
_APPOINTMENT_SUMS = {"appointments": ("scheduled", "attended", "no_show", "cancelled")}
_MODALITY_ORDER = ("CASE modality WHEN 'video' THEN 0 WHEN 'phone' THEN 1 WHEN 'in_person' THEN 2 "
                   "WHEN 'all' THEN 9 ELSE 5 END, modality")
_LAST_SEEN_ORDER = ("CASE last_seen WHEN 'today' THEN 0 WHEN '1-2 days' THEN 1 WHEN '3-7 days' THEN 2 "
                    "WHEN '8-30 days' THEN 3 WHEN 'over 30 days' THEN 4 WHEN 'never' THEN 5 ELSE 9 END")
_FIRMWARE_ORDER = "device_kind, firmware IS NOT DISTINCT FROM 'all', devices DESC, firmware NULLS LAST"

REPORTS: dict[str, Spec] = {
    "education": Spec(
        "mart_education_weekly", "week, module",
        counts=("people_viewed", "people_completed", "people_engaged"),
        within={"people_viewed": "people_engaged", "people_completed": "people_engaged"}, exists="people_engaged",
        rates={"completion_rate": ("people_completed", "people_engaged")},
        stats={"total_minutes": "people_engaged", "median_minutes_per_person": "people_engaged"}),
    "appointments": Spec("mart_appointments_by_modality", _MODALITY_ORDER, counts=_APPOINTMENT_COUNTS,
                         rates=_APPOINTMENT_RATES, sums=_APPOINTMENT_SUMS, total=("modality", "all"),
                         exists="appointments"),
    "appointments_weekly": Spec("mart_appointments_weekly", f"week, {_MODALITY_ORDER}",
                                counts=_APPOINTMENT_COUNTS, rates=_APPOINTMENT_RATES, sums=_APPOINTMENT_SUMS,
                                total=("modality", "all"), group_by=("week",), exists="appointments"),
    # One row per device for the practice; published, devices counted by kind and days since last seen.
    "connectivity": Spec(
        "mart_device_connectivity", "last_seen_on NULLS FIRST, device_kind, device_key",
        published=Spec("mart_connectivity_by_kind", f"device_kind, {_LAST_SEEN_ORDER}",
                       counts=("devices", "devices_low_battery", "devices_silent_now"),
                       within={"devices_low_battery": "devices", "devices_silent_now": "devices"},
                       total=("last_seen", "all"), group_by=("device_kind",), exists="devices")),
    # Published, a version run by fewer than 11 devices of its kind is merged into "other".
    # Never published (UNPUBLISHED): its rows add up to each kind's device count, which the published
    # connectivity report suppresses — the two together would give a hidden cell back.
    "firmware": Spec("mart_firmware_spread", _FIRMWARE_ORDER, counts=("devices",),
                     total=("firmware", "all"), group_by=("device_kind",)),
    "adherence": Spec(
        "mart_adherence", "window_end",
        counts=("enrolled_people", "adherent_people", "people_with_first_reading"),
        rates={"adherence_share": ("adherent_people", "enrolled_people")},
        within={"adherent_people": "enrolled_people"},
        stats={"median_hours_to_first_reading": "people_with_first_reading",
               "p90_hours_to_first_reading": "people_with_first_reading"}),
}
PIPELINE = "pipeline"
# Reports for the practice only, and why.
UNPUBLISHED = {PIPELINE: "the practice's operations log",
               "firmware": ("the practice's device inventory (per kind, its rows add up to the device counts the "
                            "published connectivity report suppresses)")}
PIPELINE_LIMIT = 20  # runs shown without --since

# Every run record but the failure's text (exception messages can quote the ids of the rows they failed on).
PIPELINE_RUNS = """
SELECT row_number() OVER (ORDER BY finished_at DESC, run_id DESC) AS recency,
       run_id, state, started_at, finished_at,
       date_diff('millisecond', started_at, finished_at) / 1000.0 AS duration_s,
       * EXCLUDE (run_id, state, started_at, finished_at, error)
FROM pipeline_runs
WHERE finished_at >= ? AND (state = 'failed' OR NOT ?)
ORDER BY recency
LIMIT ?"""
_JSON_COLUMNS = ("quarantined_by_rule", "task_seconds")  # stored as JSON text: returned as objects


def route(name: str, publish: bool = False) -> str:
    """The one line that says what a report's rows are, in HIPAA's terms."""
    if name == PIPELINE:
        return OPS_ROUTE
    return PUBLISHED_ROUTE if publish else HIPAA_ROUTE


def report(s: Settings, name: str, publish: bool = False) -> list[dict]:
    """Rows of report ``name``.

    publish: for release outside the practice — an aggregate form where the report has a row per device, counts
    below ``SUPPRESS_BELOW`` shown as ``"<11"`` and their complements as ``"suppressed"``, rates and statistics
    computed from them None, and no ``*_key`` column.
    """
    if publish and name in UNPUBLISHED:
        raise ValueError(f"the {name} report is {UNPUBLISHED[name]}, not for publication: run it without --publish")
    if name == PIPELINE:
        return pipeline_runs(s)
    spec = REPORTS.get(name)
    if spec is None:
        raise ValueError(f"unknown report {name!r}; one of: {', '.join([*REPORTS, PIPELINE])}")
    if publish and spec.published:
        spec = spec.published
    con = open_telehealth(s)
    try:
        rows = fetch_rows(con.execute(f"SELECT * FROM {spec.view} ORDER BY {spec.order_by}"))
    finally:
        con.close()
    return suppress(spec, rows) if publish else rows


def pipeline_runs(s: Settings, since: timedelta | None = None, failed_only: bool = False) -> list[dict]:
    """The pipeline's run records, newest first: the last PIPELINE_LIMIT, or every one finished within
    ``since``; ``failed_only``: failed runs only. Instants in UTC; JSON columns as objects."""
    from warehouse.serving import serving

    start = datetime.now(UTC) - since if since is not None else datetime.min.replace(tzinfo=UTC)
    limit = PIPELINE_LIMIT if since is None else None
    with serving(s) as con:
        rows = fetch_rows(con.execute(PIPELINE_RUNS, [start, failed_only, limit]))
    for row in rows:
        for column, value in row.items():
            if isinstance(value, datetime):
                row[column] = value.astimezone(UTC)
            elif column in _JSON_COLUMNS and isinstance(value, str):
                row[column] = json.loads(value)
    return rows


def suppress(spec: Spec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The published form of a report's rows: small cells hidden with their complements, figures derived from
    hidden cells withheld, keys dropped."""
    small = {(i, c) for i, row in enumerate(rows) for c in spec.counts
             if row.get(c) is not None and row[c] < SUPPRESS_BELOW}
    hidden = _complement(spec, rows, small)
    return [_published_row(spec, row, {c for j, c in small if j == i}, {c for j, c in hidden if j == i})
            for i, row in enumerate(rows)]


Cell = tuple[int, str]  # (row index, column)


class SuppressionError(Exception):
    """A report's rows contradict the structure suppression assumes of them (a total that is not the sum)."""


def _sums(spec: Spec, rows: list[dict[str, Any]]) -> list[list[Cell]]:
    """Groups of cells where the first is the sum of the others: a row's total column and its parts
    (appointments = scheduled + attended + ...), and down each count column, a total row and its group's rows."""
    out = [[(i, total), *((i, p) for p in parts)] for i in range(len(rows)) for total, parts in spec.sums.items()]
    if spec.total is None:
        return out
    column, label = spec.total
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(tuple(row[g] for g in spec.group_by), []).append(i)
    for members in groups.values():
        parts = [i for i in members if rows[i][column] != label]
        for t in (i for i in members if rows[i][column] == label):
            out += [[(t, c), *((i, c) for i in parts)] for c in spec.counts]
    return out


def _constraints(spec: Spec, rows: list[dict[str, Any]]) -> list[tuple[str, list[Cell]]]:
    """What a reader knows ties the cells together: ("sum", [total, *parts]) and ("within", [part, whole])."""
    out = [("sum", cells) for cells in _sums(spec, rows)]
    return out + [("within", [(i, part), (i, whole)]) for i in range(len(rows)) for part, whole in spec.within.items()]


def audit(spec: Spec, rows: list[dict[str, Any]], small: set[Cell],
          hidden: set[Cell]) -> dict[Cell, tuple[int, int | None]]:
    """The range a reader of the published table can narrow each hidden small cell to.

    The reader sees every shown cell, knows the sums and ``within`` bounds, that a "<11" cell is 0-10 (1-10 for
    a row's ``exists`` count) and a "suppressed" one at least 11. Each range is a pair of linear programs: for
    a table with row and column totals their optima are whole numbers, so the range is exact."""
    from scipy.optimize import linprog  # type: ignore[import-untyped]  # imported here: ~0.3 s, publishing only

    cells = sorted(small | hidden)
    index = {cell: k for k, cell in enumerate(cells)}
    equal: tuple[list, list] = ([], [])
    below: tuple[list, list] = ([], [])
    for kind, group in _constraints(spec, rows):
        if not index.keys() & set(group):
            continue
        coef, rhs = [0.0] * len(cells), 0.0
        signs = [1, *[-1] * (len(group) - 1)]  # total - parts = 0; part - whole <= 0
        for cell, sign in zip(group, signs, strict=True):
            if cell in index:
                coef[index[cell]] += sign
            else:
                rhs -= sign * (rows[cell[0]][cell[1]] or 0)
        target = equal if kind == "sum" else below
        target[0].append(coef)
        target[1].append(rhs)
    bounds = [(1 if c == spec.exists else 0, SUPPRESS_BELOW - 1) if (i, c) in small else (SUPPRESS_BELOW, None)
              for i, c in cells]
    lp = {"A_eq": equal[0] or None, "b_eq": equal[1] or None, "A_ub": below[0] or None, "b_ub": below[1] or None,
          "bounds": bounds, "method": "highs"}
    ranges = {}
    for cell in sorted(small):
        objective = [0.0] * len(cells)
        objective[index[cell]] = 1.0
        low = linprog(objective, **lp)
        high = linprog([-x for x in objective], **lp)
        if low.status != 0 or high.status not in (0, 3):  # 3: unbounded above
            raise SuppressionError(f"report {spec.view}: cell {cell} is not consistent with its totals")
        ranges[cell] = (round(low.fun), None if high.status == 3 else round(-high.fun))
    return ranges


def _protected(span: tuple[int, int | None]) -> bool:
    """A small cell is protected when the table allows it every value a "<11" allows: 1 to 10."""
    low, high = span
    return low <= 1 and (high is None or high >= SUPPRESS_BELOW - 1)


def _complement(spec: Spec, rows: list[dict[str, Any]], small: set[Cell]) -> set[Cell]:
    """Complementary suppression: while some small cell can be narrowed below "1 to 10", hide a shown cell tied
    to it by a sum or bound (else any shown cell of its connected part of the table). A small cell
    whose whole connected part is hidden has the widest range the structure allows, and is left at that."""
    constraints = [group for _, group in _constraints(spec, rows)]
    counted = {(i, c) for i, row in enumerate(rows) for c in spec.counts if row.get(c) is not None}
    parent = {cell: cell for cell in counted}

    def root(cell: Cell) -> Cell:
        while parent[cell] != cell:
            parent[cell] = parent[parent[cell]]
            cell = parent[cell]
        return cell

    for group in constraints:
        for cell in group[1:]:
            parent[root(cell)] = root(group[0])
    parts: dict[Cell, set[Cell]] = {}
    for cell in counted:
        parts.setdefault(root(cell), set()).add(cell)

    def cost(cell: Cell) -> tuple:
        # A "suppressed" cell is known to be >= 11, so it can only give a small cell as much room as it has
        # above 11: the smallest cell with room for a whole "<11" range, else the one with the most room.
        value = rows[cell[0]][cell[1]]
        roomy = value >= 2 * SUPPRESS_BELOW - 1
        return (not roomy, value if roomy else -value, cell)

    hidden: set[Cell] = set()
    for part in sorted(parts.values(), key=min):
        part_small = small & part
        if not part_small:
            continue
        ties = [g for g in constraints if g[0] in part]
        while True:
            ranges = audit(spec, rows, part_small, hidden & part)
            weak = [cell for cell, span in sorted(ranges.items()) if not _protected(span)]
            if not weak:
                break
            shown = part - part_small - hidden
            near = {c for g in ties if weak[0] in g for c in g} & shown
            if not (near or shown):
                break
            hidden.add(min(near or shown, key=cost))
    return hidden


def _published_row(spec: Spec, row: dict[str, Any], small: set[str], withheld: set[str]) -> dict[str, Any]:
    out = {}
    hidden = small | withheld
    for column, value in row.items():
        if column.endswith("_key"):
            continue
        if column in small:
            value = SUPPRESSED
        elif column in withheld:
            value = WITHHELD
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
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return spreadsheet_safe(value)


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """Write report rows as CSV (header from the rows' columns; empty cells for None; text that a spreadsheet
    would run as a formula neutralised). Owner only, like every export: a practice report carries pseudonymous
    keys and small counts (warehouse/exports.py)."""
    columns = list(dict.fromkeys(c for r in rows for c in r))
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _csv_value(row.get(c)) for c in columns})
    return write_export(path, out.getvalue().encode())
