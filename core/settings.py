"""One typed settings object for every component: broker, ingest, landing, warehouse, Airflow.

Each field can be overridden by an environment variable named ``RPM_<FIELD>`` (upper case), e.g.
``RPM_HOME=/srv/rpm`` or ``RPM_BROKER_PORT=1883``; an empty variable counts as unset. Values are parsed and
checked by pydantic-settings (``RPM_BROKER_PORT=abc`` is an error, not a string). Paths default to folders
inside ``home`` unless set explicitly, and are absolute once loaded. Nothing else in the code base reads
``os.environ`` for configuration.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Folders inside home unless set explicitly.
INSIDE_HOME = {"secrets_dir": "secrets", "pki_dir": "pki", "broker_dir": "broker", "landing_dir": "landing",
               "warehouse_dir": "warehouse", "run_dir": "run", "airflow_home": "airflow"}
PATH_FIELDS = ("home", *INSIDE_HOME)
INGEST_CLIENT_PREFIX = "rpm-ingest"


def _in_home(name: str) -> Any:
    return lambda data: data["home"] / INSIDE_HOME[name]


class SettingsError(ValueError):
    """An RPM_* variable that does not parse as its field's type; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RPM_", env_ignore_empty=True, frozen=True, extra="forbid",
                                      validate_default=True)

    home: Path = Field(Path("var"), description=(
        "Root of all generated state: secrets, broker, landing, warehouse, logs. Relative to the working "
        "directory when relative (`make` passes the repository's git-ignored var/)."))

    # --- broker -------------------------------------------------------------------------------------
    broker_host: str = Field("127.0.0.1", description="Host the ingest service, the CLI and local devices connect to.")
    broker_port: int = Field(11883, description="Plain MQTT listener for devices on this host (simulator, tests), loopback only. Like "
                            "the TLS listener, it ties each client id to its login.")
    broker_ingest_port: int = Field(11884, description=
        "The ingest service's own listener, loopback only, where only the ingest login is accepted: devices "
        "cannot reach it, so no device login can resume or discard the ingest session (whose client id is "
        "stable and known).")
    broker_tls_port: int = Field(18883, description="MQTT over TLS listener for devices (the only one reachable off-host).")
    broker_tls_bind: str = Field("0.0.0.0", description="Address of the TLS listener; 0.0.0.0 lets real devices on the LAN reach it.")
    broker_run_as: str = Field("mosquitto", description="Unprivileged user Mosquitto drops to when started as root.")
    broker_max_queued_messages: int = Field(5_000_000, description=
        "Messages Mosquitto queues per session while the ingest service is away or behind. The default "
        "(1000) silently drops readings; sized here for an hours-long outage of a large fleet.")
    broker_autosave_interval: int = Field(5, description=
        "Seconds between broker persistence snapshots: a broker SIGKILL loses what devices had acked since "
        "the last one and ingest had not yet landed (RELIABILITY.md).")

    # --- ingest -------------------------------------------------------------------------------------
    ingest_client_id: str = Field("rpm-ingest-1", description="Stable MQTT client id: the broker keeps this session's queue across restarts.")
    ingest_group: str = Field("", description=
        "Shared-subscription group for running several ingest instances ($share/<group>/rpm/v1/#). Empty "
        "(the default): one instance with a plain subscription. Mosquitto 2.0 does not persist shared "
        "subscriptions across a broker restart, so until an instance re-subscribes the broker acks and drops "
        "readings (measured, RELIABILITY.md); a plain subscription survives in the persistent session. Use a "
        "group with a broker that persists shared subscriptions (e.g. EMQX, HiveMQ).")
    ingest_username: str = Field("rpm-ingest", description="Broker login of the ingest service (read-only ACL on rpm/v1/#).")
    ingest_session_expiry_s: int = Field(7 * 24 * 3600, description="How long the broker keeps the ingest session while it is offline.")
    ingest_receive_maximum: int = Field(2000, description=
        "Un-acked QoS 1 window the ingest service accepts; acks are only sent after fsync, so this bounds how "
        "much the broker redelivers after a crash.")
    ingest_flush_interval_ms: int = Field(25, description="Longest a received message waits for its fsync + ack.")
    segment_max_bytes: int = Field(16 * 1024 * 1024, description="A landing segment is sealed once it reaches this size.")
    segment_max_age_s: float = Field(10.0, description="A landing segment is sealed once its first record is this old.")
    max_payload_bytes: int = Field(256 * 1024, description="Largest payload accepted. A bigger one is quarantined as payload_too_large; "
                                  "the broker refuses packets over this plus 1 KiB (topic, headers) outright "
                                  "with MQTT 5 'packet too large', before they reach the landing disk.")
    ingest_metrics_port: int = Field(9464, description=
        "Prometheus port of the ingest service (/metrics, /healthz) on metrics_bind; 0 disables.")

    # --- metrics (Prometheus) -----------------------------------------------------------------------
    metrics_bind: str = Field("127.0.0.1", description=
        "Address of the Prometheus endpoints — the ingest service's and `rpm metrics`' (pipeline runs, backlog, "
        "freshness, audit log, Airflow's metrics) — and of the StatsD listener: loopback by default; 0.0.0.0 "
        "in containers that Prometheus and Airflow reach over a network.")
    metrics_port: int = Field(9466, ge=0, le=65535, description=
        "HTTP port of `rpm metrics` (/metrics), which `rpm up` starts; 0 disables it.")
    metrics_statsd_port: int = Field(9125, ge=0, le=65535, description=
        "UDP port where `rpm metrics` receives Airflow's StatsD metrics (the local stack's Airflow sends them "
        "there); 0: no listener, and Airflow sends none.")

    # --- pipeline -----------------------------------------------------------------------------------
    future_skew_s: int = Field(300, description="A reading measured more than this many seconds after it was received is "
                              "rejected as 'measured in the future' (device clock ahead).")
    warehouse_memory_limit: str = Field("1GB", description=
        "DuckDB memory limit of each warehouse connection; beyond it DuckDB spills to encrypted temp files. "
        "Keeps a pipeline run under 2 GB however large the batch (its default, 80% of RAM, lets the buffer "
        "pool grow with the data).")
    compaction_memory_limit: str = Field("4GB", description=
        "DuckDB memory limit of rpm_daily's compaction, which sorts readings a chunk at a time (a compaction "
        "that runs out leaves the warehouse as it was and fails the task).")
    pipeline_max_segments: int = Field(5000, description="Most sealed segments one DAG run claims.")
    airflow_port: int = Field(8080, description="Airflow UI/API of `make up`, bound to 127.0.0.1 only.")
    airflow_url: str = Field("", pattern=r"^(https?://[^\s/]+/?)?$", description=
        "Airflow API server whose health endpoint `rpm ops status` reads (component heartbeats) when Airflow "
        "is not the local stack of `rpm up --airflow`, e.g. http://airflow-api-server:8080 under compose; set, "
        "Airflow is always judged. Empty: the local stack's, judged while it is meant to run.")
    pipeline_schedule_minutes: int = Field(1, description=
        "How often the scheduled rpm_pipeline DAG runs. Freshness (publish -> visible to a clinician) is about "
        "the seal age + up to one schedule + a ~20 s run: 1 minute keeps its p95 under 2 minutes "
        "(BENCHMARKS.md: p95 82 s at 1 min, 147 s at 2 min).")
    quarantine_warn: float = Field(0.05, ge=0, le=1, description=
        "Quarantine rate (quarantined / received) above which a run, or the last hour of runs, makes `rpm ops "
        "status` degraded and rpm_pipeline's quality_gate task skipped (pink in the Airflow grid).")
    quarantine_fail: float = Field(0.5, ge=0, le=1, description=
        "Quarantine rate above which `rpm ops status` is failing and the quality_gate task fails the run (red "
        "in the Airflow grid; the loaded readings stay loaded). Must be >= quarantine_warn.")
    practice_tz: str = Field("UTC", description=
        "IANA time zone of the practice (e.g. America/Chicago): its calendar month is the billing report's "
        "default month, so a report run on the evening of the 31st is not already next month's (UTC's).")
    landing_retention_days: int = Field(30, description=
        "Sealed landing segments already absorbed by the warehouse are deleted once they are this old "
        "(rpm_daily); segments the ledger does not list are never deleted.")
    artifact_retention_days: int = Field(14, ge=1, description=
        "rpm_daily deletes validation reports, Airflow task logs and rotated service logs (broker, ingest, "
        "service) older than this many days; live logs over 10 MB are rotated first.")
    telehealth_catalogue_extra: str = Field(
        "", pattern=r"^((module|survey):[a-z0-9][a-z0-9-]{0,47}(,(module|survey):[a-z0-9][a-z0-9-]{0,47})*)?$",
        description="The practice's own education modules and surveys, added to the telehealth catalogue "
        "(transforms/catalogue.py): comma-separated module:<slug> / survey:<slug>, e.g. "
        "module:heart-healthy-eating,survey:ipaq (slug: lowercase letters, digits, hyphens). Values outside "
        "the catalogue reach the telehealth store as 'other'.")

    # --- clinician service -------------------------------------------------------------------------
    service_port: int = Field(8443, ge=1, le=65535, description=
        "HTTPS port of the clinician service (`rpm serve`; `rpm up` starts it): the dashboard and /api/v1.")
    service_bind: str = Field("127.0.0.1", description=
        "Address the clinician service listens on: loopback by default. Its certificate (signed by the "
        "project CA) names localhost, this host and this address.")
    service_url: str = Field("", description=
        "Where `rpm login` and `rpm clinician` reach the service; empty: https://localhost:<service_port>.")
    session_idle_minutes: int = Field(15, ge=1, le=12 * 60, description=
        "A session (dashboard or API token) ends after this many minutes without a request (HIPAA "
        "automatic logoff).")
    login_max_failures: int = Field(5, ge=1, le=100, description=
        "Consecutive failed logins after which an account is locked for login_lockout_minutes.")
    login_lockout_minutes: int = Field(15, ge=1, le=24 * 60, description=
        "How long a locked account refuses every login, right password included.")
    run_as: str = Field("rpm", description=
        "Unprivileged account that owns the state and keys when rpm is started as root: every command that "
        "touches the state hands it over (0711 state folder, public pki/, 0700/0600 everything else) and runs "
        "as this account, with the services it starts (created by `make system` / `rpm init`). When the account "
        "cannot reach the interpreter, the code or the state folder, rpm warns and stays root. 'root' keeps "
        "root (not recommended).")

    # --- paths (default: inside home) ----------------------------------------------------------
    secrets_dir: Path = Field(default_factory=_in_home("secrets_dir"), description="Keys and passwords (0700); never inside a data folder.")
    pki_dir: Path = Field(default_factory=_in_home("pki_dir"), description="Public CA certificate devices use to verify the broker.")
    broker_dir: Path = Field(default_factory=_in_home("broker_dir"), description="Mosquitto config, password/ACL files, persistence, log.")
    landing_dir: Path = Field(default_factory=_in_home("landing_dir"), description="Append-only landing segments written by ingest.")
    warehouse_dir: Path = Field(default_factory=_in_home("warehouse_dir"), description="DuckDB files (clinical.duckdb is encrypted).")
    run_dir: Path = Field(default_factory=_in_home("run_dir"), description="Pid files and logs of background services.")
    airflow_home: Path = Field(default_factory=_in_home("airflow_home"), description="AIRFLOW_HOME for `rpm pipeline run` and `make up`.")

    @field_validator("ingest_client_id", mode="after")
    @classmethod
    def _ingest_id(cls, value: str) -> str:
        # Device ids may not start with this prefix (provisioning refuses them), and on the device listeners
        # the client id is the login: no device can ever connect under an ingest instance's session.
        if not value.startswith(INGEST_CLIENT_PREFIX):
            raise ValueError(f"an ingest client id must start with {INGEST_CLIENT_PREFIX!r} (e.g. "
                             f"{INGEST_CLIENT_PREFIX}-2): device ids may not, so no device can take its session")
        return value

    @field_validator("practice_tz", mode="after")
    @classmethod
    def _iana_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):  # not found is a KeyError, which pydantic would not report
            raise ValueError(f"not an IANA time zone: {value!r} (e.g. America/Chicago, Europe/London, UTC)") from None
        return value

    @model_validator(mode="after")
    def _quarantine_order(self) -> Settings:
        if self.quarantine_warn > self.quarantine_fail:
            raise ValueError(f"quarantine_warn ({self.quarantine_warn}) must not exceed quarantine_fail "
                             f"({self.quarantine_fail})")
        return self

    @field_validator(*PATH_FIELDS, mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def clinical_db(self) -> Path:
        return self.warehouse_dir / "clinical.duckdb"

    @property
    def warehouse_key_file(self) -> Path:
        return self.secrets_dir / "warehouse.key"

    @property
    def ca_cert(self) -> Path:
        return self.pki_dir / "ca.crt"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``RPM_*`` variables — the process environment (as ``Settings()`` reads it), or the
        mapping ``env`` alone; keyword overrides win. A value that does not parse raises SettingsError."""
        source = os.environ if env is None else env
        try:
            if env is None:
                return cls(**overrides)
            values = {name: raw for name in cls.model_fields
                      if (raw := env.get(f"RPM_{name.upper()}")) not in (None, "")}
            return cls(**cls._from_mapping_only({**values, **overrides}))
        except ValidationError as exc:
            err = exc.errors()[0]
            if not err["loc"]:  # a rule across fields (_quarantine_order)
                raise SettingsError(str(err["msg"]).removeprefix("Value error, ")) from None
            name = str(err["loc"][0])
            var = f"RPM_{name.upper()}"
            shown = f"{var}={source[var]!r}" if name not in overrides and source.get(var) else name
            raise SettingsError(f"{shown}: {err['msg']}") from None

    @classmethod
    def _from_mapping_only(cls, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` parsed and completed with defaults, the process environment ignored (every field is then
        given explicitly, so building the settings from the result reads nothing else)."""

        class MappingOnly(cls):  # type: ignore[valid-type,misc]  # a subclass of the settings, per call
            @classmethod
            def settings_customise_sources(cls, settings_cls: Any, init_settings: Any, **sources: Any) -> tuple:
                return (init_settings,)

        return MappingOnly(**values).model_dump()

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (checked like any other settings)."""
        return type(self).model_validate({**self.model_dump(), **changes})

    def as_env(self) -> dict[str, str]:
        """The ``RPM_*`` variables that reproduce these settings in a child process."""
        return {f"RPM_{name.upper()}": str(getattr(self, name)) for name in type(self).model_fields}

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(variable, default, documentation) for every field — used by `rpm config`."""
        out = []
        for name, f in cls.model_fields.items():
            default = f"<home>/{INSIDE_HOME[name]}" if name in INSIDE_HOME else str(f.default)
            out.append((f"RPM_{name.upper()}", default, f.description or ""))
        return out
