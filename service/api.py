"""The JSON API (``/api/v1``): the clinician's reads and writes for scripts and integrations, and the
administrator's registry changes — same care-team scope and audit as the dashboard.

Every call but ``POST /session`` needs ``Authorization: Bearer <token>``. Unauthenticated → 401; a patient
outside the caller's care team or a route outside their role → 403, audited.
"""

from __future__ import annotations

import datetime as dt
from datetime import date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field, StrictFloat, StrictInt

from core.ids import check_id
from service.accounts import UNKNOWN_ACCOUNT, Accounts, LoginFailed, TotpRequired
from service.auth import ApiSession, accounts, clinician_of, require_role, settings
from service.redact import changed_fields
from warehouse import admin
from warehouse.audit import AuditLog

router = APIRouter(prefix="/api/v1")

Id = Annotated[str, Field(min_length=1, max_length=64)]
Month = Annotated[str | None, Query(pattern=r"^\d{4}-(0[1-9]|1[0-2])$", description="YYYY-MM")]


def _id(kind: str, value: str) -> str:
    try:
        return check_id(kind, value)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


# --- session ---------------------------------------------------------------------------------------------------
class SessionRequest(BaseModel):
    username: Id
    password: Annotated[str, Field(min_length=1, max_length=256)]
    totp: Annotated[str | None, Field(max_length=16)] = None


class SessionToken(BaseModel):
    token: str
    expires_at: datetime
    username: str
    role: str
    idle_minutes: int


def login_actor(store: Accounts, username: str, known: bool) -> tuple[str, dict]:
    """Who a login attempt is recorded as: its account, or — for a name that is no account, often a password
    typed into the wrong field — ``unknown-account`` with a keyed tag of the name, never the name itself."""
    if known:
        return username, {}
    return UNKNOWN_ACCOUNT, {"name_tag": store.name_tag(username)}


def login(request: Request, username: str, password: str, totp: str | None, kind: str) -> tuple[str, Any]:
    """Authenticate and start a session; every attempt, right or wrong, is audited."""
    log = AuditLog(settings(request))
    store = accounts(request)
    try:
        user = store.authenticate(username, password, totp)
    except LoginFailed as exc:
        actor, tag = login_actor(store, username, exc.reason != "unknown account")
        log.append(actor, "login", [], {"via": kind, **tag}, 0, outcome=f"denied: {exc.reason}")
        raise
    token, session = store.start_session(user, kind)
    log.append(user.username, "login", [], {"via": kind, "role": user.role}, 0)
    request.state.user = user.username
    return token, session


@router.post("/session", response_model=SessionToken, tags=["session"],
             responses={401: {"description": "wrong name, password or TOTP code, or a locked account"}})
def create_session(request: Request, body: SessionRequest) -> SessionToken:
    """Log in: a bearer token for the other routes, valid until `session_idle_minutes` without a request."""
    try:
        token, session = login(request, body.username, body.password, body.totp, "api")
    except TotpRequired as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
    except LoginFailed as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
    return SessionToken(token=token, expires_at=datetime.fromtimestamp(session.expires_at).astimezone(),
                        username=session.username, role=session.role,
                        idle_minutes=settings(request).session_idle_minutes)


@router.get("/session", tags=["session"])
def current_session(session: ApiSession) -> dict:
    """Who this token belongs to, and when it expires if unused."""
    return {"username": session.username, "role": session.role, "clinician_id": session.clinician_id,
            "expires_at": datetime.fromtimestamp(session.expires_at).astimezone()}


@router.delete("/session", status_code=204, tags=["session"])
def end_session(request: Request, session: ApiSession) -> None:
    """Log out: the token stops working at once."""
    from service.auth import _bearer

    accounts(request).end_session(_bearer(request.headers.get("authorization")) or "")
    AuditLog(settings(request)).append(session.actor, "logout", [], {"via": "api"}, 0)


# --- clinician -------------------------------------------------------------------------------------------------
@router.get("/patients", tags=["clinician"])
def patients(request: Request, session: ApiSession) -> list[dict]:
    """Your care team's patients with their last reading and open alerts."""
    return clinician_of(request, session, "patients").patients()


@router.get("/patients/{patient_id}", tags=["clinician"])
def patient(request: Request, session: ApiSession, patient_id: str,
            days: Annotated[int, Query(ge=1, le=3660)] = 30) -> dict:
    """One patient: latest vitals, daily summaries, trends, open alerts, glucose metrics."""
    return clinician_of(request, session, "patient").patient(_id("patient", patient_id), days)


@router.get("/patients/{patient_id}/fhir", tags=["clinician"])
def patient_fhir(request: Request, session: ApiSession, patient_id: str,
                 days: Annotated[int | None, Query(ge=1, le=3660)] = None) -> dict:
    """A FHIR R4 Bundle of the patient's vital-signs Observations."""
    return clinician_of(request, session, "export-fhir").export_fhir(_id("patient", patient_id), days)


@router.get("/alerts", tags=["clinician"])
def alerts(request: Request, session: ApiSession,
           status: Annotated[str, Query(pattern="^(open|resolved|all)$")] = "open",
           patient_id: str | None = None) -> list[dict]:
    """Alerts of your care team: open ones most severe first; resolved ones with why they resolved."""
    return clinician_of(request, session, "alerts").alerts(
        status, _id("patient", patient_id) if patient_id else None)


class Ack(BaseModel):
    note: Annotated[str | None, Field(max_length=1000)] = None


@router.post("/alerts/{alert_id}/ack", tags=["clinician"])
def acknowledge(request: Request, session: ApiSession, alert_id: str, body: Ack | None = None) -> dict:
    """Acknowledge an alert: it stays open until readings return to range (audited)."""
    note = body.note if body else None
    if note is not None and not note.isprintable():
        raise HTTPException(422, "a note may not contain control characters")
    return clinician_of(request, session, "ack").acknowledge(_id("alert", alert_id), note)


@router.get("/billing", tags=["clinician"])
def billing(request: Request, session: ApiSession, month: Month = None) -> list[dict]:
    """RPM billing eligibility of your patients for a month (default: the practice's current month)."""
    return clinician_of(request, session, "billing").billing(month)


@router.get("/billing/{patient_id}/evidence", tags=["clinician"])
def billing_evidence(request: Request, session: ApiSession, patient_id: str, month: Month = None) -> dict:
    """The readings behind each day counted toward a device-supply code."""
    return clinician_of(request, session, "billing-evidence").billing_evidence(_id("patient", patient_id), month)


class TimeEntry(BaseModel):
    patient_id: Id
    minutes: Annotated[int, Field(ge=1, le=24 * 60)]
    interactive: bool = False
    date: dt.date | None = Field(None, description="back-date into this month or the previous one")
    note: Annotated[str | None, Field(max_length=1000)] = None


@router.post("/time-entries", status_code=201, tags=["clinician"])
def time_entry(request: Request, session: ApiSession, body: TimeEntry) -> dict:
    """Log treatment-management minutes for a patient (interactive: a real-time exchange with them)."""
    return clinician_of(request, session, "log-time").log_time(
        _id("patient", body.patient_id), body.minutes, body.interactive, body.note, on=body.date)


# --- auditor ---------------------------------------------------------------------------------------------------
@router.get("/audit", tags=["auditor"])
def audit(request: Request, session: ApiSession, actor: str | None = None, patient: str | None = None,
          outcome: Annotated[str | None, Query(pattern="^(ok|denied)$")] = None, action: str | None = None,
          limit: Annotated[int, Query(ge=1, le=10_000)] = 200) -> dict:
    """The audit log, newest first, filtered; with the verdict of its hash-chain verification."""
    require_role(request, session, "auditor", "read-audit-log")
    from service.auditor import read_audit

    return read_audit(settings(request), session.actor, "api", actor=actor, patient=patient, outcome=outcome,
                      action=action, limit=limit)


# --- administrator: registry changes, each audited with before and after ----------------------------------------
# An administrator reads no PHI: an answer names the ids and which fields changed, never a value that was
# stored (the audit record keeps before and after).
class PatientChange(BaseModel):
    mrn: Annotated[str | None, Field(max_length=64)] = None
    given_name: Annotated[str | None, Field(max_length=200)] = None
    family_name: Annotated[str | None, Field(max_length=200)] = None
    birth_date: date | None = None
    time_zone: Annotated[str | None, Field(max_length=64)] = None
    conditions: list[Annotated[str, Field(max_length=64)]] | None = None


def _admin(request: Request, session: ApiSession, action: str) -> str:
    require_role(request, session, "admin", action)
    return session.actor


@router.put("/admin/patients/{patient_id}", tags=["admin"])
def save_patient(request: Request, session: ApiSession, patient_id: str, body: PatientChange) -> dict:
    """Create or update a patient (fields left out keep their value): whether it was new, and which fields
    changed."""
    actor = _admin(request, session, "registry:patient")
    pid = _id("patient", patient_id)
    if not body.model_dump(exclude_none=True):
        raise HTTPException(422, "nothing to change: send at least one field")
    change = admin.save_patient(settings(request), actor, pid, **body.model_dump())
    return {"patient_id": pid, "created": change["before"] is None,
            "changed": changed_fields(change["before"], change["after"], ignore=("patient_id",))}


class Threshold(BaseModel):
    value: StrictFloat | StrictInt  # a number, not a string that looks like one


@router.put("/admin/patients/{patient_id}/thresholds/{rule}", tags=["admin"])
def set_threshold(request: Request, session: ApiSession, patient_id: str, rule: str, body: Threshold) -> dict:
    """Override one alert threshold for one patient, within its clinically sensible range (README)."""
    actor = _admin(request, session, "registry:threshold")
    change = admin.set_threshold(settings(request), actor, _id("patient", patient_id), rule, body.value)
    return {"patient_id": change["patient_id"], "rule": rule, "value": change["after"],
            "created": change["before"] is None, "changed": ["value"] if change["before"] != change["after"] else []}


@router.put("/admin/care-team/{clinician_id}/{patient_id}", tags=["admin"])
def assign(request: Request, session: ApiSession, clinician_id: str, patient_id: str) -> dict:
    """Put a clinician on a patient's care team."""
    actor = _admin(request, session, "registry:care-team-add")
    s = settings(request)
    return admin.assign(s, actor, _id("clinician", clinician_id), _id("patient", patient_id))


@router.delete("/admin/care-team/{clinician_id}/{patient_id}", tags=["admin"])
def unassign(request: Request, session: ApiSession, clinician_id: str, patient_id: str) -> dict:
    """Take a clinician off a patient's care team."""
    actor = _admin(request, session, "registry:care-team-remove")
    return admin.unassign(settings(request), actor, _id("clinician", clinician_id), _id("patient", patient_id))


class DeviceAssignment(BaseModel):
    patient_id: Id
    since: datetime | None = Field(None, description="RFC 3339 with offset; default now")


@router.put("/admin/devices/{device_id}", tags=["admin"])
def assign_device(request: Request, session: ApiSession, device_id: str, body: DeviceAssignment) -> dict:
    """Move an already provisioned device to a patient (provisioning a new one is `rpm devices add`)."""
    actor = _admin(request, session, "registry:device")
    if body.since is not None and body.since.tzinfo is None:
        raise HTTPException(422, "since needs a UTC offset, e.g. 2026-11-01T00:00:00+00:00")
    pid = _id("patient", body.patient_id)
    result = admin.enroll_device(settings(request), actor, _id("device", device_id), pid, since=body.since,
                                 must_exist=True)
    return {"device_id": device_id, "patient_id": pid, "changed": changed_fields(result["before"], result["after"])}

