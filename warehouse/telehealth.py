"""The telehealth store: the practice's reporting data as a HIPAA limited data set, rebuilt from the warehouse.

What it holds, and why each choice (README, "The telehealth store and HIPAA"):

- no direct identifier (45 CFR 164.514(e)(2)): people, devices and appointments appear only as keyed
  pseudonyms — HMAC-SHA256 with a secret in ``secrets/pseudonym.key``, kept apart from both stores — stable
  across rebuilds so trends can be followed, reversible by nobody (a re-identification code, 164.514(c)). No
  names, MRNs, birth dates, registry or device ids, serials, appointment or message ids, logins, addresses;
- dates only as coarse as each report needs, never a time of day: education, surveys and appointments by
  patient-local week, readings and device status by day, enrolment by month; silences as whole hours;
- conditions as care programmes, and every text field of the event contract through the catalogue
  (transforms/catalogue.py): a value it does not list is stored as "other" (the raw value stays in the
  clinical stream);
- encrypted at rest with its own key (``secrets/telehealth.key``): the file opens for the reporting commands,
  run as the service account, not for anyone who copies it (nor with the clinical key).

Dates make it a limited data set, not Safe Harbor data: it is for the practice's own operations, and leaves
the practice only under a data use agreement — or as a published report (warehouse/reports.py: aggregates,
small cells suppressed).

Every publish writes a temporary file and swaps it in atomically, so a reader never sees a half-built store
and never blocks the pipeline. A pipeline run *updates* a copy of the store with what it loaded — the rows of
the patients and devices with new readings or events are rebuilt from their whole history, the ops tables
whole, every current silence remeasured — and holds exactly what a full rebuild would (tested); anything an
update cannot see (a registry or key change, rows deleted) rebuilds it whole, as rotation and rpm_daily do.
Report views (``telehealth_sql/``) are created inside it.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pandas as pd

from core import keys
from core.settings import Settings
from transforms import catalogue
from warehouse.db import encrypted_instance, one_row
from warehouse.serving import serving

SQL_DIR = Path(__file__).parent / "telehealth_sql"
HIPAA_ROUTE = ("limited data set (45 CFR 164.514(e)): pseudonymous, dates by day or week; practice use or data "
               "use agreement only")


class TelehealthLocked(PermissionError):
    """The telehealth store does not open with the key on disk (missing, or not the one it was built under)."""


def telehealth_db(s: Settings) -> Path:
    return Path(s.warehouse_dir) / "telehealth.duckdb"


def pseudonym_key(s: Settings) -> bytes:
    path = Path(s.secrets_dir) / "pseudonym.key"
    if not path.exists():
        keys.write_private(path, secrets.token_hex(32).encode())
    return bytes.fromhex(keys.read_secret(path))


def pseudonym(key: bytes, kind: str, value: str) -> str:
    """Stable keyed pseudonym: the same person is the same key in every rebuild; reversible by nobody."""
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:20]


def _catalogued(column: str, field: str) -> str:
    """SQL: ``column`` if the catalogue lists its value for ``field``, else 'other' (NULL stays NULL)."""
    return (f"CASE WHEN {column} IS NULL THEN NULL "
            f"WHEN {column} IN (SELECT value FROM catalogue WHERE field = '{field}') THEN {column} "
            f"ELSE '{catalogue.OTHER}' END")


# The Monday of the event's week on the sender's clock (its own UTC offset): a week of the patient's life.
_LOCAL_WEEK = ("CAST(date_trunc('week', make_timestamp(epoch_us(t.occurred_at) + t.utc_offset_min * 60000000::BIGINT))"
               " AS DATE)")
_UTC_DAY = "CAST({} AT TIME ZONE 'UTC' AS DATE)"
# An appointment's outcome is its latest event; at the same instant an outcome outranks the booking.
_OUTCOME_RANK = "CASE t.event WHEN 'appointment_scheduled' THEN 0 ELSE 1 END"

# Silences longer than 24 h between consecutive transmissions of a device, and the current one (measured
# to the rebuild): UTC days and whole hours. `{gaps}` is (device_id, gap_start, gap_end), gap_end NULL for the
# silence since the device's latest transmission. Elapsed time in microseconds: subtracting two TIMESTAMPTZ
# goes through the session's calendar (ICU), several µs a row: most of an update's time on the silences.
_DEVICE_GAPS = f"""
        SELECT dp.key AS device_key, {_UTC_DAY.format('g.gap_start')} AS gap_start_on,
               {_UTC_DAY.format('g.gap_end')} AS gap_end_on,
               CAST(round(date_diff('minute', g.gap_start, coalesce(g.gap_end, now())) / 60.0) AS INTEGER) AS hours,
               g.gap_end IS NULL AS ongoing
        FROM ({{gaps}}) g
        JOIN pseudo dp ON dp.kind = 'device' AND dp.id = g.device_id
        WHERE epoch_us(coalesce(g.gap_end, now())) - epoch_us(g.gap_start) > 86400000000"""  # 24 h
# A hand-typed value is no sign of a connected device.
_ALL_GAPS = """SELECT device_id, measured_at AS gap_start,
                     lead(measured_at) OVER (PARTITION BY device_id ORDER BY measured_at) AS gap_end
              FROM clinical.readings WHERE NOT manual"""
# Only the current silences: they grow with the clock, so an update recomputes them for every device.
_ONGOING_GAPS = """SELECT device_id, max(measured_at) AS gap_start, NULL::TIMESTAMPTZ AS gap_end
              FROM clinical.readings WHERE NOT manual GROUP BY device_id"""

# Each table: what reporting needs, nothing that identifies. `pseudo` maps (kind, id) -> key; `catalogue`
# holds (field, value, stored) from transforms/catalogue.py.
TABLES = {
    "people": f"""
        SELECT pp.key AS person_key, coalesce(pg.programmes, []::VARCHAR[]) AS programmes,
               CAST(date_trunc('month', min(e.valid_from) AT TIME ZONE 'UTC') AS DATE) AS enrolled_month,
               date_diff('hour', min(e.valid_from), min(r.first_reading)) AS hours_enrolment_to_first_reading,
               coalesce(bool_or(e.valid_to IS NULL) FILTER (WHERE e.device_id IS NOT NULL), false)
                   AS currently_enrolled
        FROM clinical.patients p
        JOIN pseudo pp ON pp.kind = 'patient' AND pp.id = p.patient_id
        LEFT JOIN (SELECT u.patient_id, list_sort(list_distinct(list(coalesce(c.stored, '{catalogue.OTHER}'))))
                              AS programmes
                   FROM (SELECT patient_id, unnest(conditions) AS condition FROM clinical.patients) u
                   LEFT JOIN catalogue c ON c.field = 'condition' AND c.value = u.condition
                   GROUP BY u.patient_id) pg ON pg.patient_id = p.patient_id
        LEFT JOIN clinical.enrollments e ON e.patient_id = p.patient_id
        -- one row per patient, not one per reading and enrolment: the minima are the same
        LEFT JOIN (SELECT patient_id, min(measured_at) FILTER (NOT manual) AS first_reading FROM clinical.readings
                   GROUP BY patient_id) r ON r.patient_id = p.patient_id
        GROUP BY pp.key, pg.programmes""",
    # The registry's model and serial are left out: a serial identifies, a model is free text.
    "devices": """
        SELECT dp.key AS device_key, pp.key AS person_key, d.kind AS device_kind
        FROM clinical.devices d
        JOIN pseudo dp ON dp.kind = 'device' AND dp.id = d.device_id
        LEFT JOIN clinical.enrollments e ON e.device_id = d.device_id AND e.valid_to IS NULL
        LEFT JOIN pseudo pp ON pp.kind = 'patient' AND pp.id = e.patient_id""",
    "education_events": f"""
        SELECT pp.key AS person_key, t.event, {_catalogued('t.module', 'module')} AS module, t.minutes,
               {_LOCAL_WEEK} AS week
        FROM clinical.telehealth_events t
        JOIN pseudo pp ON pp.kind = 'patient' AND pp.id = t.patient_id
        WHERE t.event LIKE 'education_%'""",
    # One row per appointment, its outcome decided here on exact instants (a no-show corrected to attended, a
    # booking cancelled and booked again the same day) so that no instant needs to be stored. The modality is
    # the latest one given (a video visit moved to phone is a phone visit).
    "appointments": f"""
        SELECT ak.key AS appointment_key, pp.key AS person_key, o.outcome,
               {_catalogued('o.modality', 'modality')} AS modality, o.week
        FROM (SELECT t.patient_id, t.appointment_id, replace(t.event, 'appointment_', '') AS outcome,
                     {_LOCAL_WEEK} AS week,
                     last_value(t.modality IGNORE NULLS) OVER (
                         PARTITION BY t.patient_id, t.appointment_id ORDER BY t.occurred_at, {_OUTCOME_RANK}, t.event_id
                         ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS modality
              FROM clinical.telehealth_events t
              WHERE t.event LIKE 'appointment_%'
              QUALIFY row_number() OVER (PARTITION BY t.patient_id, t.appointment_id
                                         ORDER BY t.occurred_at DESC, {_OUTCOME_RANK} DESC, t.event_id DESC) = 1) o
        JOIN pseudo pp ON pp.kind = 'patient' AND pp.id = o.patient_id
        JOIN pseudo ak ON ak.kind = 'appointment' AND ak.id = o.patient_id || '|' || o.appointment_id""",
    "survey_events": f"""
        SELECT pp.key AS person_key, {_catalogued('t.survey', 'survey')} AS survey, {_LOCAL_WEEK} AS week
        FROM clinical.telehealth_events t
        JOIN pseudo pp ON pp.kind = 'patient' AND pp.id = t.patient_id
        WHERE t.event = 'survey_completed'""",
    # A device's status per UTC day: each field as the day's latest report that carried it.
    "device_status": f"""
        SELECT dp.key AS device_key, pp.key AS person_key, d.kind AS device_kind,
               {_UTC_DAY.format('t.occurred_at')} AS day,
               arg_max(t.battery_pct, t.occurred_at) FILTER (WHERE t.battery_pct IS NOT NULL) AS battery_pct,
               arg_max(t.signal_dbm, t.occurred_at) FILTER (WHERE t.signal_dbm IS NOT NULL) AS signal_dbm,
               arg_max(coalesce(fw.stored, '{catalogue.OTHER}'), t.occurred_at)
                   FILTER (WHERE t.firmware IS NOT NULL) AS firmware
        FROM clinical.telehealth_events t
        JOIN clinical.devices d ON d.device_id = t.device_id
        -- a version released for the device's own kind, else 'other'
        LEFT JOIN catalogue fw ON fw.field = 'firmware:' || d.kind AND fw.value = t.firmware
        JOIN pseudo dp ON dp.kind = 'device' AND dp.id = t.device_id
        JOIN pseudo pp ON pp.kind = 'patient' AND pp.id = t.patient_id
        WHERE t.event = 'device_status'
        GROUP BY ALL""",
    # Transmissions per device and patient-local day (the registered home zone's, as billing counts them):
    # connectivity and adherence are built on this.
    "device_days": """
        SELECT dp.key AS device_key, pp.key AS person_key, d.kind AS device_kind, r.local_date AS day,
               count(*) AS readings, count(*) FILTER (r.manual) AS manual_readings
        FROM clinical.stg_readings r
        JOIN clinical.devices d ON d.device_id = r.device_id
        JOIN pseudo dp ON dp.kind = 'device' AND dp.id = r.device_id
        JOIN pseudo pp ON pp.kind = 'patient' AND pp.id = r.patient_id
        GROUP BY ALL""",
    # Silences longer than 24 h (_DEVICE_GAPS).
    "device_gaps": _DEVICE_GAPS.replace("{gaps}", _ALL_GAPS),
    # The pipeline's runs per UTC day. Run ids and instants stay in the ops records (`rpm reports pipeline`
    # reads those); the failure text is never copied (exception messages can quote key values).
    "pipeline_daily": f"""
        SELECT {_UTC_DAY.format('finished_at')} AS day, count(*) AS runs,
               count(*) FILTER (WHERE state = 'failed') AS failed_runs,
               CAST(coalesce(sum(received), 0) AS BIGINT) AS received,
               CAST(coalesce(sum(loaded), 0) AS BIGINT) AS loaded,
               CAST(coalesce(sum(quarantined), 0) AS BIGINT) AS quarantined,
               CAST(coalesce(sum(duplicates), 0) AS BIGINT) AS duplicates
        FROM clinical.pipeline_runs
        GROUP BY ALL""",
    # Reasons are rule names; anything else (never expected) is not copied as text.
    "quarantine_daily": f"""
        SELECT {_UTC_DAY.format('quarantined_at')} AS day,
               CASE WHEN regexp_full_match(reason, '[a-z0-9_]{{1,64}}') THEN reason ELSE '{catalogue.OTHER}' END
                   AS reason,
               count(*) AS items
        FROM (SELECT quarantined_at, unnest(reasons) AS reason FROM clinical.quarantine) GROUP BY ALL""",
}


# Every (kind, id) a pseudonym is made for: patients, devices, appointments (an appointment id is the app's
# own, so it is scoped by patient).
_IDS = """SELECT 'patient', patient_id FROM clinical.patients
          UNION SELECT 'device', device_id FROM clinical.devices
          UNION SELECT 'appointment', patient_id || '|' || appointment_id FROM clinical.telehealth_events
                WHERE appointment_id IS NOT NULL"""


def _pseudonyms(con: duckdb.DuckDBPyConnection, key: bytes, ids: str = _IDS) -> pd.DataFrame:
    """The pseudonym of every (kind, id) that ``ids`` (SQL) selects."""
    rows = con.execute(ids).fetchall()
    return pd.DataFrame({"kind": [k for k, _ in rows], "id": [i for _, i in rows],
                         "key": [pseudonym(key, k, i) for k, i in rows]}, dtype=str)  # text even when empty


def _catalogue_rows(s: Settings) -> list[tuple[str, str, str]]:
    return list(catalogue.rows(s.telehealth_catalogue_extra))


@contextmanager
def _building(s: Settings) -> Iterator[None]:
    """One rebuild at a time (rpm_pipeline, rpm_daily and a key rotation may overlap): they share the
    temporary file, and a rotation must not have a rebuild under the old key swapped in after its own."""
    Path(s.warehouse_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(Path(s.warehouse_dir) / ".telehealth.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# --- what the store was last built from ----------------------------------------------------------------------
# An update needs to know what the store already holds. Beside the store (not in it: the store holds no instant),
# a small state file names the store file it describes, a digest of everything besides readings and events that
# the store depends on (this code and its SQL, the catalogue, the registry, both keys), and per stream the latest
# load instant absorbed with the count of rows up to it. Any mismatch means a full rebuild: a registry change, a
# new key, a store replaced or restored, rows deleted or loaded out of order (the count up to the instant moved).
# The file is written after the store is swapped in: killed in between, it still names the previous store
# file, and the next run rebuilds the store whole.

_STREAMS = {"readings": "clinical.readings", "events": "clinical.telehealth_events"}


def _state_file(s: Settings) -> Path:
    return Path(s.warehouse_dir) / ".telehealth-state.json"


def _file_identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _digest(con: duckdb.DuckDBPyConnection, s: Settings, key: str) -> str:
    h = hashlib.sha256()
    for path in [Path(__file__), *sorted(SQL_DIR.glob("*.sql"))]:
        h.update(path.read_bytes())
    h.update(repr(_catalogue_rows(s)).encode())
    h.update(hashlib.sha256(pseudonym_key(s)).digest() + hashlib.sha256(key.encode()).digest())
    # The warehouse's own views and macros the tables read (stg_readings, with_local_time: the local day), which
    # a migration may redefine, and the engine that evaluates them (its time zone data among it).
    h.update(duckdb.__version__.encode())
    # (Only these: DuckDB's stored text of some other views, EXCLUDE lists, varies from one file to the next.)
    h.update(repr(con.execute("""
        SELECT view_name, sql FROM duckdb_views() WHERE database_name = 'clinical' AND view_name = 'stg_readings'
        UNION ALL SELECT function_name, macro_definition || parameters::VARCHAR FROM duckdb_functions()
        WHERE database_name = 'clinical' AND function_name = 'with_local_time' ORDER BY ALL""").fetchall()).encode())
    # The registry: a SHA-256 of each row (as JSON: no two rows read alike), in order. Not an XOR of 64-bit row
    # hashes: that is linear, and edits crafted to cancel out (free-text names) are found in a moment.
    for table in ("patients", "devices", "enrollments"):
        h.update(repr(con.execute(f"""SELECT count(*), sha256(string_agg(r, '' ORDER BY r))
                                      FROM (SELECT sha256(to_json(t)::VARCHAR) AS r FROM clinical.{table} t)""")
                      .fetchone()).encode())
    return h.hexdigest()


def _watermarks(con: duckdb.DuckDBPyConnection, since: dict | None = None) -> dict[str, dict]:
    """Per stream: the latest load instant (epoch µs) and the row count up to it; with ``since`` (the state of
    the last build), also the count now up to that build's instant, which must not have moved."""
    out = {}
    for stream, table in _STREAMS.items():
        before = (since or {}).get(stream, {}).get("through")
        if before is None:  # a full build, or a stream the last build found empty
            row = con.execute(f"SELECT epoch_us(max(loaded_at)), count(*) FROM {table}").fetchone()
            assert row is not None
            out[stream] = {"through": row[0], "count": row[1], "count_then": 0}
            continue
        # Only the rows loaded since are read (`loaded_at > $before`: the zone maps skip the rest of a table
        # loaded in time order); the count up to the instant is the table's count (no column read) less them.
        # loaded_at is NOT NULL, so this is the count of rows at or before it.
        row = con.execute(f"""SELECT (SELECT count(*) FROM {table}), epoch_us(max(loaded_at)), count(*)
                              FROM {table} WHERE loaded_at > make_timestamptz($before::BIGINT)""",
                          {"before": before}).fetchone()
        assert row is not None
        total, latest, new = row
        out[stream] = {"through": before if latest is None else latest, "count": total, "count_then": total - new}
    return out


# The state is signed (HMAC under a key derived from the pseudonym key): one edited to claim rows the store never
# absorbed would otherwise leave it behind a rebuild with nothing to show it. Anything unsigned, mangled or not
# a small regular file (a FIFO would hang the run) is no state: the store is rebuilt.
_STATE_MAX_BYTES = 64 << 10


def _state_mac(s: Settings, state: dict) -> str:
    key = hmac.new(pseudonym_key(s), b"rpm telehealth state", hashlib.sha256).digest()
    return hmac.new(key, json.dumps(state, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def _valid_state(state: object) -> bool:
    def count(v: object, nullable: bool = False) -> bool:
        return (v is None and nullable) or (type(v) is int and 0 <= v < 1 << 62)

    if not isinstance(state, dict) or not isinstance(state.get("digest"), str):
        return False
    store, streams = state.get("store"), state.get("streams")
    return (isinstance(store, list) and len(store) == 3 and all(count(v) for v in store)
            and isinstance(streams, dict) and set(streams) == set(_STREAMS)
            and all(isinstance(m, dict) and count(m.get("through"), nullable=True) and count(m.get("count"))
                    for m in streams.values()))


def _read_state(s: Settings) -> dict | None:
    try:
        fd = os.open(_state_file(s), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        state = json.loads(os.read(fd, _STATE_MAX_BYTES))  # a longer one is cut, so invalid
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(state, dict):
        return None
    mac = state.pop("mac", None)
    if not isinstance(mac, str) or not hmac.compare_digest(mac, _state_mac(s, state)) or not _valid_state(state):
        return None
    return state


def _write_state(s: Settings, digest: str, marks: dict[str, dict], built_by: str) -> None:
    state: dict = {"store": _file_identity(telehealth_db(s)), "digest": digest, "built_by": built_by,
                   "streams": {k: {"through": v["through"], "count": v["count"]} for k, v in marks.items()}}
    state["mac"] = _state_mac(s, state)
    tmp = _state_file(s).with_suffix(".tmp")
    tmp.unlink(missing_ok=True)  # created afresh, never written through whatever was left at that name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(state))
    os.replace(tmp, _state_file(s))


# --- building -----------------------------------------------------------------------------------------------

def _as_table(con: duckdb.DuckDBPyConnection, name: str, frame: pd.DataFrame) -> None:
    """``frame`` as a temporary table: a registered DataFrame is converted again by every query that reads it,
    and the pseudonyms are read by nearly every statement of a build."""
    con.register(f"{name}_frame", frame)
    con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT * FROM {name}_frame")
    con.unregister(f"{name}_frame")


def _register_catalogue(con: duckdb.DuckDBPyConnection, s: Settings) -> None:
    _as_table(con, "catalogue", pd.DataFrame(_catalogue_rows(s), columns=["field", "value", "stored"]))


def _finish(con: duckdb.DuckDBPyConnection, counts: dict[str, int]) -> None:
    for name in TABLES:
        counts[name] = con.execute(f"SELECT count(*) FROM th.{name}").fetchone()[0]  # type: ignore[index]
    con.execute("USE clinical")
    con.execute("DETACH th")


def _swap(s: Settings, tmp: Path) -> None:
    os.chmod(tmp, 0o600)
    os.replace(tmp, telehealth_db(s))


def _build(s: Settings, key: str) -> dict[str, int]:
    """Write the whole store under ``key`` next to the current one and swap it in; row counts per table."""
    target = telehealth_db(s)
    tmp = target.with_name(f".{target.name}.building")
    tmp.unlink(missing_ok=True)
    counts: dict[str, int] = {}
    with serving(s, private=True) as con:
        marks = _watermarks(con)
        digest = _digest(con, s, key)
        _as_table(con, "pseudo", _pseudonyms(con, pseudonym_key(s)))
        _register_catalogue(con, s)
        con.execute(f"ATTACH '{tmp}' AS th (ENCRYPTION_KEY '{key}')")
        for name, sql in TABLES.items():
            con.execute(f"CREATE TABLE th.{name} AS {sql}")
        con.execute("CREATE TABLE th.store_info AS SELECT ?::DATE AS built_on, ? AS hipaa_route",
                    [datetime.now(UTC).date(), HIPAA_ROUTE])
        con.execute("USE th")
        for path in sorted(SQL_DIR.glob("*.sql")):
            con.execute(path.read_text())
        _finish(con, counts)
    _swap(s, tmp)
    _write_state(s, digest, marks, "rebuild")
    return counts


# An update narrows the tables' sources to what the new rows touched: the tables keyed by person are rebuilt
# for the patients with new readings or events, those keyed by device for the devices that sent them (a
# device's silences span its whole history), the small daily ops tables whole. The registry-only `devices`
# table cannot change without a registry change, which rebuilds the whole store.
# Each table is rebuilt for the patients (or devices) with new rows in the stream it reads: a batch of readings
# alone leaves the rows built from events as they are, and the events are then not read at all.
_PERSON_TABLES = {"people": "readings", "education_events": "events", "appointments": "events",
                  "survey_events": "events", "device_days": "readings"}
_DEVICE_TABLES = {"device_status": "events", "device_gaps": "readings"}
_WHOLE_TABLES = ("pipeline_daily", "quarantine_daily")
_PERSON_SOURCES = {"clinical.stg_readings": "th_stg_readings", "clinical.readings": "th_person_readings",
                   "clinical.telehealth_events": "th_person_events", "clinical.patients": "th_patients",
                   "clinical.enrollments": "th_enrollments"}
_DEVICE_SOURCES = {"clinical.readings": "th_device_readings", "clinical.telehealth_events": "th_device_events"}


# The columns TABLES read (a column missing here fails the update loudly, never silently).
_READING_COLUMNS = "patient_id, device_id, measured_at, utc_offset_min, manual"
_EVENT_COLUMNS = ("event_id, patient_id, device_id, event, occurred_at, utc_offset_min, module, minutes, "
                  "appointment_id, modality, survey, battery_pct, signal_dbm, firmware")


def _scoped(sql: str, sources: dict[str, str]) -> str:
    for relation, scoped in sources.items():
        sql = sql.replace(relation, scoped)
    return sql


def _update(s: Settings, key: str, state: dict) -> dict[str, int] | None:
    """Apply what was loaded since the last build to a copy of the store and swap it in; None when only a
    full rebuild can be trusted (see the state file above)."""
    target = telehealth_db(s)
    if not target.exists() or state.get("store") != _file_identity(target):
        return None
    tmp = target.with_name(f".{target.name}.building")
    tmp.unlink(missing_ok=True)
    counts: dict[str, int] = {}
    with serving(s, private=True) as con:
        marks = _watermarks(con, state.get("streams"))
        if any(m["count_then"] != state.get("streams", {}).get(k, {}).get("count") for k, m in marks.items()):
            return None  # rows up to the last build's instant were deleted, rewritten or loaded late
        digest = _digest(con, s, key)
        if digest != state.get("digest"):
            return None
        since = {k: state["streams"][k]["through"] for k in _STREAMS}
        # Per stream, the patients and the devices with rows loaded since (found through the loaded_at zone maps),
        # then their history, read once: the rows of those patients and of those devices (a device's history
        # may hold another patient's readings, from before it was re-issued). A stream with nothing new is not
        # read.
        for stream, (table, columns) in {"readings": ("readings", _READING_COLUMNS),
                                         "events": ("telehealth_events", _EVENT_COLUMNS)}.items():
            con.execute(f"""CREATE TEMP TABLE th_new_{stream} AS SELECT DISTINCT patient_id, device_id
                            FROM clinical.{table} WHERE loaded_at
                                > coalesce(make_timestamptz($since::BIGINT), '-infinity'::TIMESTAMPTZ)""",
                        {"since": since[stream]})
            for column, dirty in (("patient_id", "patients"), ("device_id", "devices")):
                con.execute(f"CREATE TEMP TABLE th_dirty_{dirty}_{stream} AS "
                            f"SELECT DISTINCT {column} FROM th_new_{stream}")
            none = "" if one_row(con.execute(f"SELECT count(*) FROM th_new_{stream}"))[0] else "AND false"
            con.execute(f"""CREATE TEMP TABLE th_{stream} AS SELECT {columns} FROM clinical.{table}
                            WHERE (patient_id IN (SELECT patient_id FROM th_dirty_patients_{stream})
                                   OR device_id IN (SELECT device_id FROM th_dirty_devices_{stream})) {none}""")
        for view, source, column, stream in (("th_person_readings", "th_readings", "patient_id", "readings"),
                                             ("th_person_events", "th_events", "patient_id", "events"),
                                             ("th_patients", "clinical.patients", "patient_id", "readings"),
                                             ("th_enrollments", "clinical.enrollments", "patient_id", "readings"),
                                             ("th_device_readings", "th_readings", "device_id", "readings"),
                                             ("th_device_events", "th_events", "device_id", "events")):
            dirty = f"th_dirty_{'patients' if column == 'patient_id' else 'devices'}_{stream}"
            con.execute(f"CREATE TEMP VIEW {view} AS SELECT * FROM {source} "
                        f"WHERE {column} IN (SELECT {column} FROM {dirty})")
        con.execute("CREATE TEMP VIEW th_stg_readings AS SELECT * FROM with_local_time('th_person_readings')")
        # Every other device's current silence, which only the clock changed: its latest transmission, kept when
        # it is nearly 24 h old (the store's rows are judged below against the clock of their own transaction,
        # later than this one's), so that only those devices need a pseudonym.
        con.execute(f"""CREATE TEMP TABLE th_silent AS SELECT * FROM ({_ONGOING_GAPS})
                        WHERE device_id NOT IN (SELECT device_id FROM th_dirty_devices_readings)
                          AND gap_start < now() - INTERVAL 23 HOUR""")
        _as_table(con, "pseudo", _pseudonyms(con, pseudonym_key(s), """
            SELECT 'patient', patient_id FROM th_dirty_patients_readings
            UNION SELECT 'patient', patient_id FROM th_dirty_patients_events
            UNION SELECT 'patient', patient_id FROM th_readings UNION SELECT 'patient', patient_id FROM th_events
            UNION SELECT 'device', device_id FROM th_readings UNION SELECT 'device', device_id FROM th_events
            UNION SELECT 'device', device_id FROM th_dirty_devices_events
            UNION SELECT 'device', device_id FROM th_silent
            UNION SELECT 'appointment', patient_id || '|' || appointment_id FROM th_person_events
                  WHERE appointment_id IS NOT NULL"""))
        _register_catalogue(con, s)
        shutil.copyfile(target, tmp)  # readers keep the current file; the copy is small next to the warehouse
        con.execute(f"ATTACH '{tmp}' AS th (ENCRYPTION_KEY '{key}')")
        con.execute("BEGIN")
        for name, stream in _PERSON_TABLES.items():
            con.execute(f"""DELETE FROM th.{name} WHERE person_key IN (SELECT key FROM pseudo WHERE kind = 'patient'
                            AND id IN (SELECT patient_id FROM th_dirty_patients_{stream}))""")
            con.execute(f"INSERT INTO th.{name} BY NAME {_scoped(TABLES[name], _PERSON_SOURCES)}")
        for name, stream in _DEVICE_TABLES.items():
            ongoing = " OR ongoing" if name == "device_gaps" else ""
            con.execute(f"""DELETE FROM th.{name} WHERE device_key IN (SELECT key FROM pseudo WHERE kind = 'device'
                            AND id IN (SELECT device_id FROM th_dirty_devices_{stream})){ongoing}""")
            con.execute(f"INSERT INTO th.{name} BY NAME {_scoped(TABLES[name], _DEVICE_SOURCES)}")
        con.execute(f"INSERT INTO th.device_gaps BY NAME {_DEVICE_GAPS.replace('{gaps}', 'SELECT * FROM th_silent')}")
        for name in _WHOLE_TABLES:
            con.execute(f"DELETE FROM th.{name}")
            con.execute(f"INSERT INTO th.{name} BY NAME {TABLES[name]}")
        con.execute("UPDATE th.store_info SET built_on = ?", [datetime.now(UTC).date()])
        con.execute("COMMIT")
        _finish(con, counts)
    _swap(s, tmp)
    _write_state(s, digest, marks, "update")
    return counts


def publish_telehealth(s: Settings, full: bool = False) -> dict[str, int]:
    """Bring the telehealth store up to the current serving snapshot: an update with what was loaded since its
    last build, or a full rebuild (``full``, or when an update cannot be trusted); row counts per table."""
    if not s.clinical_db.exists():
        return {}  # nothing loaded yet (e.g. rpm_daily before the first rpm_pipeline run)
    with _building(s):
        staged = keys.telehealth_key_file_next(s)
        if staged.exists():  # a rotation died before promoting its key: finish it
            return _rebuild_under_staged_key(s)
        key = keys.telehealth_key(s)
        state = None if full else _read_state(s)
        counts = _update(s, key, state) if state is not None else None
        return counts if counts is not None else _build(s, key)


def rotate_key(s: Settings) -> dict[str, int]:
    """`rpm keys rotate`: rebuild the store under a new key, then promote the key. The new key is on disk
    (staged) before anything is written under it, and a rotation that died is finished by the next rebuild."""
    with _building(s):
        staged = keys.telehealth_key_file_next(s)
        if not staged.exists():
            keys.write_private(staged, secrets.token_hex(32).encode())
        if not s.clinical_db.exists():
            os.replace(staged, keys.telehealth_key_file(s))
            return {"tables": 0, "rows": 0}
        counts = _rebuild_under_staged_key(s)
    return {"tables": len(counts), "rows": sum(counts.values())}


def _rebuild_under_staged_key(s: Settings) -> dict[str, int]:
    staged = keys.telehealth_key_file_next(s)
    counts = _build(s, keys.read_secret(staged))
    os.replace(staged, keys.telehealth_key_file(s))
    return counts


def _attach(con: duckdb.DuckDBPyConnection, path: Path, s: Settings) -> None:
    """Attach the store with the current key, or the staged one while a rotation swaps it in (the current
    file is read again last: the rotation may have promoted its key meanwhile)."""
    current, staged = keys.telehealth_key_file(s), keys.telehealth_key_file_next(s)
    for key_file in (current, staged, current):
        if not key_file.exists():
            continue
        try:
            con.execute(f"ATTACH '{path}' AS telehealth (ENCRYPTION_KEY '{keys.read_secret(key_file)}', READ_ONLY)")
            return
        except (duckdb.InvalidInputException, duckdb.CatalogException):
            continue  # wrong key, or a store written before it was encrypted
    raise TelehealthLocked(f"the telehealth store {path} does not open with {current}: it was built under "
                           "another key (or none); the next pipeline run rebuilds it (rpm pipeline run)")


def open_telehealth(s: Settings) -> duckdb.DuckDBPyConnection:
    """Read-only connection to the telehealth store (never blocks the pipeline: the file is swapped whole)."""
    path = telehealth_db(s)
    if not path.exists():
        raise FileNotFoundError(f"no telehealth store at {path}: run `rpm pipeline run` first")
    # A fresh in-memory instance per reader: duckdb.connect(path) would reuse a cached instance of the replaced
    # file while any older connection to it is still open in this process. Temporary files stay encrypted.
    con = encrypted_instance(s)
    try:
        _attach(con, path, s)
        con.execute("USE telehealth")
    except BaseException:
        con.close()
        raise
    return con
