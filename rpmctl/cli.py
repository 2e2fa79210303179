"""`rpm`: the one entry point for devices' provisioning, services, the pipeline and its accounting."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

from rpmctl.settings import Settings


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_init(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.services import init

    init(s)
    print(f"state in {s.home} (secrets: {s.secrets_dir}, CA certificate: {s.ca_cert})")
    return 0


def cmd_up(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.services import up

    info = up(s)
    if a.airflow:
        from rpmctl import airflow_stack

        info["airflow"] = airflow_stack.start(s)
    if a.json:
        _print_json(info)
        return 0
    print(f"broker up (pid {info['broker_pid']}; mqtt {info['mqtt_loopback']}, mqtts {info['mqtts']}), "
          f"ingest up (pid {info['ingest_pid']}); logs in {info['logs']}")
    if a.airflow:
        af = info["airflow"]
        print(f"airflow up: {af['url']}  login {af['username']} / {af['password']}  (also in {af['password_file']})"
              f"\n  rpm_pipeline runs every {s.pipeline_schedule_minutes} min; log {af['log']}")
    return 0


def cmd_down(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl import airflow_stack
    from rpmctl.services import down

    airflow_stopped = airflow_stack.stop(s)  # first: its tasks may be writing the warehouse
    info = {"airflow_stopped": airflow_stopped, **down(s)}
    _print_json(info) if a.json else print(
        ", ".join(f"{k.removesuffix('_stopped')}: {'stopped' if v else 'was not running'}"
                  for k, v in info.items()))
    return 0


def cmd_status(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl import airflow_stack
    from rpmctl.services import status

    _print_json({**status(s), "airflow": airflow_stack.status(s)})
    return 0


def cmd_ingest(s: Settings, a: argparse.Namespace) -> int:
    from ingest.service import main

    return main(s)


def cmd_devices_add(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.devices import ProvisioningError, provision

    since = datetime.fromisoformat(a.since) if a.since else None
    if since is not None and since.tzinfo is None:
        print("error: --since needs a UTC offset, e.g. 2026-11-01T00:00:00+00:00", file=sys.stderr)
        return 2
    try:
        creds = provision(s, a.device_id, a.patient, kind=a.kind, since=since)
    except ProvisioningError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.json:
        _print_json(creds)
    else:
        print(f"device {creds['device_id']} enrolled to patient {creds['patient_id']} since "
              f"{creds['enrolled_since']}\n  broker  mqtts://{creds['host']}:{creds['port']} "
              f"(CA {creds['ca_file']})\n  login   {creds['username']} / {creds['password']}  (shown once)\n"
              f"  topic   {creds['topic']}  (QoS 1, MQTT 5)")
    return 0


def cmd_devices_list(s: Settings, a: argparse.Namespace) -> int:
    from warehouse.audit import AuditLog
    from warehouse.db import clinical
    from warehouse.registry import list_devices

    with clinical(s) as con:
        devices = list_devices(con)
    AuditLog(s).append("admin:devices", "devices-list", sorted({d["patient_id"] for d in devices if d["patient_id"]}),
                       {}, len(devices))  # device -> patient bindings are PHI
    if a.json:
        _print_json(devices)
    else:
        for d in devices:
            print(f"{d['device_id']:<16} {d['kind'] or '-':<8} {d['patient_id'] or '(not enrolled)':<12} "
                  f"since {d['enrolled_since']}")
    return 0


def cmd_pipeline_run(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.pipeline import run_once, seal_open_segments

    seal_open_segments(s)
    try:
        result = run_once(s)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print_json(result) if a.json else print(f"rpm_pipeline {result['run_id']}: {result['state']} "
                                             f"({', '.join(f'{k} {v}' for k, v in result['tasks'].items())})")
    return 0


def cmd_accounting(s: Settings, a: argparse.Namespace) -> int:
    from warehouse.accounting import accounting

    acc = accounting(s)
    if a.json:
        _print_json(acc)
    else:
        print(render_accounting(acc))
    return 0 if acc["balanced"] else 3


def render_accounting(acc: dict) -> str:
    lines = [
        f"messages processed  {acc['messages_processed']:>8}",
        f"received (items)    {acc['received']:>8}",
        f"  loaded            {acc['loaded']:>8}",
        f"  quarantined       {acc['quarantined']:>8}",
        *(f"      {reason:<34} {n:>6}" for reason, n in acc["quarantined_by_reason"].items()),
        f"  duplicates        {acc['duplicates']:>8}",
        f"received = loaded + quarantined + duplicates: "
        f"{acc['received']} = {acc['loaded']} + {acc['quarantined']} + {acc['duplicates']}  "
        f"-> {'HOLDS' if acc['balanced'] else 'BROKEN'}",
        f"pending: {acc['pending']['sealed_messages']} message(s) in {acc['pending']['sealed_segments']} sealed "
        f"segment(s), {acc['pending']['open_messages']} in open segment(s)",
    ]
    return "\n".join(lines)


def cmd_simulate(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.simulator import build_fleet, provision_fleet, publish_fleet

    fleet = build_fleet(patients=a.patients, days=a.days, seed=a.seed)
    provision_fleet(s, fleet, a.days)
    result = {**fleet.manifest(), **publish_fleet(s, fleet, tls=a.tls)}
    _print_json(result) if a.json else print(
        f"{result['patients']} patients, {result['devices']} devices: published {result['published']} "
        f"messages ({result['readings']} readings), all acked by the broker")
    return 0


def cmd_summary(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.summary import latest_vitals, render

    patients = latest_vitals(s)
    _print_json(patients) if a.json else print(render(patients))
    return 0


def cmd_demo(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.demo import run_demo

    return run_demo(s, patients=a.patients, days=a.days, seed=a.seed)


def cmd_config(s: Settings, a: argparse.Namespace) -> int:
    for var, default, doc in Settings.describe():
        print(f"{var}\n    {doc}\n    default: {default}; now: {s.as_env()[var]}")
    return 0


# --- registry --------------------------------------------------------------------------------------------
def _publish(s: Settings, con) -> None:
    from warehouse.serving import publish_snapshot

    publish_snapshot(s, con)


def cmd_patients_add(s: Settings, a: argparse.Namespace) -> int:
    from datetime import date

    from warehouse.db import clinical
    from warehouse.registry import upsert_patient

    conditions = [c.strip() for c in a.conditions.split(",") if c.strip()] if a.conditions else None
    with clinical(s) as con:
        upsert_patient(con, a.patient_id, mrn=a.mrn, given_name=a.given, family_name=a.family,
                       birth_date=date.fromisoformat(a.birth_date) if a.birth_date else None,
                       time_zone=a.tz, conditions=conditions)
        _publish(s, con)
    print(f"patient {a.patient_id} saved")
    return 0


def cmd_patients_import(s: Settings, a: argparse.Namespace) -> int:
    from warehouse.registry import import_patients_csv

    result = import_patients_csv(s, a.csv)
    _print_json(result) if a.json else print(f"imported {result['patients']} patients from {a.csv}")
    return 0


def cmd_patients_list(s: Settings, a: argparse.Namespace) -> int:
    from warehouse.audit import AuditLog
    from warehouse.db import rows as fetch_rows
    from warehouse.serving import serving

    with serving(s) as con:
        rows = fetch_rows(con.execute("""SELECT patient_id, mrn, given_name, family_name, birth_date, time_zone,
                                                conditions FROM patients ORDER BY patient_id"""))
    AuditLog(s).append(f"admin:{a.actor}", "patients-list", [r["patient_id"] for r in rows], {}, len(rows))
    if a.json:
        _print_json(rows)
    else:
        for r in rows:
            print(f"{r['patient_id']:<10} {r['mrn'] or '-':<11} {(r['family_name'] or '-') + ', ' + (r['given_name'] or '-'):<22} "
                  f"{r['birth_date'] or '-'!s:<11} {r['time_zone'] or '-':<20} {','.join(r['conditions'] or [])}")
    return 0


def cmd_patients_threshold(s: Settings, a: argparse.Namespace) -> int:
    from warehouse.db import clinical
    from warehouse.registry import set_threshold

    with clinical(s) as con:
        try:
            set_threshold(con, a.patient_id, a.rule, a.value, a.set_by)
        except KeyError as exc:
            print(f"error: {exc.args[0]}", file=sys.stderr)
            return 2
        _publish(s, con)
    print(f"{a.patient_id}: {a.rule} = {a.value}")
    return 0


def cmd_careteam_add(s: Settings, a: argparse.Namespace) -> int:
    from warehouse.db import clinical
    from warehouse.registry import add_clinician, assign

    with clinical(s) as con:
        add_clinician(con, a.clinician_id, a.name, a.role)
        try:
            added = assign(con, a.clinician_id, a.patient) if a.patient else False
        except KeyError as exc:
            print(f"error: {exc.args[0]}", file=sys.stderr)
            return 2
        _publish(s, con)
    print(f"{a.clinician_id}" + (f" {'added to' if added else 'already on'} the care team of {a.patient}"
                                 if a.patient else " saved"))
    return 0


def cmd_careteam_remove(s: Settings, a: argparse.Namespace) -> int:
    from warehouse.db import clinical
    from warehouse.registry import unassign

    with clinical(s) as con:
        removed = unassign(con, a.clinician_id, a.patient)
        _publish(s, con)
    print(f"{a.clinician_id} {'removed from' if removed else 'was not on'} the care team of {a.patient}")
    return 0


def cmd_careteam_list(s: Settings, a: argparse.Namespace) -> int:
    from warehouse.serving import serving

    with serving(s) as con:
        rows = con.execute("""SELECT c.clinician_id, c.name, c.role, list(t.patient_id ORDER BY t.patient_id)
                                     FILTER (t.patient_id IS NOT NULL)
                              FROM clinicians c LEFT JOIN care_team t ON t.clinician_id = c.clinician_id
                                   AND t.until IS NULL
                              GROUP BY ALL ORDER BY c.clinician_id""").fetchall()
    out = [{"clinician_id": r[0], "name": r[1], "role": r[2], "patients": r[3] or []} for r in rows]
    if a.json:
        _print_json(out)
    else:
        for r in out:
            print(f"{r['clinician_id']:<12} {r['name'] or '-':<20} {r['role'] or '-':<10} "
                  f"{len(r['patients'])} patients: {' '.join(r['patients'])}")
    return 0


# --- clinicians -------------------------------------------------------------------------------------------
def cmd_clinician(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl import clinician_view as view
    from warehouse.access import AccessDenied, ClinicianSession

    session = ClinicianSession(s, a.as_clinician)
    try:
        result = view.run(session, a)
    except AccessDenied as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    except (KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    if a.json:
        _print_json(result)
    else:
        print(view.render(a.view, result))
    return 0


def cmd_audit_verify(s: Settings, a: argparse.Namespace) -> int:
    from warehouse.audit import AuditLog

    result = AuditLog(s).verify()
    _print_json(result) if a.json else print(
        f"audit log intact: {result['records']} records, chain verified" if result["ok"]
        else f"AUDIT LOG TAMPERED: {result['problem']} ({result['records']} records verified before it)")
    return 0 if result["ok"] else 5


def cmd_audit_show(s: Settings, a: argparse.Namespace) -> int:
    from warehouse.audit import AuditLog

    records = AuditLog(s).records()[-a.last:]
    if a.json:
        _print_json(records)
    else:
        for r in records:
            print(f"{r['seq']:>6} {r['ts'][:19]} {r['actor']:<14} {r['action']:<12} {r['outcome']:<28} "
                  f"rows={r['rows']:<5} patients={','.join(r['patients'][:5])}{'...' if len(r['patients']) > 5 else ''}")
    return 0


def cmd_backup(s: Settings, a: argparse.Namespace) -> int:
    from warehouse.serving import backup

    path = backup(s)
    _print_json({"backup": str(path)}) if a.json else print(f"encrypted backup written to {path}")
    return 0


def cmd_keys_rotate(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.rotate import rotate_all

    result = rotate_all(s)
    _print_json(result) if a.json else print(
        f"landing: {result['landing']['segments_reencrypted']} segments re-encrypted under "
        f"{result['landing']['active']}; warehouse: re-encrypted ({result['warehouse']['tables']} tables, "
        f"{result['warehouse']['rows']} rows, all verified); audit: {result['audit']['records']} records; "
        f"retired keys: {', '.join(result['retired']) or 'none'}")
    return 0


def cmd_reports(s: Settings, a: argparse.Namespace) -> int:
    from warehouse import reports

    rows = reports.report(s, a.report, publish=a.publish)
    if a.csv:
        reports.write_csv(rows, a.csv)
    _print_json(rows) if a.json else print(reports.render(a.report, rows))
    return 0


def cmd_ops_status(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.ops_status import ops_status, render_ops

    status = ops_status(s)
    _print_json(status) if a.json else print(render_ops(status))
    return {"healthy": 0, "degraded": 1}.get(status["verdict"], 2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rpm", description="Remote patient monitoring pipeline.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help: str, parent=sub, json_flag: bool = True) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help, description=help)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(fn=fn)
        return sp

    add("init", cmd_init, "create local state, secrets and the CA (idempotent)", json_flag=False)
    up_p = add("up", cmd_up, "start the broker and the ingest service in the background")
    up_p.add_argument("--airflow", action="store_true",
                      help="also run Airflow (scheduler + UI on 127.0.0.1) with rpm_pipeline scheduled")
    add("down", cmd_down, "stop the ingest service (flushing and sealing) and the broker")
    add("status", cmd_status, "pids and ingest counters", json_flag=False)
    add("ingest", cmd_ingest, "run the ingest service in the foreground (what `rpm up` starts)", json_flag=False)

    devices = sub.add_parser("devices", help="device provisioning").add_subparsers(dest="devices_cmd",
                                                                                   required=True)
    d_add = add("add", cmd_devices_add, "enrol a device to a patient and create its broker login",
                parent=devices)
    d_add.add_argument("device_id")
    d_add.add_argument("--patient", required=True, help="patient the device's readings belong to")
    d_add.add_argument("--kind", help="bp, glu, cgm, ox, scale, thermo, ...")
    d_add.add_argument("--since", help="enrollment start (RFC 3339 with offset); default now")
    add("list", cmd_devices_list, "devices and their current patient", parent=devices)

    pipeline = sub.add_parser("pipeline", help="the rpm_pipeline DAG").add_subparsers(dest="pipeline_cmd",
                                                                                      required=True)
    add("run", cmd_pipeline_run, "seal landed data and run rpm_pipeline once (a real Airflow run)",
        parent=pipeline)

    add("accounting", cmd_accounting,
        "received = loaded + quarantined + duplicates, with reasons (exit 3 if it does not hold)")

    for name, fn, help in (("simulate", cmd_simulate, "enrol a simulated fleet and publish its readings"),
                           ("demo", cmd_demo, "up, simulate, run the pipeline, print reports, down")):
        sp = add(name, fn, help, json_flag=name == "simulate")
        sp.add_argument("--patients", type=int, default=24)
        sp.add_argument("--days", type=int, default=14)
        sp.add_argument("--seed", type=int, default=7)
        if name == "simulate":
            sp.add_argument("--tls", action="store_true", help="publish over the TLS listener")
    add("summary", cmd_summary, "latest vitals per patient (the demo's clinician summary)")

    patients = sub.add_parser("patients", help="patient registry").add_subparsers(dest="patients_cmd",
                                                                                  required=True)
    p_add = add("add", cmd_patients_add, "create or update a patient", parent=patients, json_flag=False)
    p_add.add_argument("patient_id")
    p_add.add_argument("--mrn")
    p_add.add_argument("--given")
    p_add.add_argument("--family")
    p_add.add_argument("--birth-date", help="YYYY-MM-DD")
    p_add.add_argument("--tz", help="IANA time zone of the patient's home, e.g. America/Chicago")
    p_add.add_argument("--conditions", help="comma-separated: hypertension,diabetes,copd,heart_failure")
    p_imp = add("import", cmd_patients_import, "import a practice's patient list (CSV)", parent=patients)
    p_imp.add_argument("csv", help="columns: patient_id,mrn,given_name,family_name,birth_date,time_zone,"
                                   "conditions (';'-separated)")
    p_list = add("list", cmd_patients_list, "all patients (an audited PHI read)", parent=patients)
    p_list.add_argument("--actor", default="registry", help="who is asking (recorded in the audit log)")
    p_thr = add("threshold", cmd_patients_threshold, "override an alert threshold for one patient",
                parent=patients, json_flag=False)
    p_thr.add_argument("patient_id")
    p_thr.add_argument("rule", help="e.g. bp_stage2.systolic, glucose_level1_low.mg_dl")
    p_thr.add_argument("value", type=float)
    p_thr.add_argument("--set-by")

    careteam = sub.add_parser("careteam", help="clinicians and care-team assignments").add_subparsers(
        dest="careteam_cmd", required=True)
    c_add = add("add", cmd_careteam_add, "create a clinician and/or put them on a patient's care team",
                parent=careteam, json_flag=False)
    c_add.add_argument("clinician_id")
    c_add.add_argument("--patient")
    c_add.add_argument("--name")
    c_add.add_argument("--role")
    c_rm = add("remove", cmd_careteam_remove, "take a clinician off a patient's care team", parent=careteam,
               json_flag=False)
    c_rm.add_argument("clinician_id")
    c_rm.add_argument("--patient", required=True)
    add("list", cmd_careteam_list, "clinicians and their current patients", parent=careteam)

    clin = sub.add_parser("clinician", help="a clinician's view: only their care team's patients, audited",
                          description="Queries as one clinician; every read of PHI is audited.")
    clin.add_argument("--as", dest="as_clinician", required=True, metavar="CLINICIAN_ID")
    views = clin.add_subparsers(dest="view", required=True)
    add("patients", cmd_clinician, "your patients with last reading and open alerts", parent=views)
    v_pat = add("patient", cmd_clinician, "one patient: latest vitals, daily summaries, trends, alerts, glucose",
                parent=views)
    v_pat.add_argument("patient_id")
    v_pat.add_argument("--days", type=int, default=30)
    add("alerts", cmd_clinician, "open alerts, most severe first", parent=views)
    v_ack = add("ack", cmd_clinician, "acknowledge an alert (it resolves when readings return to range)",
                parent=views)
    v_ack.add_argument("alert_id")
    v_ack.add_argument("--note")
    v_bill = add("billing", cmd_clinician, "RPM billing eligibility (99445/99454, 99470/99457/99458)",
                 parent=views)
    v_bill.add_argument("--month", help="YYYY-MM (default: this month)")
    v_bill.add_argument("--csv", help="also write the report to this CSV file")
    v_time = add("log-time", cmd_clinician, "log treatment-management minutes for a patient", parent=views)
    v_time.add_argument("minutes", type=int)
    v_time.add_argument("--patient", required=True)
    v_time.add_argument("--interactive", action="store_true",
                        help="the time included a real-time interactive communication with the patient")
    v_time.add_argument("--note")
    v_fhir = add("export-fhir", cmd_clinician, "write a FHIR R4 Bundle of vital-signs Observations",
                 parent=views)
    v_fhir.add_argument("patient_id")
    v_fhir.add_argument("--days", type=int)
    v_fhir.add_argument("--out", help="file to write (default: <patient>-fhir.json)")

    rep = add("reports", cmd_reports, "telehealth reports from the de-identified store (no PHI)")
    rep.add_argument("report", choices=["education", "appointments", "connectivity", "firmware", "adherence",
                                        "pipeline"])
    rep.add_argument("--publish", action="store_true",
                     help="for use outside the practice: counts below 11 suppressed, no pseudonymous keys")
    rep.add_argument("--csv", help="also write the report to this CSV file")

    ops = sub.add_parser("ops", help="pipeline health").add_subparsers(dest="ops_cmd", required=True)
    add("status", cmd_ops_status, "last runs, ingest state, backlog: healthy / degraded / failing (exit 0/1/2)",
        parent=ops)

    audit = sub.add_parser("audit", help="the PHI access audit log").add_subparsers(dest="audit_cmd",
                                                                                   required=True)
    add("verify", cmd_audit_verify, "check the hash chain; exit 5 if a record was edited or removed",
        parent=audit)
    a_show = add("show", cmd_audit_show, "the last audit records", parent=audit)
    a_show.add_argument("--last", type=int, default=20)

    add("backup", cmd_backup, "an encrypted, consistent copy of the clinical warehouse in var/backups/")

    keys_p = sub.add_parser("keys", help="encryption keys").add_subparsers(dest="keys_cmd", required=True)
    add("rotate", cmd_keys_rotate, "re-encrypt landing, warehouse, snapshots and audit log under new keys",
        parent=keys_p)
    add("config", cmd_config, "every RPM_* setting with its documentation", json_flag=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return int(args.fn(settings, args) or 0)


if __name__ == "__main__":
    sys.exit(main())
