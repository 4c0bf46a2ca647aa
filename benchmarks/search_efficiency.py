"""How many trials and device-minutes a search needs to come within a few % of the best point the full grid finds.

1. Measure the whole grid once with real runs (`python -m sweep -m`), recorded in MLflow:
   - `--space cpu` (default): 24 build settings of the tiny model on this CPU, measured here;
   - `--space gpu`: 24 build settings of the compiled engine on the Llama-3.1-8B architecture (random bf16 weights):
     run the printed grid command on the GPU machine, then replay its MLflow store with `--store`.
2. Replay the search on those measurements, as the sweeper runs it: for each seed, a sampler asks Optuna for points
   of the same space and reads each point's measured figure and cost (build + load + benchmark) from step 1, until
   a trial comes within --within of the grid's best. "TPE+" is the sweeper's default: TPE, the warm-start point
   first, and a point already measured is reused at no cost instead of run again. Replaying one set of
   measurements keeps the samplers' comparison free of run-to-run noise and costs no further runs.

    python benchmarks/search_efficiency.py [--seeds 5] [--workdir DIR]                 # CPU: measure, then replay
    python benchmarks/search_efficiency.py --space gpu --checkpoint DIR --print-grid-command  # run on a GPU
    python benchmarks/search_efficiency.py --space gpu --store DIR/mlruns/mlflow.db [MORE.db] --within 0.02 --seeds 5
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from hydra_plugins.sweep_optuna_sweeper.space import warm_start_point  # noqa: E402
from sweep.job.compose import compose  # noqa: E402
from sweep.multirun.sweeper_api import WarmStartInputs  # noqa: E402

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
WORKLOADS = {
    "cpu": [
        "workload=throughput",
        "workload.num_requests=32",
        "workload.warmup_requests=2",
        "workload.iterations=1",
        "workload.input_len=32",
        "workload.output_len=16",
        "engine.max_seq_len=64",
        "engine.max_input_len=32",
    ],
    "gpu": [
        "model=llama-3.1-8b",
        "model.path={checkpoint}",  # Llama-3.1-8B's architecture, random bf16 weights (written as gpu_compare.py does)
        "model.dtype=bfloat16",
        "engine.dtype=bfloat16",
        "device=cuda",
        "backend=compiled",
        "backend.scheduler=inflight",
        "engine.compile_mode=none",
        "workload=rate",
        "workload.request_rate=8",
        "workload.num_requests=24",
        "workload.warmup_requests=2",
        "workload.length_distribution=normal",
        "workload.input_len=512",
        "workload.input_len_std=128",
        "workload.output_len=64",
        "workload.output_len_std=16",
        "slo.ttft_ms=500",
        "slo.tpot_ms=50",
        "engine.max_seq_len=1280",
        "engine.max_input_len=1024",
    ],
}


@dataclass
class Point:
    value: float  # the objective
    minutes: float  # device-minutes the point cost: build + load + benchmark


def workload(space: str, checkpoint: str) -> list[str]:
    """The overrides every point of the grid shares (what the sweeper composes as its base config)."""
    return [w.format(checkpoint=checkpoint) for w in WORKLOADS[space]]


def distributions(space: str) -> dict[str, optuna.distributions.BaseDistribution]:
    return {k: optuna.distributions.CategoricalDistribution(v) for k, v in SPACES[space].items()}


def grid_command(space: str, checkpoint: str) -> list[str]:
    sweeps = [f"{k}={','.join(map(str, v))}" for k, v in SPACES[space].items()]
    return [sys.executable, "-m", "sweep", "-m", *workload(space, checkpoint), *sweeps]


def measure_grid(workdir: Path, space: str, checkpoint: str) -> Path:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(grid_command(space, checkpoint), cwd=workdir, env=env, check=True, stdout=subprocess.DEVNULL)
    return workdir / "mlruns" / "mlflow.db"


def finished_runs(store: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("sweep").experiment_id
    return client.search_runs([experiment], "attributes.status = 'FINISHED'", max_results=10_000)


def read_grid(stores: list[Path], space: str, metric: str) -> tuple[dict[tuple, Point], WarmStartInputs | None]:
    """Every point of the space from the finished runs of MLflow stores (a grid measured in parts: one store per
    part), and what a warm start would know."""
    runs = [run for store in stores for run in finished_runs(store)]
    keys = SPACES[space]
    measured: dict[tuple, list[Point]] = {}
    warm = None
    for run in runs:
        m, p = run.data.metrics, run.data.params
        if metric not in m or any(k not in p for k in keys):
            continue
        key = tuple(type(v[0])(p[k]) if not isinstance(v[0], bool) else p[k] == "True" for k, v in keys.items())
        seconds = sum(m.get(f"phase_{phase}_s", 0.0) for phase in ("prepare", "build", "load", "benchmark"))
        measured.setdefault(key, []).append(Point(m[metric], seconds / 60))
        gpu_gb = run.data.tags.get("env.gpu_memory_total_gb")
        free = float(gpu_gb) * 1e9 if gpu_gb else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        warm = WarmStartInputs(
            free,
            "GPU memory" if gpu_gb else "host memory",
            int(m["model_bytes"]),
            int(m["kv_bytes_per_token"]),
            int(p["workload.input_len"]),
            int(p["workload.output_len"]),
        )
    missing = set(itertools.product(*keys.values())) - set(measured)
    if missing:
        raise SystemExit(f"the grid is incomplete, no {metric} for {sorted(missing)}")
    grid = {}
    for key, points in measured.items():  # a point measured twice (a part re-run) counts as the mean of both
        grid[key] = Point(statistics.mean(p.value for p in points), statistics.mean(p.minutes for p in points))
        if len(points) > 1:
            values = ", ".join(f"{p.value:.2f}" for p in points)
            print(f"{dict(zip(keys, key))} measured {len(points)} times: {metric} {values}; the mean is replayed")
    return grid, warm


def replay(sampler, grid, space: str, target: float, warm: dict | None, reuse: bool, cap: int) -> tuple[int, float]:
    """(trials, device-minutes) until a trial reaches target; a reused point costs nothing."""
    keys = SPACES[space]
    study = optuna.create_study(direction="maximize", sampler=sampler)
    if warm:
        study.enqueue_trial(warm)
    points = distributions(space)
    measured: set[tuple] = set()
    minutes = 0.0
    for n in range(1, cap + 1):
        trial = study.ask(points)
        key = tuple(trial.params[k] for k in keys)
        if not (reuse and key in measured):
            minutes += grid[key].minutes
            measured.add(key)
        study.tell(trial, grid[key].value)
        if grid[key].value >= target:
            return n, minutes
    return cap + 1, minutes  # not reached within the cap


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--space", choices=sorted(SPACES), default="cpu")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--within", type=float, default=0.05, help="target: within this share of the grid's best")
    parser.add_argument("--metric", default="output_throughput_tok_s", help="the objective (maximised)")
    parser.add_argument("--workdir", type=Path, default=None, help="measure the grid here (default: a new temp dir)")
    parser.add_argument(
        "--store", type=Path, nargs="+", default=None, help="replay these mlflow.db files instead of measuring"
    )
    parser.add_argument("--print-grid-command", action="store_true", help="print the grid's command and exit")
    parser.add_argument("--checkpoint", default="CHECKPOINT", help="--space gpu: the random-weight checkpoint dir")
    args = parser.parse_args()
    if args.print_grid_command:
        print("python " + " ".join(grid_command(args.space, args.checkpoint)[1:]))
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    stores = args.store
    if stores is None:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sweep-search-"))
        workdir.mkdir(parents=True, exist_ok=True)
        stores = [measure_grid(workdir, args.space, args.checkpoint)]
    grid, inputs = read_grid(stores, args.space, args.metric)
    keys = SPACES[args.space]
    best_key = max(grid, key=lambda k: grid[k].value)
    target = (1 - args.within) * grid[best_key].value
    within = sum(p.value >= target for p in grid.values())
    grid_minutes = sum(p.minutes for p in grid.values())
    defaults = compose(workload(args.space, args.checkpoint))  # the base config the sweeper's warm start reads
    warm = warm_start_point(distributions(args.space), inputs, defaults)
    print(f"grid: {len(grid)} points in {', '.join(map(str, stores))}, {grid_minutes:.1f} device-minutes")
    print(
        f"best: {dict(zip(keys, best_key))} at {grid[best_key].value:.1f}; target ({1 - args.within:.0%}) "
        f"{target:.1f}; {within} of {len(grid)} points reach it; warm start {warm}\n"
    )
    cap = 4 * len(grid)
    rows = []
    for seed in range(args.seeds):
        rows.append(
            (
                seed,
                replay(optuna.samplers.TPESampler(seed=seed), grid, args.space, target, warm, True, cap),
                replay(optuna.samplers.TPESampler(seed=seed), grid, args.space, target, None, False, cap),
                replay(optuna.samplers.RandomSampler(seed=seed), grid, args.space, target, None, False, cap),
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
