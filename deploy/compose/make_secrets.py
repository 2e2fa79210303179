"""The secrets of the docker-compose stack that `rpm init` does not make: Airflow's and Grafana's.

The compose `init` service runs this before `rpm init`, as the image's account (uid 1883). Each secret is
generated inside the stack into the named volume of the services that read it, so none is written in
docker-compose.yml, on the host or into the data volume:

  AIRFLOW_DIR/postgres.password     the metadata database's password (postgres reads POSTGRES_PASSWORD_FILE)
  AIRFLOW_DIR/sql_alchemy_conn      the URL Airflow connects with (AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD)
  AIRFLOW_DIR/fernet.key            encrypts connections and variables stored in that database
  AIRFLOW_DIR/jwt.secret            signs UI/API logins and the tokens tasks present to the execution API
  AIRFLOW_DIR/api.secret_key        Airflow's [api] secret_key
  AIRFLOW_DIR/simple_auth_manager_passwords.json   the password of the Airflow UI's `admin` login
  GRAFANA_DIR/admin.password        Grafana's `admin` login (GF_SECURITY_ADMIN_PASSWORD__FILE)

Every `docker compose up` re-runs init: existing files are kept, so a secret changes only when its file is
deleted — the database password only together with the database, which takes it when it is created.
Files are 0600 with no trailing newline: Airflow uses a ``_CMD`` option's output verbatim.

A state volume from before the keys had a volume of their own holds them in RPM_HOME/secrets: they are moved
to RPM_SECRETS_DIR first, so `rpm init` finds the keys that decrypt the existing data instead of making new ones.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from cryptography.fernet import Fernet

from core.keys import new_password, read_secret, write_private
from core.settings import INSIDE_HOME, Settings

AIRFLOW_ADMIN = "admin"  # the login AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS names in docker-compose.yml


def airflow_secrets(folder: Path, db_host: str, db_user: str, db_name: str) -> None:
    """Airflow's secrets and its metadata database's URL, built from the database password."""
    password = _keep_or_make(folder / "postgres.password", lambda: secrets.token_urlsafe(32))
    # psycopg2 for Airflow's engine; Airflow derives its async engine's URL (postgresql+asyncpg) from this one.
    _write_if_changed(folder / "sql_alchemy_conn",
                      f"postgresql+psycopg2://{db_user}:{password}@{db_host}:5432/{db_name}")
    _keep_or_make(folder / "fernet.key", lambda: Fernet.generate_key().decode())
    _keep_or_make(folder / "jwt.secret", lambda: secrets.token_urlsafe(64))
    _keep_or_make(folder / "api.secret_key", lambda: secrets.token_urlsafe(32))
    # Written here rather than by Airflow, which would create it world-readable and log the password.
    _keep_or_make(folder / "simple_auth_manager_passwords.json",
                  lambda: json.dumps({AIRFLOW_ADMIN: new_password()}))


def grafana_secrets(folder: Path) -> None:
    _keep_or_make(folder / "admin.password", new_password)


def adopt_legacy_secrets(s: Settings) -> list[str]:
    """Move RPM_HOME/secrets (the layout before RPM_SECRETS_DIR had its own volume) into RPM_SECRETS_DIR;
    returns the names moved. A name present in both with different contents stops the move: which key is the
    right one is the operator's call, and guessing wrong loses the data it encrypts."""
    legacy, target = Path(s.home) / INSIDE_HOME["secrets_dir"], Path(s.secrets_dir)
    if not legacy.is_dir() or legacy.resolve() == target.resolve():
        return []
    names = sorted(p.name for p in legacy.iterdir())
    clash = [n for n in names if (target / n).exists() and not _same(legacy / n, target / n)]
    if clash:
        raise SystemExit(f"{legacy} and {target} both hold {', '.join(clash)} with different contents: "
                         f"keep the right one in {target}, delete the other folder, then start again")
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in names:
        if not (target / name).exists():  # copied on an earlier, interrupted run otherwise
            tmp = target / f".{name}.adopting"  # a half copy never takes the real name
            _remove(tmp)
            if (legacy / name).is_dir():
                shutil.copytree(legacy / name, tmp)
            else:
                shutil.copy2(legacy / name, tmp)
            os.replace(tmp, target / name)
    shutil.rmtree(legacy)
    return names


def _same(a: Path, b: Path) -> bool:
    if a.is_dir() and b.is_dir():
        cmp = filecmp.dircmp(a, b)
        return not (cmp.left_only or cmp.right_only or cmp.diff_files)
    return a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _keep_or_make(path: Path, make: Callable[[], str]) -> str:
    if path.exists():
        return read_secret(path)
    value = make()
    write_private(path, value.encode())
    return value


def _write_if_changed(path: Path, value: str) -> None:
    if not path.exists() or path.read_text() != value:
        write_private(path, value.encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--airflow", type=Path, required=True, help="Airflow's secrets volume")
    p.add_argument("--grafana", type=Path, required=True, help="Grafana's secrets volume")
    p.add_argument("--db-host", default="postgres", help="the metadata database's compose service")
    a = p.parse_args(argv)
    moved = adopt_legacy_secrets(Settings.from_env())
    if moved:
        print(f"moved {len(moved)} secrets from RPM_HOME/secrets to RPM_SECRETS_DIR")
    # The database's user and name: the variables the postgres image creates them from.
    airflow_secrets(a.airflow, a.db_host, os.environ["POSTGRES_USER"], os.environ["POSTGRES_DB"])
    grafana_secrets(a.grafana)
    return 0


if __name__ == "__main__":
    sys.exit(main())
