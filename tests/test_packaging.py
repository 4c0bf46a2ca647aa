"""The distribution as a user installs it: a wheel built from this checkout, installed (not editable) into a fresh
venv, runs from an empty directory with the configs it carries. The venv takes the project's dependencies from the
test environment (a .pth line), so nothing is downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO, mlflow_runs


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """The bin/ directory of a fresh venv that holds the wheel and nothing else of the project."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "dist", REPO],
        check=True,
    )
    (wheel,) = (root / "dist").glob("llm_engine_sweep-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    site = next((venv / "lib").glob("python3.*/site-packages"))
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", site, wheel], check=True
    )
    # pip --target writes no console script: write the one the wheel declares, as pip would
    entry = (next(site.glob("llm_engine_sweep-*.dist-info")) / "entry_points.txt").read_text()
    assert "sweep = sweep.__main__:cli" in entry
    script = venv / "bin" / "sweep"
    script.write_text(f"#!{venv / 'bin' / 'python'}\nfrom sweep.__main__ import cli\ncli()\n")
    script.chmod(0o755)
    return venv / "bin"


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    return env | {"HF_HUB_OFFLINE": "1"}


def test_the_wheel_carries_the_configs_and_runs_from_an_empty_directory(installed_wheel, tmp_path):
    python = installed_wheel / "python"
    where = subprocess.run(
        [python, "-c", "import sweep, sweep.config as c; print(sweep.__file__); print(c.CONF_DIR)"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert str(REPO) not in where[0] and (Path(where[1]) / "config.yaml").is_file()

    help_text = subprocess.run(
        [python, "-m", "sweep", "--help"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True
    )
    assert help_text.returncode == 0 and "backend" in help_text.stdout and "tiny" in help_text.stdout

    done = subprocess.run(
        [installed_wheel / "sweep", "tracker=none", "workload.num_requests=1", "workload.output_len=2"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "output_throughput" in done.stdout or "tok/s" in done.stdout
    assert mlflow_runs(tmp_path) == []  # tracker=none records nothing
