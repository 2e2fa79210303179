"""Load a validated batch: readings, quarantine, duplicates and the segment ledger, committed together.

A batch loads a group of whole segments at a time (about ``chunk_items`` items, oldest segments first), each
group in one transaction with its ledger rows: no statement holds a whole large batch, and a load that dies
between groups resumes where it stopped (committed segments are in the ledger and skipped).

Exactly-once effect: a reading whose ``reading_id`` is already loaded (or appears earlier in the batch) is a
*duplicate* when its values agree, and a *conflicting duplicate* (quarantined) when they do not — a device
must not silently rewrite a reading a clinician may already have seen. Segments already in the ledger are
skipped, so re-running the load, or the whole DAG run, changes nothing. Groups go in segment order, so the
first arrival of a reading is the one loaded whether its repeats fall in the same group or a later one.

A ``reading_id`` is in ``readings`` at most once, with no index enforcing it (an ART index is rewritten whole
at every DuckDB checkpoint: sql/001_schema.sql). It holds because a row reaches ``readings`` only as a 'load'
of a classification run in the same transaction as its insert: absent from ``readings`` (CLASSIFY's LEFT
JOIN) and the first of its id among the rows inserted (``rn = 1``). Only this load and the quarantine replay
(pipeline/replay.py, the same CLASSIFY) insert readings, and they never interleave: one process holds the file
for writing (DuckDB's lock) and one connection in it (warehouse.db), and the join reads the readings its
transaction commits onto. A load killed mid-group committed nothing of that group, and its rerun classifies
the rest against what did commit; a compaction copies rows and checks every count. The duplicate of a loaded
reading is counted in ``duplicates`` or quarantined as a conflict, never inserted
(tests/unit/test_readings_unique.py breaks it each of those ways).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from warehouse.alerts import note_loaded
from warehouse.db import transaction
from warehouse.ledger import Batch
from warehouse.patient_days import note_loaded as note_days

# Staging of the batch in flight (warehouse/sql/001_schema.sql), filled by the stage and validate steps.
STAGING_TABLES = ("stg_candidates", "stg_events", "stg_rejects", "stg_segments", "stg_verdicts", "stg_validated",
                  "stg_messages")

# The staged reading's columns the load writes or reads again (readings, duplicates, quarantine, the ledger, the
# rollups): every other column (raw — a third of the classification when it was copied —, the validation-only
# ones) stays in staging. A conflicting duplicate's raw is read from staging by INSERT_QUARANTINE. The join reads
# readings' whole reading_id column (no index): ~0.5 s at 10M readings, shared machine. Zone maps cannot prune
# it — in compacted order every row group spans its patients' whole history, and joining on the patient would
# miss a reading whose device was re-enrolled since; adding measured_at (equal for equal ids) measured no faster.
#
# The first arrival of an id in the group (segment, record_no, item_no order) is looked up only for ids that
# come more than once (a re-sent message: ~1 % of a batch): a window over every row sorted the whole group
# with all its columns by reading_id: 2.2–2.5 CPU s for the whole classification at 1M readings, 1.3–1.7 now.
CLASSIFY = """
CREATE OR REPLACE TEMP TABLE _classified AS
WITH ok AS (
    SELECT c.row_key, c.segment, c.record_no, c.item_no, c.device_id, c.msg_id, c.metric, c.unit, c.value,
           c.diastolic, c.canonical_unit, c.loinc, c.source, c.measured_at, c.utc_offset_min, c.received_at,
           c.reading_id, c.extra, c.patient_id, c.manual
    FROM stg_candidates c
    WHERE c.batch_id = $batch AND c.segment IN (SELECT segment FROM _group)
      AND c.row_key NOT IN (SELECT row_key FROM stg_verdicts WHERE batch_id = $batch)
), repeated AS (  -- ids more than once in the group: where the first of them is, and its values
    SELECT reading_id, min({'segment': segment, 'record_no': record_no, 'item_no': item_no}) AS first_at,
           arg_min({'value': value, 'diastolic': diastolic},
                   {'segment': segment, 'record_no': record_no, 'item_no': item_no}) AS first
    FROM ok
    SEMI JOIN (SELECT reading_id FROM ok GROUP BY reading_id HAVING count(*) > 1) USING (reading_id)
    GROUP BY reading_id
)
SELECT ok.*,
       CASE
         WHEN r.reading_id IS NULL
              AND (f.reading_id IS NULL
                   OR f.first_at = {'segment': ok.segment, 'record_no': ok.record_no, 'item_no': ok.item_no})
           THEN 'load'
         WHEN r.reading_id IS NOT NULL
              AND r.value IS NOT DISTINCT FROM ok.value AND r.diastolic IS NOT DISTINCT FROM ok.diastolic
           THEN 'duplicate'
         WHEN r.reading_id IS NULL
              AND f.first.value IS NOT DISTINCT FROM ok.value
              AND f.first.diastolic IS NOT DISTINCT FROM ok.diastolic
           THEN 'duplicate'
         ELSE 'conflict'
       END AS fate
FROM ok LEFT JOIN repeated f USING (reading_id) LEFT JOIN readings r USING (reading_id)
"""

# Telehealth events: the same event (source, kind, instant, subject) again is a duplicate, whatever else
# changed — events are facts that happened, there is no clinical value a device could silently rewrite.
CLASSIFY_EVENTS = """
CREATE OR REPLACE TEMP TABLE _events_classified AS
WITH ok AS (
    SELECT e.*, row_number() OVER (PARTITION BY e.event_id ORDER BY e.segment, e.record_no, e.item_no) AS rn
    FROM stg_events e
    WHERE e.batch_id = $batch AND e.segment IN (SELECT segment FROM _group)
      AND e.row_key NOT IN (SELECT row_key FROM stg_verdicts WHERE batch_id = $batch)
)
SELECT ok.*, CASE WHEN t.event_id IS NULL AND ok.rn = 1 THEN 'load' ELSE 'duplicate' END AS fate
FROM ok LEFT JOIN telehealth_events t USING (event_id)
"""

INSERT_EVENTS = """
INSERT INTO telehealth_events (event_id, patient_id, device_id, channel, event, occurred_at, utc_offset_min,
    received_at, loaded_at, module, minutes, appointment_id, modality, scheduled_for, survey, battery_pct,
    signal_dbm, firmware, uptime_s, msg_id, segment, record_no, item_no, extra, run_id)
SELECT event_id, patient_id, device_id, channel, event, occurred_at, utc_offset_min, received_at, now(), module,
       minutes, appointment_id, modality, scheduled_for, survey, battery_pct, signal_dbm, firmware, uptime_s,
       msg_id, segment, record_no, item_no, extra, $run
FROM _events_classified WHERE fate = 'load'
"""

INSERT_READINGS = """
INSERT INTO readings (reading_id, patient_id, device_id, metric, loinc, value, diastolic, unit, unit_sent,
                      source, measured_at, utc_offset_min, received_at, loaded_at, msg_id, segment, record_no,
                      item_no, extra, run_id, manual)
SELECT reading_id, patient_id, device_id, metric, loinc, value, diastolic, canonical_unit, unit, source,
       measured_at, utc_offset_min, received_at, now(), msg_id, segment, record_no, item_no, extra, $run, manual
FROM _classified WHERE fate = 'load'
"""

INSERT_DUPLICATES = """
INSERT INTO duplicates
SELECT row_key, reading_id, segment, record_no, item_no, received_at, $run
FROM _classified WHERE fate = 'duplicate'
UNION ALL
SELECT row_key, event_id, segment, record_no, item_no, received_at, $run
FROM _events_classified WHERE fate = 'duplicate'
"""

INSERT_QUARANTINE = """
INSERT INTO quarantine (row_key, segment, record_no, item_no, device_id, reading_id, reasons, detail, raw,
                        received_at, quarantined_at, run_id, kind)
WITH readings_out AS (  -- the group's readings that fail a rule, and its conflicting duplicates
    SELECT c.row_key, c.segment, c.record_no, c.item_no, c.device_id, c.reading_id, v.reasons, NULL AS detail,
           c.raw, c.received_at
    FROM stg_candidates c JOIN stg_verdicts v ON v.batch_id = c.batch_id AND v.row_key = c.row_key
    WHERE c.batch_id = $batch AND c.segment IN (SELECT segment FROM _group)
    UNION ALL
    SELECT k.row_key, k.segment, k.record_no, k.item_no, k.device_id, k.reading_id, ['conflicting_duplicate'],
           'same device, metric and time as a loaded reading, different value', c.raw, k.received_at
    FROM _classified k JOIN stg_candidates c ON c.batch_id = $batch AND c.row_key = k.row_key
    WHERE k.fate = 'conflict' AND c.segment IN (SELECT segment FROM _group)
), batch_messages AS (  -- the batch messages those readings came in (a batch item's raw is staged null)
    SELECT m.segment, m.record_no, m.payload FROM stg_messages m
    WHERE m.batch_id = $batch AND m.segment IN (SELECT segment FROM _group)
      AND (m.segment, m.record_no) IN (SELECT segment, record_no FROM readings_out WHERE raw IS NULL)
)
-- a single reading's raw is its message as staged; a batch item's is built from its message (rpm_item_raw:
-- transforms.normalise.item_raw), only here, for the few that are quarantined
SELECT r.row_key, r.segment, r.record_no, r.item_no, r.device_id, r.reading_id, r.reasons, r.detail,
       coalesce(r.raw, rpm_item_raw(m.payload, r.item_no)), r.received_at, now(), $run, 'reading'
FROM readings_out r LEFT JOIN batch_messages m ON m.segment = r.segment AND m.record_no = r.record_no
UNION ALL
SELECT e.row_key, e.segment, e.record_no, e.item_no, e.device_id, e.event_id, v.reasons, NULL, e.raw,
       e.received_at, now(), $run, CASE e.channel WHEN 'status' THEN 'status' ELSE 'event' END
FROM stg_events e JOIN stg_verdicts v ON v.batch_id = e.batch_id AND v.row_key = e.row_key
WHERE e.batch_id = $batch AND e.segment IN (SELECT segment FROM _group)
UNION ALL
SELECT row_key, segment, record_no, item_no, device_id, NULL, [reason], detail, raw, received_at, now(), $run,
       'message'  -- unreadable as contract v1 (the message, or a batch item that is not an object)
FROM stg_rejects WHERE batch_id = $batch AND segment IN (SELECT segment FROM _group)
"""

# Per-segment accounting from this batch's own classification; the load refuses to commit if any segment
# does not balance (items = loaded + quarantined + duplicates).
INSERT_LEDGER = """
INSERT INTO segments
WITH items AS (
    SELECT segment FROM (SELECT segment FROM stg_candidates WHERE batch_id = $batch
                         UNION ALL SELECT segment FROM stg_events WHERE batch_id = $batch
                         UNION ALL SELECT segment FROM stg_rejects WHERE batch_id = $batch)
    WHERE segment IN (SELECT segment FROM _group)
), outcomes AS (
    SELECT segment, fate FROM _classified WHERE fate IN ('load', 'duplicate')
    UNION ALL SELECT segment, fate FROM _events_classified
    UNION ALL SELECT e.segment, 'quarantine' FROM stg_events e
              JOIN stg_verdicts v ON v.batch_id = e.batch_id AND v.row_key = e.row_key
              WHERE e.batch_id = $batch AND e.segment IN (SELECT segment FROM _group)
    UNION ALL SELECT segment, 'quarantine' FROM _classified WHERE fate = 'conflict'
    UNION ALL SELECT c.segment, 'quarantine' FROM stg_candidates c
              JOIN stg_verdicts v ON v.batch_id = c.batch_id AND v.row_key = c.row_key
              WHERE c.batch_id = $batch AND c.segment IN (SELECT segment FROM _group)
    UNION ALL SELECT segment, 'quarantine' FROM stg_rejects WHERE batch_id = $batch
        AND segment IN (SELECT segment FROM _group)
)
SELECT s.segment, s.messages,
       (SELECT count(*) FROM items i WHERE i.segment = s.segment),
       (SELECT count(*) FROM outcomes o WHERE o.segment = s.segment AND o.fate = 'load'),
       (SELECT count(*) FROM outcomes o WHERE o.segment = s.segment AND o.fate = 'quarantine'),
       (SELECT count(*) FROM outcomes o WHERE o.segment = s.segment AND o.fate = 'duplicate'),
       now(), $run
FROM stg_segments s
WHERE s.batch_id = $batch AND s.segment IN (SELECT segment FROM _group)
"""

# Pending segments of the batch with their staged item counts, oldest first (the order groups load in).
PENDING = """
SELECT s.segment, (SELECT count(*) FROM stg_candidates c WHERE c.batch_id = s.batch_id AND c.segment = s.segment)
                + (SELECT count(*) FROM stg_events e WHERE e.batch_id = s.batch_id AND e.segment = s.segment)
                + (SELECT count(*) FROM stg_rejects r WHERE r.batch_id = s.batch_id AND r.segment = s.segment)
FROM stg_segments s
WHERE s.batch_id = ? AND s.segment NOT IN (SELECT segment FROM segments)
ORDER BY s.segment
"""

class LoadError(RuntimeError):
    """The load refused a batch; nothing of the group it was loading was committed."""


class UnbalancedLoad(LoadError):
    """A segment's items did not equal loaded + quarantined + duplicates: nothing of its group was committed."""


@dataclass(frozen=True)
class Loaded:
    """What one load call added (zeros when the batch was already loaded)."""
    loaded: int
    quarantined: int
    duplicates: int
    segments: int

    def to_xcom(self) -> dict:
        return asdict(self)


def _groups(pending: list[tuple[str, int]], chunk_items: int) -> list[list[str]]:
    """Consecutive runs of whole segments of about ``chunk_items`` items (a segment is never split)."""
    groups: list[list[str]] = []
    size = 0
    for segment, items in pending:
        if not groups or (size and size + items > chunk_items):
            groups.append([])
            size = 0
        groups[-1].append(segment)
        size += items
    return groups


def _item_raw_function(con) -> None:
    """rpm_item_raw(payload, item_no) on ``con``: a batch item's raw, computed where it is quarantined."""
    import duckdb
    from duckdb.sqltypes import BLOB, INTEGER

    from transforms.normalise import item_raw

    try:
        con.create_function("rpm_item_raw", lambda payload, item_no: item_raw(bytes(payload), item_no),
                            [BLOB, INTEGER], BLOB)
    except duckdb.NotImplementedException:  # already registered on this connection
        pass


def _load_group(con, segments: list[str], params: dict) -> None:
    """One transaction: classify and commit these segments' items with their ledger rows, or nothing."""
    with transaction(con):
        con.execute("CREATE OR REPLACE TEMP TABLE _group AS SELECT unnest(?::VARCHAR[]) AS segment", [segments])
        con.execute(CLASSIFY, {"batch": params["batch"]})
        con.execute(CLASSIFY_EVENTS, {"batch": params["batch"]})
        con.execute(INSERT_READINGS, {"run": params["run"]})
        note_days(con, "(SELECT * REPLACE (canonical_unit AS unit) FROM _classified WHERE fate = 'load')")
        con.execute(INSERT_EVENTS, {"run": params["run"]})
        con.execute(INSERT_DUPLICATES, {"run": params["run"]})
        con.execute(INSERT_QUARANTINE, params)
        con.execute(INSERT_LEDGER, params)
        note_loaded(con, "(SELECT * FROM _classified WHERE fate = 'load')")
        unbalanced = con.execute("""
            SELECT segment, items, loaded, quarantined, duplicates FROM segments
            WHERE segment IN (SELECT segment FROM _group) AND items <> loaded + quarantined + duplicates
            """).fetchall()
        if unbalanced:
            raise UnbalancedLoad(f"segments do not balance, none of this group committed: {unbalanced[:5]}")


def load_batch(con, batch: Batch, run_id: str, chunk_items: int) -> Loaded:
    """Commit a validated batch, a group of whole segments of about ``chunk_items`` items per transaction;
    returns what this call added (zeros when re-run). ``con`` is a writable warehouse connection."""
    params = {"batch": batch.batch_id, "run": run_id}
    staged = con.execute("SELECT count(*) FROM stg_segments WHERE batch_id = ?", [batch.batch_id]).fetchone()
    validated = con.execute("SELECT count(*) FROM stg_validated WHERE batch_id = ?", [batch.batch_id]).fetchone()
    if batch.segments and staged and staged[0] and not (validated and validated[0]):
        raise LoadError(f"batch {batch.batch_id} was staged but not validated: refusing to load")
    before = _totals(con)
    _item_raw_function(con)
    for segments in _groups(con.execute(PENDING, [batch.batch_id]).fetchall(), chunk_items):
        _load_group(con, segments, params)
    after = _totals(con)
    with transaction(con):
        for table in STAGING_TABLES:
            con.execute(f"DELETE FROM {table} WHERE batch_id = ?", [batch.batch_id])
    return Loaded(*(a - b for a, b in zip(after, before, strict=True)))


def _totals(con) -> tuple[int, int, int, int]:
    """(loaded, quarantined, duplicates, segments) in the warehouse now."""
    row = con.execute("""SELECT (SELECT count(*) FROM readings) + (SELECT count(*) FROM telehealth_events),
                                (SELECT count(*) FROM quarantine),
                                (SELECT count(*) FROM duplicates), (SELECT count(*) FROM segments)""").fetchone()
    return row
