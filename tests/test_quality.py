"""The quality figures: an unquantized engine scores ~100% / ~0 against its reference, a quantized one scores lower
on the same prompts, the figures are recomputed from the saved log-probabilities, and a search holds them as a
constraint. Real transformers, torchao, Hydra, MLflow on SQLite and Optuna on the tiny model on the CPU."""

from __future__ import annotations

import json
import re

import optuna
import pytest
from conftest import QUICK, cpu_config, mlflow_runs, run_sweep

from sweep import run
from sweep.config.errors import ConfigError
from sweep.job.plan import make_plan
from sweep.measure.quality import (
    REFERENCE_FILE,
    SCORES_FILE,
    load_reference,
    load_scores,
    position_figures,
    quality_figures,
)

# Four prompts of 16 tokens, each scored on a 32-token greedy continuation: 128 positions (output_len 33 leaves
# the continuation its 32 tokens: one token short of output_len).
SCORED = [
    "workload=throughput",
    "workload.num_requests=4",
    "workload.warmup_requests=0",
    "workload.iterations=1",
    "workload.input_len=16",
    "workload.output_len=33",
    "quality.prompts=4",
    "quality.tokens=32",
]


@pytest.mark.parametrize("backend", ["hf", "compiled"])
def test_an_unquantized_engine_agrees_with_its_reference_and_a_quantized_one_less(tiny_checkpoint, tmp_path, backend):
    def figures(value):
        overrides = [*SCORED, f"backend={backend}", "engine.compile_mode=none", f"engine.quantization={value}"]
        return run(cpu_config(tiny_checkpoint, tmp_path, *overrides)).figures

    plain, int8 = figures("none"), figures("int8_weight_only")
    assert plain["quality_positions"] == int8["quality_positions"] == 128
    assert plain["quality_top1_agreement_pct"] == 100.0 and plain["quality_kl"] < 1e-9
    assert int8["quality_top1_agreement_pct"] < plain["quality_top1_agreement_pct"]
    assert int8["quality_kl"] > 1e-7  # int8 weights: a small but real divergence
    assert int8["model_bytes"] < plain["model_bytes"]
    references = list((tmp_path / "quality").glob(f"*/{REFERENCE_FILE}"))
    assert len(references) == 1  # the same prompts, model, dtype and device: one reference for both runs


def test_position_figures_over_the_vocabulary_and_over_the_top_k():
    import torch

    from sweep.backends.base import TokenScores

    reference = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]).log()
    engine = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.3, 0.2]]).log()
    agree, kl = position_figures(reference, TokenScores(engine))
    assert agree.tolist() == [True, False]
    expected = [sum(p * (p / q).log() for p, q in zip(r.exp(), e.exp())) for r, e in zip(reference, engine)]
    assert kl.tolist() == pytest.approx([float(x) for x in expected], rel=1e-5)
    # The engine's top 2 only, most likely first: both distributions renormalised over those two tokens.
    top = TokenScores(torch.tensor([[0.6, 0.3], [0.5, 0.3]]).log(), torch.tensor([[0, 1], [0, 1]]))
    agree, kl = position_figures(reference, top)
    assert agree.tolist() == [True, False]
    p, q = torch.tensor([0.7, 0.2]) / 0.9, torch.tensor([0.6, 0.3]) / 0.9
    assert kl[0].item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-5)


@pytest.mark.slow
def test_the_cli_records_both_figures_and_they_are_recomputed_from_the_saved_logits(tmp_path):
    first = run_sweep(tmp_path, "engine.quantization=int8_weight_only", *SCORED)
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.search(r"top-1 agreement\s+\d", first.stdout) and re.search(r"KL divergence\s+\d", first.stdout)
    (run_,) = mlflow_runs(tmp_path)
    metrics, tags = run_.data.metrics, run_.data.tags
    assert 0 < metrics["quality_top1_agreement_pct"] < 100 and metrics["quality_kl"] > 0
    assert tags["quality.logits"] == "full" and run_.data.params["engine.quantization"] == "int8_weight_only"

    (out,) = [p.parent for p in (tmp_path / "outputs").glob(f"*/*/{SCORES_FILE}")]
    recorded = json.loads((out / "figures.json").read_text())["figures"]
    recomputed = quality_figures(load_reference(tags["quality.reference"]), load_scores(out / SCORES_FILE))
    for name in ("quality_top1_agreement_pct", "quality_kl", "quality_positions"):
        assert recomputed[name] == pytest.approx(recorded[name], rel=1e-12)
        assert metrics[name] == pytest.approx(recorded[name], rel=1e-4)  # the tracker keeps 5 significant digits

    # The next run of the same prompts reads the reference from the cache.
    second = run_sweep(tmp_path, *SCORED)
    assert second.returncode == 0, second.stderr[-3000:]
    logs = [p.read_text() for p in sorted((tmp_path / "outputs").glob("*/*/sweep.log"))]
    assert ["computing the quality reference" in text for text in logs] == [True, False]
    later = next(r for r in mlflow_runs(tmp_path) if r.info.run_id != run_.info.run_id)
    assert later.data.tags["quality.reference"] == tags["quality.reference"]
    assert later.data.metrics["quality_top1_agreement_pct"] == 100.0


def test_quality_can_be_turned_off_and_a_quality_objective_needs_it(tiny_checkpoint, tmp_path):
    result = run(cpu_config(tiny_checkpoint, tmp_path, *SCORED, "quality.enabled=false"))
    assert not any(name.startswith("quality_") for name in result.figures)
    assert not (tmp_path / "quality").exists()
    with pytest.raises(ConfigError, match=r"objective.metric='quality_kl' is not recorded by this run \(quality"):
        make_plan(cpu_config(tiny_checkpoint, tmp_path, "quality.enabled=false", "objective.metric=quality_kl"))


def test_a_search_holds_quality_as_a_constraint_and_prunes_what_breaks_it(tmp_path):
    # search=quality on the CPU: int4 cannot run here (pruned before building); int8 runs, but its quality_kl is
    # above the bound (infeasible); only the unquantized engine is feasible, so it is the best.
    result = run_sweep(
        tmp_path,
        "-m",
        "search=quality",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.study_name=quality",
        "hydra.sweeper.constraints.quality_kl='<=1e-7'",
        "engine.quantization=choice(none,int8_weight_only,int4_weight_only)",
        "engine.max_batch_size=2",
        *QUICK,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="quality", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    trials = {t.params["engine.quantization"]: t for t in study.trials}
    assert trials["int4_weight_only"].state == optuna.trial.TrialState.PRUNED
    assert "packs int4 for CUDA" in trials["int4_weight_only"].user_attrs["pruned_reason"]
    assert trials["int8_weight_only"].constraints["quality_kl"] > 0  # infeasible
    assert trials["none"].constraints["quality_kl"] <= 0
    assert study.best_trial.params["engine.quantization"] == "none"
    parent = next(r for r in mlflow_runs(tmp_path) if r.data.tags.get("sweep.kind") == "optuna")
    assert parent.data.params["best.engine.quantization"] == "none"
