"""A hostile app end to end: free text with a spreadsheet formula, a name, a birth date and a diagnosis goes
through the real broker, ingest and pipeline, and never reaches the telehealth store or a published CSV.

What a practice manager relies on when they send a published report outside the practice: nothing an app or
a device typed reaches it verbatim (catalogue), and no cell of it runs as a formula in a spreadsheet.
"""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta

import pytest

from core.settings import Settings
from rpmctl import services
from rpmctl.tools.publish import wait_until
from tests.conftest import rpm, rpm_json
from tests.integration.test_end_to_end import mosquitto_pub
from tests.steps import run_pipeline_in_process
from warehouse.db import clinical
from warehouse.telehealth import open_telehealth

pytestmark = pytest.mark.integration

FORMULA = '=HYPERLINK("http://x","Jane Roe DOB 1950-01-01 HIV+")'
NAME = "Jane Roe"
LEAKS = ["HYPERLINK", NAME, "1950-01-01", "HIV", "calc"]


def test_a_hostile_app_event_never_reaches_a_published_csv(ingest_up: Settings, tmp_path):
    s = ingest_up
    since = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    rpm(s, "patients", "add", "pt-roe", "--given", "Jane", "--family", "Roe", "--birth-date", "1950-01-01",
        "--conditions", "hypertension")
    app = rpm_json(s, "devices", "add", "app-roe", "--patient", "pt-roe", "--kind", "app", "--since", since)
    cuff = rpm_json(s, "devices", "add", "bp-roe", "--patient", "pt-roe", "--kind", "bp", "--since", since)
    t = (datetime.now(UTC) - timedelta(hours=3)).isoformat(timespec="seconds")
    events = {"events": [
        {"msg_id": "e1", "event": "education_viewed", "occurred_at": t, "module": FORMULA, "minutes": 4},
        {"msg_id": "e2", "event": "education_completed", "occurred_at": t, "module": "bp-basics", "minutes": 9},
        {"msg_id": "e3", "event": "survey_completed", "occurred_at": t, "survey": f"{NAME} phq-9"},
    ]}
    status = {"msg_id": "s1", "reported_at": t, "battery_pct": 64, "firmware": "=cmd|' /C calc'!A0"}
    assert mosquitto_pub(app, json.dumps(events)).returncode == 0
    assert mosquitto_pub(cuff, json.dumps(status), topic=cuff["status_topic"]).returncode == 0
    wait_until(lambda: (services.ingest_status(s) or {}).get("landed", 0) >= 2, 20, what="ingest to land both")
    run_pipeline_in_process(s)

    # Loaded whole into the clinical stream: the practice can see what the app sent.
    with clinical(s, read_only=True) as con:
        sent = {r[0] for r in con.execute("SELECT coalesce(module, survey, firmware) FROM telehealth_events")
                .fetchall()}
    assert {FORMULA, f"{NAME} phq-9", "=cmd|' /C calc'!A0"} <= sent

    # The store holds the catalogue's values and "other" in their place.
    con = open_telehealth(s)
    try:
        assert sorted(con.execute("SELECT module FROM education_events").fetchall()) == [("bp-basics",), ("other",)]
        assert con.execute("SELECT survey FROM survey_events").fetchall() == [("other",)]
        assert con.execute("SELECT firmware FROM device_status").fetchall() == [("other",)]
    finally:
        con.close()

    for report, publish in (("education", True), ("education", False), ("firmware", False)):
        out = tmp_path / f"{report}-{publish}.csv"
        args = ["reports", report, "--csv", str(out), *(["--publish"] if publish else [])]
        shown = rpm(s, *args).stdout
        text = out.read_text()
        assert not [x for x in LEAKS if x.lower() in (text + shown).lower()], (report, publish, text)
        with out.open(newline="") as f:
            cells = [c for row in csv.reader(f) for c in row]
        assert "other" in cells
        assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")], cells
