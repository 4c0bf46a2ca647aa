"""How long `python -m sweep` takes on the tiny model, and how much of it is sweep's own overhead.

Runs the default main job N times in a fresh directory (the first run generates the tiny checkpoint and creates
the MLflow database; later runs hit the engine cache), times each whole process, and splits it with the phase
timings the run records in MLflow. Overhead = wall time - model load - generation (warm-up + measured
iterations) - the one-off import of torch and transformers, which is measured separately in a bare process.

    python benchmarks/cli_overhead.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    workdir = Path(tempfile.mkdtemp(prefix="sweep-overhead-"))
    bare = timed([sys.executable, "-c", "pass"], workdir)
    imports = (
        timed(
            [sys.executable, "-c", "import torch, transformers; from transformers import AutoModelForCausalLM"], workdir
        )
        - bare
    )
    walls = [timed([sys.executable, "-m", "sweep"], workdir) for _ in range(args.runs)]
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    runs = sorted(
        client.search_runs([client.get_experiment_by_name("sweep").experiment_id]), key=lambda r: r.info.start_time
    )

    header = (
        f"{'run':<10}{'wall s':>8}{'load s':>8}{'gen s':>8}{'imports s':>11}{'overhead s':>12}"
        f"{'prepare':>9}{'build':>7}{'record':>8}"
    )
    print(header + "\n" + "-" * len(header))
    for i, (wall, run) in enumerate(zip(walls, runs)):
        m = run.data.metrics
        overhead = wall - m["phase_load_s"] - m["phase_benchmark_s"] - imports
        label = "cold" if i == 0 else f"warm {i}"
        print(
            f"{label:<10}{wall:>8.2f}{m['phase_load_s']:>8.2f}{m['phase_benchmark_s']:>8.2f}{imports:>11.2f}"
            f"{overhead:>12.2f}{m['phase_prepare_s']:>9.2f}{m['phase_build_s']:>7.2f}{m['phase_record_s']:>8.2f}"
        )
    print(f"\npython start-up alone: {bare:.2f} s; workdir: {workdir}")


if __name__ == "__main__":
    main()
