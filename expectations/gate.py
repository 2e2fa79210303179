"""The quality gate of a staged batch: run the clinical suite and record each failing row's rules."""

from __future__ import annotations

from collections import Counter

import pandas as pd

from expectations.clinical import validate
from expectations.telehealth import validate as validate_events
from rpmctl.settings import Settings
from warehouse.db import clinical, transaction
from warehouse.ledger import Batch


def validate_batch(s: Settings, batch: Batch) -> dict[str, int]:
    """Validate the staged candidates of ``batch``; returns failing-row counts per rule (no values)."""
    with clinical(s) as con:
        df = con.execute("SELECT * EXCLUDE (batch_id, raw) FROM stg_candidates WHERE batch_id = ?",
                         [batch.batch_id]).df()
        ev = con.execute("SELECT * EXCLUDE (batch_id, raw) FROM stg_events WHERE batch_id = ?",
                         [batch.batch_id]).df()
    failures = {**validate(df, s.future_skew_s), **validate_events(ev, s.future_skew_s)}
    verdicts = pd.DataFrame({"row_key": list(failures), "reasons": list(failures.values())})
    with clinical(s) as con, transaction(con):
        con.execute("DELETE FROM stg_verdicts WHERE batch_id = ?", [batch.batch_id])
        con.execute("DELETE FROM stg_validated WHERE batch_id = ?", [batch.batch_id])
        if len(verdicts):
            con.register("v", verdicts)
            con.execute("INSERT INTO stg_verdicts SELECT ?, row_key, reasons FROM v", [batch.batch_id])
        con.execute("INSERT INTO stg_validated VALUES (?, ?, now())", [batch.batch_id, len(df) + len(ev)])
    return dict(Counter(rule for rules in failures.values() for rule in rules))
