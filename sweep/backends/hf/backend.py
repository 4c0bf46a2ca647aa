"""hf: eager `generate`, the original scripts' baseline. It builds nothing: the checkpoint is the engine.

With engine.tp_size above 1 the model is split by transformers' tensor parallelism over that many ranks, one process
each (ranks.py); this process is rank 0 and serves. engine.pp_size above 1 is refused (PIPELINE_REFUSAL).
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sweep.backends.base import Backend, Generation, TokenScores
from sweep.backends.hf.ranks import RankGroup, RankSpec, distributed_refusal, free_port
from sweep.backends.quantization import quantize_model, torchao_refusals
from sweep.config.errors import ConfigError
from sweep.workload.requests import Request, Workload

log = logging.getLogger(__name__)


class TokenClock:
    """A transformers streamer that records when each generated token reaches the host.

    `generate` calls put() with the prompt first, then once per step with the new token of every sequence.
    Reading the tokens with .tolist() waits for the device, so the timestamp is when the token is on the host.
    """

    def __init__(self) -> None:
        self.steps: list[tuple[float, list[int]]] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        ids = value.reshape(-1).tolist()
        now = time.perf_counter()
        if self._prompt_seen:
            self.steps.append((now, ids))
        self._prompt_seen = True

    def end(self) -> None:
        pass


def load_hf_model(path: Path, dtype: str, attn_implementation: str, device: str):
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
    )
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path)


def left_pad(requests: list[Request], pad_id: int, device: str):
    width = max(r.input_len for r in requests)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for row, req in enumerate(requests):
        ids[row, width - req.input_len :] = torch.tensor(req.input_ids)
        mask[row, width - req.input_len :] = 1
    return ids.to(device), mask.to(device)


def greedy_batch(model, requests: list[Request], pad_id: int, device: str, streamer: Any = None) -> None:
    """Greedy generation of the batch, left-padded, each request to the batch's longest output (EOS ignored); the
    tokens reach the caller through `streamer`. Every rank of a split model makes this same call."""
    ids, mask = left_pad(requests, pad_id, device)
    new_tokens = max(r.output_len for r in requests)
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # EOS ignored: every request gets exactly its output length
            do_sample=False,
            pad_token_id=pad_id,
            streamer=streamer,
        )


def teacher_forced(model, sequences: list[list[int]], starts: list[int], device: str) -> list[TokenScores]:
    """Log-probabilities over the vocabulary of every token from start on, one sequence per forward pass."""
    scores = []
    with torch.inference_mode():
        for ids, start in zip(sequences, starts):
            logits = model(torch.tensor([ids], device=device)).logits[0, start - 1 : len(ids) - 1]
            scores.append(TokenScores(logits.float().log_softmax(-1).cpu()))
    return scores


# transformers 5.19's pipeline parallelism (DistributedConfig(pp_size=N): an even split of the decoder layers, each
# forward pass handed from stage to stage) generated other greedy tokens than the unsplit model for the shorter,
# left-padded prompt of a batch of two on the CPU (tensor parallelism generated the same); sweep does not serve it.
PIPELINE_REFUSAL = (
    "transformers' pipeline parallelism (5.19) generates different greedy tokens than the unsplit model for "
    "left-padded prompts of a batch; use engine.tp_size, or backend=vllm or trt for pipeline stages"
)
# What rank 0 of a split model asks every other rank to run with it (ranks.py).
RANK_CALLS = {"generate": greedy_batch, "score": teacher_forced}


class HFBackend(Backend):
    name = "hf"
    honoured_options = (
        "dtype",
        "max_batch_size",
        "max_input_len",
        "max_seq_len",
        "attn_implementation",
        "quantization",
        "tp_size",
    )
    # It builds nothing: one cache entry per model, dtype, device, quantization (applied as the model loads) and
    # tp_size; each in the key only when set.
    artifact_options = ("quantization", "tp_size")
    scores = "full"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ranks: RankGroup | None = None  # the other ranks of a model split over several (ranks.py)

    def quantization_refusals(self) -> dict[str, str | None]:
        return torchao_refusals(self.device, self.dtype)

    def parallelism_refusals(self) -> dict[str, str | None]:
        return {"tp_size": distributed_refusal(), "pp_size": PIPELINE_REFUSAL}

    def check(self, workload: Workload) -> None:
        super().check(workload)
        e = self.cfg.engine
        if e.attn_implementation == "flex_attention" and self.device == "cpu":
            raise ConfigError(
                "engine.attn_implementation='flex_attention' needs a GPU for backend=hf: transformers compiles "
                "FlexAttention, and Inductor builds its kernel there, not on a CPU; on a CPU choose one of: eager, sdpa"
            )
        if e.tp_size > 1 and e.quantization != "none":
            raise ConfigError(
                f"engine.quantization={e.quantization!r} is not allowed for backend=hf with "
                f"engine.tp_size={e.tp_size}: torchao quantizes whole Linear weights, and a split model's weights "
                "are transformers' DTensor shards; allowed here: none"
            )

    def build(self, engine_dir: Path) -> dict[str, Any]:
        log.info("hf builds nothing: it serves the checkpoint as it is")
        return {
            "artifact": "none",
            "note": "hf runs the checkpoint as it is, its linear layers quantized as it loads; nothing is built",
            "quantization": self.cfg.engine.quantization,
        }

    def load(self, engine_dir: Path) -> None:
        e = self.cfg.engine
        if e.tp_size > 1:
            spec = RankSpec(
                e.tp_size, free_port(), self.device, str(self.model.path), self.dtype, e.attn_implementation
            )
            self.ranks = RankGroup(spec, RANK_CALLS)
            self.model_ = self.ranks.start()
            self.tokenizer = AutoTokenizer.from_pretrained(self.model.path)
        else:
            self.model_, self.tokenizer = load_hf_model(self.model.path, self.dtype, e.attn_implementation, self.device)
            quantize_model(self.model_, e.quantization, compiled=False)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def score(self, sequences: list[list[int]], starts: list[int]) -> list[TokenScores]:
        if self.ranks is not None:
            return self.ranks.run("score", sequences, starts, self.device)
        return teacher_forced(self.model_, sequences, starts, self.device)

    def generate(self, requests: list[Request]) -> list[Generation]:
        clock = TokenClock()
        if self.ranks is not None:
            self.ranks.run("generate", requests, self.pad_id, self.device, streamer=clock)
        else:
            greedy_batch(self.model_, requests, self.pad_id, self.device, streamer=clock)
        return [
            Generation(
                token_ids=[step_ids[row] for _, step_ids in clock.steps[: req.output_len]],
                token_times=[t for t, _ in clock.steps[: req.output_len]],
            )
            for row, req in enumerate(requests)
        ]

    def close(self) -> None:
        if self.ranks is not None:
            ranks, self.ranks = self.ranks, None
            ranks.close()
        self.model_ = None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()  # the next engine in this process finds the memory free, and its peak is its own
