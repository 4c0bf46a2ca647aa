"""Hydra's side of the config: the schemas in its ConfigStore, and one compose helper for tests and benchmarks."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Iterable

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sweep.backends.registry import BACKENDS
from sweep.config import SweepConfig
from sweep.figures import FIGURES

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def register_configs() -> None:
    # ${sweep_id:} in hydra.run.dir and hydra.sweep.dir: two commands started in the same second get their own
    # output directories. Cached, like ${now:}, so every job of a sweep sees the same value.
    OmegaConf.register_new_resolver("sweep_id", lambda: secrets.token_hex(3), use_cache=True, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="sweep_schema", node=SweepConfig)  # types model, engine, workload, tracker and objective
    # The backend node's type depends on the backend chosen: each backend YAML pulls in its own schema.
    for name, spec in BACKENDS.items():
        cs.store(group="backend", name=f"{name}_schema", node=spec.config_class)
    cs.store(group="hydra/help", name="sweep", node={"app_name": "sweep", "template": help_text()})


def help_text() -> str:
    """`python -m sweep --help`: the groups and config as Hydra lists them, plus backends and figures by name."""
    backends = "\n".join(f"  {name:<10} {spec.summary}" for name, spec in BACKENDS.items())
    figures = "\n".join(
        f"  {f.name + ('_<stat>' if f.distribution else ''):<36} {f.unit or '-':<6} {f.better or '-':<7} {f.meaning}"
        for f in FIGURES
    )
    return f"""sweep: build (or reuse) an LLM inference engine, benchmark it, record it in MLflow.

  python -m sweep [group=option ...] [key=value ...]      one run
  python -m sweep -m key=a,b,c                            a grid: one MLflow child run per point
  python -m sweep -m search=throughput                    an Optuna search (conf/search/, hydra.sweeper.*)

== Config groups (choose one option each) ==
$APP_CONFIG_GROUPS
Backend schemas (*_schema) are internal; choose a backend by its name:
{backends}

== Figures: objective.metric, hydra.sweeper.objectives and .constraints take these names ==
Per-request figures are recorded as <name>_<stat>, stat one of p50 p90 p95 p99 mean stdev min max.
  {"name":<36} {"unit":<6} {"better":<7} meaning
{figures}

== The composed config ==
$CONFIG
$FLAGS_HELP"""


def compose(overrides: Iterable[str] = ()) -> DictConfig:
    """The config `python -m sweep <overrides>` would run, composed without a command line (no Hydra job)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
