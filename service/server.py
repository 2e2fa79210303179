"""`rpm serve`: the clinician service over HTTPS (uvicorn), with a certificate from the project's CA."""

from __future__ import annotations

import logging
import ssl
import sys

import uvicorn

from core import keys
from core.settings import Settings


def url(s: Settings) -> str:
    """Where people and `rpm login` reach the service."""
    if s.service_url:
        return s.service_url.rstrip("/")
    host = "localhost" if s.service_bind in ("127.0.0.1", "0.0.0.0", "::", "::1") else s.service_bind
    return f"https://{host}:{s.service_port}"


def serve(s: Settings) -> None:
    """Run in the foreground until SIGTERM/SIGINT. Logs (route templates, statuses, accounts; no PHI) go to
    stderr."""
    from service.app import create_app

    crt, key = keys.ensure_service_cert(s)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(s)
    config = uvicorn.Config(
        app, host=s.service_bind, port=s.service_port, ssl_certfile=str(crt), ssl_keyfile=str(key),
        ssl_version=ssl.PROTOCOL_TLS_SERVER, ssl_ciphers="ECDHE+AESGCM:ECDHE+CHACHA20",
        access_log=False,          # the app logs the route template, never the URL (ids, query strings)
        server_header=False, proxy_headers=False, log_config=None, timeout_graceful_shutdown=5,
        limit_concurrency=200,
    )
    print(f"rpm clinician service on {url(s)}/ (API {url(s)}/api/v1, CA {s.ca_cert})", flush=True)
    uvicorn.Server(config).run()
