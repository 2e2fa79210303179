"""Readers never open the writer: while a pipeline task holds the warehouse for writing (DuckDB allows one
writing process and blocks even read-only opens meanwhile), the commands that only read answer at once from
the serving snapshot instead of waiting on — or taking — the write lock."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from core.settings import Settings
from tests.conftest import RPM
from warehouse.db import clinical

pytestmark = pytest.mark.integration

READERS = [("accounting", "--json"), ("ops", "status", "--json"), ("devices", "list", "--json"),
           ("patients", "list", "--json"), ("quarantine", "list", "--json"), ("landing", "rejected", "--json"),
           ("summary", "--json")]


def test_readers_answer_while_a_writer_holds_the_warehouse(settings: Settings) -> None:
    env = {**os.environ, **settings.as_env()}
    for args in (["init"], ["patients", "add", "pt-1"], ["devices", "add", "bp-1", "--patient", "pt-1",
                                                          "--kind", "bp"]):
        subprocess.run([RPM, *args], env=env, check=True, capture_output=True, timeout=60)
    with clinical(settings) as writer:  # what a running task holds
        writer.execute("BEGIN TRANSACTION")
        writer.execute("INSERT INTO patients (patient_id) VALUES ('pt-written-meanwhile')")
        for args in READERS:
            # A reader that opened the live file would wait out the warehouse's 60 s lock wait, then fail.
            done = subprocess.run([RPM, *args], env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode in (0, 1), (args, done.stderr)  # ops status: 1 = degraded (no services)
            answer = json.loads(done.stdout)
            assert "error" not in answer or not isinstance(answer, dict), (args, answer)
        writer.execute("ROLLBACK")
