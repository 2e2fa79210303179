"""`pip install .` gives a working `rpm`: everything it needs ships in the wheel, and nothing is looked up
relative to the source tree (state lives in RPM_HOME, the DAGs and SQL come from the installed packages).

The wheel is installed without its dependencies into a folder of its own, which goes first on the import
path of a child interpreter run from an unrelated working directory, with the source tree out of reach: an
editable install would otherwise hide a missing file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist, target = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("site")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w",
                            str(dist), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "BuildBackendWarning" not in build.stderr + build.stdout, "packaging warnings"
    [wheel] = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("dags/rpm_pipeline.py", "warehouse/sql/001_schema.sql", "warehouse/telehealth_sql/050_pipeline.sql",
                   "rpmctl/services/mosquitto.conf.template", "pipeline/tasks.py", "core/settings.py",
                   "warehouse/migrations/001_quarantine_kind.sql"):
        assert needed in names, f"the wheel lacks {needed}"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return target


def run(installed: Path, cwd: Path, code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``code`` in a child interpreter whose project packages come from the installed wheel only."""
    prelude = (f"import sys; sys.path = [p for p in sys.path if p not in ('', {str(REPO)!r})]; "
               "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f)]; "  # the dev install
               f"sys.path.insert(0, {str(installed)!r})\n")
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env, "PYTHONSAFEPATH": "1"})


def test_the_installed_rpm_sets_up_in_its_own_home_and_finds_its_dags_and_sql(installed: Path,
                                                                               tmp_path: Path) -> None:
    probe = (
        "import sys, core, rpmctl.cli\n"
        "from rpmctl.services.airflow_run import dags_folder\n"
        "from rpmctl.services.broker import TEMPLATE\n"
        "from warehouse.db import migrations_dir\n"
        "assert all(str(m.__file__).startswith(sys.path[0]) for m in (core, rpmctl.cli)), 'not the wheel'\n"
        "paths = [str(dags_folder()), str(TEMPLATE), str(migrations_dir())]\n"
        "sys.argv = ['rpm', 'init']; rc = rpmctl.cli.main()\n"
        "print('RESULT', *paths, 'rc', rc)\n"
    )
    done = run(installed, tmp_path, probe, {"RPM_HOME": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    dags, template, sql, rc = result.split()[1:4] + [" ".join(result.split()[4:])]
    for path in (dags, template, sql):
        assert path.startswith(str(installed)) and Path(path).exists(), path
    assert rc == "rc 0"
    assert (tmp_path / "var" / "secrets" / "warehouse.key").exists()  # the default home: ./var, where it ran


def test_the_installed_dags_parse(installed: Path, tmp_path: Path) -> None:
    probe = (
        "from airflow.dag_processing.dagbag import DagBag\n"
        "from rpmctl.services.airflow_run import dags_folder\n"
        "bag = DagBag(dag_folder=str(dags_folder()))\n"
        "assert not bag.import_errors, bag.import_errors\n"
        "print(sorted(bag.dags))\n"
    )
    done = run(installed, tmp_path, probe, {"AIRFLOW_HOME": str(tmp_path / "airflow"), "RPM_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "['rpm_daily', 'rpm_pipeline']"
