"""The clinician service's JSON API, over real HTTPS from `rpm up`, on data that went through the real broker,
ingest and the pipeline's tasks: authentication, care-team scope, roles, audit with the authenticated actor,
and the refusals an attacker meets."""

from __future__ import annotations

import json
import sqlite3
import ssl
import threading
import time
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import pyotp
import pytest

from core.settings import Settings
from pipeline import tasks
from rpmctl import services
from rpmctl.services.airflow_run import seal_open_segments
from rpmctl.tools.publish import DevicePublisher, wait_until
from rpmctl.tools.simulator import build_fleet, provision_fleet, publish_fleet
from service.accounts import Accounts
from service.server import url
from tests.conftest import fresh_settings
from warehouse.audit import AuditLog

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("service-api")]

PASSWORD = "correct horse battery staple"
ISSUE_ROUTES = {("post", "/api/v1/session"), ("get", "/api/v1/patients"), ("get", "/api/v1/patients/{patient_id}"),
                ("get", "/api/v1/alerts"), ("post", "/api/v1/alerts/{alert_id}/ack"), ("get", "/api/v1/billing"),
                ("get", "/api/v1/billing/{patient_id}/evidence"), ("post", "/api/v1/time-entries")}


def landed(s: Settings) -> int:
    return (services.ingest_status(s) or {}).get("landed", 0)


def run_pipeline_tasks(s: Settings) -> None:
    """The DAG's tasks in order, in this process (Airflow's own runs are tested in test_end_to_end)."""
    seal_open_segments(s)
    batch = tasks.claim(s)  # every later task takes the claim's batch, as the DAG wires them
    tasks.decode_normalise(batch, s)
    tasks.validate(batch, s)
    tasks.load(batch, f"api-test-{time.monotonic_ns()}", s)
    tasks.evaluate_alerts(s)
    tasks.publish_snapshot(s)


@pytest.fixture(scope="module")
def stack():
    """4 patients x 3 days (dr-lee: pt-0001, pt-0003; dr-okafor: pt-0002, pt-0004), a severe BP for pt-0001,
    and one account per role."""
    with fresh_settings() as s:
        services.up(s)
        fleet = build_fleet(patients=4, days=3, seed=5)
        provision_fleet(s, fleet, days=3)
        sent = publish_fleet(s, fleet)
        password = next(d.password for d in fleet.devices if d.device_id == "bp-0001")
        with DevicePublisher(s, "bp-0001", password) as pub:
            pub.publish(json.dumps({"msg_id": "severe-1", "metric": "blood_pressure", "unit": "mm[Hg]",
                                    "measured_at": (datetime.now(UTC) - timedelta(minutes=5)).isoformat(),
                                    "values": {"systolic": 188, "diastolic": 112}}).encode())
            pub.wait_all()
        wait_until(lambda: landed(s) >= sent["published"] + 1, 30, what="ingest to land the fleet")
        run_pipeline_tasks(s)
        accounts = Accounts(s)
        accounts.add("dr-lee", "clinician", PASSWORD, clinician_id="dr-lee")
        _, okafor_uri = accounts.add("dr-okafor", "clinician", PASSWORD, clinician_id="dr-okafor", totp=True)
        accounts.add("audit-1", "auditor", PASSWORD)
        _, admin_uri = accounts.add("ops-admin", "admin", PASSWORD)
        yield s, {"dr-okafor": okafor_uri, "ops-admin": admin_uri}
        services.down(s)


@pytest.fixture(scope="module")
def http(stack):
    s, _ = stack
    with httpx.Client(base_url=url(s), verify=ssl.create_default_context(cafile=str(s.ca_cert)),
                      timeout=60) as client:
        yield client


def token(http: httpx.Client, username: str, totp_uri: str | None = None) -> dict[str, str]:
    body = {"username": username, "password": PASSWORD}
    if totp_uri:
        totp = pyotp.parse_uri(totp_uri)
        code = totp.now()
        body["totp"] = code
    answer = http.post("/api/v1/session", json=body)
    if answer.status_code == 401 and totp_uri:  # this code was used by an earlier login: take the next one
        wait_until(lambda: pyotp.parse_uri(totp_uri).now() != body["totp"], 31, what="the next TOTP step")
        answer = http.post("/api/v1/session", json={**body, "totp": pyotp.parse_uri(totp_uri).now()})
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['token']}"}


def audit_tail(s: Settings, n: int = 20) -> list[dict]:
    return AuditLog(s).records()[-n:]


def test_the_openapi_document_lists_the_routes_and_every_response_carries_the_security_headers(http):
    spec = http.get("/api/v1/openapi.json")
    assert spec.status_code == 200
    routes = {(m, p) for p, ops in spec.json()["paths"].items() for m in ops}
    assert ISSUE_ROUTES <= routes
    for response in (spec, http.get("/api/v1/patients"), http.get("/login")):
        h = response.headers
        assert "frame-ancestors 'none'" in h["content-security-policy"] and "'unsafe-inline'" not in h[
            "content-security-policy"]
        assert h["strict-transport-security"].startswith("max-age=") and h["x-frame-options"] == "DENY"
        assert h["cache-control"] == "no-store" and h["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["/api/v1/patients", "/api/v1/patients/pt-0001", "/api/v1/alerts",
                                  "/api/v1/billing", "/api/v1/billing/pt-0001/evidence", "/api/v1/audit"])
def test_without_a_valid_token_every_route_answers_401_and_nothing_else(http, path):
    for headers in ({}, {"Authorization": "Bearer forged-token"}, {"Authorization": "Basic ZHItbGVlOng="}):
        answer = http.get(path, headers=headers)
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
        assert "pt-0001" not in answer.text.replace(path, "")


def test_a_wrong_password_and_an_unknown_name_get_the_same_answer_and_are_audited(stack, http):
    s, _ = stack
    wrong = http.post("/api/v1/session", json={"username": "dr-lee", "password": "not the password"})
    unknown = http.post("/api/v1/session", json={"username": "dr-ghost", "password": "not the password"})
    assert wrong.status_code == unknown.status_code == 401 and wrong.json() == unknown.json()
    logins = [(r["actor"], r["outcome"]) for r in audit_tail(s, 5) if r["action"] == "login"]
    assert ("dr-lee", "denied: wrong password") in logins
    # A name that is no account (often a password in the wrong field) is not recorded as typed.
    assert ("unknown-account", "denied: unknown account") in logins
    assert "dr-ghost" not in json.dumps(audit_tail(s, 5))


def test_a_flood_of_anonymous_logins_does_not_stall_a_logged_in_clinician(stack, http):
    """Hostile review F3: the password check holds no lock on the accounts file, so a logged-in clinician's
    requests are all answered while anonymous logins pour in (each answered 401, or 503 when busy)."""
    lee = token(http, "dr-lee")
    flood: list[int] = []

    def ghost() -> None:
        with httpx.Client(base_url=str(http.base_url), verify=ssl.create_default_context(
                cafile=str(stack[0].ca_cert)), timeout=60) as own:
            for _ in range(2):
                flood.append(own.post("/api/v1/session", json={"username": "ghost",
                                                               "password": "xxxxxxxxxxxx"}).status_code)

    threads = [threading.Thread(target=ghost) for _ in range(16)]
    for thread in threads:
        thread.start()
    answers = []
    while any(thread.is_alive() for thread in threads):
        answers.append(http.get("/api/v1/session", headers=lee).status_code)
    for thread in threads:
        thread.join()
    assert answers and set(answers) == {200}
    assert len(flood) == 32 and set(flood) <= {401, 503}


def test_a_clinician_reads_only_their_care_team_and_a_refusal_is_audited(stack, http):
    s, _ = stack
    lee = token(http, "dr-lee")
    assert [p["patient_id"] for p in http.get("/api/v1/patients", headers=lee).json()] == ["pt-0001", "pt-0003"]
    view = http.get("/api/v1/patients/pt-0001", headers=lee, params={"days": 7}).json()
    assert view["patient"]["patient_id"] == "pt-0001" and view["latest"]
    refused = http.get("/api/v1/patients/pt-0002", headers=lee)
    assert refused.status_code == 403 and "pt-0002" in refused.json()["detail"]
    for path in ("/api/v1/billing/pt-0002/evidence", "/api/v1/alerts?patient_id=pt-0002",
                 "/api/v1/patients/pt-0002/fhir"):
        assert http.get(path, headers=lee).status_code == 403
    records = audit_tail(s, 8)
    assert ("dr-lee", "patient", ["pt-0001"], "ok", "api") in [
        (r["actor"], r["action"], r["patients"], r["outcome"], r["query"].get("via")) for r in records]
    denied = [r for r in records if r["outcome"] == "denied: not on care team"]
    assert {r["action"] for r in denied} == {"patient", "billing-evidence", "alerts", "export-fhir"}
    assert all(r["actor"] == "dr-lee" and r["patients"] == ["pt-0002"] for r in denied)


def test_alerts_are_acknowledged_by_the_care_team_only(stack, http):
    s, uris = stack
    lee = token(http, "dr-lee")
    open_alerts = http.get("/api/v1/alerts", headers=lee).json()
    severe = [a for a in open_alerts if a["rule"] == "bp_severe" and a["patient_id"] == "pt-0001"]
    assert len(severe) == 1 and open_alerts[0]["severity"] == 1
    assert http.get("/api/v1/alerts", headers=lee, params={"status": "bogus"}).status_code == 422
    okafor = token(http, "dr-okafor", uris["dr-okafor"])
    assert http.post(f"/api/v1/alerts/{severe[0]['alert_id']}/ack", headers=okafor, json={}).status_code == 403
    ack = http.post(f"/api/v1/alerts/{severe[0]['alert_id']}/ack", headers=lee, json={"note": "called"})
    assert ack.status_code == 200 and ack.json()["patient_id"] == "pt-0001"
    again = {a["alert_id"]: a for a in http.get("/api/v1/alerts", headers=lee).json()}
    assert again[severe[0]["alert_id"]]["acknowledged_by"] == "dr-lee"
    assert http.post("/api/v1/alerts/no-such-alert/ack", headers=lee, json={}).status_code == 404
    assert http.post(f"/api/v1/alerts/{severe[0]['alert_id']}/ack", headers=lee,
                     json={"note": "forged\nline"}).status_code == 422


def test_billing_evidence_shows_the_readings_behind_each_counted_day(stack, http):
    lee = token(http, "dr-lee")
    rows = {r["patient_id"]: r for r in http.get("/api/v1/billing", headers=lee).json()}
    assert set(rows) == {"pt-0001", "pt-0003"}
    evidence = http.get("/api/v1/billing/pt-0003/evidence", headers=lee).json()
    period = evidence["periods"][-1]
    assert len(period["days"]) == period["days_with_data"] == rows["pt-0003"]["days_with_data"] >= 2
    for day in period["days"]:
        assert day["readings"] and len(day["readings"]) == day["readings_count"]
        assert all({"measured_at", "metric", "value", "device_id"} <= set(r) for r in day["readings"])
    assert http.get("/api/v1/billing", headers=lee, params={"month": "2026-13"}).status_code == 422


def test_time_entries_can_be_back_dated_into_the_previous_month_only(stack, http):
    lee = token(http, "dr-lee")
    today = datetime.now(ZoneInfo("UTC")).date()
    last_month = (today.replace(day=1) - timedelta(days=1)).replace(day=5)
    too_old = (last_month.replace(day=1) - timedelta(days=1))

    def post(**body) -> httpx.Response:
        return http.post("/api/v1/time-entries", headers=lee,
                         json={"patient_id": "pt-0003", "minutes": 12, "interactive": True, **body})

    made = post(date=last_month.isoformat(), note="call about readings")
    assert made.status_code == 201 and made.json()["occurred_at"].startswith(last_month.isoformat())
    assert post().status_code == 201
    assert post(date=too_old.isoformat()).status_code == 422
    assert post(date=(today + timedelta(days=1)).isoformat()).status_code == 422
    assert post(minutes=0).status_code == 422 and post(minutes=1441).status_code == 422
    assert post(patient_id="pt-0002").status_code == 403
    assert post(patient_id="../../etc").status_code == 422
    minutes = {r["patient_id"]: r["management_minutes"] for r in http.get("/api/v1/billing", headers=lee).json()}
    assert minutes["pt-0003"] >= 12


def test_each_role_is_refused_the_others_routes_and_the_refusal_is_audited(stack, http):
    s, uris = stack
    auditor = token(http, "audit-1")
    lee = token(http, "dr-lee")
    assert http.get("/api/v1/patients", headers=auditor).status_code == 403
    assert http.get("/api/v1/audit", headers=lee).status_code == 403
    assert http.put("/api/v1/admin/care-team/dr-lee/pt-0002", headers=lee).status_code == 403
    denied = [(r["actor"], r["outcome"]) for r in audit_tail(s, 6) if r["outcome"].startswith("denied")]
    assert ("audit-1", "denied: role auditor may not patients") in denied
    assert ("dr-lee", "denied: role clinician may not registry:care team add") in denied

    log = http.get("/api/v1/audit", headers=auditor, params={"actor": "dr-lee", "outcome": "denied"}).json()
    assert log["verify"]["ok"] is True and log["records"]
    assert all(r["actor"] == "dr-lee" and r["outcome"].startswith("denied") for r in log["records"])
    assert audit_tail(s, 1)[0]["action"] == "audit-read"  # reading the log is itself recorded


def test_an_admin_changes_the_registry_with_a_second_factor_and_every_change_is_audited(stack, http):
    s, uris = stack
    assert http.post("/api/v1/session", json={"username": "ops-admin", "password": PASSWORD}).status_code == 401
    admin = token(http, "ops-admin", uris["ops-admin"])
    okafor = token(http, "dr-okafor", uris["dr-okafor"])
    assert http.get("/api/v1/patients/pt-0001", headers=okafor).status_code == 403
    assert http.put("/api/v1/admin/care-team/dr-okafor/pt-0001", headers=admin).json()["added"] is True
    assert http.get("/api/v1/patients/pt-0001", headers=okafor).status_code == 200
    change = next(r for r in reversed(audit_tail(s)) if r["action"] == "registry:care-team-add")
    assert change["actor"] == "ops-admin" and change["patients"] == ["pt-0001"]
    assert change["query"]["on_care_team_before"] is False and change["query"]["on_care_team_after"] is True

    # Thresholds are bounded: a severe-BP threshold of 400 would silence the rule.
    silenced = http.put("/api/v1/admin/patients/pt-0001/thresholds/bp_severe.systolic", headers=admin,
                        json={"value": 400})
    assert silenced.status_code == 422 and "sensible range" in silenced.json()["detail"]
    ok = http.put("/api/v1/admin/patients/pt-0001/thresholds/bp_severe.systolic", headers=admin,
                  json={"value": 175})
    assert ok.status_code == 200 and ok.json()["value"] == 175 and ok.json()["changed"] == ["value"]
    change = audit_tail(s, 1)[0]
    assert (change["actor"], change["action"], change["query"]["before"], change["query"]["after"]) == (
        "ops-admin", "registry:threshold", None, 175)
    assert http.put("/api/v1/admin/devices/no-such-device", headers=admin,
                    json={"patient_id": "pt-0001"}).status_code == 404
    renamed = http.put("/api/v1/admin/patients/pt-0004", headers=admin, json={"given_name": "Alex\u202e"})
    assert renamed.status_code == 422  # a control character could forge a terminal line

    # An administrator reads no PHI: a change answers with which fields changed, never a stored value.
    assert http.put("/api/v1/admin/patients/pt-0002", headers=admin, json={}).status_code == 422
    renamed = http.put("/api/v1/admin/patients/pt-0002", headers=admin, json={"given_name": "Alexis"})
    assert renamed.json() == {"patient_id": "pt-0002", "created": False, "changed": ["given_name"]}
    stored = audit_tail(s, 1)[0]["query"]
    assert stored["after"]["given_name"] == "Alexis" and stored["before"]["family_name"]  # the log keeps them
    assert stored["before"]["family_name"] not in renamed.text and stored["after"]["mrn"] not in renamed.text
    auditor = token(http, "audit-1")
    seen = http.get("/api/v1/audit", headers=auditor, params={"action": "registry:patient", "limit": 1}).json()
    assert seen["records"][0]["query"]["after"]["given_name"] == "[redacted]"
    assert seen["records"][0]["query"]["changed"] == ["given_name"]
    assert stored["before"]["family_name"] not in json.dumps(seen)


def test_repeated_failures_lock_the_account_over_the_api(stack, http):
    s, _ = stack
    Accounts(s).add("dr-lock", "auditor", PASSWORD)
    for _ in range(s.login_max_failures):
        assert http.post("/api/v1/session", json={"username": "dr-lock", "password": "guess guess"}).status_code == 401
    assert http.post("/api/v1/session", json={"username": "dr-lock", "password": PASSWORD}).status_code == 401
    assert audit_tail(s, 1)[0]["outcome"] == "denied: account locked"


def test_a_session_ends_after_the_idle_limit(stack, http):
    s, _ = stack
    lee = token(http, "dr-lee")
    assert http.get("/api/v1/session", headers=lee).status_code == 200
    with sqlite3.connect(Accounts(s).path) as db:  # what 16 idle minutes do to the stored session
        db.execute("UPDATE sessions SET last_seen = last_seen - ? WHERE username = 'dr-lee'",
                   [(s.session_idle_minutes + 1) * 60])
    assert http.get("/api/v1/patients", headers=lee).status_code == 401


def test_logout_ends_the_token_and_oversized_bodies_are_refused(stack, http):
    lee = token(http, "dr-lee")
    assert http.post("/api/v1/time-entries", headers={**lee, "Content-Type": "application/json"},
                     content=b"{" + b" " * 70_000 + b"}").status_code == 413
    assert http.delete("/api/v1/session", headers=lee).status_code == 204
    assert http.get("/api/v1/patients", headers=lee).status_code == 401


def test_the_service_log_names_routes_and_accounts_never_patients(stack, http):
    s, _ = stack
    lee = token(http, "dr-lee")
    http.get("/api/v1/patients/pt-0003", headers=lee, params={"days": 3})
    log = (s.run_dir / "service.log").read_text()
    assert "GET /api/v1/patients/{patient_id} 200" in log
    assert "pt-000" not in log and "MRN" not in log and PASSWORD not in log
    assert lee["Authorization"].split()[1] not in log


def test_dates_in_answers_are_iso_8601(stack, http):
    lee = token(http, "dr-lee")
    patients = http.get("/api/v1/patients", headers=lee).json()
    assert datetime.fromisoformat(patients[0]["last_reading_at"]).tzinfo is not None
    assert date.fromisoformat(patients[0]["birth_date"])
