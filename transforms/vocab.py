"""The vitals vocabulary of payload contract v1: metrics, accepted UCUM units, LOINC codes, plausible ranges.

Plausibility bounds are physiological limits of a living patient measured at home, not alert thresholds:
a value outside them is a device or entry error and goes to quarantine, never to a clinician's chart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# 1 mmol/L glucose = 18.0156 mg/dL (molar mass of glucose 180.156 g/mol).
GLUCOSE_MG_DL_PER_MMOL_L = 18.0156
LB_AV_IN_KG = 0.45359237  # avoirdupois pound, exact by definition


@dataclass(frozen=True)
class Linear:
    """A unit conversion ``(v - subtract) * multiply / divide``, evaluated in that order in Python and in SQL
    (transforms/normalise.py, CANDIDATES), so both give bit-identical doubles."""
    subtract: float = 0.0
    multiply: float = 1.0
    divide: float = 1.0

    def __call__(self, v: float) -> float:
        return (v - self.subtract) * self.multiply / self.divide


_identity = Linear()


@dataclass(frozen=True)
class Metric:
    name: str
    canonical_unit: str
    loinc: str
    loinc_display: str
    plausible: tuple[float, float]
    # unit as sent -> conversion to the canonical unit
    units: dict[str, Linear] = field(default_factory=dict)


METRICS: dict[str, Metric] = {m.name: m for m in [
    # 85354-9 is the BP panel; components systolic 8480-6 / diastolic 8462-4 (FHIR vital-signs profile).
    Metric("blood_pressure", "mm[Hg]", "85354-9", "Blood pressure panel with all children optional",
           (50, 300), {"mm[Hg]": _identity}),
    Metric("heart_rate", "/min", "8867-4", "Heart rate", (20, 300), {"/min": _identity}),
    Metric("spo2", "%", "59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", (50, 100),
           {"%": _identity}),
    Metric("respiratory_rate", "/min", "9279-1", "Respiratory rate", (4, 70), {"/min": _identity}),
    Metric("body_temperature", "Cel", "8310-5", "Body temperature", (25, 45),
           {"Cel": _identity, "[degF]": Linear(32.0, 5.0, 9.0)}),
    Metric("body_weight", "kg", "29463-7", "Body weight", (2, 400),
           {"kg": _identity, "[lb_av]": Linear(multiply=LB_AV_IN_KG)}),
    # Meter readings are capillary blood (41653-7); CGM readings are interstitial fluid (CGM_LOINC below).
    Metric("blood_glucose", "mg/dL", "41653-7", "Glucose [Mass/volume] in Capillary blood by Glucometer",
           (10, 1000), {"mg/dL": _identity, "mmol/L": Linear(multiply=GLUCOSE_MG_DL_PER_MMOL_L)}),
]}

# Diastolic plausibility (systolic uses the metric's range).
DIASTOLIC_PLAUSIBLE = (20, 200)
BP_COMPONENT_LOINC = {"systolic": "8480-6", "diastolic": "8462-4"}
# A CGM measures glucose in interstitial fluid, not blood: LOINC 99504-3 "Glucose [Mass/volume] in Interstitial
# fluid", the code of the HL7 FHIR CGM implementation guide (STU 1, CGMSensorReadingMassPerVolume). Readings
# loaded before under 2339-0 ("... in Blood") are recoded by warehouse/migrations/002_cgm_loinc.sql.
CGM_LOINC = "99504-3"
CGM_LOINC_DISPLAY = "Glucose [Mass/volume] in Interstitial fluid"
GLUCOSE_SOURCES = ("meter", "cgm")


def unit_key(metric: object, unit: object) -> str:
    """A single comparable string for the (metric, unit) pair, so GX can check it against a set."""
    return f"{metric}|{unit}"


ACCEPTED_UNIT_KEYS = sorted(unit_key(m.name, u) for m in METRICS.values() for u in m.units)


def loinc_for(metric: str, source: str | None) -> str:
    if metric == "blood_glucose" and source == "cgm":
        return CGM_LOINC
    return METRICS[metric].loinc


# What each kind of registered source may report. The broker ties a login to its topics (a device writes only
# rpm/v1/devices/<its id>/vitals|status, an app only rpm/v1/apps/<its id>/events); this table ties a device's
# readings to what its hardware measures, so a compromised or misconfigured cuff cannot put a glucose value
# in a chart, count toward billing or raise a hypoglycaemia alert. A reading outside its kind's metrics is
# quarantined as `metric_measurable_by_device_kind`.
@dataclass(frozen=True)
class SourceKind:
    name: str
    description: str
    metrics: tuple[str, ...]   # vitals it may send; empty for a patient app
    app: bool = False          # publishes telehealth events (apps/…/events), not vitals or device status


SOURCE_KINDS: dict[str, SourceKind] = {k.name: k for k in [
    # Home BP monitors report the pulse measured during the inflation with every reading.
    SourceKind("bp", "blood-pressure cuff", ("blood_pressure", "heart_rate")),
    # Fingertip/wrist oximeters report pulse rate; some (e.g. Masimo MightySat) also a respiration rate.
    SourceKind("ox", "pulse oximeter", ("spo2", "heart_rate", "respiratory_rate")),
    SourceKind("scale", "weight scale", ("body_weight",)),
    SourceKind("thermo", "thermometer", ("body_temperature",)),
    SourceKind("glu", "blood-glucose meter", ("blood_glucose",)),
    SourceKind("cgm", "continuous glucose monitor", ("blood_glucose",)),
    # A cellular or Bluetooth gateway relaying several peripherals of one patient under one login.
    SourceKind("hub", "multi-device hub (relays several peripherals)", tuple(METRICS)),
    SourceKind("app", "patient app (telehealth events only)", (), app=True),
]}


def kind_metric(kind: object, metric: object) -> str:
    return f"{kind}|{metric}"


MEASURABLE_KIND_METRICS = sorted(kind_metric(k.name, m) for k in SOURCE_KINDS.values() for m in k.metrics)
