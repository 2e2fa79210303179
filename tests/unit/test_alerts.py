"""Alert episodes (warehouse/alerts.py over 030_alerts.sql) on a tmp warehouse with readings inserted directly.

What a clinician relies on: each rule fires at its published boundary and not inside the normal range; a run
of breaching readings is one alert, resolved by the first reading back in range; the levels of one finding
(BP, SpO2, hypoglycaemia, NEWS2, no data) make one alert at the worst level reached, escalated in place;
re-evaluating changes nothing and never loses an acknowledgement. Readings sit at fixed offsets from now, because the no-data rules
compare the last reading with now().
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from core.settings import Settings
from warehouse import alerts, registry
from warehouse.alerts import acknowledge, mark_dirty, open_alerts, refresh_alerts
from warehouse.db import clinical

H = timedelta(hours=1)
D = timedelta(days=1)


def _now() -> datetime:
    return datetime.now(UTC).replace(second=0, microsecond=0)


@pytest.fixture
def now() -> datetime:
    return _now()


@pytest.fixture
def con(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    with clinical(Settings(home=tmp_path / "var")) as c:
        yield c


@pytest.fixture
def add(con, insert_reading):
    """add(patient, metric, value, at, diastolic=None) on this test's warehouse; patients are created once."""
    def _add(patient_id: str, metric: str, value: float, at: datetime, diastolic: float | None = None) -> str:
        con.execute("INSERT INTO patients (patient_id) VALUES (?) ON CONFLICT DO NOTHING", [patient_id])
        return insert_reading(con, patient_id, metric, value, at, diastolic=diastolic)
    return _add


@pytest.fixture(params=["by key", "in bulk"])
def upsert_way(request, monkeypatch) -> str:
    """Both ways episodes reach `alerts` (warehouse/alerts.py _upsert): through the key index, and by joins
    for many episodes (every evaluation here takes the bulk way)."""
    if request.param == "in bulk":
        monkeypatch.setattr(alerts, "BULK_EPISODES", 0)
    return request.param


def alerts_of(con: duckdb.DuckDBPyConnection, patient_id: str, rule: str | None = None) -> list[dict]:
    cur = con.execute("SELECT * FROM alerts WHERE patient_id = ? AND (? IS NULL OR rule = ?) "
                      "ORDER BY opened_at, rule", [patient_id, rule, rule])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def rules_of(con: duckdb.DuckDBPyConnection, patient_id: str) -> set[str]:
    return {a["rule"] for a in alerts_of(con, patient_id)}


def open_rules(con: duckdb.DuckDBPyConnection, patient_id: str) -> list[str]:
    return sorted(a["rule"] for a in alerts_of(con, patient_id) if a["resolved_at"] is None)


# --- thresholds at their boundaries -------------------------------------------------------------------------
# (rule, metric, value, diastolic, fires): the boundary value itself and the nearest in-range value.
BOUNDARIES = [
    ("bp_severe", "blood_pressure", 180, 80, True),
    ("bp_severe", "blood_pressure", 170, 120, True),
    ("bp_severe", "blood_pressure", 179, 119, False),
    ("bp_stage2", "blood_pressure", 140, 80, True),
    ("bp_stage2", "blood_pressure", 130, 90, True),
    ("bp_stage2", "blood_pressure", 139, 89, False),
    ("glucose_level2_low", "blood_glucose", 53, None, True),
    ("glucose_level2_low", "blood_glucose", 54, None, False),
    ("glucose_level1_low", "blood_glucose", 69, None, True),
    ("glucose_level1_low", "blood_glucose", 54, None, True),   # 54 is level 1 (and not level 2, above)
    ("glucose_level1_low", "blood_glucose", 70, None, False),
    ("glucose_level2_high", "blood_glucose", 251, None, True),
    ("glucose_level2_high", "blood_glucose", 250, None, False),
    ("spo2_urgent", "spo2", 87, None, True),
    ("spo2_urgent", "spo2", 88, None, False),
    ("spo2_low", "spo2", 91, None, True),
    ("spo2_low", "spo2", 92, None, False),
    ("fever", "body_temperature", 38.0, None, True),
    ("fever", "body_temperature", 37.9, None, False),
    ("hr_low", "heart_rate", 39, None, True),
    ("hr_low", "heart_rate", 40, None, False),
    ("hr_high", "heart_rate", 131, None, True),
    ("hr_high", "heart_rate", 130, None, False),
]


def _case_id(case: tuple) -> str:
    rule, _, value, diastolic, fires = case
    shown = f"{value}/{diastolic}" if diastolic is not None else f"{value}"
    return f"{rule}-{shown}-{'fires' if fires else 'quiet'}"


@pytest.fixture(scope="module")
def boundary_alerts(tmp_path_factory, insert_reading) -> dict[str, set[str]]:
    """One patient per boundary case, one reading an hour ago each, evaluated once: patient -> rules fired."""
    at = _now() - H
    with clinical(Settings(home=tmp_path_factory.mktemp("boundaries") / "var")) as c:
        for i, (_, metric, value, diastolic, _) in enumerate(BOUNDARIES):
            c.execute("INSERT INTO patients (patient_id) VALUES (?)", [f"case-{i}"])
            insert_reading(c, f"case-{i}", metric, value, at, diastolic=diastolic)
        refresh_alerts(c)
        fired: dict[str, set[str]] = {}
        for patient_id, rule in c.execute("SELECT patient_id, rule FROM alerts").fetchall():
            fired.setdefault(patient_id, set()).add(rule)
    return fired


@pytest.mark.parametrize("case_no", range(len(BOUNDARIES)), ids=[_case_id(c) for c in BOUNDARIES])
def test_threshold_fires_at_its_boundary_only(boundary_alerts, case_no):
    rule, _, _, _, fires = BOUNDARIES[case_no]
    assert (rule in boundary_alerts.get(f"case-{case_no}", set())) is fires


def test_level1_hypoglycaemia_at_54_is_not_level2(con, add, now):
    add("p1", "blood_glucose", 54, now - H)
    refresh_alerts(con)
    assert rules_of(con, "p1") == {"glucose_level1_low"}


# --- episodes -----------------------------------------------------------------------------------------------


def test_consecutive_breaches_are_one_episode_resolved_by_first_in_range_reading(con, add, now):
    t = [now - timedelta(hours=10 - i) for i in range(6)]
    first = add("p1", "blood_pressure", 150, t[0], 95)
    add("p1", "blood_pressure", 152, t[1], 96)
    add("p1", "blood_pressure", 148, t[2], 94)
    assert refresh_alerts(con) == {"bp_stage2": 1}
    [episode] = alerts_of(con, "p1", "bp_stage2")
    assert (episode["breaches"], episode["opened_at"], episode["opened_reading_id"]) == (3, t[0], first)
    assert (episode["last_breach_at"], episode["resolved_at"]) == (t[2], None)
    assert episode["last_observed"] == "148/94 mm[Hg]"
    assert episode["severity"] == 3

    back = add("p1", "blood_pressure", 128, t[3], 82)
    add("p1", "blood_pressure", 125, t[4], 80)  # a second in-range reading does not move resolved_at
    assert refresh_alerts(con) == {}
    [resolved] = alerts_of(con, "p1", "bp_stage2")
    assert resolved["alert_id"] == episode["alert_id"]
    assert (resolved["resolved_at"], resolved["resolved_reading_id"], resolved["breaches"]) == (t[3], back, 3)

    relapse = add("p1", "blood_pressure", 145, t[5], 85)
    assert refresh_alerts(con) == {"bp_stage2": 1}
    old, new = alerts_of(con, "p1", "bp_stage2")
    assert old["alert_id"] == episode["alert_id"] and old["resolved_at"] == t[3]
    assert new["alert_id"] != old["alert_id"]
    assert (new["opened_reading_id"], new["breaches"], new["resolved_at"]) == (relapse, 1, None)


@pytest.mark.parametrize(("metric", "value", "diastolic", "rule"), [
    ("blood_pressure", 182, 95, "bp_severe"),        # also >= 140/90: not also bp_stage2
    ("spo2", 86, None, "spo2_urgent"),              # also < 92: not also spo2_low
    ("blood_glucose", 50, None, "glucose_level2_low"),  # also < 70: not also level 1
])
def test_one_alert_per_family_at_the_most_severe_level(con, add, now, metric, value, diastolic, rule):
    """Regression: a BP of 182/95 opened bp_severe and bp_stage2, two open alerts for one reading."""
    add("p1", metric, value, now - H, diastolic)
    refresh_alerts(con)
    [alert] = alerts_of(con, "p1")
    assert (alert["rule"], alert["opened_rule"], alert["escalated_at"], alert["severity"]) == (rule, rule, None, 1)


def test_the_family_episode_lasts_while_any_level_breaches(con, add, now):
    """185/95 then 150/95 then 120/80: one BP episode, severe from its first reading (it does not drop back to
    stage 2 while it lasts), resolved when no level breaches."""
    add("p1", "blood_pressure", 185, now - 3 * H, 95)
    add("p1", "blood_pressure", 150, now - 2 * H, 95)
    refresh_alerts(con)
    [episode] = alerts_of(con, "p1")
    assert (episode["rule"], episode["severity"], episode["breaches"]) == ("bp_severe", 1, 2)
    assert (episode["last_observed"], episode["resolved_at"]) == ("150/95 mm[Hg]", None)

    add("p1", "blood_pressure", 120, now - H, 80)
    refresh_alerts(con)
    [resolved] = alerts_of(con, "p1")
    assert (resolved["alert_id"], resolved["resolved_at"]) == (episode["alert_id"], now - H)


@pytest.mark.parametrize(("metric", "values", "diastolic", "opened", "escalated"), [
    ("blood_pressure", (150, 182, 150), 95, "bp_stage2", "bp_severe"),
    ("spo2", (91, 86, 90), None, "spo2_low", "spo2_urgent"),
    ("blood_glucose", (62, 50, 65), None, "glucose_level1_low", "glucose_level2_low"),
])
def test_a_worse_reading_escalates_the_open_alert_in_place(con, add, now, metric, values, diastolic, opened,
                                                           escalated, upsert_way):
    """The same alert (id) rises to the worse level, saying when, and asks for attention again: the
    acknowledgement of the lower level no longer stands. A reading back at the lower level keeps it there:
    the episode's worst is what it is."""
    first, worse, lower = values
    add("p1", metric, first, now - 3 * H, diastolic)
    refresh_alerts(con)
    [alert] = alerts_of(con, "p1")
    assert (alert["rule"], alert["escalated_at"]) == (opened, None)
    acknowledge(con, alert["alert_id"], "dr-a", "seen")

    add("p1", metric, worse, now - 2 * H, diastolic)
    add("p1", metric, lower, now - H, diastolic)
    mark_dirty(con, "p1")  # as the load marks it
    refresh_alerts(con, full=False)
    [after] = alerts_of(con, "p1")
    assert after["alert_id"] == alert["alert_id"]
    assert (after["rule"], after["severity"], after["opened_rule"]) == (escalated, 1, opened)
    assert (after["escalated_at"], after["breaches"], after["resolved_at"]) == (now - 2 * H, 3, None)
    assert (after["acknowledged_by"], after["acknowledged_at"], after["ack_note"]) == (None, None, None)
    assert [(a["alert_id"], a["rule"], a["escalated_at"]) for a in open_alerts(con, ["p1"])] == [
        (alert["alert_id"], escalated, now - 2 * H)]
    acknowledge(con, alert["alert_id"], "dr-a", "seen the severe one")
    mark_dirty(con, "p1")
    refresh_alerts(con, full=False)  # nothing worse since: the new acknowledgement stands
    assert alerts_of(con, "p1")[0]["acknowledged_by"] == "dr-a"


def test_alerts_of_a_release_before_families_keep_their_ids_and_acks(con, add, now, upsert_way):
    """That release opened bp_severe and bp_stage2 on one 182/95 (keyed by rule and opening reading). The
    first evaluation under families keeps the severe one — its id, its acknowledgement — and closes its
    duplicate as merged, not as disproved."""
    reading = add("p1", "blood_pressure", 182, now - H, 95)
    for rule, severity in (("bp_severe", 1), ("bp_stage2", 3)):
        con.execute("""INSERT INTO alerts (alert_id, patient_id, rule, severity, opened_at, opened_reading_id,
                                           last_breach_at, breaches, evaluated_at, acknowledged_by)
                       VALUES (md5('p1|' || $rule || '|' || $reading), 'p1', $rule, $severity, $at, $reading,
                               $at, 1, $at, CASE WHEN $rule = 'bp_severe' THEN 'dr-a' END)""",
                    {"rule": rule, "severity": severity, "reading": reading, "at": now - H})
    old = {a["rule"]: a["alert_id"] for a in alerts_of(con, "p1")}
    refresh_alerts(con)
    after = {a["alert_id"]: a for a in alerts_of(con, "p1")}
    assert set(after) == set(old.values())
    kept, merged = after[old["bp_severe"]], after[old["bp_stage2"]]
    assert (kept["resolved_at"], kept["acknowledged_by"], kept["opened_rule"]) == (None, "dr-a", "bp_severe")
    assert merged["resolved_at"] is not None and merged["resolution"] == "merged into its family's alert"
    assert [a["alert_id"] for a in open_alerts(con, ["p1"])] == [old["bp_severe"]]


def _mixed_history(add, now: datetime) -> None:
    add("p1", "blood_pressure", 150, now - 5 * H, 95)
    add("p1", "blood_pressure", 120, now - 4 * H, 80)
    add("p1", "blood_pressure", 182, now - 3 * H, 100)
    add("p1", "spo2", 90, now - 2 * H)
    add("p2", "heart_rate", 135, now - 30 * H)
    add("p2", "blood_glucose", 50, now - 29 * H)


def test_refresh_is_idempotent(con, add, now, upsert_way):
    _mixed_history(add, now)
    first = refresh_alerts(con)
    # evaluated_at is the time of the evaluation itself: everything else must be unchanged.
    table = "SELECT * EXCLUDE (evaluated_at) FROM alerts ORDER BY alert_id"
    before = con.execute(table).fetchall()
    assert refresh_alerts(con) == first
    assert con.execute(table).fetchall() == before
    assert len(before) >= 6 and first["bp_severe"] == 1 and "bp_stage2" not in first
    assert first["no_data_24h"] == 1


def test_acknowledgement_survives_refresh_and_alert_stays_open(con, add, now, upsert_way):
    add("p1", "heart_rate", 135, now - 2 * H)
    refresh_alerts(con)
    [alert] = alerts_of(con, "p1", "hr_high")
    ack = acknowledge(con, alert["alert_id"], "dr-a", "called the patient")
    assert ack == {"alert_id": alert["alert_id"], "patient_id": "p1", "rule": "hr_high", "resolved": False}

    add("p1", "heart_rate", 138, now - H)  # still breaching: same episode, one more breach
    refresh_alerts(con)
    [after] = alerts_of(con, "p1", "hr_high")
    assert after["alert_id"] == alert["alert_id"]
    assert (after["acknowledged_by"], after["ack_note"], after["breaches"]) == ("dr-a", "called the patient", 2)
    assert after["acknowledged_at"] is not None
    assert after["resolved_at"] is None
    assert [a["alert_id"] for a in open_alerts(con, ["p1"])] == [alert["alert_id"]]

    add("p1", "heart_rate", 80, now - H / 2)
    refresh_alerts(con)
    [resolved] = alerts_of(con, "p1", "hr_high")
    assert resolved["resolved_at"] == now - H / 2
    assert resolved["acknowledged_by"] == "dr-a"
    assert open_alerts(con, ["p1"]) == []


def test_acknowledge_unknown_alert_returns_none(con):
    assert acknowledge(con, "no-such-alert", "dr-a", None) is None


# --- per-patient overrides ----------------------------------------------------------------------------------


def test_override_changes_what_fires_for_that_patient_only(con, add, now):
    for p in ("p1", "p2"):
        add(p, "blood_pressure", 145, now - 2 * H, 85)
    registry.set_threshold(con, "p1", "bp_stage2.systolic", 150, "dr")
    refresh_alerts(con)
    assert "bp_stage2" not in rules_of(con, "p1")
    assert "bp_stage2" in rules_of(con, "p2")

    add("p1", "blood_pressure", 150, now - H, 85)  # at the patient's own boundary
    refresh_alerts(con)
    [alert] = alerts_of(con, "p1", "bp_stage2")
    assert alert["last_observed"] == "150/85 mm[Hg]"
    assert con.execute("SELECT threshold, set_by FROM alert_thresholds WHERE patient_id = 'p1'").fetchall() == [
        (150.0, "dr")]


@pytest.mark.parametrize("name", ["bp_stage3.systolic", "bp_stage2", "bp_stage2.mean", ""])
def test_unknown_threshold_name_raises_key_error(con, add, now, name):
    add("p1", "blood_pressure", 145, now - H, 85)
    with pytest.raises(KeyError):
        registry.set_threshold(con, "p1", name, 150, "dr")
    assert con.execute("SELECT count(*) FROM alert_thresholds").fetchone() == (0,)


# --- heart failure weight gain ------------------------------------------------------------------------------


def _weights(add, patient_id: str, now: datetime) -> None:
    # 0.8 kg a day over the last three days (under 0.907) is 2.4 kg over the week (over 2.268): week only.
    add(patient_id, "body_weight", 80.0, now - 7 * D)
    add(patient_id, "body_weight", 80.8, now - 3 * D)
    add(patient_id, "body_weight", 81.6, now - 2 * D)
    add(patient_id, "body_weight", 82.4, now - 1 * D)
    add(patient_id, "body_weight", 83.35, now - H)  # +0.95 kg over the weight 23 h before: day too


def test_weight_gain_fires_only_for_heart_failure(con, add, now):
    registry.upsert_patient(con, "hf", conditions=["copd", "heart_failure"])
    registry.upsert_patient(con, "dm", conditions=["diabetes"])
    registry.upsert_patient(con, "none")
    for p in ("hf", "dm", "none"):
        _weights(add, p, now)
    refresh_alerts(con)

    [day] = alerts_of(con, "hf", "weight_gain_day")
    assert (day["opened_at"], day["breaches"], day["resolved_at"]) == (now - H, 1, None)
    assert day["last_observed"] == "+0.9 kg since previous weight"
    week = alerts_of(con, "hf", "weight_gain_week")
    # -1 d is 2.4 kg over the 80.0 of -7 d; -1 h looks back to -8 d .. -6 d and finds that 80.0 too.
    assert [(a["opened_at"], a["breaches"], a["resolved_at"]) for a in week] == [(now - D, 2, None)]
    for p in ("dm", "none"):
        assert not {"weight_gain_day", "weight_gain_week"} & rules_of(con, p), p


def test_weight_gain_under_thresholds_is_quiet(con, add, now):
    registry.upsert_patient(con, "hf", conditions=["heart_failure"])
    add("hf", "body_weight", 80.0, now - 7 * D)
    add("hf", "body_weight", 80.85, now - 6 * D)    # +0.85 in a day
    add("hf", "body_weight", 81.7, now - 5 * D)     # +0.85 in a day
    add("hf", "body_weight", 82.2, now - H)         # +2.2 over the 80.0 of 6-8 days before: under 2.268
    refresh_alerts(con)
    assert not {"weight_gain_day", "weight_gain_week"} & rules_of(con, "hf")



def test_weight_gain_day_needs_a_weight_about_a_day_before(con, add, now):
    """+1.0 kg over ten days is not "weight gain > 2 lb in a day" (regression: it was compared with the
    previous weight however old), nor is +1.0 kg between a morning and an evening weigh-in (no weight 12-36 h
    earlier); +1.0 kg against the latest weight 12-36 h before is."""
    registry.upsert_patient(con, "hf", conditions=["heart_failure"])
    add("hf", "body_weight", 80.0, now - 10 * D)
    add("hf", "body_weight", 81.0, now - 30 * H)
    add("hf", "body_weight", 82.0, now - 20 * H)  # 10 h after the previous one: same day
    refresh_alerts(con)
    assert alerts_of(con, "hf", "weight_gain_day") == []

    add("hf", "body_weight", 83.0, now - H)        # +1.0 over the latest weight 12-36 h before (-20 h)
    refresh_alerts(con)
    [a] = alerts_of(con, "hf", "weight_gain_day")
    assert (a["opened_at"], a["last_observed"]) == (now - H, "+1.0 kg since previous weight")


# --- NEWS2 --------------------------------------------------------------------------------------------------


def _slot(now: datetime) -> datetime:
    """The start of a 15-minute slot an hour or two ago."""
    return now.replace(minute=now.minute - now.minute % 15) - 2 * H


def test_news2_score_8_opens_high_only(con, add, now):
    t = _slot(now)
    add("p1", "spo2", 90, t + timedelta(minutes=1))              # 3
    add("p1", "heart_rate", 120, t + timedelta(minutes=2))       # 2
    last = add("p1", "respiratory_rate", 26, t + timedelta(minutes=3))  # 3
    refresh_alerts(con)
    [a] = alerts_of(con, "p1", "news2_high")
    assert (a["last_observed"], a["severity"], a["opened_reading_id"]) == ("score 8", 1, last)
    assert a["opened_at"] == t + timedelta(minutes=3)
    assert alerts_of(con, "p1", "news2_medium") == []  # the same finding at a lower level


def test_news2_needs_three_parameters(con, add, now):
    t = _slot(now)
    add("p1", "spo2", 85, t + timedelta(minutes=1))               # 3
    add("p1", "respiratory_rate", 30, t + timedelta(minutes=2))   # 3
    add("p1", "heart_rate", 135, t + timedelta(minutes=20))       # 3, but in the next slot
    refresh_alerts(con)
    assert not {"news2_high", "news2_medium"} & rules_of(con, "p1")
    assert {"spo2_urgent", "hr_high"} <= rules_of(con, "p1")


def test_news2_normal_set_is_quiet(con, add, now):
    t = _slot(now)
    add("p1", "spo2", 97, t + timedelta(minutes=1))
    add("p1", "heart_rate", 72, t + timedelta(minutes=2))
    add("p1", "respiratory_rate", 16, t + timedelta(minutes=3))
    add("p1", "blood_pressure", 124, t + timedelta(minutes=4), 78)
    add("p1", "body_temperature", 36.8, t + timedelta(minutes=5))
    refresh_alerts(con)
    assert rules_of(con, "p1") == set()


def test_news2_score_6_is_medium_only(con, add, now):
    t = _slot(now)
    add("p1", "spo2", 93, t + timedelta(minutes=1))               # 2
    add("p1", "heart_rate", 115, t + timedelta(minutes=2))        # 2
    add("p1", "respiratory_rate", 22, t + timedelta(minutes=3))   # 2
    refresh_alerts(con)
    assert [a["last_observed"] for a in alerts_of(con, "p1", "news2_medium")] == ["score 6"]
    assert alerts_of(con, "p1", "news2_high") == []


# --- no data ------------------------------------------------------------------------------------------------


def test_no_data_alerts_follow_the_age_of_the_last_reading(con, add, now):
    add("fresh", "heart_rate", 72, now - 23 * H)
    last_30 = add("quiet-30h", "heart_rate", 72, now - 30 * H)
    add("quiet-80h", "heart_rate", 72, now - 80 * H)
    refresh_alerts(con)

    assert open_rules(con, "fresh") == []
    assert open_rules(con, "quiet-30h") == ["no_data_24h"]
    assert open_rules(con, "quiet-80h") == ["no_data_72h"]  # one silence, one alert
    [a] = alerts_of(con, "quiet-30h", "no_data_24h")
    assert (a["opened_at"], a["opened_reading_id"], a["last_breach_at"]) == (now - 6 * H, last_30, now - 30 * H)
    assert a["severity"] == 3
    [a72] = alerts_of(con, "quiet-80h")
    assert (a72["rule"], a72["severity"], a72["opened_rule"]) == ("no_data_72h", 2, "no_data_24h")
    assert (a72["opened_at"], a72["escalated_at"]) == (now - 56 * H, now - 8 * H)


def test_a_silence_that_goes_on_escalates_its_alert(con, add, now):
    add("p1", "heart_rate", 72, now - 30 * H)
    refresh_alerts(con)
    [a24] = alerts_of(con, "p1")
    acknowledge(con, a24["alert_id"], "dr-a", "called, no answer")
    # Two days later, still nothing (readings move back: now() cannot move forward).
    for table in ("readings", "patient_last_reading"):
        con.execute(f"UPDATE {table} SET measured_at = measured_at - INTERVAL 48 HOUR WHERE patient_id = 'p1'")
    refresh_alerts(con, full=False)  # p1 is not dirty: only its current silence is looked at
    [a72] = alerts_of(con, "p1")
    assert (a72["alert_id"], a72["acknowledged_by"]) == (a24["alert_id"], None)  # worse: to be seen again
    assert (a72["rule"], a72["escalated_at"], a72["resolved_at"]) == ("no_data_72h", now - 6 * H, None)


def test_gap_in_history_is_a_resolved_no_data_episode(con, add, now):
    before = add("p1", "heart_rate", 72, now - 60 * H)
    after = add("p1", "heart_rate", 74, now - 2 * H)
    refresh_alerts(con)
    [gap] = alerts_of(con, "p1", "no_data_24h")
    assert (gap["opened_at"], gap["opened_reading_id"]) == (now - 36 * H, before)
    assert (gap["resolved_at"], gap["resolved_reading_id"]) == (now - 2 * H, after)
    assert alerts_of(con, "p1", "no_data_72h") == []  # 58 h is under 72
    assert open_rules(con, "p1") == []


def test_new_reading_resolves_open_no_data_alert(con, add, now):
    add("p1", "heart_rate", 72, now - 30 * H)
    refresh_alerts(con)
    assert open_rules(con, "p1") == ["no_data_24h"]
    add("p1", "heart_rate", 72, now - H)
    refresh_alerts(con)
    [a] = alerts_of(con, "p1", "no_data_24h")
    assert a["resolved_at"] == now - H


# --- episodes whose evidence changes after the alert opened -------------------------------------------------
# A device that was offline uploads its stored readings later (README: "A device that was offline sends a
# batch"). Regression: refresh_alerts used to upsert only the episodes it still saw, so an alert whose
# episode the late data erased stayed open forever.


def test_buffered_upload_closes_the_no_data_alert_it_disproves(con, add, now):
    add("p1", "heart_rate", 72, now - 30 * H)
    refresh_alerts(con)
    assert open_rules(con, "p1") == ["no_data_24h"]

    add("p1", "heart_rate", 73, now - 20 * H)  # the batch fills the gap
    add("p1", "heart_rate", 74, now - H)
    assert refresh_alerts(con) == {}
    assert con.execute("SELECT count(*) FROM alert_episodes WHERE patient_id = 'p1'").fetchone() == (0,)
    [a] = alerts_of(con, "p1", "no_data_24h")
    assert a["resolved_at"] is not None and a["resolution"] == "disproved by late readings"
    assert open_rules(con, "p1") == []


def test_late_breaching_reading_does_not_leave_a_second_open_alert(con, add, now):
    """The episode now opens at the late reading (a new alert_id): the old alert is closed, not duplicated."""
    add("p1", "blood_pressure", 150, now - 2 * H, 95)
    refresh_alerts(con)
    [first] = alerts_of(con, "p1", "bp_stage2")
    add("p1", "blood_pressure", 152, now - 3 * H, 96)  # measured earlier, delivered later
    refresh_alerts(con)
    [current] = open_alerts(con, ["p1"])
    assert current["alert_id"] != first["alert_id"]
    assert (current["opened_at"], current["breaches"]) == (now - 3 * H, 2)
    [old] = [a for a in alerts_of(con, "p1", "bp_stage2") if a["alert_id"] == first["alert_id"]]
    assert old["resolution"] == "disproved by late readings"

    add("p1", "blood_pressure", 120, now - H, 80)
    refresh_alerts(con)
    assert open_alerts(con, ["p1"]) == []
    [back] = [a for a in alerts_of(con, "p1", "bp_stage2") if a["alert_id"] == current["alert_id"]]
    assert (back["resolved_at"], back["resolution"]) == (now - H, "back in range")


def test_raised_override_closes_the_alert_it_no_longer_supports(con, add, now):
    add("p1", "blood_pressure", 145, now - H, 85)
    refresh_alerts(con)
    assert open_rules(con, "p1") == ["bp_stage2"]
    registry.set_threshold(con, "p1", "bp_stage2.systolic", 150, "dr")
    refresh_alerts(con)
    assert open_rules(con, "p1") == []


# --- incremental evaluation (what each pipeline run does) -----------------------------------------------------

ALERT_FIELDS = ("alert_id", "patient_id", "rule", "severity", "opened_rule", "escalated_at", "opened_at",
                "last_breach_at", "last_observed", "breaches", "resolved_reading_id", "resolution", "acknowledged_by")


def all_alerts(con) -> list[tuple]:
    """Every alert, as an evaluation decides it (not when it ran)."""
    return con.execute(f"SELECT {', '.join(ALERT_FIELDS)}, resolved_at IS NULL FROM alerts ORDER BY alert_id"
                       ).fetchall()


def test_incremental_evaluation_decides_exactly_what_a_full_one_does(con, add, now):
    """Runs of the pipeline evaluate only the patients with changes; a late upload that splits an episode, a
    new episode, a resolution and a silence must come out as a full re-evaluation would have them."""
    add("p1", "blood_pressure", 150, now - 5 * H, 95)
    add("p1", "blood_pressure", 152, now - 4 * H, 96)
    add("p2", "blood_glucose", 60, now - 3 * H)
    add("p3", "heart_rate", 72, now - 30 * H)
    add("p4", "spo2", 90, now - 2 * H)
    add("p5", "heart_rate", 70, now - 40 * H)  # silent, and nothing new for p5 below: an open no-data alert
    mark_dirty(con, ["p1", "p2", "p3", "p4", "p5"])  # as the load marks the patients of what it loaded
    refresh_alerts(con, full=False)
    first = all_alerts(con)
    assert {a[2] for a in first} >= {"bp_stage2", "glucose_level1_low", "no_data_24h", "spo2_low"}

    add("p1", "blood_pressure", 120, now - 4.5 * H, 80)  # late: splits p1's episode in two
    add("p1", "blood_pressure", 185, now - 3.5 * H, 96)  # and escalates the second half
    add("p2", "blood_glucose", 110, now - H)             # resolves p2's low
    add("p3", "heart_rate", 71, now - 29 * H)            # still silent for 29 h: the no-data episode moves
    add("p4", "spo2", 86, now - H)                       # escalates p4's low SpO2 in place
    mark_dirty(con, ["p1", "p2", "p3", "p4"])
    refresh_alerts(con, full=False)
    incremental = all_alerts(con)
    refresh_alerts(con, full=True)

    assert incremental == all_alerts(con)
    assert incremental != first
    assert open_rules(con, "p5") == ["no_data_24h"]
    assert {(a[2], a[4]) for a in incremental if a[-1]} >= {("bp_severe", "bp_stage2"), ("spo2_urgent", "spo2_low")}


def test_patients_without_changes_are_left_alone_but_their_silence_is_seen(con, add, now):
    add("p1", "blood_pressure", 150, now - 2 * H, 95)
    add("p2", "heart_rate", 72, now - 20 * H)
    refresh_alerts(con, full=True)
    [p1_before] = alerts_of(con, "p1")
    assert open_rules(con, "p2") == []

    # Time passes for p2 (its last reading is now 30 h old), nothing new arrives for anyone. (now() cannot
    # move: the readings, and the latest reading the evaluation keeps per patient, move back instead.)
    for table in ("readings", "patient_last_reading"):
        con.execute(f"UPDATE {table} SET measured_at = measured_at - INTERVAL 10 HOUR WHERE patient_id = 'p2'")
    refresh_alerts(con, full=False)

    assert open_rules(con, "p2") == ["no_data_24h"]
    assert alerts_of(con, "p1") == [p1_before]  # not even re-evaluated: its evaluated_at is unchanged


def test_registry_changes_are_re_evaluated_by_the_next_run(con, add, now):
    add("p1", "blood_pressure", 145, now - H, 85)
    add("p2", "body_weight", 80.0, now - 25 * H)
    add("p2", "body_weight", 81.5, now - H)
    refresh_alerts(con, full=True)
    assert open_rules(con, "p1") == ["bp_stage2"] and "weight_gain_day" not in open_rules(con, "p2")

    registry.set_threshold(con, "p1", "bp_stage2.systolic", 150, "dr")
    registry.upsert_patient(con, "p2", conditions=["heart_failure"])
    refresh_alerts(con, full=False)

    assert open_rules(con, "p1") == []
    assert "weight_gain_day" in open_rules(con, "p2")


def test_changed_rules_re_evaluate_every_patient(con, add, now):
    add("p1", "heart_rate", 140, now - H)
    refresh_alerts(con, full=False)  # a new warehouse has never had a full evaluation: this is one
    assert open_rules(con, "p1") == ["hr_high"]
    add("p2", "heart_rate", 35, now - H)  # not marked: an incremental run would not look at p2...

    refresh_alerts(con, full=False)
    assert open_rules(con, "p2") == []
    con.execute("UPDATE alert_state SET value = 'rules of an older release' WHERE key = 'rules'")
    refresh_alerts(con, full=False)  # ...unless the rules changed since the last full evaluation
    assert open_rules(con, "p2") == ["hr_low"]


# --- open_alerts --------------------------------------------------------------------------------------------


def test_open_alerts_most_severe_first_then_oldest_for_requested_patients(con, add, now):
    add("p1", "blood_pressure", 145, now - 5 * H, 85)   # bp_stage2, severity 3
    add("p1", "heart_rate", 135, now - H)               # hr_high, severity 1
    add("p2", "spo2", 91, now - 4 * H)                  # spo2_low, severity 2
    add("p2", "heart_rate", 35, now - 2 * H)            # hr_low, severity 1
    add("p2", "blood_glucose", 300, now - 6 * H)        # glucose_level2_high, severity 2, resolved below
    add("p2", "blood_glucose", 120, now - 3 * H)
    add("p3", "heart_rate", 140, now - 3 * H)           # not requested
    refresh_alerts(con)

    got = [(a["severity"], a["patient_id"], a["rule"]) for a in open_alerts(con, ["p1", "p2"])]
    assert got == [(1, "p2", "hr_low"), (1, "p1", "hr_high"), (2, "p2", "spo2_low"), (3, "p1", "bp_stage2")]
    assert [a["rule"] for a in open_alerts(con, ["p3"])] == ["hr_high"]
    assert open_alerts(con, []) == []
    assert open_alerts(con, ["nobody"]) == []


def test_every_acknowledgement_is_kept_the_alert_shows_the_latest(con, add, now):
    """A later acknowledgement (another clinician, after an escalation, after resolution) adds to the history,
    never erases an earlier one or its note."""
    from warehouse.alerts import acknowledgements

    add("p1", "blood_pressure", 150, now - 3 * H, 95)
    refresh_alerts(con)
    [alert] = alerts_of(con, "p1")
    acknowledge(con, alert["alert_id"], "dr-a", "first look")
    add("p1", "blood_pressure", 185, now - 2 * H, 100)  # escalates: the alert forgets its acknowledgement
    mark_dirty(con, "p1")
    refresh_alerts(con, full=False)
    assert alerts_of(con, "p1")[0]["acknowledged_by"] is None
    acknowledge(con, alert["alert_id"], "rn-b", None)
    add("p1", "blood_pressure", 120, now - H, 80)        # resolves
    mark_dirty(con, "p1")
    refresh_alerts(con, full=False)
    acknowledge(con, alert["alert_id"], "dr-c", "seen after it settled")
    history = acknowledgements(con, alert["alert_id"])
    assert [(a["clinician_id"], a["note"], a["rule"], a["resolved"]) for a in history] == [
        ("dr-a", "first look", "bp_stage2", False), ("rn-b", None, "bp_severe", False),
        ("dr-c", "seen after it settled", "bp_severe", True)]
    [shown] = alerts_of(con, "p1")
    assert (shown["acknowledged_by"], shown["ack_note"]) == ("dr-c", "seen after it settled")
