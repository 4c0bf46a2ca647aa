"""Run names that say what ran: model, backend and the settings its sweep varies."""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from sweep.model.source import model_identity

# The config keys a multirun varies (comma-separated), set by its callback: each job's run is named after them.
SWEPT_KEYS_ENV = "SWEEP_SWEPT_KEYS"
TRIAL_TAG = "optuna_trial"  # the tracker tag (in tracker.tags) that makes a run `trial N: ...`
PROBE_TAG = "max_rate_probe"  # the tracker tag that makes a run `probe N: rate=...`
# Keys that never name a run: where it is recorded, and the sweeper's own settings and presets.
UNNAMED_KEYS = ("tracker", "hydra", "search", "model", "backend")


def run_name(cfg: DictConfig) -> str:
    """What the run is: model, backend and the settings that vary across its sweep (given alone: on its command
    line), e.g. `trial 3: tiny/hf max_batch_size=4 attn_implementation=sdpa`; a max-rate probe by its number and
    rate, `probe 3: rate=0.25`. tracker.run_name overrides it. Read from the config alone, so that a job refused
    before planning is named like one that ran (a local checkpoint by its directory: model_identity)."""
    if cfg.tracker.run_name:
        return cfg.tracker.run_name
    probe = cfg.tracker.tags.get(PROBE_TAG)
    if probe is not None:
        return f"probe {probe}: rate={cfg.workload.request_rate:g}"
    swept = os.environ.get(SWEPT_KEYS_ENV)
    keys = swept.split(",") if swept is not None else command_line_keys()
    settings = [setting(cfg, key) for key in keys if key and key.split(".")[0].split("/")[0] not in UNNAMED_KEYS]
    name = " ".join([f"{model_identity(cfg.model)[0]}/{cfg.backend.name}", *filter(None, settings)])
    trial = cfg.tracker.tags.get(TRIAL_TAG)
    return f"trial {trial}: {name}" if trial is not None else name


def command_line_keys() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [item.split("=", 1)[0].lstrip("+~") for item in HydraConfig.get().overrides.task]


def setting(cfg: DictConfig, key: str) -> str | None:
    """`engine.max_batch_size` -> 'max_batch_size=4'; a config group (`workload`) -> its option ('throughput')."""
    from hydra.core.hydra_config import HydraConfig

    value = OmegaConf.select(cfg, key)
    if isinstance(value, DictConfig) or (value is None and "." not in key):
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        return choices.get(key)
    return f"{key.rsplit('.', 1)[-1]}={value}"
