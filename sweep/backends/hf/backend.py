"""hf: eager transformers `generate`, the seed's PyTorch baseline. It builds nothing: the engine is the checkpoint."""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sweep.backends.base import Backend, Generation, TokenScores
from sweep.backends.quantization import quantize_model, torchao_refusals
from sweep.workload.requests import Request

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


def teacher_forced(model, sequences: list[list[int]], starts: list[int], device: str) -> list[TokenScores]:
    """Log-probabilities over the vocabulary of every token from start on, one sequence per forward pass."""
    scores = []
    with torch.inference_mode():
        for ids, start in zip(sequences, starts):
            logits = model(torch.tensor([ids], device=device)).logits[0, start - 1 : len(ids) - 1]
            scores.append(TokenScores(logits.float().log_softmax(-1).cpu()))
    return scores


class HFBackend(Backend):
    name = "hf"
    honoured_options = (
        "dtype",
        "max_batch_size",
        "max_input_len",
        "max_seq_len",
        "attn_implementation",
        "quantization",
    )
    # It builds nothing: one cache entry per model, dtype, device and quantization (applied as the model loads; in
    # the key only when set).
    artifact_options = ("quantization",)
    scores = "full"

    def quantization_refusals(self) -> dict[str, str | None]:
        return torchao_refusals(self.device, self.dtype)

    def build(self, engine_dir: Path) -> dict[str, Any]:
        log.info("hf builds nothing: it serves the checkpoint as it is")
        return {
            "artifact": "none",
            "note": "hf runs the checkpoint as it is, its linear layers quantized as it loads; nothing is built",
            "quantization": self.cfg.engine.quantization,
        }

    def load(self, engine_dir: Path) -> None:
        e = self.cfg.engine
        self.model_, self.tokenizer = load_hf_model(self.model.path, self.dtype, e.attn_implementation, self.device)
        quantize_model(self.model_, e.quantization)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def score(self, sequences: list[list[int]], starts: list[int]) -> list[TokenScores]:
        return teacher_forced(self.model_, sequences, starts, self.device)

    def generate(self, requests: list[Request]) -> list[Generation]:
        ids, mask = left_pad(requests, self.pad_id, self.device)
        new_tokens = max(r.output_len for r in requests)
        clock = TokenClock()
        with torch.inference_mode():
            self.model_.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # EOS ignored: every request gets exactly its output length
                do_sample=False,
                pad_token_id=self.pad_id,
                streamer=clock,
            )
        return [
            Generation(
                token_ids=[step_ids[row] for _, step_ids in clock.steps[: req.output_len]],
                token_times=[t for t, _ in clock.steps[: req.output_len]],
            )
            for row, req in enumerate(requests)
        ]

    def close(self) -> None:
        self.model_ = None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()  # the next engine in this process finds the memory free, and its peak is its own
