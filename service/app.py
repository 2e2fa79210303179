"""The clinician service: the only door to PHI for people — the dashboard (``/``) and the JSON API
(``/api/v1``, OpenAPI at ``/api/v1/openapi.json``), served over HTTPS by ``service.server``.

Every response carries the security headers (CSP without inline script, no framing, HSTS, ``no-store``) —
an unexpected error too: it is answered with a generic 500 by the same middleware that sets them, and logged
as its exception type and stack of code locations (no message: it could quote a value). The log names the
route template, status, time and account — never a URL with its ids, a query string or a body, so it holds
no PHI.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import traceback
from pathlib import Path
from zoneinfo import ZoneInfoNotFoundError

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response

from core.ids import InvalidId
from core.keyring import DecryptError
from core.settings import Settings
from service import api
from service.accounts import Accounts, LoginBusy
from service.auth import LoginRequired
from warehouse.access import AccessDenied
from warehouse.audit import AuditTampered
from warehouse.db import WarehouseBusy

log = logging.getLogger("rpm.service")

MAX_BODY_BYTES = 64 * 1024  # every form and JSON body of the service is far smaller

CSP = ("default-src 'none'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Strict-Transport-Security": "max-age=31536000",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _where(exc: BaseException) -> str:
    """An exception as its type and the code locations it passed through, innermost last — no message and no
    local values, which could quote a name or a note."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{type(exc).__name__} at " + " > ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}"
                                                    for f in frames[-12:])


def create_app(s: Settings, accounts: Accounts | None = None) -> FastAPI:
    app = FastAPI(title="rpm-pipeline clinician service", version="1",
                  description="Care-team-scoped, audited access to remote patient monitoring data.",
                  openapi_url="/api/v1/openapi.json", docs_url=None, redoc_url=None)
    app.state.settings = s
    app.state.accounts = accounts or Accounts(s)

    async def answer(request: Request, call_next) -> Response:
        try:
            return await call_next(request)
        except Exception as exc:  # the last resort: a generic answer that still carries the headers
            log.error("unhandled %s", _where(exc))
            try:
                return problem(request, 500, "internal error: the service logged it; try again, and tell an "
                                             "administrator if it persists")
            except Exception:  # the error page itself failed
                return JSONResponse({"detail": "internal error"}, status_code=500)

    @app.middleware("http")
    async def guard(request: Request, call_next) -> Response:
        started = time.monotonic()
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            length = request.headers.get("content-length")
            if length is None and request.headers.get("transfer-encoding"):
                response: Response = JSONResponse({"detail": "send a Content-Length"}, status_code=411)
            elif length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
                response = JSONResponse({"detail": f"body over {MAX_BODY_BYTES} bytes"}, status_code=413)
            else:
                response = await answer(request, call_next)
        else:
            response = await answer(request, call_next)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if not request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
            response.headers["Pragma"] = "no-cache"
        route = request.scope.get("route")
        log.info("%s %s %d %.0fms %s", request.method, getattr(route, "path", "(no route)"),
                 response.status_code, (time.monotonic() - started) * 1000,
                 getattr(request.state, "user", "-"))
        return response

    def busy(response: Response) -> Response:
        response.headers["Retry-After"] = "5"
        return response

    def problem(request: Request, status: int, detail: str) -> Response:
        if _is_api(request):
            return JSONResponse({"detail": detail}, status_code=status)
        from service.web import error_page

        return error_page(request, status, detail)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if _is_api(request):
            return await http_exception_handler(request, exc)
        return problem(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return problem(request, 422, f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request")

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        from urllib.parse import quote

        target = f"/login?next={quote(exc.next_path, safe='/')}" + ("&expired=1" if exc.expired else "")
        return RedirectResponse(target, status_code=303)

    @app.exception_handler(AccessDenied)
    async def denied(request: Request, exc: AccessDenied) -> Response:
        return problem(request, 403, str(exc))

    @app.exception_handler(AuditTampered)
    async def tampered(request: Request, exc: AuditTampered) -> Response:
        log.error("audit log tampered: PHI reads refused (%s)", exc)
        return problem(request, 503, "the audit log failed verification: patient data is unavailable until "
                                     "an administrator investigates (rpm audit verify)")

    @app.exception_handler(DecryptError)
    async def undecryptable(request: Request, exc: DecryptError) -> Response:
        log.error("a sealed record failed authentication: %s", exc)
        return problem(request, 503, "stored data failed authentication: an administrator must investigate")

    @app.exception_handler(LoginBusy)
    async def busy_login(request: Request, exc: LoginBusy) -> Response:
        log.warning("login refused: every password-check slot busy")
        return busy(problem(request, 503, str(exc)))

    @app.exception_handler(WarehouseBusy)
    async def warehouse_busy(request: Request, exc: WarehouseBusy) -> Response:
        log.warning("warehouse busy: %s", type(exc).__name__)
        return busy(problem(request, 503, "the warehouse is busy (a pipeline run is loading): try again in a "
                                          "few seconds"))

    @app.exception_handler(sqlite3.Error)
    async def store_unavailable(request: Request, exc: sqlite3.Error) -> Response:
        log.error("accounts store unavailable: %s (%s)", exc, _where(exc))  # SQLite's messages quote no values
        return busy(problem(request, 503, "the account store is unavailable: try again in a few seconds "
                                          "(an administrator must investigate if it persists)"))

    @app.exception_handler(ZoneInfoNotFoundError)
    async def unknown_zone(request: Request, exc: ZoneInfoNotFoundError) -> Response:
        return problem(request, 422, "time_zone: not an IANA time zone (e.g. America/Chicago)")

    @app.exception_handler(KeyError)
    async def unknown(request: Request, exc: KeyError) -> Response:
        return problem(request, 404, str(exc.args[0]) if exc.args else "not found")

    @app.exception_handler(InvalidId)
    async def bad_id(request: Request, exc: InvalidId) -> Response:
        return problem(request, 422, str(exc))

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, exc: ValueError) -> Response:
        return problem(request, 422, str(exc))

    @app.exception_handler(FileNotFoundError)
    async def no_data(request: Request, exc: FileNotFoundError) -> Response:
        return problem(request, 503, "no data yet: the pipeline has not published the warehouse")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"ok": True}

    app.include_router(api.router)
    from service import web

    app.include_router(web.router)
    web.mount_static(app)
    return app
