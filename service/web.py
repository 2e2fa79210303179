"""The dashboard: server-rendered pages for clinicians (panel, patient), auditors (audit log) — and the
login that opens a session for them.

Pages read through the same care-team-scoped, audited ``ClinicianSession`` as the API. Their session lives
in a ``Secure; HttpOnly; SameSite=Strict`` cookie; every form carries the session's CSRF token — the login
form too, before there is a session: a random token in a ``__Host-`` cookie and the same value in the form
(double submit), so a page on another site cannot log a browser into an account of its choosing.
"""

from __future__ import annotations

import logging
import re
import secrets
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit
from zoneinfo import ZoneInfo

from fastapi import APIRouter, FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from core.ids import check_id
from service import charts
from service.accounts import LoginFailed, Session, TotpRequired
from service.api import login, login_actor
from service.auth import COOKIE, WebSession, accounts, check_csrf, clinician_of, require_role, settings
from service.panel import CATEGORIES, GROUPS, SORTS, build_panel, counts
from warehouse.audit import AuditLog

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")  # autoescaped: a stored string cannot become markup
router = APIRouter(include_in_schema=False)

HOME = {"clinician": "/panel", "auditor": "/audit", "admin": "/account"}
# __Host-: set only by this host, over HTTPS, for every path — a neighbouring host cannot plant a known value.
LOGIN_COOKIE = "__Host-rpm_login"
LOGIN_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)

log = logging.getLogger("rpm.service")


def mount_static(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")


def render(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status)


def error_page(request: Request, status: int, detail: str) -> Response:
    return render(request, "error.html", status=status, status_code=status, detail=detail,
                  session=None)


def _safe_next(target: str | None, fallback: str) -> str:
    """Only a path of this site (no scheme, no host, no //evil.example): no open redirect after login."""
    if not target:
        return fallback
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return fallback
    return target


def _login_form(request: Request, status: int = 200, *, next: str | None = None, expired: bool = False,
                error: str | None = None, need_totp: bool = False, username: str = "") -> Response:
    """The login page, with its pre-session token in the form and in the cookie (kept while the browser has a
    well-formed one: two tabs of the login page both work)."""
    token = request.cookies.get(LOGIN_COOKIE) or ""
    if not LOGIN_TOKEN.fullmatch(token):
        token = secrets.token_urlsafe(32)
    response = render(request, "login.html", status=status, next=_safe_next(next, ""), expired=expired,
                      error=error, need_totp=need_totp, username=username, login_token=token, session=None)
    response.set_cookie(LOGIN_COOKIE, token, secure=True, httponly=True, samesite="strict", path="/")
    return response


def _same_token(cookie: str | None, submitted: str | None) -> bool:
    if not cookie or not submitted:
        return False
    return secrets.compare_digest(cookie.encode(), submitted.encode())


@router.get("/login")
def login_form(request: Request, next: str | None = None, expired: str | None = None) -> Response:
    return _login_form(request, next=next, expired=bool(expired))


@router.post("/login")
def login_submit(request: Request, username: Annotated[str, Form(max_length=64)],
                 password: Annotated[str, Form(max_length=256)],
                 totp: Annotated[str | None, Form(max_length=16)] = None,
                 next: Annotated[str | None, Form(max_length=2048)] = None,
                 login_token: Annotated[str | None, Form(max_length=128)] = None) -> Response:
    if not _same_token(request.cookies.get(LOGIN_COOKIE), login_token):
        # A post from another site (login CSRF) or a form older than the browser's cookie: no password checked.
        store = accounts(request)
        actor, tag = login_actor(store, username, store.exists(username))
        AuditLog(settings(request)).append(actor, "login", [], {"via": "web", **tag}, 0,
                                           outcome="denied: missing or wrong login form token")
        log.warning("login refused: the form did not carry this browser's login token")
        return _login_form(request, 403, next=next, error="This login form expired or did not come from this "
                                                          "site: log in again.")
    try:
        token, session = login(request, username, password, totp or None, "web")
    except TotpRequired as exc:
        return _login_form(request, 401, next=next, error=str(exc), need_totp=True, username=username)
    except LoginFailed as exc:
        return _login_form(request, 401, next=next, error=str(exc), need_totp=bool(totp), username=username)
    previous = request.cookies.get(COOKIE)
    if previous:  # the session this browser held before (another account's, maybe) ends here
        accounts(request).end_session(previous)
    response = RedirectResponse(_safe_next(next, HOME.get(session.role, "/")), status_code=303)
    response.set_cookie(COOKIE, token, secure=True, httponly=True, samesite="strict", path="/")
    response.delete_cookie(LOGIN_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


@router.post("/logout")
def logout(request: Request, session: WebSession, csrf: Annotated[str | None, Form()] = None) -> Response:
    check_csrf(session, csrf)
    accounts(request).end_session(request.cookies.get(COOKIE, ""))
    AuditLog(settings(request)).append(session.actor, "logout", [], {"via": "web"}, 0)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


@router.get("/")
def home(session: WebSession) -> Response:
    return RedirectResponse(HOME.get(session.role, "/account"), status_code=303)


@router.get("/account")
def account(request: Request, session: WebSession) -> Response:
    """Who is logged in, and what their role gives them (an administrator's changes go through the API)."""
    return render(request, "account.html", session=session)




# --- what the pages show dates, values and people as ---------------------------------------------------------
METRIC_ORDER = ("blood_pressure", "heart_rate", "blood_glucose", "spo2", "respiratory_rate", "body_temperature",
                "body_weight")
PATIENT_DAYS = 30        # the patient page's charts and daily values
PROFILE_DAYS = 14        # the glucose profile's window (the consensus report's)
FORM_TEXT = 1000         # a note's longest


RULE_LABELS = {
    "bp_severe": "Severe BP", "bp_stage2": "Stage 2 BP", "glucose_level2_low": "Very low glucose",
    "glucose_level1_low": "Low glucose", "glucose_level2_high": "Very high glucose", "spo2_urgent": "SpO\u2082 < 88",
    "spo2_low": "SpO\u2082 < 92", "fever": "Fever", "hr_low": "Low heart rate", "hr_high": "High heart rate",
    "weight_gain_day": "Weight gain, day", "weight_gain_week": "Weight gain, week", "news2_high": "NEWS2 high",
    "news2_medium": "NEWS2 medium", "no_data_72h": "No data 72 h", "no_data_24h": "No data 24 h",
}


def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ValueError, KeyError):
        return ZoneInfo("UTC")


def _when(value: datetime | str | None, zone: str | None = None, fmt: str = "%b %-d, %H:%M") -> str:
    """An instant on the patient's clock (their registered zone), or a patient-local naive time as is."""
    if value is None:
        return "—"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is not None:
        value = value.astimezone(_zone(zone))
    return value.strftime(fmt)


def _ago(value: datetime | None) -> str:
    if value is None:
        return "never"
    seconds = (datetime.now(UTC) - value).total_seconds()
    if seconds < 90:
        return "just now"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _age(born: date | None) -> str:
    if born is None:
        return ""
    today = date.today()
    return str(today.year - born.year - ((today.month, today.day) < (born.month, born.day)))


def _vital(metric: str, value: float | None, diastolic: float | None = None) -> str:
    if value is None:
        return "—"
    if metric == "blood_pressure" and diastolic is not None:
        return f"{value:.0f}/{diastolic:.0f}"
    if metric in ("body_temperature", "body_weight"):
        return f"{value:.1f}"
    return f"{value:.0f}"


def _label(text: str) -> str:
    return text.replace("_", " ").capitalize()


templates.env.filters.update(when=_when, ago=_ago, age=_age, vital=_vital, label=_label)
templates.env.globals.update(METRIC_LABELS=charts.LABELS, RULE_LABELS=RULE_LABELS, UNITS=charts.UNITS,
                             GROUPS=GROUPS, SORTS=SORTS, CATEGORIES=CATEGORIES)


def _form_csrf(request: Request, session: Session, submitted: str | None, action: str) -> None:
    """A dashboard form must carry its session's CSRF token; a form without it is refused and recorded."""
    try:
        check_csrf(session, submitted)
    except HTTPException:
        AuditLog(settings(request)).append(session.actor, action, [], {"path": request.url.path, "via": "web"},
                                           0, outcome="denied: missing or wrong CSRF token")
        raise


def _patient_id(value: str) -> str:
    return check_id("patient", value)


def _svg(chart: charts.Chart) -> Response:
    return Response(chart.svg, media_type="image/svg+xml", headers={"Content-Security-Policy": chart.csp})


# --- clinician: the panel ------------------------------------------------------------------------------------
@router.get("/panel")
def panel(request: Request, session: WebSession,
          flag: Annotated[str | None, Query(max_length=16)] = None,
          condition: Annotated[str | None, Query(max_length=64)] = None,
          sort: Annotated[str, Query(max_length=16)] = "triage") -> Response:
    """The care team's patients, most urgent first (service/panel.py says in what order and why)."""
    flag = flag if flag in GROUPS else None
    sort = sort if sort in SORTS else "triage"
    rows = clinician_of(request, session, "panel").panel()
    every = build_panel(rows)
    shown = build_panel(rows, group=flag, condition=condition or None, sort=sort)
    conditions = sorted({c for r in rows for c in r.get("conditions") or []})

    def link(**change: str | None) -> str:
        query = {"flag": flag, "condition": condition or None, "sort": sort if sort != "triage" else None,
                 **change}
        return "/panel" + ("?" + urlencode({k: v for k, v in query.items() if v}) if any(query.values()) else "")

    return render(request, "panel.html", session=session, active="panel", rows=shown, total=len(every),
                  tiles=counts(every), flag=flag, condition=condition or "", sort=sort, conditions=conditions,
                  link=link,
                  month=datetime.now(_zone(settings(request).practice_tz)).strftime("%B %Y"))


# --- clinician: one patient ----------------------------------------------------------------------------------
@router.get("/patients/{patient_id}")
def patient(request: Request, session: WebSession, patient_id: str,
            done: Annotated[str | None, Query(max_length=8)] = None) -> Response:
    """Latest vitals, 30-day charts, alerts (open and resolved), glucose profile, billing evidence, log time."""
    pid = _patient_id(patient_id)
    clinician = clinician_of(request, session, "patient")
    view = clinician.patient(pid, PATIENT_DAYS)
    alerts = clinician.alerts("all", pid)
    evidence = clinician.billing_evidence(pid, None)
    zone = view["patient"].get("time_zone")
    metrics = sorted({t["metric"] for t in view["trends"] if t.get("n_30d")},
                     key=lambda m: METRIC_ORDER.index(m) if m in METRIC_ORDER else len(METRIC_ORDER))
    daily: dict[str, list[dict]] = {}
    for d in view["daily"]:
        daily.setdefault(d["metric"], []).append(d)
    glucose = view.get("glucose") or {}
    today = datetime.now(_zone(settings(request).practice_tz)).date()
    first_allowed = (today.replace(day=1) - timedelta(days=1)).replace(day=1)
    current = next((p for p in evidence["periods"] if p.get("is_current")), None)
    return render(request, "patient.html", session=session, active="panel", p=view["patient"], zone=zone,
                  latest=view["latest"], metrics=metrics, daily=daily, trends=view["trends"],
                  open_alerts=[a for a in alerts if a["resolved_at"] is None],
                  resolved_alerts=[a for a in alerts if a["resolved_at"] is not None],
                  glucose=glucose, cgm=bool(glucose.get("cgm_readings")), evidence=evidence, current=current,
                  today=today, first_allowed=first_allowed, done=done, days=PATIENT_DAYS,
                  profile_days=PROFILE_DAYS)


def _window(zone: str | None, days: int) -> tuple[date, date]:
    end = datetime.now(_zone(zone)).date()
    return end - timedelta(days=days - 1), end


@router.get("/patients/{patient_id}/charts/glucose-profile.svg")
def glucose_profile_svg(request: Request, session: WebSession, patient_id: str) -> Response:
    """The ambulatory glucose profile of the last 14 days (percentiles by hour of the day)."""
    profile = clinician_of(request, session, "chart").glucose_profile(_patient_id(patient_id), PROFILE_DAYS)
    return _svg(charts.glucose_profile_chart(profile, profile["thresholds"]))


@router.get("/patients/{patient_id}/charts/time-in-ranges.svg")
def time_in_ranges_svg(request: Request, session: WebSession, patient_id: str) -> Response:
    """The consensus time-in-ranges bar of the last 14 days of CGM data."""
    profile = clinician_of(request, session, "chart").glucose_profile(_patient_id(patient_id), PROFILE_DAYS)
    summary = profile["summary"]
    if not summary or not summary.get("sufficient_data"):
        raise HTTPException(404, "insufficient CGM data for time in ranges (>= 14 days, >= 70 % wear)")
    return _svg(charts.time_in_ranges_chart(profile["summary"]))


@router.get("/patients/{patient_id}/charts/{metric}.svg")
def vital_svg(request: Request, session: WebSession, patient_id: str, metric: str) -> Response:
    """One vital over the last 30 days, the patient's alert thresholds shaded."""
    series = clinician_of(request, session, "chart").vital_series(_patient_id(patient_id), metric, PATIENT_DAYS)
    start, end = _window(series["time_zone"], PATIENT_DAYS)
    return _svg(charts.vital_chart(series, start, end))


@router.post("/alerts/{alert_id}/ack")
def acknowledge(request: Request, session: WebSession, alert_id: str,
                csrf: Annotated[str | None, Form(max_length=128)] = None,
                note: Annotated[str | None, Form(max_length=FORM_TEXT)] = None) -> Response:
    """Acknowledge an alert (audited); it stays open until readings return to range."""
    _form_csrf(request, session, csrf, "ack")
    note = (note or "").strip() or None
    if note is not None and not note.isprintable():
        raise HTTPException(422, "a note may not contain control characters")
    result: dict[str, Any] = clinician_of(request, session, "ack").acknowledge(check_id("alert", alert_id), note)
    return RedirectResponse(f"/patients/{result['patient_id']}?done=ack#alerts", status_code=303)


@router.post("/patients/{patient_id}/time")
def log_time(request: Request, session: WebSession, patient_id: str,
             minutes: Annotated[int, Form(ge=1, le=24 * 60)],
             csrf: Annotated[str | None, Form(max_length=128)] = None,
             on: Annotated[str | None, Form(max_length=10)] = None,
             interactive: Annotated[str | None, Form(max_length=8)] = None,
             note: Annotated[str | None, Form(max_length=FORM_TEXT)] = None) -> Response:
    """Log treatment-management minutes, back-dated into this month or the previous one if need be."""
    _form_csrf(request, session, csrf, "log-time")
    pid = _patient_id(patient_id)
    try:
        day = date.fromisoformat(on) if on else None
    except ValueError:
        raise HTTPException(422, f"date must be YYYY-MM-DD, not {on!r}") from None
    clinician_of(request, session, "log-time").log_time(pid, minutes, interactive is not None,
                                                        (note or "").strip() or None, on=day)
    return RedirectResponse(f"/patients/{pid}?done=time#time", status_code=303)


# --- auditor ---------------------------------------------------------------------------------------------------
AUDIT_OUTCOMES = ("ok", "denied")


@router.get("/audit")
def audit(request: Request, session: WebSession,
          actor: Annotated[str | None, Query(max_length=64)] = None,
          patient: Annotated[str | None, Query(max_length=64)] = None,
          outcome: Annotated[str | None, Query(max_length=8)] = None,
          action: Annotated[str | None, Query(max_length=64)] = None) -> Response:
    """The audit log, newest first, filtered; with the verdict of its hash-chain verification."""
    require_role(request, session, "auditor", "read-audit-log")
    from service.auditor import read_audit

    filters = {"actor": (actor or "").strip() or None, "patient": (patient or "").strip() or None,
               "outcome": outcome if outcome in AUDIT_OUTCOMES else None,
               "action": (action or "").strip() or None}
    log = read_audit(settings(request), session.actor, "web", limit=500, **filters)
    return render(request, "audit.html", session=session, active="audit", log=log, filters=filters,
                  outcomes=AUDIT_OUTCOMES,
                  zone=settings(request).practice_tz)
