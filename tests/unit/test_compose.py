"""The Docker deployment, checked without a Docker engine.

docker-compose.yml, deploy/Dockerfile and deploy/mosquitto/docker.conf are parsed and cross-checked against
each other and against the code (core.settings defaults, the broker files `rpm init` writes, the local
broker template), so a regression fails here instead of on a user's host.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from core.settings import Settings
from rpmctl.services import broker

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKER_CONF = ROOT / "deploy" / "mosquitto" / "docker.conf"
TEMPLATE = broker.TEMPLATE

STATE_VOLUME = "rpm-state"
BROKER_CONFIG_VOLUME = "broker-config"
PHI_WRITERS = ("ingest", "airflow")


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


# --- services and images ---------------------------------------------------------------------------------

def test_services_exist(services: dict) -> None:
    assert {"mosquitto", "ingest", "airflow", "init"} <= set(services)


def test_broker_image_is_eclipse_mosquitto_2(services: dict) -> None:
    image = services["mosquitto"]["image"]
    assert re.fullmatch(r"(docker\.io/)?(library/)?eclipse-mosquitto:2(\.\d+){1,2}(-openssl)?"
                        r"(@sha256:[0-9a-f]{64})?", image), f"pin a Mosquitto 2.x tag, not {image!r}"


def test_app_services_build_from_the_repo_dockerfile(services: dict) -> None:
    for name in ("init", "ingest", "airflow"):
        build = services[name].get("build")
        assert isinstance(build, dict), f"{name} must build our image"
        context = (ROOT / build.get("context", ".")).resolve()
        assert context == ROOT
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE


def test_referenced_repo_files_exist(services: dict) -> None:
    """Every bind mount and build file the compose file names is in the repo (deploy/ included)."""
    seen_deploy = False
    for name, svc in services.items():
        for m in mounts(svc):
            if m["type"] != "bind":
                continue
            src = (ROOT / m["source"]).resolve()
            assert src.is_relative_to(ROOT), f"{name} mounts {src}, outside the repository"
            assert src.exists(), f"{name} mounts {m['source']}, which is not in the repo"
            seen_deploy |= src.is_relative_to(ROOT / "deploy")
    assert seen_deploy, "the broker's config under ./deploy is expected to be mounted"


def test_named_volumes_are_declared(compose: dict, services: dict) -> None:
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for m in mounts(svc):
            if m["type"] == "volume":
                assert m["source"] in declared, f"{name} uses undeclared volume {m['source']}"


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


def test_startup_order(services: dict) -> None:
    for name in ("mosquitto", "ingest", "airflow"):
        assert services[name]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert services["ingest"]["depends_on"]["mosquitto"]["condition"] == "service_healthy"
    test = argv(services["mosquitto"]["healthcheck"]["test"])
    assert test and test[0] in {"CMD", "CMD-SHELL"}


def test_broker_healthcheck_watches_every_listener(services: dict) -> None:
    check = " ".join(argv(services["mosquitto"]["healthcheck"]["test"]))
    for port in (plain_port(), ingest_port(), tls_port()):
        assert f":{port:04X} " in check, f"healthcheck does not look at listener {port}"


# --- ingest and airflow ------------------------------------------------------------------------------------

def test_ingest_runs_rpm_ingest_against_the_broker(services: dict) -> None:
    svc = services["ingest"]
    assert argv(svc.get("entrypoint")) + argv(svc.get("command")) == ["rpm", "ingest"]
    env = env_of(svc)
    assert env["RPM_BROKER_HOST"] == "mosquitto" and "mosquitto" in services
    assert int(env["RPM_BROKER_PORT"]) == plain_port()


def test_airflow_runs_the_repo_dags(services: dict) -> None:
    svc = services["airflow"]
    cmd = argv(svc.get("entrypoint")) + argv(svc.get("command"))
    assert cmd == ["airflow", "standalone"] or {"api-server", "scheduler"} <= set(cmd)
    env = env_of(svc)
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false"
    dags = env["AIRFLOW__CORE__DAGS_FOLDER"].rstrip("/")
    m = next((m for m in mounts(svc) if m["target"].rstrip("/") == dags), None)
    assert m is not None and m["type"] == "bind", "the DAGS_FOLDER must be the mounted dags folder"
    src = (ROOT / m["source"]).resolve()
    assert 'dag_id="rpm_pipeline"' in (src / "rpm_pipeline.py").read_text()
    # rpmctl.services.airflow_run finds the DAGs at REPO_ROOT/dags: inside the image that is PYTHONPATH/dags.
    assert dags == dockerfile_env()["PYTHONPATH"].rstrip("/") + "/dags"
    state = mount_of_volume(svc, STATE_VOLUME)["target"].rstrip("/")
    assert env["AIRFLOW_HOME"].startswith(state + "/"), "Airflow's home (logs, metadata) belongs in rpm-state"


def test_airflow_ui_only_on_host_loopback(services: dict) -> None:
    ports = published_ports(services["airflow"])
    assert ports, "the Airflow UI should be reachable from the host"
    for ip, _, _ in ports:
        assert ip in {"127.0.0.1", "[::1]"}, f"Airflow UI published on {ip or 'all interfaces'}"
    assert env_of(services["airflow"]).get("AIRFLOW__API__PORT", "8080") in {str(t) for *_, t in ports}


def test_phi_writers_share_the_state_volume(services: dict) -> None:
    for name in PHI_WRITERS + ("init",):
        svc = services[name]
        m = mount_of_volume(svc, STATE_VOLUME)
        assert m is not None, f"{name} does not mount {STATE_VOLUME}"
        assert not m["read_only"], f"{name} writes to {STATE_VOLUME}"
        assert env_of(svc)["RPM_HOME"].rstrip("/") == m["target"].rstrip("/"), f"{name}: RPM_HOME is not the volume"
    # The broker never sees PHI or the warehouse key.
    assert mount_of_volume(services["mosquitto"], STATE_VOLUME) is None


# --- no secrets in the compose file -----------------------------------------------------------------------

SECRET_NAME = re.compile(r"PASS(WORD|WD)?|SECRET|TOKEN|(^|_)KEY($|_)|CREDENTIAL|FERNET|JWT", re.I)
# PEM blocks, Mosquitto/crypt password hashes, and token-like strings (e.g. secrets.token_urlsafe, hex keys).
SECRET_VALUE = re.compile(r"-----BEGIN|\$7\$|\$6\$|^(?=.*\d)(?=.*[a-z])(?=.*[A-Z])[A-Za-z0-9+/_=-]{20,}$"
                          r"|^[0-9a-fA-F]{32,}$")


def _values(node):
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
        assert "env_file" not in svc, f"{name}: secrets come from the generated volume, not env files"
        for key, value in env_of(svc).items():
            if SECRET_NAME.search(key):
                assert value is None or value.startswith("/"), f"{name}: {key} carries a literal secret"
        cmd = argv(svc.get("command")) + argv(svc.get("entrypoint"))
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
