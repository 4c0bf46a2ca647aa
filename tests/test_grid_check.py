"""A grid with a point a run would refuse runs none of its points: every bad one is listed first, exit 2, nothing
recorded or built. Real CLI, Hydra's basic sweeper, MLflow on SQLite, transformers on the tiny model."""

from conftest import QUICK, mlflow_runs, run_sweep


def assert_nothing_ran(workdir):
    assert mlflow_runs(workdir) == []
    assert not any((workdir / "multirun").rglob(".hydra"))  # no job was launched
    assert not (workdir / "engines_cache" / "hf").exists()


def test_out_of_range_points_refuse_the_grid_before_any_point_runs(tmp_path):
    result = run_sweep(tmp_path, "-m", "engine.max_batch_size=2,0,-1", *QUICK)
    lines = (result.stdout + result.stderr).splitlines()
    assert result.returncode == 2, lines[-30:]
    start = next(i for i, line in enumerate(lines) if "2 of the grid's 3 points would be refused, so none runs" in line)
    assert lines[start + 1 : start + 3] == [
        "  engine.max_batch_size=0: engine.max_batch_size=0 is not allowed; it must be >= 1",
        "  engine.max_batch_size=-1: engine.max_batch_size=-1 is not allowed; it must be >= 1",
    ]
    assert "Traceback" not in result.stderr
    assert_nothing_ran(tmp_path)


def test_a_point_whose_workload_does_not_fit_or_whose_value_has_the_wrong_type_refuses_the_grid(tmp_path):
    result = run_sweep(tmp_path, "-m", "engine.max_input_len=1024,4", *QUICK)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "1 of the grid's 2 points would be refused" in output
    assert "  engine.max_input_len=4: engine.max_input_len=4 cannot hold the workload's longest input" in output
    assert_nothing_ran(tmp_path)

    result = run_sweep(tmp_path, "-m", "engine.max_batch_size=1,abc", *QUICK)
    assert result.returncode == 2
    assert "engine.max_batch_size='abc' is not allowed; it must be an integer" in result.stdout + result.stderr
    assert_nothing_ran(tmp_path)
