"""Stage a batch: decode and normalise its landing segments into the (encrypted) staging tables."""

from __future__ import annotations

import pandas as pd

from ingest.landing import SEGMENT_SUFFIX, read_segment, sealed_dir
from rpmctl.crypto import Keyring
from rpmctl.settings import Settings
from transforms.events import EVENT_COLUMNS
from transforms.normalise import CANDIDATE_COLUMNS, EventRow, StructuralReject, normalise_records
from warehouse.db import clinical, transaction
from warehouse.ledger import Batch

STAGING_TABLES = ("stg_candidates", "stg_events", "stg_rejects", "stg_segments", "stg_verdicts", "stg_validated")
REJECT_COLUMNS = ["row_key", "segment", "record_no", "item_no", "device_id", "received_at", "reason",
                  "detail", "raw"]


def decode_batch(s: Settings, batch: Batch) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """(reading candidates, event candidates, structural rejects, messages per segment) of a batch."""
    rows: list[dict] = []
    events: list[dict] = []
    rejects: list[dict] = []
    messages: dict[str, int] = {}
    keyring = Keyring.load(s, "landing")
    for name in batch.segments:
        path = sealed_dir(s.landing_dir) / f"{name}{SEGMENT_SUFFIX}"  # type: ignore[arg-type]
        records = list(read_segment(path, keyring))
        messages[name] = len(records)
        for out in normalise_records(name, records, s.max_payload_bytes):
            if isinstance(out, StructuralReject):
                rejects.append({c: getattr(out, c) for c in REJECT_COLUMNS})
            elif isinstance(out, EventRow):
                events.append(out)
            else:
                rows.append(out)
    return (pd.DataFrame(rows, columns=CANDIDATE_COLUMNS), pd.DataFrame(events, columns=EVENT_COLUMNS),
            pd.DataFrame(rejects, columns=REJECT_COLUMNS), messages)


def stage_batch(s: Settings, batch: Batch) -> dict[str, int]:
    """Replace the staging of ``batch`` (and drop any abandoned batch) with its decoded rows."""
    candidates, events, rejects, messages = decode_batch(s, batch)
    seg = pd.DataFrame({"segment": list(messages), "messages": list(messages.values())})
    with clinical(s) as con, transaction(con):
        for table in STAGING_TABLES:
            con.execute(f"DELETE FROM {table}")  # max_active_runs=1: anything here is this batch or abandoned
        for frame, table, columns, measured in ((candidates, "stg_candidates", CANDIDATE_COLUMNS, "measured_at"),
                                                 (events, "stg_events", EVENT_COLUMNS, "occurred_at"),
                                                 (rejects, "stg_rejects", REJECT_COLUMNS, None)):
            if not len(frame):
                continue
            con.register("frame", frame)
            cols = ", ".join(columns)
            con.execute(f"INSERT INTO {table} ({cols}, batch_id) SELECT {cols}, ? FROM frame", [batch.batch_id])
            con.unregister("frame")
            if measured:
                # The patient is whoever the source was enrolled to at the *measured* instant.
                con.execute(f"""
                    UPDATE {table} c SET patient_id = e.patient_id
                    FROM enrollments e
                    WHERE e.device_id = c.device_id AND c.{measured} >= e.valid_from
                      AND (e.valid_to IS NULL OR c.{measured} < e.valid_to)""")
        if len(seg):
            con.register("sg", seg)
            con.execute("INSERT INTO stg_segments SELECT ?, segment, messages FROM sg", [batch.batch_id])
    return {"segments": len(messages), "messages": sum(messages.values()), "candidates": len(candidates),
            "events": len(events), "unreadable": len(rejects)}
