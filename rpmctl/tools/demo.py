"""`make demo`: the whole path on the embedded default, from simulated devices to the clinician summary."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from core import keys
from core.settings import Settings
from rpmctl import services
from rpmctl.cli import render_accounting
from rpmctl.client import Client, revive
from rpmctl.services import procs
from rpmctl.services.airflow_run import run_once, seal_open_segments
from rpmctl.tools.publish import wait_until
from rpmctl.tools.simulator import build_fleet, provision_fleet, publish_fleet
from rpmctl.views import clinician as view
from rpmctl.views import reports as report_views
from rpmctl.views.summary import latest_vitals, render
from service.accounts import AccountError, Accounts
from service.server import url
from warehouse import reports
from warehouse.accounting import accounting
from warehouse.admin import operator
from warehouse.audit import AuditLog

DEMO_CLINICIAN = "rn-garcia"  # the simulated fleet's care-team nurse (rpmctl/tools/simulator.py)


def demo_password_file(s: Settings) -> Path:
    return Path(s.secrets_dir) / f"demo-{DEMO_CLINICIAN}.password"


def demo_account(s: Settings) -> str:
    """The demo nurse's service account and its password (random, kept 0600 beside the keys so that the
    dashboard can be tried after the demo): created once, its creation audited like `rpm users add`."""
    path = demo_password_file(s)
    accounts = Accounts(s)
    try:
        password = keys.read_secret(path).strip()
        accounts.get(DEMO_CLINICIAN)
        return password
    except (FileNotFoundError, AccountError):
        pass
    password = secrets.token_urlsafe(18)
    try:
        accounts.get(DEMO_CLINICIAN)
        accounts.reset_password(DEMO_CLINICIAN, password)
        action = "accounts:reset-password"
    except AccountError:
        accounts.add(DEMO_CLINICIAN, "clinician", password, clinician_id=DEMO_CLINICIAN)
        action = "accounts:add"
    keys.write_private(path, (password + "\n").encode())
    AuditLog(s).append(operator(), action, [], {"username": DEMO_CLINICIAN, "role": "clinician", "demo": True}, 1)
    return password


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def run_demo(s: Settings, patients: int, days: int, seed: int) -> int:
    started_here = procs.read_pid(s, services.INGEST) is None
    _section("services")
    info = services.up(s)
    print(f"broker pid {info['broker_pid']} (mqtt {info['mqtt_loopback']}, mqtts {info['mqtts']}), "
          f"ingest pid {info['ingest_pid']}")
    try:
        _section(f"simulated fleet: {patients} patients, {days} days")
        fleet = build_fleet(patients=patients, days=days, seed=seed)
        manifest = fleet.manifest()
        print(f"conditions: {manifest['conditions']}; {manifest['devices']} devices")
        provision_fleet(s, fleet, days)
        landed_before = (services.ingest_status(s) or {}).get("landed", 0)
        t0 = time.monotonic()
        sent = publish_fleet(s, fleet)
        print(f"published {sent['published']} messages ({manifest['readings']} readings) over MQTT 5 QoS 1, "
              f"{sent['acked']} acked, in {time.monotonic() - t0:.1f}s")
        # Wait on the ingest service's own counter, then have it seal what it landed.
        wait_until(lambda: (services.ingest_status(s) or {}).get("landed", 0) - landed_before
                   >= sent["published"], timeout=60, what="ingest to land every message")
        seal_open_segments(s)

        _section("rpm_pipeline (Airflow dag.test)")
        t0 = time.monotonic()
        result = run_once(s)
        print(f"run {result['run_id']}: {result['state']} in {time.monotonic() - t0:.1f}s; tasks {result['tasks']}")

        _section("clinician summary: latest vitals per patient")
        print(render(latest_vitals(s)))

        # The clinician's views come from the service, as the nurse's own login: scoped to her care team and
        # audited under her account, exactly what `rpm login` + `rpm clinician` or the dashboard give her.
        nurse = Client.logged_in(s, DEMO_CLINICIAN, demo_account(s))
        try:
            _section(f"open alerts, most severe first (rpm clinician --as {DEMO_CLINICIAN} alerts)")
            alerts = revive(nurse.get("/api/v1/alerts"))
            print(view.render("alerts", alerts[:12]))
            if len(alerts) > 12:
                print(f"... and {len(alerts) - 12} more")

            _section(f"RPM billing this month (rpm clinician --as {DEMO_CLINICIAN} billing)")
            print(view.render("billing", revive(nurse.get("/api/v1/billing"))))
        finally:
            nurse.logout()
        for name, title, publish in (("appointments", "appointments by modality (practice view)", False),
                                     ("appointments", "the same, published: counts < 11 suppressed", True),
                                     ("education", "education engagement per module and week", False),
                                     ("connectivity", "device connectivity", False),
                                     ("adherence", "monitoring adherence", False)):
            _section(f"telehealth report: {title}")
            print(f"({reports.route(name, publish)})")
            rows = reports.report(s, name, publish=publish)
            print(report_views.render(name, rows[:8]))
            if len(rows) > 8:
                print(f"... {len(rows) - 8} more rows (rpm reports {name})")

        verdict = AuditLog(s).verify()
        print(f"\naudit log: {verdict['records']} records (PHI reads, registry and account changes), chain "
              f"{'verified' if verdict['ok'] else 'BROKEN: ' + str(verdict['problem'])}")
        print(f"dashboard: {url(s)}/ (rpm up serves it) - log in as {DEMO_CLINICIAN}, password in "
              f"{demo_password_file(s)}; the CA to trust is {s.ca_cert}")

        _section("accounting")
        acc = accounting(s)
        print(render_accounting(acc))
        exp = manifest["expected"]
        print(f"this run's fleet expected: {exp['loaded']} loadable, {exp['duplicates']} duplicate, "
              f"{exp['quarantined']} to quarantine (a re-run within the same hour re-sends the same "
              "readings: they count as duplicates)")
        return 0 if acc["balanced"] else 3
    finally:
        if started_here:
            _section("stopping what the demo started")
            services.down(s)
            print("broker, ingest and the clinician service stopped (rpm up starts them again)")
