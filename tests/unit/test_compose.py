"""The Docker deployment, checked without a Docker engine.

docker-compose.yml, deploy/Dockerfile, deploy/mosquitto/docker.conf and deploy/compose/make_secrets.py are
parsed and cross-checked against each other, against the Compose Specification's JSON schema (vendored in
tests/fixtures/compose-spec/) and against the code they configure: core.settings fields, the broker files
`rpm init` writes, the local broker template, and Airflow's own configuration (which options exist, which take
a ``_CMD``, how it reads them). A regression fails here instead of on a user's host.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterator
from graphlib import TopologicalSorter
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from core.settings import Settings
from rpmctl.services import airflow_stack, broker

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKER_CONF = ROOT / "deploy" / "mosquitto" / "docker.conf"
MAKE_SECRETS = ROOT / "deploy" / "compose" / "make_secrets.py"
SCHEMA_DIR = ROOT / "tests" / "fixtures" / "compose-spec"
TEMPLATE = broker.TEMPLATE

STATE_VOLUME = "rpm-state"
SECRETS_VOLUME = "rpm-secrets"
BROKER_CONFIG_VOLUME = "broker-config"
AIRFLOW_SECRETS_VOLUME = "airflow-secrets"
GRAFANA_SECRETS_VOLUME = "grafana-secrets"
# Airflow's components, each its own service (never `airflow standalone`), by the `airflow` subcommand it runs.
AIRFLOW_COMPONENTS = {"airflow-api-server": "api-server", "airflow-scheduler": "scheduler",
                      "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer"}
JOB_TYPES = {"airflow-scheduler": "SchedulerJob", "airflow-dag-processor": "DagProcessorJob",
             "airflow-triggerer": "TriggererJob"}
ONE_SHOTS = ("init", "airflow-init")
# Where our code reads or writes PHI, and where it reads our keys: the scheduler runs the tasks, the DAG
# processor the callbacks of tasks that died; the metrics exporter reads the serving snapshot and the audit log.
PHI_WRITERS = ("ingest", "airflow-scheduler", "airflow-dag-processor", "clinician")
KEY_READERS = ("init", "ingest", "airflow-scheduler", "airflow-dag-processor", "clinician", "metrics", "cli")
RESTART_POLICIES = {"always", "unless-stopped", "on-failure"}


# --- parsing helpers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def env_of(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: None if v is None else str(v) for k, v in env.items()}


def argv(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def mounts(svc: dict) -> list[dict]:
    """Volumes as {type, source, target, read_only} for both the short and the long syntax."""
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            source, target = parts[0], parts[1]
            ro = len(parts) > 2 and "ro" in parts[2].split(",")
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            out.append({"type": kind, "source": source, "target": target, "read_only": ro})
        else:
            out.append({"type": v.get("type", "volume"), "source": v.get("source"), "target": v["target"],
                        "read_only": bool(v.get("read_only"))})
    return out


def mount_of_volume(svc: dict, volume: str) -> dict | None:
    found = [m for m in mounts(svc) if m["type"] == "volume" and m["source"] == volume]
    assert len(found) <= 1, f"{volume} mounted twice"
    return found[0] if found else None


def published_ports(svc: dict) -> list[tuple[str | None, str | None, int]]:
    """(host ip, host port, container port) of every published port, short or long syntax."""
    out = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            out.append((p.get("host_ip"), str(p.get("published")) if p.get("published") else None,
                        int(p["target"])))
            continue
        spec = str(p).split("/")[0]
        parts = spec.rsplit(":", 2)
        ip = parts[0] if len(parts) == 3 else None
        host = parts[-2] if len(parts) >= 2 else None  # a bare "1883" publishes on a random host port
        out.append((ip, host, int(parts[-1])))
    return out


def conf_directives(path: Path) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.append((key, value.strip()))
    return out


def conf_listeners(path: Path) -> dict[int, dict[str, str]]:
    """Per-listener settings: {port: {'bind': ..., directive: value}}."""
    listeners: dict[int, dict[str, str]] = {}
    current = None
    for key, value in conf_directives(path):
        if key == "listener":
            port, _, bind = value.partition(" ")
            current = listeners.setdefault(int(port), {"bind": bind})
        elif current is not None and key in {"protocol", "cafile", "certfile", "keyfile", "tls_version",
                                             "require_certificate", "bind_address", "allow_anonymous",
                                             "password_file", "acl_file", "use_username_as_clientid"}:
            current[key] = value
    return listeners


def conf_global(path: Path) -> dict[str, str]:
    """Directives before the first listener (with per_listener_settings, logins and ACLs are per listener)."""
    out: dict[str, str] = {}
    for k, v in conf_directives(path):
        if k == "listener":
            break
        out[k] = v
    out.update((k, v) for k, v in conf_directives(path) if k.startswith("log_") and k != "log_type")
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        buf = f"{buf} {line[:-1].strip()}" if line.endswith("\\") else f"{buf} {line}"
        if not line.endswith("\\"):
            instr, _, args = buf.strip().partition(" ")
            out.append((instr.upper(), args.strip()))
            buf = ""
    return out


def dockerfile_env() -> dict[str, str]:
    env = {}
    for instr, args in dockerfile_instructions():
        if instr == "ENV":
            for token in shlex.split(args):
                k, _, v = token.partition("=")
                env[k] = v
    return env


def plain_port() -> int:
    """The plain listener for devices (client id = login); the ingest listener is plain too, but its own."""
    return next(p for p, opts in conf_listeners(DOCKER_CONF).items()
                if "certfile" not in opts and opts.get("use_username_as_clientid") == "true")


def ingest_port() -> int:
    return next(p for p, opts in conf_listeners(DOCKER_CONF).items() if opts.get("password_file", "").endswith(
        "passwd.ingest"))


def login_files(path: Path) -> list[str]:
    return [f for opts in conf_listeners(path).values() for f in (opts["password_file"], opts["acl_file"])]


def tls_port() -> int:
    return next(p for p, opts in conf_listeners(DOCKER_CONF).items() if "certfile" in opts)


def broker_config_dir(services: dict) -> str:
    m = mount_of_volume(services["mosquitto"], BROKER_CONFIG_VOLUME)
    assert m is not None, "mosquitto must mount the broker-config volume init writes"
    return m["target"].rstrip("/")


def long_running(services: dict) -> dict:
    """The services `docker compose up` keeps running: neither the one-shots nor the `tools` profile."""
    return {n: svc for n, svc in services.items() if n not in ONE_SHOTS and not svc.get("profiles")}


def command_of(svc: dict) -> list[str]:
    return argv(svc.get("entrypoint")) + argv(svc.get("command"))


def check_of(svc: dict) -> list[str]:
    return argv((svc.get("healthcheck") or {}).get("test"))


def in_volume(svc: dict, path: str) -> tuple[str, str] | None:
    """(volume, path inside it) of an absolute path in ``svc``'s container; the deepest mount wins."""
    best = None
    for m in mounts(svc):
        target = m["target"].rstrip("/")
        if m["type"] == "volume" and (path == target or path.startswith(target + "/")):
            if best is None or len(target) > len(best[1]):
                best = (m["source"], target)
    return None if best is None else (best[0], path[len(best[1]):].lstrip("/"))


def secret_paths(svc: dict) -> dict[str, str]:
    """Every file the service's environment points a program at for a secret: {variable: path}."""
    out = {}
    for key, value in env_of(svc).items():
        if value is None:
            continue
        if key.endswith("_CMD"):
            cmd = shlex.split(value)
            assert cmd[0] == "cat" and len(cmd) == 2, f"{key}: a secret is read from a file, with `cat FILE`"
            out[key] = cmd[1]
        elif key.endswith("_FILE") and SECRET_NAME.search(key):
            out[key] = value
    return out


def airflow_options(svc: dict) -> Iterator[tuple[str, str, str, str]]:
    """(variable, section, option, suffix) of every AIRFLOW__SECTION__OPTION[_CMD|_SECRET] in the environment."""
    for key in env_of(svc):
        m = re.fullmatch(r"AIRFLOW__([A-Z0-9_]+?)__([A-Z0-9_]+?)(_CMD|_SECRET)?", key)
        if m:
            yield key, m[1].lower(), m[2].lower(), m[3] or ""


def load_make_secrets() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_secrets", MAKE_SECRETS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def init_secrets_step(services: dict) -> list[str]:
    """The make_secrets.py command line of the init service: `sh -c "python deploy/compose/make_secrets.py
    ... && exec rpm init"`."""
    cmd = command_of(services["init"])
    assert cmd[:2] == ["sh", "-c"] and len(cmd) == 3, "init runs one shell line"
    first, _, rest = cmd[2].partition("&&")
    assert rest.strip() == "exec rpm init", "after the compose-only secrets, init is `rpm init`"
    return shlex.split(first)


@pytest.fixture
def generated(services: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """What init's secrets step writes when run as docker-compose.yml runs it (its arguments, its environment),
    each volume it mounts being a folder of tmp_path: {volume: folder}."""
    init = services["init"]
    folders = {m["source"]: tmp_path / m["source"] for m in mounts(init) if m["type"] == "volume"}
    for folder in folders.values():
        folder.mkdir(mode=0o700)

    def local(path: str) -> str:
        where = in_volume(init, path)
        return str(folders[where[0]] / where[1]) if where else path

    step = init_secrets_step(services)
    assert step[0] == "python"
    for key, value in env_of(init).items():
        monkeypatch.setenv(key, local(value) if value and value.startswith("/") else value or "")
    load_make_secrets().main([local(arg) for arg in step[2:]])
    return folders


@pytest.fixture(scope="module")
def airflow_conf(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Airflow's configuration object, imported with a throw-away AIRFLOW_HOME (read once, at import)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow_home")))
        from airflow.configuration import conf
    return conf


# --- the file as a whole -------------------------------------------------------------------------------------

def test_valid_against_the_compose_specification(compose: dict) -> None:
    """What `docker compose config` would refuse: unknown keys, wrong types, malformed entries."""
    validator = jsonschema.Draft7Validator(json.loads((SCHEMA_DIR / "compose-spec.json").read_text()))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)
    # The schema is strict enough to matter: a misspelt healthcheck key is an error.
    broken = json.loads(json.dumps(compose))
    broken["services"]["ingest"]["healthcheck"]["intervall"] = "5s"
    assert not validator.is_valid(broken)


def test_the_vendored_schema_says_where_it_came_from() -> None:
    readme = (SCHEMA_DIR / "README.md").read_text()
    assert re.search(r"compose-spec/compose-spec\b.*\bcommit\b", readme, re.S | re.I)
    assert re.search(r"\b[0-9a-f]{40}\b", readme), "the schema's version (commit) is recorded"
    assert "Apache License" in (SCHEMA_DIR / "LICENSE").read_text()


def test_services_exist(services: dict) -> None:
    assert {"init", "mosquitto", "ingest", "postgres", "airflow-init", *AIRFLOW_COMPONENTS, "clinician",
            "metrics", "prometheus", "grafana", "cli"} <= set(services)


def test_app_services_build_from_the_repo_dockerfile(services: dict) -> None:
    ours = [n for n, svc in services.items() if "build" in svc]
    assert set(ours) >= {"init", "ingest", "airflow-init", *AIRFLOW_COMPONENTS, "clinician", "metrics", "cli"}
    for name in ours:
        build = services[name]["build"]
        context = (ROOT / build.get("context", ".")).resolve()
        assert context == ROOT
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
        assert services[name]["image"] == services["init"]["image"], "one image for all of our services"


def test_every_long_running_service_has_a_healthcheck_and_a_restart_policy(services: dict) -> None:
    for name, svc in long_running(services).items():
        check = check_of(svc)
        assert check and check[0] in {"CMD", "CMD-SHELL"}, f"{name}: no healthcheck"
        assert not svc["healthcheck"].get("disable"), f"{name}: healthcheck disabled"
        assert svc.get("restart") in RESTART_POLICIES, f"{name}: restart policy {svc.get('restart')!r}"
    for name in ONE_SHOTS:
        assert services[name].get("restart", "no") == "no", f"{name} is a one-shot"


def test_healthchecks_probe_what_each_service_serves(services: dict) -> None:
    defaults = Settings.from_env(env={})

    def url(name: str) -> str:
        return next(a for a in check_of(services[name]) if "://" in a)

    ingest_port = env_of(services["ingest"]).get("RPM_INGEST_METRICS_PORT") or defaults.ingest_metrics_port
    assert f"http://127.0.0.1:{ingest_port}/healthz" in url("ingest"), "ingest: its /healthz (connected)"
    metrics = env_of(services["metrics"])
    assert f"http://127.0.0.1:{metrics['RPM_METRICS_PORT']}/metrics" in url("metrics")
    assert f":{env_of(services['clinician'])['RPM_SERVICE_PORT']}/healthz" in url("clinician")
    api = env_of(services["airflow-api-server"])
    assert f"http://127.0.0.1:{api['AIRFLOW__API__PORT']}/api/v2/monitor/health" in url("airflow-api-server")
    for name, job in JOB_TYPES.items():
        assert check_of(services[name]) == ["CMD", "airflow", "jobs", "check", "--job-type", job, "--local"], name
    pg = check_of(services["postgres"])
    assert pg[:2] == ["CMD", "pg_isready"]
    assert f"--username={env_of(services['postgres'])['POSTGRES_USER']}" in pg
    assert url("prometheus").endswith("/-/healthy") and url("grafana").endswith("/api/health")


def test_dependencies_wait_for_a_condition(services: dict) -> None:
    """Every dependency is long-form: a one-shot must have completed, anything else be healthy — except the
    metrics service, which Airflow's components only need to exist (their StatsD host), not to be healthy."""
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on without conditions"
        for dep, opts in deps.items():
            assert dep in services and not services[dep].get("profiles"), f"{name} depends on {dep}"
            want = ("service_completed_successfully" if dep in ONE_SHOTS else
                    "service_started" if dep == "metrics" else "service_healthy")
            assert opts.get("condition") == want, f"{name} -> {dep}: {opts.get('condition')!r}, want {want}"
    # Compose refuses a cycle; static_order raises graphlib.CycleError naming it.
    list(TopologicalSorter({n: set(svc.get("depends_on") or {}) for n, svc in services.items()}).static_order())


def test_what_init_writes_exists_before_anyone_reads_it(services: dict) -> None:
    written = {m["source"] for m in mounts(services["init"]) if m["type"] == "volume" and not m["read_only"]}
    for name, svc in services.items():
        if name != "init" and {m["source"] for m in mounts(svc) if m["type"] == "volume"} & written:
            assert "init" in (svc.get("depends_on") or {}), f"{name} mounts a volume init fills but does not wait"
    assert services["ingest"]["depends_on"]["mosquitto"]["condition"] == "service_healthy"
    for name in ("airflow-init", *AIRFLOW_COMPONENTS):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy", name
    for name in AIRFLOW_COMPONENTS:
        assert "airflow-init" in services[name]["depends_on"], f"{name} starts before the schema is migrated"
    assert "airflow-api-server" in services["airflow-scheduler"]["depends_on"], "tasks need the execution API"
    statsd = env_of(services["airflow-scheduler"])["AIRFLOW__METRICS__STATSD_HOST"]
    for name in AIRFLOW_COMPONENTS:
        assert statsd in services[name]["depends_on"], f"{name} may start before its StatsD host resolves"


def test_every_service_rotates_its_logs(services: dict) -> None:
    for name, svc in services.items():
        logging = svc.get("logging") or {}
        assert logging.get("driver") in {"json-file", "local"}, f"{name}: logs kept by {logging.get('driver')}"
        options = logging.get("options") or {}
        assert re.fullmatch(r"\d+[kmg]", str(options.get("max-size", ""))), f"{name}: no max-size"
        assert int(options.get("max-file", 0)) >= 1, f"{name}: no max-file"


def test_images_are_pinned(services: dict) -> None:
    for name, svc in services.items():
        image = svc["image"]
        assert ":" in image and not image.endswith((":latest", ":stable")), f"{name}: {image} is not pinned"
    assert re.fullmatch(r"postgres:\d+\.\d+(-bookworm)?", services["postgres"]["image"])
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", services["prometheus"]["image"])
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", services["grafana"]["image"])


# --- Airflow -------------------------------------------------------------------------------------------------

def test_airflow_runs_as_separate_components_never_standalone(services: dict) -> None:
    for name, component in AIRFLOW_COMPONENTS.items():
        assert command_of(services[name])[:2] == ["airflow", component], name
    assert command_of(services["airflow-init"]) == ["airflow", "db", "migrate"]
    for name, svc in services.items():
        assert "standalone" not in command_of(svc), f"{name} runs `airflow standalone` (SQLite, one container)"


def test_airflow_components_share_one_configuration(services: dict) -> None:
    """Same database, keys and executor everywhere; only the API server's listener differs."""
    listener = {"AIRFLOW__API__HOST", "AIRFLOW__API__PORT", "AIRFLOW__API__WORKERS"}
    envs = {name: env_of(services[name]) for name in ("airflow-init", *AIRFLOW_COMPONENTS)}
    common = {k: v for k, v in envs["airflow-scheduler"].items() if k.startswith("AIRFLOW")}
    for name, env in envs.items():
        assert {k: v for k, v in env.items() if k.startswith("AIRFLOW") and k not in listener} == common, name
    assert common["AIRFLOW__CORE__EXECUTOR"] == airflow_stack.EXECUTOR  # as `rpm up --airflow`
    assert common["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"].lower() == "false", "DAGs would wait for a click"
    assert common["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false"
    # Tasks (in the scheduler's container) report to the API server under its compose name.
    api = urlsplit(common["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert api.hostname == "airflow-api-server" and api.path == "/execution/"
    assert str(api.port) == envs["airflow-api-server"]["AIRFLOW__API__PORT"]


def test_airflow_metadata_is_postgres(services: dict, generated: dict[str, Path], airflow_conf: Any) -> None:
    """The URL init writes names the postgres service, its account and database, and the password it starts
    with; Airflow derives its async engine's URL from it."""
    from airflow.settings import _get_async_conn_uri_from_sync

    env = env_of(services["airflow-scheduler"])
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" not in env, "the URL holds the password: _CMD only"
    volume, rel = in_volume(services["airflow-scheduler"],
                            shlex.split(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD"])[1])
    url = urlsplit((generated[volume] / rel).read_text())
    pg = services[url.hostname]
    assert pg["image"].startswith("postgres:") and url.port == 5432
    pg_env = env_of(pg)
    assert (url.username, url.path.lstrip("/")) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_DB"])
    pw_volume, pw_rel = in_volume(pg, pg_env["POSTGRES_PASSWORD_FILE"])
    assert url.password == (generated[pw_volume] / pw_rel).read_text()
    # Each driver is in the image: the `postgres` extra, which the Dockerfile installs with the dependencies.
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["postgres"]
    pinned = {re.split(r"[=<>~!]", req)[0].strip().lower() for req in extra}
    drivers = {"psycopg2": "psycopg2-binary", "asyncpg": "asyncpg"}
    for scheme in (url.scheme, _get_async_conn_uri_from_sync(url.geturl()).split(":")[0]):
        assert drivers[scheme.partition("+")[2]] in pinned, f"no driver for {scheme} in the postgres extra"
    runs = " ".join(args for instr, args in dockerfile_instructions() if instr == "RUN")
    assert "['optional-dependencies']['postgres']" in runs, "the image does not install the postgres extra"


def test_airflow_reads_each_secret_verbatim(services: dict, generated: dict[str, Path], airflow_conf: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Airflow runs each `_CMD` (only for sensitive options: it ignores the rest) and gets the file's exact
    content — a trailing newline would end up inside the database URL."""
    svc = services["airflow-scheduler"]
    cmds = [(key, section, option) for key, section, option, suffix in airflow_options(svc) if suffix == "_CMD"]
    assert {(s, o) for _, s, o in cmds} >= {("database", "sql_alchemy_conn"), ("core", "fernet_key"),
                                           ("api_auth", "jwt_secret"), ("api", "secret_key")}
    for key, section, option in cmds:
        volume, rel = in_volume(svc, shlex.split(env_of(svc)[key])[1])
        monkeypatch.delenv(key.removesuffix("_CMD"), raising=False)
        monkeypatch.setenv(key, f"cat {generated[volume] / rel}")
        assert airflow_conf.get(section, option) == (generated[volume] / rel).read_text(), key
    from cryptography.fernet import Fernet

    Fernet(airflow_conf.get("core", "fernet_key"))  # a valid key, or connections could not be stored


def test_every_airflow_option_exists(services: dict, airflow_conf: Any) -> None:
    """Each AIRFLOW__SECTION__OPTION names an option of this Airflow (pyproject's pin), and every _CMD or
    _SECRET one a sensitive option: Airflow silently ignores those suffixes anywhere else."""
    for name, svc in services.items():
        for key, section, option, suffix in airflow_options(svc):
            described = option in airflow_conf.configuration_description.get(section, {}).get("options", {})
            assert airflow_conf.has_option(section, option, lookup_from_deprecated=False) or described, \
                f"{name}: {key} is not an option of Airflow"
            if suffix:
                assert (section, option) in airflow_conf.sensitive_config_values, \
                    f"{name}: Airflow ignores {key}: {section}.{option} takes no {suffix}"


def test_airflow_runs_the_repo_dags(services: dict) -> None:
    for name in ("airflow-scheduler", "airflow-dag-processor"):
        svc = services[name]
        env = env_of(svc)
        dags = env["AIRFLOW__CORE__DAGS_FOLDER"].rstrip("/")
        m = next((m for m in mounts(svc) if m["target"].rstrip("/") == dags), None)
        assert m is not None and m["type"] == "bind", f"{name}: the DAGS_FOLDER must be the mounted dags folder"
        assert 'dag_id="rpm_pipeline"' in ((ROOT / m["source"]).resolve() / "rpm_pipeline.py").read_text()
        # rpmctl.services.airflow_run finds the DAGs at REPO_ROOT/dags: inside the image, PYTHONPATH/dags.
        assert dags == dockerfile_env()["PYTHONPATH"].rstrip("/") + "/dags"


def test_airflow_home_and_task_logs(services: dict) -> None:
    """AIRFLOW_HOME is the state's airflow folder (RPM_AIRFLOW_HOME), whose logs/ rpm_daily prunes; the logs are
    their own volume so the API server can show them without seeing the state volume."""
    for name in ("airflow-init", *AIRFLOW_COMPONENTS):
        env = env_of(services[name])
        s = Settings.from_env(env={k: v for k, v in env.items() if k.startswith("RPM_") and v is not None})
        assert env["AIRFLOW_HOME"] == str(s.airflow_home), name
    logs = str(Settings.from_env(env={"RPM_HOME": env_of(services["airflow-scheduler"])["RPM_HOME"]})
               .airflow_home / "logs")
    writers = [n for n in AIRFLOW_COMPONENTS if n != "airflow-api-server"]
    for name in (*writers, "airflow-api-server"):
        m = next((m for m in mounts(services[name]) if m["target"] == logs), None)
        assert m is not None and m["source"] == "airflow-logs", f"{name}: task logs not on the logs volume"
        assert m["read_only"] == (name == "airflow-api-server")
    assert mount_of_volume(services["airflow-api-server"], STATE_VOLUME) is None


def test_airflow_ui_only_on_host_loopback(services: dict) -> None:
    ports = published_ports(services["airflow-api-server"])
    assert ports, "the Airflow UI should be reachable from the host"
    for ip, _, _ in ports:
        assert ip in {"127.0.0.1", "[::1]"}, f"Airflow UI published on {ip or 'all interfaces'}"
    assert env_of(services["airflow-api-server"])["AIRFLOW__API__PORT"] in {str(t) for *_, t in ports}


def test_airflow_statsd_reaches_the_metrics_service(services: dict) -> None:
    env, metrics = env_of(services["airflow-scheduler"]), env_of(services["metrics"])
    assert env["AIRFLOW__METRICS__STATSD_ON"].lower() == "true"
    assert env["AIRFLOW__METRICS__STATSD_HOST"] == "metrics"
    assert env["AIRFLOW__METRICS__STATSD_PORT"] == metrics["RPM_METRICS_STATSD_PORT"]
    assert metrics["RPM_METRICS_BIND"] == "0.0.0.0", "the StatsD listener must take the other containers' packets"


# --- state and secrets ---------------------------------------------------------------------------------------

def test_phi_writers_share_the_state_volume(services: dict) -> None:
    for name in (*PHI_WRITERS, "init"):
        svc = services[name]
        m = mount_of_volume(svc, STATE_VOLUME)
        assert m is not None, f"{name} does not mount {STATE_VOLUME}"
        assert not m["read_only"], f"{name} writes to {STATE_VOLUME}"
        assert env_of(svc)["RPM_HOME"].rstrip("/") == m["target"].rstrip("/"), f"{name}: RPM_HOME is not the volume"
    # The broker, the database and the monitoring never see PHI.
    for name in ("mosquitto", "postgres", "prometheus", "grafana", "airflow-api-server", "airflow-triggerer"):
        assert mount_of_volume(services[name], STATE_VOLUME) is None, name


def test_keys_live_apart_from_the_data_and_only_where_they_are_read(services: dict) -> None:
    for name, svc in services.items():
        m = mount_of_volume(svc, SECRETS_VOLUME)
        if name not in KEY_READERS:
            assert m is None, f"{name} mounts our keys but never reads them"
            continue
        assert m is not None and not m["read_only"], f"{name}: keys are created on first use, with lock files"
        env = env_of(svc)
        s = Settings.from_env(env={k: v for k, v in env.items() if k.startswith("RPM_") and v is not None})
        assert str(s.secrets_dir) == m["target"].rstrip("/"), f"{name}: RPM_SECRETS_DIR is not the volume"
        assert not s.secrets_dir.is_relative_to(s.home), f"{name}: the keys are inside the data volume"
        assert in_volume(svc, str(s.secrets_dir))[0] == SECRETS_VOLUME


def test_other_secrets_volumes_reach_only_their_readers(services: dict) -> None:
    readers = {AIRFLOW_SECRETS_VOLUME: {"init", "postgres", "airflow-init", *AIRFLOW_COMPONENTS},
               GRAFANA_SECRETS_VOLUME: {"init", "grafana"}}
    # The simple auth manager opens its passwords file for writing; everyone else only reads.
    writers = {"init", "airflow-api-server"}
    for volume, allowed in readers.items():
        for name, svc in services.items():
            m = mount_of_volume(svc, volume)
            assert (m is not None) == (name in allowed), f"{name} and {volume}"
            if m is not None:
                assert m["read_only"] == (name not in writers), f"{name} mounts {volume} read-write"


def test_init_makes_the_secrets_idempotently(services: dict, generated: dict[str, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    files = sorted(p for folder in generated.values() for p in folder.rglob("*") if p.is_file())
    assert files
    before = {p: p.read_bytes() for p in files}
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o600, f"{p.name} is readable by others"
        assert not before[p].endswith(b"\n"), f"{p.name}: Airflow would read the newline too"
    step = init_secrets_step(services)
    load_make_secrets().main([str(generated[in_volume(services["init"], a)[0]]) if a.startswith("/") else a
                              for a in step[2:]])
    assert {p: p.read_bytes() for p in files} == before, "a second `up` changed a secret"
    logins = json.loads(before[generated[AIRFLOW_SECRETS_VOLUME] / "simple_auth_manager_passwords.json"])
    users = env_of(services["airflow-api-server"])["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]
    assert set(logins) == {u.split(":")[0] for u in users.split(",")}, "every UI login has its password"


def test_every_secret_a_service_reads_is_made_by_init(services: dict, generated: dict[str, Path]) -> None:
    seen = set()
    for name, svc in services.items():
        for key, path in secret_paths(svc).items():
            where = in_volume(svc, path)
            assert where is not None, f"{name}: {key} points outside every volume: {path}"
            assert where[0] in generated, f"{name}: {key} is on {where[0]}, which init does not fill"
            assert (generated[where[0]] / where[1]).is_file(), f"{name}: init does not write {path} ({key})"
            seen.add(key)
    assert {"POSTGRES_PASSWORD_FILE", "GF_SECURITY_ADMIN_PASSWORD__FILE",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"} <= seen


def test_init_moves_keys_from_the_old_layout(tmp_path: Path) -> None:
    """A state volume from before rpm-secrets: its keys move over before `rpm init` could make new ones."""
    make_secrets = load_make_secrets()
    s = Settings(home=tmp_path / "state", secrets_dir=tmp_path / "secrets")
    legacy = s.home / "secrets"
    legacy.mkdir(parents=True, mode=0o700)
    (legacy / "warehouse.key").write_text("old key")
    os.chmod(legacy / "warehouse.key", 0o600)
    assert make_secrets.adopt_legacy_secrets(s) == ["warehouse.key"]
    assert (s.secrets_dir / "warehouse.key").read_text() == "old key" and not legacy.exists()
    assert (s.secrets_dir / "warehouse.key").stat().st_mode & 0o777 == 0o600
    assert make_secrets.adopt_legacy_secrets(s) == []
    # Two different keys under one name: the operator decides, nothing is moved.
    legacy.mkdir(mode=0o700)
    (legacy / "warehouse.key").write_text("another key")
    with pytest.raises(SystemExit, match="warehouse.key"):
        make_secrets.adopt_legacy_secrets(s)
    assert (s.secrets_dir / "warehouse.key").read_text() == "old key" and legacy.exists()


# --- broker ------------------------------------------------------------------------------------------------

def test_only_the_tls_port_is_published(services: dict) -> None:
    assert services["mosquitto"].get("network_mode") != "host", "host networking would expose 1883"
    assert {target for _, _, target in published_ports(services["mosquitto"])} == {tls_port()}
    for name, svc in services.items():
        for _, host, target in published_ports(svc):
            assert plain_port() not in (target, int(host) if host and host.isdigit() else None), \
                f"{name} publishes the plain MQTT port"
            assert target != 11883, f"{name} publishes the local plain MQTT port"


def test_broker_runs_the_repo_config(services: dict) -> None:
    svc = services["mosquitto"]
    cmd = argv(svc.get("command"))
    conf_in_container = cmd[cmd.index("-c") + 1]
    m = next((m for m in mounts(svc) if m["target"] == conf_in_container), None)
    assert m is not None and m["type"] == "bind", f"{conf_in_container} is not mounted from the repo"
    assert (ROOT / m["source"]).resolve() == DOCKER_CONF
    # The image's entrypoint chowns /mosquitto recursively: repo files must be mounted read-only.
    assert all(m["read_only"] for m in mounts(svc) if m["type"] == "bind")
    assert mount_of_volume(svc, BROKER_CONFIG_VOLUME)["read_only"], "the broker only reads its logins"


def test_docker_conf_policy_matches_settings() -> None:
    g, defaults = conf_global(DOCKER_CONF), Settings.from_env(env={})
    assert g["per_listener_settings"] == "true"
    assert g["retain_available"] == "false"
    assert g["persistence"] == "true"
    assert g["autosave_interval"] == str(defaults.broker_autosave_interval) == "5"
    assert g["max_queued_messages"] == str(defaults.broker_max_queued_messages) == "5000000"
    assert g["max_queued_bytes"] == "0"
    assert g["max_inflight_messages"] == "0"
    # rpmctl.services.broker renders max_payload_bytes + 1024 into the local config.
    assert g["max_packet_size"] == str(defaults.max_payload_bytes + 1024) == "263168"
    assert g["log_dest"] == "stdout"
    listeners = conf_listeners(DOCKER_CONF)
    assert set(listeners) == {1883, 1884, 8883}
    assert all(opts["allow_anonymous"] == "false" for opts in listeners.values())
    assert not {"cafile", "certfile", "keyfile"} & set(listeners[1883])
    assert listeners[8883]["tls_version"] == "tlsv1.2"
    # Devices: the client id is the login. Ingest: its own logins file, so no device login is valid there.
    for port in (1883, 8883):
        assert listeners[port]["use_username_as_clientid"] == "true"
        assert listeners[port]["password_file"].endswith("/passwd")
    assert ingest_port() == 1884 and listeners[1884]["password_file"].endswith("/passwd.ingest")
    assert "use_username_as_clientid" not in listeners[1884], "ingest keeps its stable session id"


def test_docker_conf_keeps_every_fixed_directive_of_the_local_template() -> None:
    """Policy lines of mosquitto.conf.template (those without placeholders) appear unchanged."""
    fixed = {(k, v) for k, v in conf_directives(TEMPLATE) if "$" not in k + v and k != "listener"}
    missing = fixed - set(conf_directives(DOCKER_CONF))
    assert not missing, f"docker.conf drifted from the local template: {sorted(missing)}"


def test_docker_conf_paths_are_the_broker_volumes(services: dict) -> None:
    g, tls = conf_global(DOCKER_CONF), conf_listeners(DOCKER_CONF)[tls_port()]
    cfg = broker_config_dir(services)
    for path in (*login_files(DOCKER_CONF), tls["cafile"], tls["certfile"], tls["keyfile"]):
        assert path.startswith(cfg + "/"), f"{path} is not in the broker-config volume ({cfg})"
    data = next(m for m in mounts(services["mosquitto"]) if m["type"] == "volume"
                and m["target"].rstrip("/") == g["persistence_location"].rstrip("/"))
    assert not data["read_only"] and data["source"] != BROKER_CONFIG_VOLUME


def test_docker_conf_names_the_files_rpm_init_writes(services: dict, tmp_path: Path) -> None:
    """Render the broker folder the way `rpm init` does and find every file docker.conf points at."""
    broker_dir = tmp_path / "broker-config"
    s = Settings(home=tmp_path / "var", broker_dir=broker_dir)
    Path(s.home).mkdir(parents=True)
    broker.prepare(s)
    tls = conf_listeners(DOCKER_CONF)[tls_port()]
    cfg = broker_config_dir(services)
    for path in (*login_files(DOCKER_CONF), tls["cafile"], tls["certfile"], tls["keyfile"]):
        assert (broker_dir / Path(path).relative_to(cfg)).is_file(), f"rpm init does not write {path}"


def test_init_writes_the_volume_the_broker_reads(services: dict) -> None:
    init = services["init"]
    m = mount_of_volume(init, BROKER_CONFIG_VOLUME)
    assert m is not None and not m["read_only"]
    assert env_of(init)["RPM_BROKER_DIR"].rstrip("/") == m["target"].rstrip("/")
    assert services["init"].get("restart", "no") == "no", "init is a one-shot"


def test_broker_healthcheck_watches_every_listener(services: dict) -> None:
    check = " ".join(argv(services["mosquitto"]["healthcheck"]["test"]))
    for port in (plain_port(), ingest_port(), tls_port()):
        assert f":{port:04X} " in check, f"healthcheck does not look at listener {port}"


# --- everything it references exists ------------------------------------------------------------------------

INTERPOLATION = re.compile(r"(?<!\$)\$(?:\{(?P<braced>[A-Za-z_]\w*)(?P<modifier>:?[-?+][^}]*)?\}|(?P<bare>[A-Za-z_]\w*))")


def header() -> str:
    """The usage comment at the top of docker-compose.yml."""
    lines = []
    for line in COMPOSE.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return "\n".join(lines)


def default_of(m: re.Match) -> str | None:
    """The default of a ${VAR:-default} or ${VAR-default}; None when the reference has none."""
    modifier = m["modifier"] or ""
    return modifier.split("-", 1)[1] if modifier.startswith((":-", "-")) else None


def interpolated(value: str) -> str:
    """``value`` as Compose interpolates it with no variable set: each reference becomes its default."""
    return INTERPOLATION.sub(lambda m: default_of(m) or "", value).replace("$$", "$")


def test_every_repo_file_it_names_exists(compose: dict, services: dict) -> None:
    """Bind-mount sources, `secrets:`/`configs:` files, and the script init runs from the image."""
    named = [(name, m["source"]) for name, svc in services.items() for m in mounts(svc) if m["type"] == "bind"]
    named += [(f"{kind}.{key}", spec["file"]) for kind in ("secrets", "configs")
              for key, spec in (compose.get(kind) or {}).items() if "file" in spec]
    assert named
    for who, source in named:
        src = (ROOT / source).resolve()
        assert src.is_relative_to(ROOT), f"{who} names {src}, outside the repository"
        assert src.exists(), f"{who} names {source}, which is not in the repo"
    script = init_secrets_step(services)[1]
    assert (ROOT / script).resolve() == MAKE_SECRETS
    copied = [shlex.split(args)[0] for instr, args in dockerfile_instructions() if instr == "COPY"]
    assert script in copied, f"the image does not ship {script}, which init runs"


def test_every_variable_has_a_default_or_is_documented(compose: dict) -> None:
    documented = header()
    found = [m for text in _values(compose) for m in INTERPOLATION.finditer(text)]
    assert found, "the test no longer sees the ${...} it is meant to check"
    for m in found:
        name = m["braced"] or m["bare"]
        assert default_of(m) is not None or name in documented, \
            f"${{{name}}} has no default and the usage comment omits it"


def test_every_rpm_variable_is_a_setting_and_parses(services: dict) -> None:
    fields = {f"RPM_{name.upper()}" for name in Settings.model_fields}
    for name, svc in services.items():
        rpm = {k: interpolated(v) for k, v in env_of(svc).items() if k.startswith("RPM_") and v is not None}
        assert not set(rpm) - fields, f"{name}: not settings: {sorted(set(rpm) - fields)}"
        Settings.from_env(env=rpm)  # raises SettingsError naming a value that does not parse


def test_the_usage_comment_is_true(services: dict, generated: dict[str, Path]) -> None:
    """Each `docker compose exec|run|kill SERVICE ...` line names a service it can reach, and each file it
    shows is on a volume of that service (made by init where init makes it)."""
    text = header()
    commands = re.findall(r"docker compose (exec|run --rm|kill -s \S+) ([\w-]+)([^\n]*)", text)
    assert len(commands) >= 5
    for verb, name, rest in commands:
        assert name in services, f"the usage comment names {name}, which is not a service"
        if verb != "run --rm":
            assert name in long_running(services), f"`{verb}` needs {name} running"
        for path in re.findall(r"/var/lib/[\w./-]+", rest):
            where = in_volume(services[name], path)
            assert where is not None, f"{path} is not on a volume of {name}"
            if where[0] in (AIRFLOW_SECRETS_VOLUME, GRAFANA_SECRETS_VOLUME):
                assert (generated[where[0]] / where[1]).is_file(), f"init does not write {path}"
        for dag in re.findall(r"dags trigger (\w+)", rest):
            assert f'dag_id="{dag}"' in "".join(p.read_text() for p in (ROOT / "dags").glob("*.py"))
    # "Reachable from the host": every published port is named there, and all but MQTT/TLS are loopback-only.
    reachable = re.search(r"Reachable from the host:(.*?)nothing else", text, re.S)
    assert reachable
    for name, svc in services.items():
        for ip, host, _ in published_ports(svc):
            assert host and re.search(rf"\b{host}\b", reachable[1]), f"{name} publishes {host}, not documented"
            assert ip in {"127.0.0.1", "[::1]"} or (name == "mosquitto" and int(host) == tls_port()), \
                f"{name} publishes {host} on every interface"


def test_prometheus_scrapes_the_services_and_loads_the_rules(services: dict) -> None:
    svc = services["prometheus"]
    config_path = next(a.split("=", 1)[1] for a in command_of(svc) if a.startswith("--config.file="))
    binds = {m["target"]: ROOT / m["source"] for m in mounts(svc) if m["type"] == "bind"}
    assert all(m["read_only"] for m in mounts(svc) if m["type"] == "bind")
    config = yaml.safe_load(binds[config_path].read_text())
    for rule_file in config["rule_files"]:
        assert str(Path(config_path).parent / rule_file) in binds, f"{rule_file} is not mounted next to the config"
    defaults = Settings.from_env(env={})
    ports = {"ingest": env_of(services["ingest"]).get("RPM_INGEST_METRICS_PORT") or defaults.ingest_metrics_port,
             "metrics": env_of(services["metrics"])["RPM_METRICS_PORT"]}
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{name}:{port}" for name, port in ports.items()}
    for name in ports:
        assert env_of(services[name])["RPM_METRICS_BIND"] == "0.0.0.0", f"{name} listens on its loopback only"


def test_grafana_gets_its_provisioning_and_dashboards(services: dict) -> None:
    svc = services["grafana"]
    binds = {m["target"]: ROOT / m["source"] for m in mounts(svc) if m["type"] == "bind"}
    provisioning = binds["/etc/grafana/provisioning"]
    providers = [p for f in (provisioning / "dashboards").glob("*.y*ml") for p in yaml.safe_load(f.read_text())["providers"]]
    assert providers
    for provider in providers:
        folder = binds.get(provider["options"]["path"])
        assert folder is not None and list(folder.glob("*.json")), "the dashboards folder is not mounted there"
    env = env_of(svc)
    sources = [d for f in (provisioning / "datasources").glob("*.y*ml") for d in yaml.safe_load(f.read_text())["datasources"]]
    assert sources
    for source in sources:
        url = urlsplit(re.sub(r"\$\{(\w+)\}", lambda m: env[m[1]], source["url"]))  # Grafana expands ${VAR}
        prometheus = services[url.hostname]
        assert prometheus["image"].startswith("prom/prometheus:")
        assert url.port == 9090 and not any(a.startswith("--web.listen-address") for a in command_of(prometheus))


# --- no secrets in the compose file -------------------------------------------------------------------------

SECRET_NAME = re.compile(r"PASS(WORD|WD)?|SECRET|TOKEN|(^|_)KEY($|_)|CREDENTIAL|FERNET|JWT", re.I)
# PEM blocks, Mosquitto/crypt password hashes, and token-like strings (e.g. secrets.token_urlsafe, hex keys).
SECRET_VALUE = re.compile(r"-----BEGIN|\$7\$|\$6\$|^(?=.*\d)(?=.*[a-z])(?=.*[A-Z])[A-Za-z0-9+/_=-]{20,}$"
                          r"|^[0-9a-fA-F]{32,}$")


def _values(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for v in node.values():
            yield from _values(v)
    elif isinstance(node, list):
        for v in node:
            yield from _values(v)
    elif node is not None:
        yield str(node)


def test_no_secret_literals(compose: dict, services: dict) -> None:
    for name, svc in services.items():
        assert "env_file" not in svc, f"{name}: secrets come from the generated volumes, not env files"
        paths = secret_paths(svc)
        for key, value in env_of(svc).items():
            if SECRET_NAME.search(key) and value is not None:
                assert value.startswith("/") or key in paths, f"{name}: {key} carries a literal secret"
        cmd = command_of(svc)
        assert not {"-P", "--pw", "--password"} & set(cmd), f"{name}: password on a command line"
    for text in _values(compose):
        assert not SECRET_VALUE.search(text), f"secret-looking literal in docker-compose.yml: {text[:12]}..."
    assert "BEGIN" not in COMPOSE.read_text()


# --- Dockerfile -------------------------------------------------------------------------------------------

def test_dockerfile_base_is_python_311_slim_bookworm() -> None:
    froms = [args for instr, args in dockerfile_instructions() if instr == "FROM"]
    assert froms, "no FROM"
    image = froms[-1].split()[0]  # the final stage is what runs
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-bookworm(@sha256:[0-9a-f]{64})?", image), image
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    from packaging.specifiers import SpecifierSet

    assert "3.11" in SpecifierSet(requires), f"the image's Python does not satisfy {requires}"


def test_dockerfile_installs_the_repo_and_runs_unprivileged() -> None:
    instrs = dockerfile_instructions()
    runs = " ".join(args for instr, args in instrs if instr == "RUN")
    assert re.search(r"pip install (\S+ )*\.( |$)", runs), "the image must `pip install .` the repo"
    apt = re.findall(r"apt-get install\s+(.*?)(?:&&|$)", runs)
    extra = {w for pkgs in apt for w in pkgs.split() if not w.startswith("-")} - {"mosquitto-clients"}
    assert not extra, f"the image installs more than our package: {extra}"
    users = [args for instr, args in instrs if instr == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the app must not run as root"
    # Same uid as eclipse-mosquitto's account: the broker reads the 0600 files our code writes for it.
    assert re.search(r"useradd\b[^&]*--uid 1883\b", runs)


def test_dockerfile_ships_what_the_code_expects_next_to_it() -> None:
    """Every package pyproject installs (the DAGs among them)."""
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = [pattern.rstrip("*") for pattern in found["include"]]
    workdir = next(args for instr, args in dockerfile_instructions() if instr == "WORKDIR").rstrip("/")
    copied = set()
    for instr, args in dockerfile_instructions():
        if instr in {"COPY", "ADD"}:
            *sources, _dest = shlex.split(args)
            copied |= {s.rstrip("/") or "." for s in sources if not s.startswith("--")}
    if "." not in copied:  # `COPY . …` would ship everything
        missing = (set(packages) | {"pyproject.toml"}) - copied
        assert not missing, f"not copied into the image: {sorted(missing)}"
    assert dockerfile_env()["PYTHONPATH"].rstrip("/") == workdir, "code must run from the copied tree"
    for src in copied - {"."}:
        if not any(ch in src for ch in "*?["):
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
