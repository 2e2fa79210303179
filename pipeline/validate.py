"""The quality gate of a staged batch: run the GX suites and record each failing row's rules."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass

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
    (1.0 or null), and the suite's derived columns (``derived``: name -> SQL) are computed by DuckDB."""
    present = {r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()}
    markers = set(null_only_columns(rules))
    cols = [c for c in dict.fromkeys([INDEX_COLUMN, *columns_of(rules)]) if c in present]
    select = [f"CASE WHEN t.{c} IS NOT NULL THEN 1.0 END AS {c}" if c in markers else f"t.{c}" for c in cols]
    # metric / channel: what the derived columns (kind_metric, kind_channel) are built from
    inner = ", ".join(dict.fromkeys([*select, *(f"t.{c}" for c in ("metric", "channel") if c in present)]))
    outer = ", ".join([*cols, *(f"{sql} AS {name}" for name, sql in derived.items())])
    cur = con.execute(f"""SELECT {outer} FROM (
                              SELECT {inner}, {DEVICE_KIND} AS device_kind FROM {table} t WHERE t.batch_id = ?)""",
                      [batch_id])
    while True:
        fetched = cur.fetch_df_chunk(max(1, chunk_rows // 2048))  # DuckDB hands out vectors of 2,048 rows
        if fetched.empty:
            return
        for start in range(0, len(fetched), chunk_rows):
            yield fetched.iloc[start:start + chunk_rows]


def validate_batch(con, s: Settings, batch: Batch, chunk_rows: int = Sizes.validate_rows) -> Validated:
    """Validate the staged candidates and events of ``batch``, ``chunk_rows`` at a time, and record each
    failing row's rules for the load; ``con`` is a writable warehouse connection."""
    failures: dict[str, list[str]] = {}
    checked = 0
    for table, rules, derived, judge in (
            ("stg_candidates", clinical_rules(s.future_skew_s), CLINICAL_DERIVED, validate),
            ("stg_events", telehealth_rules(s.future_skew_s), TELEHEALTH_DERIVED, validate_events)):
        for chunk in _staged(con, table, rules, derived, batch.batch_id, chunk_rows):
            failures.update(judge(chunk, s.future_skew_s))
            checked += len(chunk)
            gc.collect()  # GX and pandas leave each chunk's frames in reference cycles: free them now
    verdicts = pd.DataFrame({"row_key": list(failures), "reasons": list(failures.values())})
    with transaction(con):
        con.execute("DELETE FROM stg_verdicts WHERE batch_id = ?", [batch.batch_id])
        con.execute("DELETE FROM stg_validated WHERE batch_id = ?", [batch.batch_id])
        if len(verdicts):
            con.register("v", verdicts)
            con.execute("INSERT INTO stg_verdicts SELECT ?, row_key, reasons FROM v", [batch.batch_id])
        con.execute("INSERT INTO stg_validated VALUES (?, ?, now())", [batch.batch_id, checked])
    return Validated(checked, dict(Counter(rule for rules in failures.values() for rule in rules)))
