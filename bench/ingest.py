"""Ingest throughput against the two floors any MQTT consumer stands on, and an RSS soak.

    python -m bench.ingest [--size N] [--soak-seconds S] [--json PATH]

One publisher fleet (bench.fleet) sends the same streams — N readings as single-reading messages, then as
batches of 50 — to one consumer at a time:

- ``mosquitto_sub``: the stock C client, QoS 1, output counted and thrown away (the broker's delivery floor);
- bare paho: an MQTT 5 subscriber in its own process that only counts (auto ack after the callback);
- the ingest service, started by ``rpm``'s own code: rate of *durable* messages — appended to a landing
  segment, fsynced, then PUBACKed — read from its Prometheus counters.

Each consumer is measured two ways. *Live*: the consumer is connected, the fleet publishes, and the clock
runs from the first publish to the last message (for ingest: the last durable ack); it says whether the
consumer keeps up, but on a shared machine the publishers compete with it for CPU. *Drain*: the stream is
queued first in the consumer's persistent session (clean_start=False), then the consumer starts and the clock
runs from its first message to its last: the publisher is out of the picture, so this is the fair comparison
of consumers. All three use the ingest service's broker login and its Receive Maximum, so the only difference
is the work done per message. Afterwards the landing segments are sealed, decrypted and counted: every
published message must be there exactly once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench import fleet
from bench.common import bench_home, machine, parser, print_table, rss_mb, write_json
from core.settings import Settings

SHAPES = (("single", 1), ("batch", fleet.BATCH))
MODES = ("live", "drain")
SUB_CLIENT = "bench-mosquitto-sub"
PAHO_CLIENT = "bench-paho"
SESSION_S = 3600  # a baseline's queued session lives this long at most if a run is interrupted
POLL_S = 0.02  # metrics scrape interval: the timing resolution of the ingest runs
RPM = str(Path(sys.executable).with_name("rpm"))


@dataclass
class Run:
    """One consumer draining one stream."""

    consumer: str
    shape: str
    mode: str
    messages: int
    readings: int
    seconds: float
    publish_msgs_per_s: float
    landing: dict[str, int] = field(default_factory=dict)

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.seconds

    @property
    def readings_per_s(self) -> float:
        return self.readings / self.seconds


@dataclass
class Window:
    """When a consumer saw its first and its last message (time.monotonic, comparable across processes)."""

    first: float
    last: float
    count: int


# --- consumers ---------------------------------------------------------------------------------------------
class MosquittoSub:
    """The stock C client. Its login comes from a config file (XDG_CONFIG_HOME), never the command line."""

    name = "mosquitto_sub"

    def __init__(self, s: Settings, creds: list[fleet.Credential]):
        from core import keys

        self.s, self.creds = s, creds
        self.config = Path(s.home) / "bench-mosquitto-sub"  # type: ignore[arg-type]
        self.config.mkdir(mode=0o700, exist_ok=True)
        keys.write_private(self.config / "mosquitto_sub",
                           f"-u {s.ingest_username}\n-P {keys.service_password(s, 'ingest')}\n".encode())
        self.proc: subprocess.Popen | None = None
        self._window: Window | None = None
        self._reader: threading.Thread | None = None

    def _argv(self, *extra: str) -> list[str]:
        return ["mosquitto_sub", "-V", "mqttv5", "-q", "1", "-h", self.s.broker_host, "-p", str(self.s.broker_ingest_port),
                "-t", "rpm/v1/#", "-i", SUB_CLIENT, "-c", "-D", "connect", "receive-maximum",
                str(self.s.ingest_receive_maximum), *extra]

    def _env(self) -> dict[str, str]:
        return {**os.environ, "XDG_CONFIG_HOME": str(self.config)}

    def prepare(self) -> None:
        """Create the persistent session and its subscription (-E: exit once the SUBACK arrives)."""
        subprocess.run(self._argv("-x", str(SESSION_S), "-E"), env=self._env(), check=True, timeout=30,
                       stdout=subprocess.DEVNULL)

    def start(self, expected: int, live: bool) -> None:
        """Resume the session and count output lines; -x 0 removes the session when it exits.

        Live, one probe message is published and awaited first, so the clock never includes the connect."""
        total = expected + (1 if live else 0)
        # -F x prints "x\n" per message: the output costs the same for a 150-byte reading or a 9 KB batch.
        self.proc = subprocess.Popen(self._argv("-x", "0", "-C", str(total), "-F", "x"), env=self._env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        seen = [0]
        self._reader = threading.Thread(target=self._read, args=(total, seen), daemon=True)
        self._reader.start()
        if live:
            _probe(self.s, self.creds[0])
            _wait_for(lambda: seen[0] >= 1, 30, "mosquitto_sub to receive the probe")

    def _read(self, total: int, seen: list[int]) -> None:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        first = last = 0.0
        while seen[0] < total:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            now = time.monotonic()
            first = first or now
            seen[0] += chunk.count(b"\n")
            last = now
        self._window = Window(first, last, seen[0])

    def wait(self, timeout: float) -> Window:
        assert self._reader is not None and self.proc is not None
        self._reader.join(timeout)
        self.proc.wait(timeout=30)
        if self._window is None:
            raise TimeoutError(f"mosquitto_sub did not finish within {timeout:.0f}s")
        return self._window

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # our own child, by its pid
            self.proc.wait()


class ChildConsumer:
    """A consumer in its own process (as the ingest service runs in its own): it reports once subscribed,
    then once with the first/last arrival and the count. Subclasses name the process target."""

    name = "consumer"

    def __init__(self) -> None:
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.proc: Any = None
        self.out: Any = None

    def _spawn(self, target: Any, args: tuple, proc_name: str) -> None:
        self.out = self.ctx.Queue()
        self.proc = self.ctx.Process(target=target, args=(*args, self.out), daemon=True, name=proc_name)
        self.proc.start()
        self._message(60)

    def _message(self, timeout: float) -> dict:
        msg = self.out.get(timeout=timeout)
        if "error" in msg:
            raise RuntimeError(f"{self.name}: {msg['error']}")
        return msg

    def wait(self, timeout: float) -> Window:
        msg = self._message(timeout)
        self.proc.join(timeout=30)
        return Window(msg["first"], msg["last"], msg["count"])

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.terminate()  # our own child, by its pid
            self.proc.join(timeout=10)


class BarePaho(ChildConsumer):
    """A paho MQTT 5 subscriber that only counts."""

    name = "bare paho"

    def __init__(self, s: Settings, creds: list[fleet.Credential]):
        super().__init__()
        self.s = s

    def prepare(self) -> None:
        """Create the persistent session and its subscription, then leave."""
        subscribe_session(self.s, PAHO_CLIENT)

    def start(self, expected: int, live: bool) -> None:
        self._spawn(_paho_count, (self.s, expected), "bench-paho-counter")


def resume_session(client: Any, s: Settings, out: Any) -> None:
    """Connect to the persistent session holding our queued stream (reporting on ``out`` once connected),
    with the ingest service's Receive Maximum so every consumer gets the same window."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client.on_connect = lambda c, u, f, rc, p: out.put({"connected": not rc.is_failure})
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    props.ReceiveMaximum = s.ingest_receive_maximum
    client.connect(s.broker_host, s.broker_ingest_port, keepalive=30, clean_start=False, properties=props)


def subscribe_session(s: Settings, client_id: str, expiry_s: int = SESSION_S) -> None:
    """A persistent session subscribed to rpm/v1/# with the ingest login: the broker queues for it from now."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.subscribeoptions import SubscribeOptions

    from core import keys
    from ingest.service import make_client

    client = make_client(client_id, s.ingest_username, keys.service_password(s, "ingest"))
    done = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("rpm/v1/#", options=SubscribeOptions(qos=1))
    client.on_subscribe = lambda c, u, mid, rcs, p: done.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry_s
    client.connect(s.broker_host, s.broker_ingest_port, keepalive=30, clean_start=True, properties=props)
    client.loop_start()
    try:
        if not done.wait(30):
            raise TimeoutError(f"{client_id}: no CONNACK/SUBACK within 30s")
    finally:
        client.disconnect()
        client.loop_stop()


def _paho_count(s: Settings, expected: int, out: Any) -> None:
    """Child process: resume the session (expiry 0: removed afterwards), count ``expected`` messages."""

    from core import keys
    from ingest.service import make_client

    try:
        client = make_client(PAHO_CLIENT, s.ingest_username, keys.service_password(s, "ingest"))
        state = {"count": 0, "first": 0.0, "last": 0.0}

        def on_message(c, userdata, msg) -> None:
            now = time.monotonic()
            state["first"] = state["first"] or now
            state["count"] += 1
            if state["count"] >= expected:
                state["last"] = now
                c.disconnect()

        client.on_message = on_message
        resume_session(client, s, out)
        client.loop_forever()
        out.put(state)
    except BaseException as exc:
        out.put({"error": f"{type(exc).__name__}: {exc}"})


class Ingest:
    """The project's ingest service, started and stopped with rpmctl's own functions; timed by its counters."""

    name = "ingest"

    def __init__(self, s: Settings, creds: list[fleet.Credential]):
        self.s = s
        self._poller: threading.Thread | None = None
        self._window: Window | None = None
        self._expected = 0

    def prepare(self) -> None:
        """Make sure the ingest session and subscription exist, then stop it: the broker queues for it."""
        from rpmctl import services
        from rpmctl.services import procs

        services.up(self.s)
        procs.stop(self.s, services.INGEST)

    def start(self, expected: int, live: bool) -> None:
        """Start the service (returns once subscribed), its counters starting from zero."""
        from rpmctl import services

        self._expected, self._window = expected, None
        self._poller = threading.Thread(target=self._poll, args=(expected,), daemon=True)
        self._poller.start()
        services.up(self.s)

    def _poll(self, expected: int) -> None:
        first = 0.0
        deadline = time.monotonic() + 24 * 3600
        while time.monotonic() < deadline:
            counters = ingest_counters(self.s)
            now = time.monotonic()
            if counters.get("received", 0) > 0:
                first = first or now
            if counters.get("acked", 0) >= expected:
                self._window = Window(first, now, counters["acked"])
                return
            time.sleep(POLL_S)  # scrape interval, the resolution of the measurement

    def wait(self, timeout: float) -> Window:
        assert self._poller is not None
        self._poller.join(timeout)
        if self._window is None:
            raise TimeoutError(f"ingest did not ack {self._expected} messages within {timeout:.0f}s "
                               f"(counters {ingest_counters(self.s)})")
        return self._window

    def close(self) -> None:
        pass  # bench_home stops the service


class Consumer(Protocol):
    """What :func:`measure` drives: a subscriber with a persistent session, started live or after queueing."""

    name: str

    def prepare(self) -> None: ...

    def start(self, expected: int, live: bool) -> None: ...

    def wait(self, timeout: float) -> Window: ...

    def close(self) -> None: ...


def ingest_counters(s: Settings) -> dict[str, int]:
    """received / landed / acked from the ingest's Prometheus endpoint ({} while it is not serving)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{s.ingest_metrics_port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        for key in ("received", "landed", "acked"):
            if line.startswith(f"rpm_ingest_messages_{key}_total "):
                out[key] = int(float(line.split()[1]))
    return out


def _probe(s: Settings, cred: fleet.Credential) -> None:
    """One message on a device's own topic (only the baselines see it: no ingest session exists yet)."""
    from rpmctl.tools.publish import DevicePublisher

    with DevicePublisher(s, cred.device_id, cred.password) as pub:
        pub.publish(b'{"probe": true}')
        pub.wait_all()


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.005) -> None:
    from rpmctl.tools.publish import wait_until

    wait_until(predicate, timeout, interval=interval, what=what)


# --- one measurement ---------------------------------------------------------------------------------------
def measure(s: Settings, consumer: Consumer, creds: list[fleet.Credential], stream: fleet.Stream, shape: str,
            mode: str, workers: int) -> tuple[Run, fleet.PublishResult]:
    """Publish ``stream`` and time ``consumer`` receiving it, live or drained from its queued session."""
    expected = fleet.count_messages(stream, len(creds))
    timeout = 120 + expected / 500
    consumer.prepare()
    try:
        if mode == "live":
            consumer.start(expected, live=True)
            pub = fleet.publish(s, creds, stream, workers=workers)
            window = consumer.wait(timeout)
            seconds = window.last - pub.started_at
        else:
            pub = fleet.publish(s, creds, stream, workers=workers)
            consumer.start(expected, live=False)
            window = consumer.wait(timeout)
            seconds = window.last - window.first
    finally:
        consumer.close()
    _check_published(pub, expected)
    counted = window.count - (1 if mode == "live" and isinstance(consumer, MosquittoSub) else 0)
    if counted < expected:
        raise RuntimeError(f"{consumer.name} received {counted} of {expected} messages")
    run = Run(consumer.name, shape, mode, expected, stream.readings, max(seconds, 1e-9),
              pub.messages / pub.seconds)
    print(f"  {run.consumer:<13} {shape:<6} {mode:<5} {run.msgs_per_s:>10,.0f} msg/s "
          f"{run.readings_per_s:>11,.0f} readings/s  (publisher {run.publish_msgs_per_s:,.0f} msg/s)", flush=True)
    return run, pub


def _check_published(pub: fleet.PublishResult, expected: int) -> None:
    if pub.messages != expected or pub.acked != expected:
        raise RuntimeError(f"fleet published {pub.messages} and got {pub.acked} PUBACKs of {expected}")


# --- landing -----------------------------------------------------------------------------------------------
class Landing:
    """Counts what ingest landed, segment by segment, decrypting with the landing keyring."""

    def __init__(self, s: Settings):
        self.s = s
        self.seen: set[str] = set()

    def count_new(self) -> dict[str, int]:
        """Seal what ingest holds open, then count records, distinct payloads and readings in new segments."""
        import json

        from core.keyring import Keyring
        from core.landing import SEGMENT_SUFFIX, list_sealed, open_dir, read_segment
        from rpmctl.services.airflow_run import seal_open_segments

        seal_open_segments(self.s, timeout=120)
        keyring = Keyring.load(self.s, "landing")
        # Counting an open segment would miss what is appended to it later: insist everything is sealed.
        open_segments = open_dir(self.s.landing_dir).glob(f"*{SEGMENT_SUFFIX}")  # type: ignore[arg-type]
        if any(next(read_segment(p, keyring), None) is not None for p in open_segments):
            raise RuntimeError("ingest did not seal its open segment within 120s")
        records = readings = 0
        digests: set[int] = set()
        for path in list_sealed(self.s.landing_dir):  # type: ignore[arg-type]
            if path.name in self.seen:
                continue
            self.seen.add(path.name)
            for rec in read_segment(path, keyring):
                records += 1
                digests.add(hash((rec.topic, rec.payload)))
                doc = json.loads(rec.payload)
                readings += len(doc["readings"]) if "readings" in doc else 1
        return {"records": records, "distinct": len(digests), "readings": readings}


# --- soak --------------------------------------------------------------------------------------------------
def soak(s: Settings, creds: list[fleet.Credential], stream: fleet.Stream, seconds: float, workers: int,
         landing: Landing) -> dict[str, Any]:
    """Publish at a steady rate for ``seconds`` while sampling the ingest's RSS; then check nothing was lost."""
    from rpmctl import services
    from rpmctl.services import procs

    procs.stop(s, services.INGEST)
    services.up(s)  # a fresh process: its RSS starts from an idle service
    pid = procs.read_pid(s, services.INGEST)
    assert pid is not None
    expected = fleet.count_messages(stream, len(creds))
    result: dict[str, Any] = {}
    publisher = threading.Thread(target=lambda: result.update(pub=fleet.publish(s, creds, stream, workers)),
                                 daemon=True)
    interval = 2.0 if seconds <= 120 else 5.0
    samples: list[tuple[float, float]] = []
    t0 = time.monotonic()
    publisher.start()
    while publisher.is_alive() or not samples:
        samples.append((time.monotonic() - t0, rss_mb(pid)[0]))
        publisher.join(interval)  # the sampling period; returns early when publishing ends
    if "pub" not in result:
        raise RuntimeError("soak publisher failed (see its error above)")
    _wait_for(lambda: ingest_counters(s).get("acked", 0) >= expected, 120 + expected / 500,
              "the ingest to ack the soak stream", interval=POLL_S)
    samples.append((time.monotonic() - t0, rss_mb(pid)[0]))
    landed = landing.count_new()
    return {"rate": stream.rate, "seconds": result["pub"].seconds, "messages": expected,
            "acked_by_broker": result["pub"].acked, "landing": landed, "samples": samples,
            "rss_start_mb": samples[0][1], "rss_end_mb": samples[-1][1], "rss_peak_mb": rss_mb(pid)[1],
            "slope_mb_per_min": _slope(samples) * 60,
            # The first half includes warm-up (buffers, caches); a leak shows as a slope that persists.
            "slope_2nd_half_mb_per_min": _slope([x for x in samples if x[0] >= samples[-1][0] / 2]) * 60}


def _slope(samples: list[tuple[float, float]]) -> float:
    """Least-squares MiB per second over the samples."""
    n = len(samples)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in samples) / n
    my = sum(v for _, v in samples) / n
    den = sum((t - mx) ** 2 for t, _ in samples)
    return sum((t - mx) * (v - my) for t, v in samples) / den if den else 0.0


# --- the rpm CLI (pipeline + accounting) -------------------------------------------------------------------
def rpm(s: Settings, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    """Run the `rpm` console script as a user would, with these settings in its environment."""
    return subprocess.run([RPM, *args], env={**os.environ, **s.as_env()}, capture_output=True, text=True,
                          timeout=timeout, check=False)


def pipeline_run(s: Settings) -> dict[str, Any]:
    """One `rpm pipeline run` (seal, decode, validate, load, alerts, snapshot): its wall time and the
    seconds of the tasks the run record holds (claim .. evaluate_alerts; record_run writes it, so it and
    the tasks after it — snapshot, telehealth — are in the wall time only, with Airflow's start-up)."""
    import json

    from rpmctl.services.airflow_run import ensure_airflow_db
    from warehouse.db import clinical

    ensure_airflow_db(s)  # one-off Airflow metadata migration, not part of a run
    t0 = time.monotonic()
    proc = rpm(s, "pipeline", "run", "--json")
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"rpm pipeline run exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    run_id = json.loads(proc.stdout)["run_id"]
    with clinical(s, read_only=True) as con:
        row = con.execute("SELECT task_seconds FROM pipeline_runs WHERE run_id = ?", [run_id]).fetchone()
    tasks = {k: v for k, v in json.loads(row[0]).items() if v is not None} if row and row[0] else {}
    return {"seconds": seconds, "task_seconds": tasks, "tasks_total_seconds": sum(tasks.values())}


def accounting(s: Settings) -> dict[str, Any]:
    import json

    proc = rpm(s, "accounting", "--json")
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"rpm accounting exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


# --- the benchmark -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], default_size=200_000)
    p.add_argument("--soak-seconds", type=float, default=60.0, help="length of the RSS soak (0 skips it)")
    p.add_argument("--soak-rate", type=float, default=2_000.0, help="single-reading messages/s during the soak")
    p.add_argument("--devices", type=int, default=50, help="provisioned devices (5 per patient)")
    p.add_argument("--workers", type=int, default=3, help="publisher processes")
    p.add_argument("--accounting", action="store_true",
                   help="finally run `rpm pipeline run` + `rpm accounting` over everything landed")
    a = p.parse_args(argv)
    per_device = -(-a.size // a.devices)
    soak_readings = int(a.soak_seconds * a.soak_rate)
    # Room in the broker's queue for a whole drained stream of single messages.
    with bench_home("ingest", broker_max_queued_messages=max(5_000_000, a.size + 1)) as s:
        results = run_all(s, a, per_device, soak_readings)
    report(results, a)
    write_json(a.json, "ingest", results)
    return 0


def run_all(s: Settings, a: Any, per_device: int, soak_readings: int) -> dict[str, Any]:
    from rpmctl import services
    from rpmctl.services import broker

    services.init(s)
    t0 = time.monotonic()
    creds = fleet.provision(s, a.devices)
    print(f"provisioned {len(creds)} devices for {len(creds) // len(fleet.KINDS)} patients in "
          f"{time.monotonic() - t0:.1f}s", flush=True)
    broker.start(s)
    streams = _streams(a.size, len(creds), per_device, soak_readings, a.soak_rate)
    runs: list[Run] = []
    for consumer_cls in (MosquittoSub, BarePaho):  # baselines first: no ingest session queues beside them
        consumer = consumer_cls(s, creds)
        for shape, _ in SHAPES:
            for mode in MODES:
                runs.append(measure(s, consumer, creds, streams[shape, mode], shape, mode, a.workers)[0])
    landing, ingest = Landing(s), Ingest(s, creds)
    for shape, _ in SHAPES:
        for mode in MODES:
            run, pub = measure(s, ingest, creds, streams[shape, mode], shape, mode, a.workers)
            run.landing = {"published": pub.messages, "broker_acked": pub.acked, **landing.count_new(),
                           "readings_published": streams[shape, mode].readings}
            runs.append(run)
    out: dict[str, Any] = {"size": a.size, "devices": len(creds), "workers": a.workers,
                           "runs": [_run_json(r) for r in runs]}
    if a.soak_seconds > 0:
        out["soak"] = soak(s, creds, streams["soak"], a.soak_seconds, a.workers, landing)
    if a.accounting:
        out["pipeline"] = pipeline_run(s)
        out["accounting"] = accounting(s)
    return out


def _streams(size: int, devices: int, per_device: int, soak_readings: int,
             soak_rate: float) -> dict[Any, fleet.Stream]:
    """Four streams of ``size`` readings and the soak, on one timeline: no reading repeats another."""
    soak_per_device = -(-soak_readings // devices)
    step = fleet.step_for(4 * per_device + soak_per_device)
    anchor, k, out = fleet.anchor_now(), 0, {}
    for shape, batch in SHAPES:
        for mode in MODES:
            out[shape, mode] = fleet.Stream(readings=size, batch=batch, first_k=k, step_s=step, anchor=anchor)
            k = out[shape, mode].next_first_k(devices)
    out["soak"] = fleet.Stream(readings=max(soak_readings, devices), first_k=k, step_s=step, anchor=anchor,
                               rate=soak_rate)
    return out


def _run_json(r: Run) -> dict[str, Any]:
    return {"consumer": r.consumer, "shape": r.shape, "mode": r.mode, "messages": r.messages,
            "readings": r.readings, "seconds": r.seconds, "msgs_per_s": r.msgs_per_s,
            "readings_per_s": r.readings_per_s, "publisher_msgs_per_s": r.publish_msgs_per_s,
            "landing": r.landing}


def report(results: dict[str, Any], a: Any) -> None:
    runs = results["runs"]
    print_table(f"Consumers: {a.size:,} readings per stream, {results['devices']} devices, "
                f"{results['workers']} publisher processes",
                ["consumer", "shape", "mode", "messages", "seconds", "msgs/s", "readings/s", "publisher msgs/s"],
                [[r["consumer"], r["shape"], r["mode"], r["messages"], r["seconds"], r["msgs_per_s"],
                  r["readings_per_s"], r["publisher_msgs_per_s"]] for r in runs])
    short = sorted({f"{r['consumer']} {r['shape']} {r['mode']}" for r in runs if r["seconds"] < 1.0})
    if short:
        print(f"Under 1 s, too short to time well (use a larger --size): {', '.join(short)}\n")
    by = {(r["consumer"], r["shape"], r["mode"]): r for r in runs}
    rows = []
    for shape, _ in SHAPES:
        for mode in MODES:
            ing, paho, sub = (by[c, shape, mode] for c in ("ingest", "bare paho", "mosquitto_sub"))
            rows.append([shape, mode, ing["readings_per_s"], paho["readings_per_s"], sub["readings_per_s"],
                         ing["readings_per_s"] / paho["readings_per_s"],
                         ">= 0.9 x bare paho" if shape == "single" else ">= 500,000 readings/s"])
    print_table("Ingest (durable: fsynced, then acked) against the baselines, readings/s",
                ["shape", "mode", "ingest", "bare paho", "mosquitto_sub", "ingest / paho", "target"], rows)
    print_table("Zero loss: ingest's landing segments, sealed, decrypted and counted",
                ["shape", "mode", "published", "broker acked", "landed records", "distinct", "readings published",
                 "readings landed", "lost"],
                [[r["shape"], r["mode"], r["landing"]["published"], r["landing"]["broker_acked"],
                  r["landing"]["records"], r["landing"]["distinct"], r["landing"]["readings_published"],
                  r["landing"]["readings"], r["landing"]["published"] - r["landing"]["distinct"]]
                 for r in runs if r["consumer"] == "ingest"])
    if "soak" in results:
        sk = results["soak"]
        print_table(f"Soak: single readings at {sk['rate']:,.0f}/s for {sk['seconds']:.0f}s (ingest RSS, MiB)",
                    ["messages", "landed", "lost", "RSS start", "RSS end", "RSS peak", "slope MiB/min",
                     "2nd half MiB/min"],
                    [[sk["messages"], sk["landing"]["distinct"], sk["messages"] - sk["landing"]["distinct"],
                      sk["rss_start_mb"], sk["rss_end_mb"], sk["rss_peak_mb"], sk["slope_mb_per_min"],
                      sk["slope_2nd_half_mb_per_min"]]])
    if "accounting" in results:
        acc = results["accounting"]
        pipe = results["pipeline"]
        print_table(f"Accounting after one `rpm pipeline run` ({pipe['seconds']:.1f}s wall, "
                    f"{pipe['tasks_total_seconds']:.1f}s in claim .. evaluate_alerts)",
                    ["received", "loaded", "quarantined", "duplicates", "balanced", "pending"],
                    [[acc["received"], acc["loaded"], acc["quarantined"], acc["duplicates"], acc["balanced"],
                      acc["pending"]["sealed_messages"] + acc["pending"]["open_messages"]]])
    print_table("Machine", ["", ""], list(machine().items()))


if __name__ == "__main__":
    raise SystemExit(main())
