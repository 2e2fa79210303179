"""Landing retention: free the disk held by landing segments the warehouse has already absorbed.

A sealed segment is the only raw copy of what devices sent, so it is deleted only when both hold:
the segment ledger lists it (its readings, quarantine and duplicates are committed in the warehouse) and
it was created more than ``landing_retention_days`` ago (long enough to re-read history with a fixed
decoder). Open segments are never looked at: they belong to a running ingest service.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from core.landing import list_sealed, read_header, sealed_dir, utc_now
from core.settings import Settings
from warehouse.serving import serving


def _ledger(s: Settings) -> set[str]:
    """Segments the warehouse has absorbed, as the serving snapshot records them: rpm_daily never waits on (or
    blocks) an rpm_pipeline run that holds the warehouse, and a segment absorbed since is merely kept a day."""
    if not s.clinical_db.exists():
        return set()  # no warehouse yet: nothing has been absorbed
    with serving(s) as con:
        return {row[0] for row in con.execute("SELECT segment FROM segments").fetchall()}


def purge_landing(s: Settings, older_than_days: int | None = None) -> dict:
    """Delete sealed segments that are in the ledger and older than the retention period.

    ``older_than_days`` overrides ``landing_retention_days``. Returns counts of what was purged and kept.
    """
    days = s.landing_retention_days if older_than_days is None else older_than_days
    cutoff = utc_now() - timedelta(days=days)
    counts = {"purged": 0, "kept_not_in_ledger": 0, "kept_too_recent": 0, "bytes_freed": 0}
    sealed = list_sealed(s.landing_dir)
    if not sealed:
        return {**counts, "cutoff": cutoff.isoformat()}
    absorbed = _ledger(s)
    for path in sealed:
        if path.stem not in absorbed:
            counts["kept_not_in_ledger"] += 1
            continue
        # The header's created_at, not mtime: a key rotation rewrites old segments and refreshes mtime.
        if datetime.fromisoformat(read_header(path)["created_at"]) > cutoff:
            counts["kept_too_recent"] += 1
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue  # a concurrent purge got there first
        counts["purged"] += 1
        counts["bytes_freed"] += size
    if counts["purged"]:
        # Make the deletions durable before reporting them.
        fd = os.open(sealed_dir(s.landing_dir), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return {**counts, "cutoff": cutoff.isoformat()}
