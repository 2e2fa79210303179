"""The CLI's side of the clinician service: log in, keep the session token, call /api/v1.

`rpm login` stores the token in ``~/.config/rpm/session.json`` (0600, in a 0700 folder: it is as good as the
password until it expires); `rpm clinician …` sends it. The service's certificate is verified against the
project's CA. Nothing here reads a key or a warehouse file: an account without access to the state folder
can use it, and gets exactly what its login allows.
"""

from __future__ import annotations

import json
import os
import ssl
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from core import keys
from core.settings import Settings
from rpmctl.errors import DENIED, INTERNAL, TAMPERED, USAGE, UserError

TIMEOUT_S = 60.0  # an acknowledgement waits for the warehouse while a pipeline run holds it


def session_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "rpm" / "session.json"


def service_url(s: Settings) -> str:
    from service.server import url

    return url(s)


def _tls(ca: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca)
    except (FileNotFoundError, ssl.SSLError) as exc:
        raise UserError(f"cannot use the service's CA certificate {ca}: {exc} (set RPM_HOME to the "
                        "installation, whose pki/ca.crt signs the service)") from None


def _explain(response: httpx.Response, url: str) -> UserError:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    if isinstance(detail, list):  # FastAPI's validation errors
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])[1:]))}: {d.get('msg')}" for d in detail)
    detail = str(detail or response.reason_phrase)
    code = response.status_code
    if code == 401:
        return UserError(f"{detail} (run rpm login)" if "/session" in url else
                         "your session expired or was ended: run rpm login", DENIED)
    if code == 403:
        return UserError(detail, DENIED)
    if code == 503 and "audit log" in detail:
        return UserError(detail, TAMPERED)
    if code in (400, 404, 409, 413, 422):
        return UserError(detail, USAGE)
    return UserError(f"service: {code} {detail}", INTERNAL)


def request(url: str, ca: str, method: str, path: str, token: str | None = None, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(verify=_tls(ca), timeout=TIMEOUT_S) as http:
            response = http.request(method, url + path, headers=headers, **kw)
    except httpx.ConnectError as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            raise UserError(f"{url} did not present a certificate signed by {ca}: refusing to send "
                            "credentials to it", INTERNAL) from None
        raise UserError(f"the clinician service is not reachable at {url} (is it running? rpm up, "
                        "rpm status)", INTERNAL) from None
    except httpx.HTTPError as exc:
        raise UserError(f"the clinician service at {url} failed to answer: {exc}", INTERNAL) from None
    if response.status_code >= 400:
        raise _explain(response, path)
    return response.json() if response.content else None


def login(s: Settings, username: str, password: str, totp: str | None) -> dict:
    url, ca = service_url(s), str(s.ca_cert)
    body = {"username": username, "password": password, **({"totp": totp} if totp else {})}
    answer = request(url, ca, "POST", "/api/v1/session", json=body)
    saved = {"url": url, "ca": ca, "username": answer["username"], "role": answer["role"],
             "token": answer["token"], "expires_at": answer["expires_at"]}
    path = session_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys.write_private(path, json.dumps(saved, indent=1).encode())
    return {k: v for k, v in saved.items() if k != "token"} | {"idle_minutes": answer["idle_minutes"],
                                                               "session_file": str(path)}


def saved_session() -> dict | None:
    """The session `rpm login` saved, or None; a file that is not one (garbage, or JSON of another shape) is
    a usage error naming it."""
    path = session_file()
    try:
        saved = json.loads(keys.read_secret(path))
    except FileNotFoundError:
        return None
    except ValueError:
        saved = None
    # What the calls use: where (url, CA), as whom, with which token — each a non-empty string.
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), str) and saved[k]
                                              for k in ("url", "ca", "username", "token")):
        raise UserError(f"{path} is not a session file: remove it and run rpm login")
    return saved


def logout() -> bool:
    saved = saved_session()
    if saved is None:
        return False
    try:
        request(saved["url"], saved["ca"], "DELETE", "/api/v1/session", saved["token"])
    except UserError:
        pass  # already expired, or the service is down: the local copy goes anyway
    session_file().unlink(missing_ok=True)
    return True


class Client:
    """Calls as the logged-in account. Without a session (or as someone else than ``expected``): exit 4."""

    @classmethod
    def logged_in(cls, s: Settings, username: str, password: str) -> Client:
        """A session of its own, kept in memory only (the demo's clinician): nothing written to the user's
        session file. End it with ``logout``."""
        url, ca = service_url(s), str(s.ca_cert)
        answer = request(url, ca, "POST", "/api/v1/session", json={"username": username, "password": password})
        client = cls.__new__(cls)
        client.saved = {"url": url, "ca": ca, "username": username, "token": answer["token"]}
        return client

    def logout(self) -> None:
        request(self.saved["url"], self.saved["ca"], "DELETE", "/api/v1/session", self.saved["token"])

    def __init__(self, expected: str | None = None):
        saved = saved_session()
        if saved is None:
            raise UserError("no session: run rpm login --as YOUR_ACCOUNT first", DENIED)
        if expected is not None and saved["username"] != expected:
            raise UserError(f"logged in as {saved['username']}, not {expected}: run rpm login --as {expected}",
                            DENIED)
        self.saved = saved

    def get(self, path: str, **params: Any) -> Any:
        return request(self.saved["url"], self.saved["ca"], "GET", path, self.saved["token"],
                       params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict) -> Any:
        return request(self.saved["url"], self.saved["ca"], "POST", path, self.saved["token"], json=body)


TIME_KEYS = {"last_reading_at", "opened_at", "last_breach_at", "acknowledged_at", "resolved_at", "measured_at",
             "start", "end"}


def revive(value: Any) -> Any:
    """JSON from the API with its timestamps as datetimes again (for the terminal renderers)."""
    if isinstance(value, dict):
        return {k: (_when(v) if k in TIME_KEYS and isinstance(v, str) else revive(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [revive(v) for v in value]
    return value


def _when(text: str) -> Any:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return text
