"""How long `python -m sweep` takes on the tiny model, and how much of it is sweep's own overhead.

Runs the default main job N times into a fresh directory (the first run writes the tiny checkpoint and creates the
MLflow database; later runs hit the engine cache), times each whole process, and splits it with the phase timings
the run leaves in its output directory (the figures a sweeper reads, sweep.multirun.sweeper_api.read_result).
Overhead = wall time - model load - generation (warm-up + measured iterations) - the one-off import of torch and
transformers, which is measured separately in a bare process.

With --console it times what answers at once instead: `--help`, a value out of range, a Hydra error (an unknown
option) and a grid with a point out of range, each the fastest of N processes, wall and CPU seconds; --repo times
another checkout the same way (a before/after comparison).

    python benchmarks/cli_overhead.py [--runs 3] [--work DIR]
    python benchmarks/cli_overhead.py --console [--runs 5] [--repo /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sweep.multirun.sweeper_api import read_result

REPO = Path(__file__).resolve().parent.parent
# The console's answers that need no engine: each must come back in about a second.
CONSOLE_COMMANDS = {
    "--help": ["--help"],
    "a bad value": ["engine.max_batch_size=0"],
    "a Hydra error": ["backend=no_such_backend"],
    "a bad grid point": ["-m", "engine.max_batch_size=0,2", "tracker=none"],
}


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def timed_with_cpu(command: list[str], cwd: Path, repo: Path) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) of one process of `repo`'s code; CPU time hardly moves when the host is
    busy. Its exit status is not checked: the console's answers to bad input exit 2."""
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def console(runs: int, repos: list[Path]) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sweep-console-"))
    header = f"{'command':<16}" + "".join(f"{'wall s':>10}{'cpu s':>8}     " for _ in repos)
    print("\n".join(f"[{i}] {repo}" for i, repo in enumerate(repos)))
    print(header + "\n" + "-" * len(header))
    for label, args in CONSOLE_COMMANDS.items():
        row = f"{label:<16}"
        for i, repo in enumerate(repos):
            samples = [timed_with_cpu([sys.executable, "-m", "sweep", *args], workdir, repo) for _ in range(runs)]
            row += f"{min(w for w, _ in samples):>10.2f}{min(c for _, c in samples):>8.2f}  [{i}]"
        print(row)
    bare = timed([sys.executable, "-c", "pass"])
    print(f"\nthe fastest of {runs} processes each; python start-up alone: {bare:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="a new directory (default: a fresh temporary one)")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    parser.add_argument("--console", action="store_true", help="time --help and config errors instead of a run")
    parser.add_argument("--repo", type=Path, action="append", default=[], help="another checkout to time too")
    args = parser.parse_args()
    if args.console:
        console(args.runs, [REPO, *args.repo])
        return
    work = (args.work or Path(tempfile.mkdtemp(prefix="sweep-overhead-"))).resolve()
    bare = timed([sys.executable, "-c", "pass"])
    imports = timed([sys.executable, "-c", "import torch, transformers; from transformers import AutoModelForCausalLM"])
    imports -= bare
    store = f"tracker.uri=sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    rows = []
    for i in range(args.runs):
        out = work / f"run-{i}"
        command = [sys.executable, "-m", "sweep", f"cache_dir={work / 'engines_cache'}", store, f"hydra.run.dir={out}"]
        rows.append((timed([*command, *args.extra]), read_result(out).figures))

    header = (
        f"{'run':<10}{'wall s':>8}{'load s':>8}{'gen s':>8}{'imports s':>11}{'overhead s':>12}"
        f"{'prepare':>9}{'build':>7}{'record':>8}"
    )
    print(header + "\n" + "-" * len(header))
    for i, (wall, m) in enumerate(rows):
        overhead = wall - m["phase_load_s"] - m["phase_benchmark_s"] - imports
        label = "cold" if i == 0 else f"warm {i}"
        print(
            f"{label:<10}{wall:>8.2f}{m['phase_load_s']:>8.2f}{m['phase_benchmark_s']:>8.2f}{imports:>11.2f}"
            f"{overhead:>12.2f}{m['phase_prepare_s']:>9.2f}{m['phase_build_s']:>7.2f}{m['phase_record_s']:>8.2f}"
        )
    print(f"\npython start-up alone: {bare:.2f} s; work directory: {work}")


if __name__ == "__main__":
    main()
