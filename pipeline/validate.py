"""The quality gate of a staged batch: run the GX suites and record each failing row's rules."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from core.settings import Settings
from expectations.clinical import DERIVED_SQL as CLINICAL_DERIVED
from expectations.clinical import rules as clinical_rules
from expectations.clinical import validate
from expectations.suite import INDEX_COLUMN, Rule, columns_of, null_only_columns
from expectations.telehealth import DERIVED_SQL as TELEHEALTH_DERIVED
from expectations.telehealth import rules as telehealth_rules
from expectations.telehealth import validate as validate_events
from pipeline import Sizes
from warehouse.db import transaction
from warehouse.ledger import Batch

# The kind of the sending device as the registry knows it (a device's kind does not change over time): "" for a
# registered device without a kind, null for a device the registry does not know. The suites judge it.
DEVICE_KIND = "(SELECT coalesce(d.kind, '') FROM devices d WHERE d.device_id = t.device_id)"


@dataclass(frozen=True)
class Validated:
    """Rows the suites judged and, per rule, how many failed (names and counts only: no values)."""
    checked: int
    failures_by_rule: dict[str, int]

    def to_xcom(self) -> dict:
        return asdict(self)


def _staged(con, table: str, rules: list[Rule], derived: dict[str, str], batch_id: str,
            chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The staged rows of a batch in chunks, only what the suite reads (a million rows: every column costs,
    and GX copies the frame per conditional rule): a column read only for being null comes as a marker
    (1.0 or null), and the suite's derived columns (``derived``: name -> SQL) are computed by DuckDB.

    Two things that cost more than the suite's own run at a million rows are left in DuckDB: the row key
    (64 characters per row, as Python strings) — each row is named by its ``rowid`` in ``table`` instead, and
    ``_verdicts`` reads the failing rows' keys back by it — and text values: a text column comes as an ENUM
    of the batch's own values, which DuckDB hands to pandas as a categorical, the same values and the same
    (sorted) categories ``validation_frame`` would build from the strings, without making them."""
    present = {r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()}
    markers = set(null_only_columns(rules))
    cols = [c for c in dict.fromkeys([INDEX_COLUMN, *columns_of(rules)]) if c in present]
    select = [f"t.rowid AS {c}" if c == INDEX_COLUMN
              else f"CASE WHEN t.{c} IS NOT NULL THEN 1.0 END AS {c}" if c in markers else f"t.{c}" for c in cols]
    # metric / channel: what the derived columns (kind_metric, kind_channel) are built from
    inner = ", ".join(dict.fromkeys([*select, *(f"t.{c}" for c in ("metric", "channel") if c in present)]))
    outer = ", ".join([*cols, *(f"{sql} AS {name}" for name, sql in derived.items())])
    query = f"""SELECT {outer} FROM (
                    SELECT {inner}, {DEVICE_KIND} AS device_kind FROM {table} t WHERE t.batch_id = ?)"""
    text = [name for name, kind, *_ in con.execute(f"DESCRIBE {query}", [batch_id]).fetchall()
            if kind == "VARCHAR" and name != INDEX_COLUMN]
    if text:
        found = con.execute(f"SELECT {', '.join(f'list(DISTINCT {c}) FILTER ({c} IS NOT NULL)' for c in text)} "
                            f"FROM ({query})", [batch_id]).fetchone() or [None] * len(text)
        enums = {c: sorted(values) for c, values in zip(text, found, strict=True) if _enumerable(values)}
        names = [*cols, *derived]
        query = f"""SELECT {", ".join(f"CAST({c} AS {_enum(enums[c])}) AS {c}" if c in enums else c for c in names)}
                    FROM ({query})"""
    cur = con.execute(query, [batch_id])
    while True:
        fetched = cur.fetch_df_chunk(max(1, chunk_rows // 2048))  # DuckDB hands out vectors of 2,048 rows
        if fetched.empty:
            return
        for start in range(0, len(fetched), chunk_rows):
            yield fetched.iloc[start:start + chunk_rows]


# An ENUM is written as a literal: a value with a NUL byte cannot be (a device may send one), and a column of
# many distinct values (a device sending garbage) gains nothing. Such a column comes as text, as before.
ENUM_MAX_VALUES = 1_000


def _enumerable(values: list[str] | None) -> bool:
    return values is not None and 0 < len(values) <= ENUM_MAX_VALUES and not any("\x00" in v for v in values)


def _enum(values: list[str]) -> str:
    return "ENUM(" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + ")"


def _verdicts(con, table: str, batch_id: str, failing: dict[Any, list[str]]) -> None:
    """Record the failing rows of ``table`` (by rowid, as ``_staged`` named them) under their row keys."""
    if not failing:
        return
    con.register("v", pd.DataFrame({"rid": list(failing), "reasons": list(failing.values())}))
    try:
        row = con.execute(f"""INSERT INTO stg_verdicts SELECT ?, t.row_key, v.reasons
                              FROM v JOIN {table} t ON t.rowid = v.rid WHERE t.batch_id = ?""",
                          [batch_id, batch_id]).fetchone()
    finally:
        con.unregister("v")
    if not row or row[0] != len(failing):  # a row that moved would go unjudged into the load: refuse instead
        raise RuntimeError(f"validation of {table}: {len(failing)} failing rows, {row and row[0]} found again")


def validate_batch(con, s: Settings, batch: Batch, chunk_rows: int = Sizes.validate_rows) -> Validated:
    """Validate the staged candidates and events of ``batch``, ``chunk_rows`` at a time, and record each
    failing row's rules for the load; ``con`` is a writable warehouse connection."""
    failing: dict[str, dict[Any, list[str]]] = {}  # table -> rowid -> the rules its row broke
    checked = 0
    for table, rules, derived, judge in (
            ("stg_candidates", clinical_rules(s.future_skew_s), CLINICAL_DERIVED, validate),
            ("stg_events", telehealth_rules(s.future_skew_s), TELEHEALTH_DERIVED, validate_events)):
        failing[table] = {}
        for chunk in _staged(con, table, rules, derived, batch.batch_id, chunk_rows):
            failing[table].update(judge(chunk, s.future_skew_s))
            checked += len(chunk)
            gc.collect()  # GX and pandas leave each chunk's frames in reference cycles: free them now
    with transaction(con):
        con.execute("DELETE FROM stg_verdicts WHERE batch_id = ?", [batch.batch_id])
        con.execute("DELETE FROM stg_validated WHERE batch_id = ?", [batch.batch_id])
        for table, rows in failing.items():
            _verdicts(con, table, batch.batch_id, rows)
        con.execute("INSERT INTO stg_validated VALUES (?, ?, now())", [batch.batch_id, checked])
    return Validated(checked, dict(Counter(rule for rows in failing.values() for rules in rows.values()
                                           for rule in rules)))
