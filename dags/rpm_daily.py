"""rpm_daily: once a day, housekeeping and the published telehealth reports.

purge landing segments the warehouse has absorbed and that are past retention (warehouse.retention)
-> rebuild the pseudonymous telehealth reports (warehouse.telehealth).

Wiring only: every task calls one library function and returns its small summary. Both tasks are safe to
retry: a purge deletes only ledger-listed segments, so a second run finds nothing more to delete.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import dag, task


@dag(
    dag_id="rpm_daily",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # one writer: DuckDB allows a single writing process
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    tags=["rpm", "housekeeping"],
    doc_md=__doc__,
)
def rpm_daily():
    @task
    def purge_landing() -> dict:
        from rpmctl.settings import Settings
        from warehouse.retention import purge_landing

        return purge_landing(Settings.from_env())

    @task
    def rebuild_reports():
        from rpmctl.settings import Settings
        from warehouse.telehealth import publish_telehealth

        return publish_telehealth(Settings.from_env())

    # Purge first: the reports never read landing, and a slow report must not hold back freeing disk.
    purge_landing() >> rebuild_reports()


rpm_daily()
