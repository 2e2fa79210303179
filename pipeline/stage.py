"""Stage a batch: decode and normalise its landing segments into the (encrypted) staging tables.

Every message takes the one decoder (transforms/normalise.py): each message is parsed once, strictly, in C
(core/payload.py), a segment's items are read field by field into columns, and DuckDB turns the columns
into candidate rows in bulk, straight into staging.
Telehealth events and structural rejects (rare) are staged from rows.

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
    SEGMENT_READ_MAX_BYTES,
    SEGMENT_SUFFIX,
    RejectedSegment,
    UnreadableSegment,
    read_segment_columns,
    reject_segment,
    rejected_dir,
    sealed_dir,
)
from core.settings import Settings
from pipeline import Sizes
from transforms.events import EVENT_COLUMNS
from transforms.normalise import CANDIDATE_COLUMNS, Items, Normalised, candidates_sql, decode_columns
from warehouse.db import transaction
from warehouse.ledger import Batch, reconcile_rejected, record_rejection
from warehouse.load import STAGING_TABLES

log = logging.getLogger(__name__)

REJECT_COLUMNS = ["row_key", "segment", "record_no", "item_no", "device_id", "received_at", "reason",
                  "detail", "raw"]


@dataclass
class Decoded:
    """A chunk of a batch's landed messages, decoded, and how many messages each segment held."""
    normalised: Normalised = field(default_factory=lambda: Normalised(Items(), [], []))
    messages: dict[str, int] = field(default_factory=dict)       # per segment


def read_batch(s: Settings, batch: Batch, on_reject: Callable[[RejectedSegment], None] | None = None,
               chunk_messages: int = Sizes.stage_messages, chunk_items: int = Sizes.stage_items,
               ) -> Iterator[Decoded]:
    """Decrypt and decode the landed messages of a batch, in chunks of whole segments of about
    ``chunk_messages`` messages or ``chunk_items`` items, whichever comes first (so memory stays bounded
    however many segments a run claims and however many readings a message holds).

    A segment that cannot be read whole is moved to rejected/ (``on_reject`` records it) and skipped.
    """
    keyring = Keyring.load(s, "landing")
    # A segment is sealed past segment_max_bytes by at most one fsync group (whose messages are all unacked,
    # so at most ingest_receive_maximum broker packets): anything much larger was not written by ingest.
    max_bytes = max(SEGMENT_READ_MAX_BYTES,
                    2 * (s.segment_max_bytes + s.ingest_receive_maximum * (s.max_payload_bytes + 1024)))
    out = Decoded()
    for name in batch.segments:
        path = sealed_dir(s.landing_dir) / f"{name}{SEGMENT_SUFFIX}"
        if not path.exists() and (rejected_dir(s.landing_dir) / path.name).exists():
            continue  # set aside by an earlier attempt of this task (its row was written or is reconciled)
        try:
            columns = read_segment_columns(path, keyring, max_bytes)  # whole, so nothing of a poison one is staged
        except UnreadableSegment as exc:
            info = reject_segment(s.landing_dir, path, exc.reason, exc.detail,
                                  origin=f"batch {batch.batch_id}")
            log.warning("landing segment %s set aside in %s (%s: %s); the run goes on without it. Fix the cause, "
                        "then `rpm landing replay %s`", path.name, rejected_dir(s.landing_dir),
                        exc.reason, exc.detail, name)
            if on_reject is not None:
                on_reject(info)
            continue
        decode_columns(name, columns, s.max_payload_bytes, into=out.normalised, lazy_raw=True)
        out.messages[name] = len(columns.n)
        if sum(out.messages.values()) >= chunk_messages or len(out.normalised.items) >= chunk_items:
            yield out
            out = Decoded()
    if out.messages:
        yield out


# The patient is whoever the source was enrolled to at the *measured* instant (enrollments of one device
# never overlap: the registry refuses back-dating, so the lookup finds at most one).
_MEASURED = {"stg_candidates": "measured_at", "stg_events": "occurred_at"}


def patient_at(measured: str, alias: str = "c") -> str:
    """SQL: the patient ``alias``'s device was enrolled to at its ``measured`` instant (NULL if none)."""
    return (f"(SELECT any_value(e.patient_id) FROM enrollments e WHERE e.device_id = {alias}.device_id "
            f"AND {alias}.{measured} >= e.valid_from AND (e.valid_to IS NULL OR {alias}.{measured} < e.valid_to))")


def _insert(con, table: str, columns: list[str], source: str, batch_id: str, rows: int) -> None:
    """INSERT the ``rows`` rows of ``source`` into a staging table, with the batch id and (readings, events)
    the patient.

    The patient comes from a join on the device (a hash join, then the instant's range): ``patient_at``'s
    correlated form is planned as a range join over every enrollment, 2.4 s per 250k readings at 5,000
    devices and growing with the fleet; the join, 0.3 s. The join would repeat a row if a device's
    enrollments ever overlapped, so the count is checked: a staging that does not hold each row once fails
    the task rather than the accounting."""
    names, cols = ", ".join(columns), ", ".join(f"c.{c}" for c in columns)
    measured = _MEASURED.get(table)
    if measured is None:
        con.execute(f"INSERT INTO {table} ({names}, batch_id) SELECT {cols}, ? FROM {source} c", [batch_id])
        return
    (inserted,) = con.execute(f"""
        INSERT INTO {table} ({names}, batch_id, patient_id)
        SELECT {cols}, ?, e.patient_id
        FROM {source} c LEFT JOIN enrollments e
          ON e.device_id = c.device_id AND c.{measured} >= e.valid_from
         AND c.{measured} < coalesce(e.valid_to, 'infinity'::TIMESTAMPTZ)""", [batch_id]).fetchone()
    if inserted != rows:
        raise RuntimeError(f"{table}: {inserted} rows staged for {rows} (overlapping enrollments of a device?)")


def stage_chunk(con, s: Settings, batch_id: str, decoded: Decoded) -> None:
    """Stage one chunk of decoded messages."""
    norm = decoded.normalised
    if len(norm.items):
        messages, items = norm.items.frames()
        con.register("_stage_messages", messages)
        con.register("_stage_items", items)
        # Rows in any order (every reader orders or keys them: row_key, segment/record/item): DuckDB then
        # computes and writes them on every thread, not in one ordered stream (-40% at 300k readings).
        con.execute("SET preserve_insertion_order = false")
        try:
            _insert(con, "stg_candidates", CANDIDATE_COLUMNS,
                    f"({candidates_sql('_stage_messages', '_stage_items')})", batch_id, len(items))
        finally:
            con.execute("RESET preserve_insertion_order")
        # batch items' raw stays null: built from their message only if they go to quarantine (warehouse/load.py)
        con.execute("INSERT INTO stg_messages SELECT ?, segment, record_no, payload FROM _stage_messages WHERE batch",
                    [batch_id])
        con.unregister("_stage_items")
        con.unregister("_stage_messages")
    for frame, table, columns in (
            (pd.DataFrame(norm.events, columns=EVENT_COLUMNS), "stg_events", EVENT_COLUMNS),
            (pd.DataFrame([[getattr(r, c) for c in REJECT_COLUMNS] for r in norm.rejects], columns=REJECT_COLUMNS),
             "stg_rejects", REJECT_COLUMNS)):
        if len(frame):
            con.register("frame", frame)
            _insert(con, table, columns, "frame", batch_id, len(frame))
            con.unregister("frame")
    seg = pd.DataFrame({"segment": list(decoded.messages), "messages": list(decoded.messages.values())})
    con.register("sg", seg)
    con.execute("INSERT INTO stg_segments SELECT ?, segment, messages FROM sg", [batch_id])
    con.unregister("sg")


@dataclass(frozen=True)
class Staged:
    """What the stage put into staging for a batch (counts only: XCom carries no data)."""
    segments: int
    messages: int
    candidates: int
    events: int
    unreadable: int
    rejected: int  # segments set aside in landing/rejected/ by this stage

    def to_xcom(self) -> dict:
        return asdict(self)


def stage_batch(con, s: Settings, batch: Batch, chunk_messages: int = Sizes.stage_messages,
                chunk_items: int = Sizes.stage_items) -> Staged:
    """Replace the staging of ``batch`` (and drop any abandoned batch) with its decoded rows; ``con`` is a
    writable warehouse connection, ``chunk_messages`` / ``chunk_items`` how many messages / items (at most,
    in whole segments) are decoded and committed at a time.

    Each chunk commits on its own, with its segments' ``stg_segments`` rows: one transaction holding a whole
    large batch kept its uncommitted rows in memory (this task's peak at 5M readings: 2.7 GB, 1.8 GB per
    chunk). A stage that dies half-way is redone from the start (the staging is cleared first, validation
    record included, so the load refuses the batch until validate has run again; in the DAG it runs only
    after a complete stage).
    """
    segments = messages = 0
    rejected: list[RejectedSegment] = []

    def set_aside(info: RejectedSegment) -> None:
        record_rejection(con, info, batch.batch_id)
        rejected.append(info)

    reconcile_rejected(con, s.landing_dir)  # a crash between a move and its row
    with transaction(con):
        for table in STAGING_TABLES:
            con.execute(f"DELETE FROM {table}")  # max_active_runs=1: anything here is this batch or abandoned
    for decoded in read_batch(s, batch, set_aside, chunk_messages, chunk_items):
        with transaction(con):
            stage_chunk(con, s, batch.batch_id, decoded)
        gc.collect()  # the chunk's frames may sit in reference cycles: free them before the next chunk
        segments += len(decoded.messages)
        messages += sum(decoded.messages.values())
    counts = con.execute("""SELECT (SELECT count(*) FROM stg_candidates WHERE batch_id = $b),
                                   (SELECT count(*) FROM stg_events WHERE batch_id = $b),
                                   (SELECT count(*) FROM stg_rejects WHERE batch_id = $b)""",
                         {"b": batch.batch_id}).fetchone()
    return Staged(segments, messages, counts[0], counts[1], counts[2], len(rejected))
