"""What piles up beside landing stays bounded: a week of 1-minute runs — their validation reports, Airflow task
logs and the services' logs — pruned by rpm_daily to the retention window; the validation index lists the runs
newest first with their counts, and a pruned run leaves it."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.settings import Settings
from pipeline import housekeeping, tasks
from pipeline.validation_report import INDEX_SHOWN, report_path, reports_dir, write_report

WEEK_OF_MINUTES = 7 * 24 * 60


def run(run_id: str, finished: datetime, received: int = 10, quarantined: int = 1) -> dict:
    return {"run_id": run_id, "state": "success", "finished_at": finished, "segments": 1, "messages": received,
            "received": received, "loaded": received - quarantined, "quarantined": quarantined, "duplicates": 0}


def age(path: Path, when: float) -> None:
    os.utime(path, (when, when))


def write_aged(path: str, data: bytes, when: float) -> None:
    """A file holding ``data``, last written at ``when``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.utime(fd, (when, when))
    finally:
        os.close(fd)


@pytest.fixture
def memory_home() -> Iterator[Settings]:
    """RPM_HOME on tmpfs when there is one: a week of runs is 40,000 file and folder creations and deletions,
    which on a disk shared with fsyncing tests wait on its journal (0.3-0.8 ms each, measured under load); the
    prune's rules (mtimes, empty folders, links) are the same in memory."""
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="rpm-housekeeping-",
                                 dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))
    try:
        yield Settings(home=base / "var")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_week_of_one_minute_runs_is_pruned_to_the_retention_window(memory_home: Settings) -> None:
    s = memory_home.replace(artifact_retention_days=2)
    now = time.time()
    start = now - WEEK_OF_MINUTES * 60
    reports = reports_dir(s)
    reports.mkdir(parents=True)
    logs = Path(s.airflow_home) / "logs"
    index_lines = []
    dag_logs = logs / "dag_id=rpm_pipeline"
    dag_logs.mkdir(parents=True)
    # What a week of runs leaves, written directly (10k real reports: slow) with bare os calls: 40,000 pathlib
    # operations took longer than the prune they set up.
    for minute in range(WEEK_OF_MINUTES):
        when = start + minute * 60
        run_id = f"scheduled__{datetime.fromtimestamp(when, UTC).isoformat()}"
        page = report_path(s, run_id).name
        write_aged(os.path.join(reports, page), b"<html>report</html>", when)
        index_lines.append(f'{{"run_id": "{run_id}", "file": "{page}", "received": 10, "quarantined": 1}}\n')
        task_dir = os.path.join(dag_logs, f"run_id={run_id}", "task_id=load")
        os.makedirs(task_dir)
        write_aged(os.path.join(task_dir, "attempt=1.log"), b"rpm load: loaded=9 quarantined=1 seconds=0.2\n", when)
    (reports / "index.jsonl").write_text("".join(index_lines))
    run_dir = Path(s.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for day in range(7):
        rotated = run_dir / f"ingest.log.{day + 1}"
        rotated.write_text("old\n")
        age(rotated, now - (day + 1) * 86400 - 60)
    live = run_dir / "ingest.log"
    with open(live, "wb") as f:
        f.write(b"x" * (housekeeping.LOG_MAX_BYTES + 1))

    result = tasks.prune_artifacts(s)

    kept_reports = [p for p in reports.glob("*.html") if p.name != "index.html"]
    kept_logs = list(logs.rglob("*.log"))
    window = 2 * 24 * 60
    assert window - 2 <= len(kept_reports) <= window + 1
    assert window - 2 <= len(kept_logs) <= window + 1
    assert result["validation_reports"] + len(kept_reports) == WEEK_OF_MINUTES
    assert result["task_log_files"] + len(kept_logs) == WEEK_OF_MINUTES
    # Folders of pruned runs go too: the logs tree is as big as the window, not the week.
    assert len(list((logs / "dag_id=rpm_pipeline").iterdir())) == len(kept_logs)
    # The index names only what is kept.
    assert len((reports / "index.jsonl").read_text().splitlines()) == len(kept_reports)
    assert (reports / "index.html").read_text().count("<tr>") - 1 == min(len(kept_reports), INDEX_SHOWN)
    # The live log was rotated (its writer keeps appending to the emptied file); old rotated ones deleted.
    assert live.stat().st_size == 0 and (run_dir / "ingest.log.1").stat().st_size > housekeeping.LOG_MAX_BYTES
    assert result["service_logs_rotated"] == 1
    assert sorted(p.name for p in run_dir.glob("ingest.log.*")) == ["ingest.log.1", "ingest.log.2"]

    # The next day's prune of a steady state finds only a day's worth to delete.
    again = housekeeping.prune_artifacts(s, now=now + 86400)
    assert abs(again["validation_reports"] - 24 * 60) <= 2


def test_the_validation_index_lists_runs_newest_first_with_counts(settings: Settings) -> None:
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    write_report(settings, run("manual__b", t0 + timedelta(minutes=2), received=40, quarantined=40), {"x": 40})
    write_report(settings, run("scheduled__a", t0 + timedelta(minutes=5), received=10, quarantined=0), {})
    write_report(settings, run("manual__c", t0 + timedelta(minutes=1)), {})
    write_report(settings, run("manual__b", t0 + timedelta(minutes=2), received=40, quarantined=40), {"x": 40})
    index = (reports_dir(settings) / "index.html").read_text()
    order = re.findall(r'<a href="[^"]+">([^<]+)</a>', index)
    assert order == ["scheduled__a", "manual__b", "manual__c"]  # by finish time, not name; a retry listed once
    row_b = index[index.index("manual__b"):].split("</tr>")[0]
    assert "<td class=n>40</td><td class=n>0</td><td class=n>40</td>" in row_b and "100.0%" in row_b


def test_a_garbage_index_line_does_not_break_the_index(settings: Settings) -> None:
    write_report(settings, run("manual__a", datetime(2026, 12, 1, tzinfo=UTC)), {})
    with open(reports_dir(settings) / "index.jsonl", "a") as f:
        f.write('{"run_id": "cut short\n[1, 2]\n{"run_id": "<script>", "file": "x.html", "received": "lots"}\n')
    write_report(settings, run("manual__b", datetime(2026, 12, 2, tzinfo=UTC)), {})
    index = (reports_dir(settings) / "index.html").read_text()
    assert "manual__a" in index and "manual__b" in index and "<script>" not in index
    assert housekeeping.prune_artifacts(settings)["validation_reports"] == 0
    assert "&lt;script&gt;" not in (reports_dir(settings) / "index.html").read_text()  # x.html does not exist


def test_the_task_log_line_is_counts_and_rules_only(settings: Settings) -> None:
    line = tasks.log_line("validate", {"checked": 12, "failed": 3, "failures_by_rule": {"value_plausible": 2,
                                       "unit_accepted": 1}, "segments": ["seg-a", "seg-b"], "seconds": 0.5})
    assert line == ("rpm validate: checked=12 failed=3 failures_by_rule={unit_accepted: 1, value_plausible: 2} "
                    "segments=2 seconds=0.5")


def test_planted_symlinks_are_never_followed(settings: Settings, tmp_path: Path) -> None:
    """A dangling link where the rotated copy goes, a log that is a link, a logs folder that is a link: nothing
    outside the state folder is written or deleted."""
    outside = tmp_path / "outside"
    outside.mkdir()
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    live = run_dir / "ingest.log"
    live.write_bytes(b"x" * (housekeeping.LOG_MAX_BYTES + 1))
    (run_dir / "ingest.log.1").symlink_to(outside / "pwned.txt")  # dangling: a copy through it would create it
    victim = outside / "victim.log"
    victim.write_bytes(b"y" * (housekeeping.LOG_MAX_BYTES + 1))
    (run_dir / "service.log").symlink_to(victim)
    old_note = outside / "old-notes.txt"
    old_note.write_text("keep me")
    age(old_note, time.time() - 100 * 86400)
    Path(settings.airflow_home).mkdir(parents=True, exist_ok=True)
    (Path(settings.airflow_home) / "logs").symlink_to(outside)

    result = housekeeping.prune_artifacts(settings)

    assert not (outside / "pwned.txt").exists()
    assert victim.stat().st_size == housekeeping.LOG_MAX_BYTES + 1  # not truncated through the link
    assert old_note.exists() and result["task_log_files"] == 0
    assert live.stat().st_size == 0 and (run_dir / "ingest.log.1").is_file()
    assert not (run_dir / "ingest.log.1").is_symlink()


def test_a_broken_index_never_fails_a_run_or_the_prune(settings: Settings) -> None:
    write_report(settings, run("manual__a", datetime(2026, 12, 1, tzinfo=UTC)), {})
    with open(reports_dir(settings) / "index.jsonl", "ab") as f:
        f.write(b'{"run_id": "x", "file": "x.html", "received": 1e999}\n\xff\xfe not utf-8\n'
                b'{"run_id": "y", "file": "../../etc/passwd", "received": 1}\n'
                b'{"run_id": "z", "file": "javascript:alert(1)//.html", "received": 1}\n')
    page = write_report(settings, run("manual__b", datetime(2026, 12, 2, tzinfo=UTC)), {})
    assert page.exists()
    index = (reports_dir(settings) / "index.html").read_text()
    assert "manual__b" in index and "passwd" not in index and "javascript" not in index
    housekeeping.prune_artifacts(settings)
    assert "manual__a" in (reports_dir(settings) / "index.html").read_text()
