"""A validation report per pipeline run that an ops person can open: which rules failed, how often.

Rule names, what each protects and counts only — never a reading value, an identifier or a payload. (GX's
own Data Docs render unexpected values, which are PHI here; this page is built from counts instead.)
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from core.settings import Settings
from expectations import clinical, telehealth


def reports_dir(s: Settings) -> Path:
    return Path(s.home) / "reports" / "validation"


def write_report(s: Settings, run: dict, by_reason: dict[str, int]) -> Path:
    """Write ``<run>.html`` and refresh ``index.html``; returns the report's path."""
    protects = {r.name: (suite, r.protects) for suite, rules in
                (("clinical", clinical.rules(s.future_skew_s)), ("telehealth", telehealth.rules(s.future_skew_s)))
                for r in rules}
    rows = "".join(
        f"<tr><td>{html.escape(reason)}</td><td>{html.escape(protects.get(reason, ('structure', ''))[0])}</td>"
        f"<td class=n>{n}</td><td>{html.escape(protects.get(reason, ('', 'message could not be read as contract v1'))[1])}</td></tr>"
        for reason, n in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
    counts = "".join(f"<tr><th>{k}</th><td class=n>{run.get(k) or 0}</td></tr>"
                     for k in ("segments", "messages", "received", "loaded", "quarantined", "duplicates"))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Validation {html.escape(run['run_id'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px;text-align:left}}.n{{text-align:right}}</style></head><body>
<h1>rpm_pipeline validation report</h1><p>Run <code>{html.escape(run['run_id'])}</code> — counts and rule names
only; no reading values or identifiers.</p><h2>Accounting</h2><table>{counts}</table>
<h2>Failed rules</h2><table><tr><th>rule</th><th>suite</th><th>items</th><th>protects</th></tr>{rows or
'<tr><td colspan=4>no item failed validation</td></tr>'}</table><p><a href="index.html">all runs</a></p></body></html>"""
    d = reports_dir(s)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', run['run_id'])}.html"
    path.write_text(page)
    links = "".join(f'<li><a href="{p.name}">{html.escape(p.stem)}</a></li>'
                    for p in sorted(d.glob("*.html"), reverse=True) if p.name != "index.html")
    (d / "index.html").write_text(f"<!doctype html><html><head><meta charset=utf-8><title>Validation reports"
                                  f"</title></head><body><h1>Validation reports</h1><ul>{links}</ul></body></html>")
    return path
