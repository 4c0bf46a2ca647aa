"""How many trials TPE needs, against random search, to come within 5% of the best throughput the full grid finds.

1. Measure the whole grid once with real runs: `python -m sweep -m` over 24 build settings of the tiny model on
   the CPU (engine.max_batch_size x attn_implementation x dtype), recorded in MLflow.
2. Replay the search: for each seed, TPE and random ask Optuna for points of the same space and read each
   point's measured throughput from step 1, until a trial reaches 95% of the grid's best. Replaying the grid's
   measurements keeps the samplers' comparison free of run-to-run noise and costs no further runs.

    python benchmarks/search_efficiency.py [--seeds 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parent.parent
SPACE = {
    "engine.max_batch_size": [1, 2, 4, 8, 16, 32],
    "engine.attn_implementation": ["eager", "sdpa"],
    "engine.dtype": ["float32", "bfloat16"],
}
WORKLOAD = [
    "workload=throughput",
    "workload.num_requests=32",
    "workload.warmup_requests=2",
    "workload.iterations=1",
    "workload.input_len=32",
    "workload.output_len=16",
    "engine.max_seq_len=64",
    "engine.max_input_len=32",
]


def measure_grid(workdir: Path) -> dict[tuple, float]:
    sweeps = [f"{k}={','.join(map(str, v))}" for k, v in SPACE.items()]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(
        [sys.executable, "-m", "sweep", "-m", *WORKLOAD, *sweeps],
        cwd=workdir,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id], "attributes.status = 'FINISHED'")
    grid = {}
    for run in runs:
        if "output_throughput_tok_s" in run.data.metrics:
            key = tuple(type(v[0])(run.data.params[k]) for k, v in SPACE.items())
            grid[key] = run.data.metrics["output_throughput_tok_s"]
    missing = set(itertools.product(*SPACE.values())) - set(grid)
    if missing:
        raise SystemExit(f"the grid is incomplete, no figures for {sorted(missing)}")
    return grid


def trials_to_target(sampler: optuna.samplers.BaseSampler, grid: dict[tuple, float], target: float, cap: int) -> int:
    study = optuna.create_study(direction="maximize", sampler=sampler)
    distributions = {k: optuna.distributions.CategoricalDistribution(v) for k, v in SPACE.items()}
    for n in range(1, cap + 1):
        trial = study.ask(distributions)
        value = grid[tuple(trial.params[k] for k in SPACE)]
        study.tell(trial, value)
        if value >= target:
            return n
    return cap + 1  # not reached within the cap


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="reuse a directory that holds a measured grid")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sweep-search-"))
    workdir.mkdir(parents=True, exist_ok=True)
    grid = measure_grid(workdir)
    best_key = max(grid, key=grid.get)
    target = 0.95 * grid[best_key]
    within = sum(v >= target for v in grid.values())
    print(f"grid: {len(grid)} points measured in {workdir}")
    print(
        f"best: {dict(zip(SPACE, best_key))} at {grid[best_key]:.1f} tok/s; target (95%) {target:.1f} tok/s; "
        f"{within} of {len(grid)} points reach it\n"
    )
    cap = 4 * len(grid)
    rows = []
    for seed in range(args.seeds):
        tpe = trials_to_target(optuna.samplers.TPESampler(seed=seed), grid, target, cap)
        rnd = trials_to_target(optuna.samplers.RandomSampler(seed=seed), grid, target, cap)
        rows.append((seed, tpe, rnd))
    print(f"{'seed':>4}  {'TPE trials':>10}  {'random trials':>13}")
    for seed, tpe, rnd in rows:
        print(f"{seed:>4}  {tpe:>10}  {rnd:>13}")
    print(f"{'median':>4}  {statistics.median(r[1] for r in rows):>10}  {statistics.median(r[2] for r in rows):>13}")
    print(f"\n(expected for uniform random draws with replacement: {len(grid) / within:.1f} trials)")


if __name__ == "__main__":
    main()
