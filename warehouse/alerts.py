"""Alert episodes: evaluate the rules over the readings and upsert episodes, keeping acknowledgements.

Rules come in families, the levels of one finding (BP stage 2 / severe, ...): an episode is one alert at the
most severe level it reached, escalated in place, keyed by the reading and the level it opened at.

A pipeline run evaluates incrementally: the patients whose inputs changed (new or late readings, registry
entry, threshold — the ``alert_dirty`` set), plus, for everyone else, only the no-data rules' current gap, the
one thing that changes with time alone. New readings are evaluated from the patient's last checkpoint before
the earliest of them (00:00 UTC of a day with readings), starting from the episodes open across it as the
checkpoint kept them; a registry or threshold change re-evaluates the patient's whole history. The cost then
follows the batch, not the warehouse's history nor a patient's. A full evaluation (every patient, whole
history) is the reference; it also runs by itself when the rules changed since the last full one.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from warehouse.db import rows, transaction

RULES_SQL = Path(__file__).parent / "sql" / "030_alerts.sql"

# Outside the scope nothing changed but time: a patient's current silence, measured from the last reading
# (alert_gaps over a stream of each one's last reading, with nothing after it).
SILENT = """
CREATE OR REPLACE TEMP TABLE _silent AS
SELECT patient_id, reading_id, measured_at, NULL::TIMESTAMPTZ AS next_at, NULL::VARCHAR AS next_reading_id
FROM patient_last_reading WHERE patient_id NOT IN (SELECT patient_id FROM _scope)
"""

# The patients to evaluate, each from its last checkpoint at or before its earliest new reading (-infinity:
# the whole history, for a registry change, late data older than every checkpoint, or a patient without any
# checkpoint yet), and every patient from -infinity for a full evaluation.
SCOPE_DIRTY = """
CREATE OR REPLACE TEMP TABLE _scope AS
SELECT d.patient_id, coalesce(max(c.day), '-infinity'::TIMESTAMPTZ) AS from_at
FROM alert_dirty d LEFT JOIN alert_checkpoints c ON c.patient_id = d.patient_id AND c.day <= d.since
GROUP BY d.patient_id
"""
SCOPE_FULL = """
CREATE OR REPLACE TEMP TABLE _scope AS SELECT patient_id, '-infinity'::TIMESTAMPTZ AS from_at FROM patients
"""
# The scope in groups of whole patients of about CHUNK_READINGS readings to evaluate, so a statement's memory
# stays bounded and its cost linear: one evaluation over a year of CGM for 100 patients (10.5M readings)
# spilled past the 1 GB limit and took twice as long per reading as 1M did (73 s; 44 s in groups).
CHUNK_READINGS = 1_000_000
CHUNKS = """
CREATE OR REPLACE TEMP TABLE _chunks AS
SELECT s.patient_id, s.from_at,
       (sum(coalesce(n.readings, 0)) OVER (ORDER BY s.patient_id ROWS UNBOUNDED PRECEDING)
        - coalesce(n.readings, 0)) // $chunk AS chunk
FROM _scope s
LEFT JOIN (SELECT r.patient_id, count(*) AS readings FROM readings r JOIN _scope USING (patient_id)
           WHERE r.measured_at >= _scope.from_at GROUP BY r.patient_id) n USING (patient_id)
"""

# What the rest of a chunk's evaluation reads, computed once: the marks episodes and checkpoints are made of
# (every breach, and each family's last evaluation before a midnight: the rest decide nothing further), the
# readings in series, the levels each island reached and the episodes as islands.
MATERIALIZE = [
    """CREATE OR REPLACE TEMP TABLE _marks AS SELECT * FROM alert_marks
       WHERE breach OR next_at IS NULL OR utc_day(next_at) > measured_at""",
    "CREATE OR REPLACE TEMP TABLE _stream AS SELECT * FROM alert_reading_stream",
    "CREATE OR REPLACE TEMP TABLE _levels AS SELECT * FROM alert_levels('_marks')",
    "CREATE OR REPLACE TEMP TABLE _islands AS SELECT * FROM alert_islands('_marks')",
]
SCRATCH = ("_scope", "_chunks", "_marks", "_stream", "_levels", "_islands", "_days", "_episodes", "_silent")

# An episode's id is its patient, the level it opened at and the reading that opened it: escalating does not
# change it, so an acknowledgement stays with the episode (and an alert of a release before families, keyed
# by its rule, keeps its id when it opened its episode).
EPISODES = """
CREATE OR REPLACE TEMP TABLE _episodes AS
SELECT md5(e.patient_id || '|' || e.opened_rule || '|' || e.opened_reading_id) AS alert_id, e.*, d.severity,
       d.description
FROM ({source}) e
JOIN alert_rules d USING (rule)
"""
SCOPE_EPISODES = ("SELECT * EXCLUDE (island, base) FROM _islands UNION ALL BY NAME "
                  "SELECT * FROM alert_gaps('_stream')")

# The episodes into `alerts`, acknowledgements kept: one INSERT ... ON CONFLICT DO UPDATE, which finds each
# episode's alert through the key index (a run's few hundred episodes on millions of alerts) ...
_INSERT = """
INSERT INTO alerts (alert_id, patient_id, rule, severity, description, opened_at, opened_reading_id,
                    last_breach_at, last_observed, breaches, resolved_at, resolved_reading_id, evaluated_at,
                    resolution, opened_rule, escalated_at)
SELECT alert_id, patient_id, rule, severity, description, opened_at, opened_reading_id, last_breach_at,
       last_observed, breaches, resolved_at, resolved_reading_id, now(),
       CASE WHEN resolved_at IS NOT NULL THEN 'back in range' END, opened_rule, escalated_at
FROM _episodes e
"""
# How a stored alert takes its episode's state ({new}: the episode's row, as inserted).
_SET = """
    -- An escalation asks for attention again: an acknowledgement of the lower level no longer stands (the
    -- audit log keeps who acknowledged what, and when).
    acknowledged_by = CASE WHEN {new}.severity < alerts.severity THEN NULL ELSE alerts.acknowledged_by END,
    acknowledged_at = CASE WHEN {new}.severity < alerts.severity THEN NULL ELSE alerts.acknowledged_at END,
    ack_note = CASE WHEN {new}.severity < alerts.severity THEN NULL ELSE alerts.ack_note END,
    rule = {new}.rule, severity = {new}.severity, description = {new}.description,
    opened_rule = {new}.opened_rule, escalated_at = {new}.escalated_at,
    last_breach_at = {new}.last_breach_at, last_observed = {new}.last_observed,
    breaches = {new}.breaches, resolved_at = {new}.resolved_at,
    resolved_reading_id = {new}.resolved_reading_id, evaluated_at = {new}.evaluated_at,
    resolution = {new}.resolution
"""
UPSERT = _INSERT + "ON CONFLICT (alert_id) DO UPDATE SET" + _SET.format(new="excluded")
# ... or, for many episodes (a first evaluation of a million readings opens ~150k), the stored ones updated and
# the new ones inserted by joins: ON CONFLICT checked every row against the key, 1.2 CPU s against 0.4 for the
# plain insert, while the joins read `alerts`' whole id column, the cheaper side only when the episodes are many.
BULK_EPISODES = 20_000
UPDATE_EXISTING = "UPDATE alerts SET" + _SET.format(new="e") + """
FROM (SELECT *, now() AS evaluated_at, CASE WHEN resolved_at IS NOT NULL THEN 'back in range' END AS resolution
      FROM _episodes) e
WHERE e.alert_id = alerts.alert_id
"""
INSERT_NEW = _INSERT + "WHERE NOT EXISTS (SELECT 1 FROM alerts a WHERE a.alert_id = e.alert_id)\n"
UPSERT_BULK = (UPDATE_EXISTING, INSERT_NEW)

# Late data (a device uploading its offline buffer) can split or erase an episode that was evaluated before
# it arrived: an open alert whose episode no longer exists is closed, saying why, never left open forever.
# Only where this evaluation looked: the scope's patients, and everyone else's current no-data gap. An alert
# of a release before families (no opened_rule) that opened inside an episode of its family is that
# episode's duplicate (the bp_stage2 beside a bp_severe): merged into it.
CLOSE_DISPROVED = """
UPDATE alerts SET resolved_at = now(), evaluated_at = now(),
    resolution = CASE WHEN opened_rule IS NULL AND EXISTS (
        SELECT 1 FROM _episodes e JOIN alert_rules f ON f.family = e.family
        WHERE f.rule = alerts.rule AND e.patient_id = alerts.patient_id
          AND alerts.opened_at BETWEEN e.opened_at AND e.last_breach_at)
        THEN 'merged into its family''s alert' ELSE 'disproved by late readings' END
WHERE resolved_at IS NULL AND alert_id NOT IN (SELECT alert_id FROM _episodes) AND {where}
"""
IN_CHUNK = "patient_id IN (SELECT patient_id FROM alert_scope)"
SILENT_OUTSIDE = "rule IN ('no_data_24h', 'no_data_72h') AND patient_id NOT IN (SELECT patient_id FROM _scope)"

# The checkpoints after each scope patient's start, rebuilt from what this evaluation computed: the days with
# readings; the last reading before each (each day's last reading is the one a later midnight can follow);
# and each family's episode open across it (its last evaluation before midnight breached), with the breaches
# it had and the most severe level it had reached by then.
CHECKPOINTS = [
    """CREATE OR REPLACE TEMP TABLE _days AS
       SELECT DISTINCT t.patient_id, utc_day(t.measured_at) AS day
       FROM _stream t JOIN alert_scope s USING (patient_id)
       WHERE utc_day(t.measured_at) > s.from_at""",
    """INSERT INTO alert_checkpoints (patient_id, day, last_at, last_reading_id)
       SELECT d.patient_id, d.day, l.measured_at, l.reading_id
       FROM _days d
       ASOF LEFT JOIN (SELECT * FROM _stream
                       WHERE next_at IS NULL OR utc_day(next_at) > measured_at) l
           ON l.patient_id = d.patient_id AND d.day > l.measured_at""",
    """INSERT INTO alert_carry (patient_id, day, family, rule, reading_id, measured_at, opened_reading_id,
                               opened_at, opened_rule, escalated_at, breaches, last_observed)
       WITH open_across AS (
           SELECT p.day, m.*
           FROM (SELECT d.patient_id, d.day, f.family
                 FROM _days d JOIN (SELECT DISTINCT patient_id, family FROM _marks) f USING (patient_id)) p
           ASOF JOIN (SELECT * FROM _marks
                      WHERE next_at IS NULL OR utc_day(next_at) > measured_at) m
               ON m.patient_id = p.patient_id AND m.family = p.family AND p.day > m.measured_at
           WHERE m.breach
       ), reached AS (
           SELECT o.patient_id, o.day, o.family, arg_min(l.rule, l.severity) AS rule,
                  arg_min(l.reached_at, l.severity) AS reached_at
           FROM open_across o
           JOIN _levels l ON l.patient_id = o.patient_id AND l.family = o.family AND l.island = o.island
                         AND l.first_position <= o.position
           GROUP BY o.patient_id, o.day, o.family
       )
       SELECT o.patient_id, o.day, o.family, r.rule, o.reading_id, o.measured_at, i.opened_reading_id,
              i.opened_at, i.opened_rule, CASE WHEN r.rule <> i.opened_rule THEN r.reached_at END,
              o.position - i.base, o.observed
       FROM open_across o
       JOIN reached r USING (patient_id, day, family)
       JOIN _islands i ON i.patient_id = o.patient_id AND i.family = o.family AND i.island = o.island""",
]


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
    time from their earliest new reading on, and their latest reading is kept. ``source``: a table or
    subquery of loaded readings."""
    con.execute(f"""
        INSERT INTO alert_dirty (patient_id, since)
        SELECT patient_id, min(measured_at) FROM {source} WHERE patient_id IS NOT NULL GROUP BY patient_id
        ON CONFLICT (patient_id) DO UPDATE
        SET since = least(coalesce(alert_dirty.since, '-infinity'::TIMESTAMPTZ), excluded.since)""")
    con.execute(MERGE_LAST_READING.format(source=source))


def _upsert(con: duckdb.DuckDBPyConnection) -> None:
    """_episodes into alerts, the way that is cheaper for their number (the two give the same rows)."""
    (episodes,) = con.execute("SELECT count(*) FROM _episodes").fetchone()  # type: ignore[misc]
    for statement in UPSERT_BULK if episodes >= BULK_EPISODES else (UPSERT,):
        con.execute(statement)


def rules_digest() -> str:
    return hashlib.sha256(RULES_SQL.read_bytes()).hexdigest()[:16]


def mark_dirty(con: duckdb.DuckDBPyConnection, patient_ids: list[str] | str) -> None:
    """The next incremental evaluation re-evaluates these patients' whole history."""
    con.execute("INSERT INTO alert_dirty (patient_id, since) SELECT unnest(?::VARCHAR[]), '-infinity' "
                "ON CONFLICT (patient_id) DO UPDATE SET since = '-infinity'",
                [[patient_ids] if isinstance(patient_ids, str) else patient_ids])


def refresh_alerts(con: duckdb.DuckDBPyConnection, full: bool = True,
                   chunk_readings: int = CHUNK_READINGS) -> dict[str, int]:
    """Evaluate the rules (idempotent): every patient, or (``full=False``) the patients marked dirty since the
    last evaluation plus everyone's current no-data gap. Returns open alerts by rule.

    chunk_readings: about how many readings one group of patients is evaluated over at a time."""
    # DuckDB runs an ASOF join as a nested loop when it *estimates* its left side under 64 rows, and it
    # estimates the scope filled in this transaction as near empty: on a dense series that loop is quadratic.
    (prior,) = con.execute("SELECT current_setting('asof_loop_join_threshold')").fetchone()  # type: ignore[misc]
    con.execute("SET SESSION asof_loop_join_threshold = 0")
    con.execute("BEGIN TRANSACTION")
    try:
        digest = rules_digest()
        applied = con.execute("SELECT value FROM alert_state WHERE key = 'rules'").fetchone()
        full = full or applied is None or applied[0] != digest
        _evaluate(con, full, chunk_readings)
        if full:
            con.execute("INSERT OR REPLACE INTO alert_state VALUES ('rules', ?)", [digest])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        for table in SCRATCH:
            con.execute(f"DROP TABLE IF EXISTS temp.{table}")
        con.execute(f"SET SESSION asof_loop_join_threshold = {int(prior)}")
    return dict(con.execute("SELECT rule, count(*) FROM alerts WHERE resolved_at IS NULL GROUP BY rule "
                            "ORDER BY rule").fetchall())


def _evaluate(con: duckdb.DuckDBPyConnection, full: bool, chunk_readings: int) -> None:
    """The evaluation's statements, inside refresh_alerts' transaction."""
    if full:
        con.execute("DELETE FROM patient_last_reading")
        con.execute(MERGE_LAST_READING.format(source="readings"))
        con.execute("DELETE FROM alert_checkpoints")
        con.execute("DELETE FROM alert_carry")
    con.execute(SCOPE_FULL if full else SCOPE_DIRTY)
    con.execute(CHUNKS, {"chunk": max(1, chunk_readings)})
    for (chunk,) in con.execute("SELECT DISTINCT chunk FROM _chunks ORDER BY chunk").fetchall():
        con.execute("DELETE FROM alert_scope")
        con.execute("INSERT INTO alert_scope (patient_id, from_at) SELECT patient_id, from_at FROM _chunks "
                    "WHERE chunk = ?", [chunk])
        for statement in MATERIALIZE:
            con.execute(statement)
        con.execute(EPISODES.format(source=SCOPE_EPISODES))
        _upsert(con)
        con.execute(CLOSE_DISPROVED.format(where=IN_CHUNK))
        for table in ("alert_checkpoints", "alert_carry"):
            con.execute(f"DELETE FROM {table} c USING alert_scope s "
                        "WHERE c.patient_id = s.patient_id AND c.day > s.from_at")
        for statement in CHECKPOINTS:
            con.execute(statement)
    con.execute(SILENT)
    con.execute(EPISODES.format(source="SELECT * FROM alert_gaps('_silent')"))
    _upsert(con)
    con.execute(CLOSE_DISPROVED.format(where=SILENT_OUTSIDE))
    con.execute("DELETE FROM alert_dirty WHERE patient_id IN (SELECT patient_id FROM _scope)")
    # The views show the whole scope afterwards (what this evaluation looked at, and from when).
    con.execute("DELETE FROM alert_scope")
    con.execute("INSERT INTO alert_scope (patient_id, from_at) SELECT patient_id, from_at FROM _scope")


def open_alerts(con: duckdb.DuckDBPyConnection, patient_ids: list[str]) -> list[dict]:
    """Open alerts of these patients, most severe first, then oldest."""
    cur = con.execute("""
        SELECT alert_id, patient_id, rule, severity, description, opened_at, last_breach_at, last_observed,
               breaches, acknowledged_by, acknowledged_at, opened_rule, escalated_at
        FROM alerts WHERE resolved_at IS NULL AND list_contains(?, patient_id)
        ORDER BY severity, opened_at, patient_id, rule""", [patient_ids])
    return rows(cur)


def acknowledge(con: duckdb.DuckDBPyConnection, alert_id: str, clinician_id: str, note: str | None) -> dict | None:
    """Record that a clinician has seen an alert: appended to its acknowledgements (``alert_acks``, every one
    kept with its note) and shown on the alert as its latest. The alert stays open until readings return to
    range."""
    at = datetime.now(UTC)
    with transaction(con):
        row = con.execute("""
            UPDATE alerts SET acknowledged_by = ?, acknowledged_at = ?, ack_note = ?
            WHERE alert_id = ? RETURNING patient_id, rule, resolved_at""",
                          [clinician_id, at, note, alert_id]).fetchone()
        if row is not None:
            con.execute("INSERT INTO alert_acks VALUES (?, ?, ?, ?, ?, ?)",
                        [alert_id, clinician_id, at, note, row[1], row[2] is not None])
    return None if row is None else {"alert_id": alert_id, "patient_id": row[0], "rule": row[1],
                                     "resolved": row[2] is not None}


def acknowledgements(con: duckdb.DuckDBPyConnection, alert_id: str) -> list[dict]:
    """Every acknowledgement of an alert, oldest first."""
    return rows(con.execute("""SELECT clinician_id, acknowledged_at, note, rule, resolved FROM alert_acks
                               WHERE alert_id = ? ORDER BY acknowledged_at, clinician_id""", [alert_id]))


def alert_patient(con: duckdb.DuckDBPyConnection, alert_id: str) -> str | None:
    row = con.execute("SELECT patient_id FROM alerts WHERE alert_id = ?", [alert_id]).fetchone()
    return row[0] if row else None


def evaluate(s) -> dict[str, int]:
    """DAG entry: evaluate alerts incrementally (what this run's load and registry changes touched)."""
    from warehouse.db import clinical

    with clinical(s) as con:
        return refresh_alerts(con, full=False)
