"""The segment ledger: which sealed landing segments the warehouse has already absorbed."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from ingest.landing import list_sealed
from rpmctl.settings import Settings
from warehouse.db import clinical


@dataclass(frozen=True)
class Batch:
    batch_id: str
    segments: list[str]

    def to_xcom(self) -> dict:
        return asdict(self)

    @classmethod
    def from_xcom(cls, d: dict) -> Batch:
        return cls(d["batch_id"], list(d["segments"]))


def pending_segments(s: Settings) -> list[str]:
    """Sealed segment names not yet in the ledger, oldest first."""
    sealed = [p.stem for p in list_sealed(s.landing_dir)]  # type: ignore[arg-type]
    if not sealed:
        return []
    with clinical(s) as con:
        done = {r[0] for r in con.execute("SELECT segment FROM segments").fetchall()}
    return [name for name in sealed if name not in done]


def claim_segments(s: Settings) -> Batch:
    """The next batch: up to ``pipeline_max_segments`` unprocessed sealed segments.

    The batch id is a hash of its segment names, so a retried claim names the same batch.
    """
    names = pending_segments(s)[: s.pipeline_max_segments]
    batch_id = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return Batch(batch_id, names)
