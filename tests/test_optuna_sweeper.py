"""The Optuna sweeper plugin, end to end through the real CLI: Hydra, Optuna on SQLite, MLflow on SQLite,
transformers on the tiny model. Nothing is faked."""

import inspect
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from dataclasses import fields

import optuna
import pytest
from conftest import QUICK, REPO, mlflow_runs, run_sweep
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.sweep_optuna_sweeper._budget import Budget
from hydra_plugins.sweep_optuna_sweeper._prepare import SearchSettings
from hydra_plugins.sweep_optuna_sweeper._record import ParentRun, Progress, best_config_yaml
from hydra_plugins.sweep_optuna_sweeper._samplers import choose_sampler
from hydra_plugins.sweep_optuna_sweeper._search import OptunaSearch
from hydra_plugins.sweep_optuna_sweeper._space import (
    grid_values,
    split_overrides,
    trtllm_bench_setting,
    warm_start_point,
)
from hydra_plugins.sweep_optuna_sweeper._study import Heartbeat, best_trials, tally
from hydra_plugins.sweep_optuna_sweeper.config import SAMPLERS, OptunaSweeperConf
from sweep.config import CONF_DIR
from sweep.config.errors import ConfigError
from sweep.job.compose import compose, register_configs
from sweep.multirun.sweeper_api import WarmStartInputs

QUICK = [*QUICK, "hydra.sweeper.n_jobs=1"]


def parse(*overrides):
    return split_overrides(OverridesParser.create().parse_overrides(list(overrides)))


def make_search(**settings) -> OptunaSearch:
    """The sweeper's search with its config's defaults (the default sampler, tpe), as Hydra would instantiate it."""
    return OptunaSearch(OptunaSweeperConf(**{"sampler": "tpe"} | settings))


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
    trials = trials_of(tmp_path, "tpe6")
    measured = [t for t in trials if "reused_from" not in t.user_attrs]
    assert len(trials) == 6 and len(children) == len(measured)  # a point measured once is reused, not run again
    assert all(r.info.status == "FINISHED" for r in children)
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == [t.number for t in measured]
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


def test_interrupted_sweep_resumes_and_two_sweeps_on_one_study_cooperate(tmp_path):
    """Only a trial whose sweep died (its heartbeat stopped) is failed, and retried; a live one is left,
    and counts towards n_trials: the sweep waits for it instead of running one trial too many."""
    common = [
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.study_name=resume",
        "hydra.sweeper.sampler=random",
        f"hydra.sweeper.best_config_dir={tmp_path}",
        *QUICK,
        "engine.max_batch_size=choice(1,2,4)",
        "engine.attn_implementation=choice(eager,sdpa)",
    ]
    assert run_sweep(tmp_path, *common, "hydra.sweeper.n_trials=1").returncode == 0
    db = tmp_path / "mlruns" / "optuna.db"
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}", heartbeat_interval=60)
    study = optuna.load_study(study_name="resume", storage=storage)
    space = {
        "engine.max_batch_size": CategoricalDistribution([1, 2, 4]),
        "engine.attn_implementation": CategoricalDistribution(["eager", "sdpa"]),
    }
    dead, live = study.ask(space), study.ask(space)
    storage.record_heartbeat(dead._trial_id)
    with sqlite3.connect(db) as con:  # the dead sweep's last heartbeat, long ago (the grace period is 2 minutes)
        con.execute(
            "UPDATE trial_heartbeats SET heartbeat = '2000-01-01 00:00:00' WHERE trial_id = ?", (dead._trial_id,)
        )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    with Heartbeat(storage, interval=1) as live_sweep:  # the live sweep beats while it runs its trial
        live_sweep.beat_for([live])
        command = [sys.executable, "-m", "sweep", *common, "hydra.sweeper.n_trials=4"]
        sweep = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        while tally(study).counted < 3 and sweep.poll() is None:  # the first trial, the dead one's retry, one more
            time.sleep(0.5)
        assert sweep.poll() is None  # 3 counted + the live one make 4: it waits, and asks for no fifth
        study.tell(live, 1.0)  # the live sweep finishes its trial: nothing else marked it
        live_sweep.stop_beating_for([live])
    output = sweep.communicate(timeout=300)[0].decode()
    assert sweep.returncode == 0, output[-3000:]
    trials = trials_of(tmp_path, "resume")
    assert len(trials) == 5 and tally(study).counted == 4
    assert trials[dead.number].state == TrialState.FAIL
    assert trials[live.number].state == TrialState.COMPLETE and trials[live.number].value == 1.0
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == dead.params


def test_telling_a_trial_another_sweep_failed_is_a_warning_not_a_crash(caplog):
    search = make_search()
    study = optuna.create_study()
    trial = study.ask({"x": CategoricalDistribution([1])})
    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # as another sweep's fail_stale_trials
    search.tell(study, trial, ret=None)
    assert "marked FAIL meanwhile" in caplog.text


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
        "hydra.sweeper.sampler=nsgaii",
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
    assert study.metric_names == ["output_throughput_tok_s", "e2e_latency_ms_p99"]
    (parent,) = [r for r in mlflow_runs(tmp_path) if r.data.tags.get("sweep.kind") == "optuna"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    assert "plots/pareto_front.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"best.output_throughput_tok_s", "best.e2e_latency_ms_p99"} <= set(parent.data.metrics)


# -- what a new user trying the sweeper runs into ------------------------------------------------------------
def test_a_value_fixed_on_the_command_line_wins_over_the_presets_sweep():
    preset = ["engine.max_batch_size=choice(1,2,4,8,16)", "engine.attn_implementation=choice(eager,sdpa)"]
    space, fixed = parse(*preset, "engine.max_batch_size=4")
    assert list(space) == ["engine.attn_implementation"] and fixed == ["engine.max_batch_size=4"]
    space, fixed = parse("engine.dtype=float32", "engine.dtype=choice(float32,bfloat16)")  # and the other way round
    assert list(space) == ["engine.dtype"] and fixed == []


def test_hydra_int_interval_forms_and_float_ranges():
    space, _ = parse(
        "engine.max_batch_size=int(interval(1,8))",
        "engine.max_num_tokens=tag(log, int(interval(256,8192)))",
        "workload.input_len_std=range(0,1,0.3)",
    )
    assert space["engine.max_batch_size"] == IntDistribution(1, 8)
    assert space["engine.max_num_tokens"] == IntDistribution(256, 8192, log=True)
    assert space["workload.input_len_std"] == FloatDistribution(0.0, 0.9, step=0.3)
    assert grid_values({"w": space["workload.input_len_std"]}) == {"w": [0.0, 0.3, 0.6, 0.9]}


@pytest.mark.parametrize(
    "sweep, message",
    [
        ("engine.max_batch_size=interval(5,1)", "engine.max_batch_size=interval(5,1): `low <= high`"),
        ("workload.input_len_std=tag(log, interval(0,1))", "workload.input_len_std=tag(log, interval(0,1)): `low > 0`"),
        ("engine.max_batch_size=range(5,1)", "engine.max_batch_size=range(5,1) holds no value"),
    ],
)
def test_a_bad_sweep_names_its_key(sweep, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(sweep)


@pytest.mark.parametrize(
    "settings, arguments, message",
    [
        ({}, ["engine.max_seq_len=64"], "no search space"),
        ({"sampler": "annealing"}, ["engine.max_batch_size=choice(1,2)"], "hydra.sweeper.sampler='annealing'"),
        ({"objectives": {"tok_s": "maximize"}}, ["engine.max_batch_size=choice(1,2)"], "objectives.tok_s='tok_s'"),
        ({"constraints": {"ttft": "<=5"}}, ["engine.max_batch_size=choice(1,2)"], "constraints.ttft='ttft'"),
        ({"grace_period": 0}, ["engine.max_batch_size=choice(1,2)"], "hydra.sweeper.grace_period=0"),
        (
            {"sampler": "cmaes", "objectives": {"output_throughput_tok_s": "maximize", "ttft_ms_p99": "minimize"}},
            ["engine.max_batch_size=choice(1,2)"],
            "optimises one objective",
        ),
    ],
)
def test_set_up_errors_are_found_before_anything_runs(tmp_path, settings, arguments, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_search(storage=f"sqlite:///{tmp_path / 'o.db'}", **settings).prepare(compose(), arguments)


def test_a_set_up_error_exits_2_with_one_line_and_records_nothing(tmp_path):
    result = run_sweep(tmp_path, "-m", "hydra/sweeper=optuna", "engine.max_batch_size=range(5,1)")
    assert result.returncode == 2
    assert "engine.max_batch_size=range(5,1) holds no value" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr and mlflow_runs(tmp_path) == []


def test_a_search_preset_without_multirun_is_refused(tmp_path):
    result = run_sweep(tmp_path, "search=throughput", *QUICK[:-1])
    assert result.returncode == 2
    assert "add -m: python -m sweep -m search=throughput" in result.stderr + result.stdout
    assert mlflow_runs(tmp_path) == []


def test_default_study_name_holds_the_model_and_the_space(tmp_path):
    search = make_search(storage=f"sqlite:///{tmp_path / 'o.db'}")
    llama = compose(["model=llama-3.1-8b", "model.path=/ckpt/Llama-3.1-8B-local"])
    a = search.prepare(llama, ["engine.max_batch_size=choice(1,2)"]).study_name
    b = search.prepare(llama, ["engine.max_batch_size=choice(1,2,4)"]).study_name
    c = search.prepare(compose(["model=llama-3.1-8b"]), ["engine.max_batch_size=choice(1,2)"]).study_name
    assert a.startswith("sweep-Llama-3.1-8B-local-hf-") and c.startswith("sweep-llama-3.1-8b-hf-")
    assert len({a, b, c}) == 3
    assert search.prepare(llama, ["engine.max_batch_size=choice(1,2)"]).study_name == a  # the same search resumes


def test_resuming_a_named_study_with_another_space_is_refused_unless_asked(tmp_path):
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    first = make_search(storage=storage, study_name="mine")
    first.open_study(first.prepare(compose(), ["engine.max_batch_size=choice(1,2)"]))
    wider = ["engine.max_batch_size=choice(1,2,4)"]
    with pytest.raises(ConfigError, match="holds a study of another search_space.*resume_mismatched=true"):
        make_search(storage=storage, study_name="mine").prepare(compose(), wider)
    assert make_search(storage=storage, study_name="mine", resume_mismatched=True).prepare(compose(), wider)


def test_workers_opening_one_study_together_draw_different_points(tmp_path):
    # Two workers that open a fresh study before either has asked see the same trial count; seeded on it alone,
    # they would draw the same points (and one would measure what the other does). The study is real (SQLite).
    space = ["engine.max_batch_size=choice(1,2,4,8,16,32,64,128)", "engine.max_num_tokens=range(64,8193,64)"]

    def first_draws(study_name: str) -> list[list]:
        searches = [make_search(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name=study_name, sampler="random")]
        searches.append(make_search(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name=study_name, sampler="random"))
        studies = [s.open_study(s.prepare(compose(), space)) for s in searches]  # both open before either asks
        distributions = searches[0].s.space
        return [
            [study.sampler.sample_independent(study, None, k, d) for k, d in distributions.items()] for study in studies
        ]

    a, b = first_draws("together")
    assert a != b
    assert first_draws("again") == [a, b]  # the same sweep started again draws the same points


def test_best_config_of_a_search_with_a_deletion():
    trial = optuna.trial.create_trial(params={}, distributions={}, value=1.0)
    text = best_config_yaml("s", trial, {"model": "tiny"}, ["~engine.max_input_len", "engine.max_batch_size=4"])
    assert "+best=s '~engine.max_input_len'" in text and "max_batch_size: 4" in text


def children_of(runs, parent):
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def settings_for(space) -> SearchSettings:
    return SearchSettings(space, [], {"output_throughput_tok_s": "maximize"}, {}, "s", "sqlite://", 10)


def test_a_point_already_measured_is_reused_not_run_again():
    search = make_search()
    space = {"engine.max_batch_size": CategoricalDistribution([1, 2])}
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"engine.max_batch_size": 2})
    first = study.ask(space)
    first.set_constraint("ttft_ms_p99", -5.0)
    study.tell(first, 100.0)
    study.enqueue_trial({"engine.max_batch_size": 2})
    again = study.ask(space)
    runnable, twins = search.triage(
        study,
        settings_for(space),
        [again],
        ParentRun(compose(["tracker=none"])),
        Progress(10, {"output_throughput_tok_s": "maximize"}),
    )
    assert runnable == [] and twins == []
    reused = study.trials[again.number]
    assert (
        reused.value == 100.0 and reused.user_attrs["reused_from"] == 0 and reused.constraints == {"ttft_ms_p99": -5.0}
    )


def test_a_failure_while_preparing_one_trial_fails_that_trial_only(tmp_path):
    """Through the real CLI: one choice's dataset is not UTF-8, so reading it raises while checking."""
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps({"task_id": 0, "input_ids": [1, 2, 3], "output_tokens": 2}) + "\n")
    bad.write_bytes(b"\xff\xfe not utf-8\n")
    result = run_sweep(
        tmp_path,
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.study_name=data",
        f"hydra.sweeper.best_config_dir={tmp_path}",
        *QUICK,
        f"workload.dataset=choice({good},{bad})",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = {t.params["workload.dataset"]: t for t in trials_of(tmp_path, "data")}
    assert trials[str(good)].state == TrialState.COMPLETE
    assert trials[str(bad)].state in (TrialState.FAIL, TrialState.PRUNED)  # PRUNED once the workload says why


def test_the_best_is_chosen_on_the_confirmed_figure():
    study = optuna.create_study(direction="maximize")
    for value in (100.0, 90.0, 50.0):
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=value))
    assert best_trials(study)[0].number == 0
    study.set_user_attr("confirmed", {"0": {"mean": 80.0}, "1": {"mean": 95.0}})  # trial 0 was a lucky measurement
    assert best_trials(study)[0].number == 1


def test_budget_stops_asking_once_the_next_batch_would_pass_it():
    budget = Budget(0.0001, "cuda")
    assert budget.allows_another_batch()  # nothing measured yet: the first batch runs
    budget.spent(60.0)
    assert not budget.allows_another_batch() and budget.stopped
    assert budget.figures()["sweep.gpu_minutes"] == budget.figures()["sweep.job_minutes"] == 1.0
    assert Budget(None, "cpu").allows_another_batch() and Budget(None, "cpu").figures()["sweep.gpu_minutes"] == 0.0


def test_budget_counts_each_parallel_job_and_its_gpus():
    # Two trials at once, two GPUs each, for one minute: 2 job-minutes and 4 GPU-minutes; the next batch is still
    # expected to take one minute of wall time.
    budget = Budget(2.5, "cuda", gpus_per_trial=2)
    budget.spent(60.0, jobs=2)
    figures = budget.figures()
    assert figures["sweep.job_minutes"] == 2.0 and figures["sweep.gpu_minutes"] == 4.0
    assert budget.allows_another_batch()  # 1 minute so far (in this test: none) + 1 expected <= 2.5


def test_warm_start_follows_trtllm_bench_for_an_8b_model_on_an_h200():
    llama_8b = WarmStartInputs(140e9, "free GPU memory", 16e9, 131072, input_len=1024, output_len=1024)
    assert trtllm_bench_setting(llama_8b) == {"engine.max_batch_size": 512, "engine.max_num_tokens": 1024}
    space, _ = parse("engine.max_batch_size=choice(64,128,256,384,1024)", "engine.max_num_tokens=range(256,8193,256)")
    assert warm_start_point(space, llama_8b) == {"engine.max_batch_size": 384, "engine.max_num_tokens": 1024}
    too_small = WarmStartInputs(17e9, "free GPU memory", 16e9, 131072, input_len=4096, output_len=4096)
    assert warm_start_point(space, too_small) == {}


def test_warm_start_keeps_the_configs_own_value_of_every_other_searched_key():
    # trtllm-bench sets batch size and token budget; the rest of the first trial is the config as composed, where
    # the space holds that value (True is not the choice 1; a value outside a range, or between its steps, is left
    # to the sampler).
    space, _ = parse(
        "engine.max_batch_size=choice(8,16)",
        "engine.cuda_graphs=choice(false,true)",
        "engine.compile_mode=choice(none,default)",
        "engine.max_seq_len=range(64,128,32)",
        "workload.num_requests=choice(1,2)",
        "workload.input_len=range(64,129,32)",
        "workload.output_len=range(64,129,32)",
    )
    defaults = OmegaConf.create(
        {"engine": {"cuda_graphs": True, "compile_mode": "reduce-overhead", "max_seq_len": 4096},
         "workload": {"num_requests": True, "input_len": 100, "output_len": 96}}
    )  # fmt: skip
    llama_8b = WarmStartInputs(140e9, "free GPU memory", 16e9, 131072, input_len=1024, output_len=1024)
    assert warm_start_point(space, llama_8b, defaults) == {
        "engine.max_batch_size": 16,
        "engine.cuda_graphs": True,
        "workload.output_len": 96,
    }


def test_samplers_fit_what_they_are_for():
    samplers = optuna.samplers
    expected = {
        "tpe": samplers.TPESampler,
        "random": samplers.RandomSampler,
        "gp": samplers.GPSampler,
        "nsgaii": samplers.NSGAIISampler,
        "qmc": samplers.QMCSampler,
    }
    for name, cls in expected.items():
        assert isinstance(choose_sampler(name).make(seed=0), cls)


def test_a_search_prints_one_progress_line_per_trial_and_names_its_runs(tmp_path):
    """Progress, run names, warm start, noise (spread, confirm_top_k), budget figures and the dashboard's links."""
    result = run_sweep(
        tmp_path,
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.study_name=progress",
        "hydra.sweeper.confirm_top_k=1",
        f"hydra.sweeper.best_config_dir={tmp_path}",
        *QUICK,
        "engine.max_batch_size=choice(1,2)",
        "engine.attn_implementation=choice(eager,sdpa)",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    lines = re.findall(r"trial \d+ · (\d)/4 · max_batch_size=\d attn_implementation=\w+ · .* left", console)
    assert lines == ["1", "2", "3", "4"]
    assert "tiny · hf · cpu" not in console  # no run's summary table on the console
    trials = trials_of(tmp_path, "progress")
    assert trials[0].params["engine.max_batch_size"] == 2 and "host memory" in trials[0].user_attrs["warm_start"]
    assert trials[0].params["engine.attn_implementation"] == "sdpa"  # the warm start keeps the config's own value
    study = optuna.load_study(study_name="progress", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    assert study.metric_names == ["output_throughput_tok_s"] and len(study.user_attrs["confirmed"]) == 1

    runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("sweep.kind") == "optuna"]
    assert parent.info.run_name == "progress"
    assert parent.data.metrics["sweep.gpu_minutes"] == 0.0 and parent.data.metrics["sweep.wall_minutes"] > 0
    by_id = {r.info.run_id: r for r in runs}
    for trial in trials:
        child = by_id[trial.user_attrs["mlflow_run_id"]]
        assert child.info.run_name.startswith(f"trial {trial.user_attrs.get('reused_from', trial.number)}: ")
        low, high = trial.user_attrs["spread"]["output_throughput_tok_s"]
        recorded = child.data.metrics["output_throughput_tok_s"]  # stored at 5 significant digits
        assert low * (1 - 1e-4) <= recorded <= high * (1 + 1e-4)
    assert sum(r.info.run_name.startswith("confirm trial ") for r in runs) == 1
    job_logs = [log.read_text() for log in (tmp_path / "multirun").rglob("sweep.log")]
    assert sum("tiny · hf · cpu" in text for text in job_logs) == len(children_of(runs, parent))  # tables: in logs


@pytest.mark.parametrize(
    "preset,metric",
    [(None, "output_throughput_tok_s"), ("goodput", "goodput_req_s"), ("throughput", "output_throughput_tok_s")],
)
def test_a_search_preset_sets_the_objective_it_names(preset, metric):
    # config.yaml's own objective came after the presets in its defaults list and silently replaced theirs:
    # search=goodput optimised output throughput.
    cfg = compose([f"search={preset}"] if preset else [])
    assert cfg.objective.metric == metric
    assert compose(["search=goodput", "objective.metric=ttft_ms_p99"]).objective.metric == "ttft_ms_p99"


@pytest.mark.parametrize("preset, backend", [("vllm_goodput", "vllm"), ("compiled_goodput", "compiled")])
def test_an_engine_preset_searches_only_settings_that_engine_honours(preset, backend):
    from sweep.backends.compiled.backend import INFLIGHT_OPTIONS
    from sweep.backends.registry import BACKENDS

    config = sweeper_config(f"search={preset}")
    assert config.backend.name == backend and config.objective.metric == "goodput_req_s"
    honoured = ("dtype", *INFLIGHT_OPTIONS) if backend == "compiled" else BACKENDS[backend].load().honoured_options
    searched = [key.removeprefix("engine.") for key in config.hydra.sweeper.params]
    assert searched and all(key in honoured for key in searched), (searched, honoured)


# -- samplers as a config group ----------------------------------------------------------------------------------
def sweeper_config(*overrides: str):
    """`python -m sweep -m <overrides>`'s full config, Hydra's part (the sweeper's settings) included."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize(
    "overrides, sampler_class, n_startup_trials",
    [
        (["hydra/sweeper=optuna", "hydra.sweeper.sampler.n_startup_trials=5"], optuna.samplers.TPESampler, 5),
        (["search=throughput", "hydra.sweeper.sampler.n_startup_trials=3"], optuna.samplers.TPESampler, 3),
        (
            ["hydra/sweeper=optuna", "hydra/sweeper/sampler=gp", "hydra.sweeper.sampler.n_startup_trials=4"],
            optuna.samplers.GPSampler,
            4,
        ),
        (["search=pareto", "hydra.sweeper.sampler=random"], optuna.samplers.RandomSampler, None),  # a name alone
    ],
)
def test_a_samplers_settings_on_the_command_line_reach_it(tmp_path, overrides, sampler_class, n_startup_trials):
    config = sweeper_config(*overrides, f"hydra.sweeper.storage=sqlite:///{tmp_path / 'o.db'}")
    sweeper = instantiate(config.hydra.sweeper)  # as Hydra instantiates the sweeper plugin
    search = sweeper.search
    search.prepare(config, ["engine.max_batch_size=choice(1,2)"])
    sampler = search.open_study(search.s).sampler
    assert type(sampler) is sampler_class
    if n_startup_trials is not None:
        assert sampler._n_startup_trials == n_startup_trials


OPTUNA_PRESETS = sorted(
    p.stem for p in (CONF_DIR / "search").glob("*.yaml") if "override /hydra/sweeper: optuna" in p.read_text()
)


@pytest.mark.parametrize("preset", OPTUNA_PRESETS)
def test_every_optuna_preset_picks_its_sampler_from_the_group(preset):
    # a preset naming its sampler (`sampler: tpe`) would leave no settings to set on the command line
    config = sweeper_config(f"search={preset}", "hydra.sweeper.sampler.n_startup_trials=4")
    assert config.hydra.sweeper.sampler.n_startup_trials == 4


def test_a_sampler_named_in_a_config_replaces_the_default_and_a_clash_is_refused(tmp_path):
    storage = f"hydra.sweeper.storage=sqlite:///{tmp_path / 'o.db'}"
    config = sweeper_config("+experiment=scale_out", storage)  # its YAML names the sampler: `sampler: grid`
    search = instantiate(config.hydra.sweeper).search
    search.prepare(config, [])
    assert search.prepared.sampler.name == "grid" and search.s.n_trials == 8
    clash = sweeper_config("+experiment=scale_out", "hydra/sweeper/sampler=gp", storage)
    with pytest.raises(ConfigError, match="hydra.sweeper.sampler=grid and hydra/sweeper/sampler=gp pick two"):
        instantiate(clash.hydra.sweeper).search.prepare(clash, [])


def test_only_the_registered_samplers_are_instantiated(tmp_path):
    config = sweeper_config("hydra/sweeper=optuna", "hydra.sweeper.sampler._target_=os.system")
    with pytest.raises(ConfigError, match=r"hydra.sweeper.sampler._target_='os.system' is not allowed; .* tpe"):
        instantiate(config.hydra.sweeper).search.prepare(config, ["engine.max_batch_size=choice(1,2)"])
    with pytest.raises(ConfigError, match=r"hydra.sweeper.sampler.seed=3 is not allowed \(tpe\): the sweeper seeds"):
        choose_sampler({"_target_": "optuna.samplers.TPESampler", "seed": 3})  # the seed is hydra.sweeper.seed
    typo = sweeper_config("hydra/sweeper=optuna", "hydra.sweeper.sampler.n_startup_trials=five")
    with pytest.raises(ConfigError, match=r"hydra.sweeper.sampler.n_startup_trials='five' is not allowed \(tpe\)"):
        instantiate(typo.hydra.sweeper).search.prepare(typo, ["engine.max_batch_size=choice(1,2)"])
    qmc = sweeper_config("hydra/sweeper=optuna", "hydra/sweeper/sampler=qmc", "hydra.sweeper.sampler.qmc_type=sobel")
    with pytest.raises(ConfigError, match=r"hydra.sweeper.sampler \(qmc\): The `qmc_type='sobel'` is invalid"):
        instantiate(qmc.hydra.sweeper).search.prepare(qmc, ["engine.max_batch_size=choice(1,2)"])


def test_each_samplers_settings_are_its_optuna_class_defaults():
    for name, conf in SAMPLERS.items():
        parameters = inspect.signature(get_class(conf._target_)).parameters
        for setting in fields(conf)[1:]:
            assert parameters[setting.name].default == setting.default, (name, setting.name)


def test_help_lists_every_sampler_and_search_preset(tmp_path):
    result = run_sweep(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    (samplers,) = re.findall(r"hydra/sweeper/sampler=<name> +the Optuna sampler: (.*);", result.stdout)
    (presets,) = re.findall(r"-m search=throughput +a preset in conf/search/: (.*)", result.stdout)
    assert sorted(samplers.split(", ")) == sorted(SAMPLERS)
    assert presets.split(", ") == sorted(p.stem for p in (CONF_DIR / "search").glob("*.yaml"))


# -- what a search must not get wrong ------------------------------------------------------------------------------
def test_trials_that_score_nothing_are_no_best():
    study = optuna.create_study(direction="maximize")
    for value in (0.0, 0.0):
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=value))
    assert best_trials(study) == []
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=2.0))
    assert best_trials(study)[0].number == 2
    latency = optuna.create_study(direction="minimize")  # 0 is a value like any other for a minimised figure
    latency.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.0))
    assert best_trials(latency)[0].number == 0


def test_a_search_whose_slo_is_out_of_reach_says_so_and_writes_no_best_config(tmp_path):
    result = run_sweep(
        tmp_path,
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.study_name=unreachable",
        f"hydra.sweeper.best_config_dir={tmp_path / 'best'}",
        *QUICK,
        "objective.metric=goodput_req_s",
        "slo.ttft_ms=0.001",  # no request's first token comes within a microsecond: every trial's goodput is 0
        "engine.max_batch_size=choice(1,2)",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert (
        "no setting met the objective or the SLO: every feasible trial scored goodput_req_s=0 under the SLO "
        "(slo.ttft_ms=0.001); loosen the SLO (larger slo.ttft_ms), or search other settings; no best config written"
    ) in console
    assert "best trial" not in console and not (tmp_path / "best").exists()
    assert [t.value for t in trials_of(tmp_path, "unreachable")] == [0.0, 0.0]
    (parent,) = [r for r in mlflow_runs(tmp_path) if r.data.tags.get("sweep.kind") == "optuna"]
    assert "best.goodput_req_s" not in parent.data.metrics and parent.data.metrics["trials.complete"] == 2


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["model=glob(*)"], "model=glob(*) is not allowed: glob() has no Optuna distribution; hydra/sweeper=optuna"),
        (
            ["engine.max_batch_size=tag(int, interval(0.5, 0.7))"],
            "engine.max_batch_size=tag(int, interval(0.5, 0.7)) is not allowed: an integer interval holds no integer",
        ),
        (
            ["engine.max_batch_size=tag(int, interval(1.5, 1.9))"],
            "engine.max_batch_size=tag(int, interval(1.5, 1.9)) is not allowed: an integer interval holds no integer",
        ),
        (
            ["engine.max_batch_size=tag(foo, interval(1,2))"],
            "engine.max_batch_size=tag(foo, interval(1,2)) is not allowed: the tag 'foo' means nothing to the "
            "sweeper; interval() takes tag(log, ...) and tag(int, ...)",
        ),
        (
            ["engine.max_batch_size=choice()"],
            "engine.max_batch_size='choice()' cannot be parsed: empty choice is not legal; write one value, or a sweep",
        ),
        (
            ["engine.max_batch_size=choice(1,2)", "+hydra.sweeper.constraints.p99_speed='<=5'"],
            "hydra.sweeper.constraints.p99_speed='p99_speed' is not allowed; choose a figure sweep records",
        ),
    ],
)
def test_sweep_syntax_the_sweeper_cannot_map_is_one_line_and_exit_2(tmp_path, arguments, message):
    result = run_sweep(tmp_path, "-m", "hydra/sweeper=optuna", *QUICK, *arguments)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    (line,) = [line for line in output.splitlines() if line.strip()]
    assert message in line and "Traceback" not in output
    assert mlflow_runs(tmp_path) == [] and not (tmp_path / "mlruns" / "optuna.db").exists()


def test_a_swept_key_added_with_plus_keeps_its_plus(tmp_path):
    result = run_sweep(
        tmp_path,
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.study_name=added",
        f"hydra.sweeper.best_config_dir={tmp_path / 'best'}",
        *QUICK,
        "+note=choice(a,b)",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="added", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    assert sorted(t.params["note"] for t in study.trials) == ["a", "b"]
    assert all(t.state == TrialState.COMPLETE and "reused_from" not in t.user_attrs for t in study.trials)
    best = (tmp_path / "best" / "added.yaml").read_text()  # a config cannot add a key: its rerun command does
    assert f"+best=added '+note={study.best_params['note']}'" in best and "note:" not in best


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_resumed_study_draws_new_points(tmp_path, sampler):
    """A seeded sampler replays its draws: resumed with the same seed, it would ask for the points it holds."""
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    space = ["engine.max_batch_size=range(1,1000)", "engine.max_num_tokens=range(256,8193,256)"]
    points = []
    for n_trials in (3, 6):
        search = make_search(sampler=sampler, storage=storage, study_name="resumed", n_trials=n_trials)
        s = search.prepare(compose(), space)
        study = search.open_study(s)
        for _ in range(3):  # what a search of n_trials asks for after the trials the study holds
            trial = study.ask(s.space)
            points.append(tuple(trial.params.values()))
            study.tell(trial, 1.0)
    assert len(set(points)) == 6, points


def test_a_presets_sweep_that_hydra_cannot_parse_names_it(tmp_path):
    search = make_search(storage=f"sqlite:///{tmp_path / 'o.db'}", params={"engine.max_batch_size": "choice()"})
    with pytest.raises(ConfigError, match=re.escape("engine.max_batch_size=choice() is not allowed: empty choice")):
        search.prepare(compose(), [])
