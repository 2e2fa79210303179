"""The accounting identity every message that reached the broker must satisfy.

    received = loaded + quarantined + duplicates

``received`` counts items: readings and telehealth events (a batch message contributes one per item; an
unreadable message counts as one).
Messages landed but not yet processed are reported as pending, so nothing in between goes unseen.

A sealed segment that could not be read at all is *rejected* (set aside in landing/rejected/): its items are
unknown until the cause is fixed, so it stays outside the identity and is reported beside it — segments,
messages (lines), bytes, by reason, and each one waiting. Every sealed segment is absorbed, rejected or
pending; a rejected segment replayed after a fix is absorbed (or rejected again) by the next run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.landing import SEGMENT_SUFFIX, count_records, list_sealed, open_dir
from core.settings import Settings
from warehouse.db import one_row
from warehouse.ledger import WaitingSegment, waiting_rejected
from warehouse.serving import serving


@dataclass(frozen=True)
class LedgerFigures:
    """What the warehouse records: the segment ledger's totals and the tables' counts."""
    messages: int = 0
    received: int = 0
    ledger_outcomes: tuple[int, int, int] = (0, 0, 0)   # loaded, quarantined, duplicates per the ledger
    table_outcomes: tuple[int, int, int] = (0, 0, 0)    # the same, counted in the tables
    loaded_by_stream: dict[str, int] = field(default_factory=lambda: {"readings": 0, "telehealth_events": 0})
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    absorbed: frozenset[str] = frozenset()


def accounting(s: Settings) -> dict:
    """The identity as the latest serving snapshot records it (a reader never opens the writer's file), with
    what landing holds beside it. Before the first pipeline run everything is zero and the identity holds."""
    if not s.clinical_db.exists():
        return _tally(s, LedgerFigures(), waiting_rejected(None, s.landing_dir))
    with serving(s) as con:
        return _tally(s, _figures(con), waiting_rejected(con, s.landing_dir))


def _figures(con) -> LedgerFigures:
    messages, received, loaded_seg, quarantined_seg, duplicates_seg = one_row(con.execute("""
        SELECT coalesce(sum(messages), 0), coalesce(sum(items), 0), coalesce(sum(loaded), 0),
               coalesce(sum(quarantined), 0), coalesce(sum(duplicates), 0)
        FROM segments"""))
    readings, events, quarantined, duplicates = one_row(con.execute("""
        SELECT (SELECT count(*) FROM readings), (SELECT count(*) FROM telehealth_events),
               (SELECT count(*) FROM quarantine), (SELECT count(*) FROM duplicates)"""))
    by_reason = dict(con.execute("""
        SELECT reason, count(*) FROM (SELECT unnest(reasons) AS reason FROM quarantine)
        GROUP BY reason ORDER BY count(*) DESC, reason""").fetchall())
    absorbed = frozenset(r[0] for r in con.execute("SELECT segment FROM segments").fetchall())
    return LedgerFigures(int(messages), int(received), (int(loaded_seg), int(quarantined_seg), int(duplicates_seg)),
                         (int(readings) + int(events), int(quarantined), int(duplicates)),
                         {"readings": int(readings), "telehealth_events": int(events)},
                         {k: int(v) for k, v in by_reason.items()}, absorbed)


def _tally(s: Settings, f: LedgerFigures, rejected: list[WaitingSegment]) -> dict:
    pending = [p for p in list_sealed(s.landing_dir) if p.stem not in f.absorbed]
    open_segments = sorted(open_dir(s.landing_dir).glob(f"*{SEGMENT_SUFFIX}"))
    loaded, quarantined, duplicates = f.table_outcomes
    return {
        "messages_processed": f.messages,
        "received": f.received,
        "loaded": loaded,
        "loaded_by_stream": f.loaded_by_stream,
        "quarantined": quarantined,
        "quarantined_by_reason": f.quarantined_by_reason,
        "duplicates": duplicates,
        # The ledger's per-segment counts and the tables must tell the same story.
        "balanced": f.received == loaded + quarantined + duplicates and f.table_outcomes == f.ledger_outcomes,
        "segments_processed": len(f.absorbed),
        "pending": {
            "sealed_segments": len(pending),
            "sealed_messages": sum(count_records(p) for p in pending),
            "open_segments": len(open_segments),
            "open_messages": sum(count_records(p) for p in open_segments),
        },
        "rejected": rejected_summary(rejected),
    }


def rejected_summary(waiting: list[WaitingSegment]) -> dict:
    """Segments set aside as unreadable and not yet replayed: totals, by reason, and each one."""
    by_reason: dict[str, int] = {}
    for w in waiting:
        by_reason[w.reason] = by_reason.get(w.reason, 0) + 1
    return {"segments": len(waiting), "messages": sum(w.records for w in waiting),
            "bytes": sum(w.bytes for w in waiting), "by_reason": by_reason,
            "waiting": [w.to_json() for w in waiting]}


def describe_rejected(acc: dict) -> list[str]:
    """Text lines for the rejected segments of an accounting (none when nothing waits)."""
    r = acc.get("rejected") or {}
    if not r.get("segments"):
        return []
    return [f"rejected: {r['messages']} message(s) in {r['segments']} unreadable segment(s) set aside in "
            f"landing/rejected/ (outside the identity until replayed)",
            *(f"    {w['segment']}  {w['reason']}: {w['detail']}" for w in r["waiting"])]
