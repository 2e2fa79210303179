"""Shared builders for the unit tests: valid readings of every metric, tmp settings, sealed segments.

Helpers are fixtures (factories) rather than importable functions, so this file never collides with a
``tests/conftest.py`` module of the same name.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from core.keyring import Keyring
from core.landing import SegmentWriter
from core.settings import Settings

# One valid reading per stream of contract v1 (values in the unit a real device sends).
VALID_READINGS: dict[str, dict[str, Any]] = {
    "blood_pressure": {"metric": "blood_pressure", "values": {"systolic": 128, "diastolic": 82},
                       "unit": "mm[Hg]"},
    "heart_rate": {"metric": "heart_rate", "value": 72, "unit": "/min"},
    "spo2": {"metric": "spo2", "value": 97, "unit": "%"},
    "respiratory_rate": {"metric": "respiratory_rate", "value": 16, "unit": "/min"},
    "body_temperature": {"metric": "body_temperature", "value": 98.6, "unit": "[degF]"},
    "body_weight": {"metric": "body_weight", "value": 176.0, "unit": "[lb_av]"},
    "blood_glucose": {"metric": "blood_glucose", "value": 5.5, "unit": "mmol/L", "source": "meter"},
    "cgm_glucose": {"metric": "blood_glucose", "value": 112, "unit": "mg/dL", "source": "cgm"},
}


def _iso(ts: datetime) -> str:
    return ts.isoformat(timespec="microseconds")


@pytest.fixture
def make_reading() -> Callable[..., dict[str, Any]]:
    """Factory: a valid payload item of ``kind`` (a VALID_READINGS key), with fields overridden.

    ``measured_at`` may be a datetime (rendered RFC 3339 with its offset) or a raw string; pass a field
    as ``None`` to drop it from the item.
    """
    counter = iter(range(1_000_000))

    def build(kind: str = "heart_rate", *, measured_at: datetime | str | None = None, **fields: Any
              ) -> dict[str, Any]:
        item = copy.deepcopy(VALID_READINGS[kind])
        item["msg_id"] = f"m-{next(counter)}"
        when = measured_at if measured_at is not None else datetime.now(UTC) - timedelta(minutes=5)
        item["measured_at"] = _iso(when) if isinstance(when, datetime) else when
        item.update(fields)
        return {k: v for k, v in item.items() if v is not None}

    return build


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """A fresh RPM_HOME: secrets, landing and warehouse all under tmp_path/var."""
    return Settings(home=tmp_path / "var")


@pytest.fixture
def write_segment(settings: Settings) -> Callable[..., Path]:
    """Factory: land ``messages`` (topic, payload) in a sealed segment named ``name``; returns its path.

    Segments are encrypted with the settings' landing keyring, as the ingest service writes them. A payload
    that is a dict or list is JSON-encoded; bytes are landed as they are.
    """
    keyring = Keyring.load(settings, "landing")

    def write(name: str, messages: Iterable[tuple[str, Any]], received_at: datetime | None = None) -> Path:
        writer = SegmentWriter(settings.landing_dir, name, keyring=keyring)  # type: ignore[arg-type]
        for topic, payload in messages:
            raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            writer.append(topic, raw, received_at or datetime.now(UTC))
        return writer.seal()

    return write


@pytest.fixture(scope="session")
def insert_reading() -> Callable[..., str]:
    """Factory: insert one canonical reading straight into ``readings`` (every NOT NULL column filled).

    ``value`` is in the metric's canonical unit (systolic for blood pressure); returns the reading id.
    Session-scoped (it holds no state but a counter) so module-scoped warehouses can use it too.
    """
    from transforms.vocab import METRICS
    from warehouse.patient_days import note_loaded

    counter = iter(range(1_000_000))

    def insert(con: Any, patient_id: str, metric: str, value: float, measured_at: datetime, *,
               diastolic: float | None = None, reading_id: str | None = None, device_id: str = "dev-1",
               rollup: bool = True) -> str:
        n = next(counter)
        reading_id = reading_id or f"r-{patient_id}-{n:06d}"
        m = METRICS[metric]
        con.execute("""
            INSERT INTO readings (reading_id, patient_id, device_id, metric, loinc, value, diastolic, unit,
                                  unit_sent, measured_at, utc_offset_min, received_at, loaded_at, msg_id,
                                  segment, record_no, item_no)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, 'seg-1', ?, 0)""",
            [reading_id, patient_id, device_id, metric, m.loinc, float(value), diastolic, m.canonical_unit,
             m.canonical_unit, measured_at, measured_at, measured_at, f"m-{n}", n])
        # As the load does, in the same connection: the per-patient-day rollup the views read. A fixture that
        # inserts hundreds passes rollup=False and calls patient_days.rebuild once (~80 ms a reading otherwise).
        if rollup:
            note_loaded(con, f"(SELECT * FROM readings WHERE reading_id = '{reading_id}')")
        return reading_id

    return insert


@pytest.fixture
def gx_row_conditions() -> Callable[..., dict[str, list[str]]]:
    """Factory: the oracle of expectations/suite.py — a suite as written, row conditions and all, judged by GX
    in one validation of the whole frame (what run_suite did before it took each condition's rows itself)."""
    from expectations.suite import _context, build_suite

    def verdicts(frame: Any, rules: list) -> dict[str, list[str]]:
        batch = (_context().data_sources.get("rpm").get_asset("candidate_rows").get_batch_definition("batch")
                 .get_batch(batch_parameters={"dataframe": frame.reset_index(drop=True)}))
        result = batch.validate(build_suite(f"oracle_{len(rules)}_{rules[0].name}", rules), result_format={
            "result_format": "COMPLETE", "unexpected_index_column_names": ["row_key"],
            "return_unexpected_index_query": False, "partial_unexpected_count": 0})
        found: dict[str, list[str]] = {}
        for r in result.results:
            assert not (r.exception_info or {}).get("raised_exception"), r.exception_info
            for entry in r.result.get("unexpected_index_list") or []:
                found.setdefault(entry["row_key"], []).append(r.expectation_config.meta["rule"])
        return found

    return verdicts
