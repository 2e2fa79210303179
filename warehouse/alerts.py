"""Alert episodes: evaluate the rules over the readings and upsert episodes, keeping acknowledgements.

A pipeline run evaluates incrementally: the full history of the patients whose inputs changed (new or late
readings, registry entry, threshold — the ``alert_dirty`` set), plus, for everyone else, only the no-data
rules' current gap, the one thing that changes with time alone. The cost then follows the batch, not the
warehouse's history. A full evaluation (every patient) is the reference; it also runs by itself when the rules
changed since the last full one.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from warehouse.db import rows

RULES_SQL = Path(__file__).parent / "sql" / "030_alerts.sql"

# Outside the scope nothing changed but time: a patient's current silence, measured from the last reading
# (the same episode alert_episodes gives for the gap after the last reading).
CURRENT_GAPS = """
SELECT l.patient_id, prm.rule, l.last.id AS opened_reading_id,
       l.last.at + to_hours(CAST(prm.value AS BIGINT)) AS opened_at, l.last.at AS last_breach_at,
       printf('last reading %s', strftime(l.last.at, '%Y-%m-%d %H:%M UTC')) AS last_observed, 1 AS breaches,
       NULL::TIMESTAMPTZ AS resolved_at, NULL::VARCHAR AS resolved_reading_id
FROM (SELECT patient_id, {'at': measured_at, 'id': reading_id} AS last FROM patient_last_reading
      WHERE patient_id NOT IN (SELECT patient_id FROM alert_scope)) l
JOIN patient_alert_params prm ON prm.patient_id = l.patient_id AND prm.rule IN ('no_data_24h', 'no_data_72h')
WHERE now() - l.last.at > to_hours(CAST(prm.value AS BIGINT))
"""

EPISODES = f"""
CREATE OR REPLACE TEMP TABLE _episodes AS
SELECT md5(e.patient_id || '|' || e.rule || '|' || e.opened_reading_id) AS alert_id, e.*, d.severity, d.description
FROM (SELECT * FROM alert_episodes UNION ALL {CURRENT_GAPS}) e
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
# Only where this evaluation looked: the scope's patients, and everyone's current no-data gap.
CLOSE_DISPROVED = """
UPDATE alerts SET resolved_at = now(), resolution = 'disproved by late readings', evaluated_at = now()
WHERE resolved_at IS NULL AND alert_id NOT IN (SELECT alert_id FROM _episodes)
  AND (patient_id IN (SELECT patient_id FROM alert_scope) OR rule IN ('no_data_24h', 'no_data_72h'))
"""


# The latest reading of each patient among ``source``'s rows, merged into patient_last_reading.
MERGE_LAST_READING = """
INSERT INTO patient_last_reading
SELECT patient_id, last.at, last.id
FROM (SELECT patient_id, max({{'at': measured_at, 'id': reading_id}}) AS last FROM {source}
      WHERE patient_id IS NOT NULL GROUP BY patient_id)
ON CONFLICT (patient_id) DO UPDATE SET measured_at = excluded.measured_at, reading_id = excluded.reading_id
WHERE {{'at': excluded.measured_at, 'id': excluded.reading_id}}
      > {{'at': patient_last_reading.measured_at, 'id': patient_last_reading.reading_id}}
"""


def note_loaded(con: duckdb.DuckDBPyConnection, source: str) -> None:
    """The load's part (in its transaction): these newly loaded readings' patients are re-evaluated next
    time, and their latest reading is kept. ``source``: a table or subquery of loaded readings."""
    con.execute(f"INSERT INTO alert_dirty (patient_id) SELECT DISTINCT patient_id FROM {source} "
                "WHERE patient_id IS NOT NULL ON CONFLICT DO NOTHING")
    con.execute(MERGE_LAST_READING.format(source=source))


def rules_digest() -> str:
    return hashlib.sha256(RULES_SQL.read_bytes()).hexdigest()[:16]


def mark_dirty(con: duckdb.DuckDBPyConnection, patient_ids: list[str] | str) -> None:
    """The next incremental evaluation re-evaluates these patients' whole history."""
    con.execute("INSERT INTO alert_dirty (patient_id) SELECT unnest(?::VARCHAR[]) ON CONFLICT DO NOTHING",
                [[patient_ids] if isinstance(patient_ids, str) else patient_ids])


def refresh_alerts(con: duckdb.DuckDBPyConnection, full: bool = True) -> dict[str, int]:
    """Evaluate the rules (idempotent): every patient, or (``full=False``) the patients marked dirty since the
    last evaluation plus everyone's current no-data gap. Returns open alerts by rule."""
    con.execute("BEGIN TRANSACTION")
    try:
        digest = rules_digest()
        applied = con.execute("SELECT value FROM alert_state WHERE key = 'rules'").fetchone()
        full = full or applied is None or applied[0] != digest
        if full:
            con.execute("DELETE FROM patient_last_reading")
            con.execute(MERGE_LAST_READING.format(source="readings"))
        con.execute("DELETE FROM alert_scope")
        con.execute("INSERT INTO alert_scope SELECT patient_id FROM patients" if full else
                    "INSERT INTO alert_scope SELECT patient_id FROM alert_dirty")
        con.execute(EPISODES)
        con.execute(UPSERT)
        con.execute(CLOSE_DISPROVED)
        con.execute("DELETE FROM alert_dirty WHERE patient_id IN (SELECT patient_id FROM alert_scope)")
        if full:
            con.execute("INSERT OR REPLACE INTO alert_state VALUES ('rules', ?)", [digest])
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
    """DAG entry: evaluate alerts incrementally (what this run's load and registry changes touched)."""
    from warehouse.db import clinical

    with clinical(s) as con:
        return refresh_alerts(con, full=False)
