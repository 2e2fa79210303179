"""The Airflow REST client on a loaded machine: a login whose answer came too late is sent again (CI's stack
test once failed on the token call), a trigger is never sent twice blind."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.settings import Settings
from rpmctl.services import airflow_stack


class SlowFirstAnswer(ThreadingHTTPServer):
    """Answers every POST, except that the first one is held until a second request has arrived (its client
    has given up waiting by then)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.posts: list[str] = []
        self.second = threading.Event()


class Handler(BaseHTTPRequestHandler):
    server: SlowFirstAnswer

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.posts.append(self.path)
        if len(self.server.posts) == 1:
            self.server.second.wait(10)
        else:
            self.server.second.set()
        body = json.dumps({"access_token": f"jwt-{len(self.server.posts)}"}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client of the held answer hung up

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def slow_api(tmp_path: Path) -> Iterator[tuple[Settings, SlowFirstAnswer]]:
    server = SlowFirstAnswer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Settings(home=tmp_path / "var", airflow_port=server.server_address[1]), server
    finally:
        server.second.set()
        server.shutdown()
        server.server_close()


def test_a_login_whose_answer_timed_out_is_sent_again(slow_api) -> None:
    s, server = slow_api
    assert airflow_stack.token(s, timeout=0.5) == "jwt-2"
    assert server.posts == ["/auth/token", "/auth/token"]


def test_a_post_that_is_not_known_to_be_idempotent_is_not_retried_blind(slow_api) -> None:
    s, server = slow_api
    with pytest.raises(TimeoutError):
        airflow_stack.api(s, "POST", "/api/v2/dags/rpm_pipeline/dagRuns", {"dag_run_id": "x"}, timeout=0.5)
    assert server.posts == ["/api/v2/dags/rpm_pipeline/dagRuns"]
