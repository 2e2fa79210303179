"""Who is asking: the session behind a request, proven by a bearer token (API) or a cookie (dashboard).

The API accepts only ``Authorization: Bearer`` (a browser never sends that by itself, so the API needs no
CSRF defence); the dashboard accepts only its cookie (``Secure; HttpOnly; SameSite=Strict``), and every form
it posts carries the session's CSRF token. A request a role may not make is refused with 403 and audited.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from core.settings import Settings
from service.accounts import Accounts, Session
from warehouse.access import ClinicianSession
from warehouse.audit import AuditLog

COOKIE = "rpm_session"


class LoginRequired(Exception):
    """A dashboard page without a live session: answered with a redirect to the login page."""

    def __init__(self, next_path: str = "/", expired: bool = False):
        self.next_path = next_path
        self.expired = expired


def settings(request: Request) -> Settings:
    return request.app.state.settings


def accounts(request: Request) -> Accounts:
    return request.app.state.accounts


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def api_session(request: Request, authorization: Annotated[str | None, Header()] = None) -> Session:
    session = accounts(request).session(_bearer(authorization) or "", "api")
    if session is None:
        raise HTTPException(401, "authentication required: POST /api/v1/session for a token (or it expired)",
                            headers={"WWW-Authenticate": "Bearer"})
    request.state.user = session.username
    return session


def web_session(request: Request) -> Session:
    token = request.cookies.get(COOKIE)
    session = accounts(request).session(token or "", "web")
    if session is None:
        path = request.url.path if request.method == "GET" else "/"
        raise LoginRequired(path, expired=token is not None)
    request.state.user = session.username
    return session


def deny(request: Request, session: Session, action: str, why: str) -> HTTPException:
    """A 403 for a role that may not do ``action``, recorded in the audit log first."""
    AuditLog(settings(request)).append(session.actor, action, [], {"path": request.url.path,
                                                                    "via": session.kind}, 0,
                                       outcome=f"denied: {why}")
    return HTTPException(403, f"{why}: refused (and recorded)")


def require_role(request: Request, session: Session, role: str, action: str) -> None:
    if session.role != role:
        raise deny(request, session, action, f"role {session.role} may not {action.replace('-', ' ')}")


def clinician_of(request: Request, session: Session, action: str) -> ClinicianSession:
    require_role(request, session, "clinician", action)
    assert session.clinician_id is not None  # a clinician account always names its registry clinician
    return ClinicianSession(settings(request), session.clinician_id, via=session.kind)


def check_csrf(session: Session, submitted: str | None) -> None:
    """A dashboard form must carry its session's CSRF token (a page on another site cannot read it)."""
    if not submitted or not secrets.compare_digest(submitted.encode(), session.csrf.encode()):
        raise HTTPException(403, "this form did not come from your session (missing or wrong CSRF token): "
                                 "reload the page and try again")


ApiSession = Annotated[Session, Depends(api_session)]
WebSession = Annotated[Session, Depends(web_session)]
