"""The telehealth store: reporting data without direct identifiers, rebuilt from the clinical warehouse.

People, devices and appointments appear only as keyed pseudonyms — HMAC-SHA256 with a secret kept in
``secrets/pseudonym.key`` (outside both stores) — stable across rebuilds so trends can be followed, and
useless without the key. No names, MRNs, dates of birth, device serials, registry ids, broker usernames or
IP addresses are copied; free text fields are not copied either.

The file is rebuilt whole on every publish into a temporary file and swapped in atomically, so a reader
never sees a half-built store and never blocks the pipeline. Report views (``warehouse/telehealth_sql``)
are created inside it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pandas as pd

from core.keys import read_secret, write_private
from core.settings import Settings
from warehouse.serving import serving

SQL_DIR = Path(__file__).parent / "telehealth_sql"


def telehealth_db(s: Settings) -> Path:
    return Path(s.warehouse_dir) / "telehealth.duckdb"


def pseudonym_key(s: Settings) -> bytes:
    path = Path(s.secrets_dir) / "pseudonym.key"
    if not path.exists():
        write_private(path, secrets.token_hex(32).encode())
    return bytes.fromhex(read_secret(path))


def pseudonym(key: bytes, kind: str, value: str) -> str:
    """Stable keyed pseudonym: the same person is the same key in every rebuild; reversible by nobody."""
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:20]


# Each table: what reporting needs, nothing that identifies. `pseudo` maps (kind, id) -> key.
TABLES = {
    "people": """
        SELECT pp.key AS person_key, p.conditions,
               CAST(min(e.valid_from) AS DATE) AS enrolled_on,
               CAST(min(r.measured_at) FILTER (NOT r.manual) AS DATE) AS first_reading_on,
               date_diff('hour', min(e.valid_from), min(r.measured_at) FILTER (NOT r.manual))
                   AS hours_enrolment_to_first_reading,
               coalesce(bool_or(e.valid_to IS NULL) FILTER (WHERE e.device_id IS NOT NULL), false)
                   AS currently_enrolled
        FROM clinical.patients p
        JOIN pseudo pp ON pp.kind = 'patient' AND pp.id = p.patient_id
        LEFT JOIN clinical.enrollments e ON e.patient_id = p.patient_id
        LEFT JOIN clinical.readings r ON r.patient_id = p.patient_id
        GROUP BY pp.key, p.conditions""",
    "devices": """
        SELECT dp.key AS device_key, pp.key AS person_key, d.kind AS device_kind, d.model
        FROM clinical.devices d
        JOIN pseudo dp ON dp.kind = 'device' AND dp.id = d.device_id
        LEFT JOIN clinical.enrollments e ON e.device_id = d.device_id AND e.valid_to IS NULL
        LEFT JOIN pseudo pp ON pp.kind = 'patient' AND pp.id = e.patient_id""",
    "education_events": """
        SELECT ek.key AS event_key, pp.key AS person_key, t.event, t.module, t.minutes,
               CAST(make_timestamp(epoch_us(t.occurred_at) + t.utc_offset_min * 60000000::BIGINT) AS DATE) AS occurred_on,
               CAST(date_trunc('week', make_timestamp(epoch_us(t.occurred_at) + t.utc_offset_min * 60000000::BIGINT)) AS DATE)
                   AS week
        FROM clinical.telehealth_events t
        JOIN pseudo pp ON pp.kind = 'patient' AND pp.id = t.patient_id
        JOIN pseudo ek ON ek.kind = 'event' AND ek.id = t.event_id
        WHERE t.event LIKE 'education_%'""",
    "appointment_events": """
        SELECT ek.key AS event_key, pp.key AS person_key, ak.key AS appointment_key, t.event, t.modality,
               CAST(make_timestamp(epoch_us(t.occurred_at) + t.utc_offset_min * 60000000::BIGINT) AS DATE) AS occurred_on,
               CAST(date_trunc('week', make_timestamp(epoch_us(t.occurred_at) + t.utc_offset_min * 60000000::BIGINT)) AS DATE)
                   AS week,
               t.occurred_at
        FROM clinical.telehealth_events t
        JOIN pseudo pp ON pp.kind = 'patient' AND pp.id = t.patient_id
        JOIN pseudo ek ON ek.kind = 'event' AND ek.id = t.event_id
        JOIN pseudo ak ON ak.kind = 'appointment' AND ak.id = t.patient_id || '|' || t.appointment_id
        WHERE t.event LIKE 'appointment_%'""",
    "survey_events": """
        SELECT ek.key AS event_key, pp.key AS person_key, t.survey,
               CAST(make_timestamp(epoch_us(t.occurred_at) + t.utc_offset_min * 60000000::BIGINT) AS DATE) AS occurred_on
        FROM clinical.telehealth_events t
        JOIN pseudo pp ON pp.kind = 'patient' AND pp.id = t.patient_id
        JOIN pseudo ek ON ek.kind = 'event' AND ek.id = t.event_id
        WHERE t.event = 'survey_completed'""",
    "device_status": """
        SELECT dp.key AS device_key, pp.key AS person_key, d.kind AS device_kind, t.battery_pct, t.signal_dbm,
               t.firmware, t.uptime_s, t.occurred_at AS reported_at
        FROM clinical.telehealth_events t
        JOIN clinical.devices d ON d.device_id = t.device_id
        JOIN pseudo dp ON dp.kind = 'device' AND dp.id = t.device_id
        JOIN pseudo pp ON pp.kind = 'patient' AND pp.id = t.patient_id
        WHERE t.event = 'device_status'""",
    # Transmissions per device and patient-local day (the registered home zone's, as billing counts them):
    # connectivity and adherence are built on this.
    "device_days": """
        SELECT dp.key AS device_key, pp.key AS person_key, d.kind AS device_kind, r.local_date AS day,
               count(*) AS readings, count(*) FILTER (r.manual) AS manual_readings,
               min(r.measured_at) AS first_at, max(r.measured_at) AS last_at, max(r.received_at) AS last_received_at
        FROM clinical.stg_readings r
        JOIN clinical.devices d ON d.device_id = r.device_id
        JOIN pseudo dp ON dp.kind = 'device' AND dp.id = r.device_id
        JOIN pseudo pp ON pp.kind = 'patient' AND pp.id = r.patient_id
        GROUP BY ALL""",
    # Silences longer than 24 h between consecutive transmissions of a device, and the current one.
    "device_gaps": """
        SELECT dp.key AS device_key, g.gap_start, g.gap_end,
               date_diff('minute', g.gap_start, coalesce(g.gap_end, now())) / 60.0 AS hours,
               g.gap_end IS NULL AS ongoing
        FROM (SELECT device_id, measured_at AS gap_start,
                     lead(measured_at) OVER (PARTITION BY device_id ORDER BY measured_at) AS gap_end
              FROM clinical.readings WHERE NOT manual) g  -- a hand-typed value is no sign of a connected device
        JOIN pseudo dp ON dp.kind = 'device' AND dp.id = g.device_id
        WHERE coalesce(g.gap_end, now()) - g.gap_start > INTERVAL 24 HOUR""",
    # `error` is free text (exception messages can quote key values): it stays in the clinical store.
    "pipeline_runs": "SELECT * EXCLUDE (error) FROM clinical.pipeline_runs",
    "quarantine_daily": """
        SELECT CAST(quarantined_at AS DATE) AS day, reason, count(*) AS items
        FROM (SELECT quarantined_at, unnest(reasons) AS reason FROM clinical.quarantine) GROUP BY ALL""",
}


def _pseudonyms(con: duckdb.DuckDBPyConnection, key: bytes) -> pd.DataFrame:
    ids = con.execute("""
        SELECT 'patient', patient_id FROM clinical.patients
        UNION SELECT 'device', device_id FROM clinical.devices
        UNION SELECT 'event', event_id FROM clinical.telehealth_events
        UNION SELECT 'appointment', patient_id || '|' || appointment_id FROM clinical.telehealth_events
              WHERE appointment_id IS NOT NULL""").fetchall()
    return pd.DataFrame({"kind": [k for k, _ in ids], "id": [i for _, i in ids],
                         "key": [pseudonym(key, k, i) for k, i in ids]})


def publish_telehealth(s: Settings) -> dict[str, int]:
    """Rebuild the telehealth store from the current serving snapshot; returns row counts per table."""
    if not s.clinical_db.exists():
        return {}  # nothing loaded yet (e.g. rpm_daily before the first rpm_pipeline run)
    target = telehealth_db(s)
    tmp = target.with_name(f".{target.name}.building")
    tmp.unlink(missing_ok=True)
    counts: dict[str, int] = {}
    with serving(s, private=True) as con:
        con.register("pseudo", _pseudonyms(con, pseudonym_key(s)))
        con.execute(f"ATTACH '{tmp}' AS th")
        for name, sql in TABLES.items():
            con.execute(f"CREATE TABLE th.{name} AS {sql}")
            counts[name] = con.execute(f"SELECT count(*) FROM th.{name}").fetchone()[0]  # type: ignore[index]
        con.execute("CREATE TABLE th.store_info AS SELECT ?::TIMESTAMPTZ AS built_at", [datetime.now(UTC)])
        con.execute("USE th")
        for path in sorted(SQL_DIR.glob("*.sql")):
            con.execute(path.read_text())
        con.execute("USE clinical")
        con.execute("DETACH th")
    os.replace(tmp, target)
    return counts


def open_telehealth(s: Settings) -> duckdb.DuckDBPyConnection:
    """Read-only connection to the telehealth store (never blocks the pipeline: the file is swapped whole)."""
    path = telehealth_db(s)
    if not path.exists():
        raise FileNotFoundError(f"no telehealth store at {path}: run `rpm pipeline run` first")
    # ATTACH on a fresh in-memory connection: duckdb.connect(path) would reuse a cached instance of the
    # replaced file while any older connection to it is still open in this process.
    con = duckdb.connect()
    con.execute(f"ATTACH '{path}' AS telehealth (READ_ONLY)")
    con.execute("USE telehealth")
    return con
