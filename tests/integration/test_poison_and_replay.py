"""Issue 11, items 4 and 5, through the real broker and real ingest processes; the run that sets poison segments
aside is a real DAG run (`rpm pipeline run`: its output and task log name them), the later ones run the same
DAG tasks in this process (tests/steps.py).

4. A poison segment is set aside, never a wall: unreadable files in landing/sealed/ (garbage, a truncated
   header, a segment sealed under a key the keyring lacks) beside good segments — one run succeeds, loads every
   good reading, moves the bad files to landing/rejected/, the accounting stays balanced and shows them,
   `rpm ops status` is degraded naming them; after a fix (the key restored) `rpm landing replay` and the next
   run absorb it.
5. Quarantine can be replayed: readings a device sent before the registry knew it are quarantined as
   `device_enrolled_at_measured_time`; once its enrollment is entered with its real start, `rpm quarantine
   replay` loads them, the accounting stays exact, and a second replay changes nothing.
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.keyring import Keyring
from core.keys import new_password
from core.landing import SegmentWriter, list_rejected, rejected_dir, sealed_dir
from core.settings import Settings
from rpmctl.admin.devices import wait_for_login
from rpmctl.services import broker, ingest_status
from rpmctl.tools.publish import DevicePublisher, wait_until
from tests.conftest import rpm, rpm_json
from tests.steps import run_pipeline_in_process
from warehouse.db import clinical

pytestmark = pytest.mark.integration

ENROLLED = "device_enrolled_at_measured_time"


def hr_batch(device: str, tag: str, start: datetime, n: int, value=lambda i: 60 + i) -> dict:
    return {"readings": [{"msg_id": f"{tag}-{i}", "metric": "heart_rate", "unit": "/min", "value": value(i),
                          "measured_at": (start + timedelta(minutes=i)).isoformat(timespec="seconds")}
                         for i in range(n)]}


def publish(s: Settings, device: str, password: str, payloads: list[dict]) -> None:
    """Publish as the device over MQTT 5 QoS 1 and wait until ingest has landed every message."""
    before = (ingest_status(s) or {}).get("landed", 0)
    with DevicePublisher(s, device, password) as pub:
        for p in payloads:
            pub.publish(json.dumps(p).encode())
        assert pub.wait_all() == len(payloads)
    wait_until(lambda: (ingest_status(s) or {}).get("landed", 0) >= before + len(payloads), 30,
               what="ingest to land the messages")


def add_device(s: Settings, device: str, patient: str, since: datetime) -> str:
    rpm(s, "patients", "add", patient)
    return rpm_json(s, "devices", "add", device, "--patient", patient, "--kind", "bp",
                    "--since", since.isoformat())["password"]


def run_pipeline(s: Settings) -> str:
    """`rpm pipeline run`, asserting every task succeeded; returns what it printed (and the task log, where
    the stage task's WARNING for a set-aside segment is)."""
    proc = rpm(s, "pipeline", "run")
    result = proc.stdout.splitlines()[0]
    assert re.fullmatch(r"rpm_pipeline \S+: success \((\w+ success, ){8}\w+ success\)", result), result
    task_log = (Path(s.run_dir) / "pipeline-run.log").read_text()  # type: ignore[arg-type]
    return proc.stdout + proc.stderr + task_log


def readings(s: Settings) -> set[tuple[str, str, str]]:
    with clinical(s, read_only=True) as con:
        return set(con.execute("SELECT patient_id, device_id, msg_id FROM readings").fetchall())


def drop_in_sealed(s: Settings, name: str, data: bytes) -> None:
    """A file appears in sealed/ the way a stray copy or a corrupted restore would put it there (atomically)."""
    tmp = Path(s.landing_dir) / f".{name}.tmp"  # type: ignore[arg-type]
    tmp.write_bytes(data)
    os.rename(tmp, sealed_dir(s.landing_dir) / f"{name}.seg")  # type: ignore[arg-type]


def test_poison_segments_are_set_aside_and_stop_nothing(stack: Settings, tmp_path: Path):
    s = stack
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=6)
    password = add_device(s, "bp-good", "pt-good", since=start - timedelta(days=1))
    publish(s, "bp-good", password, [hr_batch("bp-good", "g1", start, 5)])
    # Three unreadable files, sorting before ingest's own segments: today's first run stopped at the first.
    drop_in_sealed(s, "aa-garbage-000001", b"\x00\xff\xfe this is not a landing segment \x80\n" * 3)
    drop_in_sealed(s, "aa-truncated-000001", b'{"rpm_landing": 1, "segment": "aa-trunc')
    lost_ring = Keyring.load(Settings(home=tmp_path / "lost"), "landing")  # a key the keyring no longer has
    scratch = Path(s.landing_dir) / "scratch"  # type: ignore[arg-type]  # same file system: sealing renames
    scratch.mkdir()
    writer = SegmentWriter(s.landing_dir, "aa-lostkey-000001", keyring=lost_ring,  # type: ignore[arg-type]
                           directory=scratch)
    lost = hr_batch("bp-good", "lost", start + timedelta(hours=1), 4)
    writer.append("rpm/v1/devices/bp-good/vitals", json.dumps(lost).encode(), datetime.now(UTC))
    writer.seal()
    publish(s, "bp-good", password, [hr_batch("bp-good", "g2", start + timedelta(hours=2), 5)])

    printed = run_pipeline(s)  # succeeds: the poison files are set aside, not a wall

    for name, reason in (("aa-garbage-000001", "bad_header"), ("aa-truncated-000001", "bad_header"),
                         ("aa-lostkey-000001", "unknown_key")):
        assert f"{name}.seg ({reason})" in printed.splitlines()[1], printed  # the command names it
        assert any(f"{name}.seg" in line and reason in line and "warning" in line.lower()
                   for line in printed.splitlines()[2:]), (name, printed)  # and so does the task log
    assert "this is not a landing segment" not in printed

    good = {("pt-good", "bp-good", f"{tag}-{i}") for tag in ("g1", "g2") for i in range(5)}
    assert readings(s) == good
    assert sorted(p.stem for p in list_rejected(s.landing_dir)) == [  # type: ignore[arg-type]
        "aa-garbage-000001", "aa-lostkey-000001", "aa-truncated-000001"]
    acc = rpm_json(s, "accounting")
    assert acc["balanced"] is True and (acc["received"], acc["loaded"], acc["quarantined"]) == (10, 10, 0)
    assert acc["pending"] == {"sealed_segments": 0, "sealed_messages": 0, "open_segments": 0, "open_messages": 0}
    assert (acc["rejected"]["segments"], acc["rejected"]["messages"]) == (3, 2 + 0 + 1)  # record lines
    assert acc["rejected"]["by_reason"] == {"bad_header": 2, "unknown_key": 1}
    assert "this is not a landing segment" not in json.dumps(acc)  # reasons carry no file content
    status = rpm(s, "ops", "status", "--json", check=False)
    assert status.returncode == 1, status.stderr  # degraded
    ops = json.loads(status.stdout)
    assert ops["verdict"] == "degraded"
    for name, reason in (("aa-garbage-000001", "bad_header"), ("aa-truncated-000001", "bad_header"),
                         ("aa-lostkey-000001", "unknown_key")):
        assert any(name in r and reason in r for r in ops["reasons"]), (name, ops["reasons"])
    assert ops["runs"][0]["rejected_segments"] == 3
    listed = rpm_json(s, "landing", "rejected")
    assert {w["segment"]: w["reason"] for w in listed} == {"aa-garbage-000001": "bad_header",
                                                          "aa-truncated-000001": "bad_header",
                                                          "aa-lostkey-000001": "unknown_key"}

    # The fix: the lost key is restored into the landing keyring (from a backup), then the segment replayed.
    ring = Path(s.secrets_dir) / "landing.keyring.json"  # type: ignore[arg-type]
    doc = json.loads(ring.read_text())
    doc["keys"].update({k: v.hex() for k, v in lost_ring.keys.items()})
    ring.write_text(json.dumps(doc))
    refused = rpm(s, "landing", "replay", "no-such-segment", check=False)
    assert refused.returncode == 2 and "no rejected segment no-such-segment" in refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert rpm_json(s, "landing", "replay", "aa-lostkey-000001") == {"replayed": ["aa-lostkey-000001"]}
    assert run_pipeline_in_process(s)["rejected"] == []

    assert readings(s) == good | {("pt-good", "bp-good", f"lost-{i}") for i in range(4)}
    acc = rpm_json(s, "accounting")
    assert acc["balanced"] is True and (acc["received"], acc["loaded"]) == (14, 14)
    assert acc["rejected"]["by_reason"] == {"bad_header": 2}
    assert not (rejected_dir(s.landing_dir) / "aa-lostkey-000001.seg").exists()  # type: ignore[arg-type]


def test_readings_sent_before_enrollment_are_replayed_into_the_chart(stack: Settings):
    s = stack
    device = "bp-late"
    # The device has a broker login (issued with its hardware by a fleet import) before the clinic has
    # entered its enrollment: what it sends reaches ingest, and the registry does not know whose it is.
    password = new_password()
    broker.set_login(s, device, password)
    wait_for_login(s, device, password)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=8)
    first = hr_batch(device, "late", start, 6, value=lambda i: 400 if i == 5 else 60 + i)  # the last implausible
    publish(s, device, password, [first, first, {"readings": first["readings"][:2]}])  # a retry and a resend
    run_pipeline_in_process(s)

    acc = rpm_json(s, "accounting")
    assert acc["balanced"] is True and (acc["received"], acc["loaded"], acc["quarantined"]) == (14, 0, 14)
    assert acc["quarantined_by_reason"][ENROLLED] == 14
    listed = rpm_json(s, "quarantine", "list", "--reason", ENROLLED)
    assert listed["matching"] == 14 and {i["kind"] for i in listed["items"]} == {"reading"}
    refused = rpm(s, "quarantine", "replay", "--reason", "not_json", check=False)
    assert refused.returncode == 2 and "structural" in refused.stderr and "Traceback" not in refused.stderr

    # The registry catches up: the patient, and the device's enrollment from when it was handed over.
    add_device(s, device, "pt-late", since=start - timedelta(days=1))
    result = rpm_json(s, "quarantine", "replay", "--reason", ENROLLED)

    assert (result["examined"], result["loaded"], result["duplicates"], result["still_quarantined"]) == (14, 5, 7, 2)
    assert result["still_by_reason"] == {"plausible_heart_rate": 2}
    assert readings(s) == {("pt-late", device, f"late-{i}") for i in range(5)}
    acc = rpm_json(s, "accounting")
    assert acc["balanced"] is True
    assert (acc["received"], acc["loaded"], acc["quarantined"], acc["duplicates"]) == (14, 5, 2, 7)
    assert acc["quarantined_by_reason"] == {"plausible_heart_rate": 2}
    summary = {p["patient_id"]: p for p in rpm_json(s, "summary")}  # clinicians' snapshot has them already
    assert "pt-late" in summary

    again = rpm_json(s, "quarantine", "replay", "--reason", ENROLLED)
    assert (again["examined"], again["changed"]) == (0, False)
    assert rpm_json(s, "quarantine", "replay", "--reason", "plausible_heart_rate")["changed"] is False
    assert rpm_json(s, "accounting") == acc
    run_pipeline_in_process(s)  # a run after the replay: nothing pending, nothing moves back
    assert rpm_json(s, "accounting") == acc
