"""Alert episodes: evaluate the rules over the readings and upsert episodes, keeping acknowledgements."""

from __future__ import annotations

from datetime import UTC, datetime

import duckdb

from warehouse.db import rows

EPISODES = """
CREATE OR REPLACE TEMP TABLE _episodes AS
SELECT md5(e.patient_id || '|' || e.rule || '|' || e.opened_reading_id) AS alert_id, e.*, d.severity, d.description
FROM alert_episodes e
JOIN (SELECT rule, min(severity) AS severity, max(description) AS description
      FROM alert_rule_params GROUP BY rule) d USING (rule)
"""

UPSERT = """
INSERT INTO alerts (alert_id, patient_id, rule, severity, description, opened_at, opened_reading_id,
                    last_breach_at, last_observed, breaches, resolved_at, resolved_reading_id, evaluated_at,
                    resolution)
SELECT alert_id, patient_id, rule, severity, description, opened_at, opened_reading_id, last_breach_at,
       last_observed, breaches, resolved_at, resolved_reading_id, now(),
       CASE WHEN resolved_at IS NOT NULL THEN 'back in range' END
FROM _episodes
ON CONFLICT (alert_id) DO UPDATE SET
    last_breach_at = excluded.last_breach_at, last_observed = excluded.last_observed,
    breaches = excluded.breaches, resolved_at = excluded.resolved_at,
    resolved_reading_id = excluded.resolved_reading_id, evaluated_at = excluded.evaluated_at,
    resolution = excluded.resolution
"""

# Late data (a device uploading its offline buffer) can split or erase an episode that was evaluated before
# it arrived: an open alert whose episode no longer exists is closed, saying why, never left open forever.
CLOSE_DISPROVED = """
UPDATE alerts SET resolved_at = now(), resolution = 'disproved by late readings', evaluated_at = now()
WHERE resolved_at IS NULL AND alert_id NOT IN (SELECT alert_id FROM _episodes)
"""


def refresh_alerts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Re-evaluate every rule (idempotent); returns open alerts by rule."""
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(EPISODES)
        con.execute(UPSERT)
        con.execute(CLOSE_DISPROVED)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return dict(con.execute("SELECT rule, count(*) FROM alerts WHERE resolved_at IS NULL GROUP BY rule "
                            "ORDER BY rule").fetchall())


def open_alerts(con: duckdb.DuckDBPyConnection, patient_ids: list[str]) -> list[dict]:
    """Open alerts of these patients, most severe first, then oldest."""
    cur = con.execute("""
        SELECT alert_id, patient_id, rule, severity, description, opened_at, last_breach_at, last_observed,
               breaches, acknowledged_by, acknowledged_at
        FROM alerts WHERE resolved_at IS NULL AND list_contains(?, patient_id)
        ORDER BY severity, opened_at, patient_id, rule""", [patient_ids])
    return rows(cur)


def acknowledge(con: duckdb.DuckDBPyConnection, alert_id: str, clinician_id: str, note: str | None) -> dict | None:
    """Mark an alert as seen by a clinician; it stays open until readings return to range."""
    row = con.execute("""
        UPDATE alerts SET acknowledged_by = ?, acknowledged_at = ?, ack_note = ?
        WHERE alert_id = ? RETURNING patient_id, rule, resolved_at""",
                      [clinician_id, datetime.now(UTC), note, alert_id]).fetchone()
    return None if row is None else {"alert_id": alert_id, "patient_id": row[0], "rule": row[1],
                                     "resolved": row[2] is not None}


def alert_patient(con: duckdb.DuckDBPyConnection, alert_id: str) -> str | None:
    row = con.execute("SELECT patient_id FROM alerts WHERE alert_id = ?", [alert_id]).fetchone()
    return row[0] if row else None


def evaluate(s) -> dict[str, int]:
    """DAG entry: re-evaluate alerts in the clinical warehouse."""
    from warehouse.db import clinical

    with clinical(s) as con:
        return refresh_alerts(con)
