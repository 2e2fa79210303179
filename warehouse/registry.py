"""Device and enrollment registry: which patient a device's readings belong to, and since when."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import duckdb

from core.ids import check_id
from warehouse.alerts import mark_dirty
from warehouse.patient_days import refresh_zones

FUTURE_START_TOLERANCE = timedelta(minutes=5)  # clock differences between the admin's machine and ours
# The programmes this installation monitors: their devices, rules and education follow the condition
# (heart_failure turns on the weight-gain rules, warehouse/sql/030_alerts.sql; rpmctl/tools/simulator.py).
CONDITIONS = ("hypertension", "diabetes", "copd", "heart_failure")
NAME_MAX = 200  # characters of a name (the service's API allows as many)
MRN_MAX = 64
EARLIEST_BIRTH = date(1900, 1, 1)
# The date is already tomorrow somewhere while it is today here: UTC+14 (Kiribati) is the earliest zone.
EARLIEST_ZONE = timedelta(hours=14)
IMPORT_MAX_BYTES = 50 * 2**20  # a practice's patient list is kilobytes to a few MB


@dataclass(frozen=True)
class Enrollment:
    device_id: str
    patient_id: str
    valid_from: datetime
    changed: bool  # False when the device was already enrolled to this patient


def enroll(con: duckdb.DuckDBPyConnection, device_id: str, patient_id: str, *, kind: str | None = None,
           valid_from: datetime | None = None) -> Enrollment:
    """Enrol ``device_id`` to ``patient_id`` from ``valid_from`` (default now).

    Re-enrolling to the same patient changes nothing, except that an earlier ``valid_from`` moves the current
    enrollment's start back (readings a device buffered before it was registered, then replayed from
    quarantine), as long as no earlier enrollment of the device reaches past it. Enrolling to another patient
    closes the current enrollment at ``valid_from``: readings measured before stay with the previous patient.
    A start more than a few minutes in the future is refused (it would burn the device id: nothing may be
    enrolled before an enrollment's start afterwards).
    """
    now = datetime.now(UTC)
    start = (valid_from or now).astimezone(UTC)
    if start > now + FUTURE_START_TOLERANCE:
        raise ValueError(f"an enrollment cannot start in the future ({start.isoformat()})")
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("INSERT INTO patients (patient_id) VALUES (?) ON CONFLICT DO NOTHING", [patient_id])
        con.execute("INSERT INTO devices (device_id, kind) VALUES (?, ?) ON CONFLICT DO UPDATE SET "
                    "kind = coalesce(excluded.kind, devices.kind)", [device_id, kind])
        current = con.execute(
            "SELECT patient_id, valid_from FROM enrollments WHERE device_id = ? AND valid_to IS NULL",
            [device_id]).fetchone()
        if current and current[0] == patient_id:
            if valid_from is None or start >= current[1]:
                con.execute("COMMIT")
                return Enrollment(device_id, patient_id, current[1], changed=False)
            before = con.execute("SELECT max(valid_to) FROM enrollments WHERE device_id = ? AND valid_to IS NOT NULL",
                                 [device_id]).fetchone()
            if before and before[0] is not None and start < before[0]:
                raise ValueError(f"device {device_id} was enrolled to another patient until "
                                 f"{before[0].isoformat()}: its enrollment to {patient_id} cannot start before "
                                 f"that ({start.isoformat()})")
            con.execute("UPDATE enrollments SET valid_from = ? WHERE device_id = ? AND valid_to IS NULL",
                        [start, device_id])
            mark_dirty(con, patient_id)  # its alerts now see readings from the earlier start
            con.execute("COMMIT")
            return Enrollment(device_id, patient_id, start, changed=True)
        latest = con.execute("SELECT max(greatest(valid_from, coalesce(valid_to, valid_from))) FROM enrollments "
                             "WHERE device_id = ?", [device_id]).fetchone()
        if latest and latest[0] is not None and start < latest[0]:
            # Back-dating into existing history would give one instant two patients.
            raise ValueError(f"device {device_id} has enrollment history up to {latest[0].isoformat()}: "
                             f"a new enrollment cannot start before it ({start.isoformat()})")
        if current:
            con.execute("UPDATE enrollments SET valid_to = ? WHERE device_id = ? AND valid_to IS NULL",
                        [start, device_id])
        con.execute("INSERT INTO enrollments VALUES (?, ?, ?, NULL)", [device_id, patient_id, start])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return Enrollment(device_id, patient_id, start, changed=True)


def list_devices(con: duckdb.DuckDBPyConnection) -> list[dict]:
    rows = con.execute("""
        SELECT d.device_id, d.kind, e.patient_id, e.valid_from
        FROM devices d LEFT JOIN enrollments e ON e.device_id = d.device_id AND e.valid_to IS NULL
        ORDER BY d.device_id""").fetchall()
    return [dict(device_id=r[0], kind=r[1], patient_id=r[2], enrolled_since=r[3]) for r in rows]


def upsert_patient(con: duckdb.DuckDBPyConnection, patient_id: str, *, mrn: str | None = None,
                   given_name: str | None = None, family_name: str | None = None, birth_date: date | None = None,
                   time_zone: str | None = None, conditions: list[str] | None = None) -> None:
    """Create or update a patient; fields given as None keep their current value. ValueError names a value
    no one can mean: a birth date in the future or before 1900, a name of control characters or over
    NAME_MAX characters, a condition outside the programmes (CONDITIONS)."""
    check_id("patient", patient_id)
    for name, value, longest in (("mrn", mrn, MRN_MAX), ("given_name", given_name, NAME_MAX),
                                 ("family_name", family_name, NAME_MAX)):
        _check_text(name, value, longest)
    if birth_date is not None:
        _check_birth_date(birth_date)
    for condition in conditions or []:
        if condition not in CONDITIONS:
            raise ValueError(f"unknown condition {condition!r}: one of {', '.join(CONDITIONS)}")
    if time_zone is not None:
        ZoneInfo(time_zone)  # raises for an unknown IANA zone: local days must be computable
    con.execute("""
        INSERT INTO patients (patient_id, mrn, given_name, family_name, birth_date, time_zone, conditions)
        VALUES (?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (patient_id) DO UPDATE SET
            mrn = coalesce(excluded.mrn, patients.mrn),
            given_name = coalesce(excluded.given_name, patients.given_name),
            family_name = coalesce(excluded.family_name, patients.family_name),
            birth_date = coalesce(excluded.birth_date, patients.birth_date),
            time_zone = coalesce(excluded.time_zone, patients.time_zone),
            conditions = coalesce(excluded.conditions, patients.conditions)""",
                [patient_id, mrn, given_name, family_name, birth_date, time_zone, conditions])
    if time_zone is not None:
        refresh_zones(con)  # a new home zone moves the patient's local days: recount them now
    mark_dirty(con, patient_id)  # conditions decide which rules apply


def add_clinician(con: duckdb.DuckDBPyConnection, clinician_id: str, name: str | None = None,
                  role: str | None = None) -> None:
    check_id("clinician", clinician_id)
    _check_text("name", name, NAME_MAX)
    _check_text("role", role, NAME_MAX)
    con.execute("""INSERT INTO clinicians (clinician_id, name, role) VALUES (?, ?, ?)
                   ON CONFLICT (clinician_id) DO UPDATE SET name = coalesce(excluded.name, clinicians.name),
                   role = coalesce(excluded.role, clinicians.role)""", [clinician_id, name, role])


def assign(con: duckdb.DuckDBPyConnection, clinician_id: str, patient_id: str) -> bool:
    """Put a clinician on a patient's care team from now on; False if already on it."""
    _require_known(con, clinician_id=clinician_id, patient_id=patient_id)
    if con.execute("SELECT 1 FROM care_team WHERE clinician_id = ? AND patient_id = ? AND until IS NULL",
                   [clinician_id, patient_id]).fetchone():
        return False
    con.execute("INSERT INTO care_team VALUES (?, ?, ?, NULL)", [clinician_id, patient_id, datetime.now(UTC)])
    return True


def unassign(con: duckdb.DuckDBPyConnection, clinician_id: str, patient_id: str) -> bool:
    """Take a clinician off a patient's care team from now on; False if they were not on it."""
    _require_known(con, clinician_id=clinician_id, patient_id=patient_id)
    row = con.execute("""UPDATE care_team SET until = ? WHERE clinician_id = ? AND patient_id = ?
                         AND until IS NULL RETURNING 1""", [datetime.now(UTC), clinician_id, patient_id]).fetchone()
    return row is not None


def care_team_patients(con: duckdb.DuckDBPyConnection, clinician_id: str) -> list[str] | None:
    """Patients currently on the clinician's care team; None if the clinician does not exist.

    One statement, the clinician's row marked beside the team's: every read of PHI runs this first, and a
    round trip costs more than these small lookups (two statements took 1.5 ms p50, this one 1.0; a join
    with an aggregate 3.5)."""
    found = con.execute("""
        SELECT false AS clinician, patient_id FROM care_team
        WHERE clinician_id = $c AND since <= now() AND (until IS NULL OR until > now())
        UNION ALL SELECT true, NULL FROM clinicians WHERE clinician_id = $c""", {"c": clinician_id}).fetchall()
    if not any(clinician for clinician, _ in found):
        return None
    return sorted({patient_id for clinician, patient_id in found if not clinician})


# The range a per-patient override may take, by the parameter's unit: wide enough for any individualised
# target a clinician sets (e.g. a looser BP target in the frail elderly, a tighter glucose floor in
# pregnancy), narrow enough that a typo or a hostile change (a severe-BP threshold of 400) cannot silence a
# rule. Defaults and sources are in warehouse/sql/030_alerts.sql.
THRESHOLD_BOUNDS: dict[str, tuple[float, float]] = {
    "systolic": (90.0, 220.0),    # mm[Hg]
    "diastolic": (50.0, 140.0),   # mm[Hg]
    "mg_dl": (40.0, 400.0),       # glucose, mg/dL
    "percent": (80.0, 98.0),      # SpO2, %
    "cel": (37.0, 40.0),          # temperature, Cel
    "per_min": (30.0, 180.0),     # heart rate, /min
    "kg": (0.2, 5.0),             # heart-failure weight gain, kg
    "score": (1.0, 20.0),         # NEWS2-style aggregate
    "hours": (6.0, 336.0),        # no data for … (up to two weeks)
}


# Levels of one finding (and the two ends of one vital's range), each threshold strictly below the next for
# every patient: otherwise the "severe" level fires before the milder one (or the milder one never does),
# "very high" glucose sits below "low" and both fire on every reading, the 24 h no-data rule waits longer
# than the 72 h one — severities stop meaning anything, and alarm fatigue silences the rules in practice.
THRESHOLD_ORDER: tuple[tuple[str, ...], ...] = (
    ("bp_stage2.systolic", "bp_severe.systolic"),
    ("bp_stage2.diastolic", "bp_severe.diastolic"),
    ("glucose_level2_low.mg_dl", "glucose_level1_low.mg_dl", "glucose_level2_high.mg_dl"),
    ("spo2_urgent.percent", "spo2_low.percent"),
    ("hr_low.per_min", "hr_high.per_min"),
    ("news2_medium.score", "news2_high.score"),
    ("no_data_24h.hours", "no_data_72h.hours"),
)


def set_threshold(con: duckdb.DuckDBPyConnection, patient_id: str, rule: str, threshold: float,
                  set_by: str | None) -> None:
    """Override one alert threshold for one existing patient (KeyError names an unknown patient or rule,
    ValueError a threshold outside its clinically sensible range, THRESHOLD_BOUNDS, or one that would put
    the patient's levels of a finding out of order, THRESHOLD_ORDER)."""
    _require_known(con, patient_id=patient_id)
    _check_text("set_by", set_by)
    known = {f"{r}.{p}" for r, p in con.execute("SELECT rule, param FROM alert_rule_params").fetchall()}
    if rule not in known:
        raise KeyError(f"unknown threshold {rule!r}; one of: {', '.join(sorted(known))}")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise ValueError(f"{rule}: a threshold is a number, not {threshold!r}")
    low, high = THRESHOLD_BOUNDS[rule.rsplit(".", 1)[1]]
    if not low <= threshold <= high:
        raise ValueError(f"{rule} = {threshold:g} is outside the sensible range {low:g}..{high:g}")
    _check_order(con, patient_id, rule, float(threshold))
    con.execute("""INSERT INTO alert_thresholds (patient_id, rule, threshold, set_by) VALUES (?, ?, ?, ?)
                   ON CONFLICT (patient_id, rule) DO UPDATE SET threshold = excluded.threshold,
                   set_by = excluded.set_by, set_at = now()""", [patient_id, rule, threshold, set_by])
    mark_dirty(con, patient_id)


def _check_order(con: duckdb.DuckDBPyConnection, patient_id: str, rule: str, threshold: float) -> None:
    """ValueError unless ``rule`` at ``threshold`` keeps the patient's levels of its finding in order."""
    for family in THRESHOLD_ORDER:
        if rule not in family:
            continue
        levels = dict(con.execute("""SELECT rule || '.' || param, value FROM patient_alert_params
                                     WHERE patient_id = ? AND list_contains(?, rule || '.' || param)""",
                                  [patient_id, list(family)]).fetchall())
        levels[rule] = threshold
        for lower, upper in zip(family, family[1:], strict=False):
            if not levels[lower] < levels[upper]:
                other = upper if rule == lower else lower
                raise ValueError(f"{rule} = {threshold:g} would put {patient_id}'s levels out of order: {lower} "
                                 f"({levels[lower]:g}) must stay below {upper} ({levels[upper]:g}); change "
                                 f"{other} first")


CSV_COLUMNS = ("patient_id", "mrn", "given_name", "family_name", "birth_date", "time_zone", "conditions")


def import_patients_csv(s, path: str) -> dict:
    """Import a practice's patient list; all rows or none (a bad row names its line)."""
    import csv

    from warehouse.db import clinical, transaction
    from warehouse.serving import publish_snapshot

    try:
        reader = csv.DictReader(_patient_list_lines(path))
        missing = {"patient_id"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}; "
                             f"expected {', '.join(CSV_COLUMNS)}")
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: not a UTF-8 CSV file ({exc})") from None
    ids = []
    with clinical(s) as con:
        with transaction(con):
            for line, row in enumerate(rows, start=2):
                try:
                    patient_id = check_id("patient", (row.get("patient_id") or "").strip())
                    ids.append(patient_id)
                    upsert_patient(
                        con, patient_id, mrn=row.get("mrn") or None,
                        given_name=row.get("given_name") or None, family_name=row.get("family_name") or None,
                        birth_date=date.fromisoformat(row["birth_date"]) if row.get("birth_date") else None,
                        time_zone=row.get("time_zone") or None,
                        conditions=[c.strip() for c in row["conditions"].split(";") if c.strip()]
                        if row.get("conditions") else None)
                except (ValueError, KeyError, duckdb.Error) as exc:
                    raise ValueError(f"{path} line {line}: {exc}") from exc
        publish_snapshot(s, con)
    return {"patients": len(rows), "patient_ids": sorted(set(ids))}


def _patient_list_lines(path: str) -> Iterator[str]:
    """The lines of a patient list, read one at a time, refusing what cannot be one before reading it: not a
    regular file (/dev/zero, a pipe, a folder) or larger than IMPORT_MAX_BYTES — a file that grows while read
    is cut off at that size too (one huge line would otherwise be read whole)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO would block the open itself
    too_large = ValueError(f"{path}: larger than a patient list can be (at most {IMPORT_MAX_BYTES // 2**20} MB)")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file (a patient list is a CSV file)")
        if st.st_size > IMPORT_MAX_BYTES:
            raise too_large
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        left = IMPORT_MAX_BYTES
        encoding = "utf-8-sig"  # a spreadsheet's byte-order mark on the first line
        while line := f.readline(left + 1):
            left -= len(line)
            if left < 0:
                raise too_large
            yield line.decode(encoding)
            encoding = "utf-8"


def _check_text(field: str, value: str | None, longest: int | None = None) -> None:
    """Free text is shown on terminals: a control character in it could forge a line of output."""
    if value is not None and not (isinstance(value, str) and value.isprintable()):
        raise ValueError(f"{field} {value!r} contains control characters")
    if value is not None and longest is not None and len(value) > longest:
        raise ValueError(f"{field} is {len(value):,} characters long: at most {longest}")


def _check_birth_date(born: date) -> None:
    if not isinstance(born, date):  # (a datetime is a date: its day is stored)
        raise ValueError(f"birth_date {born!r} is not a date (YYYY-MM-DD)")
    if isinstance(born, datetime):
        born = born.date()
    latest = (datetime.now(UTC) + EARLIEST_ZONE).date()
    if born > latest:
        raise ValueError(f"birth_date {born.isoformat()} is in the future")
    if born < EARLIEST_BIRTH:
        raise ValueError(f"birth_date {born.isoformat()} is before {EARLIEST_BIRTH.isoformat()}")


def require_patient(con: duckdb.DuckDBPyConnection, patient_id: str) -> None:
    """KeyError (naming how to add them) unless the patient is in the registry."""
    _require_known(con, patient_id=patient_id)


def _require_known(con: duckdb.DuckDBPyConnection, *, clinician_id: str | None = None,
                   patient_id: str | None = None) -> None:
    """InvalidId for a malformed id, KeyError for one the registry does not hold: no silent yes to someone
    who does not exist."""
    if patient_id is not None:
        check_id("patient", patient_id)
        if con.execute("SELECT 1 FROM patients WHERE patient_id = ?", [patient_id]).fetchone() is None:
            raise KeyError(f"unknown patient {patient_id}: add them with `rpm patients add {patient_id}`")
    if clinician_id is not None:
        check_id("clinician", clinician_id)
        if con.execute("SELECT 1 FROM clinicians WHERE clinician_id = ?", [clinician_id]).fetchone() is None:
            raise KeyError(f"unknown clinician {clinician_id}: add them with `rpm careteam add {clinician_id}`")
