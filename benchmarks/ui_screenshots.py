"""Screenshots of the MLflow UI as a new user sees it: the experiment's runs table, a sweep's parent run and its
best child run, in a 1920x1080 window (what shows without scrolling on a common screen).

Starts `mlflow ui` on the store (default: ./mlruns/mlflow.db, what `python -m sweep` records into), opens the
URLs sweep prints in headless Chromium (the Debian package `chromium`: `apt-get install -y chromium`) and saves
PNG files. It checks what a user would: that the URLs open the model-training view with the runs and the default
columns, not the GenAI traces page.

    python -m sweep -m workload=throughput engine.max_batch_size=1,2,4    # something to look at
    python benchmarks/ui_screenshots.py --out docs/
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

from trackers.mlflow_tracker import UI_QUERY

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(uri: str, port: int) -> subprocess.Popen:
    ui = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return ui
        except OSError:
            if ui.poll() is not None:
                raise SystemExit(f"mlflow ui exited with status {ui.returncode}") from None
            time.sleep(1)
    ui.terminate()
    raise SystemExit("mlflow ui did not answer within 120 s")


def screenshot(browser: str, url: str, path: Path, size: str) -> Path:
    """The page after its scripts ran: Chromium waits up to 20 s of virtual time for the app to load."""
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={size}",
            "--virtual-time-budget=20000",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    return path


def pages(client: MlflowClient, base: str, experiment: str) -> dict[str, str]:
    """The experiment's runs table and its latest sweep's parent run, as sweep prints their URLs."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in this store: run `python -m sweep` first")
    eid = exp.experiment_id
    found = {"mlflow_runs_table": f"{base}/#/experiments/{eid}/runs?{UI_QUERY}"}
    parents = client.search_runs([eid], "tags.`sweep.kind` != ''", order_by=["attributes.start_time DESC"])
    if parents:
        parent = parents[0].info.run_id
        found["mlflow_sweep_run"] = f"{base}/#/experiments/{eid}/runs/{parent}?{UI_QUERY}"
        children = client.search_runs(
            [eid], f"tags.`mlflow.parentRunId` = '{parent}'", order_by=["metrics.output_throughput_tok_s DESC"]
        )
        if children:
            found["mlflow_child_run"] = f"{base}/#/experiments/{eid}/runs/{children[0].info.run_id}?{UI_QUERY}"
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="mlruns/mlflow.db", help="the SQLite store sweep recorded into")
    parser.add_argument("--experiment", default="sweep")
    parser.add_argument("--out", default="docs", help="directory for the PNG files")
    parser.add_argument("--size", default="1920,1080", help="browser window, width,height")
    args = parser.parse_args()

    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        print("error: no Chromium found; install it with: apt-get install -y chromium", file=sys.stderr)
        return 2
    store = Path(args.store).resolve()
    if not store.is_file():
        print(f"error: no MLflow store at {store}; run `python -m sweep` first", file=sys.stderr)
        return 2
    uri = f"sqlite:///{store}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ui = start_ui(uri, port)
    try:
        for name, url in pages(MlflowClient(uri), f"http://127.0.0.1:{port}", args.experiment).items():
            path = screenshot(browser, url, out / f"{name}.png", args.size)
            print(f"{path}  ({path.stat().st_size // 1024} KiB)  {url}")
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
