"""Stage a batch: decode and normalise its landing segments into the (encrypted) staging tables.

Ordinary vitals messages are decoded and normalised in bulk inside DuckDB (transforms/fastpath.py); every
other message — telehealth events, anything unusual or unreadable, and whatever the bulk path hands back —
goes through the reference normaliser (transforms/normalise.py). Both produce the same candidate rows.

A segment is read whole before any of its records is staged: one that cannot be read (bad header, a record
that is not JSON, a key the keyring lacks, failed authentication) is moved to ``landing/rejected/`` and
recorded in ``rejected_segments``, and the batch goes on without it — one poison file must not stop every
run. An OSError (permissions, I/O) is the environment's fault, not the segment's: the task fails.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import pandas as pd

from core.keyring import Keyring
from core.landing import (
    SEGMENT_SUFFIX,
    LandedRecord,
    RejectedSegment,
    UnreadableSegment,
    read_whole_segment,
    reject_segment,
    rejected_dir,
    sealed_dir,
)
from core.settings import Settings
from core.topics import parse_topic
from pipeline import Sizes
from transforms import fastpath
from transforms.events import EVENT_COLUMNS
from transforms.normalise import CANDIDATE_COLUMNS, EventRow, StructuralReject, normalise_records
from warehouse.db import transaction
from warehouse.ledger import Batch, reconcile_rejected, record_rejection
from warehouse.load import STAGING_TABLES

log = logging.getLogger(__name__)

REJECT_COLUMNS = ["row_key", "segment", "record_no", "item_no", "device_id", "received_at", "reason",
                  "detail", "raw"]
FAST_COLUMNS = ["i", "segment", "record_no", "device_id", "received_at", "payload", "batch"]


@dataclass
class Decoded:
    """A batch's landed messages, split between the bulk (DuckDB) path and the reference path."""
    messages: dict[str, int] = field(default_factory=dict)       # per segment
    fast: dict[str, list] = field(default_factory=lambda: {c: [] for c in FAST_COLUMNS})
    fast_records: list[LandedRecord] = field(default_factory=list)   # by msgs.i
    slow: list[tuple[str, LandedRecord]] = field(default_factory=list)

    def add(self, segment: str, rec: LandedRecord, max_payload_bytes: int) -> None:
        topic = parse_topic(rec.topic)
        text = (fastpath.precheck(rec.payload, max_payload_bytes)
                if topic is not None and topic.channel == "vitals" else None)
        if text is None:
            self.slow.append((segment, rec))
            return
        values = (len(self.fast_records), segment, rec.n, topic.device_id, rec.received_at, text,  # type: ignore[union-attr]
                  '"readings"' in text)
        for column, value in zip(FAST_COLUMNS, values, strict=True):
            self.fast[column].append(value)
        self.fast_records.append(rec)


def read_batch(s: Settings, batch: Batch, on_reject: Callable[[RejectedSegment], None] | None = None,
               chunk_messages: int = Sizes.stage_messages) -> Iterator[Decoded]:
    """Decrypt the landed messages of a batch and route each to a decode path, in chunks of whole segments
    of about ``chunk_messages`` (so memory stays bounded however many segments a run claims).

    A segment that cannot be read whole is moved to rejected/ (``on_reject`` records it) and skipped.
    """
    keyring = Keyring.load(s, "landing")
    out = Decoded()
    for name in batch.segments:
        path = sealed_dir(s.landing_dir) / f"{name}{SEGMENT_SUFFIX}"
        if not path.exists() and (rejected_dir(s.landing_dir) / path.name).exists():
            continue  # set aside by an earlier attempt of this task (its row was written or is reconciled)
        try:
            records = read_whole_segment(path, keyring)  # ≤ 16 MiB: whole, so nothing of a poison one is staged
        except UnreadableSegment as exc:
            info = reject_segment(s.landing_dir, path, exc.reason, exc.detail,
                                  origin=f"batch {batch.batch_id}")
            log.warning("landing segment %s set aside in %s (%s: %s); the run goes on without it. Fix the cause, "
                        "then `rpm landing replay %s`", path.name, rejected_dir(s.landing_dir),
                        exc.reason, exc.detail, name)
            if on_reject is not None:
                on_reject(info)
            continue
        for rec in records:
            out.add(name, rec, s.max_payload_bytes)
        out.messages[name] = len(records)
        if sum(out.messages.values()) >= chunk_messages:
            yield out
            out = Decoded()
    if out.messages:
        yield out


def reference_rows(records: list[tuple[str, LandedRecord]], max_payload_bytes: int,
                   ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(reading candidates, event candidates, structural rejects) of messages, by the reference normaliser."""
    rows: list[dict] = []
    events: list[dict] = []
    rejects: list[dict] = []
    for segment, rec in records:
        for out in normalise_records(segment, [rec], max_payload_bytes):
            if isinstance(out, StructuralReject):
                rejects.append({c: getattr(out, c) for c in REJECT_COLUMNS})
            elif isinstance(out, EventRow):
                events.append(out)
            else:
                rows.append(out)
    return (pd.DataFrame(rows, columns=CANDIDATE_COLUMNS), pd.DataFrame(events, columns=EVENT_COLUMNS),
            pd.DataFrame(rejects, columns=REJECT_COLUMNS))


def bulk_candidates(con, decoded: Decoded) -> list[tuple[str, LandedRecord]]:
    """Normalise the fast messages (temp tables msgs, _fp_*); returns the messages handed back."""
    frame = pd.DataFrame(decoded.fast, columns=FAST_COLUMNS)
    frame["received_at"] = pd.to_datetime(frame["received_at"], utc=True)
    # Copied into DuckDB once: scanning Python strings out of pandas holds the GIL (one thread, every scan).
    con.register("msgs_frame", frame)
    con.execute("CREATE OR REPLACE TEMP TABLE msgs AS SELECT * FROM msgs_frame")
    con.unregister("msgs_frame")
    for sql in (fastpath.ITEMS, fastpath.ROWS, fastpath.BACK):
        con.execute(sql)
    back = con.execute("SELECT i FROM _fp_back ORDER BY i").fetchall()
    return [(decoded.fast["segment"][i], decoded.fast_records[i]) for (i,) in back]


# The patient is whoever the source was enrolled to at the *measured* instant (enrollments of one device
# never overlap: the registry refuses back-dating, so the lookup finds at most one).
_MEASURED = {"stg_candidates": "measured_at", "stg_events": "occurred_at"}


def patient_at(measured: str, alias: str = "c") -> str:
    """SQL: the patient ``alias``'s device was enrolled to at its ``measured`` instant (NULL if none)."""
    return (f"(SELECT any_value(e.patient_id) FROM enrollments e WHERE e.device_id = {alias}.device_id "
            f"AND {alias}.{measured} >= e.valid_from AND (e.valid_to IS NULL OR {alias}.{measured} < e.valid_to))")


def _insert(con, table: str, columns: list[str], source: str, batch_id: str) -> None:
    """INSERT rows of ``source`` into a staging table, with the batch id and (readings, events) the patient."""
    names, cols = ", ".join(columns), ", ".join(f"c.{c}" for c in columns)
    measured = _MEASURED.get(table)
    if measured is None:
        con.execute(f"INSERT INTO {table} ({names}, batch_id) SELECT {cols}, ? FROM {source} c", [batch_id])
        return
    con.execute(f"""
        INSERT INTO {table} ({names}, batch_id, patient_id)
        SELECT {cols}, ?, {patient_at(measured)}
        FROM {source} c""", [batch_id])


def stage_chunk(con, s: Settings, batch_id: str, decoded: Decoded) -> int:
    """Stage one chunk of decoded messages; returns how many messages took the bulk path."""
    handed_back = bulk_candidates(con, decoded) if decoded.fast_records else []
    candidates, events, rejects = reference_rows(decoded.slow + handed_back, s.max_payload_bytes)
    if decoded.fast_records:
        _insert(con, "stg_candidates", CANDIDATE_COLUMNS, f"({fastpath.CANDIDATES})", batch_id)
    for frame, table, columns in ((candidates, "stg_candidates", CANDIDATE_COLUMNS),
                                  (events, "stg_events", EVENT_COLUMNS),
                                  (rejects, "stg_rejects", REJECT_COLUMNS)):
        if len(frame):
            con.register("frame", frame)
            _insert(con, table, columns, "frame", batch_id)
            con.unregister("frame")
    seg = pd.DataFrame({"segment": list(decoded.messages), "messages": list(decoded.messages.values())})
    con.register("sg", seg)
    con.execute("INSERT INTO stg_segments SELECT ?, segment, messages FROM sg", [batch_id])
    con.unregister("sg")
    return len(decoded.fast_records) - len(handed_back)


@dataclass(frozen=True)
class Staged:
    """What the stage put into staging for a batch (counts only: XCom carries no data)."""
    segments: int
    messages: int
    candidates: int
    events: int
    unreadable: int
    bulk_decoded: int
    rejected: int  # segments set aside in landing/rejected/ by this stage

    def to_xcom(self) -> dict:
        return asdict(self)


def stage_batch(con, s: Settings, batch: Batch, chunk_messages: int = Sizes.stage_messages) -> Staged:
    """Replace the staging of ``batch`` (and drop any abandoned batch) with its decoded rows; ``con`` is a
    writable warehouse connection, ``chunk_messages`` how many messages are decoded and committed at a time.

    Each chunk commits on its own, with its segments' ``stg_segments`` rows: one transaction holding a whole
    large batch kept its uncommitted rows in memory (this task's peak at 5M readings: 2.7 GB, 1.8 GB per
    chunk). A stage that dies half-way is redone from the start (the staging is cleared first, validation
    record included, so the load refuses the batch until validate has run again; in the DAG it runs only
    after a complete stage).
    """
    segments = messages = bulk = 0
    rejected: list[RejectedSegment] = []

    def set_aside(info: RejectedSegment) -> None:
        record_rejection(con, info, batch.batch_id)
        rejected.append(info)

    reconcile_rejected(con, s.landing_dir)  # a crash between a move and its row
    with transaction(con):
        for table in STAGING_TABLES:
            con.execute(f"DELETE FROM {table}")  # max_active_runs=1: anything here is this batch or abandoned
    for decoded in read_batch(s, batch, set_aside, chunk_messages):
        with transaction(con):
            bulk += stage_chunk(con, s, batch.batch_id, decoded)
        gc.collect()  # the chunk's frames may sit in reference cycles: free them before the next chunk
        segments += len(decoded.messages)
        messages += sum(decoded.messages.values())
    counts = con.execute("""SELECT (SELECT count(*) FROM stg_candidates WHERE batch_id = $b),
                                   (SELECT count(*) FROM stg_events WHERE batch_id = $b),
                                   (SELECT count(*) FROM stg_rejects WHERE batch_id = $b)""",
                         {"b": batch.batch_id}).fetchone()
    return Staged(segments, messages, counts[0], counts[1], counts[2], bulk, len(rejected))
