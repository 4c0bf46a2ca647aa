"""The quality figures of a run: the engine teacher-forced against the same model unquantized.

Reference: the checkpoint loaded with plain transformers in the run's dtype on the run's device. For each of the
workload's first K measured prompts (quality.prompts) it generates a greedy continuation of T tokens (quality.tokens,
at most one short of the request's output_len), then scores prompt + continuation in one forward pass: its
log-probabilities of the next token at each of the T continuation positions. Cached on disk under
<cache_dir>/quality/, per model identity, dtype, device, prompts and T, so a sweep computes it once; it is computed
before the engine loads, so the two never share the device.

Engine: `backend.score()` on the same sequences, after the benchmark (never inside the timed part). Figures, over
every scored position:
- quality_top1_agreement_pct: the engine's most likely next token is the reference's;
- quality_kl: mean KL(reference || engine) of the next-token distributions, for engines that return full logits;
- quality_kl_topk: the same over the engine's own top k tokens, both distributions renormalised over them, for
  engines that return only their top k log-probabilities (vLLM's prompt logprobs). The tag quality.logits says which.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from sweep.backends.base import Backend, TokenScores
from sweep.config.errors import ConfigError
from sweep.model.source import ModelSource
from sweep.workload.requests import Workload

log = logging.getLogger(__name__)

QUALITY_DIR = "quality"  # under the cache dir
REFERENCE_FILE = "reference.safetensors"
SCORES_FILE = "quality_scores.safetensors"  # the engine's scores, in the job's output directory
MAX_REFERENCE_BYTES = 4 * 2**30  # K x T x vocab float32 log-probabilities, on disk and in host memory


@dataclass
class Reference:
    sequences: list[list[int]]  # prompt + the reference's greedy continuation
    starts: list[int]  # where each continuation starts (the prompt's length)
    logprobs: list[torch.Tensor]  # [T, vocab] float32: the next token at positions start .. len - 1


def scored_prompts(quality: Any, workload: Workload) -> tuple[list[list[int]], list[int]]:
    """The first quality.prompts measured prompts, and how many continuation tokens each is scored on: at most one
    short of its output_len, so that prompt + continuation leaves room for one more token within engine.max_seq_len
    (vLLM scores a prompt only as part of a request that generates a token)."""
    requests = workload.measured[: quality.prompts]
    return [list(r.input_ids) for r in requests], [min(quality.tokens, max(r.output_len - 1, 1)) for r in requests]


def check_quality(cfg: Any, backend: Backend, workload: Workload, vocab_size: int) -> None:
    """What a run must know before it builds: the reference fits its size limit, and a quality objective is a
    figure this backend records."""
    metric = cfg.objective.metric
    if cfg.quality.enabled:
        prompts, tokens = scored_prompts(cfg.quality, workload)
        size = sum(tokens) * vocab_size * 4
        if size > MAX_REFERENCE_BYTES:
            raise ConfigError(
                f"quality.prompts={cfg.quality.prompts} x quality.tokens={cfg.quality.tokens} keeps {size / 2**30:.1f} "
                f"GiB of reference log-probabilities (vocabulary {vocab_size}), over {MAX_REFERENCE_BYTES // 2**30} "
                "GiB; lower either"
            )
    if not metric.startswith("quality_"):
        return
    recorded = recorded_figures(cfg.quality.enabled, backend.scores)
    if metric not in recorded:
        scores = backend.scores or "nothing"
        why = (
            "quality.enabled=false"
            if not cfg.quality.enabled
            else f"backend={backend.name} scores {scores} and records {', '.join(recorded) or 'no quality figure'}"
        )
        raise ConfigError(f"objective.metric={metric!r} is not recorded by this run ({why})")


def recorded_figures(enabled: bool, scores: str | None) -> tuple[str, ...]:
    if not enabled or scores is None:
        return ()
    kl = "quality_kl" if scores == "full" else "quality_kl_topk"
    return ("quality_top1_agreement_pct", kl, "quality_positions")


# -- the reference --------------------------------------------------------------------------------------------------
def reference_key(identity: dict, dtype: str, device: str, prompts: list[list[int]], tokens: list[int]) -> str:
    text = json.dumps(
        {"model": identity, "dtype": dtype, "device": device, "prompts": prompts, "tokens": tokens},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def save_reference(path: Path, reference: Reference) -> None:
    tensors = {}
    for i, (ids, logprobs) in enumerate(zip(reference.sequences, reference.logprobs)):
        tensors[f"sequence.{i}"] = torch.tensor(ids, dtype=torch.long)
        tensors[f"logprobs.{i}"] = logprobs.contiguous()
    save_file(tensors, str(path), metadata={"starts": json.dumps(reference.starts)})


def load_reference(path: Path) -> Reference:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        starts = json.loads(f.metadata()["starts"])
    tensors = load_file(str(path))
    return Reference(
        [tensors[f"sequence.{i}"].tolist() for i in range(len(starts))],
        starts,
        [tensors[f"logprobs.{i}"] for i in range(len(starts))],
    )


def compute_reference(
    model_path: Path, dtype: str, device: str, prompts: list[list[int]], tokens: list[int]
) -> Reference:
    """Greedy continuations and teacher-forced log-probabilities from plain transformers, unquantized."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos) or 0
    sequences, logprobs = [], []
    try:
        with torch.inference_mode():
            for prompt, count in zip(prompts, tokens):
                ids = torch.tensor([prompt], device=device)
                greedy = GenerationConfig(do_sample=False, max_new_tokens=count, min_new_tokens=count, pad_token_id=pad)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=greedy)
                logits = model(out).logits[0, len(prompt) - 1 : out.shape[1] - 1]
                sequences.append(out[0].tolist())
                logprobs.append(logits.float().log_softmax(-1).cpu())
    finally:
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return Reference(sequences, [len(p) for p in prompts], logprobs)


def reference_dir(cfg: Any, model: ModelSource, dtype: str, device: str, workload: Workload, cache_root: Path) -> Path:
    prompts, tokens = scored_prompts(cfg.quality, workload)
    return cache_root / QUALITY_DIR / reference_key(model.identity, dtype, device, prompts, tokens)


def why_no_quality(cfg: Any, backend: Backend) -> str | None:
    """Why the run scores no quality (None: it does)."""
    if not cfg.quality.enabled:
        return "quality.enabled=false"
    if backend.scores is None:
        return f"backend={backend.name} cannot score tokens teacher-forced (no logits or prompt logprobs)"
    return None


def reference_ready(cfg: Any, backend: Backend, model: ModelSource, dtype: str, workload: Workload, root: Path) -> bool:
    """Whether the run's quality check needs no reference computed now (none is scored, or it is cached): computing
    one loads the unquantized model on the run's device."""
    if why_no_quality(cfg, backend):
        return True
    return (reference_dir(cfg, model, dtype, backend.device, workload, root) / REFERENCE_FILE).is_file()


def reference_for(
    cfg: Any, model: ModelSource, dtype: str, device: str, workload: Workload, cache_root: Path
) -> tuple[Reference, Path]:
    """The cached reference of this run's prompts, computed (once, under a lock) when missing. Returns it and its
    file."""
    prompts, tokens = scored_prompts(cfg.quality, workload)
    final = cache_root / QUALITY_DIR / reference_key(model.identity, dtype, device, prompts, tokens)
    directory, key = final.parent, final.name
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory / f"{key}.lock")):
        if (final / REFERENCE_FILE).is_file():
            try:
                return load_reference(final / REFERENCE_FILE), final / REFERENCE_FILE
            except Exception as exc:  # safetensors raises its own error types for a damaged file
                log.warning("quality reference %s is damaged (%s): computing it again", final, exc)
        log.info("computing the quality reference: %d prompts, unquantized %s on %s", len(prompts), dtype, device)
        reference = compute_reference(model.path, dtype, device, prompts, tokens)
        tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".tmp-{key}-"))
        try:
            save_reference(tmp / REFERENCE_FILE, reference)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return reference, final / REFERENCE_FILE


# -- the figures ----------------------------------------------------------------------------------------------------
def position_figures(reference: torch.Tensor, scores: TokenScores) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scored position: whether the engine's top token is the reference's, and the KL divergence (over the
    vocabulary, or over the engine's top k tokens), summed in float64 so that a divergence near 0 keeps its sign."""
    reference, logprobs = reference.double(), scores.logprobs.double()
    if scores.token_ids is None:
        agree = logprobs.argmax(-1) == reference.argmax(-1)
        return agree, (reference.exp() * (reference - logprobs)).sum(-1)
    agree = scores.token_ids[:, 0] == reference.argmax(-1)
    p = reference.gather(-1, scores.token_ids).log_softmax(-1)
    q = logprobs.log_softmax(-1)
    return agree, (p.exp() * (p - q)).sum(-1)


def quality_figures(reference: Reference, scores: list[TokenScores]) -> dict[str, float]:
    agree, kl = zip(*(position_figures(r, s) for r, s in zip(reference.logprobs, scores)))
    agree, kl = torch.cat(agree), torch.cat(kl)
    name = "quality_kl" if scores[0].token_ids is None else "quality_kl_topk"
    return {
        "quality_top1_agreement_pct": 100.0 * agree.double().mean().item(),
        name: kl.double().mean().item(),
        "quality_positions": float(agree.numel()),
    }


def save_scores(path: Path, scores: list[TokenScores]) -> None:
    tensors = {f"logprobs.{i}": s.logprobs.contiguous() for i, s in enumerate(scores)}
    tensors |= {f"token_ids.{i}": s.token_ids.contiguous() for i, s in enumerate(scores) if s.token_ids is not None}
    save_file(tensors, str(path))


def load_scores(path: Path) -> list[TokenScores]:
    tensors = load_file(str(path))
    count = sum(name.startswith("logprobs.") for name in tensors)
    return [TokenScores(tensors[f"logprobs.{i}"], tensors.get(f"token_ids.{i}")) for i in range(count)]


@dataclass
class QualityCheck:
    """One run's quality check: the reference, prepared before the engine loads; the engine's scores, after the
    benchmark."""

    reference: Reference
    reference_file: Path
    scores: list[TokenScores] = field(default_factory=list)

    def score(self, backend: Backend) -> None:
        self.scores = backend.score(self.reference.sequences, self.reference.starts)

    def figures(self) -> dict[str, float]:
        return quality_figures(self.reference, self.scores)

    def tags(self, backend: Backend) -> dict[str, str]:
        return {"quality.logits": backend.scores or "", "quality.reference": str(self.reference_file)}


def prepare(
    cfg: Any, backend: Backend, model: ModelSource, dtype: str, device: str, workload: Workload, root: Path
) -> tuple[QualityCheck | None, str | None]:
    """The run's quality check, or None with why there is none."""
    if why := why_no_quality(cfg, backend):
        return None, why
    reference, path = reference_for(cfg, model, dtype, device, workload, root)
    return QualityCheck(reference, path), None
