"""Telehealth reports for a terminal."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from rpmctl.views.table import table
from warehouse.reports import SUPPRESSED


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
    return str(value)


def render(name: str, rows: list[dict]) -> str:
    """An aligned terminal table: rates as percentages, instants to the minute, numbers right-aligned."""
    if not rows:
        return f"no {name} data"
    columns = list(rows[0])
    numeric = [all(isinstance(r.get(c), int | float) and not isinstance(r.get(c), bool)
                   or r.get(c) in (None, SUPPRESSED) for r in rows) for c in columns]
    return table(columns, ([_cell(c, r.get(c)) for c in columns] for r in rows), right=numeric)
