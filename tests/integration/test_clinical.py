"""The clinical stream as clinicians and admins use it: scope, alerts, acknowledgement, billing, FHIR,
the audit trail and key rotation — over data that went through the real broker and a real DAG run (the
module's fixture); later batches go through the same DAG tasks in this process (tests/steps.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from core.keyring import DecryptError, Keyring
from core.landing import list_sealed, read_segment, segment_key_ids
from core.settings import Settings
from rpmctl import services
from rpmctl.services import SERVICE, ingest_status, procs, start_service
from rpmctl.tools.publish import DevicePublisher, wait_until
from rpmctl.tools.simulator import build_fleet, provision_fleet, publish_fleet
from tests.conftest import fresh_settings, login_as, rpm, rpm_json, start_stack
from tests.steps import run_pipeline_in_process
from warehouse.db import httpfs_extension
from warehouse.serving import backups_dir, serving, serving_dir

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("clinical")]  # one shared stack, in order


def landed(s: Settings) -> int:
    return (ingest_status(s) or {}).get("landed", 0)


@pytest.fixture(scope="module")
def fleet_loaded(airflow_db_template: Path):
    """4 patients x 3 days through the broker and one DAG run; dr-lee follows pt-0001 and pt-0003.

    One stack for the whole module (a fleet and a DAG run take most of a test's time): the tests run in file
    order (`--dist loadscope` keeps a module on one worker), reads first, then what changes alerts, time logs,
    the audit log (restored) and the keys."""
    with fresh_settings() as s:
        start_stack(s, airflow_db_template)
        services.up(s)  # and the clinician service (with what else `rpm up` starts)
        fleet = build_fleet(patients=4, days=3, seed=5)
        provision_fleet(s, fleet, days=3)
        sent = publish_fleet(s, fleet)
        wait_until(lambda: landed(s) >= sent["published"], 30, what="ingest to land the fleet")
        rpm(s, "pipeline", "run")
        login_as(s, "dr-lee")
        yield s, {d.device_id: d.password for d in fleet.devices}


def publish_bp(s: Settings, password: str, systolic: int, diastolic: int, minutes_ago: float) -> None:
    at = (datetime.now(UTC) - timedelta(minutes=minutes_ago)).isoformat()
    with DevicePublisher(s, "bp-0001", password) as pub:
        pub.publish(json.dumps({"msg_id": f"bp-{systolic}-{minutes_ago}", "metric": "blood_pressure",
                                "measured_at": at, "unit": "mm[Hg]",
                                "values": {"systolic": systolic, "diastolic": diastolic}}).encode())
        pub.wait_all()


def test_clinician_sees_only_their_patients_and_every_read_is_audited(fleet_loaded):
    s, _ = fleet_loaded
    patients = rpm_json(s, "clinician", "--as", "dr-lee", "patients")
    assert [p["patient_id"] for p in patients] == ["pt-0001", "pt-0003"]
    assert all(p["readings_30d"] > 0 for p in patients)

    view = rpm_json(s, "clinician", "--as", "dr-lee", "patient", "pt-0001", "--days", "7")
    assert view["patient"]["patient_id"] == "pt-0001"
    assert {r["metric"] for r in view["latest"]} >= {"blood_pressure", "heart_rate"}

    refused = rpm(s, "clinician", "--as", "dr-lee", "patient", "pt-0002", check=False)
    assert refused.returncode == 4
    assert "not on the care team of patient pt-0002" in refused.stderr and "pt-0002" not in refused.stdout
    # --as names whom the caller expects to be, it proves nothing: the session decides, and reads nothing else.
    claimed = rpm(s, "clinician", "--as", "dr-okafor", "patients", check=False)
    assert claimed.returncode == 4 and "logged in as dr-lee, not dr-okafor" in claimed.stderr
    assert claimed.stdout == ""

    records = rpm_json(s, "audit", "show", "--last", "10")
    reads = [(r["actor"], r["action"], r["patients"], r["outcome"]) for r in records]
    assert ("dr-lee", "patients", ["pt-0001", "pt-0003"], "ok") in reads
    assert ("dr-lee", "patient", ["pt-0001"], "ok") in reads
    assert ("dr-lee", "patient", ["pt-0002"], "denied: not on care team") in reads
    assert not any(r["actor"] == "dr-okafor" for r in records)
    assert all(r["query"]["via"] == "api" for r in records if r["actor"] == "dr-lee" and r["action"] != "login")
    assert next(r for r in records if r["action"] == "patients")["rows"] == 2
    assert rpm_json(s, "audit", "verify")["ok"] is True


def test_alert_opens_once_is_acknowledged_and_resolves(fleet_loaded):
    s, passwords = fleet_loaded
    base = landed(s)
    publish_bp(s, passwords["bp-0001"], 186, 104, minutes_ago=4)
    publish_bp(s, passwords["bp-0001"], 192, 110, minutes_ago=3)  # same episode, not a second alert
    wait_until(lambda: landed(s) >= base + 2, 20, what="ingest to land the readings")
    run_pipeline_in_process(s)
    alerts = rpm_json(s, "clinician", "--as", "dr-lee", "alerts")
    # One BP alert for pt-0001, at the severe level: opened by these readings, or the open stage-2 episode of
    # its simulated hypertension escalated in place — never a second alert beside it.
    bp = [a for a in alerts if a["patient_id"] == "pt-0001" and a["rule"] in ("bp_severe", "bp_stage2")]
    severe = [a for a in bp if a["rule"] == "bp_severe"]
    assert len(bp) == len(severe) == 1 and severe[0]["breaches"] >= 2
    assert (severe[0]["escalated_at"] is None) == (severe[0]["opened_rule"] == "bp_severe")
    assert alerts[0]["severity"] == 1  # most severe first
    login_as(s, "dr-okafor")
    assert "bp_severe" not in {a["rule"] for a in rpm_json(s, "clinician", "--as", "dr-okafor", "alerts")}
    refused = rpm(s, "clinician", "ack", severe[0]["alert_id"], check=False)
    assert refused.returncode == 4 and "not on the care team" in refused.stderr

    login_as(s, "dr-lee")
    ack = rpm_json(s, "clinician", "--as", "dr-lee", "ack", severe[0]["alert_id"], "--note", "called patient")
    assert ack["patient_id"] == "pt-0001"
    still_open = {a["alert_id"]: a for a in rpm_json(s, "clinician", "--as", "dr-lee", "alerts")}
    assert still_open[severe[0]["alert_id"]]["acknowledged_by"] == "dr-lee"

    publish_bp(s, passwords["bp-0001"], 128, 82, minutes_ago=1)
    wait_until(lambda: landed(s) >= base + 3, 20, what="ingest to land the reading")
    run_pipeline_in_process(s)
    open_now = {a["alert_id"] for a in rpm_json(s, "clinician", "--as", "dr-lee", "alerts")}
    assert severe[0]["alert_id"] not in open_now  # back in range: resolved
    resolved = {a["alert_id"]: a for a in rpm_json(s, "clinician", "alerts", "--status", "resolved")}
    assert resolved[severe[0]["alert_id"]]["resolution"] == "back in range"


def test_billing_time_log_and_fhir_export(fleet_loaded, tmp_path):
    s, _ = fleet_loaded
    rpm(s, "clinician", "--as", "dr-lee", "log-time", "22", "--patient", "pt-0003", "--interactive")
    csv_path = tmp_path / "billing.csv"
    rows = {r["patient_id"]: r for r in rpm_json(s, "clinician", "--as", "dr-lee", "billing", "--csv",
                                                  str(csv_path))}
    assert set(rows) == {"pt-0001", "pt-0003"}
    assert rows["pt-0003"]["management_codes"] == ["99457"]
    assert rows["pt-0003"]["days_with_data"] >= 2 and rows["pt-0003"]["device_codes"] == ["99445"]
    assert "pt-0003" in csv_path.read_text()

    out = tmp_path / "pt-0001.json"
    result = rpm_json(s, "clinician", "--as", "dr-lee", "export-fhir", "pt-0001", "--out", str(out))
    bundle = json.loads(out.read_text())
    assert bundle["resourceType"] == "Bundle" and result["observations"] == len(bundle["entry"]) > 0
    codes = {e["resource"]["code"]["coding"][0]["code"] for e in bundle["entry"]}
    assert "85354-9" in codes
    assert all(e["resource"]["subject"]["reference"] == "Patient/pt-0001" for e in bundle["entry"])


def refused_by_the_service(s: Settings) -> None:
    """A read that cannot be audited is not served: the service answers 503, the CLI one line and exit 5."""
    for args in (("patients",), ("patient", "pt-0001")):
        refused = rpm(s, "clinician", *args, check=False)
        assert refused.returncode == 5 and refused.stdout == "", refused.stderr
        assert refused.stderr.startswith("error: ") and len(refused.stderr.splitlines()) == 1
        assert "audit log" in refused.stderr and "pt-0001" not in refused.stderr


def test_tampering_with_the_audit_log_is_detected(fleet_loaded):
    s, _ = fleet_loaded
    for _ in range(4):
        rpm(s, "clinician", "--as", "dr-lee", "patients")
    healthy = json.loads(rpm(s, "ops", "status", "--json", check=False).stdout)
    assert not any("audit log" in r for r in healthy["reasons"]), healthy["reasons"]
    log = s.home / "audit" / "audit.log"
    lines = log.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 4
    # One record deleted from the middle, the tail and the head untouched (`sed -i '2d'`): the service has read
    # the log since it started, so only what changed is checked again — and refused.
    log.write_bytes(b"".join(lines[:1] + lines[2:]))
    result = rpm(s, "audit", "verify", check=False)
    assert result.returncode == 5 and "TAMPERED" in result.stdout
    refused_by_the_service(s)
    ops = rpm(s, "ops", "status", "--json", check=False)
    assert ops.returncode == 2 and json.loads(ops.stdout)["verdict"] == "failing"
    assert any(r.startswith("audit log: line 2") for r in json.loads(ops.stdout)["reasons"]), ops.stdout
    log.write_bytes(b"".join(lines[:-1]))  # drop the newest record
    assert rpm(s, "audit", "verify", check=False).returncode == 5
    refused_by_the_service(s)
    log.write_bytes(b"".join(lines))
    assert rpm(s, "audit", "verify").returncode == 0
    # The log reads clean again, but the service saw it tampered with: it keeps refusing until it is restarted
    # (after the investigation), and then serves again.
    refused_by_the_service(s)
    procs.stop(s, SERVICE)
    start_service(s)
    assert rpm_json(s, "clinician", "--as", "dr-lee", "patients")
    assert rpm_json(s, "audit", "verify")["ok"] is True


def test_key_rotation_re_encrypts_everything_and_loses_nothing(fleet_loaded):
    s, passwords = fleet_loaded
    backup = Path(rpm_json(s, "backup")["backup"])
    before = rpm_json(s, "accounting")
    old_landing = set(Keyring.load(s, "landing").keys)
    old_warehouse_key = s.warehouse_key_file.read_text().strip()

    # At rest, before and after rotation: no MRN, name or patient id in any landing segment, the clinical
    # file, a serving snapshot or a backup.
    with serving(s) as con:
        people = con.execute("SELECT patient_id, mrn, given_name, family_name FROM patients").fetchall()
    # Ciphertext is random bytes, so a short needle can match it by chance (base64 text even more so):
    # encrypted pages and landing headers are searched for needles of 6+ characters, landing blocks for all.
    needles = {v.encode() for row in people for v in row if v and len(v) >= 4}
    long_needles = {n for n in needles if len(n) >= 6}
    assert long_needles

    def plaintext_hits() -> list[str]:
        stores = [s.clinical_db, *serving_dir(s).glob("*.duckdb"), *backups_dir(s).glob("*.duckdb")]
        segments = list_sealed(s.landing_dir)
        assert len(stores) >= 3 and segments
        hits = [f"{f.name}: {n!r}" for f in stores for n in long_needles if n in f.read_bytes()]
        for seg in segments:
            data = seg.read_bytes()
            head = 12 + int.from_bytes(data[8:12], "little")  # magic, version, header length, header
            hits += [f"{seg.name}: {n!r}" for n in needles if n in data[head:] or (len(n) >= 6 and n in data[:head])]
        return hits

    assert plaintext_hits() == []

    result = rpm_json(s, "keys", "rotate")
    assert result["warehouse"]["backups"] == 1
    assert plaintext_hits() == []
    assert result["landing"]["segments_reencrypted"] == len(list_sealed(s.landing_dir))
    assert set(result["retired"]) == old_landing
    assert rpm_json(s, "accounting") == before
    assert rpm_json(s, "audit", "verify")["ok"] is True

    # Old keys open nothing any more; new ones open everything.
    ring = Keyring.load(s, "landing")
    assert not (set(ring.keys) & old_landing)
    segment = list_sealed(s.landing_dir)[0]
    assert list(read_segment(segment, ring))
    old_kid = next(iter(old_landing))
    stale = Keyring(s.home / "unused.json", old_kid, {old_kid: bytes(32)})
    with pytest.raises(DecryptError):
        list(read_segment(segment, stale))
    assert segment_key_ids(segment) == {ring.active}
    con = duckdb.connect()
    con.execute(f"LOAD '{httpfs_extension()}'")
    for old_file in (s.clinical_db, backup, *serving_dir(s).glob("*.duckdb")):
        with pytest.raises(duckdb.Error):
            con.execute(f"ATTACH '{old_file}' AS c (ENCRYPTION_KEY '{old_warehouse_key}', READ_ONLY)")
    new_key = s.warehouse_key_file.read_text().strip()
    con.execute(f"ATTACH '{backup}' AS b (ENCRYPTION_KEY '{new_key}', READ_ONLY)")
    assert con.execute("SELECT count(*) FROM b.readings").fetchone() == (before["loaded_by_stream"]["readings"],)

    # The running ingest service switched keys: new readings still flow end to end.
    base = landed(s)
    publish_bp(s, passwords["bp-0001"], 131, 84, minutes_ago=2)
    wait_until(lambda: landed(s) >= base + 1, 10, what="landing after rotation")
    run_pipeline_in_process(s)
    after = rpm_json(s, "accounting")
    assert after["loaded"] == before["loaded"] + 1 and after["balanced"]


def test_secrets_never_reach_logs_or_reports(fleet_loaded):
    """Passwords and keys live in secrets/ only: scan every log, report and status file the stack wrote."""
    s, passwords = fleet_loaded
    rpm(s, "clinician", "--as", "dr-lee", "patients")
    rpm(s, "keys", "rotate")  # rotation must not log the keys it handles either
    secrets_dir = s.secrets_dir
    secrets = set(passwords.values())
    for path in secrets_dir.iterdir():  # type: ignore[union-attr]
        if path.suffix in (".key", ".password") or path.name.endswith(".secret"):
            secrets.add(path.read_text().strip())
        elif path.name.endswith("keyring.json"):
            secrets.update(json.loads(path.read_text())["keys"].values())
    secrets = {x for x in secrets if len(x) >= 16}
    assert len(secrets) > len(passwords)  # device passwords plus every key and service password
    scanned = 0
    for root in (s.run_dir, s.airflow_home, s.home / "reports", s.home / "audit"):
        for path in root.rglob("*"):  # type: ignore[union-attr]
            if path.is_file() and "simple_auth_manager_passwords" not in path.name:
                data = path.read_bytes()
                scanned += 1
                leaked = [x[:6] + "…" for x in secrets if x.encode() in data]
                assert not leaked, f"{path} contains secret(s) {leaked}"
    assert scanned > 5
