"""What the console answers without an engine: --help and config errors load no torch or transformers, and
--help renders the composed config like Hydra's own help."""

import dataclasses
import re
import subprocess
import sys

from conftest import REPO, run_sweep, sweep_env

HEAVY = ("torch", "transformers")


def modules_loaded_by(code: str) -> set[str]:
    """The heavy libraries in sys.modules after `code` runs in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=sweep_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_hydras_plugin_scan_and_the_cli_module_import_no_torch():
    # Plugins.instance() is Hydra's own scan: it imports every public module under hydra_plugins/, ours included.
    scan = "from hydra.core.plugins import Plugins; Plugins.instance()\nimport sweep.__main__"
    assert modules_loaded_by(scan) == set()


def test_the_sweeper_api_and_the_multirun_callback_import_no_torch():
    assert modules_loaded_by("import sweep.multirun.sweeper_api, sweep.multirun.callback") == set()


def test_the_probe_sees_torch_when_it_is_imported():
    assert modules_loaded_by("import sweep.job.plan; sweep.job.plan.resolve_device('cpu')") == {"torch"}


def test_help_shows_the_config_its_overrides_compose(tmp_path):
    result = run_sweep(tmp_path, "--help", "backend=compiled", "engine.max_batch_size=7")
    assert result.returncode == 0, result.stderr
    config = result.stdout.split("== The composed config ==", 1)[1]
    assert "max_batch_size: 7" in config and "compile_mode:" in config and "hydra:" not in config
    assert "--hydra-help : Hydra's help" in result.stdout  # Hydra's flags, after the config


def test_help_with_an_override_that_does_not_compose_says_so_in_one_line(tmp_path):
    result = run_sweep(tmp_path, "--help", "backend=no_such_backend")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "backend='no_such_backend' is not allowed; choose one of: compiled, hf, hf_paged, trt, vllm" in result.stderr
    wrong_type = run_sweep(tmp_path, "--help", "engine.max_batch_size=abc")
    assert wrong_type.returncode == 2 and wrong_type.stderr.count("\n") == 1
    assert "engine.max_batch_size='abc' is not allowed; it must be an integer" in wrong_type.stderr


def documented_command_keys() -> set[str]:
    """Every `key=value` key the `python -m sweep` command lines of the README and docs/ set (continued lines
    included)."""
    docs = [REPO / "README.md", *(REPO / "docs").glob("*.md")]
    lines = [line for doc in docs for line in doc.read_text().splitlines()]
    keys: set[str] = set()
    for i, line in enumerate(lines):
        if "python -m sweep " not in line:
            continue
        command = line
        while command.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command.rstrip()[:-1] + " " + lines[i]
        keys |= set(re.findall(r"(?:^|[\s'\"])\+{0,2}([a-z_]+(?:\.[a-z_0-9]+)+)=", command))
    return keys


def test_help_names_every_key_the_docs_set_and_every_sweeper_setting(tmp_path):
    from hydra_plugins.sweep_max_rate_sweeper.max_rate_sweeper import MaxRateSweeperConf
    from hydra_plugins.sweep_optuna_sweeper.optuna_sweeper import OptunaSweeperConf
    from sweep.job.command_line import known_keys
    from sweep.job.compose import help_text

    text = help_text()
    words = set(re.findall(r"[\w.]+", text))
    keys = {k for k in documented_command_keys() if k.startswith("hydra.") or k in known_keys()}
    assert {"workload.concurrency", "workload.request_rate", "backend.scheduler"} <= keys  # the probe reads them
    for key in keys:  # by its whole name, or by its last parts under a `section.*` line
        if re.search(r"\.(objectives|constraints)\.\w+$", key):  # a figure's name under a dict of figures
            assert key.rsplit(".", 2)[-2] + ".<figure>" in text, key
            continue
        parts = key.split(".")
        tail = any(".".join(parts[i:]) in words for i in range(1, len(parts)))
        section = any(".".join(parts[:i]) + ".*" in text for i in range(1, len(parts)))
        assert key in words or (tail and section), key
    settings = [f.name for conf in (OptunaSweeperConf, MaxRateSweeperConf) for f in dataclasses.fields(conf)]
    settings += ["kv_blocks", "kv_memory_fraction", "memory_fraction", "single_process_worker", "burstiness"]
    settings = [name for name in settings if not name.startswith("_") and name != "defaults"]  # Hydra's own
    unnamed = [name for name in settings if not re.search(rf"\b{name}\b", text)]
    assert unnamed == []


def test_every_worked_example_in_help_composes(tmp_path):
    from sweep.job.compose import EXAMPLES, compose

    commands = [line.split("python -m sweep ", 1)[1].split() for line in EXAMPLES.splitlines() if "python -m" in line]
    assert len(commands) == 3
    for args in commands:
        overrides = [a for a in args if a != "-m" and not a.startswith("hydra.")]
        first_points = [o.split(",")[0] for o in overrides]  # a grid's first point
        cfg = compose(first_points)
        assert cfg.backend.name and cfg.workload.scenario


def imported_by_command(tmp_path, *args: str) -> set[str]:
    """The heavy libraries a `python -m sweep` command imports (Python's own import log, -X importtime)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sweep", *args],
        cwd=tmp_path,
        env=sweep_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    modules = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")}
    return modules & set(HEAVY)


def test_a_bad_value_and_a_bad_grid_point_are_refused_without_torch(tmp_path):
    assert imported_by_command(tmp_path, "engine.max_batch_size=0") == set()
    assert imported_by_command(tmp_path, "-m", "engine.max_batch_size=0,2", "tracker=none") == set()
