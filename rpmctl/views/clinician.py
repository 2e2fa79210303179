"""`rpm clinician --as ID <view>`: dispatch to the scoped, audited session and render for a terminal."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from core.ids import check_id
from rpmctl.client import Client
from rpmctl.errors import printable
from rpmctl.views.table import table
from warehouse.glucose import INSUFFICIENT, SUFFICIENT_DAYS, TARGET_EXPECTED_READINGS_MIN, TARGETS

SEVERITY = {1: "CRITICAL", 2: "HIGH", 3: "MODERATE"}


def export_target(a: argparse.Namespace) -> Path:
    """Where export-fhir writes: --out, or a name built from a validated id (it cannot leave the working
    directory)."""
    return Path(a.out or f"{check_id('patient', a.patient_id)}-fhir.json")


def preflight(a: argparse.Namespace) -> None:
    """What can be refused without asking the service (and before a session is looked for): a folder to write
    to that does not exist. The read that follows is audited, so it must not happen for nothing."""
    targets = [export_target(a)] if a.view == "export-fhir" else [Path(a.csv)] if getattr(a, "csv", None) else []
    for target in targets:
        if not target.parent.is_dir():
            raise FileNotFoundError(2, "No such directory", str(target.parent))


def run(client: Client, a: argparse.Namespace) -> Any:
    """One `rpm clinician` view, asked of the clinician service as the logged-in account."""
    if a.view == "patients":
        return client.get("/api/v1/patients")
    if a.view == "patient":
        return client.get(f"/api/v1/patients/{a.patient_id}", days=a.days)
    if a.view == "alerts":
        return client.get("/api/v1/alerts", status=a.status)
    if a.view == "ack":
        return client.post(f"/api/v1/alerts/{a.alert_id}/ack", {"note": a.note})
    if a.view == "billing":
        rows = client.get("/api/v1/billing", month=a.month)
        if a.csv:
            from warehouse.billing import write_csv

            write_csv(rows, Path(a.csv))
        return rows
    if a.view == "evidence":
        return client.get(f"/api/v1/billing/{a.patient_id}/evidence", month=a.month)
    if a.view == "log-time":
        return client.post("/api/v1/time-entries", {
            "patient_id": a.patient, "minutes": a.minutes, "interactive": a.interactive, "note": a.note,
            "date": a.date.isoformat() if a.date else None})
    if a.view == "export-fhir":
        from warehouse.fhir import write_bundle

        target = export_target(a)
        bundle = client.get(f"/api/v1/patients/{a.patient_id}/fhir", days=a.days)
        out = write_bundle(bundle, target)  # 0600: PHI leaves the store
        return {"file": str(out), "observations": len(bundle.get("entry", [])), "resourceType": "Bundle"}
    raise ValueError(f"unknown view {a.view}")


def _fmt(v: Any, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _bp(systolic: float | None, diastolic: float | None) -> str:
    return "-" if systolic is None else f"{systolic:.0f}/{diastolic:.0f}" if diastolic is not None else f"{systolic:.0f}"


def render(view: str, result: Any) -> str:
    if view == "patients":
        return table(["patient", "name", "MRN", "conditions", "last reading (UTC)", "readings 30d", "open alerts"],
                      [[r["patient_id"], f"{r['family_name'] or ''}, {r['given_name'] or ''}".strip(", "), r["mrn"],
                        ",".join(r["conditions"] or []),
                        r["last_reading_at"].strftime("%Y-%m-%d %H:%M") if r["last_reading_at"] else None,
                        r["readings_30d"], r["open_alerts"]] for r in result]) or "no patients on your care team"
    if view == "patient":
        p = result["patient"]
        lines = [printable(f"{p.get('patient_id')}  {p.get('family_name') or ''}, {p.get('given_name') or ''}  "
                           f"MRN {p.get('mrn') or '-'}  born {p.get('birth_date') or '-'}  "
                           f"{p.get('time_zone') or ''}  {','.join(p.get('conditions') or [])}"),
                 "", "Latest vitals"]
        lines.append(table(["metric", "value", "unit", "measured (local)"],
                            [[r["metric"], f"{r['value']:.0f}/{r['diastolic']:.0f}" if r["diastolic"] is not None
                              else _fmt(r["value"]), r["unit"], r["measured_local"]] for r in result["latest"]]))
        lines += ["", "Trends (mean)"]
        lines.append(table(["metric", "7d", "prev 7d", "30d", "min 30d", "max 30d", "n 7d", "n 30d"],
                            [[r["metric"], _bp(r["mean_7d"], r["mean_diastolic_7d"]) if r["metric"] == "blood_pressure"
                              else _fmt(r["mean_7d"]), _fmt(r["mean_prev_7d"]), _fmt(r["mean_30d"]),
                              _fmt(r["min_30d"]), _fmt(r["max_30d"]), r["n_7d"], r["n_30d"]]
                             for r in result["trends"]]))
        lines += ["", f"Open alerts ({len(result['alerts'])})"]
        lines += [f"  {SEVERITY.get(a['severity'], a['severity']):<9} {_rule(a):<20} {a['last_observed']}  "
                  f"since {a['opened_at']:%Y-%m-%d %H:%M}{'  (acknowledged)' if a['acknowledged_by'] else ''}"
                  for a in result["alerts"]]
        if result.get("glucose"):
            lines += ["", render_glucose(result["glucose"])]
        lines += ["", "Daily summary (patient-local days)"]
        lines.append(table(["date", "metric", "n", "min", "mean", "max"],
                            [[r["local_date"], r["metric"], r["readings"], _fmt(r["min_value"]),
                              _bp(r["mean_value"], r["mean_diastolic"]) if r["metric"] == "blood_pressure"
                              else _fmt(r["mean_value"]), _fmt(r["max_value"])] for r in result["daily"][:60]]))
        return "\n".join(lines)
    if view == "alerts":
        if result and any(a.get("resolved_at") for a in result):
            return table(["severity", "patient", "rule", "observed", "opened (UTC)", "resolved (UTC)", "why",
                          "ack", "alert id"],
                         [[SEVERITY.get(a["severity"], a["severity"]), a["patient_id"], _rule(a),
                           a["last_observed"], f"{a['opened_at']:%Y-%m-%d %H:%M}",
                           f"{a['resolved_at']:%Y-%m-%d %H:%M}" if a.get("resolved_at") else "open",
                           a.get("resolution"), a["acknowledged_by"], a["alert_id"]] for a in result])
        return table(["severity", "patient", "rule", "observed", "opened (UTC)", "breaches", "ack", "alert id"],
                      [[SEVERITY.get(a["severity"], a["severity"]), a["patient_id"], _rule(a), a["last_observed"],
                        f"{a['opened_at']:%Y-%m-%d %H:%M}", a["breaches"], a["acknowledged_by"], a["alert_id"]]
                       for a in result]) if result else "no alerts"
    if view == "evidence":
        lines = [f"{result['patient_id']} {result['month']}: codes {', '.join(result['device_codes']) or 'none'}"]
        for p in result["periods"]:
            lines.append(f"  period {p['period_no']} {p['period_start']}..{p['period_end']}: "
                         f"{p['days_with_data']} days with data ({p.get('device_code') or 'no code yet'})")
            for d in p["days"]:
                first = d["readings"][0] if d["readings"] else None
                lines.append(f"    {d['local_date']}  {d['readings_count']} readings" + (f", first {first['metric']} at {first['measured_at']:%H:%M} UTC"
                                             f" from {first['device_id']}" if first else ""))
        return "\n".join(printable(x) for x in lines)
    if view == "billing":
        return table(["patient", "period", "days", "device", "minutes", "management", "flags"],
                      [[r["patient_id"], f"{r.get('period_start') or '-'}..{r.get('period_end') or '-'}",
                        r.get("days_with_data"), ",".join(r.get("device_codes") or []) or None,
                        r.get("management_minutes"), ",".join(r.get("management_codes") or []) or None,
                        " | ".join(r.get("flags") or []) or None] for r in result])
    if view == "ack":
        return f"alert {result['alert_id']} ({result['rule']}, {result['patient_id']}) acknowledged"
    if view == "log-time":
        return (f"logged {result['minutes']} min for {result['patient_id']}"
                f"{' (interactive)' if result['interactive'] else ''}")
    if view == "export-fhir":
        return f"wrote {result['observations']} Observations to {result['file']}"
    return json.dumps(result, indent=2, default=str)


def _rule(alert: dict[str, Any]) -> str:
    """The alert's rule, and the level it opened at when it escalated since."""
    escalated = alert.get("escalated_at") and alert.get("opened_rule")
    return f"{alert['rule']} (from {alert['opened_rule']})" if escalated else alert["rule"]


_ROWS = [("mean", "mean_mg_dl", "mg/dL"), ("GMI", "gmi_percent", "%"), ("CV", "cv_percent", "%"),
         ("TIR 70-180", "tir_70_180", "%"), ("TBR <70", "tbr_below_70", "%"),
         ("TBR <54", "tbr_below_54", "%"), ("TAR >180", "tar_above_180", "%"),
         ("TAR >250", "tar_above_250", "%"),
         ("readings captured", "percent_expected_readings", "%")]


def render_glucose(summary: dict[str, Any] | None) -> str:
    """The summary as a few aligned terminal lines, each metric with its consensus target and verdict; with
    insufficient CGM data, the wear and why instead of metrics."""
    if summary is None:
        return "glucose: no readings in the window"
    s = summary
    head = (f"glucose {s['start']:%Y-%m-%d %H:%M} -> {s['end']:%Y-%m-%d %H:%M} UTC ({s['days']} d): "
            f"{s['readings']} readings ({s['source']})")
    lines = [head]
    shown_rows = _ROWS if s["sufficient_data"] else [
        r for r in _ROWS if r[1] == "percent_expected_readings" and s[r[1]] is not None]
    for label, key, unit in shown_rows:
        value = s[key]
        shown = "-" if value is None else f"{value:.1f}"
        target = f"target {TARGETS[key][0]} {TARGETS[key][1]:g}" if key in TARGETS else ""
        met = s["targets_met"].get(key)
        verdict = "" if met is None else ("met" if met else "NOT MET")
        lines.append(f"  {label:<18}{shown:>7} {unit:<6}{target:<14}{verdict}".rstrip())
    if not s["sufficient_data"]:
        lines.append(f"  {INSUFFICIENT}: {s['insufficient_reason']}")
    lines.append(f"  {'sufficient data':<18}{'yes' if s['sufficient_data'] else 'no':>7}"
                 f"  (>= {TARGET_EXPECTED_READINGS_MIN:g} % of CGM readings over >= {SUFFICIENT_DAYS} days)")
    return "\n".join(lines)
