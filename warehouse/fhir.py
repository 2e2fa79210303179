"""A patient's readings as a FHIR R4 Bundle of Observations, for an EHR or a care partner to import.

Vital signs follow the FHIR R4 vital-signs profiles (http://hl7.org/fhir/R4/observation-vitalsigns.html):
category ``vital-signs``, a LOINC code, a UCUM ``valueQuantity``; blood pressure is the panel 85354-9 with
systolic/diastolic components and no value of its own; oxygen saturation carries 2708-6 beside the
pulse-oximetry code 59408-5. Glucose is a laboratory observation: a meter's capillary blood 41653-7, a CGM's
interstitial fluid 99504-3 under the sensor-reading profile of the HL7 FHIR CGM implementation guide (STU 1,
http://hl7.org/fhir/uv/cgm).
The subject is the pseudonymous patient id only: names, MRNs and birth dates never leave the registry.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import duckdb

from transforms.vocab import BP_COMPONENT_LOINC, CGM_LOINC, CGM_LOINC_DISPLAY, METRICS
from warehouse.exports import write_export

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
READING_ID_SYSTEM = "urn:rpm-pipeline:reading-id"

LOINC_DISPLAY: dict[str, str] = {
    **{m.loinc: m.loinc_display for m in METRICS.values()},
    CGM_LOINC: CGM_LOINC_DISPLAY,
    # How CGM readings were coded before; warehouse/migrations/002_cgm_loinc.sql recodes those it finds.
    "2339-0": "Glucose [Mass/volume] in Blood",
    BP_COMPONENT_LOINC["systolic"]: "Systolic blood pressure",
    BP_COMPONENT_LOINC["diastolic"]: "Diastolic blood pressure",
}
# The R4 oxygen saturation profile requires 2708-6; 59408-5 says it was measured by pulse oximetry.
SPO2_BASE_LOINC = ("2708-6", "Oxygen saturation in Arterial blood")

# R4 vital-signs profile of each metric (meta.profile); a meter's glucose has none.
PROFILES: dict[str, str] = {
    "blood_pressure": "http://hl7.org/fhir/StructureDefinition/bp",
    "heart_rate": "http://hl7.org/fhir/StructureDefinition/heartrate",
    "spo2": "http://hl7.org/fhir/StructureDefinition/oxygensat",
    "respiratory_rate": "http://hl7.org/fhir/StructureDefinition/resprate",
    "body_temperature": "http://hl7.org/fhir/StructureDefinition/bodytemp",
    "body_weight": "http://hl7.org/fhir/StructureDefinition/bodyweight",
}
# HL7 FHIR CGM IG (STU 1) profile of one CGM reading in mg/dL, the canonical glucose unit (by its LOINC).
CODE_PROFILES: dict[str, str] = {
    CGM_LOINC: "http://hl7.org/fhir/uv/cgm/StructureDefinition/cgm-sensor-reading-mass-per-volume",
}

# Decimals kept per UCUM unit: the resolution home devices actually have (0 -> an integer in the JSON).
DECIMALS: dict[str, int] = {"mm[Hg]": 0, "/min": 0, "%": 0, "mg/dL": 0, "Cel": 1, "kg": 1}
# Human-readable valueQuantity.unit (the UCUM code goes in valueQuantity.code).
UNIT_DISPLAY: dict[str, str] = {"mm[Hg]": "mmHg", "Cel": "Cel", "kg": "kg", "%": "%", "mg/dL": "mg/dL"}
RATE_DISPLAY: dict[str, str] = {"heart_rate": "beats/minute", "respiratory_rate": "breaths/minute"}

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def export_bundle(con: duckdb.DuckDBPyConnection, patient_id: str,
                  days: int | None = None) -> dict[str, Any]:
    """A ``collection`` Bundle: one Observation per reading of ``patient_id``, all or the last ``days``."""
    since = datetime.now(UTC) - timedelta(days=days) if days is not None else None
    # Instants are fetched as naive UTC: the patient's offset is applied per reading, below.
    rows = con.execute("""
        SELECT reading_id, metric, loinc, value, diastolic, unit, measured_at AT TIME ZONE 'UTC',
               utc_offset_min
        FROM readings
        WHERE patient_id = $patient_id AND ($since IS NULL OR measured_at > $since)
        ORDER BY measured_at, reading_id""", {"patient_id": patient_id, "since": since}).fetchall()
    entries = []
    for reading_id, metric, loinc, value, diastolic, unit, measured_utc, offset_min in rows:
        obs = observation(patient_id, reading_id=reading_id, metric=metric, loinc=loinc, value=value,
                          diastolic=diastolic, unit=unit, measured_utc=measured_utc,
                          utc_offset_min=offset_min)
        # A stable fullUrl per reading: the same reading exported twice is recognisably the same resource.
        full_url = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{READING_ID_SYSTEM}:{reading_id}')}"
        entries.append({"fullUrl": full_url, "resource": obs})
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "collection",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "entry": entries,
    }


def observation(patient_id: str, *, reading_id: str, metric: str, loinc: str, value: float,
                diastolic: float | None, unit: str, measured_utc: datetime,
                utc_offset_min: int) -> dict[str, Any]:
    """One reading as an R4 Observation; ``measured_utc`` is the instant (naive means UTC)."""
    lab = metric == "blood_glucose"
    coding = [_coding(loinc)]
    if metric == "spo2":
        coding.append({"system": LOINC, "code": SPO2_BASE_LOINC[0], "display": SPO2_BASE_LOINC[1]})
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": observation_id(reading_id),
    }
    profile = PROFILES.get(metric) or CODE_PROFILES.get(loinc)
    if profile:
        obs["meta"] = {"profile": [profile]}
    obs |= {
        "identifier": [{"system": READING_ID_SYSTEM, "value": reading_id}],
        "status": "final",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY,
                                  "code": "laboratory" if lab else "vital-signs",
                                  "display": "Laboratory" if lab else "Vital Signs"}]}],
        "code": {"coding": coding, "text": LOINC_DISPLAY.get(loinc, metric)},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": local_datetime(measured_utc, utc_offset_min),
    }
    if metric == "blood_pressure":
        obs["component"] = [_component(BP_COMPONENT_LOINC["systolic"], value, unit),
                            _component(BP_COMPONENT_LOINC["diastolic"], diastolic, unit)]
    else:
        obs["valueQuantity"] = quantity(value, unit, RATE_DISPLAY.get(metric))
    return obs


def observation_id(reading_id: str) -> str:
    """The reading id when it is a valid FHIR id (it is: 32 hex digits), else a digest of it."""
    if _FHIR_ID.fullmatch(reading_id):
        return reading_id
    return hashlib.sha256(reading_id.encode()).hexdigest()[:32]


def local_datetime(measured_utc: datetime, utc_offset_min: int) -> str:
    """RFC 3339 with seconds, in the offset the device reported (the patient's wall clock)."""
    instant = measured_utc.replace(tzinfo=UTC) if measured_utc.tzinfo is None else measured_utc
    return instant.astimezone(timezone(timedelta(minutes=utc_offset_min))).isoformat(timespec="seconds")


def quantity(value: float, unit: str, display: str | None = None) -> dict[str, Any]:
    return {"value": _rounded(value, unit), "unit": display or UNIT_DISPLAY.get(unit, unit),
            "system": UCUM, "code": unit}


def write_bundle(bundle: dict[str, Any], path: Path | str) -> Path:
    """Write the bundle as JSON, readable by its owner only (it is PHI), into a folder that already exists."""
    return write_export(path, (json.dumps(bundle, indent=2, ensure_ascii=False) + "\n").encode())


def _coding(code: str) -> dict[str, str]:
    c = {"system": LOINC, "code": code}
    if code in LOINC_DISPLAY:
        c["display"] = LOINC_DISPLAY[code]
    return c


def _component(code: str, value: float | None, unit: str) -> dict[str, Any]:
    comp: dict[str, Any] = {"code": {"coding": [_coding(code)]}}
    if value is None:  # the BP profile requires both components: say why one is missing
        comp["dataAbsentReason"] = {"coding": [{"system": DATA_ABSENT_REASON, "code": "unknown"}]}
    else:
        comp["valueQuantity"] = quantity(value, unit)
    return comp


def _rounded(value: float, unit: str) -> int | float:
    # Half-up, as a clinician rounds (Python's round() is half-to-even), from the shortest repr of the float.
    places = DECIMALS.get(unit, 2)
    q = Decimal(repr(float(value))).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    return int(q) if places == 0 else float(q)
