"""Workload: the requests a run sends, as token ids with an exact output length each.

Synthetic (seeded token ids; fixed or normally distributed lengths) or read from a JSONL file in
trtllm-bench's dataset format: one object per line with task_id, prompt or input_ids, and output_tokens.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sweep.config.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    id: str
    input_ids: list[int]
    output_len: int

    @property
    def input_len(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Workload:
    warmup: list[Request]
    measured: list[Request]

    @property
    def max_input_len(self) -> int:
        return max(r.input_len for r in self.warmup + self.measured)

    @property
    def max_total_len(self) -> int:
        return max(r.input_len + r.output_len for r in self.warmup + self.measured)


def make_workload(wcfg: Any, tokenizer: Any, vocab_size: int) -> Workload:
    n_total = wcfg.warmup_requests + wcfg.num_requests
    if wcfg.dataset:
        requests = read_dataset(Path(wcfg.dataset), tokenizer, vocab_size)
        if len(requests) != n_total:
            log.warning(
                "workload.dataset=%r holds %d requests and the run takes %d (workload.warmup_requests=%d + "
                "workload.num_requests=%d): %s",
                str(wcfg.dataset),
                len(requests),
                n_total,
                wcfg.warmup_requests,
                wcfg.num_requests,
                f"the first {n_total} are used"
                if len(requests) > n_total
                else "the file is cycled, each repeat under an id of its own (<task_id>#2, #3, ...)",
            )
        # cycle the file so warm-up and measured requests are all there
        requests = unique_ids([requests[i % len(requests)] for i in range(n_total)])
    else:
        requests = synthetic_requests(wcfg, vocab_size, tokenizer.all_special_ids)
    return Workload(warmup=requests[: wcfg.warmup_requests], measured=requests[wcfg.warmup_requests :])


def unique_ids(requests: list[Request]) -> list[Request]:
    """Every request under an id of its own (engines and the per-request records key on it): a repeat of an id, by
    cycling or in the file itself, becomes <id>#2, <id>#3, ..."""
    taken = {r.id for r in requests}
    seen: dict[str, int] = {}
    unique = []
    for r in requests:
        seen[r.id] = seen.get(r.id, 0) + 1
        if seen[r.id] == 1:
            unique.append(r)
            continue
        n = seen[r.id]
        while f"{r.id}#{n}" in taken:  # a file whose own ids look like repeats
            n += 1
        seen[r.id] = n
        taken.add(f"{r.id}#{n}")
        unique.append(dataclasses.replace(r, id=f"{r.id}#{n}"))
    return unique


def sample_lengths(rng: np.random.Generator, mean: int, std: float, n: int, distribution: str) -> list[int]:
    if distribution == "fixed" or std == 0:
        return [int(mean)] * n
    return [max(1, int(round(x))) for x in rng.normal(mean, std, size=n)]


def synthetic_requests(wcfg: Any, vocab_size: int, special_ids: list[int]) -> list[Request]:
    rng = np.random.default_rng(wcfg.seed)
    n = wcfg.warmup_requests + wcfg.num_requests
    input_lens = sample_lengths(rng, wcfg.input_len, wcfg.input_len_std, n, wcfg.length_distribution)
    output_lens = sample_lengths(rng, wcfg.output_len, wcfg.output_len_std, n, wcfg.length_distribution)
    # Special tokens (EOS, chat markers) in a prompt would change what the model does: leave them out.
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(special_ids, dtype=np.int64))
    return [
        Request(id=f"synthetic-{i}", input_ids=rng.choice(allowed, size=isl).tolist(), output_len=osl)
        for i, (isl, osl) in enumerate(zip(input_lens, output_lens))
    ]


def read_dataset(path: Path, tokenizer: Any, vocab_size: int) -> list[Request]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"workload.dataset={str(path)!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"workload.dataset={str(path)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    requests = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"workload.dataset={str(path)!r} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "output_tokens" not in row or not ("prompt" in row or "input_ids" in row):
            raise ConfigError(f"{where}: each line needs output_tokens and one of prompt or input_ids")
        if "input_ids" in row:
            ids = row["input_ids"]
            # bool is an int in Python: true would be read as token 1
            if not isinstance(ids, list) or not all(type(i) is int and 0 <= i < vocab_size for i in ids):
                raise ConfigError(f"{where}: input_ids must be a list of token ids, integers in [0, {vocab_size})")
        elif isinstance(row["prompt"], str):
            ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        else:
            raise ConfigError(f"{where}: prompt must be a string, not {type(row['prompt']).__name__}")
        if not ids or type(row["output_tokens"]) is not int or row["output_tokens"] < 1:
            raise ConfigError(f"{where}: needs a non-empty prompt and output_tokens >= 1, an integer")
        requests.append(
            Request(id=str(row.get("task_id", lineno)), input_ids=list(ids), output_len=row["output_tokens"])
        )
    if not requests:
        raise ConfigError(f"workload.dataset={str(path)!r} holds no requests")
    return requests
