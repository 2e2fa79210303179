"""Alert evaluation over dense series: a scale sending a weight every minute, a CGM every five minutes.

What a clinician relies on: a run of the pipeline decides exactly the alerts a full re-evaluation would — also
when it starts from a checkpoint in the middle of an open episode, when readings arrive late, and when a
threshold changes. What the pipeline relies on: neither a dense series nor a long history makes a run's
evaluation grow faster than the readings it has to look at (checked on the rows each SQL operator handles, as
DuckDB's profiler counts them: no clock).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest

from core.settings import Settings
from transforms.vocab import METRICS
from warehouse import registry
from warehouse.alerts import note_loaded, refresh_alerts
from warehouse.db import clinical

MIN = timedelta(minutes=1)
H = timedelta(hours=1)
D = timedelta(days=1)
COLUMNS = ["reading_id", "patient_id", "device_id", "metric", "value", "diastolic", "measured_at"]


def reading(patient_id: str, device_id: str, metric: str, value: float, at: datetime,
            diastolic: float | None = None) -> tuple:
    return (f"{device_id}|{metric}|{at.isoformat()}", patient_id, device_id, metric, float(value), diastolic, at)


def load(con: duckdb.DuckDBPyConnection, rows: list[tuple]) -> None:
    """What the load does with a batch, in one transaction: insert the readings and note them for alerts."""
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["measured_at"] = pd.to_datetime(frame["measured_at"], utc=True)
    vocab = pd.DataFrame([(m, v.loinc, v.canonical_unit) for m, v in METRICS.items()],
                         columns=["metric", "loinc", "unit"])
    con.execute("BEGIN TRANSACTION")
    con.register("batch_frame", frame)
    con.register("vocab_frame", vocab)
    con.execute("CREATE OR REPLACE TEMP TABLE _batch AS SELECT * FROM batch_frame")
    con.execute("""
        INSERT INTO readings (reading_id, patient_id, device_id, metric, loinc, value, diastolic, unit, unit_sent,
                              measured_at, utc_offset_min, received_at, loaded_at, msg_id, segment, record_no,
                              item_no)
        SELECT b.reading_id, b.patient_id, b.device_id, b.metric, v.loinc, b.value, b.diastolic, v.unit, v.unit,
               b.measured_at, 0, b.measured_at, now(), b.reading_id, 'seg-dense', 0, 0
        FROM _batch b JOIN vocab_frame v USING (metric)""")
    note_loaded(con, "_batch")
    con.execute("COMMIT")
    con.unregister("batch_frame")
    con.unregister("vocab_frame")


def decided(con: duckdb.DuckDBPyConnection) -> list[tuple]:
    """Every alert as an evaluation decides it (not when it ran)."""
    return con.execute("""
        SELECT alert_id, patient_id, rule, severity, opened_rule, escalated_at, opened_at, opened_reading_id,
               last_breach_at, last_observed, breaches, resolved_reading_id, resolution, resolved_at IS NULL
        FROM alerts ORDER BY alert_id""").fetchall()


def episode(con: duckdb.DuckDBPyConnection, patient_id: str, opened_rule: str, opened_at: datetime
            ) -> dict[str, Any]:
    """The alert of the episode that opened at ``opened_rule``'s level at ``opened_at``."""
    cur = con.execute("SELECT * FROM alerts WHERE patient_id = ? AND opened_rule = ? AND opened_at = ?",
                      [patient_id, opened_rule, opened_at])
    cols = [d[0] for d in cur.description]
    [row] = cur.fetchall()
    return dict(zip(cols, row, strict=True))


def scope_start(con: duckdb.DuckDBPyConnection, patient_id: str) -> datetime | None:
    """Where the last evaluation started for this patient (None: its whole history)."""
    row = con.execute("SELECT from_at, isinf(from_at) FROM alert_scope WHERE patient_id = ?", [patient_id]
                      ).fetchone()
    assert row is not None, f"{patient_id} was not evaluated"
    return None if row[1] else row[0]


# --- the series ---------------------------------------------------------------------------------------------


class Series:
    """Twelve days of four patients ending half an hour ago, day n being 00:00 UTC n days after the first:

    - ``hf`` (heart failure): a weight every minute, ~80 kg. +1.0 kg from day 2, 20:00 to day 3, 00:00 (a
      day-gain episode ending the day); +1.2 kg from day 5, 18:00 (a day-gain episode from 18:00 to 06:00,
      open across midnight) to day 6, 18:00; +2.5 kg over day 7 (day gains over 12 h, then a week gain for
      six days). A second scale weighs at the same minutes every 6 hours on days 7-9 (ties), and once
      on day 4 at 12:00:30, 1.5 kg heavier (a one-reading day gain).
    - ``dm`` (diabetes): a CGM every 5 minutes; 60 mg/dL from 22:30 to 01:30 every night from day 4 (level 1,
      open across midnight) with 50 from 00:00 to 00:30 (level 2); above 250 from 13:00 to 15:00 on even days.
    - ``copd``: spot checks at 09:00 and 21:00 (SpO2, heart rate, respiratory rate, temperature, blood pressure
      within 5 minutes: NEWS2 sets), high-scoring on days 6-8, SpO2 89 % then (day 7, 21:00) 86 %: a low-SpO2
      episode escalating before a midnight it is open across; silent from day 8, 21:00 to day 10, 09:00.
    - ``quiet``: readings on days 0-1, then nothing until day 11 at 03:00 and 09:00 (no data for days), and
      an hour before the end (no current silence: nothing depends on when the test runs).
    """

    def __init__(self, now: datetime) -> None:
        self.day0 = datetime(now.year, now.month, now.day, tzinfo=UTC) - 12 * D
        self.end = now - 30 * MIN
        rng = random.Random(16)
        rows: list[tuple] = []
        t = self.day0
        while t < self.end:
            rows.append(reading("hf", "scale-hf", "body_weight", self.weight(t) + rng.uniform(-0.05, 0.05), t))
            if self.day(7) <= t < self.day(10) and t.minute == 0 and t.hour % 6 == 0:
                rows.append(reading("hf", "scale-hf-2", "body_weight", self.weight(t) + 0.3, t))
            if t == self.day(4.5):
                rows.append(reading("hf", "scale-hf-2", "body_weight", self.weight(t) + 1.5, t + MIN / 2))
            if t.minute % 5 == 0:
                rows.append(reading("dm", "cgm-dm", "blood_glucose", self.glucose(t, rng), t))
            t += MIN
        for day in range(13):
            for hour in (9, 21):
                t = self.day(day) + hour * H
                if t >= self.end or self.day(8) + 21 * H <= t < self.day(10) + 9 * H:
                    continue
                sick = 6 <= day <= 8
                spo2 = 86 if (day, hour) == (7, 21) else 89 if sick else 96
                rows += [reading("copd", "ox-copd", "spo2", spo2, t),
                         reading("copd", "ox-copd", "heart_rate", 118 if sick else 74, t + MIN),
                         reading("copd", "ox-copd", "respiratory_rate", 25 if sick else 16, t + 2 * MIN),
                         reading("copd", "thermo-copd", "body_temperature", 38.4 if sick else 36.8, t + 3 * MIN),
                         reading("copd", "bp-copd", "blood_pressure", 150 if sick else 124, t + 4 * MIN,
                                 diastolic=92 if sick else 78)]
        rows += [reading("quiet", "bp-quiet", "heart_rate", 70 + i, self.day0 + i * 9 * H) for i in range(5)]
        rows += [reading("quiet", "bp-quiet", "heart_rate", 72, t) for t in (self.day(11) + 3 * H,
                                                                             self.day(11) + 9 * H, self.end - H)]
        self.rows = rows

    def day(self, n: float) -> datetime:
        return self.day0 + n * D

    def weight(self, t: datetime) -> float:
        w = 80.0
        if self.day(2) + 20 * H <= t < self.day(3):
            w += 1.0
        if self.day(5) + 18 * H <= t < self.day(6) + 18 * H:
            w += 1.2
        if t >= self.day(7):
            w += 2.5 * min(1.0, (t - self.day(7)) / D)
        return w

    def glucose(self, t: datetime, rng: random.Random) -> float:
        clock = t - datetime(t.year, t.month, t.day, tzinfo=UTC)
        if t >= self.day(4) + 22.5 * H and (clock >= 22.5 * H or clock < 1.5 * H):
            return 50.0 if clock < 0.5 * H else 60.0
        if (t - self.day0).days % 2 == 0 and 13 * H <= clock < 15 * H:
            return 262.0 + rng.uniform(0, 20)
        return 140 + 50 * math.sin(clock / (6 * H) * 2 * math.pi) + rng.uniform(-8, 8)

    def between(self, start: datetime | None, stop: datetime | None, but: list[tuple] = ()) -> list[tuple]:
        """The readings measured in [start, stop), except ``but`` (held back by an offline device)."""
        held = {r[0] for r in but}
        return [r for r in self.rows if (start is None or r[6] >= start) and (stop is None or r[6] < stop)
                and r[0] not in held]

    def of(self, patients: set[str], start: datetime, stop: datetime, device: str = "") -> list[tuple]:
        return [r for r in self.between(start, stop) if r[1] in patients and r[2].startswith(device)]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[duckdb.DuckDBPyConnection, duckdb.DuckDBPyConnection]]:
    """Two warehouses fed the same batches: one evaluated as pipeline runs do, one fully every time."""
    with clinical(Settings(home=tmp_path / "incremental")) as inc, clinical(Settings(home=tmp_path / "full")) as ref:
        for con in (inc, ref):
            registry.upsert_patient(con, "hf", conditions=["heart_failure"])
            registry.upsert_patient(con, "dm", conditions=["diabetes"])
            registry.upsert_patient(con, "copd", conditions=["copd"])
            registry.upsert_patient(con, "quiet")
        yield inc, ref


def test_incremental_evaluation_of_dense_series_decides_what_a_full_one_does(pair):
    """Batch after batch — appended, late, inside a gap, older than every checkpoint, then a threshold
    change — the runs' incremental evaluations (a few patients at a time) keep the alerts table identical to
    full re-evaluations (everyone at once)."""
    inc, ref = pair
    s = Series(datetime.now(UTC).replace(second=0, microsecond=0))

    def step(*batches: list[tuple]) -> None:
        """A pipeline run: the load commits its batches (groups of segments), then alerts are evaluated."""
        for con in (inc, ref):
            for rows in batches:
                load(con, rows)
        refresh_alerts(inc, full=False, chunk_readings=4_000)  # several groups of patients per run
        refresh_alerts(ref, full=True)
        assert decided(inc) == decided(ref)

    offline = (s.of({"dm", "copd"}, s.day(7) + 10 * H, s.day(7) + 14 * H)  # CGM and oximeter, 4 hours
               + s.of({"hf"}, s.day(4), s.day(5), device="scale-hf-2"))  # the second scale, on day 4
    late_in_gap = s.of({"quiet"}, s.day(11), s.day(11) + 4 * H)

    step(s.between(None, s.day(6) + 30 * MIN, but=offline))
    # Both episodes are open at 00:30 and reach back before midnight: the checkpoint carries them, the low
    # glucose at level 1 (level 2 came after midnight).
    carried = set(inc.execute("SELECT patient_id, rule FROM alert_carry WHERE day = ?", [s.day(6)]).fetchall())
    assert {("hf", "weight_gain_day"), ("dm", "glucose_level1_low")} <= carried

    step(s.between(s.day(6) + 30 * MIN, s.day(6) + 7 * H))  # starts from day 6, 00:00, in those episodes
    assert scope_start(inc, "hf") == scope_start(inc, "dm") == s.day(6)
    gain = episode(inc, "hf", "weight_gain_day", s.day(5) + 18 * H)  # every minute from 18:00 to 05:59
    assert (gain["breaches"], gain["resolved_at"]) == (720, s.day(6) + 6 * H)
    low = episode(inc, "dm", "glucose_level1_low", s.day(5) + 22.5 * H)  # every 5 minutes, 22:30 to 01:25
    assert (low["breaches"], low["resolved_at"]) == (36, s.day(6) + 1.5 * H)
    assert (low["rule"], low["escalated_at"]) == ("glucose_level2_low", s.day(6))  # 50 mg/dL from midnight

    step(s.between(s.day(6) + 7 * H, s.day(7) + 12 * H, but=offline),
         s.between(s.day(7) + 12 * H, s.day(9), but=offline))  # two load groups in one run
    # The offline devices' uploads (measured before readings already evaluated) and what came meanwhile.
    step(offline, s.between(s.day(9), s.end - 2 * H, but=late_in_gap))
    # From day 8, 00:00 (the last checkpoint before its silence ended), inside the low-SpO2 episode that had
    # escalated before it: the checkpoint carried it escalated.
    assert scope_start(inc, "copd") == s.day(8)
    assert ("spo2_urgent", s.day(7) + 21 * H) in inc.execute(
        "SELECT rule, escalated_at FROM alert_carry WHERE patient_id = 'copd' AND day = ?", [s.day(8)]).fetchall()
    spo2 = episode(inc, "copd", "spo2_low", s.day(6) + 9 * H)
    assert (spo2["rule"], spo2["escalated_at"], spo2["resolved_at"]) == (
        "spo2_urgent", s.day(7) + 21 * H, s.day(10) + 9 * H)
    assert (scope_start(inc, "dm"), scope_start(inc, "hf")) == (s.day(7), s.day(4))
    step(s.between(s.end - 2 * H, None))  # from last midnight: week gains compare with weights 6-8 days back
    assert scope_start(inc, "hf") == datetime.combine((s.end - 2 * H).date(), datetime.min.time(), UTC)
    assert {"weight_gain_week", "no_data_72h", "glucose_level2_high", "news2_high"} <= {
        r[0] for r in inc.execute("SELECT DISTINCT rule FROM alerts").fetchall()}
    step(late_in_gap)  # from day 11, 00:00: the silence since day 1, carried across it, now ends at 03:00
    assert scope_start(inc, "quiet") == s.day(11)
    silence = episode(inc, "quiet", "no_data_24h", s.day(1) + 12 * H + 24 * H)
    assert (silence["rule"], silence["escalated_at"]) == ("no_data_72h", s.day(1) + 12 * H + 72 * H)
    assert silence["resolved_at"] == s.day(11) + 3 * H

    # A scale's buffer from before the first reading: older than every checkpoint, the whole history again.
    step([reading("hf", "scale-hf-old", "body_weight", 78.0 + i * 0.6, s.day0 - (3 - i) * 15 * H)
          for i in range(3)])
    assert scope_start(inc, "hf") is None
    for con in (inc, ref):
        registry.set_threshold(con, "dm", "glucose_level1_low.mg_dl", 65, "dr")
    step()
    assert scope_start(inc, "dm") is None

    before = decided(inc)
    refresh_alerts(inc, full=True)
    assert decided(inc) == before


# --- cost follows the series, not its square, nor the history ---------------------------------------------


class Profiled:
    """A connection whose every statement DuckDB profiles: rows each operator emitted, per statement."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path) -> None:
        self.con, self.path, self.rows = con, path, []
        con.execute("PRAGMA enable_profiling = 'json'")
        con.execute(f"PRAGMA profiling_output = '{path}'")

    def execute(self, sql: str, *params: Any) -> Any:
        self.path.unlink(missing_ok=True)
        result = self.con.execute(sql, *params)
        if self.path.exists():
            self.rows.append(self._operator_rows(json.loads(self.path.read_text())))
        return result

    def _operator_rows(self, node: dict) -> list[int]:
        own = [int(node["operator_cardinality"])] if "operator_cardinality" in node else []
        return own + [n for child in node.get("children", []) for n in self._operator_rows(child)]

    def close(self) -> None:
        self.con.execute("PRAGMA disable_profiling")

    @property
    def largest(self) -> int:
        return max(n for statement in self.rows for n in statement)

    @property
    def total(self) -> int:
        return sum(n for statement in self.rows for n in statement)


def dense_warehouse(tmp_path: Path, minutes: int) -> tuple[duckdb.DuckDBPyConnection, Any]:
    """A heart-failure patient weighed every minute and a CGM every 5 minutes for ``minutes``, ending now."""
    ctx = clinical(Settings(home=tmp_path / f"dense-{minutes}"))
    con = ctx.__enter__()
    registry.upsert_patient(con, "hf", conditions=["heart_failure"])
    registry.upsert_patient(con, "dm", conditions=["diabetes"])
    end = datetime.now(UTC).replace(second=0, microsecond=0) - H
    rng = random.Random(minutes)
    rows = []
    for i in range(minutes):
        t = end - (minutes - i) * MIN
        rows.append(reading("hf", "scale-hf", "body_weight", 80 + 2 * math.sin(i / 700) + rng.uniform(0, 1), t))
        if i % 5 == 0:
            rows.append(reading("dm", "cgm-dm", "blood_glucose", 140 + 90 * math.sin(i / 300), t))
    load(con, rows)
    return con, ctx


def profiled_refresh(con: duckdb.DuckDBPyConnection, path: Path, full: bool) -> Profiled:
    p = Profiled(con, path)
    try:
        refresh_alerts(p, full=full)  # type: ignore[arg-type]
    finally:
        p.close()
    return p


def test_evaluation_work_grows_linearly_with_a_dense_series(tmp_path):
    """Twice the series, about twice the rows handled by every operator of every statement: no operator pairs
    a weight with every other weight of the patient (the correlated subqueries did, and a nested-loop ASOF
    join would: their rows grow with the square of the series)."""
    runs = {}
    for minutes in (3_000, 6_000):
        con, ctx = dense_warehouse(tmp_path, minutes)
        try:
            readings = con.execute("SELECT count(*) FROM readings").fetchone()[0]  # type: ignore[index]
            runs[minutes] = (readings, profiled_refresh(con, tmp_path / f"profile-{minutes}.json", full=True))
        finally:
            ctx.__exit__(None, None, None)
    (small_n, small), (large_n, large) = runs[3_000], runs[6_000]
    assert large_n == 2 * small_n
    # One row per evaluation at most a few times over (a reading feeds up to three rules; windows, unions).
    assert large.largest <= 4 * large_n, (large.largest, large_n)
    assert large.total <= 2.3 * small.total, (large.total, small.total)


def test_incremental_evaluation_looks_back_to_the_last_midnight_not_the_history(tmp_path):
    """An hour of new readings on top of 40 days of dense series: the run handles the rows since the
    checkpoint at the last midnight before them (and the 8 days of weights the weekly rule compares with),
    not the history."""
    con, ctx = dense_warehouse(tmp_path, 40 * 24 * 60)
    try:
        refresh_alerts(con, full=True)
        last = con.execute("SELECT max(measured_at) FROM readings").fetchone()[0]  # type: ignore[index]
        load(con, [reading("hf", "scale-hf", "body_weight", 81.0, last + (i + 1) * MIN) for i in range(60)]
             + [reading("dm", "cgm-dm", "blood_glucose", 120.0, last + (i + 1) * 5 * MIN) for i in range(12)])
        midnight = datetime.combine((last + MIN).date(), datetime.min.time(), UTC)
        window, history = con.execute("""
            SELECT count(*) FILTER (metric = 'body_weight' AND measured_at >= ?::TIMESTAMPTZ - INTERVAL 8 DAY)
                 + count(*) FILTER (metric <> 'body_weight' AND measured_at >= ?), count(*) FROM readings""",
                                      [midnight, midnight]).fetchone()  # type: ignore[misc]
        assert window < history / 4  # the look-back is a small part of the history: the test means something

        run = profiled_refresh(con, tmp_path / "profile-incremental.json", full=False)
        # a reading feeds up to three rules: no operator handles more than a few times the rows looked at
        assert run.largest <= 3 * window, (run.largest, window, history)
        assert scope_start(con, "hf") == scope_start(con, "dm") == midnight
    finally:
        ctx.__exit__(None, None, None)
