"""The clinician service in-process (Starlette's TestClient over https://testserver, nothing started): what the
hostile review found an administrator, an auditor, a cross-site page or an unexpected error could get.

F1 an admin's registry change answers without PHI; F2 the auditor's view redacts identifying values;
F4 the login form refuses a post without its pre-session token; F9 an unexpected error still carries the
security headers and leaks nothing; F12 a name that is no account is not recorded as typed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pyotp
import pytest
from fastapi.testclient import TestClient

from core.settings import Settings
from service.accounts import Accounts
from service.app import create_app
from service.redact import REDACTED, changed_fields, redact
from service.web import LOGIN_COOKIE
from warehouse import admin
from warehouse.audit import AuditLog

PASSWORD = "correct horse battery staple"
PATIENT = {"mrn": "MRN7007919", "given_name": "Jamesina", "family_name": "Iyerova", "birth_date": None,
           "time_zone": "America/Chicago", "conditions": ["diabetes"]}
PHI = ("MRN7007919", "Jamesina", "Iyerova", "diabetes")


@dataclass
class Service:
    s: Settings
    accounts: Accounts
    admin_uri: str

    def client(self) -> TestClient:
        return TestClient(create_app(self.s, self.accounts), base_url="https://testserver",
                          raise_server_exceptions=False)

    def token(self, http: TestClient, username: str, totp: str | None = None) -> dict[str, str]:
        body = {"username": username, "password": PASSWORD, **({"totp": totp} if totp else {})}
        answer = http.post("/api/v1/session", json=body)
        assert answer.status_code == 200, answer.text
        return {"Authorization": f"Bearer {answer.json()['token']}"}

    def audit(self) -> list[dict]:
        return AuditLog(self.s).records()


@pytest.fixture
def service(settings: Settings) -> Iterator[Service]:
    accounts = Accounts(settings)
    accounts.add("dr-lee", "clinician", PASSWORD, clinician_id="dr-lee")
    accounts.add("audit-1", "auditor", PASSWORD)
    _, uri = accounts.add("ops-admin", "admin", PASSWORD)
    assert uri is not None
    admin.save_patient(settings, "os:test", "pt-0002", **PATIENT)
    yield Service(settings, accounts, uri)


def has_security_headers(response: httpx.Response) -> bool:
    h = response.headers
    return ("frame-ancestors 'none'" in h.get("content-security-policy", "") and h.get("cache-control") == "no-store"
            and h.get("strict-transport-security", "").startswith("max-age=") and h.get("x-frame-options") == "DENY")


# --- F1: an administrator reads no PHI ----------------------------------------------------------------------
def test_an_admins_registry_changes_answer_with_ids_and_changed_fields_never_stored_values(service):
    with service.client() as http:
        admin_h = service.token(http, "ops-admin", pyotp.parse_uri(service.admin_uri).now())
        empty = http.put("/api/v1/admin/patients/pt-0002", headers=admin_h, json={})
        assert empty.status_code == 422 and not any(v in empty.text for v in PHI)
        renamed = http.put("/api/v1/admin/patients/pt-0002", headers=admin_h, json={"given_name": "Jamie"})
        assert renamed.status_code == 200
        assert renamed.json() == {"patient_id": "pt-0002", "created": False, "changed": ["given_name"]}
        same = http.put("/api/v1/admin/patients/pt-0002", headers=admin_h, json={"time_zone": "America/Chicago"})
        assert same.json() == {"patient_id": "pt-0002", "created": False, "changed": []}
        new = http.put("/api/v1/admin/patients/pt-0009", headers=admin_h, json={"mrn": "MRN1", "given_name": "Al"})
        assert new.json() == {"patient_id": "pt-0009", "created": True, "changed": ["given_name", "mrn"]}
        threshold = http.put("/api/v1/admin/patients/pt-0002/thresholds/bp_severe.systolic", headers=admin_h,
                             json={"value": 175})
        assert threshold.json() == {"patient_id": "pt-0002", "rule": "bp_severe.systolic", "value": 175,
                                    "created": True, "changed": ["value"]}
        admin.enroll_device(service.s, "os:test", "bp-0002", "pt-0002", kind="blood_pressure")
        moved = http.put("/api/v1/admin/devices/bp-0002", headers=admin_h, json={"patient_id": "pt-0009"})
        assert moved.status_code == 200 and "before" not in moved.json() and "after" not in moved.json()
        assert moved.json()["patient_id"] == "pt-0009" and "patient_id" in moved.json()["changed"]
        zone = http.put("/api/v1/admin/patients/pt-0002", headers=admin_h, json={"time_zone": "Mars/Olympus"})
        assert zone.status_code == 422 and "time_zone" in zone.json()["detail"]
        for answer in (renamed, same, new, threshold, moved):
            assert not any(v in answer.text for v in PHI), answer.text
    # The audit record keeps the values before and after (for an investigation with the keys).
    change = next(r for r in service.audit() if r["action"] == "registry:patient"
                  and r["patients"] == ["pt-0002"] and r["query"]["after"]["given_name"] == "Jamie")
    assert change["actor"] == "ops-admin" and change["query"]["before"]["given_name"] == "Jamesina"


# --- F2: the auditor sees who did what to which patient id, not the identifying values ----------------------
def test_redact_hides_identifying_values_at_any_depth_and_says_which_fields_changed():
    query = {"before": {"patient_id": "p1", "mrn": "M1", "given_name": "A", "birth_date": "1946-06-19",
                        "time_zone": "UTC", "conditions": ["copd"]},
             "after": {"patient_id": "p1", "mrn": "M1", "given_name": "B", "birth_date": "1946-06-19",
                       "time_zone": "UTC", "conditions": ["copd", "diabetes"]},
             "nested": [{"note": "called her daughter"}], "via": "api", "ack_note": None}
    shown = redact(query)
    assert shown["before"] == {"patient_id": "p1", "mrn": REDACTED, "given_name": REDACTED,
                               "birth_date": REDACTED, "time_zone": "UTC", "conditions": REDACTED}
    assert shown["changed"] == ["conditions", "given_name"] and shown["nested"] == [{"note": REDACTED}]
    assert (shown["via"], shown["ack_note"]) == ("api", None)
    assert redact({"before": None, "after": {"patient_id": "p1", "mrn": "M"}})["changed"] == ["mrn", "patient_id"]
    assert changed_fields(None, {"patient_id": "p1", "mrn": "M", "given_name": None}, ignore=("patient_id",)) == ["mrn"]
    assert query["before"]["mrn"] == "M1"  # the record itself is untouched


def test_the_auditor_reads_registry_changes_without_names_mrn_birth_dates_or_conditions(service):
    with service.client() as http:
        auditor = service.token(http, "audit-1")
        log = http.get("/api/v1/audit", headers=auditor, params={"action": "registry:patient"})
        assert log.status_code == 200 and log.json()["verify"]["ok"] is True
        record = log.json()["records"][0]
        assert record["actor"] == "os:test" and record["patients"] == ["pt-0002"]
        assert record["query"]["after"]["given_name"] == REDACTED and record["query"]["before"] is None
        assert set(record["query"]["changed"]) == {"patient_id", "mrn", "given_name", "family_name", "time_zone",
                                                   "conditions"}
        assert not any(v in log.text for v in PHI), log.text
        page = http.get("/login")
        token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        assert http.post("/login", data={"username": "audit-1", "password": PASSWORD, "login_token": token},
                         follow_redirects=False).status_code == 303
        audit_page = http.get("/audit", params={"action": "registry:patient"})
        assert audit_page.status_code == 200 and "pt-0002" in audit_page.text
        assert not any(v in audit_page.text for v in PHI)


# --- F4: login CSRF --------------------------------------------------------------------------------------------
def login_token(http: TestClient) -> str:
    page = http.get("/login")
    found = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert found and page.cookies.get(LOGIN_COOKIE) == found.group(1)
    cookie = page.headers["set-cookie"]
    assert all(a in cookie for a in (f"{LOGIN_COOKIE}=", "HttpOnly", "Path=/", "SameSite=strict", "Secure"))
    return found.group(1)


def test_the_login_form_refuses_a_post_without_its_pre_session_token(service):
    with service.client() as http:
        form = {"username": "dr-lee", "password": PASSWORD}
        cross_site = http.post("/login", data=form, headers={"Origin": "https://evil.example"},
                               follow_redirects=False)
        assert cross_site.status_code == 403 and "rpm_session" not in cross_site.headers.get("set-cookie", "")
        record = service.audit()[-1]
        assert (record["actor"], record["action"], record["outcome"]) == (
            "dr-lee", "login", "denied: missing or wrong login form token")
        assert has_security_headers(cross_site)
        with service.client() as other:  # another browser's token is no good either
            foreign = login_token(other)
        token = login_token(http)
        assert foreign != token
        assert http.post("/login", data={**form, "login_token": foreign}, follow_redirects=False).status_code == 403
        assert http.post("/login", data={**form, "login_token": "é" * 43}, follow_redirects=False).status_code == 403
        first = http.post("/login", data={**form, "login_token": token}, follow_redirects=False)
        assert first.status_code == 303 and first.headers["location"] == "/panel"
        old_session = http.cookies.get("rpm_session")
        assert old_session and service.accounts.session(old_session, "web", touch=False)
        # Logging in again from the same browser ends the session it held before.
        again = http.post("/login", data={**form, "login_token": login_token(http)}, follow_redirects=False)
        assert again.status_code == 303 and service.accounts.session(old_session, "web", touch=False) is None


# --- F12: a password typed into the name field --------------------------------------------------------------
def test_a_name_that_is_no_account_is_recorded_as_unknown_account_with_a_keyed_tag(service):
    with service.client() as http:
        for name in ("Sup3r-Secret.Pass", "Sup3r-Secret.Pass", "someone-else", "dr-lee"):
            answer = http.post("/api/v1/session", json={"username": name, "password": "dr-lee-oops-12"})
            assert answer.status_code == 401
    attempts = [r for r in service.audit() if r["action"] == "login"][-4:]
    assert "Sup3r-Secret" not in json.dumps(attempts) and "someone-else" not in json.dumps(attempts)
    assert [(r["actor"], r["outcome"]) for r in attempts] == [
        ("unknown-account", "denied: unknown account")] * 3 + [("dr-lee", "denied: wrong password")]
    tags = [r["query"].get("name_tag") for r in attempts]
    assert tags[0] == tags[1] != tags[2] and tags[0] and tags[3] is None


# --- F9: an unexpected error --------------------------------------------------------------------------------
def test_an_unexpected_error_is_a_generic_500_with_the_security_headers_and_no_detail(service, monkeypatch,
                                                                                      caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("Jamesina Iyerova MRN7007919")

    with service.client() as http:
        headers = service.token(http, "dr-lee")
        monkeypatch.setattr(Accounts, "session", broken)
        with caplog.at_level(logging.INFO, logger="rpm.service"):
            api = http.get("/api/v1/session", headers=headers)
            page = http.get("/panel", cookies={"rpm_session": "anything"})
    assert api.status_code == page.status_code == 500
    assert api.json() == {"detail": api.json()["detail"]} and "internal error" in api.json()["detail"]
    assert "text/html" in page.headers["content-type"]
    for answer in (api, page):
        assert has_security_headers(answer), dict(answer.headers)
        assert not any(v in answer.text for v in PHI)
    assert "RuntimeError at" in caplog.text and not any(v in caplog.text for v in PHI)


def test_a_broken_account_store_is_a_503_with_the_security_headers(service):
    with service.client() as http:
        service.accounts.path.write_bytes(b"\x00garbage" * 2048)
        for suffix in ("-wal", "-shm"):
            service.accounts.path.with_name(service.accounts.path.name + suffix).unlink(missing_ok=True)
        answer = http.post("/api/v1/session", json={"username": "dr-lee", "password": PASSWORD})
    assert answer.status_code == 503 and answer.headers["retry-after"] and has_security_headers(answer)
