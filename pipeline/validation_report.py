"""A validation report per pipeline run that an ops person can open: which rules failed, how often.

Rule names, what each protects and counts only — never a reading value, an identifier or a payload. (GX's
own Data Docs render unexpected values, which are PHI here; this page is built from counts instead.)

``index.html`` lists the runs newest first with their counts, rendered from ``index.jsonl`` (one line per
report written, so a new run never re-reads every report); rpm_daily prunes both past retention.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from datetime import datetime
from pathlib import Path

from core.settings import Settings
from expectations import clinical, telehealth


def reports_dir(s: Settings) -> Path:
    return Path(s.home) / "reports" / "validation"


log = logging.getLogger("rpm.pipeline")
REPORT_FILE = re.compile(r"[A-Za-z0-9_.-]+\.html")  # what report_path names: an index line may name nothing else
INDEX_SHOWN = 2000  # rows on index.html (a day and a half of 1-minute runs); index.jsonl keeps them all
COUNTS = ("segments", "messages", "received", "loaded", "quarantined", "duplicates")


def report_path(s: Settings, run_id: str) -> Path:
    return reports_dir(s) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', run_id)}.html"


def write_report(s: Settings, run: dict, by_reason: dict[str, int]) -> Path:
    """Write ``<run>.html``, add the run to the index and refresh ``index.html``; returns the report's path."""
    protects = {r.name: (suite, r.protects) for suite, rules in
                (("clinical", clinical.rules(s.future_skew_s)), ("telehealth", telehealth.rules(s.future_skew_s)))
                for r in rules}
    rows = "".join(
        f"<tr><td>{html.escape(reason)}</td><td>{html.escape(protects.get(reason, ('structure', ''))[0])}</td>"
        f"<td class=n>{n}</td><td>{html.escape(protects.get(reason, ('', 'message could not be read as contract v1'))[1])}</td></tr>"
        for reason, n in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
    counts = "".join(f"<tr><th>{k}</th><td class=n>{run.get(k) or 0}</td></tr>" for k in COUNTS)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Validation {html.escape(run['run_id'])}</title>
<style>{_STYLE}</style></head><body>
<h1>rpm_pipeline validation report</h1><p>Run <code>{html.escape(run['run_id'])}</code> — counts and rule names
only; no reading values or identifiers.</p><h2>Accounting</h2><table>{counts}</table>
<h2>Failed rules</h2><table><tr><th>rule</th><th>suite</th><th>items</th><th>protects</th></tr>{rows or
'<tr><td colspan=4>no item failed validation</td></tr>'}</table><p><a href="index.html">all runs</a></p></body></html>"""
    d = reports_dir(s)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = report_path(s, run["run_id"])
    path.write_text(page)
    finished = run.get("finished_at")
    entry = {"run_id": run["run_id"], "file": path.name, "state": run.get("state"),
             "finished_at": finished.isoformat() if isinstance(finished, datetime) else finished,
             **{k: run.get(k) or 0 for k in COUNTS}, "rules": dict(by_reason)}
    try:  # the index is derived from the reports: a broken one must not fail the run (or what follows it)
        with open(d / "index.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        _render_index(d)
    except (OSError, ValueError) as exc:
        log.warning("validation index not updated (%s: %s); the run's report is %s", type(exc).__name__, exc, path)
    return path


def prune_reports(s: Settings, cutoff: float) -> int:
    """Delete reports last written before ``cutoff`` (epoch seconds) and their index lines; returns how many."""
    d = reports_dir(s)
    if d.is_symlink():
        log.warning("not pruning %s: it is a symlink", d)
        return 0
    removed = 0
    for path in d.glob("*.html"):
        if path.name != "index.html" and path.lstat().st_mtime < cutoff:
            path.unlink(missing_ok=True)
            removed += 1
    if (d / "index.jsonl").exists():
        kept = [e for e in _entries(d) if (d / e["file"]).exists()]
        tmp = d / ".index.jsonl.tmp"
        tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
        os.replace(tmp, d / "index.jsonl")
        _render_index(d)
    return removed


def _entries(d: Path) -> list[dict]:
    """Index lines, the last one per run (a retried record_run writes its run again), in writing order."""
    latest: dict[str, dict] = {}
    try:
        lines = (d / "index.jsonl").read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash mid-write, or not ours
        if (isinstance(entry, dict) and isinstance(entry.get("run_id"), str)
                and isinstance(entry.get("file"), str) and REPORT_FILE.fullmatch(entry["file"])):
            latest.pop(entry["run_id"], None)
            latest[entry["run_id"]] = entry
    return list(latest.values())


def _render_index(d: Path) -> None:
    entries = sorted(_entries(d), key=lambda e: str(e.get("finished_at") or ""), reverse=True)
    rows = "".join(
        f'<tr><td>{html.escape(str(e.get("finished_at") or "-"))}</td>'
        f'<td><a href="{html.escape(e["file"])}">{html.escape(e["run_id"])}</a></td>'
        f'<td>{html.escape(str(e.get("state") or "-"))}</td>'
        + "".join(f"<td class=n>{_int(e.get(k))}</td>" for k in ("received", "loaded", "quarantined", "duplicates"))
        + f"<td class=n>{_rate(e)}</td></tr>"
        for e in entries[:INDEX_SHOWN])
    more = (f"<p>{len(entries) - INDEX_SHOWN} older run(s) not shown; their reports are in this folder.</p>"
            if len(entries) > INDEX_SHOWN else "")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>Validation reports</title><style>{_STYLE}"
            "</style></head><body><h1>Validation reports</h1><p>rpm_pipeline runs, newest first.</p><table><tr>"
            "<th>finished (UTC)</th><th>run</th><th>state</th><th>received</th><th>loaded</th><th>quarantined</th>"
            f"<th>duplicates</th><th>quarantine rate</th></tr>{rows or '<tr><td colspan=8>no runs yet</td></tr>'}"
            f"</table>{more}</body></html>")
    tmp = d / ".index.html.tmp"
    tmp.write_text(page)
    os.replace(tmp, d / "index.html")


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    try:
        return int(value)
    except (OverflowError, ValueError):  # inf, nan
        return 0


def _rate(entry: dict) -> str:
    received = _int(entry.get("received"))
    return f"{_int(entry.get('quarantined')) / received:.1%}" if received else "-"


_STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
          "padding:4px 8px;text-align:left}.n{text-align:right}")
