"""What the console answers without an engine: --help and config errors load no torch or transformers, and
--help renders the composed config like Hydra's own help."""

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
    assert result.stderr.count("\n") == 1 and "Could not find 'backend/no_such_backend'" in result.stderr
