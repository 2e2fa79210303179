"""Landing retention: only segments the warehouse absorbed AND past retention are deleted, nothing else."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from core.landing import SegmentWriter, list_sealed, open_dir
from core.settings import Settings
from warehouse.db import clinical
from warehouse.retention import purge_landing

TOPIC = "rpm/v1/devices/dev-1/vitals"


def _segment(s: Settings, name: str, age_days: float, sealed: bool = True) -> Path:
    created = datetime.now(UTC) - timedelta(days=age_days)
    writer = SegmentWriter(s.landing_dir, name, now=created)  # type: ignore[arg-type]
    writer.append(TOPIC, b'{"metric": "heart_rate", "value": 72}', created)
    if sealed:
        return writer.seal()
    writer.sync()
    writer.close_unsealed()
    return writer.path


def _absorb(s: Settings, *names: str) -> None:
    """Record segments in the ledger as the load task does once their rows are committed."""
    with clinical(s) as con:
        for name in names:
            con.execute("INSERT INTO segments VALUES (?, 1, 1, 1, 0, 0, now(), 'test-run')", [name])


def test_purges_only_absorbed_segments_past_retention(settings: Settings) -> None:
    s = settings
    old_absorbed = _segment(s, "ingest-1-000001", age_days=45)
    _segment(s, "ingest-1-000002", age_days=40)                 # old but never loaded: only raw copy
    _segment(s, "ingest-1-000003", age_days=2)                  # absorbed but still within retention
    open_old = _segment(s, "ingest-1-000004", age_days=60, sealed=False)
    _absorb(s, "ingest-1-000001", "ingest-1-000003", "ingest-1-000004")
    size = old_absorbed.stat().st_size

    result = purge_landing(s)

    assert {k: result[k] for k in ("purged", "kept_not_in_ledger", "kept_too_recent", "bytes_freed")} == {
        "purged": 1, "kept_not_in_ledger": 1, "kept_too_recent": 1, "bytes_freed": size}
    assert [p.stem for p in list_sealed(s.landing_dir)] == ["ingest-1-000002", "ingest-1-000003"]  # type: ignore[arg-type]
    assert open_old.exists() and open_old.parent == open_dir(s.landing_dir)  # type: ignore[arg-type]


def test_purging_again_changes_nothing(settings: Settings) -> None:
    s = settings
    _segment(s, "ingest-1-000001", age_days=45)
    _segment(s, "ingest-1-000002", age_days=45)
    _absorb(s, "ingest-1-000001")

    first = purge_landing(s)
    second = purge_landing(s)

    assert first["purged"] == 1
    assert (second["purged"], second["bytes_freed"], second["kept_not_in_ledger"]) == (0, 0, 1)
    assert [p.stem for p in list_sealed(s.landing_dir)] == ["ingest-1-000002"]  # type: ignore[arg-type]


def test_retention_period_comes_from_settings_or_the_argument(settings: Settings) -> None:
    s = settings
    _segment(s, "ingest-1-000001", age_days=10)
    _absorb(s, "ingest-1-000001")

    assert purge_landing(s)["kept_too_recent"] == 1          # default 30 days
    assert purge_landing(s, older_than_days=20)["kept_too_recent"] == 1
    assert purge_landing(s, older_than_days=7)["purged"] == 1
    assert list_sealed(s.landing_dir) == []  # type: ignore[arg-type]


def test_without_a_warehouse_nothing_is_purged(settings: Settings) -> None:
    s = settings
    _segment(s, "ingest-1-000001", age_days=365)

    result = purge_landing(s, older_than_days=0)

    assert (result["purged"], result["kept_not_in_ledger"]) == (0, 1)
    assert not s.clinical_db.exists()  # a retention job never creates the warehouse
