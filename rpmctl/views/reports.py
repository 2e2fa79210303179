"""Telehealth reports for a terminal; the pipeline report narrowed to 80 columns unless asked for all."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from rpmctl.views.table import table
from warehouse.reports import PIPELINE, SUPPRESSED

WIDTH = 80
# The pipeline report's columns in the order they are given room in WIDTH, with shorter headers; the first two
# are always shown, and a run id is never cut (it is what finds the run in Airflow).
PIPELINE_NARROW = (("run_id", "run id"), ("state", "state"), ("loaded", "loaded"), ("quarantined", "quar"),
                   ("duplicates", "dup"), ("duration_s", "secs"), ("failed_task", "failed in"),
                   ("finished_at", "finished"))


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
                   or r.get(c) in (None, SUPPRESSED) for r in rows) for c in names]
    return table([h for _, h in columns], ([_cell(c, r.get(c)) for c in names] for r in rows), right=numeric)


def _narrow(rows: list[dict]) -> str:
    """The pipeline report in WIDTH columns: each column in PIPELINE_NARROW's order that still fits."""
    chosen: list[tuple[str, str]] = []
    for column in PIPELINE_NARROW:
        trial = [*chosen, column]
        if len(chosen) < 2 or max(len(line) for line in _table(rows, trial).splitlines()) <= WIDTH:
            chosen = trial
    hidden = len(rows[0]) - len(chosen)
    return f"{_table(rows, chosen)}\n({hidden} more columns: --wide, or --json for whole records)"


def render(name: str, rows: list[dict], wide: bool = False) -> str:
    """An aligned terminal table: rates as percentages, instants to the minute, numbers right-aligned. The
    pipeline report fits WIDTH columns unless ``wide``."""
    if not rows:
        return f"no {name} data"
    if name == PIPELINE and not wide:
        return _narrow(rows)
    return _table(rows, [(c, c) for c in rows[0]])
