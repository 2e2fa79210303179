"""Bad input to the real `rpm` command: one clear line and a non-zero exit, never a traceback or a silent yes.

What a user (and a script) relies on: an error is one line on stderr starting with ``error:`` — or
``{"error": …}`` on stdout under --json — with exit 2 for bad input, 4 for access refused, 5 for a tampered
audit log, 1 for anything else (its traceback kept in a private file, not printed); a mistyped RPM_HOME
creates nothing; an id can never smuggle a path or a line break; `rpm … | head` ends quietly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import Settings
from rpmctl.cli import build_parser
from tests import rpm_forkserver
from tests.conftest import RPM
from warehouse.audit import AuditLog

pytestmark = pytest.mark.integration

HOSTILE_IDS = ["pt/1", "..", "../pt-1", "pt-1\r", "pt-1\nforged", "pt-1\r\n     9 2099-01-01T00:00:00 forged"]
NO_STATE = "holds no rpm state: run rpm init (or fix RPM_HOME)"


def _clean_env() -> dict[str, str]:
    """No RPM_* setting but the suite's RPM_RUN_AS=root (tests/conftest.py): the state here is root's."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RPM_") or k == "RPM_RUN_AS"}


def run(s: Settings | None, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """The `rpm` command with this state folder (or exactly ``env``), as a user runs it (in a process forked
    from one that has imported it: tests/rpm_forkserver.py)."""
    return rpm_forkserver.SERVER.run(RPM, list(args), env if env is not None else {**_clean_env(), **s.as_env()},  # type: ignore[union-attr]
                                     cwd=cwd, stdout=stdout, timeout=120)


def assert_one_error(proc: subprocess.CompletedProcess, code: int = 2, says: str | None = None) -> str:
    """Exit ``code``, exactly one line on stderr starting with "error:", no traceback anywhere."""
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    if says is not None:
        assert says in lines[0], lines[0]
    return lines[0]


def assert_json_error(proc: subprocess.CompletedProcess, code: int = 2, says: str | None = None) -> str:
    """Under --json: {"error": "…"} on stdout (one line of text), nothing on stderr."""
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr == "", proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == {"error"} and "\n" not in doc["error"] and doc["error"]
    assert proc.returncode == code, (proc.returncode, doc)
    if says is not None:
        assert says in doc["error"], doc["error"]
    return doc["error"]


def _settings(base: Path) -> Settings:
    os.chmod(base, 0o755)  # the broker account must traverse it (as in tests/conftest.py)
    return Settings(home=base / "var")


@pytest.fixture(scope="module")
def ward() -> Iterator[Settings]:
    """An initialised state folder with patient pt-1 on dr-a's care team (no services running); shared by
    the tests that only send bad input, which must change nothing."""
    base = Path(tempfile.mkdtemp(prefix="rpm-cli-errors-"))
    s = _settings(base)
    for args in (["init"], ["patients", "add", "pt-1", "--given", "Ada"], ["careteam", "add", "dr-a", "--patient",
                                                                              "pt-1"]):
        proc = run(s, *args)
        assert proc.returncode == 0, proc.stderr
    yield s
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def own_ward(settings: Settings) -> Settings:
    """Like ``ward``, for a test that changes the state (the audit log)."""
    for args in (["init"], ["patients", "add", "pt-1", "--given", "Ada"], ["careteam", "add", "dr-a", "--patient",
                                                                              "pt-1"]):
        assert run(settings, *args).returncode == 0
    return settings


# --- ids: one validator, so no id carries a path or a line break --------------------------------------------

ID_COMMANDS = [
    ("patients", "add", "{id}"),
    ("patients", "threshold", "{id}", "bp_stage2.systolic", "150"),
    ("careteam", "add", "{id}"),
    ("careteam", "add", "dr-a", "--patient", "{id}"),
    ("careteam", "remove", "{id}", "--patient", "pt-1"),
    ("careteam", "remove", "dr-a", "--patient", "{id}"),
    ("clinician", "--as", "{id}", "patients"),
    ("clinician", "--as", "dr-a", "patient", "{id}"),
    ("clinician", "--as", "dr-a", "export-fhir", "{id}"),
    ("clinician", "--as", "dr-a", "log-time", "10", "--patient", "{id}"),
    ("users", "add", "{id}", "--role", "auditor", "--password-stdin"),
    ("login", "--as", "{id}", "--password-stdin"),
]


@pytest.mark.parametrize("bad_id", HOSTILE_IDS, ids=repr)
@pytest.mark.parametrize("command", ID_COMMANDS, ids=" ".join)
def test_an_id_with_a_path_or_a_line_break_is_refused(ward, command, bad_id):
    args = [a.replace("{id}", bad_id) for a in command]
    line = assert_one_error(run(ward, *args), says=" id ")
    assert "use 1-64 of A-Z a-z 0-9" in line


def test_an_id_refused_by_one_command_is_refused_under_json_too(ward):
    assert_json_error(run(ward, "clinician", "--as", "dr-a", "patient", "pt-1\n", "--json"), says="patient id")


def test_export_fhir_cannot_write_outside_the_working_directory(ward, tmp_path):
    """The path a patient id could smuggle is refused at every step: registering it, assigning it, exporting."""
    work = tmp_path / "work"
    work.mkdir()
    assert_one_error(run(ward, "patients", "add", "../escape"))
    assert_one_error(run(ward, "careteam", "add", "dr-a", "--patient", "../escape"))
    assert_one_error(run(ward, "clinician", "--as", "dr-a", "export-fhir", "../escape", cwd=work))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["work"]


def test_export_fhir_does_not_create_a_folder_that_does_not_exist(ward, tmp_path):
    target = tmp_path / "no" / "such" / "folder" / "pt-1.json"
    assert_one_error(run(ward, "clinician", "--as", "dr-a", "export-fhir", "pt-1", "--out", str(target)),
                     says=str(target.parent))
    assert not (tmp_path / "no").exists()


def test_audit_show_cannot_be_made_to_print_a_forged_line(ward):
    """A hostile string already in the log (written before ids were checked) is shown escaped, on its line."""
    forged = "dr-x\n     9 2099-01-01T00:00:00 admin:root    patients     ok"
    AuditLog(ward).append(forged, "patients\r", ["pt-1\x1b[2K"], {}, 0, outcome="ok\u2028")
    proc = run(ward, "audit", "show", "--last", "1")
    assert proc.returncode == 0 and proc.stderr == ""
    header, rule, line = proc.stdout.splitlines()  # str.splitlines also splits on \r and \u2028: one row
    assert header.split()[:3] == ["seq", "time", "(UTC)"] and set(rule) <= {"-", " "}
    assert "dr-x\\n     9 2099" in line and "\\x1b[2K" in line and "\\u2028" in line
    assert json.loads(run(ward, "audit", "show", "--last", "1", "--json").stdout)[0]["actor"] == forged


# --- numbers, dates, names -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ("simulate", "--patients", "0"),
    ("simulate", "--patients", "-3"),
    ("simulate", "--patients", "many"),
    ("simulate", "--days", "-5"),
    ("demo", "--days", "-5"),
    ("demo", "--patients", "0"),
    ("clinician", "--as", "dr-a", "patient", "pt-1", "--days", "-5"),
    ("clinician", "--as", "dr-a", "patient", "pt-1", "--days", "0"),
    ("clinician", "--as", "dr-a", "export-fhir", "pt-1", "--days", "-1"),
    ("clinician", "--as", "dr-a", "log-time", "0", "--patient", "pt-1"),
    ("clinician", "--as", "dr-a", "log-time", "-20", "--patient", "pt-1"),
    ("clinician", "--as", "dr-a", "billing", "--month", "2026-13"),
    ("audit", "show", "--last", "0"),
    ("audit", "show", "--last", "-3"),
    ("patients", "threshold", "pt-1", "bp_stage2.systolic", "nan"),
    ("patients", "threshold", "pt-1", "bp_stage2.systolic", "inf"),
    ("patients", "add", "pt-2", "--tz", "Mars/Olympus_Mons"),
    ("patients", "add", "pt-2", "--tz", "../../etc/passwd"),
    ("patients", "add", "pt-2", "--birth-date", "2026-02-30"),
    ("patients", "add", "pt-2", "--given", "Eve\x1b[2J"),
    ("patients", "add", "pt-2", "--family", "Doe\nforged"),
    ("careteam", "add", "dr-b", "--name", "Dr\rX"),
    # found by the hostile review: values no one can mean, and a reason that does not exist
    ("clinician", "--as", "dr-a", "log-time", "100000000", "--patient", "pt-1"),
    ("patients", "threshold", "pt-1", "bp_stage2.systolic", "--", "-5"),
    ("patients", "threshold", "pt-1", "bp_severe.systolic", "400"),
    ("quarantine", "list", "--limit", "99999999999999999999"),
    ("quarantine", "list", "--reason", "nosuch"),
    ("devices", "add", "bp-10", "--patient", "pt-1", "--kind", "bp", "--since", "0001-01-01T00:00:00+14:00"),
    ("devices", "add", "bp-10", "--patient", "pt-1", "--kind", "bp", "--since", "9999-12-31T23:59:59+00:00"),
    # the second hostile review: demographics no one can mean (F6), a finding's levels inverted (F13)
    ("patients", "add", "pt-2", "--birth-date", "2099-01-01"),
    ("patients", "add", "pt-2", "--birth-date", "0001-01-01"),
    ("patients", "add", "pt-2", "--conditions", "cancer,<b>x</b>"),
    ("patients", "add", "pt-2", "--given", "A" * 100_000),
    ("patients", "add", "pt-1", "--family", "B" * 201),
    ("patients", "threshold", "pt-1", "glucose_level2_high.mg_dl", "40"),
    ("patients", "threshold", "pt-1", "glucose_level2_low.mg_dl", "400"),
    ("patients", "threshold", "pt-1", "bp_severe.systolic", "130"),
    ("patients", "threshold", "pt-1", "no_data_24h.hours", "336"),
    ("patients", "threshold", "pt-1", "hr_low.per_min", "180"),
], ids=lambda a: " ".join(a)[:80])
def test_a_bad_value_is_refused_with_one_line(ward, args):
    assert_one_error(run(ward, *args))


def test_demographics_and_thresholds_refused_say_why_and_store_nothing(ward):
    before = json.loads(run(ward, "patients", "list", "--json").stdout)
    assert_one_error(run(ward, "patients", "add", "pt-2", "--conditions", "cancer"),
                     says="unknown condition 'cancer': one of hypertension, diabetes, copd, heart_failure")
    assert_one_error(run(ward, "patients", "add", "pt-2", "--birth-date", "2099-01-01"), says="in the future")
    assert_one_error(run(ward, "patients", "add", "pt-2", "--given", "A" * 100_000), says="at most 200")
    assert_one_error(run(ward, "patients", "threshold", "pt-1", "glucose_level2_high.mg_dl", "40"),
                     says="glucose_level1_low.mg_dl (70) must stay below glucose_level2_high.mg_dl (40)")
    assert json.loads(run(ward, "patients", "list", "--json").stdout) == before


def test_a_bad_value_is_refused_as_json_under_json(ward):
    assert_json_error(run(ward, "simulate", "--patients", "0", "--json"), says="--patients")
    assert_json_error(run(ward, "audit", "show", "--last", "0", "--json"), says="--last")


def test_patients_import_of_a_missing_file(ward):
    assert_one_error(run(ward, "patients", "import", "/nonexistent.csv"), says="/nonexistent.csv")
    assert_json_error(run(ward, "patients", "import", "/nonexistent.csv", "--json"), says="/nonexistent.csv")


@pytest.mark.parametrize("what", ["/dev/zero", "a pipe", "a folder"])
def test_patients_import_of_something_that_is_not_a_file_is_refused_at_once(ward, tmp_path, what):
    """The hostile review's F5: `rpm patients import /dev/zero` grew to 22 GB and was OOM-killed. (Run under
    a 4 GB address-space limit: a regression fails this test, not the machine.)"""
    import resource

    path = {"/dev/zero": "/dev/zero", "a pipe": str(tmp_path / "fifo"), "a folder": str(tmp_path)}[what]
    if what == "a pipe":
        os.mkfifo(path)  # no writer: a plain open for reading would wait forever

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    proc = subprocess.run([RPM, "patients", "import", path], env={**_clean_env(), **ward.as_env()},
                          capture_output=True, text=True, timeout=60, preexec_fn=limited)
    assert_one_error(proc, says=f"{path}: not a regular file")


def test_patients_import_of_a_file_that_is_not_text(ward, tmp_path):
    path = tmp_path / "patients.csv"
    path.write_bytes(b"patient_id,mrn\n\xff\xfe\x00garbage\n")
    assert_one_error(run(ward, "patients", "import", str(path)), says=str(path))


# --- no silent yes to who or what does not exist --------------------------------------------------------------

def test_a_threshold_on_an_unknown_patient_is_refused_and_stores_nothing(own_ward):
    s = own_ward
    assert_one_error(run(s, "patients", "threshold", "pt-nobody", "bp_stage2.systolic", "150"),
                     says="unknown patient pt-nobody")
    assert_one_error(run(s, "patients", "threshold", "pt-1", "bp_stage9.systolic", "150"), says="unknown threshold")
    from warehouse.db import clinical

    with clinical(s) as con:
        assert con.execute("SELECT count(*) FROM alert_thresholds").fetchone() == (0,)


def test_care_team_changes_need_a_known_patient_and_clinician(own_ward):
    s = own_ward
    assert_one_error(run(s, "careteam", "add", "dr-new", "--patient", "pt-nobody"), says="unknown patient")
    assert_one_error(run(s, "careteam", "remove", "dr-nobody", "--patient", "pt-1"), says="unknown clinician")
    assert_one_error(run(s, "careteam", "remove", "dr-a", "--patient", "pt-nobody"), says="unknown patient")
    team = json.loads(run(s, "careteam", "list", "--json").stdout)
    assert [(c["clinician_id"], c["patients"]) for c in team] == [("dr-a", ["pt-1"])]  # no half-made dr-new


def test_a_clinician_command_without_a_session_is_one_line_with_exit_4_and_reads_nothing(ward, tmp_path):
    """`--as` names whom the caller expects to be logged in as; it proves nothing. Without a session the
    command is refused before anything is read (the service's own refusals are in test_clinical.py)."""
    env = {**_clean_env(), **ward.as_env(), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    before = AuditLog(ward).records()
    assert_one_error(run(None, "clinician", "--as", "dr-a", "patient", "pt-1", env=env), code=4,
                     says="run rpm login")
    assert_json_error(run(None, "clinician", "--as", "dr-a", "patients", "--json", env=env), code=4,
                      says="run rpm login")
    assert AuditLog(ward).records() == before
    assert not (tmp_path / "config").exists()


# --- the state folder ----------------------------------------------------------------------------------------

STATEFUL = [("accounting",), ("summary",), ("ops", "status"), ("patients", "list"), ("reports", "education"),
            ("audit", "verify"), ("audit", "show"), ("devices", "list"), ("careteam", "list"), ("status",),
            ("backup",), ("pipeline", "run"), ("keys", "rotate"),
            ("users", "list"), ("serve",), ("patients", "add", "pt-1"),
            ("careteam", "add", "dr-a", "--patient", "pt-1")]


@pytest.mark.parametrize("command", STATEFUL, ids=" ".join)
def test_a_fresh_rpm_home_is_refused_and_not_created(tmp_path, command):
    home = tmp_path / "var"
    proc = run(None, *command, env={**_clean_env(), "RPM_HOME": str(home)})
    assert_one_error(proc, says=f"RPM_HOME={home} {NO_STATE}")
    assert not home.exists()


def test_down_on_a_fresh_rpm_home_stops_nothing_and_says_where_it_looked(tmp_path):
    """`make clean` runs `rpm down` whether or not anything was set up: it succeeds, and creates nothing."""
    home = tmp_path / "var"
    proc = run(None, "down", env={**_clean_env(), "RPM_HOME": str(home)})
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == f"nothing to stop: RPM_HOME={home} holds no rpm state\n"
    doc = json.loads(run(None, "down", "--json", env={**_clean_env(), "RPM_HOME": str(home)}).stdout)
    assert doc == {"airflow_stopped": False, "ingest_stopped": False, "broker_stopped": False,
                   "service_stopped": False, "watchdog_stopped": False}
    assert not home.exists()


def test_a_mistyped_rpm_home_creates_nothing(ward, tmp_path):
    typo = Path(str(ward.home) + "-typo")
    env = {**_clean_env(), "RPM_HOME": str(typo)}
    assert_one_error(run(None, "accounting", env=env), says=NO_STATE)
    assert_json_error(run(None, "accounting", "--json", env=env), says=NO_STATE)
    assert_one_error(run(None, "patients", "list", env=env), says=NO_STATE)
    assert not typo.exists()
    # the real one still answers
    assert run(None, "accounting", "--json", env={**_clean_env(), "RPM_HOME": str(ward.home)}).returncode == 0


def test_a_bad_setting_is_one_line(ward):
    proc = run(None, "accounting", env={**_clean_env(), "RPM_HOME": str(ward.home), "RPM_BROKER_PORT": "lots"})
    assert_one_error(proc, says="RPM_BROKER_PORT")


def test_commands_before_the_first_pipeline_run_answer_or_say_what_to_do(settings):
    """Right after `rpm init`: an empty, valid answer where that is the truth, else one line naming the fix."""
    assert run(settings, "init").returncode == 0
    for command in (("reports", "education"), ("reports", "pipeline")):
        assert_one_error(run(settings, *command), says="rpm pipeline run")
    for command in (("summary",), ("patients", "list"), ("careteam", "list"), ("audit", "verify"),
                    ("audit", "show"), ("ops", "status"), ("devices", "list")):
        proc = run(settings, *command)
        assert "Traceback" not in proc.stdout + proc.stderr, (command, proc.stderr)
        if proc.returncode and command != ("ops", "status"):  # ops status: exit 1 = degraded (nothing runs)
            assert_one_error(proc, says="rpm pipeline run")
    acc = run(settings, "accounting", "--json")
    assert acc.returncode == 0 and acc.stderr == ""
    doc = json.loads(acc.stdout)
    assert (doc["received"], doc["loaded"], doc["quarantined"], doc["duplicates"], doc["balanced"]) == (
        0, 0, 0, 0, True)
    ops = run(settings, "ops", "status", "--json")
    assert ops.returncode in (0, 1, 2) and ops.stderr == "" and json.loads(ops.stdout)["verdict"]


# --- the audit log: a read that cannot be audited is not served -----------------------------------------------

def _tampered_reads_are_refused(s: Settings) -> None:
    """The operator's reads of the registry; the service's (exit 5 through `rpm clinician`) in
    test_clinical.py."""
    for _ in range(3):
        proc = run(s, "patients", "list")
        assert_one_error(proc, code=5, says="audit log tampered")
        assert proc.stdout == "" and "Ada" not in proc.stderr  # no PHI on the way out
        assert_json_error(run(s, "patients", "list", "--json"), code=5)
    verify = run(s, "audit", "verify")
    assert verify.returncode == 5 and "TAMPERED" in verify.stdout


def test_a_truncated_audit_log_stays_reported_however_many_reads_follow(own_ward):
    s = own_ward
    for _ in range(3):
        assert run(s, "patients", "list").returncode == 0
    log = Path(s.home) / "audit" / "audit.log"
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:-2]))
    _tampered_reads_are_refused(s)


def test_an_emptied_audit_log_stays_reported_however_many_reads_follow(own_ward):
    s = own_ward
    assert run(s, "patients", "list").returncode == 0
    (Path(s.home) / "audit" / "audit.log").write_bytes(b"")
    _tampered_reads_are_refused(s)


def test_a_record_deleted_from_the_middle_of_the_audit_log_stays_reported(own_ward):
    """The hostile review's F7: `sed -i '10d' audit.log` (tail and head intact) — verify failed, every read
    was served and `rpm ops status` said HEALTHY."""
    s = own_ward
    for _ in range(10):
        assert run(s, "patients", "list").returncode == 0
    log = Path(s.home) / "audit" / "audit.log"
    lines = log.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 12
    log.write_bytes(b"".join(lines[:9] + lines[10:]))
    _tampered_reads_are_refused(s)
    ops = run(s, "ops", "status", "--json")
    status = json.loads(ops.stdout)
    assert ops.returncode == 2 and status["verdict"] == "failing"
    assert any(r.startswith("audit log: line 10") for r in status["reasons"]), status["reasons"]
    assert "pipeline: FAILING" in run(s, "ops", "status").stdout


# --- unexpected failures, closed pipes, --help ------------------------------------------------------------------

def test_an_unexpected_failure_is_one_line_and_its_traceback_goes_to_a_private_file(own_ward):
    s = own_ward
    ring = Path(s.secrets_dir) / "audit.keyring.json"  # type: ignore[arg-type]
    ring.write_text("{}")  # private, but not a keyring: nothing expects that
    ring.chmod(0o600)
    proc = run(s, "audit", "verify")
    line = assert_one_error(proc, code=1, says="internal error: KeyError")
    saved = Path(s.run_dir) / "cli-errors.log"  # type: ignore[arg-type]
    assert str(saved) in line
    assert "Traceback" in saved.read_text() and saved.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("command", [("config",), ("audit", "show", "--json"), ("careteam", "list", "--json")],
                         ids=" ".join)
def test_a_reader_that_went_away_ends_the_command_quietly(ward, command):
    """`rpm … | head`: the reader has gone before we write (deterministic: its end of the pipe is closed)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = run(ward, *command, stdout=write_end)
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 141  # 128 + SIGPIPE, as a shell reports any tool cut off by `head`


def test_piping_into_head_prints_the_first_line_and_no_traceback(ward):
    env = {**_clean_env(), **ward.as_env()}
    proc = subprocess.run(["bash", "-c", f"set +o pipefail; '{RPM}' config | head -1"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == ["RPM_HOME"]
    assert proc.stderr == ""


def test_output_the_terminal_cannot_show_is_escaped_not_an_error(tmp_path):
    """A terminal whose encoding lacks a character the output holds (here ASCII; `rpm config`'s help text has
    dashes and arrows) gets it escaped: the command is not cut off half-way as "bad input" (exit 2)."""
    env = {**_clean_env(), **_settings(tmp_path).as_env(), "PYTHONIOENCODING": "ascii"}
    proc = run(None, "config", env=env)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "\\u2014" in proc.stdout and proc.stdout.isascii()
    assert proc.stdout == run(None, "config", env={**env, "PYTHONIOENCODING": "utf-8"}).stdout.encode(
        "ascii", "backslashreplace").decode()


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += _command_paths(sub, (*prefix, name))
    return paths


@pytest.mark.parametrize("path", _command_paths(build_parser()), ids=lambda p: " ".join(p) or "rpm")
def test_every_command_has_working_help(tmp_path, path):
    """Every command, including ones added later, answers --help anywhere (even with no state folder)."""
    proc = run(None, *path, "--help", env={**_clean_env(), "RPM_HOME": str(tmp_path / "nowhere")})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("usage: rpm")
    assert not (tmp_path / "nowhere").exists()
