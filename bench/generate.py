"""A synthetic clinical warehouse for the query benchmarks, generated straight into DuckDB.

``python -m bench.generate --patients 10000 --readings 50000000 --home DIR`` builds a fresh RPM_HOME: keys
(``core.keys``), the encrypted clinical DuckDB migrated by ``warehouse.db.open_clinical``, the registry, the
readings, telehealth events, logged management time, the segment ledger and pipeline runs, alerts, the serving
snapshot (``warehouse.serving.publish_snapshot``) and the telehealth store (``warehouse.telehealth``).
Every row is produced by DuckDB SQL over ``range()``; no Python loop runs per row. Synthetic people only.

What the data looks like, and why:

* **Patients** follow the simulator's mix (``rpmctl.tools.simulator``): hypertension, diabetes, COPD and heart
  failure in turn, half the others with hypertension too; six home time zones (US and London, where devices
  send SI units). Each has an adherence (70-98 % of days) and acute days (2 %) that push vitals out of range.
* **Devices**: BP cuff (BP + heart rate, 07:30 and 20:00), scale (heart failure, 06:45), pulse oximeter
  (SpO2, heart rate, respiratory rate at 09, 15, 21 h) and thermometer (COPD, 08:00), glucometer (diabetes,
  4 a day) or a CGM (half of the diabetic patients), and a patient app (telehealth events).
* **Volume**: spot checks keep their realistic frequency; CGMs absorb the rest of the requested reading
  count, so their sampling interval is derived (about 3.5 min at 10,000 patients / 50M readings; real CGMs
  sample every 1-15 min) and clamped to 1-15 min. The count is approximate (±1 %): slots after "now" and
  forgotten days are dropped. CGMs lose 3 % of 2-hour blocks (signal loss) and upload bursts of 12.
* **Rows as the pipeline writes them** (``transforms/normalise.py``, ``warehouse/load.py INSERT_READINGS``):
  ``reading_id`` = sha256(device|metric|UTC ISO instant with microseconds)[:32]; whole-second ``measured_at``
  in UTC with the device's ``utc_offset_min`` (the zone's offset at local noon of that day); the canonical
  value converted from the unit the device sent (lb, degF, mmol/L outside the US), canonical UCUM ``unit``,
  ``unit_sent``, LOINC (CGM readings 99504-3), ``received_at`` seconds after measurement (5 % buffered 1-12 h),
  ``loaded_at`` at the next scheduled DAG run, ``run_id`` of that run, one landing segment per minute.
* **Physical order** (``--order``): ``time`` (default) appends chunks of days, each sorted by arrival
  (``loaded_at``): what months of DAG runs produce, every row group holding all patients. ``patient`` sorts
  by (patient_id, measured_at): what a compaction or a bulk backfill would give; the best case for
  per-patient queries.
* **No primary key on readings**, as the migrated table has none (``warehouse/load.py`` keeps ``reading_id``
  unique): the chunks go straight in, each its own transaction. ``--key`` is accepted for older commands and
  changes nothing.
* **The per-patient-day rollup** (``patient_days``) is counted once after the readings, as
  ``warehouse.patient_days.rebuild`` recounts it; the load keeps it from there.
* **Alerts**: ``--alerts evaluate`` runs the real ``warehouse.alerts.refresh_alerts`` over all readings;
  ``direct`` inserts open episodes computed from the latest readings of each patient (a stand-in when a full
  evaluation does not fit the time budget); ``auto`` evaluates up to ``EVALUATE_MAX_READINGS``.
* **Care teams**: ``dr-panel`` follows a 100-patient panel spread over the id range; ``rn-all`` (the RPM nurse
  who runs billing) follows everyone.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from bench.common import Timer, print_table
from core import keys
from core.settings import Settings
from rpmctl.tools.simulator import CONDITIONS, FAMILY, FIRMWARE, GIVEN, MODULES, ZONES
from transforms.vocab import CGM_LOINC, GLUCOSE_MG_DL_PER_MMOL_L, LB_AV_IN_KG, METRICS

PANEL_CLINICIAN = "dr-panel"
ALL_CLINICIAN = "rn-all"
PANEL_SIZE = 100
CGM_SHARE = 0.5              # of diabetic patients
ACUTE_DAY_RATE = 0.02        # patient-days with an exacerbation (alerts)
CGM_GAP_RATE = 0.03          # 2-hour CGM blocks lost to signal dropouts
CGM_MIN_INTERVAL_S, CGM_MAX_INTERVAL_S = 60, 900
CHUNK_ROWS = 1_500_000       # readings per INSERT: bounds the generator's memory
EVALUATE_MAX_READINGS = 5_000_000
DAG_EVERY_S = 60 * Settings.model_fields["pipeline_schedule_minutes"].default  # rpm_pipeline schedule

# kind -> local hours of the daily spot checks, and the metrics each check sends (seconds apart).
SPOT: dict[str, tuple[tuple[float, ...], tuple[str, ...]]] = {
    "bp": ((7.5, 20.0), ("blood_pressure", "heart_rate")),
    "scale": ((6.75,), ("body_weight",)),
    "ox": ((9.0, 15.0, 21.0), ("spo2", "heart_rate", "respiratory_rate")),
    "thermo": ((8.0,), ("body_temperature",)),
    "glu": ((7.0, 10.0, 14.5, 21.0), ("blood_glucose",)),
}
MODELS = {"bp": "cuff-bt-7", "scale": "scale-cell-2", "ox": "oximeter-ble-3", "thermo": "thermo-ir-1",
          "glu": "meter-cell-5", "cgm": "cgm-sensor-g", "app": "rpm-app"}


@dataclass(frozen=True)
class Plan:
    """What to generate: sizes, window, physical order and how alerts are made."""

    patients: int
    readings: int
    days: int = 90
    order: str = "time"          # time | patient
    alerts: str = "auto"         # auto | evaluate | direct
    seed: int = 7
    memory_limit: str = "8GB"
    end: datetime = field(default_factory=lambda: datetime.now(UTC).replace(second=0, microsecond=0))

    @property
    def start(self) -> datetime:
        return self.end - timedelta(days=self.days)


def _lit(values: Any) -> str:
    """A SQL literal of our own constants (strings, numbers, lists and maps of them)."""
    if isinstance(values, str):
        return "'" + values.replace("'", "''") + "'"
    if isinstance(values, list | tuple):
        return "[" + ", ".join(_lit(v) for v in values) + "]"
    if isinstance(values, dict):
        return "MAP {" + ", ".join(f"{_lit(k)}: {_lit(v)}" for k, v in values.items()) + "}"
    return repr(values)


def _case(column: str, mapping: dict[str, Any]) -> str:
    """A CASE over our constants: per row it is far cheaper than subscripting a MAP literal."""
    return f"CASE {column} " + " ".join(f"WHEN {_lit(k)} THEN {_lit(v)}" for k, v in mapping.items()) + " END"


def _ts(value: datetime) -> str:
    """A naive UTC TIMESTAMP literal (generation works on naive UTC; TIMESTAMPTZ is made from epoch µs)."""
    return f"TIMESTAMP '{value.astimezone(UTC).replace(tzinfo=None).isoformat(sep=' ')}'"


def prepare_home(s: Settings) -> None:
    """State folders and the warehouse key, as ``rpmctl.services.init`` makes them (minus the broker files:
    nothing here is published over MQTT)."""
    Path(s.home).mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
    Path(s.secrets_dir).mkdir(parents=True, exist_ok=True, mode=0o700)  # type: ignore[arg-type]
    keys.warehouse_key(s)


def _macros(con: duckdb.DuckDBPyConnection, seed: int) -> None:
    """Deterministic pseudo-random numbers from a hash of their coordinates: reproducible for a seed and
    independent of how DuckDB parallelises the query (random() is neither)."""
    con.execute(f"CREATE OR REPLACE TEMP MACRO _u(a, b, c) AS (hash(a, b, c, {int(seed)}) >> 11) "
                "/ 9007199254740992.0")
    # Box-Muller: a standard normal from two uniforms.
    con.execute("CREATE OR REPLACE TEMP MACRO _g(a, b, c) AS "
                "sqrt(-2 * ln(1 - _u(a, b, c))) * cos(2 * pi() * _u(a, b, -1 - c))")
    con.execute("CREATE OR REPLACE TEMP MACRO _tstz(naive) AS make_timestamptz(epoch_us(naive))")
    con.execute("CREATE OR REPLACE TEMP MACRO _iso(naive) AS "
                "strftime(naive, '%Y-%m-%dT%H:%M:%S.%f') || '+00:00'")
    # Landing segment of an arrival minute, named like ingest.service names them.
    con.execute("CREATE OR REPLACE TEMP MACRO _segment(naive) AS "
                "'rpm-ingest-1-' || strftime(date_trunc('minute', naive), '%Y%m%dT%H%M%S') "
                "|| '000000-000001'")
    # Loaded by the first scheduled DAG run at least 30 s after arrival (segments seal after 10 s).
    con.execute(f"CREATE OR REPLACE TEMP MACRO _run_at(naive) AS "
                f"time_bucket(INTERVAL {DAG_EVERY_S} SECOND, naive + INTERVAL 30 SECOND) "
                f"+ INTERVAL {DAG_EVERY_S} SECOND")
    con.execute("CREATE OR REPLACE TEMP MACRO _run_id(naive) AS "
                "'scheduled__' || strftime(_run_at(naive), '%Y-%m-%dT%H:%M:%S') || '+00:00'")


# --- registry ------------------------------------------------------------------------------------------

def _registry_tables(con: duckdb.DuckDBPyConnection, plan: Plan) -> None:
    """Per-patient parameters (_gp), devices (_gd), spot-check streams (_spot), zone offsets per day (_tz)."""
    step = max(1, plan.patients // PANEL_SIZE)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _gp AS
        SELECT i AS pno, printf('pt-%05d', i + 1) AS patient_id,
               {_lit(CONDITIONS)}[i % {len(CONDITIONS)} + 1] AS primary_condition,
               {_lit(ZONES)}[i % {len(ZONES)} + 1] AS zone,
               0.70 + 0.28 * _u(i, 0, 2) AS adherence,
               _u(i, 0, 3) < {CGM_SHARE} AS wears_cgm,
               128 + 37 * _u(i, 0, 4) AS base_sys, 78 + 20 * _u(i, 0, 5) AS base_dia,
               70 + 45 * _u(i, 0, 6) AS weight_kg,
               CASE WHEN _u(i, 0, 7) < 0.33 THEN 0.05 ELSE 0.0 END AS gain_kg_day,  -- fluid retention
               90 + 5 * _u(i, 0, 8) AS base_spo2, 130 + 45 * _u(i, 0, 9) AS cgm_mean,
               110 + 50 * _u(i, 0, 10) AS fasting,
               (i % {step} = 0 AND i // {step} < {PANEL_SIZE}) AS in_panel,
               ({_lit(CONDITIONS)}[i % {len(CONDITIONS)} + 1] <> 'hypertension'
                AND _u(i, 0, 1) < 0.5) AS extra_htn
        FROM range({plan.patients}) t(i)""")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _gd AS
        SELECT row_number() OVER (ORDER BY p.pno, k.kind) AS dno, p.*, k.kind,
               k.kind || '-' || lpad(CAST(p.pno + 1 AS VARCHAR), 5, '0') AS device_id
        FROM _gp p, (SELECT unnest({_lit(list(MODELS))}) AS kind) k
        WHERE CASE k.kind
                WHEN 'bp' THEN p.primary_condition IN ('hypertension', 'heart_failure') OR p.extra_htn
                WHEN 'scale' THEN p.primary_condition = 'heart_failure'
                WHEN 'ox' THEN p.primary_condition = 'copd'
                WHEN 'thermo' THEN p.primary_condition = 'copd'
                WHEN 'glu' THEN p.primary_condition = 'diabetes' AND NOT p.wears_cgm
                WHEN 'cgm' THEN p.primary_condition = 'diabetes' AND p.wears_cgm
                ELSE true END""")
    schedule = [(kind, slot_no, hour, metric, sec)
                for kind, (hours, metrics) in SPOT.items()
                for slot_no, hour in enumerate(hours) for sec, metric in enumerate(metrics)]
    values = ", ".join(f"({_lit(k)}, {n}, {h}, {_lit(m)}, {sec})" for k, n, h, m, sec in schedule)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _spot AS
        SELECT d.*, s.slot_no, s.slot_h, s.metric, s.sec_offset
        FROM _gd d JOIN (VALUES {values}) s(kind, slot_no, slot_h, metric, sec_offset) USING (kind)""")
    # Local dates of the window; each zone's UTC offset at local noon (DST included) for every one of them.
    first_local = (plan.start + timedelta(days=1)).date()
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _tz AS
        SELECT z.zone, CAST(d AS INTEGER) AS day_no, DATE '{first_local}' + CAST(d AS INTEGER) AS local_date,
               CAST(date_diff('minute',
                   ((DATE '{first_local}' + CAST(d AS INTEGER)) + INTERVAL 12 HOUR) AT TIME ZONE z.zone
                       AT TIME ZONE 'UTC',
                   (DATE '{first_local}' + CAST(d AS INTEGER)) + INTERVAL 12 HOUR) AS INTEGER) AS offset_min
        FROM (SELECT unnest({_lit(ZONES)}) AS zone) z, range({plan.days}) t(d)""")


def register(con: duckdb.DuckDBPyConnection, plan: Plan) -> dict[str, int]:
    """Patients, devices, enrollments, clinicians and care teams: the rows ``warehouse.registry``
    (upsert_patient, enroll, add_clinician, assign) writes, one statement per table."""
    since = _ts(plan.start - timedelta(days=3))
    con.execute(f"""
        INSERT INTO patients (patient_id, created_at, mrn, given_name, family_name, birth_date, time_zone,
                              conditions)
        SELECT patient_id, _tstz({since}),
               printf('MRN%07d', 7000000 + pno * 7919 % 1000000),
               {_lit(GIVEN)}[CAST(floor(_u(pno, 1, 1) * {len(GIVEN)}) AS INTEGER) + 1],
               {_lit(FAMILY)}[CAST(floor(_u(pno, 1, 2) * {len(FAMILY)}) AS INTEGER) + 1],
               DATE '1940-01-01' + CAST(floor(_u(pno, 1, 3) * 45 * 365) AS INTEGER),
               zone,
               CASE WHEN extra_htn THEN [primary_condition, 'hypertension'] ELSE [primary_condition] END
        FROM _gp ORDER BY pno""")
    con.execute(f"""INSERT INTO devices (device_id, kind, created_at, model, serial)
                    SELECT device_id, kind, _tstz({since}), {_lit(MODELS)}[kind],
                           upper(substr(md5(device_id), 1, 12))
                    FROM _gd ORDER BY dno""")
    con.execute(f"""INSERT INTO enrollments SELECT device_id, patient_id,
                    _tstz({_ts(plan.start - timedelta(days=2))}), NULL FROM _gd ORDER BY dno""")
    con.execute("INSERT INTO clinicians (clinician_id, name, role) "
                "VALUES (?, 'Dr. Panel Example', 'physician'), (?, 'All-Patients RN', 'nurse')",
                [PANEL_CLINICIAN, ALL_CLINICIAN])
    con.execute(f"""INSERT INTO care_team
                    SELECT {_lit(PANEL_CLINICIAN)}, patient_id, _tstz({since}), NULL FROM _gp WHERE in_panel
                    UNION ALL
                    SELECT {_lit(ALL_CLINICIAN)}, patient_id, _tstz({since}), NULL FROM _gp""")
    counts = con.execute("""SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM devices),
                                   (SELECT count(*) FROM care_team WHERE clinician_id = ?)""",
                         [PANEL_CLINICIAN]).fetchone()
    assert counts is not None
    return {"patients": counts[0], "devices": counts[1], "panel": counts[2]}


# --- readings ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Volume:
    """How the requested reading count is met: spot-check keep factor and the derived CGM interval."""

    spot_expected: float
    cgm_devices: int
    cgm_interval_s: int
    keep: float

    @property
    def cgm_per_day(self) -> int:
        return 86400 // self.cgm_interval_s


def plan_volume(con: duckdb.DuckDBPyConnection, plan: Plan) -> Volume:
    """Spot checks at their realistic rate; CGMs sample as often as needed to reach the requested total."""
    row = con.execute("SELECT sum(adherence) FROM _spot").fetchone()
    spot = float(row[0] or 0.0) * plan.days if row else 0.0
    cgm_row = con.execute("SELECT count(*) FROM _gd WHERE kind = 'cgm'").fetchone()
    cgm = int(cgm_row[0]) if cgm_row else 0
    per_device = plan.days * 86400 * (1 - CGM_GAP_RATE)
    if cgm == 0:
        return Volume(spot, 0, CGM_MAX_INTERVAL_S, min(1.0, plan.readings / spot) if spot else 1.0)
    budget = plan.readings - spot
    slowest = cgm * per_device / CGM_MAX_INTERVAL_S
    if budget < slowest:  # small requests: CGMs at 15 min, fewer spot checks
        keep = max(0.02, (plan.readings - slowest) / spot) if spot else 1.0
        return Volume(spot, cgm, CGM_MAX_INTERVAL_S, min(1.0, keep))
    interval = round(cgm * per_device / budget)
    return Volume(spot, cgm, max(CGM_MIN_INTERVAL_S, min(CGM_MAX_INTERVAL_S, interval)), 1.0)


# Spot checks of one chunk (patients [p_lo, p_hi), days [d_lo, d_hi)): values in the unit the device sends.
SPOT_SQL = """
SELECT s.patient_id, s.device_id, s.metric, s.pno, s.dno, tz.day_no AS d, tz.offset_min,
       CAST(tz.local_date AS TIMESTAMP)
         + to_seconds(CAST(round((s.slot_h + 0.4 * _g(s.dno, tz.day_no, 100 + s.slot_no)) * 3600) AS BIGINT)
                      + s.sec_offset) AS local_ts,
       s.slot_h, _u(s.pno, tz.day_no, 13) < {acute} AS acute, _g(s.dno * 8 + s.sec_offset, tz.day_no,
       110 + s.slot_no) AS z1, _g(s.dno * 8 + s.sec_offset, tz.day_no, 120 + s.slot_no) AS z2,
       _u(s.dno * 8 + s.sec_offset, tz.day_no, 130 + s.slot_no) AS u1,
       s.zone = 'Europe/London' AS si_units, s.kind, s.base_sys, s.base_dia, s.weight_kg, s.gain_kg_day,
       s.base_spo2, s.fasting,
       s.device_id || '-' || tz.day_no || '.' || s.slot_no || '.' || s.sec_offset AS msg_id,
       0 AS item_no,
       CASE WHEN _u(s.dno, tz.day_no, 140 + s.slot_no) < 0.05    -- offline: uploaded from the buffer later
            THEN 3600 + CAST(39600 * _u(s.dno, tz.day_no, 150 + s.slot_no) AS BIGINT)
            ELSE 5 + CAST(115 * _u(s.dno, tz.day_no, 150 + s.slot_no) AS BIGINT) END AS delay_s
FROM _spot s JOIN _tz tz ON tz.zone = s.zone AND tz.day_no >= {d_lo} AND tz.day_no < {d_hi}
WHERE s.pno >= {p_lo} AND s.pno < {p_hi} AND _u(s.dno, tz.day_no, 11) < s.adherence * {keep}
"""

SPOT_VALUES_SQL = """
SELECT patient_id, device_id, metric, local_ts, offset_min, msg_id, item_no, delay_s,
       CASE WHEN metric = 'blood_glucose' THEN 'meter' END AS source,
       CASE metric
         WHEN 'blood_pressure' THEN round(base_sys + CASE WHEN slot_h < 12 THEN 8 ELSE 0 END  -- morning surge
                                          + CASE WHEN acute THEN 35 ELSE 0 END + 8 * z1)
         WHEN 'heart_rate' THEN
              CASE WHEN kind = 'ox' THEN round(86 + 8 * z1 + CASE WHEN acute THEN 25 ELSE 0 END)
                   ELSE round(74 + 9 * z1) END
         WHEN 'spo2' THEN least(100, round(base_spo2 + 1.2 * z1 - CASE WHEN acute THEN 6 ELSE 0 END))
         WHEN 'respiratory_rate' THEN round(19 + 2 * z1 + CASE WHEN acute THEN 6 ELSE 0 END)
         WHEN 'body_temperature' THEN
              round((36.8 + 0.3 * z1 + CASE WHEN acute THEN 1.6 ELSE 0 END)
                    * CASE WHEN si_units THEN 1 ELSE 1.8 END + CASE WHEN si_units THEN 0 ELSE 32 END, 1)
         WHEN 'body_weight' THEN
              round((weight_kg + gain_kg_day * d + 0.3 * z1 + CASE WHEN acute THEN 1.2 ELSE 0 END)
                    / CASE WHEN si_units THEN 1 ELSE {lb} END, 1)
         WHEN 'blood_glucose' THEN
              CASE WHEN si_units THEN round(greatest(40, mg) / {mmol}, 1) ELSE round(greatest(40, mg)) END
       END::DOUBLE AS value_sent,
       CASE WHEN metric = 'blood_pressure' THEN
            least(round(base_dia + CASE WHEN slot_h < 12 THEN 4 ELSE 0 END
                        + CASE WHEN acute THEN 15 ELSE 0 END + 5 * z2),
                  round(base_sys + CASE WHEN slot_h < 12 THEN 8 ELSE 0 END
                        + CASE WHEN acute THEN 35 ELSE 0 END + 8 * z1) - 20)::DOUBLE END AS diastolic_sent,
       CASE metric WHEN 'body_temperature' THEN CASE WHEN si_units THEN 'Cel' ELSE '[degF]' END
                   WHEN 'body_weight' THEN CASE WHEN si_units THEN 'kg' ELSE '[lb_av]' END
                   WHEN 'blood_glucose' THEN CASE WHEN si_units THEN 'mmol/L' ELSE 'mg/dL' END
                   ELSE {canonical} END AS unit_sent
FROM (SELECT *, fasting + CASE WHEN slot_h < 9 THEN 0 ELSE 20 + 50 * u1 END + 15 * z2
                - CASE WHEN acute THEN 60 ELSE 0 END AS mg
      FROM spot)
"""

# CGM readings of one chunk: meals, a nocturnal dip, some nights a hypoglycaemic episode, bursts of 12.
CGM_SQL = """
SELECT patient_id, device_id, 'blood_glucose' AS metric, local_ts, offset_min,
       device_id || '-c' || (n // 12) AS msg_id, CAST(n % 12 AS INTEGER) AS item_no,
       (11 - n % 12) * {interval} + 20 AS delay_s, 'cgm' AS source,
       round(greatest(40, least(400, cgm_mean
             + 55 * (exp(-((h - 8) ** 2) / 1.2) + exp(-((h - 13) ** 2) / 1.2) + exp(-((h - 19) ** 2) / 1.2))
             - CASE WHEN h >= 2 AND h < 5 THEN 25 ELSE 0 END
             - CASE WHEN hypo_night AND h >= 2 AND h < 4 THEN 75 ELSE 0 END
             + 12 * _g(dno, n, 160))))::DOUBLE AS value_sent,
       NULL::DOUBLE AS diastolic_sent, 'mg/dL' AS unit_sent
FROM (SELECT c.patient_id, c.device_id, c.dno, tz.offset_min, c.cgm_mean,
             CAST(tz.local_date AS TIMESTAMP) + to_seconds(c.phase_s + k * {interval}) AS local_ts,
             (c.phase_s + k * {interval}) / 3600.0 AS h, tz.day_no * {per_day} + k AS n,
             _u(c.pno, tz.day_no, 21) < 0.05 AS hypo_night, k
      FROM (SELECT *, CAST(floor(_u(dno, 0, 170) * {interval}) AS BIGINT) AS phase_s FROM _gd
            WHERE kind = 'cgm' AND pno >= {p_lo} AND pno < {p_hi}) c
      JOIN _tz tz ON tz.zone = c.zone AND tz.day_no >= {d_lo} AND tz.day_no < {d_hi},
      range({per_day}) r(k)
      WHERE _u(c.dno, tz.day_no, 200 + (c.phase_s + k * {interval}) // 7200) >= {gap})
"""

# The chunk's readings as sent, with UTC instants; instants after the window's end are dropped. Materialised
# first: its sources (a few thousand streams) are one DuckDB task, whereas a scan of the materialised chunk
# runs the costly part below (sha256, formatting, sort, compression) on every core.
CHUNK_SQL = """
CREATE OR REPLACE TEMP TABLE _chunk AS
WITH spot AS ({spot}), gen AS ({spot_values} UNION ALL {cgm})
SELECT patient_id, device_id, metric, source, value_sent, diastolic_sent, unit_sent, offset_min, msg_id,
       item_no, local_ts - to_minutes(offset_min) AS at_utc,
       least(local_ts - to_minutes(offset_min) + to_seconds(delay_s), {end}) AS recv_utc
FROM gen WHERE local_ts - to_minutes(offset_min) <= {end} - INTERVAL 5 MINUTE
"""

# Canonical rows, exactly the columns INSERT_READINGS writes.
READINGS_SQL = """
INSERT INTO readings (reading_id, patient_id, device_id, metric, loinc, value, diastolic, unit, unit_sent,
                      source, measured_at, utc_offset_min, received_at, loaded_at, msg_id, segment, record_no,
                      item_no, extra, run_id, manual)
SELECT sha256(device_id || '|' || metric || '|' || _iso(at_utc))[:32], patient_id, device_id, metric,
       CASE WHEN source = 'cgm' THEN {cgm_loinc} ELSE {loinc} END,
       CASE unit_sent WHEN '[degF]' THEN (value_sent - 32.0) * 5.0 / 9.0
                      WHEN '[lb_av]' THEN value_sent * {lb}
                      WHEN 'mmol/L' THEN value_sent * {mmol}
                      ELSE value_sent END,
       diastolic_sent, {canonical}, unit_sent, source, _tstz(at_utc), offset_min, _tstz(recv_utc),
       _tstz(least(_run_at(recv_utc) + INTERVAL 40 SECOND, {end})), msg_id, _segment(recv_utc),
       CAST(hash(msg_id) % 100000 AS INTEGER), item_no, NULL, _run_id(recv_utc), false
FROM _chunk
ORDER BY {order}
"""

ORDERS = {"time": "recv_utc", "patient": "patient_id, at_utc, device_id, metric"}


def _chunks(plan: Plan) -> list[tuple[int, int, int, int]]:
    """(p_lo, p_hi, d_lo, d_hi) slices of about CHUNK_ROWS readings: by days for arrival order (each
    chunk is what a stretch of DAG runs appends), by patients for patient order."""
    if plan.order == "patient":
        per_patient = max(1, plan.readings // max(1, plan.patients))
        step = max(1, CHUNK_ROWS // per_patient)
        return [(p, min(plan.patients, p + step), 0, plan.days) for p in range(0, plan.patients, step)]
    per_day = max(1, plan.readings // plan.days)
    step = max(1, CHUNK_ROWS // per_day)
    return [(0, plan.patients, d, min(plan.days, d + step)) for d in range(0, plan.days, step)]


def _readings_sql(plan: Plan, vol: Volume, chunk: tuple[int, int, int, int]) -> tuple[str, str]:
    """(materialise the chunk, insert it) statements."""
    p_lo, p_hi, d_lo, d_hi = chunk
    canonical = _case("metric", {m.name: m.canonical_unit for m in METRICS.values()})
    loinc = _case("metric", {m.name: m.loinc for m in METRICS.values()})
    bounds = dict(p_lo=p_lo, p_hi=p_hi, d_lo=d_lo, d_hi=d_hi)
    spot = SPOT_SQL.format(acute=ACUTE_DAY_RATE, keep=vol.keep, **bounds)
    values = SPOT_VALUES_SQL.format(lb=LB_AV_IN_KG, mmol=GLUCOSE_MG_DL_PER_MMOL_L, canonical=canonical)
    cgm = CGM_SQL.format(interval=vol.cgm_interval_s, per_day=vol.cgm_per_day, gap=CGM_GAP_RATE, **bounds)
    return (CHUNK_SQL.format(spot=spot, spot_values=values, cgm=cgm, end=_ts(plan.end)),
            READINGS_SQL.format(end=_ts(plan.end), cgm_loinc=_lit(CGM_LOINC), loinc=loinc, lb=LB_AV_IN_KG,
                                mmol=GLUCOSE_MG_DL_PER_MMOL_L, canonical=canonical, order=ORDERS[plan.order]))


def load_readings(con: duckdb.DuckDBPyConnection, plan: Plan, vol: Volume,
                  log: Callable[[str], None]) -> int:
    """Insert the readings chunk by chunk, each its own transaction."""
    con.execute("SET checkpoint_threshold = '1TB'")  # one checkpoint at the end
    chunks = _chunks(plan)
    for n, chunk in enumerate(chunks, start=1):
        with Timer() as t:
            make_chunk, insert = _readings_sql(plan, vol, chunk)
            con.execute(make_chunk)
            con.execute("BEGIN TRANSACTION")
            con.execute(insert)
            con.execute("COMMIT")
        if n == 1 or n % 10 == 0 or n == len(chunks):
            log(f"  readings chunk {n}/{len(chunks)} ({t.seconds:.1f} s, peak RSS {_peak_mb():,.0f} MiB)")
    con.execute("DROP TABLE IF EXISTS _chunk")
    con.execute("CHECKPOINT")
    con.execute("RESET checkpoint_threshold")
    row = con.execute("SELECT count(*) FROM readings").fetchone()
    return int(row[0]) if row else 0


def add_patient_days(con: duckdb.DuckDBPyConnection) -> int:
    """The per-patient-day rollup the load keeps (``warehouse.patient_days``), counted once for the whole
    history."""
    from warehouse.patient_days import rebuild

    return rebuild(con)


# --- telehealth, management time, ledger, alerts ------------------------------------------------------

TELEHEALTH_SQL = """
INSERT INTO telehealth_events (event_id, patient_id, device_id, channel, event, occurred_at, utc_offset_min,
    received_at, loaded_at, module, minutes, appointment_id, modality, scheduled_for, survey, battery_pct,
    signal_dbm, firmware, uptime_s, msg_id, segment, record_no, item_no, extra, run_id)
WITH app AS (SELECT a.*, tz.day_no AS d, tz.local_date, tz.offset_min FROM _gd a
             JOIN _tz tz ON tz.zone = a.zone WHERE a.kind = 'app'),
modules AS (SELECT * FROM (VALUES {modules}) m(condition, mno, module)),
edu AS (
    SELECT a.*, m.module, m.mno, _u(a.dno, a.d, 400 + m.mno) AS u FROM app a
    JOIN modules m ON m.condition = a.primary_condition
),
appointments AS (  -- 1-3 per patient, some still ahead (booked, no outcome yet)
    SELECT g.*, k, 'apt-' || (g.pno + 1) || '-' || k AS apt,
           CAST(1 + floor(_u(g.dno, k, 410) * ({days} + 6)) AS INTEGER) AS d,
           CASE WHEN _u(g.dno, k, 411) < 0.5 THEN 'video' WHEN _u(g.dno, k, 411) < 0.8 THEN 'phone'
                ELSE 'in_person' END AS modality,
           CASE WHEN _u(g.dno, k, 412) < 0.75 THEN 'appointment_attended'
                WHEN _u(g.dno, k, 412) < 0.90 THEN 'appointment_no_show'
                ELSE 'appointment_cancelled' END AS outcome
    FROM _gd g, range(3) r(k) WHERE g.kind = 'app' AND k < 1 + floor(_u(g.dno, 0, 413) * 3)
),
appt_offsets AS (
    SELECT a.*, coalesce(tz.offset_min, last.offset_min) AS offset_min,
           DATE '{first_local}' + a.d AS local_date
    FROM appointments a LEFT JOIN _tz tz ON tz.zone = a.zone AND tz.day_no = a.d
    JOIN _tz last ON last.zone = a.zone AND last.day_no = {days} - 1
),
events AS (
    SELECT patient_id, device_id, 'events' AS channel, 'education_viewed' AS event,
           CAST(local_date AS TIMESTAMP) + to_seconds(CAST((18 + u * 10) * 3600 AS BIGINT)) AS local_ts,
           offset_min,
           module, CAST(2 + floor(u * 70) % 8 AS DOUBLE) AS minutes, NULL AS apt, NULL AS modality,
           NULL::TIMESTAMP AS scheduled_local, NULL AS survey, NULL::DOUBLE AS battery_pct,
           NULL::DOUBLE AS signal_dbm, NULL AS firmware, NULL::DOUBLE AS uptime_s, module AS disc
    FROM edu WHERE u < 0.10
    UNION ALL
    SELECT patient_id, device_id, 'events', 'education_completed',
           CAST(local_date AS TIMESTAMP) + to_seconds(CAST((19.5 + u * 10) * 3600 AS BIGINT)), offset_min,
           module, CAST(8 + floor(u * 170) % 18 AS DOUBLE), NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           module
    FROM edu WHERE u < 0.06
    UNION ALL
    SELECT patient_id, device_id, 'events', 'appointment_scheduled',
           CAST(local_date - 1 AS TIMESTAMP) + INTERVAL 10 HOUR, offset_min, NULL, NULL, apt, modality,
           CAST(local_date AS TIMESTAMP) + INTERVAL 14 HOUR, NULL, NULL, NULL, NULL, NULL, apt
    FROM appt_offsets
    UNION ALL
    SELECT patient_id, device_id, 'events', outcome,
           CAST(local_date AS TIMESTAMP) + INTERVAL 14 HOUR + INTERVAL 30 MINUTE, offset_min, NULL, NULL, apt,
           modality, NULL, NULL, NULL, NULL, NULL, NULL, apt
    FROM appt_offsets
    UNION ALL
    SELECT patient_id, device_id, 'events', 'survey_completed',
           CAST(local_date AS TIMESTAMP) + INTERVAL 20 HOUR, offset_min, NULL, NULL, NULL, NULL, NULL,
           'phq-2',
           NULL, NULL, NULL, NULL, 'phq-2'
    FROM app WHERE d % 7 = 2 AND _u(dno, d, 420) < 0.6
    UNION ALL
    SELECT g.patient_id, g.device_id, 'status', 'device_status',
           CAST(tz.local_date AS TIMESTAMP)
             + to_seconds(CAST((3 + _u(g.dno, tz.day_no, 430)) * 3600 AS BIGINT)),
           tz.offset_min, NULL, NULL, NULL, NULL, NULL, NULL,
           -- batteries drain 0.5-3 %/day and are recharged or replaced around 5 %
           round(100 - (tz.day_no * (0.5 + 2.5 * _u(g.dno, 0, 431)) + 90 * _u(g.dno, 0, 432)) % 95),
           -50 - floor(45 * _u(g.dno, tz.day_no, 433)),
           {firmware}[g.kind][CAST(floor(_u(g.dno, 0, 434) * len({firmware}[g.kind])) AS INTEGER) + 1],
           86400.0 * (tz.day_no + 1), ''
    FROM _gd g JOIN _tz tz ON tz.zone = g.zone WHERE g.kind <> 'app'
),
utc AS (SELECT *, local_ts - to_minutes(offset_min) AS at_utc,
               least(local_ts - to_minutes(offset_min) + INTERVAL 45 SECOND, {end}) AS recv_utc
        FROM events WHERE local_ts - to_minutes(offset_min) <= {end} - INTERVAL 5 MINUTE)
SELECT sha256(device_id || '|' || event || '|' || _iso(at_utc) || '|' || coalesce(disc, ''))[:32],
       patient_id, device_id, channel, event, _tstz(at_utc), offset_min, _tstz(recv_utc),
       _tstz(least(_run_at(recv_utc) + INTERVAL 40 SECOND, {end})), module, minutes, apt, modality,
       _tstz(scheduled_local - to_minutes(offset_min)), survey, battery_pct, signal_dbm, firmware, uptime_s,
       device_id || '-e' || substr(md5(event || _iso(at_utc) || coalesce(disc, '')), 1, 10),
       _segment(recv_utc), CAST(hash(device_id, at_utc) % 100000 AS INTEGER), 0, NULL, _run_id(recv_utc)
FROM utc
ORDER BY recv_utc
"""


def add_telehealth_events(con: duckdb.DuckDBPyConnection, plan: Plan) -> int:
    """App events (education, appointments, PHQ-2 surveys) and daily device status, like the simulator's."""
    modules = ", ".join(f"({_lit(c)}, {n}, {_lit(m)})" for c, ms in MODULES.items() for n, m in enumerate(ms))
    firmware = _lit({k: list(v) for k, v in FIRMWARE.items()})
    con.execute(TELEHEALTH_SQL.format(modules=modules, firmware=firmware, days=plan.days, end=_ts(plan.end),
                                      first_local=(plan.start + timedelta(days=1)).date()))
    row = con.execute("SELECT count(*) FROM telehealth_events").fetchone()
    return int(row[0]) if row else 0


def add_interactions(con: duckdb.DuckDBPyConnection, plan: Plan) -> int:
    """Logged treatment-management time: about 2-3 sessions of 5-25 min a month, 60 % interactive, so months
    spread over no code, 99470, 99457 and 99458."""
    con.execute(f"""
        INSERT INTO interactions (patient_id, clinician_id, minutes, interactive, occurred_at, note)
        SELECT patient_id, CASE WHEN in_panel THEN {_lit(PANEL_CLINICIAN)} ELSE {_lit(ALL_CLINICIAN)} END,
               CAST(5 + floor(_u(pno, w, 501) * 21) AS INTEGER), _u(pno, w, 502) < 0.6,
               _tstz({_ts(plan.start)} + to_seconds(CAST((w * 7 + 7 * _u(pno, w, 503)) * 86400 AS BIGINT))),
               NULL
        FROM _gp, range({plan.days // 7 + 1}) r(w)
        WHERE _u(pno, w, 500) < 0.6
          AND {_ts(plan.start)} + to_seconds(CAST((w * 7 + 7 * _u(pno, w, 503)) * 86400 AS BIGINT))
              <= {_ts(plan.end)}
    """)
    row = con.execute("SELECT count(*) FROM interactions").fetchone()
    return int(row[0]) if row else 0


def add_ledger(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    """The segment ledger and the pipeline-run record the loads would have committed (nothing quarantined
    or duplicated: every generated item is valid)."""
    con.execute("""
        INSERT INTO segments
        SELECT segment, count(DISTINCT msg_id), count(*), count(*), 0, 0, max(loaded_at), any_value(run_id)
        FROM (SELECT segment, msg_id, loaded_at, run_id FROM readings
              UNION ALL SELECT segment, msg_id, loaded_at, run_id FROM telehealth_events)
        GROUP BY segment""")
    # Latency percentiles per run from a 5 % row sample: holistic aggregates over every reading of 60k+ runs
    # cost more than the rest of the generator's ledger together, and ops reads them as approximate anyway.
    con.execute("""
        INSERT INTO pipeline_runs (run_id, state, started_at, finished_at, segments, messages, received,
                                   loaded, quarantined, duplicates, quarantined_by_rule, task_seconds,
                                   measured_to_received_p50_s, measured_to_received_p95_s,
                                   received_to_loaded_p50_s, received_to_loaded_p95_s,
                                   measured_to_loaded_p50_s, measured_to_loaded_p95_s)
        WITH runs AS (
            SELECT run_id, min(loaded_at) AS first_load, max(loaded_at) AS last_load,
                   count(DISTINCT segment) AS segments, count(DISTINCT msg_id) AS messages, count(*) AS items
            FROM readings GROUP BY run_id
        ), latency AS (
            SELECT run_id, approx_quantile(epoch(received_at - measured_at), [0.5, 0.95]) AS mr,
                   approx_quantile(epoch(loaded_at - received_at), [0.5, 0.95]) AS rl,
                   approx_quantile(epoch(loaded_at - measured_at), [0.5, 0.95]) AS ml
            FROM (SELECT * FROM readings USING SAMPLE 5 PERCENT (bernoulli, 7)) GROUP BY run_id
        )
        SELECT run_id, 'success', first_load - INTERVAL 35 SECOND, last_load + INTERVAL 5 SECOND, segments,
               messages, items, items, 0, 0, '{}',
               '{"claim_segments": 0.1, "stage": 2.0, "validate": 3.0, "load": 1.5, "marts": 0.5}',
               mr[1], mr[2], rl[1], rl[2], ml[1], ml[2]
        FROM runs LEFT JOIN latency USING (run_id)""")
    row = con.execute("SELECT (SELECT count(*) FROM segments), "
                      "(SELECT count(*) FROM pipeline_runs)").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


# Open episodes from each patient's latest readings, keyed and described exactly as refresh_alerts keys them:
# one per family, at the most severe level the reading breaches.
DIRECT_ALERTS_SQL = """
INSERT INTO alerts (alert_id, patient_id, rule, severity, description, opened_at, opened_reading_id,
                    last_breach_at, last_observed, breaches, resolved_at, resolved_reading_id, evaluated_at,
                    opened_rule)
WITH latest AS (
    SELECT patient_id, metric, arg_max(reading_id, measured_at) AS reading_id,
           max(measured_at) AS measured_at, arg_max(value, measured_at) AS value,
           arg_max(diastolic, measured_at) AS diastolic
    FROM readings WHERE measured_at >= now() - INTERVAL 3 DAY GROUP BY patient_id, metric
), breaches AS (
    SELECT patient_id, CASE WHEN value >= 180 OR diastolic >= 120 THEN 'bp_severe' ELSE 'bp_stage2' END AS rule,
           reading_id, measured_at, printf('%.0f/%.0f mm[Hg]', value, diastolic) AS observed
    FROM latest WHERE metric = 'blood_pressure' AND (value >= 140 OR diastolic >= 90)
    UNION ALL SELECT patient_id, CASE WHEN value < 88 THEN 'spo2_urgent' ELSE 'spo2_low' END, reading_id,
                     measured_at, printf('%.0f %%', value)
    FROM latest WHERE metric = 'spo2' AND value < 92
    UNION ALL SELECT patient_id, 'glucose_level2_high', reading_id, measured_at, printf('%.0f mg/dL', value)
    FROM latest WHERE metric = 'blood_glucose' AND value > 250
    UNION ALL SELECT patient_id, CASE WHEN value < 54 THEN 'glucose_level2_low' ELSE 'glucose_level1_low' END,
                     reading_id, measured_at, printf('%.0f mg/dL', value)
    FROM latest WHERE metric = 'blood_glucose' AND value < 70
)
SELECT md5(b.patient_id || '|' || b.rule || '|' || b.reading_id), b.patient_id, b.rule, d.severity,
       d.description, b.measured_at, b.reading_id, b.measured_at, b.observed, 1, NULL, NULL, now(), b.rule
FROM breaches b
JOIN alert_rules d USING (rule)
"""


def add_alerts(con: duckdb.DuckDBPyConnection, plan: Plan, readings: int) -> tuple[str, int]:
    """Alert episodes: the real evaluation when it fits, else open alerts from the latest readings."""
    mode = plan.alerts
    if mode == "auto":
        mode = "evaluate" if readings <= EVALUATE_MAX_READINGS else "direct"
    if mode == "evaluate":
        from warehouse.alerts import refresh_alerts

        refresh_alerts(con)
    else:
        con.execute(DIRECT_ALERTS_SQL)
    row = con.execute("SELECT count(*) FILTER (WHERE resolved_at IS NULL) FROM alerts").fetchone()
    return mode, int(row[0]) if row else 0


# --- driver --------------------------------------------------------------------------------------------

def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _size_mb(path: Path | None) -> float:
    return path.stat().st_size / 2**20 if path and path.exists() else 0.0


@dataclass
class Generated:
    """What was built, how long each stage took, and how big the files are."""

    plan: Plan
    counts: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    sizes_mb: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"patients": self.plan.patients, "readings_requested": self.plan.readings,
                "days": self.plan.days, "order": self.plan.order,
                "counts": self.counts, "seconds": self.seconds,
                "sizes_mb": self.sizes_mb, "peak_rss_mb": self.peak_rss_mb}


def generate(s: Settings, plan: Plan, log: Callable[[str], None] = print) -> Generated:
    """Build the whole synthetic warehouse under ``s.home`` (which should be empty) and publish it."""
    from warehouse.db import open_clinical
    from warehouse.serving import publish_snapshot
    from warehouse.telehealth import publish_telehealth, telehealth_db

    out = Generated(plan)

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        with Timer() as t:
            result = fn()
        out.seconds[name] = round(t.seconds, 2)
        log(f"{name}: {t.seconds:.1f} s (peak RSS so far {_peak_mb():,.0f} MiB)")
        return result

    with Timer() as total:
        prepare_home(s)
        con = open_clinical(s)
        try:
            con.execute(f"SET memory_limit = {_lit(plan.memory_limit)}")
            _macros(con, plan.seed)
            stage("registry", lambda: _registry_tables(con, plan))
            out.counts.update(stage("register", lambda: register(con, plan)))
            vol = plan_volume(con, plan)
            out.counts.update(cgm_devices=vol.cgm_devices, cgm_interval_s=vol.cgm_interval_s,
                              spot_keep=round(vol.keep, 3))
            log(f"CGM every {vol.cgm_interval_s} s on {vol.cgm_devices} devices; "
                f"spot checks kept x{vol.keep:.2f}")
            out.counts["readings"] = stage("readings", lambda: load_readings(con, plan, vol, log))
            out.counts["patient_days"] = stage("patient_days", lambda: add_patient_days(con))
            out.counts["telehealth_events"] = stage("telehealth_events",
                                                    lambda: add_telehealth_events(con, plan))
            out.counts["interactions"] = stage("interactions", lambda: add_interactions(con, plan))
            out.counts["segments"], out.counts["pipeline_runs"] = stage("ledger", lambda: add_ledger(con))
            mode, n = stage("alerts", lambda: add_alerts(con, plan, out.counts["readings"]))
            out.counts.update(alerts_mode=mode, open_alerts=n)
            stage("checkpoint", lambda: con.execute("CHECKPOINT"))
            snapshot = stage("publish_snapshot", lambda: publish_snapshot(s, con))
        finally:
            con.close()
        out.counts["telehealth_tables"] = stage("publish_telehealth", lambda: publish_telehealth(s))
    out.seconds["total"] = round(total.seconds, 2)
    out.sizes_mb = {"clinical": round(_size_mb(s.clinical_db), 1), "snapshot": round(_size_mb(snapshot), 1),
                    "telehealth": round(_size_mb(telehealth_db(s)), 1)}
    out.peak_rss_mb = round(_peak_mb(), 1)
    return out


def report(g: Generated) -> None:
    """The generation tables: what was made, and where the time and bytes went."""
    c = g.counts
    print_table(f"Generated warehouse ({g.plan.patients:,} patients, {g.plan.readings:,} readings requested, "
                f"order={g.plan.order})", ["item", "value"],
                [["patients", c["patients"]], ["devices", c["devices"]], ["panel patients", c["panel"]],
                 ["readings", c["readings"]], ["patient-day rows", c.get("patient_days")],
                 ["CGM interval (s)", c["cgm_interval_s"]],
                 ["telehealth events", c["telehealth_events"]], ["interactions", c["interactions"]],
                 ["ledger segments", c["segments"]], ["pipeline runs", c["pipeline_runs"]],
                 [f"open alerts ({c['alerts_mode']})", c["open_alerts"]],
                 ["clinical.duckdb (MiB)", g.sizes_mb["clinical"]],
                 ["serving snapshot (MiB)", g.sizes_mb["snapshot"]],
                 ["telehealth.duckdb (MiB)", g.sizes_mb["telehealth"]], ["peak RSS (MiB)", g.peak_rss_mb]])
    print_table("Generation time", ["stage", "seconds"], [[k, v] for k, v in g.seconds.items()])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Generate a synthetic clinical warehouse into a fresh RPM_HOME.")
    p.add_argument("--patients", type=int, default=1000)
    p.add_argument("--readings", type=int, default=2_000_000)
    p.add_argument("--home", required=True, help="new, empty RPM_HOME folder")
    p.add_argument("--days", type=int, default=90)
    p.add_argument("--order", choices=tuple(ORDERS), default="time",
                   help="physical order of readings: arrival time (default) or (patient, time)")
    p.add_argument("--alerts", choices=("auto", "evaluate", "direct"), default="auto")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--memory-limit", default="8GB", help="DuckDB memory_limit of the generator")
    p.add_argument("--key", choices=("build", "skip"), default=None,
                   help="no effect: readings have no key index since migration 005 (kept for older commands)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    a = p.parse_args(argv)
    home = Path(a.home)
    if home.exists() and any(home.iterdir()):
        print(f"{home} is not empty: give a new folder (the generator builds a fresh RPM_HOME)",
              file=sys.stderr)
        return 2
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    plan = Plan(a.patients, a.readings, a.days, a.order, a.alerts, a.seed, a.memory_limit)
    g = generate(Settings(home=home), plan)
    report(g)
    if a.json:
        from bench.common import write_json

        write_json(a.json, "generate", g.as_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
