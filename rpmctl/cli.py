"""`rpm`: the one entry point for devices' provisioning, services, the pipeline and its accounting."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import traceback
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from core import keys
from core.ids import InvalidId, check_id
from core.settings import Settings
from rpmctl.errors import INTERNAL, PIPE_CLOSED, QUALITY, TAMPERED, USAGE, UserError, one_line, printable
from rpmctl.views.table import table


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# --- argument types: a bad value is refused by the parser, with the rule, before anything runs -------------
def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {n}")
    return n


def _bounded_int(high: int, what: str):
    """A positive whole number up to ``high`` (beyond it the value cannot be meant)."""
    def parse(text: str) -> int:
        n = _positive_int(text)
        if n > high:
            raise argparse.ArgumentTypeError(f"{n} is more than {high} {what}")
        return n
    parse.__name__ = what
    return parse


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _id(what: str):
    """An id of the registry's one alphabet (core/ids.py): it names files, topics and audit records."""
    def parse(text: str) -> str:
        try:
            return check_id(what, text)
        except InvalidId as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = f"{what} id"
    return parse


def _text(text: str) -> str:
    """Free text (names, notes): no control characters, which would let a stored value forge terminal lines."""
    if not text.isprintable():
        raise argparse.ArgumentTypeError(f"{printable(text)!r} contains control characters")
    return text


def _iso_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date: use YYYY-MM-DD") from None


def _time_zone(text: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown time zone {text!r}: use an IANA name such as "
                                         "America/Chicago") from None
    return text


def _month(text: str) -> str:
    try:
        datetime.strptime(text, "%Y-%m")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a month: use YYYY-MM") from None
    return text


_DURATION_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


def _duration(text: str) -> timedelta:
    """How far back: a whole number and a unit, m(inutes), h(ours) or d(ays): 30m, 24h, 7d."""
    number, unit = text[:-1], text[-1:]
    if unit not in _DURATION_UNITS or not (number.isascii() and number.isdigit()) or int(number) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use a whole number and m, h or d "
                                         "(30m, 24h, 7d)")
    try:
        delta = timedelta(**{_DURATION_UNITS[unit]: int(number)})
    except OverflowError:
        delta = timedelta.max
    if delta >= datetime.now(UTC) - datetime.min.replace(tzinfo=UTC):
        raise argparse.ArgumentTypeError(f"{text!r} reaches further back than dates go")
    return delta


def cmd_init(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.services import init

    init(s)
    print(f"state in {s.home} (secrets: {s.secrets_dir}, CA certificate: {s.ca_cert})")
    return 0


def cmd_up(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.services import up

    info = up(s, watchdog=True)
    if a.airflow:
        from rpmctl.services import airflow_stack

        info["airflow"] = airflow_stack.start(s)
    if a.json:
        _print_json(info)
        return 0
    print(f"broker up (pid {info['broker_pid']}; mqtt {info['mqtt_loopback']}, mqtts {info['mqtts']}), "
          f"ingest up (pid {info['ingest_pid']}); logs in {info['logs']}")
    print(f"clinician service up (pid {info['service_pid']}): {info['service_url']}/  "
          f"(certificate signed by {s.ca_cert}: import it into the browser, or pass it as the CA)")
    if info["metrics_pid"]:
        print(f"metrics up (pid {info['metrics_pid']}): {info['metrics_url']}  (Prometheus; ingest's on port "
              f"{s.ingest_metrics_port}; deploy/prometheus/)")
    print(f"watchdog up (pid {info['watchdog_pid']}): restarts a component that crashes (rpm status)")
    from service.accounts import Accounts

    users = Accounts(s).list()
    if not any(u.role == "admin" for u in users):
        print("  no administrator yet: create the first one with\n"
              "    rpm users add NAME --role admin        (prints the authenticator link for its second factor)\n"
              "  then clinicians: rpm careteam add DR-ID --name ... --patient ...  and  "
              "rpm users add DR-ID --role clinician")
    from rpmctl.tools.demo import DEMO_CLINICIAN, demo_password_file

    if any(u.username == DEMO_CLINICIAN for u in users) and demo_password_file(s).exists():
        print(f"  the demo's nurse: log in as {DEMO_CLINICIAN} with the password in {demo_password_file(s)}")
    if a.airflow:
        af = info["airflow"]
        print(f"airflow up: {af['url']}  login {af['username']} / {af['password']}  (also in {af['password_file']})"
              f"\n  rpm_pipeline runs every {s.pipeline_schedule_minutes} min; log {af['log']}")
    return 0


def cmd_down(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.services import airflow_stack, down

    if not _has_state(s):  # safe anywhere (`make clean` runs it), but says where it looked
        if a.json:
            _print_json({"watchdog_stopped": False, "airflow_stopped": False, "service_stopped": False,
                         "ingest_stopped": False, "broker_stopped": False})
        else:
            print(f"nothing to stop: RPM_HOME={s.home} holds no rpm state")
        return 0
    from rpmctl.services import supervisor

    watchdog_stopped = supervisor.stop(s)  # before anything it would bring back
    airflow_stopped = airflow_stack.stop(s)  # then Airflow: its tasks may be writing the warehouse
    info = {"airflow_stopped": airflow_stopped, **down(s)}
    info["watchdog_stopped"] = watchdog_stopped  # down() found it stopped already
    _print_json(info) if a.json else print(
        ", ".join(f"{k.removesuffix('_stopped')}: {'stopped' if v else 'was not running'}"
                  for k, v in info.items()))
    return 0


def cmd_status(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.services import airflow_stack, status
    from rpmctl.views.status import render_status

    st = {**status(s), "airflow": airflow_stack.status(s)}
    _print_json(st) if a.json else print(render_status(st))
    return 0


def cmd_ingest(s: Settings, a: argparse.Namespace) -> int:
    from ingest.service import main

    return main(s)


def cmd_metrics(s: Settings, a: argparse.Namespace) -> int:
    from pipeline.metrics import MetricsError, serve

    try:
        return serve(s)
    except MetricsError as exc:
        raise UserError(str(exc)) from None


def cmd_devices_add(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.admin.devices import ProvisioningError, provision
    from rpmctl.errors import UserError

    try:
        since = datetime.fromisoformat(a.since) if a.since else None
        if since is not None and since.tzinfo is not None:
            since.astimezone(UTC)  # an instant outside years 1-9999 in UTC raises here, not later
    except (ValueError, OverflowError):
        raise UserError(f"--since {a.since!r} is not an RFC 3339 time: use e.g. 2026-11-01T00:00:00+00:00") from None
    try:
        creds = provision(s, a.device_id, a.patient, kind=a.kind, since=since, new_password=a.new_password)
    except ProvisioningError as exc:
        raise UserError(str(exc)) from None
    if a.json:
        _print_json(creds)
    else:
        login = (f"{creds['username']} / {creds['password']}  (shown once)" if creds["password"]
                 else f"{creds['username']} (its password is unchanged; --new-password issues a new one)")
        print(f"device {creds['device_id']} enrolled to patient {creds['patient_id']} since "
              f"{creds['enrolled_since']}\n  broker  mqtts://{creds['host']}:{creds['port']} "
              f"(CA {creds['ca_file']})\n  login   {login}\n"
              f"  topic   {creds['topic']}  (QoS 1, MQTT 5)")
    return 0


def cmd_devices_list(s: Settings, a: argparse.Namespace) -> int:
    from warehouse.audit import AuditLog
    from warehouse.registry import list_devices
    from warehouse.serving import serving

    if not s.clinical_db.exists():
        devices = []
    else:
        with serving(s) as con:
            devices = list_devices(con)
    from warehouse.admin import operator

    AuditLog(s).append(operator(), "devices-list", sorted({d["patient_id"] for d in devices if d["patient_id"]}),
                       {}, len(devices))  # device -> patient bindings are PHI
    if a.json:
        _print_json(devices)
    else:
        print(table(["device", "kind", "patient", "enrolled since"],
                    ([d["device_id"], d["kind"], d["patient_id"] or "(not enrolled)", d["enrolled_since"]]
                     for d in devices), empty="no devices"))
    return 0


def cmd_pipeline_run(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.services.airflow_run import run_once, seal_open_segments

    seal_open_segments(s)
    try:
        result = run_once(s)
    except RuntimeError as exc:
        raise UserError(str(exc), INTERNAL) from None
    gate = result["quality_gate"]
    code = QUALITY if gate["level"] == "fail" else 0
    if a.json:
        _print_json(result)
        return code
    print(f"rpm_pipeline {result['run_id']}: {result['state']} "
          f"({', '.join(f'{k} {v}' for k, v in result['tasks'].items())})")
    if result["rejected"]:
        print(f"warning: set aside {len(result['rejected'])} unreadable landing segment(s) in landing/rejected/: "
              + ", ".join(f"{r['segment']}.seg ({r['reason']})" for r in result["rejected"])
              + "; fix the cause, then `rpm landing replay NAME` (README: Rejected segments)")
    if gate["level"] != "ok":
        print(f"{'error' if code else 'warning'}: quality gate: {gate['message']}; loaded and published all the "
              f"same; which rules: {gate['validation_report']}", file=sys.stderr if code else sys.stdout)
    return code


def cmd_accounting(s: Settings, a: argparse.Namespace) -> int:
    from warehouse.accounting import accounting

    acc = accounting(s)
    if a.json:
        _print_json(acc)
    else:
        print(render_accounting(acc))
    return 0 if acc["balanced"] else 3


def render_accounting(acc: dict) -> str:
    from warehouse.accounting import describe_rejected

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
        *describe_rejected(acc),
    ]
    return "\n".join(lines)


def cmd_simulate(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.tools.simulator import build_fleet, provision_fleet, publish_fleet

    fleet = build_fleet(patients=a.patients, days=a.days, seed=a.seed)
    provision_fleet(s, fleet, a.days)
    result = {**fleet.manifest(), **publish_fleet(s, fleet, tls=a.tls)}
    _print_json(result) if a.json else print(
        f"{result['patients']} patients, {result['devices']} devices: published {result['published']} "
        f"messages ({result['readings']} readings), all acked by the broker")
    return 0


def cmd_summary(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.views.summary import latest_vitals, render

    patients = latest_vitals(s)
    _print_json(patients) if a.json else print(render(patients))
    return 0


def cmd_demo(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.tools.demo import run_demo

    return run_demo(s, patients=a.patients, days=a.days, seed=a.seed)


def cmd_config(s: Settings, a: argparse.Namespace) -> int:
    for var, default, doc in Settings.describe():
        print(f"{var}\n    {doc}\n    default: {default}; now: {s.as_env()[var]}")
    return 0


# --- registry --------------------------------------------------------------------------------------------
def cmd_patients_add(s: Settings, a: argparse.Namespace) -> int:
    from warehouse import admin

    conditions = [c.strip() for c in a.conditions.split(",") if c.strip()] if a.conditions else None
    admin.save_patient(s, admin.operator(), a.patient_id, mrn=a.mrn, given_name=a.given, family_name=a.family,
                       birth_date=a.birth_date, time_zone=a.tz, conditions=conditions)
    print(f"patient {a.patient_id} saved")
    return 0


def cmd_patients_import(s: Settings, a: argparse.Namespace) -> int:
    from warehouse import admin

    result = admin.import_patients(s, admin.operator(), a.csv)
    _print_json(result) if a.json else print(f"imported {result['patients']} patients from {a.csv}")
    return 0


def cmd_patients_list(s: Settings, a: argparse.Namespace) -> int:
    from warehouse.audit import AuditLog
    from warehouse.db import rows as fetch_rows
    from warehouse.serving import serving

    with serving(s) as con:
        rows = fetch_rows(con.execute("""SELECT patient_id, mrn, given_name, family_name, birth_date, time_zone,
                                                conditions FROM patients ORDER BY patient_id"""))
    from warehouse.admin import operator

    AuditLog(s).append(operator(), "patients-list", [r["patient_id"] for r in rows], {}, len(rows))
    if a.json:
        _print_json(rows)
    else:
        print(table(["patient", "MRN", "name", "born", "time zone", "conditions"],
                    ([r["patient_id"], r["mrn"], f"{r['family_name'] or '-'}, {r['given_name'] or '-'}",
                      r["birth_date"], r["time_zone"], ",".join(r["conditions"] or [])] for r in rows),
                    empty="no patients"))
    return 0


def cmd_patients_threshold(s: Settings, a: argparse.Namespace) -> int:
    from warehouse import admin

    try:
        admin.set_threshold(s, admin.operator(), a.patient_id, a.rule, a.value)
    except KeyError as exc:
        raise UserError(exc.args[0]) from None
    print(f"{a.patient_id}: {a.rule} = {a.value}")
    return 0


def cmd_careteam_add(s: Settings, a: argparse.Namespace) -> int:
    from warehouse import admin

    try:
        result = admin.assign(s, admin.operator(), a.clinician_id, a.patient, name=a.name, role=a.role)
    except KeyError as exc:
        raise UserError(exc.args[0]) from None
    print(f"{a.clinician_id}" + (f" {'added to' if result['added'] else 'already on'} the care team of "
                                 f"{a.patient}" if a.patient else " saved"))
    return 0


def cmd_careteam_remove(s: Settings, a: argparse.Namespace) -> int:
    from warehouse import admin

    try:
        result = admin.unassign(s, admin.operator(), a.clinician_id, a.patient)
    except KeyError as exc:
        raise UserError(exc.args[0]) from None
    print(f"{a.clinician_id} {'removed from' if result['removed'] else 'was not on'} the care team of {a.patient}")
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
        print(table(["clinician", "name", "role", "patients"],
                    ([r["clinician_id"], r["name"], r["role"], f"{len(r['patients'])}: {' '.join(r['patients'])}"]
                     for r in out), empty="no clinicians"))
    return 0


# --- clinicians: through the service, as the logged-in account ----------------------------------------------
def cmd_clinician(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.client import Client, revive
    from rpmctl.views import clinician as view

    view.preflight(a)
    result = view.run(Client(expected=a.as_clinician), a)
    if a.json:
        _print_json(result)
    else:
        print(view.render(a.view, revive(result)))
    return 0


def _read_password(a: argparse.Namespace, prompt: str = "password: ", confirm: bool = False) -> str:
    """From stdin (--password-stdin: the first line) or, on a terminal, typed without echo."""
    import getpass

    if a.password_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
        if not password:
            raise UserError("--password-stdin: no password on standard input")
        return password
    if not sys.stdin.isatty():
        raise UserError("no terminal to type a password on: pass it with --password-stdin")
    password = getpass.getpass(prompt)
    if confirm and getpass.getpass("again: ") != password:
        raise UserError("the two passwords differ")
    return password


def cmd_login(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.client import login

    password = _read_password(a)
    totp = a.totp
    try:
        info = login(s, a.as_user, password, totp)
    except UserError as exc:
        if "TOTP" not in str(exc) or totp or a.password_stdin or not sys.stdin.isatty():
            raise
        import getpass

        info = login(s, a.as_user, password, getpass.getpass("authenticator code: ").strip())
    _print_json(info) if a.json else print(
        f"logged in to {info['url']} as {info['username']} ({info['role']}); the session ends after "
        f"{info['idle_minutes']} idle minutes (token in {info['session_file']})")
    return 0


def cmd_logout(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.client import logout

    ended = logout()
    _print_json({"logged_out": ended}) if a.json else print("logged out" if ended else "no session")
    return 0


def cmd_serve(s: Settings, a: argparse.Namespace) -> int:
    from service.server import serve

    serve(s)
    return 0


# --- accounts of the service (the operator holding the keys; every change audited) -------------------------
def _accounts(s: Settings):
    from service.accounts import Accounts

    return Accounts(s)


def _account_change(s: Settings, action: str, username: str, change: dict) -> None:
    from warehouse.admin import operator
    from warehouse.audit import AuditLog

    AuditLog(s).append(operator(), f"accounts:{action}", [], {"username": username, **change}, 1)


def cmd_users_add(s: Settings, a: argparse.Namespace) -> int:
    from service.accounts import AccountError

    clinician_id = None
    if a.role == "clinician":
        from warehouse.serving import serving

        clinician_id = a.username  # a clinician's account is named by their registry id
        if s.clinical_db.exists():
            with serving(s) as con:
                known = con.execute("SELECT 1 FROM clinicians WHERE clinician_id = ?", [clinician_id]).fetchone()
        else:
            known = None
        if not known:
            raise UserError(f"no clinician {clinician_id} in the registry: add them first "
                            f"(rpm careteam add {clinician_id} --name ...)")
    password = _read_password(a, confirm=True)
    try:
        user, uri = _accounts(s).add(a.username, a.role, password, clinician_id=clinician_id, totp=a.totp)
    except AccountError as exc:
        raise UserError(str(exc)) from None
    _account_change(s, "add", a.username, {"after": {"role": user.role, "totp": user.totp}})
    out = {**user.as_dict(), "totp_uri": uri}
    if a.json:
        _print_json(out)
    else:
        print(f"account {user.username} ({user.role}) created")
        if uri:
            print(f"  second factor: add this to an authenticator app (shown once):\n  {uri}")
    return 0


def cmd_users_list(s: Settings, a: argparse.Namespace) -> int:
    users = [u.as_dict() for u in _accounts(s).list()]
    if a.json:
        _print_json(users)
    else:
        print(table(["account", "role", "clinician", "TOTP", "state", "created"],
                    ([u["username"], u["role"], u["clinician_id"], "yes" if u["totp"] else "no",
                      "disabled" if u["disabled"] else "locked" if u["locked"] else "active", u["created_at"]]
                     for u in users), empty="no accounts: rpm users add NAME --role admin --password-stdin"))
    return 0


def cmd_users_disable(s: Settings, a: argparse.Namespace) -> int:
    from service.accounts import AccountError

    try:
        user = _accounts(s).set_disabled(a.username, not a.enable)
    except AccountError as exc:
        raise UserError(str(exc)) from None
    _account_change(s, "enable" if a.enable else "disable", a.username, {"after": {"disabled": user.disabled}})
    _print_json(user.as_dict()) if a.json else print(
        f"account {user.username} {'enabled' if a.enable else 'disabled (its sessions ended)'}")
    return 0


def cmd_users_reset_password(s: Settings, a: argparse.Namespace) -> int:
    from service.accounts import AccountError

    accounts = _accounts(s)
    try:
        accounts.get(a.username)
        password = _read_password(a, confirm=True)
        uri = accounts.reset_password(a.username, password, new_totp=a.new_totp)
    except AccountError as exc:
        raise UserError(str(exc)) from None
    _account_change(s, "reset-password", a.username, {"new_totp": uri is not None})
    if a.json:
        _print_json({"username": a.username, "totp_uri": uri})
    else:
        print(f"password of {a.username} changed; its lock cleared and its sessions ended")
        if uri:
            print(f"  new second factor (shown once):\n  {uri}")
    return 0


def cmd_audit_verify(s: Settings, a: argparse.Namespace) -> int:
    from warehouse.audit import AuditLog

    result = AuditLog(s).verify()
    _print_json(result) if a.json else print(
        f"audit log intact: {result['records']} records, chain verified" if result["ok"]
        else f"AUDIT LOG TAMPERED: {result['problem']} ({result['records']} records verified before it)")
    return 0 if result["ok"] else TAMPERED


def cmd_audit_show(s: Settings, a: argparse.Namespace) -> int:
    from core.keyring import DecryptError
    from warehouse.audit import AuditLog

    try:
        records = AuditLog(s).records()[-a.last:]
    except DecryptError as exc:
        raise UserError(f"audit log tampered: a record cannot be authenticated ({exc}): see rpm audit verify",
                        TAMPERED) from None
    if a.json:
        _print_json(records)
    else:
        # Stored strings are shown escaped (table()): a hostile value cannot forge a line of this listing.
        print(table(["seq", "time (UTC)", "actor", "action", "outcome", "rows", "patients"],
                    ([r["seq"], r["ts"][:19], r["actor"], r["action"], r["outcome"], r["rows"],
                      ",".join(r["patients"][:5]) + ("..." if len(r["patients"]) > 5 else "")] for r in records),
                    empty="no audit records"))
    return 0


def cmd_backup(s: Settings, a: argparse.Namespace) -> int:
    from warehouse.serving import backup

    path = backup(s)
    _print_json({"backup": str(path)}) if a.json else print(f"encrypted backup written to {path}")
    return 0


def cmd_keys_rotate(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.admin.rotate import RotationRefused, rotate_all
    from rpmctl.errors import UserError

    try:
        result = rotate_all(s)
    except RotationRefused as exc:
        raise UserError(f"key rotation refused: {exc}") from None
    _print_json(result) if a.json else print(
        f"landing: {result['landing']['segments_reencrypted']} segments re-encrypted under "
        f"{result['landing']['active']}; warehouse: re-encrypted ({result['warehouse']['tables']} tables, "
        f"{result['warehouse']['rows']} rows, all verified); telehealth store: rebuilt under a new key "
        f"({result['telehealth']['rows']} rows); audit: {result['audit']['records']} records; "
        f"retired keys: {', '.join(result['retired']) or 'none'}")
    return 0


def cmd_reports(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.views import reports as report_views
    from warehouse import reports

    pipeline_only = [flag for flag, given in (("--since", a.since), ("--failed", a.failed)) if given]
    if pipeline_only and a.report != reports.PIPELINE:
        raise UserError(f"{' and '.join(pipeline_only)} apply to the pipeline report only")
    if a.csv is not None and not a.csv.strip():
        raise UserError("--csv needs a file name")
    if a.report == reports.PIPELINE and not a.publish:
        rows = reports.pipeline_runs(s, since=a.since, failed_only=a.failed)
    else:
        rows = reports.report(s, a.report, publish=a.publish)
    if a.csv:
        reports.write_csv(rows, a.csv)
    if a.json:
        print(report_views.to_json(rows))
    else:
        print(f"# {reports.route(a.report, a.publish)}")
        print(report_views.render(a.report, rows, wide=a.wide, since=a.since, failed=a.failed))
    return 0


def cmd_ops_status(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.views.ops import ops_status, render_ops

    status = ops_status(s)
    _print_json(status) if a.json else print(render_ops(status))
    return {"healthy": 0, "degraded": 1}.get(status["verdict"], 2)


# --- poison segments and quarantine replay ------------------------------------------------------------------
def cmd_landing_rejected(s: Settings, a: argparse.Namespace) -> int:
    from warehouse.ledger import waiting_rejected
    from warehouse.serving import serving

    if not s.clinical_db.exists():
        waiting = [w.to_json() for w in waiting_rejected(None, s.landing_dir)]
    else:
        with serving(s) as con:  # a file set aside since the snapshot is read from its sidecar
            waiting = [w.to_json() for w in waiting_rejected(con, s.landing_dir)]
    if a.json:
        _print_json(waiting)
        return 0
    if not waiting:
        print("no rejected segments: every sealed segment was absorbed or is pending")
    for w in waiting:
        where = "" if w["in_rejected_dir"] else "  (FILE MISSING from landing/rejected/)"
        print(f"{w['segment']}  {w['reason']}  {w['records']} message(s), {w['bytes']} bytes, rejected "
              f"{w['rejected_at'][:19]}{where}\n    {w['detail']}")
    return 0


def cmd_landing_replay(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.errors import UserError
    from warehouse.db import clinical
    from warehouse.ledger import replay_rejected

    if bool(a.name) == bool(a.all):
        raise UserError("name one rejected segment or pass --all (see rpm landing rejected)")
    with clinical(s) as con:
        try:
            moved = replay_rejected(con, s.landing_dir, None if a.all else [a.name])
        except (FileNotFoundError, FileExistsError) as exc:
            raise UserError(f"{exc} (see rpm landing rejected)") from None
    if a.json:
        _print_json({"replayed": moved})
    else:
        print(f"moved back to landing/sealed/: {', '.join(moved) or 'nothing'}; the next rpm pipeline run "
              "absorbs each, or sets it aside again with its new reason")
    return 0


def cmd_quarantine_list(s: Settings, a: argparse.Namespace) -> int:
    from pipeline.replay import KNOWN_REASONS, list_quarantine
    from rpmctl.errors import UserError
    from warehouse.serving import serving

    if a.reason is not None and a.reason not in KNOWN_REASONS:
        raise UserError(f"unknown quarantine reason {a.reason!r}: one of {', '.join(sorted(KNOWN_REASONS))}")
    try:
        with serving(s) as con:
            listing = list_quarantine(con, a.reason, a.limit)
    except FileNotFoundError:
        raise UserError("no clinical warehouse yet: run rpm pipeline run first") from None
    if a.json:
        _print_json(listing.to_json())
        return 0
    print(f"quarantine: {listing.total} item(s)")
    print(table(["reason", "items", "replay"], ([reason, n, "replayable" if listing.replayable[reason]
                                                 else "structural: not replayable"]
                                                for reason, n in listing.by_reason.items())))
    scope = f" with {a.reason}" if a.reason else ""
    print(f"\nitems{scope}, newest first: {len(listing.items)} of {listing.matching}")
    print(table(["item", "device", "kind", "reasons", "received (UTC)"],
                ([i["row_key"], i["device_id"], i["kind"] or "?", ",".join(i["reasons"]), str(i["received_at"])[:19]]
                 for i in listing.items)))
    return 0


def cmd_quarantine_replay(s: Settings, a: argparse.Namespace) -> int:
    from pipeline.replay import NotReplayable, replay_quarantine
    from rpmctl.errors import UserError

    try:
        result = replay_quarantine(s, a.reason)
    except NotReplayable as exc:
        raise UserError(str(exc)) from None
    if a.json:
        _print_json(result.to_json())
        return 0
    still = ", ".join(f"{k} {v}" for k, v in result.still_by_reason.items())
    print(f"replayed {result.examined} item(s) quarantined as {result.reason}: {result.loaded} loaded, "
          f"{result.duplicates} duplicate(s), {result.still_quarantined} still quarantined"
          + (f" ({still})" if still else "")
          + (f"; {result.not_rebuilt} could not be rebuilt and were left as they were" if result.not_rebuilt else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rpm", description="Remote patient monitoring pipeline.")
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
    add("status", cmd_status, "each component's pid and restarts (the watchdog's and Airflow's), ingest counters")
    add("ingest", cmd_ingest, "run the ingest service in the foreground (what `rpm up` starts)", json_flag=False)
    add("metrics", cmd_metrics, "run the Prometheus exporter of pipeline runs, backlog, audit log and Airflow's "
        "StatsD metrics in the foreground (what `rpm up` starts)", json_flag=False)

    devices = sub.add_parser("devices", help="device provisioning").add_subparsers(dest="devices_cmd",
                                                                                   required=True)
    d_add = add("add", cmd_devices_add, "enrol a device to a patient and create its broker login",
                parent=devices)
    d_add.add_argument("device_id")
    d_add.add_argument("--patient", required=True, help="patient the device's readings belong to")
    d_add.add_argument("--kind", help="what the device is (required for a new device; it decides what it may "
                       "publish): bp, ox, scale, thermo, glu, cgm, hub, app")
    d_add.add_argument("--since", help="enrollment start (RFC 3339 with offset); default now. For a device "
                       "already enrolled to the same patient, an earlier start moves its enrollment back")
    d_add.add_argument("--new-password", action="store_true",
                       help="issue a new broker password for an existing device (the old one stops working)")
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
        sp.add_argument("--patients", type=_positive_int, default=24)
        sp.add_argument("--days", type=_positive_int, default=14)
        sp.add_argument("--seed", type=int, default=7)
        if name == "simulate":
            sp.add_argument("--tls", action="store_true", help="publish over the TLS listener")
    add("summary", cmd_summary, "latest vitals per patient (the demo's clinician summary)")

    patients = sub.add_parser("patients", help="patient registry").add_subparsers(dest="patients_cmd",
                                                                                  required=True)
    p_add = add("add", cmd_patients_add, "create or update a patient", parent=patients, json_flag=False)
    p_add.add_argument("patient_id", type=_id("patient"))
    p_add.add_argument("--mrn", type=_text)
    p_add.add_argument("--given", type=_text)
    p_add.add_argument("--family", type=_text)
    p_add.add_argument("--birth-date", type=_iso_date, help="YYYY-MM-DD")
    p_add.add_argument("--tz", type=_time_zone, help="IANA time zone of the patient's home, e.g. America/Chicago")
    p_add.add_argument("--conditions", type=_text,
                       help="comma-separated: hypertension,diabetes,copd,heart_failure")
    p_imp = add("import", cmd_patients_import, "import a practice's patient list (CSV)", parent=patients)
    p_imp.add_argument("csv", help="columns: patient_id,mrn,given_name,family_name,birth_date,time_zone,"
                                   "conditions (';'-separated)")
    add("list", cmd_patients_list, "all patients (an audited PHI read)", parent=patients)
    p_thr = add("threshold", cmd_patients_threshold, "override an alert threshold for one patient",
                parent=patients, json_flag=False)
    p_thr.add_argument("patient_id", type=_id("patient"))
    p_thr.add_argument("rule", help="e.g. bp_stage2.systolic, glucose_level1_low.mg_dl")
    p_thr.add_argument("value", type=_finite_float)

    careteam = sub.add_parser("careteam", help="clinicians and care-team assignments").add_subparsers(
        dest="careteam_cmd", required=True)
    c_add = add("add", cmd_careteam_add, "create a clinician and/or put them on a patient's care team",
                parent=careteam, json_flag=False)
    c_add.add_argument("clinician_id", type=_id("clinician"))
    c_add.add_argument("--patient", type=_id("patient"))
    c_add.add_argument("--name", type=_text)
    c_add.add_argument("--role", type=_text)
    c_rm = add("remove", cmd_careteam_remove, "take a clinician off a patient's care team", parent=careteam,
               json_flag=False)
    c_rm.add_argument("clinician_id", type=_id("clinician"))
    c_rm.add_argument("--patient", type=_id("patient"), required=True)
    add("list", cmd_careteam_list, "clinicians and their current patients", parent=careteam)

    clin = sub.add_parser("clinician", help="a clinician's view, through the service as the logged-in account",
                          description="Asks the clinician service as the account `rpm login` opened a "
                                      "session for: only its care team's patients, every read audited.")
    clin.add_argument("--as", dest="as_clinician", type=_id("clinician"), metavar="CLINICIAN_ID",
                      help="refuse to run unless the session belongs to this account (it proves nothing)")
    views = clin.add_subparsers(dest="view", required=True)
    add("patients", cmd_clinician, "your patients with last reading and open alerts", parent=views)
    v_pat = add("patient", cmd_clinician, "one patient: latest vitals, daily summaries, trends, alerts, glucose",
                parent=views)
    v_pat.add_argument("patient_id", type=_id("patient"))
    v_pat.add_argument("--days", type=_bounded_int(3660, "days"), default=30)
    v_alerts = add("alerts", cmd_clinician, "alerts, most severe first (resolved ones with why)", parent=views)
    v_alerts.add_argument("--status", choices=["open", "resolved", "all"], default="open")
    v_ack = add("ack", cmd_clinician, "acknowledge an alert (it resolves when readings return to range)",
                parent=views)
    v_ack.add_argument("alert_id", type=_id("alert"))
    v_ack.add_argument("--note", type=_text)
    v_bill = add("billing", cmd_clinician, "RPM billing eligibility (99445/99454, 99470/99457/99458)",
                 parent=views)
    v_bill.add_argument("--month", type=_month, help="YYYY-MM (default: the practice's current month)")
    v_bill.add_argument("--csv", help="also write the report to this CSV file")
    v_ev = add("evidence", cmd_clinician, "the readings behind each billed day of one patient", parent=views)
    v_ev.add_argument("patient_id", type=_id("patient"))
    v_ev.add_argument("--month", type=_month, help="YYYY-MM (default: the practice's current month)")
    v_time = add("log-time", cmd_clinician, "log treatment-management minutes for a patient", parent=views)
    v_time.add_argument("minutes", type=_bounded_int(24 * 60, "minutes (one entry covers at most a day)"))
    v_time.add_argument("--patient", type=_id("patient"), required=True)
    v_time.add_argument("--interactive", action="store_true",
                        help="the time included a real-time interactive communication with the patient")
    v_time.add_argument("--date", type=_iso_date, help="YYYY-MM-DD: back-date into this month or the previous one")
    v_time.add_argument("--note", type=_text)
    v_fhir = add("export-fhir", cmd_clinician, "write a FHIR R4 Bundle of vital-signs Observations",
                 parent=views)
    v_fhir.add_argument("patient_id", type=_id("patient"))
    v_fhir.add_argument("--days", type=_bounded_int(3660, "days"))
    v_fhir.add_argument("--out", help="file to write (default: <patient>-fhir.json)")

    login_p = add("login", cmd_login, "log in to the clinician service (the session token is kept 0600)")
    login_p.add_argument("--as", dest="as_user", type=_id("account"), required=True, metavar="ACCOUNT")
    login_p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    login_p.add_argument("--totp", help="the authenticator code (asked for when needed on a terminal)")
    add("logout", cmd_logout, "end the session and forget its token")
    add("serve", cmd_serve, "run the clinician service (dashboard + /api/v1) over HTTPS in the foreground",
        json_flag=False)

    users = sub.add_parser("users", help="accounts of the clinician service").add_subparsers(
        dest="users_cmd", required=True)
    u_add = add("add", cmd_users_add, "create an account (a clinician's is their registry id)", parent=users)
    u_add.add_argument("username", type=_id("account"))
    u_add.add_argument("--role", choices=["clinician", "admin", "auditor"], required=True)
    u_add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    u_add.add_argument("--totp", action="store_true",
                       help="require an authenticator code (always for admin): prints the provisioning URI")
    add("list", cmd_users_list, "accounts, roles and states (no secrets)", parent=users)
    u_dis = add("disable", cmd_users_disable, "disable an account (its sessions end at once)", parent=users)
    u_dis.add_argument("username", type=_id("account"))
    u_dis.add_argument("--enable", action="store_true", help="enable it again instead")
    u_rp = add("reset-password", cmd_users_reset_password, "set a new password (clears a lock, ends sessions)",
               parent=users)
    u_rp.add_argument("username", type=_id("account"))
    u_rp.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    u_rp.add_argument("--new-totp", action="store_true", help="also issue a new authenticator secret")

    rep = add("reports", cmd_reports, "telehealth reports from a HIPAA limited data set for the practice's own "
              "use (pseudonymous, dates to the day or week); --publish: suppressed aggregate tables")
    rep.add_argument("report", choices=["education", "appointments", "connectivity", "firmware", "adherence",
                                        "pipeline"])
    rep.add_argument("--publish", action="store_true",
                     help="aggregate tables for use outside the practice (by week, device kind or firmware; "
                          "rare firmware as 'other'): counts below 11 shown as <11, cells that would give them "
                          "back as 'suppressed', no pseudonymous keys. Not an expert determination: week dates "
                          "remain, so check your release rules")
    rep.add_argument("--csv", help="also write the report to this CSV file")
    rep.add_argument("--wide", action="store_true", help="pipeline: every column (default: what fits 80 columns)")
    rep.add_argument("--since", type=_duration, help="pipeline: runs finished within this long, e.g. 30m, 24h, 7d "
                     "(default: the last 20 runs)")
    rep.add_argument("--failed", action="store_true", help="pipeline: failed runs only")

    ops = sub.add_parser("ops", help="pipeline health").add_subparsers(dest="ops_cmd", required=True)
    add("status", cmd_ops_status, "last runs, ingest state, backlog: healthy / degraded / failing (exit 0/1/2)",
        parent=ops)

    audit = sub.add_parser("audit", help="the PHI access audit log").add_subparsers(dest="audit_cmd",
                                                                                   required=True)
    add("verify", cmd_audit_verify, "check the hash chain; exit 5 if a record was edited or removed",
        parent=audit)
    a_show = add("show", cmd_audit_show, "the last audit records", parent=audit)
    a_show.add_argument("--last", type=_positive_int, default=20)

    add("backup", cmd_backup, "an encrypted, consistent copy of the clinical warehouse in var/backups/")

    keys_p = sub.add_parser("keys", help="encryption keys").add_subparsers(dest="keys_cmd", required=True)
    add("rotate", cmd_keys_rotate, "re-encrypt landing, warehouse, snapshots and audit log under new keys",
        parent=keys_p)

    landing = sub.add_parser("landing", help="landing segments set aside as unreadable").add_subparsers(
        dest="landing_cmd", required=True)
    add("rejected", cmd_landing_rejected, "unreadable segments waiting in landing/rejected/, with why",
        parent=landing)
    l_replay = add("replay", cmd_landing_replay, "move rejected segments back to landing/sealed/ after a fix "
                   "(the next run absorbs them or sets them aside again)", parent=landing)
    l_replay.add_argument("name", nargs="?", help="the segment (as rpm landing rejected names it)")
    l_replay.add_argument("--all", action="store_true", help="every rejected segment")

    quarantine = sub.add_parser("quarantine", help="items that did not load, and replaying them").add_subparsers(
        dest="quarantine_cmd", required=True)
    q_list = add("list", cmd_quarantine_list, "quarantined items by reason (no payload values)", parent=quarantine)
    q_list.add_argument("--reason", help="only items with this reason")
    q_list.add_argument("--limit", type=_bounded_int(1_000_000, "items"), default=100,
                        help="items shown (default 100)")
    q_replay = add("replay", cmd_quarantine_replay, "re-judge items with today's registry and rules; those "
                   "that pass are loaded (item-level reasons only)", parent=quarantine)
    q_replay.add_argument("--reason", required=True, help="e.g. device_enrolled_at_measured_time")
    add("config", cmd_config, "every RPM_* setting with its documentation", json_flag=False)
    return p


# Commands that may create the state folder (or, like `config` and `down`, touch none); every other one refuses
# a folder that holds no rpm state, so a mistyped RPM_HOME is reported instead of silently becoming a new,
# empty installation.
SETUP_COMMANDS = frozenset({"init", "up", "demo", "ingest", "config", "down"})
# Those that create the state; started as root, they also create the service account (RPM_RUN_AS) that owns it.
CREATE_COMMANDS = SETUP_COMMANDS - {"config", "down"}
# Commands that only talk to the clinician service: they read no key and no state, so any local account runs
# them (and gets what its login allows).
CLIENT_COMMANDS = frozenset({"login", "logout", "clinician"})


class _Parser(argparse.ArgumentParser):
    """Bad arguments are reported like every other error: one line (or JSON), exit 2."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)", USAGE)


def _has_state(s: Settings) -> bool:
    return Path(s.home).is_dir() and Path(s.secrets_dir).is_dir()


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.command in CLIENT_COMMANDS:
        return int(args.fn(settings, args) or 0)
    if args.command not in SETUP_COMMANDS and not _has_state(settings):
        raise UserError(f"RPM_HOME={settings.home} holds no rpm state: run rpm init (or fix RPM_HOME)")
    if args.command != "config" and (args.command != "down" or _has_state(settings)):
        from rpmctl.services.account import run_as_service_account

        # Started as root, a command that touches the state is from here on the account that owns it.
        warning = run_as_service_account(settings, setup=args.command in CREATE_COMMANDS)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    if args.command != "config":
        keys.check_state_folder(settings)  # never use (or create) keys in a folder someone else controls
    return int(args.fn(settings, args) or 0)


def _describe(exc: BaseException) -> tuple[int, str]:
    """(exit code, the one line) for a failure; unexpected ones also leave their traceback in a private file."""
    from rpmctl.services.procs import StartError
    from warehouse.audit import AuditTampered
    from warehouse.db import WarehouseBusy

    if isinstance(exc, UserError):
        return exc.code, str(exc)
    if isinstance(exc, StartError | WarehouseBusy):  # a service that did not start (log named); a busy warehouse
        return INTERNAL, str(exc)
    if isinstance(exc, AuditTampered):
        return TAMPERED, (f"audit log tampered: {exc}; reads of PHI are refused until it is investigated "
                          "(rpm audit verify)")
    if isinstance(exc, InvalidId | keys.ExposedSecret):
        return USAGE, str(exc)
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return USAGE, f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc)
    if isinstance(exc, ConnectionError):
        return INTERNAL, f"{exc.strerror or exc}: is the broker running? (rpm up, rpm status)"
    if isinstance(exc, ValueError):
        return USAGE, str(exc)
    if type(exc).__module__.partition(".")[0] == "duckdb":
        return INTERNAL, f"warehouse: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return INTERNAL, f"internal error: {type(exc).__name__}: {exc} ({_save_traceback(exc)})"


def _save_traceback(exc: BaseException) -> str:
    """Write the traceback where its owner can read it (it may name patients): the state's run folder, else a
    private temporary file. Returns where it went."""
    text = "".join(traceback.format_exception(exc))
    try:
        settings = Settings.from_env()
        if _has_state(settings):
            from rpmctl.services.procs import open_log, private_run_dir, rotate_log

            path = private_run_dir(settings) / "cli-errors.log"
            rotate_log(path)
            fd = open_log(path)
        else:
            import tempfile

            fd, name = tempfile.mkstemp(prefix="rpm-error-", suffix=".log")
            path = Path(name)
        with os.fdopen(fd, "a") as f:
            f.write(f"--- {datetime.now().isoformat(timespec='seconds')} rpm {' '.join(sys.argv[1:])}\n{text}")
        return f"traceback in {path}"
    except Exception:  # noqa: BLE001 - reporting must not fail in turn
        return "traceback not saved"


def _stdout_gone() -> int:
    """The reader of our output went away (`rpm … | head`): stop quietly. Python would otherwise print a
    traceback, and another one when it flushes stdout at exit — so stdout now points at /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return PIPE_CLOSED


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure ends as one line on stderr (``{"error": …}`` on stdout under --json) and
    an exit code: 2 bad input, 3 accounting broken, 4 access denied, 5 audit tampered, 1 anything else; a
    closed output pipe exits 141 silently, like any Unix tool killed by SIGPIPE."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # A character the terminal's encoding cannot show is escaped, as Python's own stderr does: a strict stream
    # raised UnicodeEncodeError (a ValueError: reported as bad input) half-way through the output.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")
    os.umask(0o077)  # everything a command writes under the state folder (warehouse, exports, logs) is private
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe surfaces here, inside the handler, rather than at exit
        return code
    except BrokenPipeError:
        return _stdout_gone()
    except KeyboardInterrupt:
        return 130
    except SystemExit:
        raise  # --help, and the ingest service's own exit
    except Exception as exc:  # noqa: BLE001 - the one place every failure becomes one line
        try:
            code, message = _describe(exc)
        except Exception:  # noqa: BLE001 - reporting must not fail in turn
            code, message = INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
    try:
        if "--json" in argv:
            print(json.dumps({"error": one_line(message)}))
            sys.stdout.flush()
        else:
            print(f"error: {one_line(message)}", file=sys.stderr)
    except BrokenPipeError:
        return _stdout_gone()
    return code


if __name__ == "__main__":
    sys.exit(main())
