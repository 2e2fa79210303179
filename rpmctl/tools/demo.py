"""`make demo`: the whole path on the embedded default, from simulated devices to the clinician summary."""

from __future__ import annotations

import time

from core.settings import Settings
from rpmctl import services
from rpmctl.cli import render_accounting
from rpmctl.services import procs
from rpmctl.services.airflow_run import run_once, seal_open_segments
from rpmctl.tools.publish import wait_until
from rpmctl.tools.simulator import build_fleet, provision_fleet, publish_fleet
from rpmctl.views import clinician as view
from rpmctl.views import reports as report_views
from rpmctl.views.summary import latest_vitals, render
from warehouse import reports
from warehouse.access import ClinicianSession
from warehouse.accounting import accounting
from warehouse.audit import AuditLog


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

        nurse = ClinicianSession(s, "rn-garcia")
        _section("open alerts, most severe first (rpm clinician --as rn-garcia alerts)")
        alerts = nurse.alerts()
        print(view.render("alerts", alerts[:12]))
        if len(alerts) > 12:
            print(f"... and {len(alerts) - 12} more")

        _section("RPM billing this month (rpm clinician --as rn-garcia billing)")
        print(view.render("billing", nurse.billing(None)))
        for name, title, publish in (("appointments", "appointments by modality (practice view)", False),
                                     ("appointments", "the same, published: counts < 11 suppressed", True),
                                     ("education", "education engagement per module and week", False),
                                     ("connectivity", "device connectivity", False),
                                     ("adherence", "monitoring adherence", False)):
            _section(f"telehealth report: {title}")
            rows = reports.report(s, name, publish=publish)
            print(report_views.render(name, rows[:8]))
            if len(rows) > 8:
                print(f"... {len(rows) - 8} more rows (rpm reports {name})")

        verdict = AuditLog(s).verify()
        print(f"\naudit log: {verdict['records']} PHI reads recorded, chain "
              f"{'verified' if verdict['ok'] else 'BROKEN: ' + str(verdict['problem'])}")

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
            print("ingest and broker stopped")
