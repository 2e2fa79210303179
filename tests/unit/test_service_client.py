"""The CLI's side of the clinician service (rpmctl/client.py): the session file `rpm login` keeps."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rpmctl import client
from rpmctl.cli import main
from rpmctl.errors import USAGE, UserError

SESSION = {"url": "https://localhost:8443", "ca": "/srv/rpm/pki/ca.crt", "username": "dr-lee", "role": "clinician",
           "token": "t" * 43, "expires_at": "2026-11-01T10:15:00+00:00"}


@pytest.fixture
def session_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    path = client.session_file()
    path.parent.mkdir(parents=True, mode=0o700)
    return path


def write(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def test_a_saved_session_is_read_back_and_none_without_one(session_file):
    assert client.saved_session() is None
    write(session_file, json.dumps(SESSION))
    assert client.saved_session() == SESSION


@pytest.mark.parametrize("text", ["[]", "{}", '"str"', "5", "null", json.dumps({**SESSION, "token": 5}),
                                  json.dumps({k: v for k, v in SESSION.items() if k != "url"}),
                                  json.dumps({**SESSION, "username": ""}), "\x00\xffgarbage", "{not json"])
def test_a_file_that_is_not_a_session_is_a_usage_error_naming_it(session_file, text, capsys):
    """Hostile review F14: JSON of another shape used to end as "internal error", exit 1."""
    write(session_file, text)
    with pytest.raises(UserError) as refused:
        client.saved_session()
    assert refused.value.code == USAGE
    assert str(refused.value) == f"{session_file} is not a session file: remove it and run rpm login"
    assert main(["logout"]) == USAGE
    assert capsys.readouterr().err == f"error: {session_file} is not a session file: remove it and run rpm login\n"
