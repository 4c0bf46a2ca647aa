"""`python -m sweep.report`: the comparison report of a sweep, or of any runs, from the tracking store.

Reads runs from MLflow into pandas (the children of a sweep's parent run, a study's trials, or any runs by id) and
writes a report to paste into a PR: `comparison.md`, `comparison.csv`, `runs.csv` and PNG plots. With a parent
run, the files are logged to it under report/.

    python -m sweep.report                       # the latest sweep in the default store
    python -m sweep.report --study throughput-tiny-hf
    python -m sweep.report --runs ID1,ID2,ID3 --baseline ID1
    python -m sweep.report --objective ttft_ms_p99   # rank by another figure (its better direction unless given)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sweep.report.build import build_report
from sweep.report.errors import ReportError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweep.report", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns/mlflow.db)"
    )
    p.add_argument("--experiment", default="sweep")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--parent", help="a sweep's parent run id")
    pick.add_argument("--study", help="the Optuna study name of a sweep")
    pick.add_argument("--runs", help="comma-separated run ids")
    p.add_argument("--baseline", help="run id of the baseline (default: an hf run, else the first run)")
    p.add_argument(
        "--objective",
        default=None,
        help="figure that ranks the runs (default: the sweep's objective, as its parent or its runs recorded it)",
    )
    p.add_argument(
        "--direction", default=None, choices=("maximize", "minimize"), help="with --objective (default: its better way)"
    )
    p.add_argument(
        "--slo-target",
        type=float,
        default=None,
        metavar="PCT",
        help="SLO attainment (%%) a rate of a load sweep must reach to hold (default: the sweep's, else 99)",
    )
    p.add_argument("--out", default="reports", help="output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    from trackers.mlflow_tracker import default_uri

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = build_report(
            args.uri or default_uri(),
            args.experiment,
            Path(args.out),
            parent_id=args.parent,
            study=args.study,
            run_ids=[rid.strip() for rid in args.runs.split(",") if rid.strip()] if args.runs else None,
            baseline_id=args.baseline,
            objective=args.objective,
            direction=args.direction,
            slo_target_pct=args.slo_target,
        )
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report written to {Path(args.out).resolve()}: {', '.join(report.files)}")
    return 0
