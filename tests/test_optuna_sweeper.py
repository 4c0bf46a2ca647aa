"""The Optuna sweeper plugin, end to end through the real CLI: Hydra, Optuna on SQLite, MLflow on SQLite,
transformers on the tiny model. Nothing is faked."""

import json

import optuna
import pytest
from conftest import mlflow_runs, run_sweep
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.sweep_optuna_sweeper._impl import best_config_yaml, split_overrides

QUICK = [
    "workload=throughput",
    "workload.num_requests=2",
    "workload.warmup_requests=0",
    "workload.iterations=1",
    "workload.input_len=8",
    "workload.output_len=4",
    "hydra.sweeper.n_jobs=1",
]


def parse(*overrides):
    return split_overrides(OverridesParser.create().parse_overrides(list(overrides)))


def test_search_space_translation_gets_hydra_bounds_right():
    space, fixed = parse(
        "engine.max_batch_size=choice(1,2,4,8)",
        "engine.max_num_tokens=range(256,4097,256)",  # Hydra's stop is exclusive: 4096 is the last value
        "engine.tokens_per_block=range(8,64,16)",  # 8, 24, 40, 56: the last value, not the stop
        "engine.max_input_len=tag(int, interval(128,1024))",
        "workload.output_len_std=interval(1,4)",
        "workload.input_len_std=tag(log, interval(0.5, 16.0))",
        "engine.dtype=float16,bfloat16",
        "engine.context_fmha=false",
    )
    assert space["engine.max_batch_size"] == CategoricalDistribution([1, 2, 4, 8])
    assert space["engine.max_num_tokens"] == IntDistribution(256, 4096, step=256)
    assert space["engine.tokens_per_block"] == IntDistribution(8, 56, step=16)
    assert space["engine.max_input_len"] == IntDistribution(128, 1024)
    assert space["workload.output_len_std"] == FloatDistribution(1.0, 4.0)
    assert space["workload.input_len_std"] == FloatDistribution(0.5, 16.0, log=True)
    assert space["engine.dtype"] == CategoricalDistribution(["float16", "bfloat16"])
    assert fixed == ["engine.context_fmha=false"]


def trials_of(tmp_path, study):
    return optuna.load_study(study_name=study, storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}").trials


def test_tpe_sweep_with_parallel_batches_records_children_under_one_parent(tmp_path):
    best_dir = tmp_path / "best"
    result = run_sweep(
        tmp_path,
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.study_name=tpe6",
        f"hydra.sweeper.best_config_dir={best_dir}",
        *QUICK[:-1],
        "engine.max_batch_size=choice(1,2)",
        "engine.attn_implementation=choice(eager,sdpa)",
        "+hydra.sweeper.constraints.ttft_ms_p99='<=100000'",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("sweep.kind") == "optuna"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 6 and all(r.info.status == "FINISHED" for r in children)
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == list(range(6))
    assert parent.info.run_name == "tpe6"  # named after its study
    assert all(
        r.info.run_name.startswith(f"trial {r.data.tags['optuna_trial']}: tiny/hf max_batch_size=") for r in children
    )
    assert parent.info.status == "FINISHED"
    assert parent.data.params["optuna.sampler"] == "tpe" and parent.data.params["optuna.n_jobs"] == "2"
    assert "engine.max_batch_size" in parent.data.params["optuna.search_space"]
    assert parent.data.metrics["trials.complete"] == 6
    best_value = max(r.data.metrics["output_throughput_tok_s"] for r in children)
    assert parent.data.metrics["best.output_throughput_tok_s"] == pytest.approx(best_value)
    trials = trials_of(tmp_path, "tpe6")
    assert all(t.constraints == {"ttft_ms_p99": pytest.approx(t.constraints["ttft_ms_p99"])} for t in trials)
    assert all(t.constraints["ttft_ms_p99"] < 0 for t in trials)  # feasible: far under the bound

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    artifacts |= {a.path for d in ("plots", "report") for a in client.list_artifacts(parent.info.run_id, d)}
    assert {
        "trials.csv",
        "best_config.yaml",
        "plots/optimization_history.png",
        "plots/param_importances.png",
        "report/comparison.md",
        "report/comparison.csv",
        "report/pareto_front.png",
        "report/latency_percentiles.png",
    } <= artifacts

    best_file = best_dir / "tpe6.yaml"
    assert best_file.is_file()
    rerun = run_sweep(tmp_path, f"hydra.searchpath=[file://{tmp_path}]", "+best=tpe6", "tracker=none")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    best_child = max(children, key=lambda r: r.data.metrics["output_throughput_tok_s"])
    assert f"batch {best_child.data.params['engine.max_batch_size']}" in rerun.stdout


def test_interrupted_sweep_resumes_the_same_study(tmp_path):
    common = [
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.study_name=resume",
        "hydra.sweeper.sampler=random",
        f"hydra.sweeper.best_config_dir={tmp_path}",
        *QUICK,
        "engine.max_batch_size=choice(1,2,4)",
    ]
    assert run_sweep(tmp_path, *common, "hydra.sweeper.n_trials=2").returncode == 0
    # An interruption leaves a trial RUNNING in the storage: make one exactly as Optuna would.
    study = optuna.load_study(study_name="resume", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    study.ask()
    result = run_sweep(tmp_path, *common, "hydra.sweeper.n_trials=4")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = trials_of(tmp_path, "resume")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] + [TrialState.COMPLETE]
    children = [r for r in mlflow_runs(tmp_path) if "optuna_trial" in r.data.tags]
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == [0, 1, 3]


def test_infeasible_trial_is_pruned_without_a_build_and_crashing_trial_fails(tmp_path):
    result = run_sweep(
        tmp_path,
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.n_trials=10",
        "hydra.sweeper.study_name=grid",
        f"hydra.sweeper.best_config_dir={tmp_path}",
        *QUICK,
        "engine.max_seq_len=choice(8,64)",  # 8 cannot hold input 8 + output 4
        "engine.attn_implementation=choice(sdpa,flash_attention_2)",  # flash-attn is not installed: load fails
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = {
        (t.params["engine.max_seq_len"], t.params["engine.attn_implementation"]): t for t in trials_of(tmp_path, "grid")
    }
    assert len(trials) == 4
    assert trials[(8, "sdpa")].state == trials[(8, "flash_attention_2")].state == TrialState.PRUNED
    assert "engine.max_seq_len=8 cannot hold" in trials[(8, "sdpa")].user_attrs["pruned_reason"]
    assert trials[(64, "flash_attention_2")].state == TrialState.FAIL
    assert trials[(64, "sdpa")].state == TrialState.COMPLETE

    runs = mlflow_runs(tmp_path)
    by_state = {}
    for r in runs:
        if "optuna_trial" in r.data.tags:
            by_state.setdefault(r.data.tags.get("optuna.state", r.info.status), []).append(r)
    assert len(by_state["PRUNED"]) == 2 and len(by_state["FAILED"]) == 1 and len(by_state["FINISHED"]) == 1
    assert "flash" in by_state["FAILED"][0].data.tags["error"].lower()
    # hf builds nothing, so its cache key holds no engine option: the feasible trials share one entry.
    built = [p for p in (tmp_path / "engines_cache" / "hf").iterdir() if p.is_dir()]
    assert len(built) == 1
    assert json.loads((built[0] / "manifest.json").read_text())["key_inputs"]["options"] == {}


def test_best_config_puts_group_choices_in_the_defaults_list():
    trial = optuna.trial.create_trial(params={}, distributions={}, value=1.0)
    text = best_config_yaml(
        "s",
        trial,
        {"model": "tiny", "backend": "hf", "workload": "throughput"},
        ["search=throughput", "engine.max_batch_size=4", "+tracker.tags.optuna_trial=3"],
    )
    assert text.startswith("# @package _global_")
    assert "- override /backend: hf" in text and "- override /workload: throughput" in text
    assert "max_batch_size: 4" in text and "search" not in text.split("\n", 3)[3] and "optuna_trial" not in text


def test_grid_multirun_is_grouped_under_a_parent(tmp_path):
    result = run_sweep(tmp_path, "-m", *QUICK[:-1], "engine.max_batch_size=1,2")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("sweep.kind") == "multirun"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and parent.info.status == "FINISHED"


def test_two_objectives_give_a_pareto_front(tmp_path):
    result = run_sweep(
        tmp_path,
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.sampler=random",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.study_name=pareto",
        f"hydra.sweeper.best_config_dir={tmp_path}",
        *QUICK,
        "+hydra.sweeper.objectives.output_throughput_tok_s=maximize",
        "+hydra.sweeper.objectives.e2e_latency_ms_p99=minimize",
        "engine.max_batch_size=choice(1,2)",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    assert len(study.directions) == 2 and len(study.best_trials) >= 1
    (parent,) = [r for r in mlflow_runs(tmp_path) if r.data.tags.get("sweep.kind") == "optuna"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    assert "plots/pareto_front.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"best.output_throughput_tok_s", "best.e2e_latency_ms_p99"} <= set(parent.data.metrics)
