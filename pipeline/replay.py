"""Quarantine replay: re-judge quarantined items against today's registry and rules, and let those that now
pass reach the chart.

A reading quarantined because the registry was not ready — ``device_enrolled_at_measured_time`` before a
device's enrollment was entered with an earlier start — is otherwise lost to the patient. A replay rebuilds
each item's candidate row from what quarantine stored (``raw`` is the item's JSON) with the reference
normaliser, keeping its row key, segment, record, item and receipt time; looks the patient up by enrollment
at the measured instant; runs the same GX suites; and classifies it as the load does (new, duplicate,
conflicting duplicate). In one transaction, items that now pass move to readings (or duplicates) and leave
quarantine, and their segments' ledger counts move with them (quarantined -1, loaded or duplicates +1), so
the accounting stays exact; items that still fail keep their row with their new reasons. A replay changes
only what the registry or rules changed: run twice, the second changes nothing.

Only item-level reasons can change that way. A structural reason (the message could not be read as contract
v1: not JSON, unknown topic, too large, a malformed batch) depends on the bytes alone and is refused.

The work happens in TEMP tables on the caller's connection, never in the staging tables, which may hold a
pipeline run's batch between its tasks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypedDict

import duckdb
import pandas as pd

from core.payload import parse_json_object
from core.settings import Settings
from expectations import clinical as clinical_suite
from expectations import telehealth as telehealth_suite
from pipeline import Sizes
from pipeline.stage import patient_at
from pipeline.validate import DEVICE_KIND
from transforms.decode import BATCH_KEYS
from transforms.events import EVENT_COLUMNS, event_candidate
from transforms.normalise import CANDIDATE_COLUMNS, candidate
from warehouse.alerts import note_loaded
from warehouse.db import rows, transaction
from warehouse.patient_days import note_loaded as note_days

Kind = Literal["reading", "status", "event"]

# Reasons that judge the message's bytes, not an item (transforms/decode.py, transforms/normalise.py).
STRUCTURAL_REASONS = frozenset({
    "not_utf8", "not_json", "not_a_json_object", "unknown_topic", "payload_too_large", "empty_batch",
    "batch_too_large", "reading_not_an_object", "event_not_an_object",
    *(f"{key}_not_a_list" for key in BATCH_KEYS.values()),
})
CLINICAL_RULES = frozenset(r.name for r in clinical_suite.rules(0))
TELEHEALTH_RULES = frozenset(r.name for r in telehealth_suite.rules(0))
CONFLICT = "conflicting_duplicate"
CONFLICT_DETAIL = "same device, metric and time as a loaded reading, different value"  # as warehouse/load.py
REPLAYABLE_REASONS = CLINICAL_RULES | TELEHEALTH_RULES | {CONFLICT}
KNOWN_REASONS = REPLAYABLE_REASONS | STRUCTURAL_REASONS


class NotReplayable(ValueError):
    """A reason a replay cannot change (structural) or does not know."""


def check_replayable(reason: str) -> None:
    if reason in STRUCTURAL_REASONS:
        raise NotReplayable(
            f"cannot replay {reason}: a structural reason (the message itself could not be read as contract v1), "
            "which no registry or rule change alters; its raw bytes stay in quarantine for a decoder fix")
    if reason not in REPLAYABLE_REASONS:
        raise NotReplayable(f"cannot replay {reason!r}: not a quarantine reason; replayable reasons: "
                            f"{', '.join(sorted(REPLAYABLE_REASONS))}")


# --- rebuilding an item from quarantine (pure) -------------------------------------------------------------

@dataclass(frozen=True)
class QuarantinedItem:
    row_key: str
    segment: str
    record_no: int
    item_no: int
    device_id: str | None
    reading_id: str | None      # the reading id, or the event id for telehealth items
    reasons: tuple[str, ...]
    raw: bytes | None
    received_at: datetime
    kind: str | None = None     # quarantine.kind; NULL for rows quarantined before the column existed


@dataclass(frozen=True)
class Rebuilt:
    kind: Kind
    row: dict[str, Any]         # a candidate row (CANDIDATE_COLUMNS or EVENT_COLUMNS)


class _Where(TypedDict):
    """The stored coordinates of a quarantined item, passed back to the normaliser that built its row."""

    device_id: str
    segment: str
    record_no: int
    item_no: int
    received_at: datetime


def _item(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    doc, _, _ = parse_json_object(bytes(raw))  # as the decoder reads a payload
    return doc


def rebuild(q: QuarantinedItem) -> Rebuilt | None:
    """The item's candidate row as the pipeline built it, or None if its kind or content cannot be known.

    The load records whether an item was a vitals reading, a device status or an app event
    (``quarantine.kind``); for rows quarantined before it did, the stored id tells exactly: the id each normaliser computes from the item matches only for the normaliser
    that produced it (a reading id hashes device|metric|instant, an event id device|event|instant|subject,
    and a status's event is always ``device_status``). An item stored without an id never had a readable
    time (or metric/event); the suite that judged it says which kind — except status against app event,
    which is left alone (no registry or rule change could make it pass without a time).
    """
    item = _item(q.raw)
    if item is None or q.device_id is None:
        return None
    where: _Where = {"device_id": q.device_id, "segment": q.segment, "record_no": q.record_no,
                     "item_no": q.item_no, "received_at": q.received_at}
    if q.kind == "reading":
        return Rebuilt("reading", candidate(item, **where))
    if q.kind == "status":
        return Rebuilt("status", event_candidate(item, channel="status", **where))
    if q.kind == "event":
        return Rebuilt("event", event_candidate(item, channel="events", **where))
    if q.kind == "message":
        return None
    reading = candidate(item, **where)
    if q.reading_id is None:
        clinical_only = set(q.reasons) & (CLINICAL_RULES - TELEHEALTH_RULES)
        return Rebuilt("reading", reading) if clinical_only else None
    if reading["reading_id"] == q.reading_id:
        return Rebuilt("reading", reading)
    # Status and app event ids could only coincide for an app "device_status" event at its reported_at:
    # then the kind is unknown, and the item is left alone.
    events: list[tuple[Kind, dict[str, Any]]] = [
        ("event", event_candidate(item, channel="events", **where)),
        ("status", event_candidate(item, channel="status", **where))]
    matches = [Rebuilt(kind, row) for kind, row in events if row["event_id"] == q.reading_id]
    return matches[0] if len(matches) == 1 else None


# --- the replay --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReplayResult:
    replay_id: str
    reason: str
    examined: int               # quarantined items carrying the reason
    loaded: int                 # now in readings / telehealth_events
    duplicates: int             # passed, but the reading was already loaded
    still_quarantined: int      # kept: with the reasons they fail today (or untouched, if not rebuilt)
    reasons_changed: int        # ... of which with different reasons than before
    not_rebuilt: int            # stored form could not be re-read as an item: left as it was
    still_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.loaded or self.duplicates or self.reasons_changed)

    def to_json(self) -> dict:
        return {**asdict(self), "changed": self.changed}


SELECT_ITEMS = """
SELECT row_key, segment, record_no, item_no, device_id, reading_id, reasons, raw, received_at, kind
FROM quarantine
WHERE list_contains(reasons, ?) AND segment IN (SELECT segment FROM segments)
ORDER BY segment, record_no, item_no
"""

# The load's classification (warehouse/load.py CLASSIFY), over the replayed items that passed: the first
# copy of a reading not yet loaded loads, an equal copy is a duplicate, a different value is a conflict.
CLASSIFY = """
CREATE OR REPLACE TEMP TABLE _rp_classified AS
WITH ok AS (
    SELECT c.*,
           row_number() OVER (PARTITION BY c.reading_id ORDER BY c.segment, c.record_no, c.item_no) AS rn,
           first_value(c.value) OVER w AS first_value, first_value(c.diastolic) OVER w AS first_diastolic
    FROM _rp_candidates c
    WHERE c.row_key NOT IN (SELECT row_key FROM _rp_verdicts)
    WINDOW w AS (PARTITION BY c.reading_id ORDER BY c.segment, c.record_no, c.item_no)
)
SELECT ok.*,
       CASE
         WHEN r.reading_id IS NULL AND ok.rn = 1 THEN 'load'
         WHEN r.reading_id IS NOT NULL
              AND r.value IS NOT DISTINCT FROM ok.value AND r.diastolic IS NOT DISTINCT FROM ok.diastolic
           THEN 'duplicate'
         WHEN r.reading_id IS NULL
              AND ok.first_value IS NOT DISTINCT FROM ok.value
              AND ok.first_diastolic IS NOT DISTINCT FROM ok.diastolic
           THEN 'duplicate'
         ELSE 'conflict'
       END AS fate
FROM ok LEFT JOIN readings r USING (reading_id)
"""

CLASSIFY_EVENTS = """
CREATE OR REPLACE TEMP TABLE _rp_events_classified AS
WITH ok AS (
    SELECT e.*, row_number() OVER (PARTITION BY e.event_id ORDER BY e.segment, e.record_no, e.item_no) AS rn
    FROM _rp_events e
    WHERE e.row_key NOT IN (SELECT row_key FROM _rp_verdicts)
)
SELECT ok.*, CASE WHEN t.event_id IS NULL AND ok.rn = 1 THEN 'load' ELSE 'duplicate' END AS fate
FROM ok LEFT JOIN telehealth_events t USING (event_id)
"""

INSERT_READINGS = """
INSERT INTO readings (reading_id, patient_id, device_id, metric, loinc, value, diastolic, unit, unit_sent,
                      source, measured_at, utc_offset_min, received_at, loaded_at, msg_id, segment, record_no,
                      item_no, extra, run_id, manual)
SELECT reading_id, patient_id, device_id, metric, loinc, value, diastolic, canonical_unit, unit, source,
       measured_at, utc_offset_min, received_at, now(), msg_id, segment, record_no, item_no, extra, $run, manual
FROM _rp_classified WHERE fate = 'load'
"""

INSERT_EVENTS = """
INSERT INTO telehealth_events (event_id, patient_id, device_id, channel, event, occurred_at, utc_offset_min,
    received_at, loaded_at, module, minutes, appointment_id, modality, scheduled_for, survey, battery_pct,
    signal_dbm, firmware, uptime_s, msg_id, segment, record_no, item_no, extra, run_id)
SELECT event_id, patient_id, device_id, channel, event, occurred_at, utc_offset_min, received_at, now(), module,
       minutes, appointment_id, modality, scheduled_for, survey, battery_pct, signal_dbm, firmware, uptime_s,
       msg_id, segment, record_no, item_no, extra, $run
FROM _rp_events_classified WHERE fate = 'load'
"""

INSERT_DUPLICATES = """
INSERT INTO duplicates (row_key, reading_id, segment, record_no, item_no, received_at, run_id)
SELECT row_key, reading_id, segment, record_no, item_no, received_at, $run
FROM _rp_classified WHERE fate = 'duplicate'
UNION ALL
SELECT row_key, event_id, segment, record_no, item_no, received_at, $run
FROM _rp_events_classified WHERE fate = 'duplicate'
"""

# Every rebuilt item's outcome: load | duplicate (leave quarantine) or quarantine with today's reasons.
OUTCOMES = f"""
CREATE OR REPLACE TEMP TABLE _rp_outcomes AS
SELECT row_key, segment, fate, NULL::VARCHAR[] AS reasons, NULL::VARCHAR AS detail
FROM _rp_classified WHERE fate IN ('load', 'duplicate')
UNION ALL
SELECT row_key, segment, 'quarantine', ['{CONFLICT}'], '{CONFLICT_DETAIL}' FROM _rp_classified WHERE fate = 'conflict'
UNION ALL
SELECT row_key, segment, fate, NULL, NULL FROM _rp_events_classified
UNION ALL
SELECT v.row_key, c.segment, 'quarantine', v.reasons, NULL
FROM _rp_verdicts v JOIN (SELECT row_key, segment FROM _rp_candidates
                          UNION ALL SELECT row_key, segment FROM _rp_events) c USING (row_key)
"""

MOVE_LEDGER = """
UPDATE segments SET loaded = segments.loaded + d.loaded, duplicates = segments.duplicates + d.duplicates,
                    quarantined = segments.quarantined - d.loaded - d.duplicates
FROM (SELECT segment, count(*) FILTER (fate = 'load') AS loaded, count(*) FILTER (fate = 'duplicate') AS duplicates
      FROM _rp_outcomes GROUP BY segment) d
WHERE segments.segment = d.segment AND d.loaded + d.duplicates > 0
"""

# Still quarantined: today's reasons (the order the suite gave), only where they differ, so a replay that
# changes nothing writes nothing.
RE_REASON = """
UPDATE quarantine SET reasons = o.reasons, detail = o.detail
FROM _rp_outcomes o
WHERE quarantine.row_key = o.row_key AND o.fate = 'quarantine'
  AND (quarantine.reasons <> o.reasons OR quarantine.detail IS DISTINCT FROM o.detail)
"""


class UnbalancedReplay(RuntimeError):
    """A segment touched by the replay would no longer balance: nothing of the replay was committed."""


def _items(con: duckdb.DuckDBPyConnection, reason: str) -> list[QuarantinedItem]:
    return [QuarantinedItem(r[0], r[1], r[2], r[3], r[4], r[5], tuple(r[6]), r[7], r[8], r[9])
            for r in con.execute(SELECT_ITEMS, [reason]).fetchall()]


def _temp_table(con: duckdb.DuckDBPyConnection, name: str, like: str, columns: list[str], measured: str,
                frame: pd.DataFrame) -> None:
    """A TEMP table shaped like a staging table (same types as the pipeline), holding ``frame`` with each
    row's patient by enrollment at its measured instant."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT * EXCLUDE (batch_id) FROM {like} LIMIT 0")
    if len(frame):
        con.register("_rp_frame", frame)
        con.execute(f"INSERT INTO {name} ({', '.join(columns)}, patient_id) "
                    f"SELECT {', '.join(f'c.{c}' for c in columns)}, {patient_at(measured)} FROM _rp_frame c")
        con.unregister("_rp_frame")


def _verdicts(con: duckdb.DuckDBPyConnection, future_skew_s: int) -> dict[str, list[str]]:
    """The suites' verdicts on the rebuilt items (only failing rows), read back from DuckDB as the quality
    gate reads the staging tables (pipeline/validate.py), so GX sees the same types — with the registry's
    kind of the sending device, which the suites judge too."""
    out: dict[str, list[str]] = {}
    for table, judge in (("_rp_candidates", clinical_suite.validate), ("_rp_events", telehealth_suite.validate)):
        cur = con.execute(f"SELECT t.*, {DEVICE_KIND} AS device_kind FROM {table} t")
        while not (chunk := cur.fetch_df_chunk(max(1, Sizes.validate_rows // 2048))).empty:  # the gate's chunk size
            out.update(judge(chunk, future_skew_s))
    return out


def replay(con: duckdb.DuckDBPyConnection, reason: str, future_skew_s: int, replay_id: str) -> ReplayResult:
    """Re-judge the quarantined items carrying ``reason`` and commit where each now belongs."""
    check_replayable(reason)
    items = _items(con, reason)
    rebuilt = [(q, rebuild(q)) for q in items]
    readings = [r.row for _, r in rebuilt if r is not None and r.kind == "reading"]
    events = [r.row for _, r in rebuilt if r is not None and r.kind != "reading"]
    _temp_table(con, "_rp_candidates", "stg_candidates", CANDIDATE_COLUMNS, "measured_at",
                pd.DataFrame(readings, columns=CANDIDATE_COLUMNS))
    _temp_table(con, "_rp_events", "stg_events", EVENT_COLUMNS, "occurred_at",
                pd.DataFrame(events, columns=EVENT_COLUMNS))
    verdicts = _verdicts(con, future_skew_s)
    con.execute("CREATE OR REPLACE TEMP TABLE _rp_verdicts (row_key VARCHAR, reasons VARCHAR[])")
    if verdicts:
        con.register("_rp_v", pd.DataFrame({"row_key": list(verdicts), "reasons": list(verdicts.values())}))
        con.execute("INSERT INTO _rp_verdicts SELECT row_key, reasons FROM _rp_v")
        con.unregister("_rp_v")
    with transaction(con):
        con.execute(CLASSIFY)
        con.execute(CLASSIFY_EVENTS)
        con.execute(OUTCOMES)
        reasons_changed = con.execute("""
            SELECT count(*) FROM _rp_outcomes o JOIN quarantine q USING (row_key)
            WHERE o.fate = 'quarantine' AND (q.reasons <> o.reasons OR q.detail IS DISTINCT FROM o.detail)
            """).fetchone()[0]  # type: ignore[index]
        con.execute(INSERT_READINGS, {"run": replay_id})
        note_days(con, "(SELECT * REPLACE (canonical_unit AS unit) FROM _rp_classified WHERE fate = 'load')")
        con.execute(INSERT_EVENTS, {"run": replay_id})
        con.execute(INSERT_DUPLICATES, {"run": replay_id})
        con.execute(MOVE_LEDGER)
        con.execute("DELETE FROM quarantine WHERE row_key IN "
                    "(SELECT row_key FROM _rp_outcomes WHERE fate IN ('load', 'duplicate'))")
        con.execute(RE_REASON)
        note_loaded(con, "(SELECT * FROM _rp_classified WHERE fate = 'load')")  # alerts re-evaluate them
        unbalanced = con.execute("""
            SELECT segment, items, loaded, quarantined, duplicates FROM segments
            WHERE segment IN (SELECT segment FROM _rp_outcomes) AND items <> loaded + quarantined + duplicates
            """).fetchall()
        if unbalanced:
            raise UnbalancedReplay(f"segments would not balance, replay not committed: {unbalanced[:5]}")
        fates = dict(con.execute("SELECT fate, count(*) FROM _rp_outcomes GROUP BY fate").fetchall())
        still = dict(con.execute("""
            SELECT reason, count(*) FROM (SELECT unnest(reasons) AS reason FROM _rp_outcomes
                                          WHERE fate = 'quarantine') GROUP BY reason ORDER BY count(*) DESC, reason
            """).fetchall())
        result = ReplayResult(
            replay_id=replay_id, reason=reason, examined=len(items), loaded=fates.get("load", 0),
            duplicates=fates.get("duplicate", 0),
            still_quarantined=fates.get("quarantine", 0) + sum(r is None for _, r in rebuilt),
            reasons_changed=reasons_changed, not_rebuilt=sum(r is None for _, r in rebuilt),
            still_by_reason=still)
        con.execute("INSERT INTO quarantine_replays VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [replay_id, reason, datetime.now(UTC), result.examined, result.loaded, result.duplicates,
                     result.still_quarantined, result.reasons_changed, result.not_rebuilt])
    return result


def replay_quarantine(s: Settings, reason: str) -> ReplayResult:
    """`rpm quarantine replay --reason R`: replay, then publish a serving snapshot if anything moved."""
    from warehouse.db import clinical
    from warehouse.serving import publish_snapshot

    check_replayable(reason)  # before opening the warehouse: a refusal needs no lock
    replay_id = f"replay-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}"
    with clinical(s) as con:
        result = replay(con, reason, s.future_skew_s, replay_id)
        if result.changed:
            publish_snapshot(s, con)  # clinicians read snapshots: the moved readings must reach them
    return result


# --- listing -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuarantineListing:
    total: int
    by_reason: dict[str, int]           # a row may break several rules: may sum to more than total
    replayable: dict[str, bool]         # per reason in by_reason
    items: list[dict]                   # newest first, at most ``limit``: where, what kind, why — no values
    matching: int                       # items carrying the reason asked for (or total)

    def to_json(self) -> dict:
        return asdict(self)


def list_quarantine(con: duckdb.DuckDBPyConnection, reason: str | None = None, limit: int = 100,
                    ) -> QuarantineListing:
    """What quarantine holds, by reason, and its items (row key, device, kind, reasons, times; no payload)."""
    total = con.execute("SELECT count(*) FROM quarantine").fetchone()[0]  # type: ignore[index]
    by_reason = dict(con.execute("""SELECT reason, count(*) FROM (SELECT unnest(reasons) AS reason FROM quarantine)
                                    GROUP BY reason ORDER BY count(*) DESC, reason""").fetchall())
    where = "WHERE $reason IS NULL OR list_contains(reasons, $reason)"
    matching = con.execute(f"SELECT count(*) FROM quarantine {where}",
                           {"reason": reason}).fetchone()[0]  # type: ignore[index]
    found = rows(con.execute(f"""
        SELECT row_key, segment, record_no, item_no, device_id, reading_id, reasons, detail, raw, received_at,
               quarantined_at, run_id, kind
        FROM quarantine {where} ORDER BY quarantined_at DESC, row_key LIMIT $limit""",
                             {"reason": reason, "limit": limit}))
    items = []
    for r in found:
        q = QuarantinedItem(r["row_key"], r["segment"], r["record_no"], r["item_no"], r["device_id"],
                            r["reading_id"], tuple(r["reasons"]), r["raw"], r["received_at"], r["kind"])
        structural = bool(set(q.reasons) & STRUCTURAL_REASONS)
        built = None if structural else rebuild(q)
        items.append({"row_key": q.row_key, "device_id": q.device_id,
                      "kind": "message" if structural else (built.kind if built else None),
                      "reasons": list(q.reasons), "detail": r["detail"], "received_at": r["received_at"],
                      "quarantined_at": r["quarantined_at"], "run_id": r["run_id"]})
    return QuarantineListing(total, by_reason, {k: k in REPLAYABLE_REASONS for k in by_reason}, items, matching)
