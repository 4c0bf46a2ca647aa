"""Scale-out of a search over workers: the same grid on the tiny model (conf/experiment/scale_out.yaml: 8 build
settings, Optuna's grid sampler) with 1 worker, then with 2.

Each configuration is one real command, `python -m sweep -m +experiment=scale_out hydra.sweeper.workers=N`, with its
own Optuna study on SQLite and MLflow store under --work, timed from start to exit. Every worker runs torch on one
thread (OMP_NUM_THREADS=1), as a worker on a GPU machine owns one GPU: on two free cores, two workers should take a
little over half the time of one (the start-up and the last, unshared trial do not split). The search time (first
trial asked to last trial told, from the study) is given beside the wall time, as it leaves Python's start-up out.
The trials' seconds summed over workers show whether each worker had a core of its own: on a machine busy with
other work they grow with the workers, and the ratios move towards 1. So does the machine's own check, taken
before each configuration: how much longer two single-thread matmul loops take at once than one alone (1.0 when
two cores are free, 2.0 when only one is).

    python benchmarks/scale_out.py [--workers 1 2] [--work build/scale_out] [--out benchmarks/results] [--extra ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna

SPIN = """
import time, torch
torch.set_num_threads(1)
a = torch.randn(256, 256)
started = time.perf_counter()
for _ in range(3000):
    a @ a
print(time.perf_counter() - started)
"""


def two_at_once_slowdown() -> float:
    """How much longer two single-thread compute loops take side by side than one alone: the cores free now."""
    alone = float(subprocess.run([sys.executable, "-c", SPIN], capture_output=True, text=True, check=True).stdout)
    pair = [subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    together = [float(p.communicate()[0]) for p in pair]
    return sum(together) / 2 / alone


def search(workers: int, work: Path, extra: list[str]) -> dict:
    work.mkdir(parents=True)
    study, storage = f"scale-out-{workers}", f"sqlite:///{work / 'optuna.db'}"
    command = [sys.executable, "-m", "sweep", "-m", "+experiment=scale_out", f"hydra.sweeper.workers={workers}"]
    command += [f"hydra.sweeper.study_name={study}", f"hydra.sweeper.storage={storage}"]
    command += [f"hydra.sweeper.best_config_dir={work / 'best'}", f"hydra.sweep.dir={work / 'multirun'}"]
    command += [f"cache_dir={work / 'engines_cache'}", f"tracker.uri=sqlite:///{work / 'mlflow.db'}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    slowdown = two_at_once_slowdown()
    load_before = os.getloadavg()
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall_s = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"{workers} worker(s) failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    # The grid sampler queues every point of the grid; hydra.sweeper.n_trials of them run
    trials = [t for t in optuna.load_study(study_name=study, storage=storage).trials if t.datetime_complete]
    first = min(t.datetime_start for t in trials)
    last = max(t.datetime_complete for t in trials)
    return {
        "workers": workers,
        "trials": len(trials),
        "complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials),
        "by_worker": count_by_worker(trials),
        "wall_s": wall_s,
        "search_s": (last - first).total_seconds(),
        "trial_s_sum": sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials),
        "two_at_once_slowdown": slowdown,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }


def count_by_worker(trials: list) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.user_attrs["worker"]] = counts.get(trial.user_attrs["worker"], 0) + 1
    return counts


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        "| workers | trials (complete) | trials per worker | wall (s) | wall ratio | search (s) | search ratio "
        "| trial-seconds summed | two loops at once / one | load average before → after |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        per_worker = ", ".join(str(n) for n in sorted(r["by_worker"].values(), reverse=True))
        lines.append(
            f"| {r['workers']} | {r['trials']} ({r['complete']}) | {per_worker} | {r['wall_s']:.1f} "
            f"| {r['wall_s'] / base['wall_s']:.2f} | {r['search_s']:.1f} | {r['search_s'] / base['search_s']:.2f} "
            f"| {r['trial_s_sum']:.1f} | {r['two_at_once_slowdown']:.2f} "
            f"| {r['load_before'][0]:.1f} → {r['load_after'][0]:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work", type=Path, default=Path("build/scale_out"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every search")
    args = parser.parse_args()
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    rows = [search(n, work / f"workers-{n}", args.extra) for n in args.workers]
    header = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs: see the load averages)",
        "torch_threads_per_worker": 1,
        "storage": "sqlite (one host)",
        "tracker": "mlflow on sqlite",
        "experiment": "scale_out",
        "extra": args.extra,
    }
    text = table(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_out_cpu.json").write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")
    (args.out / "scale_out_cpu.md").write_text(f"{json.dumps(header)}\n\n{text}\n")


if __name__ == "__main__":
    main()
