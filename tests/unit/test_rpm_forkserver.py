"""The fork server the suite runs `rpm` through (tests/rpm_forkserver.py) against the console script itself.

What the suite relies on: a call through the fork server ends as the console script would — the same exit
status and the same bytes on stdout and stderr — for the environments the tests give it. The interpreter sets
some things up once at its start from the environment (the standard streams' encoding and error handler, the
time zone); a forked child inherits the server's, so such a call must not be forked."""

from __future__ import annotations

import os
import subprocess

import pytest

from core.settings import Settings
from tests import rpm_forkserver
from tests.conftest import RPM


def both(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    real = subprocess.run([RPM, *args], env=env, capture_output=True, text=True, timeout=120)
    forked = rpm_forkserver.SERVER.run(RPM, args, env, timeout=120)
    return real, forked


@pytest.mark.parametrize("extra", [{}, {"PYTHONIOENCODING": "ascii"}, {"PYTHONIOENCODING": "latin-1:strict"}],
                         ids=["as-is", "ascii-streams", "latin-1-streams"])
def test_a_forked_call_ends_as_the_console_script_does(settings: Settings, extra: dict[str, str]) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RPM_")}, **settings.as_env(), **extra}
    real, forked = both(["config"], env)
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)
