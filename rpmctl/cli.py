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
    _print_json(info) if a.json else print(
        f"broker up (pid {info['broker_pid']}; mqtt {info['mqtt_loopback']}, mqtts {info['mqtts']}), "
        f"ingest up (pid {info['ingest_pid']}); logs in {info['logs']}")
    return 0


def cmd_down(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.services import down

    info = down(s)
    _print_json(info) if a.json else print(
        ", ".join(f"{k.removesuffix('_stopped')}: {'stopped' if v else 'was not running'}"
                  for k, v in info.items()))
    return 0


def cmd_status(s: Settings, a: argparse.Namespace) -> int:
    from rpmctl.services import status

    _print_json(status(s))
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
    from warehouse.db import clinical
    from warehouse.registry import list_devices

    with clinical(s) as con:
        devices = list_devices(con)
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
        f"received (readings) {acc['received']:>8}",
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
    add("up", cmd_up, "start the broker and the ingest service in the background")
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
