"""FHIR R4 export: one Observation per reading, shaped as the R4 vital-signs profiles require.

Rules checked (http://hl7.org/fhir/R4/observation-vitalsigns.html): status, the vital-signs category, a LOINC
code, a subject, an effective time, a UCUM valueQuantity (vs-2: a value unless there are components), the BP
panel with systolic/diastolic components and no value of its own, 2708-6 on oxygen saturation. And what the
export promises beyond them: the device's own offset, one patient only, no names or MRNs.
"""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from core.settings import Settings
from warehouse.db import clinical
from warehouse.fhir import export_bundle, write_bundle

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# RFC 3339 with seconds and an explicit offset (FHIR dateTime with a time must carry a zone).
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)")

OLD = datetime(2026, 1, 10, 14, 30, 5, tzinfo=UTC)  # more than 30 days before any test run
PHI = ("MRN-778899", "Lovelace", "Augusta", "1815-12-10")

# reading_id -> (metric, loinc, canonical value, unit, source); EXPECTED_VALUE: as rounded in the export.
READINGS: dict[str, tuple[str, str, float, str, str | None]] = {
    "bp1": ("blood_pressure", "85354-9", 128.4, "mm[Hg]", None),
    "hr1": ("heart_rate", "8867-4", 72.0, "/min", None),
    "spo1": ("spo2", "59408-5", 97.0, "%", None),
    "rr1": ("respiratory_rate", "9279-1", 16.0, "/min", None),
    "temp1": ("body_temperature", "8310-5", (98.6 - 32) * 5 / 9, "Cel", None),
    "wt1": ("body_weight", "29463-7", 176.0 * 0.45359237, "kg", None),
    "glu1": ("blood_glucose", "41653-7", 5.5 * 18.0156, "mg/dL", "meter"),
    "cgm1": ("blood_glucose", "99504-3", 112.0, "mg/dL", "cgm"),
}
EXPECTED_VALUE = {"hr1": 72, "spo1": 97, "rr1": 16, "temp1": 37.0, "wt1": 79.8, "glu1": 99, "cgm1": 112}


def insert(con: duckdb.DuckDBPyConnection, reading_id: str, patient_id: str, metric: str, loinc: str,
           value: float, unit: str, at: datetime, *, source: str | None = None,
           diastolic: float | None = None, offset_min: int = -300) -> None:
    con.execute("""
        INSERT INTO readings (reading_id, patient_id, device_id, metric, loinc, value, diastolic, unit,
                              unit_sent, source, measured_at, utc_offset_min, received_at, loaded_at, msg_id,
                              segment, record_no, item_no)
        VALUES (?, ?, 'dev-1', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'seg-1', 0, 0)""",
                [reading_id, patient_id, metric, loinc, value, diastolic, unit, unit, source, at, offset_min,
                 at, at, f"m-{reading_id}"])


@pytest.fixture
def con(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """pat-1 (with a name, MRN and birth date in the registry) has one reading of each kind, measured two
    hours ago at UTC-5, plus one old heart rate; pat-2 has a heart rate of its own."""
    with clinical(Settings(home=tmp_path / "var")) as c:
        c.execute("INSERT INTO patients (patient_id, mrn, given_name, family_name, birth_date) VALUES "
                  "('pat-1', ?, 'Augusta', 'Lovelace', ?)", [PHI[0], PHI[3]])
        recent = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
        for rid, (metric, loinc, value, unit, source) in READINGS.items():
            insert(c, rid, "pat-1", metric, loinc, value, unit, recent, source=source,
                   diastolic=81.6 if metric == "blood_pressure" else None)
        insert(c, "old-hr", "pat-1", "heart_rate", "8867-4", 64.0, "/min", OLD)
        insert(c, "other", "pat-2", "heart_rate", "8867-4", 90.0, "/min", recent)
        yield c


def by_id(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["resource"]["identifier"][0]["value"]: e["resource"] for e in bundle["entry"]}


def loinc_codes(concept: dict[str, Any]) -> list[str]:
    return [c["code"] for c in concept["coding"] if c["system"] == LOINC]


def test_bundle_is_a_serialisable_r4_collection(con: duckdb.DuckDBPyConnection) -> None:
    bundle = export_bundle(con, "pat-1")
    assert (bundle["resourceType"], bundle["type"]) == ("Bundle", "collection")
    assert FHIR_ID.fullmatch(bundle["id"]) and RFC3339.fullmatch(bundle["timestamp"])
    assert "total" not in bundle  # bdl-1: total only in search and history bundles
    assert json.loads(json.dumps(bundle)) == bundle
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(set(full_urls)) == len(full_urls) == len(READINGS) + 1  # bdl-7: fullUrl unique


def test_every_observation_follows_the_vital_signs_rules(con: duckdb.DuckDBPyConnection) -> None:
    observations = by_id(export_bundle(con, "pat-1"))
    assert set(observations) == {*READINGS, "old-hr"}
    for rid, obs in observations.items():
        assert obs["resourceType"] == "Observation" and obs["status"] == "final"
        assert obs["id"] == rid and FHIR_ID.fullmatch(obs["id"])
        assert obs["identifier"] == [{"system": "urn:rpm-pipeline:reading-id", "value": rid}]
        assert obs["subject"] == {"reference": "Patient/pat-1"}
        assert RFC3339.fullmatch(obs["effectiveDateTime"])
        lab = obs["code"]["coding"][0]["code"] in {"41653-7", "99504-3"}
        [category] = obs["category"]
        assert category["coding"][0]["system"] == CATEGORY
        assert category["coding"][0]["code"] == ("laboratory" if lab else "vital-signs")
        assert all(c["display"] for c in obs["code"]["coding"])
        # vs-2: without components there must be a value (or a reason it is absent).
        assert ("component" in obs) != ("valueQuantity" in obs)
        quantities = [obs["valueQuantity"]] if "valueQuantity" in obs else [c["valueQuantity"]
                                                                            for c in obs["component"]]
        for q in quantities:
            assert q["system"] == UCUM and q["unit"] and q["code"]
            assert isinstance(q["value"], int | float) and not isinstance(q["value"], bool)


def test_codes_units_and_rounding_per_metric(con: duckdb.DuckDBPyConnection) -> None:
    observations = by_id(export_bundle(con, "pat-1"))
    for rid, value in EXPECTED_VALUE.items():
        _, loinc, _, unit, _ = READINGS[rid]
        obs = observations[rid]
        assert loinc_codes(obs["code"])[0] == loinc
        assert obs["valueQuantity"]["code"] == unit
        assert obs["valueQuantity"]["value"] == value and type(obs["valueQuantity"]["value"]) is type(value)
    assert loinc_codes(observations["spo1"]["code"]) == ["59408-5", "2708-6"]
    assert observations["spo1"]["meta"]["profile"] == ["http://hl7.org/fhir/StructureDefinition/oxygensat"]
    assert "meta" not in observations["glu1"]


def test_cgm_reading_is_interstitial_glucose_of_the_cgm_ig(con: duckdb.DuckDBPyConnection) -> None:
    """A CGM samples interstitial fluid: LOINC 99504-3 under the HL7 CGM IG's sensor-reading profile, a
    laboratory observation like a meter's capillary glucose (41653-7)."""
    cgm = by_id(export_bundle(con, "pat-1"))["cgm1"]
    assert cgm["code"]["coding"] == [{"system": LOINC, "code": "99504-3",
                                      "display": "Glucose [Mass/volume] in Interstitial fluid"}]
    assert cgm["meta"]["profile"] == [
        "http://hl7.org/fhir/uv/cgm/StructureDefinition/cgm-sensor-reading-mass-per-volume"]
    assert cgm["category"][0]["coding"][0]["code"] == "laboratory"
    assert cgm["valueQuantity"] == {"value": 112, "unit": "mg/dL", "system": UCUM, "code": "mg/dL"}


def test_blood_pressure_is_a_panel_with_two_components(con: duckdb.DuckDBPyConnection) -> None:
    bp = by_id(export_bundle(con, "pat-1"))["bp1"]
    assert loinc_codes(bp["code"]) == ["85354-9"]
    assert "valueQuantity" not in bp
    components = {loinc_codes(c["code"])[0]: c["valueQuantity"] for c in bp["component"]}
    assert components == {
        "8480-6": {"value": 128, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
        "8462-4": {"value": 82, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
    }


def test_missing_diastolic_is_declared_absent(con: duckdb.DuckDBPyConnection) -> None:
    insert(con, "bp-half", "pat-1", "blood_pressure", "85354-9", 140.0, "mm[Hg]", OLD)
    bp = by_id(export_bundle(con, "pat-1"))["bp-half"]
    diastolic = next(c for c in bp["component"] if loinc_codes(c["code"]) == ["8462-4"])
    assert "valueQuantity" not in diastolic
    assert diastolic["dataAbsentReason"]["coding"][0]["code"] == "unknown"


def test_effective_time_keeps_the_device_offset(con: duckdb.DuckDBPyConnection) -> None:
    insert(con, "india", "pat-1", "heart_rate", "8867-4", 70.0, "/min", OLD, offset_min=330)
    observations = by_id(export_bundle(con, "pat-1"))
    assert observations["old-hr"]["effectiveDateTime"] == "2026-01-10T09:30:05-05:00"
    assert observations["india"]["effectiveDateTime"] == "2026-01-10T20:00:05+05:30"
    recent = datetime.fromisoformat(observations["hr1"]["effectiveDateTime"])
    assert recent.utcoffset() == timedelta(hours=-5)
    assert timedelta(hours=1) < datetime.now(UTC) - recent < timedelta(hours=3)


def test_only_the_requested_patient_and_window(con: duckdb.DuckDBPyConnection) -> None:
    assert set(by_id(export_bundle(con, "pat-1", days=30))) == set(READINGS)  # old-hr is out of the window
    assert set(by_id(export_bundle(con, "pat-2"))) == {"other"}
    assert export_bundle(con, "nobody")["entry"] == []


def test_no_name_mrn_or_birth_date_leaves(con: duckdb.DuckDBPyConnection) -> None:
    text = json.dumps(export_bundle(con, "pat-1"))
    for secret in PHI:
        assert secret not in text
    assert '"Patient"' not in text  # no Patient resource: the subject is a reference to the pseudonymous id


def test_write_bundle_is_owner_only_json(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    bundle = export_bundle(con, "pat-1")
    (tmp_path / "out").mkdir()
    path = write_bundle(bundle, tmp_path / "out" / "pat-1.json")
    assert json.loads(path.read_text()) == bundle
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_write_bundle_creates_no_folder(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such folder"):
        write_bundle(export_bundle(con, "pat-1"), tmp_path / "missing" / "pat-1.json")
    assert not (tmp_path / "missing").exists()


def test_parses_as_fhir_r4(con: duckdb.DuckDBPyConnection) -> None:
    # fhir.resources 8 (pydantic 2) ships R4B (4.3.0), whose Observation and Bundle are R4's (4.0.1).
    from fhir.resources.R4B import bundle as r4b

    bundle = export_bundle(con, "pat-1")
    parsed = r4b.Bundle.model_validate(bundle)
    assert len(parsed.entry) == len(bundle["entry"])
    assert {type(e.resource).__name__ for e in parsed.entry} == {"Observation"}
