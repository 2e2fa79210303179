"""Clinician and reporting query latency over a generated warehouse (issue 6 item 4).

``python -m bench.queries`` generates a warehouse (``bench.generate``: 1,000 patients / 2M readings by
default; the issue's size is ``--patients 10000 --size 50000000``) and times p50 / p95 / max of:

* the clinician patient view (30 days, all vitals) through the real user path
  ``ClinicianSession.patient`` — a cursor on the process's cached instance of the encrypted serving
  snapshot (``warehouse.serving``), care-team check, the view's queries, audit append — and the same code
  without scope check and audit (``raw``): on a new instance per call (what the first read after each
  snapshot publish, or a one-shot CLI process, pays), on a warm encrypted connection and on a warm plain
  unencrypted copy; the differences are the price of opening, of encryption and of the audit;
* the 100-patient panel: ``ClinicianSession.patients()`` (what ``rpm clinician --as X patients`` runs) and
  ``alerts()``, plus the panel's latest vitals per metric and open alerts as raw SQL;
* the billing report for all patients for the last closed month (``ClinicianSession.billing``) and raw;
* every telehealth report (``warehouse.reports.report``);
* what one request is made of (open, scope, audit append) and how the audit append grows with the log.

Rows with a target and the reports run ``--runs`` times (default 50, random panel patients, the same sequence
for every variant); the breakdown rows (raw, plain, request parts, audit growth) ``--baseline-runs`` times
(default 20), so the default run stays within a few minutes. ``--profile`` adds a DuckDB profile of every
statement of the patient view, panel and billing report.

``--home DIR --compact`` first compacts that warehouse as rpm_daily does (``warehouse.compaction``), so one
generation measures arrival order, then the compacted file.

Targets (issue 6): patient view p95 <= 50 ms, panel p95 <= 100 ms, billing for all patients <= 2 s. A missed
target is reported, never raised. ``--home DIR`` reuses a warehouse made by ``python -m bench.generate``.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import duckdb

from bench.common import Timer, bench_home, parser, print_table, summary_ms, write_json
from bench.generate import ALL_CLINICIAN, PANEL_CLINICIAN, Plan, generate
from bench.generate import report as generation_report
from core.settings import Settings

PATIENT_VIEW_TARGET_MS = 50.0
PANEL_TARGET_MS = 100.0
BILLING_TARGET_MS = 2000.0
DEFAULT_SIZE, DEFAULT_PATIENTS = 2_000_000, 1_000
# Tables the clinician views and the billing report read; the plain copy holds only these.
PLAIN_TABLES = ("patients", "readings", "patient_days", "patient_latest", "patient_day_zones", "alerts",
                "care_team", "clinicians", "interactions", "alert_thresholds")
AUDIT_LOG_SIZES = (1_000, 100_000)


def timed(fn: Callable[[], Any], runs: int, warmup: int = 1) -> list[float]:
    """Durations (s) of ``runs`` calls after ``warmup`` untimed ones (first open of a file, plan caches)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        with Timer() as t:
            fn()
        out.append(t.seconds)
    return out


def row(name: str, samples: list[float], target_ms: float | None, note: str = "") -> dict[str, Any]:
    """One result line: p50/p95/max and whether the p95 meets the target (targets are judged on p95)."""
    stats = summary_ms(samples)
    met = "-" if target_ms is None else ("met" if stats["p95_ms"] <= target_ms else "NOT MET")
    return {"query": name, **stats, "target_p95_ms": target_ms, "met": met, "note": note}


def show(title: str, rows: list[dict[str, Any]]) -> None:
    print_table(title, ["query", "runs", "p50 ms", "p95 ms", "max ms", "target p95 ms", "met", "note"],
                [[r["query"], r["runs"], r["p50_ms"], r["p95_ms"], r["max_ms"],
                  "-" if r["target_p95_ms"] is None else r["target_p95_ms"], r["met"], r["note"]]
                 for r in rows])


# --- connections -----------------------------------------------------------------------------------------

def snapshot_path(s: Settings) -> Path:
    """The current serving snapshot (what clinicians read), or an error naming what to run first."""
    from warehouse.serving import current_snapshot

    snap = current_snapshot(s)
    if snap is None:
        raise FileNotFoundError(f"no serving snapshot under {s.home}: generate the warehouse first")
    return snap


def open_encrypted(s: Settings) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the encrypted serving snapshot, exactly as ``serving()`` opens it."""
    from warehouse.db import open_clinical

    return open_clinical(s, read_only=True, db_path=snapshot_path(s))


def open_plain(path: Path) -> duckdb.DuckDBPyConnection:
    """A fresh database instance on the plain copy (ATTACH, so no instance cache is shared between calls)."""
    con = duckdb.connect()
    con.execute(f"ATTACH '{path}' AS clinical (READ_ONLY)")
    con.execute("USE clinical")
    return con


def make_plain_copy(s: Settings) -> Path:
    """An unencrypted copy of what the views read, in the same physical order, with the same views.

    Synthetic data only. The copy has no primary-key index (CREATE TABLE AS); no query timed here looks a
    reading up by id, so the index changes file size, not these timings."""
    from warehouse.db import definitions

    plain = Path(s.warehouse_dir) / "bench-plain.duckdb"  # type: ignore[arg-type]
    plain.unlink(missing_ok=True)
    con = open_encrypted(s)
    try:
        con.execute(f"ATTACH '{plain}' AS plain")
        for table in PLAIN_TABLES:
            con.execute(f"CREATE TABLE plain.{table} AS SELECT * FROM clinical.{table}")
        con.execute("DETACH plain")
    finally:
        con.close()
    pc = duckdb.connect(str(plain))
    try:
        for sql in definitions():  # creates the views (and empty tables for the rest)
            pc.execute(sql)
    finally:
        pc.close()
    return plain


@contextmanager
def reused(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """Make ClinicianSession run its queries on ``con`` (kept open) instead of a fresh snapshot connection."""
    with mock.patch("warehouse.access.serving", lambda _s: nullcontext(con)):
        yield


class _NoAudit:
    """Stands in for AuditLog in the raw variants: the audit's cost is measured on its own."""

    def append(self, *args: Any, **kwargs: Any) -> dict:
        return {}


def raw_session(s: Settings, clinician: str, scope: list[str]) -> Any:
    """The ClinicianSession code without the care-team check and without the audit append: the view's own
    queries and result shaping only."""
    from warehouse.access import ClinicianSession

    class RawSession(ClinicianSession):
        def _scope(self, con: duckdb.DuckDBPyConnection, action: str, query: dict) -> list[str]:
            return scope

        def _require(self, con: duckdb.DuckDBPyConnection, patient_id: str, action: str, query: dict) -> None:
            return None

    session = RawSession(s, clinician)
    session.audit = _NoAudit()  # type: ignore[assignment]
    return session


# --- the measurements ------------------------------------------------------------------------------------

class Bench:
    """One run's shared state: settings, the care teams, and the random patients every variant visits in the
    same order (so the variants differ only in what they do, not in whom they look at)."""

    def __init__(self, s: Settings, runs: int, baseline_runs: int, seed: int, plain: Path):
        from warehouse.registry import care_team_patients

        self.s, self.runs, self.baseline_runs, self.plain = s, runs, baseline_runs, plain
        con = open_encrypted(s)
        try:
            self.panel = care_team_patients(con, PANEL_CLINICIAN) or []
            self.everyone = care_team_patients(con, ALL_CLINICIAN) or []
        finally:
            con.close()
        rng = random.Random(seed)
        self.sequence = [rng.choice(self.panel) for _ in range(max(runs, baseline_runs) + 1)]  # + 1 warm-up

    def picks(self) -> Callable[[], str]:
        """The patient sequence from its start: each variant visits the same patients in the same order."""
        it = iter(self.sequence)
        return lambda: next(it)

    def timed_per_patient(self, view: Callable[[str], Any], runs: int) -> list[float]:
        pick = self.picks()
        return timed(lambda: view(pick()), runs)

    @contextmanager
    def warm(self, plain: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection kept open for the whole measurement: its buffer pool stays warm (decrypted pages)."""
        con = open_plain(self.plain) if plain else open_encrypted(self.s)
        try:
            yield con
        finally:
            con.close()


def measure_patient_view(b: Bench) -> list[dict[str, Any]]:
    """The 30-day patient view: user path, then the same code without connection, scope and audit costs."""
    from warehouse.access import ClinicianSession

    user = ClinicianSession(b.s, PANEL_CLINICIAN)
    raw = raw_session(b.s, PANEL_CLINICIAN, b.panel)

    def fresh(opener: Callable[[], duckdb.DuckDBPyConnection]) -> Callable[[str], Any]:
        def view(pid: str) -> Any:
            con = opener()
            try:
                with reused(con):
                    return raw.patient(pid)
            finally:
                con.close()
        return view

    n = b.baseline_runs
    out = [row("ClinicianSession.patient (user path)", b.timed_per_patient(user.patient, b.runs),
               PATIENT_VIEW_TARGET_MS, "cached snapshot instance + scope + queries + audit")]
    out.append(row("raw, new encrypted instance per call",
                   b.timed_per_patient(fresh(lambda: open_encrypted(b.s)), n), None,
                   "= first read after a publish, or a CLI process"))
    out.append(row("raw, new plain instance per call",
                   b.timed_per_patient(fresh(lambda: open_plain(b.plain)), n), None, "unencrypted copy"))
    for plain in (False, True):
        with b.warm(plain) as con, reused(con):
            samples = b.timed_per_patient(raw.patient, n)
        out.append(row(f"raw, warm {'plain' if plain else 'encrypted'} connection", samples, None,
                       "queries + result shaping only"))
    return out


LATEST_VITALS_SQL = """
    SELECT patient_id, metric, value, diastolic, unit, measured_at, measured_local, device_id
    FROM mart_latest_vitals WHERE list_contains(?, patient_id) ORDER BY patient_id, metric"""


def measure_panel(b: Bench) -> list[dict[str, Any]]:
    """The 100-patient panel: the CLI's patients() and alerts(), and latest vitals + open alerts as SQL."""
    from warehouse.access import ClinicianSession
    from warehouse.alerts import open_alerts
    from warehouse.db import rows
    from warehouse.serving import serving

    user = ClinicianSession(b.s, PANEL_CLINICIAN)
    raw = raw_session(b.s, PANEL_CLINICIAN, b.panel)
    n = len(b.panel)
    out = [row("ClinicianSession.patients (user path)", timed(user.patients, b.runs), PANEL_TARGET_MS,
               f"{n} patients: last reading, readings 30d, open alerts"),
           row("ClinicianSession.alerts (user path)", timed(user.alerts, b.runs), PANEL_TARGET_MS,
               f"open alerts of {n} patients")]

    def latest_and_alerts(con: duckdb.DuckDBPyConnection) -> Any:
        return rows(con.execute(LATEST_VITALS_SQL, [b.panel])), open_alerts(con, b.panel)

    def served_latest() -> Any:
        with serving(b.s) as con:
            return latest_and_alerts(con)

    out.append(row("latest vitals + open alerts via serving()", timed(served_latest, b.runs), PANEL_TARGET_MS,
                   "mart_latest_vitals for the panel; no scope, no audit"))
    for plain in (False, True):
        kind = "plain" if plain else "encrypted"
        with b.warm(plain) as con, reused(con):
            out.append(row(f"raw patients(), warm {kind} connection", timed(raw.patients, b.baseline_runs),
                           None, ""))
            out.append(row(f"latest vitals + open alerts, warm {kind}",
                           timed(lambda c=con: latest_and_alerts(c), b.baseline_runs), None, ""))
    return out


def last_closed_month(today: date | None = None) -> str:
    """The month a billing run at the start of a month reports: the previous calendar month (UTC)."""
    today = today or datetime.now(UTC).date()
    year, month = (today.year, today.month - 1) if today.month > 1 else (today.year - 1, 12)
    return f"{year:04d}-{month:02d}"


def measure_billing(b: Bench) -> list[dict[str, Any]]:
    """Billing for every patient for one month: the nurse's ClinicianSession.billing, then the report
    alone."""
    from warehouse.access import ClinicianSession
    from warehouse.billing import billing_report

    month = last_closed_month()
    user = ClinicianSession(b.s, ALL_CLINICIAN)
    out = [row(f"ClinicianSession.billing({month}) (user path)", timed(lambda: user.billing(month), b.runs),
               BILLING_TARGET_MS, f"{len(b.everyone):,} patients")]
    for plain in (False, True):
        with b.warm(plain) as con:
            samples = timed(lambda c=con: billing_report(c, month, b.everyone, practice_tz=b.s.practice_tz),
                            b.baseline_runs)
        out.append(row(f"billing_report, warm {'plain' if plain else 'encrypted'} connection", samples,
                       BILLING_TARGET_MS, "no scope, no audit"))
    return out


def measure_telehealth(b: Bench) -> list[dict[str, Any]]:
    """Every telehealth report from the pseudonymised store, as ``rpm reports`` runs them (practice view)."""
    from warehouse.reports import REPORTS, report

    out = []
    for name in REPORTS:
        n_rows = len(report(b.s, name))
        out.append(row(f"report {name}", timed(lambda n=name: report(b.s, n), b.runs), None,
                       f"{n_rows:,} rows"))
    return out


def measure_components(b: Bench) -> list[dict[str, Any]]:
    """What a user-path request is made of besides its queries."""
    from warehouse.audit import AuditLog
    from warehouse.registry import care_team_patients

    def open_close(opener: Callable[[], duckdb.DuckDBPyConnection]) -> Callable[[], None]:
        return lambda: opener().close()

    n = b.baseline_runs
    out = [row("open + close encrypted snapshot instance", timed(open_close(lambda: open_encrypted(b.s)), n),
               None, "LOAD httpfs + ATTACH: once per published snapshot"),
           row("open + close plain connection", timed(open_close(lambda: open_plain(b.plain)), n), None, "")]
    with b.warm() as con:
        out.append(row("care-team scope check (warm)",
                       timed(lambda: care_team_patients(con, PANEL_CLINICIAN), n), None, ""))
    log = AuditLog(b.s)
    lines = len(log.path.read_bytes().splitlines()) if log.path.exists() else 0

    def append() -> None:
        log.append("bench", "patient", [b.panel[0]], {"view": "patient"}, 1)

    out.append(row("audit append", timed(append, n), None, f"log of {lines:,} records"))
    return out


def synthesize_audit_log(s: Settings, records: int) -> Any:
    """A genuine audit log of ``records`` chained, sealed records (written in one go, without the per-record
    fsyncs of ``AuditLog.append``): every append authenticates the chain, so copies of one line would be
    refused as tampering. Each process walks such a log once, then only what was appended since."""
    from warehouse.audit import GENESIS, AuditLog, _canonical

    log = AuditLog(s)
    prev, ts = GENESIS, datetime.now(UTC).isoformat(timespec="microseconds")
    with open(log.path, "wb") as f:
        for seq in range(records):
            record = {"seq": seq, "ts": ts, "actor": "bench", "os_user": "bench", "action": "patient",
                      "patients": ["pt-00001"], "query": {"view": "patient", "patient_id": "pt-00001"},
                      "rows": 42, "outcome": "ok", "prev": prev}
            record["mac"] = prev = log._mac(_canonical(record))
            f.write(base64.b64encode(log.keyring.seal(_canonical(record), f"audit:{seq}".encode())) + b"\n")
    log._write_head(records - 1, prev)  # append continues only from the authenticated head
    return log


def measure_audit_growth(b: Bench, sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """AuditLog.append against logs of growing length: a process authenticates the whole chain at its first
    append (audit.verified left by another process shortens that to a hash of the prefix), then only what was
    appended since."""
    out = []
    for records in sizes:
        home = Path(b.s.home) / f"audit-growth-{records}"  # type: ignore[arg-type]
        # The warehouse's keys, copied: the scratch log's anchor (secrets/audit.anchor) must not become the
        # real log's, or the next run on this home would find the real log "rolled back".
        shutil.copytree(b.s.secrets_dir, home / "secrets", ignore=shutil.ignore_patterns("audit.anchor"))
        scratch = Settings(home=home, secrets_dir=home / "secrets")
        try:
            log = synthesize_audit_log(scratch, records)
            size_mb = log.path.stat().st_size / 2**20

            def append(lg: Any = log) -> None:
                lg.append("bench", "patient", ["pt-00001"], {"view": "patient"}, 1)

            first = timed(append, 1, warmup=0)
            samples = timed(append, b.baseline_runs, warmup=0)
            out.append(row(f"audit append, log of {records:,} records", samples, None, f"{size_mb:,.0f} MiB"))
            out.append(row(f"first append of a process, log of {records:,} records", first, None,
                           "the whole chain authenticated once"))
        finally:
            shutil.rmtree(home, ignore_errors=True)
    return out


# --- where the time goes (--profile) -----------------------------------------------------------------------

class _Result:
    """The part of a DuckDB cursor the warehouse code reads: description, fetchall, fetchone."""

    def __init__(self, rows: list[tuple], description: Any):
        self.description, self._rows = description, rows

    def fetchall(self) -> list[tuple]:
        return self._rows

    def fetchone(self) -> tuple | None:
        return self._rows[0] if self._rows else None


class Profiled:
    """A connection stand-in that runs every statement under DuckDB's JSON profiler and keeps, per statement,
    its latency and its most expensive operators."""

    def __init__(self, con: duckdb.DuckDBPyConnection, out: Path):
        self.con, self.out, self.statements = con, out, []
        con.execute("PRAGMA enable_profiling = 'json'")
        con.execute(f"PRAGMA profiling_output = '{out}'")

    def execute(self, sql: str, params: Any = None) -> _Result:
        cur = self.con.execute(sql) if params is None else self.con.execute(sql, params)
        result = _Result(cur.fetchall(), cur.description)
        tree = json.loads(self.out.read_text())
        ops: list[tuple[float, str]] = []
        _operators(tree, ops)
        top = ", ".join(f"{name} {s * 1000:,.0f} ms" for s, name in sorted(ops, reverse=True)[:3])
        self.statements.append({"sql": " ".join(sql.split())[:70], "ms": tree.get("latency", 0.0) * 1000,
                                "top_operators": top})
        return result

    def close(self) -> None:
        self.con.execute("PRAGMA disable_profiling")


def _operators(node: dict[str, Any], out: list[tuple[float, str]]) -> None:
    """Operator timings of a profile tree (summed over threads), with the table or rows they touched."""
    name = node.get("operator_name") or node.get("operator_type")
    if name and node.get("operator_timing", 0) > 0:
        extra = node.get("extra_info") or {}
        table = extra.get("Table", "") if isinstance(extra, dict) else ""
        rows = node.get("operator_cardinality", 0)
        out.append((node["operator_timing"], f"{name.strip()}{f' {table}' if table else ''} ({rows:,} rows)"))
    for child in node.get("children", []):
        _operators(child, out)


def profile(b: Bench) -> list[dict[str, Any]]:
    """Every statement of the patient view, the panel and the billing report, profiled once (warm
    encrypted connection, after a warm-up): the evidence behind BENCH notes on missed targets."""
    from warehouse.billing import billing_report

    raw = raw_session(b.s, PANEL_CLINICIAN, b.panel)
    out: list[dict[str, Any]] = []
    with b.warm() as con:
        prof = Profiled(con, Path(b.s.home) / "bench-profile.json")  # type: ignore[arg-type]
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("patient view", lambda: raw.patient(b.sequence[0])), ("panel patients()", raw.patients),
            ("billing",
             lambda: billing_report(prof, last_closed_month(), b.everyone,  # type: ignore[arg-type]
                                    practice_tz=b.s.practice_tz))]
        with reused(prof):  # type: ignore[arg-type]
            for label, step in steps:
                step()
                prof.statements.clear()
                step()
                out += [{"call": label, **st} for st in prof.statements]
        prof.close()
    print_table("Profile (one warm run; operator times are summed over threads)",
                ["call", "statement", "ms", "top operators"],
                [[r["call"], r["sql"], r["ms"], r["top_operators"]] for r in out])
    return out


# --- driver ----------------------------------------------------------------------------------------------

SECTIONS = ("patient_view", "panel", "billing", "telehealth", "components", "audit_growth")


def run(s: Settings, runs: int, baseline_runs: int, seed: int, audit_sizes: tuple[int, ...],
        with_profile: bool = False, only: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """Every measurement on the warehouse under ``s.home``; prints the tables and returns them."""
    with Timer() as t:
        plain = make_plain_copy(s)
    print(f"plain copy for the baseline: {plain.stat().st_size / 2**20:,.0f} MiB in {t.seconds:.1f} s",
          flush=True)
    b = Bench(s, runs, baseline_runs, seed, plain)
    results: dict[str, Any] = {"runs": runs, "baseline_runs": baseline_runs, "panel_patients": len(b.panel),
                               "all_patients": len(b.everyone)}
    sections: list[tuple[str, str, Callable[[], list[dict[str, Any]]]]] = [
        ("patient_view", f"Patient view, 30 days, random patients of a {len(b.panel)}-patient panel",
         lambda: measure_patient_view(b)),
        ("panel", f"Panel of {len(b.panel)} patients", lambda: measure_panel(b)),
        ("billing", f"Billing report, all {len(b.everyone):,} patients, one month",
         lambda: measure_billing(b)),
        ("telehealth", "Telehealth reports (pseudonymised store)", lambda: measure_telehealth(b)),
        ("components", "Parts of a user-path request", lambda: measure_components(b)),
        ("audit_growth", "Audit append vs log length", lambda: measure_audit_growth(b, audit_sizes)),
    ]
    try:
        for key, title, measure in sections:
            if key not in only:
                continue
            results[key] = measure()
            show(title, results[key])
        if with_profile:
            results["profile"] = profile(b)
    finally:
        plain.unlink(missing_ok=True)
    return results


def prepare(s: Settings, compact: bool, memory_limit: str | None = None) -> dict[str, Any]:
    """Bring a reused warehouse to this release (migrations, views) and publish it: as it is, or first
    compacted (``warehouse.compaction``: readings rewritten in (patient, time) order); timed."""
    from warehouse.compaction import compact as compact_warehouse
    from warehouse.serving import publish_snapshot

    with Timer() as t:
        if compact:
            done = compact_warehouse(s, memory_limit=memory_limit).to_xcom()
        else:
            publish_snapshot(s)
            done = {}
    print(f"{'compacted and published' if compact else 'migrated and published'} in {t.seconds:.1f} s "
          f"{done}", flush=True)
    return {"compacted": compact, "seconds": round(t.seconds, 1), **done}


def main(argv: list[str] | None = None) -> int:
    p = parser("Clinician and reporting query latency over a generated warehouse.", DEFAULT_SIZE)
    p.add_argument("--patients", type=int, default=DEFAULT_PATIENTS)
    p.add_argument("--runs", type=int, default=50,
                   help="timed runs of every query with a target and of each report (after one warm-up)")
    p.add_argument("--baseline-runs", type=int, default=20,
                   help="timed runs of the breakdown rows: raw, plain, request parts, audit growth")
    p.add_argument("--order", choices=("time", "patient"), default="time",
                   help="physical order of the generated readings (see bench/generate.py)")
    p.add_argument("--key", choices=("build", "skip"), default=None,
                   help="no effect: readings have no key index since migration 005 (kept for older commands)")
    p.add_argument("--home",
                   help="reuse the warehouse of `python -m bench.generate --home DIR` (no generation)")
    p.add_argument("--compact", action="store_true",
                   help="with --home: compact the warehouse first (readings in patient, time order, as rpm_daily "
                        "does); without it the reused warehouse is measured in the order it has")
    p.add_argument("--compact-memory-limit", default="8GB",
                   help="DuckDB memory limit of the --compact rewrite")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to measure (default all: {','.join(SECTIONS)})")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--audit-sizes", default=",".join(str(n) for n in AUDIT_LOG_SIZES),
                   help="audit log lengths to time the append against (comma-separated)")
    p.add_argument("--profile", action="store_true",
                   help="also profile each statement of the patient view, panel and billing "
                        "(DuckDB profiler)")
    a = p.parse_args(argv)
    sizes = tuple(int(x) for x in a.audit_sizes.split(",") if x.strip())
    only = tuple(x.strip() for x in a.only.split(",") if x.strip())
    unknown = set(only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}: one of {', '.join(SECTIONS)}")
    if a.home:
        s = Settings(home=Path(a.home))
        prepared = prepare(s, a.compact, a.compact_memory_limit)
        results = run(s, a.runs, a.baseline_runs, a.seed, sizes, a.profile, only)
        results.update(generation=None, prepared=prepared)
    else:
        with bench_home("queries") as s:
            g = generate(s, Plan(a.patients, a.size, order=a.order))
            generation_report(g)
            results = run(s, a.runs, a.baseline_runs, a.seed, sizes, a.profile, only)
            results["generation"] = g.as_dict()
    results.update(size=a.size, patients=a.patients, order=a.order)
    write_json(a.json, "queries", json.loads(json.dumps(results, default=str)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
