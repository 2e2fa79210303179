"""The design many tutorials show — a paho subscriber INSERTing each reading into PostgreSQL — against this
project's ingest + pipeline, on the same published stream, then the same clinician query on both stores.

    python -m bench.peer_postgres [--size N] [--json PATH]

Write path, each consumer draining the same stream from its own persistent session (the fairest comparison:
the publisher is out of the clock):

- PostgreSQL, one INSERT per reading in autocommit, PUBACK after the commit (paho acks when the callback
  returns), so a reading is durable before it is acknowledged — synchronous_commit on, the default;
- PostgreSQL, batched: one transaction per 500 messages (executemany), acks sent after COMMIT;
- this project: ingest (landing segment, fsync, then PUBACK), then one `rpm pipeline run` (decode, GX
  validation, load into the encrypted DuckDB, alerts, serving snapshot) until the readings are queryable.

Both stores key a reading by (device, metric, measured instant), so a redelivery is not a second row. The
PostgreSQL subscriber does nothing else: no validation, no quarantine, no accounting, no encryption at rest,
no audit — the table says so next to the figures.

Read path: one patient's view — latest value per metric and daily aggregates per metric over 30 days —
with the SQL text of ``ClinicianSession.patient`` (warehouse/access.py) on both stores (PostgreSQL gets the
same staging and mart views, in its dialect). DuckDB is queried on the serving snapshot as the project does.

Debian's PostgreSQL server is needed (``apt-get install -y postgresql``); a throwaway cluster is created with
initdb on a free loopback port, run as the ``postgres`` account, and stopped by its pid at the end.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import fleet
from bench.common import Timer, bench_home, free_port, machine, parser, print_table, summary_ms, write_json
from bench.ingest import (
    ChildConsumer,
    Ingest,
    Landing,
    accounting,
    measure,
    pipeline_run,
    resume_session,
    subscribe_session,
)
from core.settings import Settings

INSTALL_HINT = "apt-get install -y postgresql"
PSYCOPG_HINT = '.venv/bin/pip install "psycopg[binary]==3.3.6"'
FLUSH_MESSAGES = 500  # the batched variant commits every 500 messages ...
FLUSH_S = 0.025  # ... or after 25 ms, as the ingest service flushes (RPM_INGEST_FLUSH_INTERVAL_MS)
PATIENT_DAYS = 30

SCHEMA = """
CREATE TABLE readings (
    id             bigserial PRIMARY KEY,
    patient_id     text NOT NULL,
    device_id      text NOT NULL,
    metric         text NOT NULL,
    value          double precision NOT NULL,   -- canonical unit; systolic for blood pressure
    diastolic      double precision,
    unit           text NOT NULL,
    source         text,
    measured_at    timestamptz NOT NULL,
    utc_offset_min integer NOT NULL,
    msg_id         text NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (device_id, metric, measured_at)      -- the same reading sent twice is one row
);
CREATE INDEX readings_patient_time ON readings (patient_id, measured_at);

-- The project's staging and marts (warehouse/sql/010_marts.sql), in PostgreSQL's dialect.
CREATE VIEW stg_readings AS
SELECT r.*,
       (r.measured_at AT TIME ZONE 'UTC') + make_interval(mins => r.utc_offset_min) AS measured_local,
       CAST((r.measured_at AT TIME ZONE 'UTC') + make_interval(mins => r.utc_offset_min) AS date) AS local_date
FROM readings r;

CREATE VIEW mart_latest_vitals AS
SELECT patient_id, metric, value, diastolic, unit, measured_at, measured_local, device_id, readings_total
FROM (SELECT s.*, count(*) OVER (PARTITION BY patient_id, metric) AS readings_total,
             row_number() OVER (PARTITION BY patient_id, metric ORDER BY measured_at DESC, id) AS rn
      FROM stg_readings s) ranked
WHERE rn = 1;

CREATE VIEW mart_daily_vitals AS
SELECT patient_id, metric, local_date, unit,
       count(*) AS readings, min(value) AS min_value, avg(value) AS mean_value, max(value) AS max_value,
       avg(diastolic) AS mean_diastolic
FROM stg_readings
GROUP BY patient_id, metric, local_date, unit;
"""

INSERT = """INSERT INTO readings (patient_id, device_id, metric, value, diastolic, unit, source, measured_at,
                                  utc_offset_min, msg_id)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (device_id, metric, measured_at) DO NOTHING"""

# The two reads of ClinicianSession.patient (warehouse/access.py), verbatim but for the placeholders.
LATEST_SQL = """SELECT metric, value, diastolic, unit, measured_at, measured_local,
                       device_id FROM mart_latest_vitals WHERE patient_id = ?
                ORDER BY metric"""
DAILY_SQL = """SELECT local_date, metric, readings, min_value, mean_value, max_value,
                      mean_diastolic, unit FROM mart_daily_vitals
               WHERE patient_id = ? AND local_date >= current_date - ?::INTEGER
               ORDER BY local_date DESC, metric"""


# --- a throwaway PostgreSQL cluster -------------------------------------------------------------------------
def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[4]))
    return Path(found[-1]).parent if found else None


def _as_postgres() -> dict[str, Any]:
    """Popen arguments that run a child as the 'postgres' account when we are root (postgres refuses root)."""
    if os.geteuid() != 0:
        return {}
    return {"user": "postgres", "group": "postgres", "extra_groups": []}


@contextmanager
def postgres_cluster(bin_dir: Path) -> Iterator[str]:
    """initdb + postgres on a free loopback port in a temporary folder; yields a DSN. Stopped by pid after."""
    import pwd

    base = Path(tempfile.mkdtemp(prefix="rpm-bench-pg-"))
    proc: subprocess.Popen | None = None
    try:
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(base, account.pw_uid, account.pw_gid)
        password = secrets.token_urlsafe(18)
        pwfile = base / "pwfile"
        pwfile.write_text(password + "\n")
        if os.geteuid() == 0:
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        os.chmod(pwfile, 0o600)
        data, port = base / "data", free_port()
        subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", "bench", f"--pwfile={pwfile}",
                        "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=base, **_as_postgres())
        pwfile.unlink()
        log = open(base / "postgres.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen([str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
                                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={base}"],
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=base,
                                start_new_session=True, **_as_postgres())
        log.close()
        dsn = f"host=127.0.0.1 port={port} dbname=postgres user=bench password={password}"
        _wait_ready(dsn, proc, base / "postgres.log")
        yield dsn
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown of our own server, by its pid
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def _wait_ready(dsn: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Until the server accepts a login (its own readiness signal), or it exits."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(dsn, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start:\n{log.read_text(errors='replace')[-2000:]}") from None
            time.sleep(0.05)


# --- the tutorial subscriber ------------------------------------------------------------------------------
def reading_rows(topic: str, payload: bytes, patients: dict[str, str]) -> list[tuple]:
    """Contract-v1 payload -> INSERT parameters, canonical units (the project's own conversion table)."""
    import json

    from transforms.vocab import METRICS

    device_id = topic.split("/")[3]
    doc = json.loads(payload)
    rows = []
    for r in doc.get("readings", [doc]):
        at = datetime.fromisoformat(r["measured_at"])
        metric, unit = r["metric"], r["unit"]
        convert = METRICS[metric].units[unit]
        if metric == "blood_pressure":
            value, diastolic = float(r["values"]["systolic"]), float(r["values"]["diastolic"])
        else:
            value, diastolic = convert(float(r["value"])), None
        offset = at.utcoffset()
        rows.append((patients[device_id], device_id, metric, value, diastolic, METRICS[metric].canonical_unit,
                     r.get("source"), at, int(offset.total_seconds() // 60) if offset else 0, r["msg_id"]))
    return rows


class PostgresSubscriber(ChildConsumer):
    """The tutorial consumer, in its own process; per-row autocommit or batched transactions."""

    def __init__(self, s: Settings, dsn: str, creds: list[fleet.Credential], batched: bool):
        super().__init__()
        self.s, self.dsn, self.batched = s, dsn, batched
        self.patients = {c.device_id: c.patient_id for c in creds}
        self.name = "postgres batched" if batched else "postgres per-row"
        self.client_id = "bench-pg-batched" if batched else "bench-pg-row"

    def prepare(self) -> None:
        subscribe_session(self.s, self.client_id)

    def start(self, expected: int, live: bool) -> None:
        self._spawn(_consume, (self.s, self.dsn, self.client_id, expected, self.batched, self.patients),
                    f"bench-{self.client_id}")


def _consume(s: Settings, dsn: str, client_id: str, expected: int, batched: bool, patients: dict[str, str],
             out: Any) -> None:
    """Child process: resume the queued session (expiry 0: removed afterwards) and store ``expected`` messages."""
    import psycopg

    from core import keys
    from ingest.service import make_client

    try:
        con = psycopg.connect(dsn, autocommit=True)
        cur = con.cursor()
        client = make_client(client_id, s.ingest_username, keys.service_password(s, "ingest"), manual_ack=batched)
        state: dict[str, Any] = {"count": 0, "first": 0.0, "last": 0.0, "rows": [], "acks": [], "since": 0.0}

        def on_message(c, userdata, msg) -> None:
            state["first"] = state["first"] or time.monotonic()
            rows = reading_rows(msg.topic, msg.payload, patients)
            if not batched:
                for row in rows:
                    cur.execute(INSERT, row)  # autocommit: one durable transaction per reading
                state["count"] += 1  # paho sends the PUBACK when this callback returns
                return
            if not state["acks"]:
                state["since"] = time.monotonic()
            state["rows"].extend(rows)
            state["acks"].append((msg.mid, msg.qos))

        def flush() -> None:
            with con.transaction():
                cur.executemany(INSERT, state["rows"])
            for mid, qos in state["acks"]:
                client.ack(mid, qos)  # only after COMMIT: durable before acknowledged
            state["count"] += len(state["acks"])
            state["rows"], state["acks"] = [], []

        client.on_message = on_message
        resume_session(client, s, out)
        while state["count"] < expected:
            client.loop(timeout=FLUSH_S / 2)
            if state["acks"] and (len(state["acks"]) >= FLUSH_MESSAGES
                                  or time.monotonic() - state["since"] >= FLUSH_S):
                flush()
        state["last"] = time.monotonic()
        client.disconnect()
        client.loop(timeout=0.5)
        con.close()
        out.put({k: state[k] for k in ("count", "first", "last")})
    except BaseException as exc:
        out.put({"error": f"{type(exc).__name__}: {exc}"})


# --- the clinician's patient view --------------------------------------------------------------------------
def time_runs(fn: Any, runs: int, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        with Timer() as t:
            fn()
        samples.append(t.seconds)
    return summary_ms(samples)


def patient_view_pg(con: Any, patient_id: str) -> tuple[list, list]:
    cur = con.cursor()
    latest = cur.execute(LATEST_SQL.replace("?", "%s"), [patient_id]).fetchall()
    daily = cur.execute(DAILY_SQL.replace("?", "%s"), [patient_id, PATIENT_DAYS]).fetchall()
    return latest, daily


def patient_view_duckdb(con: Any, patient_id: str) -> tuple[list, list]:
    latest = con.execute(LATEST_SQL, [patient_id]).fetchall()
    daily = con.execute(DAILY_SQL, [patient_id, PATIENT_DAYS]).fetchall()
    return latest, daily


def same_answer(a: tuple[list, list], b: tuple[list, list]) -> bool:
    """Both stores give the same latest values and daily aggregates (floats to 6 decimals)."""
    def norm(rows: list) -> list:
        return [tuple(round(v, 6) if isinstance(v, float) else str(v) if isinstance(v, datetime) else v
                      for v in row) for row in rows]
    # Latest: compare metric, value, diastolic, unit, device (the instant's type differs between drivers).
    pick = [(r[0], r[1], r[2], r[3], r[6]) for r in a[0]], [(r[0], r[1], r[2], r[3], r[6]) for r in b[0]]
    return norm(pick[0]) == norm(pick[1]) and norm(a[1]) == norm(b[1])


def read_path(s: Settings, dsn: str, patient_id: str, clinician: str, runs: int) -> dict[str, Any]:
    """p50/p95 of the patient view on each store and access path; checks both answer the same."""
    import psycopg

    from warehouse.access import ClinicianSession
    from warehouse.serving import serving

    out: dict[str, Any] = {}
    with psycopg.connect(dsn, autocommit=True) as con:
        pg_answer = patient_view_pg(con, patient_id)
        out["postgres, pooled connection"] = time_runs(lambda: patient_view_pg(con, patient_id), runs)

    def pg_connect_each() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            patient_view_pg(c, patient_id)

    out["postgres, connect per request"] = time_runs(pg_connect_each, runs)
    with serving(s) as con:
        duck_answer = patient_view_duckdb(con, patient_id)
        out["duckdb snapshot, connection reused"] = time_runs(lambda: patient_view_duckdb(con, patient_id), runs)

    def duck_open_each() -> None:
        with serving(s) as c:
            patient_view_duckdb(c, patient_id)

    out["duckdb snapshot, serving() per request"] = time_runs(duck_open_each, runs)
    session = ClinicianSession(s, clinician)
    out["ClinicianSession.patient (all panels + audit)"] = time_runs(
        lambda: session.patient(patient_id, PATIENT_DAYS), runs)
    return {"timings": out, "same_answer": same_answer(pg_answer, duck_answer),
            "latest_rows": len(pg_answer[0]), "daily_rows": len(pg_answer[1])}


# --- the benchmark -----------------------------------------------------------------------------------------
def pg_count(dsn: str) -> int:
    import psycopg

    with psycopg.connect(dsn) as con:
        return con.execute("SELECT count(*) FROM readings").fetchone()[0]  # type: ignore[index]


def pg_reset(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as con:
        con.execute("TRUNCATE readings")


def write_path(s: Settings, dsn: str, creds: list[fleet.Credential], a: Any) -> dict[str, Any]:
    """Each consumer drains the same stream; then the project's pipeline makes it queryable."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as con:
        con.execute(SCHEMA)
    per_device = -(-a.size // len(creds))
    stream = fleet.Stream(readings=a.size, batch=a.batch, step_s=fleet.step_for(per_device),
                          anchor=fleet.anchor_now())
    row_stream = fleet.Stream(readings=min(a.size, a.per_row_max or a.size), batch=a.batch,
                              step_s=stream.step_s, anchor=stream.anchor)
    shape = "single" if a.batch <= 1 else "batch"
    out: dict[str, Any] = {}
    for batched, st in ((False, row_stream), (True, stream)):
        pg_reset(dsn)
        run, _ = measure(s, PostgresSubscriber(s, dsn, creds, batched), creds, st, shape, "drain", a.workers)
        out[run.consumer] = {"readings": st.readings, "messages": run.messages, "seconds": run.seconds,
                             "stored": pg_count(dsn)}
    run, pub = measure(s, Ingest(s, creds), creds, stream, shape, "drain", a.workers)
    landed = Landing(s).count_new()
    out["ingest"] = {"readings": stream.readings, "messages": run.messages, "seconds": run.seconds,
                     "stored": landed["readings"], "distinct": landed["distinct"]}
    out["pipeline"] = {"readings": stream.readings, **pipeline_run(s)}
    out["accounting"] = accounting(s)
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], default_size=50_000)
    p.add_argument("--per-row-max", type=int, default=20_000,
                   help="readings for the per-row INSERT variant (one WAL fsync each; 0 = all of --size)")
    p.add_argument("--batch", type=int, default=1, help="readings per message (1: single-reading messages)")
    p.add_argument("--devices", type=int, default=50, help="provisioned devices (5 per patient)")
    p.add_argument("--workers", type=int, default=3, help="publisher processes")
    p.add_argument("--query-runs", type=int, default=50, help="timed runs of each patient-view variant")
    a = p.parse_args(argv)
    bin_dir = postgres_bin()
    if bin_dir is None:
        print(f"PostgreSQL server not found (/usr/lib/postgresql/*/bin/postgres). Install it with:\n  {INSTALL_HINT}")
        return 2
    try:
        import psycopg  # noqa: F401
    except ImportError:
        print(f"psycopg 3 not installed. Install it with:\n  {PSYCOPG_HINT}")
        return 2
    from rpmctl import services
    from rpmctl.services import broker
    from rpmctl.tools.simulator import CLINICIANS

    with bench_home("peer-pg") as s, postgres_cluster(bin_dir) as dsn:
        services.init(s)
        creds = fleet.provision(s, a.devices)
        broker.start(s)
        writes = write_path(s, dsn, creds, a)
        reads = read_path(s, dsn, creds[0].patient_id, CLINICIANS[2][0], max(50, a.query_runs))
        version = _pg_version(dsn)
    results = {"size": a.size, "batch": a.batch, "devices": len(creds), "postgres": version,
               "write": writes, "read": reads}
    report(results, a)
    write_json(a.json, "peer_postgres", results)
    return 0


def _pg_version(dsn: str) -> str:
    import psycopg

    with psycopg.connect(dsn) as con:
        return con.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]


def report(results: dict[str, Any], a: Any) -> None:
    w = results["write"]
    row, batched, ingest, pipe = (w["postgres per-row"], w["postgres batched"], w["ingest"], w["pipeline"])
    both = ingest["seconds"] + pipe["seconds"]
    rows = [
        ["PostgreSQL: INSERT per reading, autocommit", row["readings"], row["stored"], row["seconds"],
         row["readings"] / row["seconds"], "durable, queryable; no validation, plaintext"],
        ["PostgreSQL: executemany per 500 msgs", batched["readings"], batched["stored"], batched["seconds"],
         batched["readings"] / batched["seconds"], "durable, queryable; no validation, plaintext"],
        ["rpm ingest (landing, fsync, ack)", ingest["readings"], ingest["stored"], ingest["seconds"],
         ingest["readings"] / ingest["seconds"], "durable, encrypted; not yet queryable"],
        ["rpm pipeline run (validate, load, snapshot)", pipe["readings"], w["accounting"]["loaded"],
         pipe["seconds"], pipe["readings"] / pipe["seconds"], "GX-validated, deduped, audited reads"],
        ["  of which claim .. evaluate_alerts", pipe["readings"], w["accounting"]["loaded"],
         pipe["tasks_total_seconds"], pipe["readings"] / max(pipe["tasks_total_seconds"], 1e-9),
         "rest: Airflow, record_run, snapshot, telehealth"],
        ["rpm ingest + pipeline run", pipe["readings"], w["accounting"]["loaded"], both,
         pipe["readings"] / both, "end to end: durable -> queryable"],
    ]
    shape = "single-reading messages" if a.batch <= 1 else f"batches of {a.batch}"
    print_table(f"Write path: {a.size:,} readings as {shape}, drained from a queued session "
                f"(PostgreSQL {results['postgres']}, synchronous_commit on)",
                ["design", "readings", "stored", "seconds", "readings/s", "what you have afterwards"], rows)
    # The run record is written by record_run, so it holds the tasks before it, not itself or those after.
    print_table("rpm pipeline run: seconds per task (from the run record)", ["task", "seconds"],
                [[k, float(v)] for k, v in pipe["task_seconds"].items()])
    acc = w["accounting"]
    print_table("rpm accounting after the run",
                ["received", "loaded", "quarantined", "duplicates", "balanced"],
                [[acc["received"], acc["loaded"], acc["quarantined"], acc["duplicates"], acc["balanced"]]])
    r = results["read"]
    print_table(f"Clinician patient view (latest per metric + {PATIENT_DAYS}-day daily aggregates; "
                f"{r['latest_rows']} + {r['daily_rows']} rows; same answer on both stores: {r['same_answer']})",
                ["store / access path", "runs", "p50 ms", "p95 ms", "max ms"],
                [[k, v["runs"], v["p50_ms"], v["p95_ms"], v["max_ms"]] for k, v in r["timings"].items()])
    print_table("Machine", ["", ""], list(machine().items()))


if __name__ == "__main__":
    raise SystemExit(main())
