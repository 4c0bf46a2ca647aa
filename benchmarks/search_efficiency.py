"""How many trials and device-minutes a search needs to come within a few % of the best point the full grid finds.

1. Measure the whole grid once with real runs (`python -m sweep -m +experiment=search_efficiency_<space> ...`),
   recorded in MLflow, and the sweeper's warm start once (`hydra/sweeper=optuna hydra.sweeper.n_trials=1` on the
   same space: its first trial is the point its memory heuristic picks, recorded in its Optuna study beside the store):
   - `--space cpu` (default): 24 build settings of the tiny model on this CPU, measured here;
   - `--space gpu`: 24 build settings of the compiled engine on the Llama-3.1-8B architecture (random bf16 weights):
     run the printed commands on the GPU machine, then replay its MLflow store with `--store`.
2. Replay the search on those measurements, as the sweeper runs it: for each seed, a sampler asks Optuna for points
   of the same space and reads each point's measured figure and cost (build + load + benchmark) from step 1, until
   a trial comes within --within of the grid's best. "TPE+" is the sweeper's default: TPE, the warm-start point
   first, and a point already measured is reused at no cost instead of run again. Replaying one set of
   measurements keeps the samplers' comparison free of run-to-run noise and costs no further runs.

    python benchmarks/search_efficiency.py [--seeds 5] [--workdir DIR]                  # CPU: measure, then replay
    python benchmarks/search_efficiency.py --space gpu --workdir DIR --print-commands    # run these on a GPU
    python benchmarks/search_efficiency.py --space gpu --store DIR/mlruns/mlflow.db [MORE.db] --within 0.02 --seeds 5

`--values KEY=A,B` narrows a key of the space (a rehearsal on fewer points).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import optuna

from sweep.multirun.sweeper_api import STUDY_TAG

SPACES = {
    "cpu": {
        "engine.max_batch_size": [1, 2, 4, 8, 16, 32],
        "engine.attn_implementation": ["eager", "sdpa"],
        "engine.dtype": ["float32", "bfloat16"],
    },
    # In flight under an offered load, eager decode steps (compile_mode none: a build is seconds, so the grid fits
    # in one GPU call): rows, the prefill token budget per step, and whether decode replays CUDA graphs.
    "gpu": {
        "engine.max_batch_size": [4, 8, 16, 32],
        "engine.max_num_tokens": [128, 512, 2048],
        "engine.cuda_graphs": [True, False],
    },
}
WARM_START_STUDY = "warm-start"  # the one-trial search whose first trial is the sweeper's warm start


@dataclass
class Point:
    value: float  # the objective
    minutes: float  # device-minutes the point cost: build + load + benchmark


def narrowed(space: dict[str, list], values: list[str]) -> dict[str, list]:
    """The space with each KEY=A,B of --values keeping only those of its values."""
    space = dict(space)
    for item in values:
        key, allowed = item.split("=", 1)
        if key not in space:
            raise SystemExit(f"--values {item}: {key} is not a key of the space ({', '.join(space)})")
        space[key] = [v for v in space[key] if str(v) in allowed.split(",")]
    return space


def distributions(space: dict[str, list]) -> dict[str, optuna.distributions.BaseDistribution]:
    return {k: optuna.distributions.CategoricalDistribution(v) for k, v in space.items()}


def commands(name: str, space: dict[str, list], workdir: Path, extra: list[str]) -> list[list[str]]:
    """The grid, then the sweeper's warm start on the same space, into one MLflow store (and its Optuna study beside
    it, where the sweeper keeps studies by default)."""
    store = workdir / "mlruns"
    common = [sys.executable, "-m", "sweep", "-m", f"+experiment=search_efficiency_{name}"]
    common += [f"cache_dir={workdir / 'engines_cache'}", f"tracker.uri=sqlite:///{store / 'mlflow.db'}", *extra]
    grid = [*common, f"hydra.sweep.dir={workdir / 'grid'}"]
    grid += [f"{k}={','.join(map(str, v))}" for k, v in space.items()]
    warm = [*common, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1", f"hydra.sweeper.study_name={WARM_START_STUDY}"]
    warm += [f"hydra.sweeper.storage=sqlite:///{store / 'optuna.db'}", f"hydra.sweep.dir={workdir / 'warm_start'}"]
    warm += [f"hydra.sweeper.best_config_dir={workdir / 'best'}"]
    warm += [f"{k}=choice({','.join(map(str, v))})" for k, v in space.items()]
    return [grid, warm]


def finished_runs(store: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("sweep").experiment_id
    return client.search_runs([experiment], "attributes.status = 'FINISHED'", max_results=10_000)


def read_grid(stores: list[Path], space: dict[str, list], metric: str) -> dict[tuple, Point]:
    """Every point of the space from the grid's finished runs in MLflow stores (a grid measured in parts: one store
    per part); the warm start's run, a search trial, is not one of them."""
    measured: dict[tuple, list[Point]] = {}
    for run in (run for store in stores for run in finished_runs(store)):
        m, p = run.data.metrics, run.data.params
        if STUDY_TAG in run.data.tags or metric not in m or any(k not in p for k in space):
            continue
        key = tuple(type(v[0])(p[k]) if not isinstance(v[0], bool) else p[k] == "True" for k, v in space.items())
        if key not in itertools.product(*space.values()):
            continue  # a point outside a narrowed space
        seconds = sum(m.get(f"phase_{phase}_s", 0.0) for phase in ("prepare", "build", "load", "benchmark"))
        measured.setdefault(key, []).append(Point(m[metric], seconds / 60))
    missing = set(itertools.product(*space.values())) - set(measured)
    if missing:
        raise SystemExit(f"the grid is incomplete, no {metric} for {sorted(missing)}")
    grid = {}
    for key, points in measured.items():  # a point measured twice (a part re-run) counts as the mean of both
        grid[key] = Point(statistics.mean(p.value for p in points), statistics.mean(p.minutes for p in points))
        if len(points) > 1:
            values = ", ".join(f"{p.value:.2f}" for p in points)
            print(f"{dict(zip(space, key))} measured {len(points)} times: {metric} {values}; the mean is replayed")
    return grid


def warm_start(stores: list[Path]) -> dict | None:
    """The sweeper's warm-start point: the first trial of its warm-start study, when the sweeper enqueued it."""
    for store in stores:
        storage = store.parent / "optuna.db"
        if not storage.is_file():
            continue
        try:
            first = optuna.load_study(study_name=WARM_START_STUDY, storage=f"sqlite:///{storage}").trials[0]
        except (KeyError, IndexError):  # no such study, or no trial in it
            continue
        if "warm_start" in first.user_attrs:
            return first.params
    return None


def replay(sampler, grid, space: dict, target: float, warm: dict | None, reuse: bool, cap: int) -> tuple[int, float]:
    """(trials, device-minutes) until a trial reaches target; a reused point costs nothing."""
    study = optuna.create_study(direction="maximize", sampler=sampler)
    if warm:
        study.enqueue_trial(warm)
    points = distributions(space)
    measured: set[tuple] = set()
    minutes = 0.0
    for n in range(1, cap + 1):
        trial = study.ask(points)
        key = tuple(trial.params[k] for k in space)
        if not (reuse and key in measured):
            minutes += grid[key].minutes
            measured.add(key)
        study.tell(trial, grid[key].value)
        if grid[key].value >= target:
            return n, minutes
    return cap + 1, minutes  # not reached within the cap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", choices=sorted(SPACES), default="cpu")
    parser.add_argument("--values", nargs="*", default=[], help="KEY=A,B: only these values of a key of the space")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--within", type=float, default=0.05, help="target: within this share of the grid's best")
    parser.add_argument("--metric", default="output_throughput_tok_s", help="the objective (maximised)")
    parser.add_argument("--workdir", type=Path, default=None, help="measure the grid here (default: a new temp dir)")
    parser.add_argument("--store", type=Path, nargs="+", default=None, help="replay these mlflow.db files")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    parser.add_argument("--print-commands", action="store_true", help="print the measuring commands and exit")
    args = parser.parse_args()
    space = narrowed(SPACES[args.space], args.values)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="sweep-search-"))).resolve()
    if args.print_commands:
        for command in commands(args.space, space, workdir, args.extra):
            print("python " + " ".join(f"'{c}'" if "(" in c else c for c in command[1:]))
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    stores = args.store
    if stores is None:
        workdir.mkdir(parents=True, exist_ok=True)
        for command in commands(args.space, space, workdir, args.extra):
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        stores = [workdir / "mlruns" / "mlflow.db"]
    grid = read_grid(stores, space, args.metric)
    warm = warm_start(stores)
    best_key = max(grid, key=lambda k: grid[k].value)
    target = (1 - args.within) * grid[best_key].value
    within = sum(p.value >= target for p in grid.values())
    grid_minutes = sum(p.minutes for p in grid.values())
    print(f"grid: {len(grid)} points in {', '.join(map(str, stores))}, {grid_minutes:.1f} device-minutes")
    print(
        f"best: {dict(zip(space, best_key))} at {grid[best_key].value:.1f}; target ({1 - args.within:.0%}) "
        f"{target:.1f}; {within} of {len(grid)} points reach it; warm start {warm or 'none recorded'}\n"
    )
    cap = 4 * len(grid)
    rows = []
    for seed in range(args.seeds):
        rows.append(
            (
                seed,
                replay(optuna.samplers.TPESampler(seed=seed), grid, space, target, warm, True, cap),
                replay(optuna.samplers.TPESampler(seed=seed), grid, space, target, None, False, cap),
                replay(optuna.samplers.RandomSampler(seed=seed), grid, space, target, None, False, cap),
            )
        )
    names = ("TPE+ (warm, no repeats)", "TPE", "random")
    print(f"{'seed':>6}  " + "  ".join(f"{n:>24}" for n in names) + "   (trials / device-minutes)")
    for seed, *results in rows:
        print(f"{seed:>6}  " + "  ".join(f"{t:>14} / {m:7.1f}" for t, m in results))
    medians = [(statistics.median(r[i][0] for r in rows), statistics.median(r[i][1] for r in rows)) for i in (1, 2, 3)]
    print(f"{'median':>6}  " + "  ".join(f"{t:>14} / {m:7.1f}" for t, m in medians))
    print(
        f"\nTPE+ median device-minutes: {medians[0][1]:.1f} = {medians[0][1] / grid_minutes:.0%} of the grid's "
        f"{grid_minutes:.1f} (target: at most 25%)"
    )
    print(f"(expected trials for uniform random draws with replacement: {len(grid) / within:.1f})")


if __name__ == "__main__":
    main()
