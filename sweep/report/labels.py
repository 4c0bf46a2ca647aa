"""How runs and numbers read in a report: a run's label from the settings that set it apart, and figures rounded to
what a reader uses."""

from __future__ import annotations

import math

import pandas as pd

SIGNIFICANT = 4  # digits kept in the CSV files
# Settings that name the model: a run's `model` tag says which weights ran (a checkpoint's directory name), where
# model.name may still be the preset that model.path overrode.
MODEL_PARAMS = ("params.model.name", "params.model.path", "params.model.hub_id")


def short(param: str) -> str:
    """params.engine.max_batch_size -> max_batch_size."""
    return param.rsplit(".", 1)[-1]


def settings_text(row: pd.Series, swept: list[str]) -> str:
    """`compiled, max_batch_size=8`: what sets this run apart from the others of the report."""
    parts = []
    for param in swept:
        if param in MODEL_PARAMS and isinstance(row.get("tags.model"), str):
            if row["tags.model"] not in parts:
                parts.append(row["tags.model"])
            continue
        value = row.get(param)
        if isinstance(value, str) and value:
            parts.append(value if param == "params.backend.name" else f"{short(param)}={value}")
    return ", ".join(parts)


def run_label(row: pd.Series, swept: list[str]) -> str:
    return settings_text(row, swept) or str(row.get("tags.mlflow.runName") or row["run_id"][:8])


def present(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def fmt(value: object) -> str:
    """A figure as a person reads it: 3 significant digits up to 999, whole numbers beyond."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not present(value):
        return "-"
    if not isinstance(value, (int, float)):
        return str(value)
    size = abs(value)
    if math.isinf(size):
        return "inf"
    return f"{value:.0f}" if size >= 100 else f"{value:.1f}" if size >= 10 else f"{value:.2f}"


def round_sig(value: object, digits: int = SIGNIFICANT) -> object:
    if not isinstance(value, float) or not math.isfinite(value) or value == 0 or value.is_integer():
        return value
    return round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))


def number(value: object) -> float:
    """A recorded param as a number (MLflow keeps params as text); NaN for none ("None", "", missing)."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")
