"""Shared pieces of the benchmark scripts: an isolated RPM_HOME on free loopback ports, memory readings,
percentiles and the result tables every script prints.

Benchmarks are scripts, not tests: they print figures (and the baseline measured in the same run) and never
fail on a timing. Each script accepts ``--size`` and ``--json PATH`` (machine-readable results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def bench_home(prefix: str, keep: bool = False, **overrides: Any) -> Iterator[Settings]:
    """Settings whose state lives in a fresh temporary folder, with every listener on a free loopback port.
    Whatever the block started (broker, ingest, service, exporter) is stopped afterwards and the folder removed."""
    from rpmctl import services
    from rpmctl.services import procs

    base = Path(tempfile.mkdtemp(prefix=f"rpm-bench-{prefix}-"))
    os.chmod(base, 0o755)  # the broker drops to an unprivileged account and must traverse it
    ports = {name: free_port() for name in ("broker_port", "broker_tls_port", "broker_ingest_port",
                                             "ingest_metrics_port", "service_port", "metrics_port",
                                             "metrics_statsd_port", "airflow_port")}
    s = Settings(home=base / "var", broker_tls_bind="127.0.0.1", **{**ports, **overrides})
    try:
        yield s
    finally:
        # Everything `rpm up` may have started here, whatever the script did (a collision or a crash included).
        procs.stop(s, services.INGEST, timeout=30)
        services.down(s)
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc (VmRSS, VmHWM)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def self_peak_mb() -> float:
    """Peak RSS of this process (MiB)."""
    return rss_mb(os.getpid())[1]


def reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) so a stage's own peak can be read afterwards (Linux ≥ 4.0)."""
    try:
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
    except OSError:
        pass


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of ``samples``."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / max / mean of durations given in seconds, in milliseconds."""
    ms = [x * 1000 for x in samples_s]
    return {"runs": len(ms), "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "max_ms": max(ms), "mean_ms": statistics.fmean(ms)}


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain-text table (also valid Markdown), so BENCHMARKS.md can quote the output as printed."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) + " |")
    print(flush=True)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import duckdb

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 1024 / 1024, 1),
            "python": platform.python_version(), "duckdb": duckdb.__version__, "kernel": platform.release()}


def parser(description: str, default_size: int, repeat_size: bool = False) -> argparse.ArgumentParser:
    """``--size`` (repeatable when ``repeat_size``: one measurement per size) and ``--json PATH``."""
    p = argparse.ArgumentParser(description=description)
    if repeat_size:
        p.add_argument("--size", type=int, action="append",
                       help=f"workload size, repeatable (default {default_size:,})")
    else:
        p.add_argument("--size", type=int, default=default_size, help=f"workload size (default {default_size:,})")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return p


def write_json(path: str | None, name: str, results: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps({"benchmark": name, "machine": machine(), **results}, indent=2,
                                         default=str))
