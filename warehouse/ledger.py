"""The segment ledger: which sealed landing segments the warehouse has already absorbed — and which it had
to set aside as unreadable (``rejected_segments``), so every sealed segment is absorbed, rejected or pending."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from core.landing import (
    SEGMENT_SUFFIX,
    RejectedSegment,
    list_rejected,
    list_sealed,
    rejection_of,
    restore_rejected,
    sealed_dir,
)


@dataclass(frozen=True)
class Batch:
    batch_id: str
    segments: list[str]

    def to_xcom(self) -> dict:
        return asdict(self)

    @classmethod
    def from_xcom(cls, d: dict) -> Batch:
        return cls(d["batch_id"], list(d["segments"]))


def pending_segments(con, landing_dir: Path) -> list[str]:
    """Sealed segment names not yet in the ledger, oldest first."""
    sealed = [p.stem for p in list_sealed(landing_dir)]
    if not sealed:
        return []
    done = {r[0] for r in con.execute("SELECT segment FROM segments").fetchall()}
    return [name for name in sealed if name not in done]


def claim_segments(con, landing_dir: Path, max_segments: int) -> Batch:
    """The next batch: up to ``max_segments`` unprocessed sealed segments.

    The batch id is a hash of its segment names, so a retried claim names the same batch.
    """
    names = pending_segments(con, landing_dir)[:max_segments]
    batch_id = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return Batch(batch_id, names)


# --- rejected segments ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WaitingSegment:
    """A rejected segment nobody has replayed yet: its data is unknown until the cause is fixed."""
    segment: str
    reason: str
    detail: str
    records: int
    bytes: int
    rejected_at: datetime
    in_rejected_dir: bool  # False: the file was moved or deleted by hand (still counted: it held data)

    def to_json(self) -> dict:
        return {**asdict(self), "rejected_at": self.rejected_at.isoformat()}


def record_rejection(con, info: RejectedSegment, batch_id: str | None = None) -> None:
    """The ledger row of a segment just moved to rejected/ (a segment rejected again after a replay reopens
    its row)."""
    con.execute("""
        INSERT INTO rejected_segments (segment, reason, detail, records, bytes, rejected_at, origin, batch_id)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (segment) DO UPDATE SET reason = excluded.reason, detail = excluded.detail,
            records = excluded.records, bytes = excluded.bytes, rejected_at = excluded.rejected_at,
            origin = excluded.origin, batch_id = excluded.batch_id, run_id = NULL, replayed_at = NULL,
            times_rejected = rejected_segments.times_rejected + 1""",
                [info.segment, info.reason, info.detail, info.records, info.bytes, info.rejected_at,
                 info.origin, batch_id])


def reconcile_rejected(con, landing_dir: Path) -> int:
    """Make the table agree with rejected/ after a crash between a move and its row: a file there without a
    waiting row gets one (from its sidecar); a waiting row whose file is back in sealed/ or absorbed is
    marked replayed. Returns how many rows it fixed."""
    files = {p.stem: p for p in list_rejected(landing_dir)}
    rows = dict(con.execute("SELECT segment, replayed_at FROM rejected_segments").fetchall())
    fixed = 0
    for name, path in files.items():
        if name not in rows or rows[name] is not None:
            record_rejection(con, rejection_of(path))
            fixed += 1
    absorbed = {r[0] for r in con.execute("""SELECT segment FROM segments WHERE segment IN
                                             (SELECT segment FROM rejected_segments WHERE replayed_at IS NULL)""")
                .fetchall()}
    for name, replayed_at in rows.items():
        if replayed_at is None and name not in files and (
                name in absorbed or (sealed_dir(landing_dir) / f"{name}{SEGMENT_SUFFIX}").exists()):
            mark_replayed(con, name)
            fixed += 1
    return fixed


def mark_replayed(con, name: str, at: datetime | None = None) -> bool:
    """The segment was moved back to sealed/: it no longer waits. False if it was not waiting."""
    row = con.execute("""UPDATE rejected_segments SET replayed_at = ? WHERE segment = ? AND replayed_at IS NULL
                         RETURNING 1""", [at or datetime.now(UTC), name]).fetchone()
    return row is not None


def waiting_rejected(con, landing_dir: Path) -> list[WaitingSegment]:
    """Rejected segments not replayed yet, oldest rejection first: the waiting rows, plus any file in
    rejected/ whose row a crash prevented (read from its sidecar), so nothing set aside goes unseen.
    ``con`` may be None (no warehouse yet): then the files alone."""
    files = {p.stem: p for p in list_rejected(landing_dir)}
    out = [] if con is None else [
        WaitingSegment(r[0], r[1], r[2] or "", r[3], r[4], r[5], r[0] in files) for r in con.execute("""
            SELECT segment, reason, detail, records, bytes, rejected_at FROM rejected_segments
            WHERE replayed_at IS NULL ORDER BY rejected_at, segment""").fetchall()]
    recorded = {w.segment for w in out}
    for name, path in files.items():
        if name not in recorded:
            info = rejection_of(path)
            out.append(WaitingSegment(name, info.reason, info.detail, info.records, info.bytes, info.rejected_at,
                                      True))
    return out


def replay_rejected(con, landing_dir: Path, names: list[str] | None) -> list[str]:
    """Move rejected segments (``None``: all of them) back to sealed/ and mark them replayed; the next run
    absorbs each, or rejects it again with its new reason. Unknown names raise FileNotFoundError first."""
    files = {p.stem for p in list_rejected(landing_dir)}
    wanted = sorted(files) if names is None else list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in files]  # also keeps a name from pointing outside rejected/
    if unknown:
        raise FileNotFoundError(f"no rejected segment {', '.join(unknown)} in {landing_dir / 'rejected'}")
    for name in wanted:
        restore_rejected(landing_dir, name)  # the move first: a crash before the row is reconciled next run
        mark_replayed(con, name)
    return wanted
