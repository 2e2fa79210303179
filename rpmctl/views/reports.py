"""Telehealth reports for a terminal; the pipeline report narrowed to 80 columns unless asked for all."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta
from typing import Any

from rpmctl.views.table import table
from warehouse.reports import PIPELINE, SUPPRESSED, WITHHELD

WIDTH = 80
# The pipeline report's columns in the order they are given room in WIDTH, with shorter headers. A run id is
# never cut (it is what finds the run in Airflow), and when it leaves no room for when the run finished and
# which task failed, it gets a line of its own above its run's row.
RUN_ID = ("run_id", "run id")
PIPELINE_NARROW = (("state", "state"), ("finished_at", "finished"), ("failed_task", "failed in"),
                   ("loaded", "loaded"), ("quarantined", "quar"), ("duplicates", "dup"), ("duration_s", "secs"))
ESSENTIAL = 3  # state, finished, failed in: shown whatever the width


def _cell(column: str, value: Any) -> Any:
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):  # formatted here, so right-aligned by hand
        return f"{value:.1%}" if column.endswith(("_rate", "_share")) else f"{value:.1f}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict):  # a run's quarantine by rule, its seconds by task
        return " ".join(f"{k}={_cell(column, v)}" for k, v in value.items())
    return str(value)


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns``: (column, header) pairs."""
    names = [c for c, _ in columns]
    numeric = [all(isinstance(r.get(c), int | float) and not isinstance(r.get(c), bool)
                   or r.get(c) in (None, SUPPRESSED, WITHHELD) for r in rows) for c in names]
    return table([h for _, h in columns], ([_cell(c, r.get(c)) for c in names] for r in rows), right=numeric)


def _fit(rows: list[dict], first: list[tuple[str, str]], indent: int = 0) -> list[tuple[str, str]]:
    """``first``, the essential columns, then each further column of PIPELINE_NARROW that still fits WIDTH."""
    chosen = [*first, *PIPELINE_NARROW[:ESSENTIAL]]
    for column in PIPELINE_NARROW[ESSENTIAL:]:
        trial = [*chosen, column]
        if indent + max(len(line) for line in _table(rows, trial).splitlines()) <= WIDTH:
            chosen = trial
    return chosen


def _narrow(rows: list[dict]) -> str:
    """The pipeline report in WIDTH columns: run id, state, finish time and failed task always; then what fits."""
    chosen = _fit(rows, [RUN_ID])
    text = _table(rows, chosen)
    if max(len(line) for line in text.splitlines()) > WIDTH:  # long run ids: each on a line above its row
        chosen = _fit(rows, [], indent=2)
        header, rule, *lines = _table(rows, chosen).splitlines()
        text = "\n".join(["run id", f"  {header}", f"  {rule}",
                          *(f"{row['run_id']}\n  {line}" for row, line in zip(rows, lines, strict=True))])
        chosen = [RUN_ID, *chosen]
    hidden = len(rows[0]) - len(chosen)
    return f"{text}\n({hidden} more columns: --wide, or --json for whole records)"


def since_text(since: timedelta) -> str:
    """A --since duration as it is typed: 30m, 24h, 7d."""
    minutes = int(since.total_seconds()) // 60
    for unit, size in (("d", 24 * 60), ("h", 60)):
        if minutes % size == 0:
            return f"{minutes // size}{unit}"
    return f"{minutes}m"


def render(name: str, rows: list[dict], wide: bool = False, since: timedelta | None = None,
           failed: bool = False) -> str:
    """An aligned terminal table: rates as percentages, instants to the minute, numbers right-aligned. The
    pipeline report fits WIDTH columns unless ``wide``; ``since`` and ``failed`` are what it was asked for."""
    if not rows and name == PIPELINE:
        runs = "failed runs" if failed else "runs"
        return f"no {runs} in the last {since_text(since)}" if since is not None else f"no {runs} recorded"
    if not rows:
        return f"no {name} data"
    if name == PIPELINE and not wide:
        return _narrow(rows)
    return _table(rows, [(c, c) for c in rows[0]])


def to_json(rows: list[dict]) -> str:
    """Report rows as JSON: instants and dates in ISO 8601 (2026-12-07T02:19:04+00:00)."""
    return json.dumps(rows, indent=2, default=lambda v: v.isoformat() if isinstance(v, date) else str(v))
