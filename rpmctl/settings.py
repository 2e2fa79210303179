"""One typed settings object for every component: broker, ingest, landing, warehouse, Airflow.

Each field can be overridden by an environment variable named ``RPM_<FIELD>`` (upper case), e.g.
``RPM_HOME=/srv/rpm`` or ``RPM_BROKER_PORT=1883``. Paths derived from ``home`` follow it unless set
explicitly. Nothing else in the code base reads ``os.environ`` for configuration.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def _doc(text: str, **kwargs: Any) -> Any:
    return field(metadata={"doc": text}, **kwargs)


@dataclass(frozen=True)
class Settings:
    home: Path = _doc("Root of all generated state (git-ignored): secrets, broker, landing, warehouse, logs.",
                      default=REPO_ROOT / "var")

    # --- broker -------------------------------------------------------------------------------------
    broker_host: str = _doc("Host the ingest service, the CLI and local devices connect to.", default="127.0.0.1")
    broker_port: int = _doc("Plain MQTT listener for devices on this host (simulator, tests), loopback only. Like "
                            "the TLS listener, it ties each client id to its login.", default=11883)
    broker_ingest_port: int = _doc(
        "The ingest service's own listener, loopback only, where only the ingest login is accepted: devices "
        "cannot reach it, so no device login can resume or discard the ingest session (whose client id is "
        "stable and known).", default=11884)
    broker_tls_port: int = _doc("MQTT over TLS listener for devices (the only one reachable off-host).",
                                default=18883)
    broker_tls_bind: str = _doc("Address of the TLS listener; 0.0.0.0 lets real devices on the LAN reach it.",
                                default="0.0.0.0")
    broker_run_as: str = _doc("Unprivileged user Mosquitto drops to when started as root.", default="mosquitto")
    broker_max_queued_messages: int = _doc(
        "Messages Mosquitto queues per session while the ingest service is away or behind. The default "
        "(1000) silently drops readings; sized here for an hours-long outage of a large fleet.",
        default=5_000_000)
    broker_autosave_interval: int = _doc(
        "Seconds between broker persistence snapshots: a broker SIGKILL loses what devices had acked since "
        "the last one and ingest had not yet landed (RELIABILITY.md).", default=5)

    # --- ingest -------------------------------------------------------------------------------------
    ingest_client_id: str = _doc("Stable MQTT client id: the broker keeps this session's queue across restarts.",
                                 default="rpm-ingest-1")
    ingest_group: str = _doc(
        "Shared-subscription group for running several ingest instances ($share/<group>/rpm/v1/#). Empty "
        "(the default): one instance with a plain subscription. Mosquitto 2.0 does not persist shared "
        "subscriptions across a broker restart, so until an instance re-subscribes the broker acks and drops "
        "readings (measured, RELIABILITY.md); a plain subscription survives in the persistent session. Use a "
        "group with a broker that persists shared subscriptions (e.g. EMQX, HiveMQ).", default="")
    ingest_username: str = _doc("Broker login of the ingest service (read-only ACL on rpm/v1/#).",
                                default="rpm-ingest")
    ingest_session_expiry_s: int = _doc("How long the broker keeps the ingest session while it is offline.",
                                        default=7 * 24 * 3600)
    ingest_receive_maximum: int = _doc(
        "Un-acked QoS 1 window the ingest service accepts; acks are only sent after fsync, so this bounds how "
        "much the broker redelivers after a crash.", default=2000)
    ingest_flush_interval_ms: int = _doc("Longest a received message waits for its fsync + ack.", default=25)
    segment_max_bytes: int = _doc("A landing segment is sealed once it reaches this size.",
                                  default=16 * 1024 * 1024)
    segment_max_age_s: float = _doc("A landing segment is sealed once its first record is this old.",
                                    default=10.0)
    max_payload_bytes: int = _doc("Largest payload accepted. A bigger one is quarantined as payload_too_large; "
                                  "the broker refuses packets over this plus 1 KiB (topic, headers) outright "
                                  "with MQTT 5 'packet too large', before they reach the landing disk.",
                                  default=256 * 1024)
    ingest_metrics_port: int = _doc("Prometheus metrics port of the ingest service, on 127.0.0.1; 0 disables.",
                                    default=9464)

    # --- pipeline -----------------------------------------------------------------------------------
    future_skew_s: int = _doc("A reading measured more than this many seconds after it was received is "
                              "rejected as 'measured in the future' (device clock ahead).", default=300)
    warehouse_memory_limit: str = _doc(
        "DuckDB memory limit of each warehouse connection; beyond it DuckDB spills to encrypted temp files. "
        "Keeps a pipeline run under 2 GB however large the batch (its default, 80% of RAM, lets the buffer "
        "pool grow with the data).", default="1GB")
    pipeline_max_segments: int = _doc("Most sealed segments one DAG run claims.", default=5000)
    airflow_port: int = _doc("Airflow UI/API of `make up`, bound to 127.0.0.1 only.", default=8080)
    pipeline_schedule_minutes: int = _doc(
        "How often the scheduled rpm_pipeline DAG runs. Freshness (publish -> visible to a clinician) is about "
        "the seal age + up to one schedule + a ~20 s run: 1 minute keeps its p95 under 2 minutes "
        "(BENCHMARKS.md: p95 82 s at 1 min, 147 s at 2 min).", default=1)
    landing_retention_days: int = _doc(
        "Sealed landing segments already absorbed by the warehouse are deleted once they are this old "
        "(rpm_daily); segments the ledger does not list are never deleted.", default=30)

    # --- derived paths (default from home) ----------------------------------------------------------
    secrets_dir: Path | None = _doc("Keys and passwords (0700); never inside a data folder.", default=None)
    pki_dir: Path | None = _doc("Public CA certificate devices use to verify the broker.", default=None)
    broker_dir: Path | None = _doc("Mosquitto config, password/ACL files, persistence, log.", default=None)
    landing_dir: Path | None = _doc("Append-only landing segments written by ingest.", default=None)
    warehouse_dir: Path | None = _doc("DuckDB files (clinical.duckdb is encrypted).", default=None)
    run_dir: Path | None = _doc("Pid files and logs of background services.", default=None)
    airflow_home: Path | None = _doc("AIRFLOW_HOME for `rpm pipeline run` and `make up`.", default=None)

    def __post_init__(self) -> None:
        defaults = {
            "secrets_dir": "secrets", "pki_dir": "pki", "broker_dir": "broker", "landing_dir": "landing",
            "warehouse_dir": "warehouse", "run_dir": "run", "airflow_home": "airflow",
        }
        object.__setattr__(self, "home", Path(self.home).resolve())
        for name, sub in defaults.items():
            value = getattr(self, name)
            object.__setattr__(self, name, Path(value).resolve() if value else self.home / sub)

    # Paths below are typed as Path after __post_init__; these accessors keep call sites tidy.
    @property
    def clinical_db(self) -> Path:
        return Path(self.warehouse_dir) / "clinical.duckdb"  # type: ignore[arg-type]

    @property
    def warehouse_key_file(self) -> Path:
        return Path(self.secrets_dir) / "warehouse.key"  # type: ignore[arg-type]

    @property
    def ca_cert(self) -> Path:
        return Path(self.pki_dir) / "ca.crt"  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``RPM_*`` variables; explicit keyword overrides win."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"RPM_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.type, raw, f.name)
        values.update(overrides)
        return cls(**values)

    def as_env(self) -> dict[str, str]:
        """The ``RPM_*`` variables that reproduce these settings in a child process."""
        return {f"RPM_{f.name.upper()}": str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(variable, default, documentation) for every field — used by `rpm config`."""
        return [(f"RPM_{f.name.upper()}", str(f.default), f.metadata.get("doc", ""))
                for f in dataclasses.fields(cls)]


def _parse(type_name: Any, raw: str, name: str) -> Any:
    t = str(type_name)
    try:
        if t.startswith("int"):
            return int(raw)
        if t.startswith("float"):
            return float(raw)
        if "Path" in t:
            return Path(raw)
        return raw
    except ValueError as exc:
        raise ValueError(f"RPM_{name.upper()}={raw!r} is not a valid {t}") from exc
