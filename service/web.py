"""The dashboard: server-rendered pages for clinicians (panel, patient), auditors (audit log) — and the
login that opens a session for them.

Pages read through the same care-team-scoped, audited ``ClinicianSession`` as the API. Their session lives
in a ``Secure; HttpOnly; SameSite=Strict`` cookie; every form carries the session's CSRF token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from service.accounts import LoginFailed, TotpRequired
from service.auth import COOKIE, WebSession, accounts, check_csrf, settings
from warehouse.audit import AuditLog

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")  # autoescaped: a stored string cannot become markup
router = APIRouter(include_in_schema=False)

HOME = {"clinician": "/panel", "auditor": "/audit", "admin": "/account"}


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


@router.get("/login")
def login_form(request: Request, next: str | None = None, expired: str | None = None) -> Response:
    return render(request, "login.html", next=_safe_next(next, ""), expired=bool(expired), error=None,
                  need_totp=False, username="", session=None)


@router.post("/login")
def login_submit(request: Request, username: Annotated[str, Form(max_length=64)],
                 password: Annotated[str, Form(max_length=256)],
                 totp: Annotated[str | None, Form(max_length=16)] = None,
                 next: Annotated[str | None, Form(max_length=2048)] = None) -> Response:
    from service.api import login

    try:
        token, session = login(request, username, password, totp or None, "web")
    except TotpRequired as exc:
        return render(request, "login.html", status=401, next=_safe_next(next, ""), expired=False,
                      error=str(exc), need_totp=True, username=username, session=None)
    except LoginFailed as exc:
        return render(request, "login.html", status=401, next=_safe_next(next, ""), expired=False,
                      error=str(exc), need_totp=bool(totp), username=username, session=None)
    response = RedirectResponse(_safe_next(next, HOME.get(session.role, "/")), status_code=303)
    response.set_cookie(COOKIE, token, secure=True, httponly=True, samesite="strict", path="/")
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


def forbid(detail: str) -> HTTPException:
    return HTTPException(403, detail)
