"""What the MLflow UI shows: every run named after what it ran, a Description that opens on its figures, and a
sweep's parent with the best run's figures under the runs table's columns. Real CLI, Hydra and MLflow on SQLite,
transformers on the tiny model."""

from conftest import QUICK, mlflow_runs, run_sweep

from sweep.job.compose import compose
from sweep.job.naming import SWEPT_KEYS_ENV, run_name
from trackers.mlflow_tracker import DESCRIPTION_TAG, fit_lines


def test_a_probe_and_a_refused_point_are_named_from_their_config(monkeypatch):
    probe = compose(["+tracker.tags.max_rate_probe=3", "workload=rate", "workload.request_rate=0.25"])
    assert run_name(probe) == "probe 3: rate=0.25"
    monkeypatch.setenv(SWEPT_KEYS_ENV, "engine.max_batch_size")
    refused = compose(["model.path=/checkpoints/mymodel", "engine.max_batch_size=0"])  # validate() would refuse it
    assert run_name(refused) == "mymodel/hf max_batch_size=0"


def test_a_description_too_long_for_a_tag_keeps_whole_lines_and_closes_its_code_block():
    text = "best: x\n```\n" + "\n".join(f"row {i:04d} " + "x" * 80 for i in range(200)) + "\n```\n"
    fitted = fit_lines(text, 8000)
    lines = fitted.splitlines()
    assert len(fitted) <= 8000 and lines[0] == "best: x"
    assert lines[-2] == "```" and lines[-1].startswith("... ")
    assert lines[-1].endswith("more lines in the run's artifacts")
    assert all(line.startswith("row ") and len(line) == 89 for line in lines[2:-2])
    assert fit_lines("short", 8000) == "short"


def test_a_grids_parent_shows_the_best_figures_in_the_runs_table_and_its_runs_open_on_their_tables(tmp_path):
    result = run_sweep(tmp_path, "-m", "engine.max_batch_size=1,2", *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if r is not parent}
    assert set(children) == {"tiny/hf max_batch_size=1", "tiny/hf max_batch_size=2"}
    best = max(children.values(), key=lambda r: r.data.metrics["output_throughput_tok_s"])

    for metric in ("output_throughput_tok_s", "ttft_ms_p50", "tpot_ms_p50", "e2e_latency_ms_p99"):
        assert parent.data.metrics[metric] == best.data.metrics[metric]
    assert parent.data.params["engine.max_batch_size"] == "1, 2"
    assert parent.data.params["model.name"] == "tiny" and parent.data.params["workload.scenario"] == "throughput"
    description = parent.data.tags[DESCRIPTION_TAG].splitlines()
    assert description[0] == f"best: **{best.info.run_name}**  "
    assert description[1].startswith("**output throughput ") and " · TTFT P50 " in description[1]
    baseline = children["tiny/hf max_batch_size=1"]  # the first run
    if best is not baseline:
        assert description[1].endswith("x the baseline, tiny/hf max_batch_size=1)")
    table = description.index(next(line for line in description if line.startswith("| run |")))
    assert description[table - 2].startswith("Best first by output throughput")

    for child in children.values():
        text = child.data.tags[DESCRIPTION_TAG]
        assert text.startswith("tiny · hf · cpu (float32) · batch ")
        assert "throughput: every request at t0" in text.splitlines()[1]
        assert text.splitlines()[3].startswith("**output throughput ")
        assert "```\n---" in text and "TTFT" in text


def test_a_description_leads_with_the_reports_headline_then_its_table():
    from sweep.multirun.callback import table_first

    table = "| run | y |\n| --- | ---: |"
    load = f"# load sweep\n\n**8 req/s** held\n\n- **model**: tiny\n\nRates ascending.\n\n{table}\n"
    assert table_first(load).split("\n\n") == ["**8 req/s** held", "Rates ascending.", table, "- **model**: tiny\n"]
    grid = f"# sweep comparison\n\n- **selection**: x\n\nBest first by y.\n\n{table}\n"
    assert table_first(grid).split("\n\n") == ["Best first by y.", table, "- **selection**: x\n"]
