"""The one small interface every backend implements (a package in sweep/backends/, registered in registry.py)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from sweep.config.errors import ConfigError
from sweep.config.schema import EngineConfig
from sweep.model.source import ModelSource
from sweep.workload.requests import Request, Workload
from sweep.workload.stream import RequestStream

QUANTIZATION_DEFAULTS = {"quantization": EngineConfig.quantization, "kv_cache_dtype": EngineConfig.kv_cache_dtype}
PARALLEL_DEFAULTS = {"tp_size": EngineConfig.tp_size, "pp_size": EngineConfig.pp_size}
# Options that enter the engine's cache key only when set away from their default, so that the key of an engine that
# does not use them is what it is without them.
KEYED_WHEN_SET = {**QUANTIZATION_DEFAULTS, **PARALLEL_DEFAULTS}


def engine_gpus(engine: Any) -> int:
    """The GPUs (or CPU processes) one engine runs on: tp_size x pp_size."""
    return engine.tp_size * engine.pp_size


@dataclass
class Generation:
    token_ids: list[int]
    token_times: list[float]  # perf_counter() when each token was available on the host


@dataclass
class DecodeLoop:
    """An engine's decode step driven on its own, for timing it below a whole request (sweep/measure/decode.py).

    `step()` decodes one token for each of the loop's rows, its inputs and outputs in the engine's buffers, with no
    host sync; `reset()` puts the rows back at the cache column the loop was made for, so that every timed stretch reads
    the same cache. Both run under torch.inference_mode().
    """

    step: Callable[[], None]
    reset: Callable[[], None]
    span: int  # the cache columns each step's attention reads


@dataclass
class TokenScores:
    """An engine's log-probabilities of the next token at each scored position of one teacher-forced sequence
    (row j: the token at `start + j`, given every token before it): over the vocabulary ([positions, vocab]), or
    over its own top k tokens ([positions, k], with their ids in `token_ids`)."""

    logprobs: Any  # a float32 torch tensor
    token_ids: Any = None  # [positions, k] for top-k scores; None when logprobs covers the whole vocabulary


class Backend(ABC):
    name: ClassVar[str]
    # The engine.* options this backend uses; every other engine option is recorded as ignored.
    honoured_options: ClassVar[tuple[str, ...]]
    # The honoured options that shape the built artifact: they, and nothing else of engine.*, go into the cache
    # key (dtype is keyed on its own, resolved). A backend that builds nothing has none.
    artifact_options: ClassVar[tuple[str, ...]]
    # The attention head sizes the engine's kernels support; None: any (eager and SDPA attention in torch).
    supported_head_sizes: ClassVar[tuple[int, ...] | None] = None
    # What score() returns: "full" (log-probabilities over the vocabulary) or "top-<k> ..." (the engine's k most
    # likely tokens); None: the engine cannot be teacher-forced, and its runs record no quality figure.
    scores: ClassVar[str | None] = None
    # Whether the engine copies KV heads across its tensor-parallel ranks when engine.tp_size is a multiple of the
    # model's KV heads (vLLM, TensorRT-LLM); otherwise tp_size must divide the KV heads as it divides the heads.
    replicates_kv_heads: ClassVar[bool] = False
    # Whether the engine runs torch.compile'd code in this process, so that the timed part can count what dynamo
    # compiled while it ran (a timed request that paid for a compile).
    compiles_in_process: ClassVar[bool] = False

    def __init__(self, cfg: Any, model: ModelSource, device: str, dtype: str):
        self.cfg = cfg
        self.model = model
        self.device = device
        self.dtype = dtype  # resolved: float32, float16 or bfloat16

    # -- before anything is built ---------------------------------------------------------------------------
    @classmethod
    def check_installed(cls) -> None:
        """Raise ConfigError (with the install hint) when the backend's library is missing. Must be cheap."""

    def check(self, workload: Workload) -> None:
        """Raise ConfigError for an engine that could not serve this workload. Backends may add checks."""
        self.check_refusals()
        self.check_parallelism()
        self.check_head_size()
        e = self.cfg.engine
        max_position_embeddings = self.model.shape.max_position_embeddings
        honoured = set(self.honoured_options)
        if "max_input_len" in honoured and workload.max_input_len > e.max_input_len:
            raise ConfigError(
                f"engine.max_input_len={e.max_input_len} cannot hold the workload's longest input "
                f"({workload.max_input_len} tokens); set engine.max_input_len >= {workload.max_input_len}"
            )
        if "max_seq_len" in honoured:
            if workload.max_total_len > e.max_seq_len:
                raise ConfigError(
                    f"engine.max_seq_len={e.max_seq_len} cannot hold the workload's longest input + output "
                    f"({workload.max_total_len} tokens); set engine.max_seq_len >= {workload.max_total_len}"
                )
            if max_position_embeddings and e.max_seq_len > max_position_embeddings:
                raise ConfigError(
                    f"engine.max_seq_len={e.max_seq_len} is longer than the model supports "
                    f"(max_position_embeddings={max_position_embeddings})"
                )

    def quantization_refusals(self) -> dict[str, str | None]:
        """engine.quantization value -> why this backend cannot run it on this device and dtype (None: it can).
        Consulted when the backend honours engine.quantization; a value it does not list is refused."""
        return {"none": None}

    def kv_cache_dtype_refusals(self) -> dict[str, str | None]:
        """engine.kv_cache_dtype value -> why this backend cannot run it here (None: it can), as above."""
        return {"auto": None}

    def check_refusals(self) -> None:
        """Refuse an engine.quantization or engine.kv_cache_dtype value this backend honours but cannot run here."""
        for key, refusals in (
            ("quantization", self.quantization_refusals),
            ("kv_cache_dtype", self.kv_cache_dtype_refusals),
        ):
            value = self.cfg.engine[key]
            if key not in self.honoured_options or value == QUANTIZATION_DEFAULTS[key]:
                continue  # recorded as ignored, or the default, which every backend runs
            table = refusals()
            why = table.get(value, f"backend={self.name} has no mapping for it")
            if why:
                allowed = ", ".join(v for v, reason in table.items() if reason is None)
                raise ConfigError(
                    f"engine.{key}={value!r} is not allowed for backend={self.name} on {self.device} ({self.dtype}): "
                    f"{why}; allowed here: {allowed}"
                )

    def parallelism_refusals(self) -> dict[str, str | None]:
        """engine.tp_size / engine.pp_size -> why this backend cannot run a value above 1 here (None: it can)."""
        why = f"backend={self.name} runs the model in one process on one device"
        return {key: None if key in self.honoured_options else why for key in PARALLEL_DEFAULTS}

    def check_parallelism(self) -> None:
        """Refuse a tp_size that does not split the model's attention heads evenly (where the backend splits
        models: a fact of the model, whatever else the run lacks), and tp_size / pp_size above 1 where the backend
        cannot split the model here. (Whether the GPUs are there is make_plan's check.)"""
        e = self.cfg.engine
        if e.tp_size > 1 and "tp_size" in self.honoured_options and not self.splits_heads(e.tp_size):
            shape = self.model.shape
            allowed = [tp for tp in range(1, shape.num_heads + 1) if self.splits_heads(tp)]
            rule = (
                "divide both, or be a multiple of the KV heads that divides the heads"
                if self.replicates_kv_heads
                else "divide both"
            )
            raise ConfigError(
                f"engine.tp_size={e.tp_size} is not allowed for model {self.model.name!r} on backend={self.name}: "
                f"its {shape.num_heads} attention heads and {shape.num_kv_heads} KV heads are split over the "
                f"tensor-parallel ranks, so tp_size must {rule}; allowed: {', '.join(map(str, allowed))}"
            )
        for key in PARALLEL_DEFAULTS:
            if e[key] > 1 and (why := self.parallelism_refusals().get(key)):
                raise ConfigError(
                    f"engine.{key}={e[key]} is not allowed for backend={self.name} on {self.device}: {why}; "
                    "allowed here: 1"
                )

    def splits_heads(self, tp_size: int) -> bool:
        heads, kv_heads = self.model.shape.num_heads, self.model.shape.num_kv_heads
        if heads % tp_size:
            return False
        return kv_heads % tp_size == 0 or (self.replicates_kv_heads and tp_size % kv_heads == 0)

    def check_head_size(self) -> None:
        allowed, head_dim = self.supported_head_sizes, self.model.shape.head_dim
        if allowed is not None and head_dim not in allowed:
            raise ConfigError(
                f"model {self.model.name!r} has attention head size {head_dim}, which backend={self.name} does not "
                f"support; supported head sizes: {', '.join(map(str, allowed))}"
            )

    def memory_estimate_bytes(self, model_bytes: int, kv_bytes_per_token: int) -> int:
        """Device memory the engine needs at its limits: weights plus a full KV cache for every slot."""
        e = self.cfg.engine
        return model_bytes + e.max_batch_size * e.max_seq_len * kv_bytes_per_token

    def check_memory(self, model_bytes: int, kv_bytes_per_token: int, where: str, memory_bytes: float | None) -> None:
        """Refuse an engine larger than the device's memory (`where`: GPU, or host for a CPU run). On GPUs, an engine
        split over tp_size x pp_size of them holds about its share of the weights and KV cache on each; on the CPU
        every rank shares the one host."""
        if memory_bytes is None:
            return
        e = self.cfg.engine
        need = self.memory_estimate_bytes(model_bytes, kv_bytes_per_token)
        gpus = engine_gpus(e) if self.device == "cuda" else 1
        if need / gpus > memory_bytes:
            share = f" ({need / gpus / 1e9:.1f} GB on each of its {gpus} GPUs)" if gpus > 1 else ""
            raise ConfigError(
                f"engine.max_batch_size={e.max_batch_size} x engine.max_seq_len={e.max_seq_len} needs about "
                f"{need / 1e9:.1f} GB (weights + KV cache) by the {self.name} backend's estimate{share}, more than the "
                f"{where}'s {memory_bytes / 1e9:.1f} GB; lower either"
                + (", or raise engine.tp_size" if self.device == "cuda" and "tp_size" in self.honoured_options else "")
            )

    def ignored_options(self) -> list[str]:
        return [k for k in self.cfg.engine if k not in self.honoured_options]

    def artifact_settings(self) -> dict[str, Any]:
        """backend.* settings that shape the built artifact; they are part of the cache key when there are any."""
        return {}

    def library_versions(self) -> dict[str, str]:
        """Versions of the libraries that shape the built artifact; they are part of the cache key."""
        return {}

    # -- engine ---------------------------------------------------------------------------------------------
    @abstractmethod
    def build(self, engine_dir: Path) -> dict[str, Any]:
        """Write the engine into engine_dir (a fresh temporary directory); return what the manifest adds."""

    @abstractmethod
    def load(self, engine_dir: Path) -> None:
        """Make the engine ready to generate."""

    # -- serving --------------------------------------------------------------------------------------------
    @abstractmethod
    def generate(self, requests: list[Request]) -> list[Generation]:
        """Greedy generation of exactly request.output_len tokens for each request, as one batch."""

    def serve(self, stream: RequestStream, max_batch: int) -> None:
        """Serve requests as they arrive, until the stream is exhausted; report each one's admission, tokens and
        finish to the stream (its clock stamps them).

        Static batching, for engines that run one batch to its end: whenever the engine is free it takes up to
        `max_batch` requests that have arrived and generates them as one batch; requests that arrive meanwhile
        wait, and their queue time shows it. In-flight batchers override this and admit requests between steps.
        """
        while batch := stream.take(max_batch, wait=True):
            admitted = time.perf_counter()
            for req in batch:
                stream.admitted(req.id, admitted)
            for req, gen in zip(batch, self.generate(batch)):
                for t in gen.token_times:
                    stream.tokens(req.id, 1, at=t)
                stream.finished(req.id, at=gen.token_times[-1])

    def warm_up(self, workload: Workload) -> None:
        """Before anything is timed, run the shape classes of this engine that serving the workload once (which the
        harness does next, untimed) might not reach: e.g. every prompt width a compiled prefill can be given. The
        engine is warm from load() for what does not depend on the workload. Nothing by default."""

    def decode_loop(self, batch: int, context: int, span: int | None = None) -> DecodeLoop:
        """Decode steps of `batch` rows from cache column `context`, attending over `span` columns (None: the
        engine's choice); after generate() filled those rows. Engines whose decode step is not their own refuse."""
        raise ConfigError(f"backend={self.name} has no decode step to drive on its own; use backend=compiled")

    def score(self, sequences: list[list[int]], starts: list[int]) -> list[TokenScores]:
        """Teacher-forced: every sequence through the engine's own weights, scoring each token from `starts[i]` on
        (see `scores`). Called after the benchmark, never inside it."""
        raise NotImplementedError(f"backend={self.name} cannot score tokens teacher-forced")

    def engine_figures(self) -> dict[str, float]:
        """Figures of the engine itself (e.g. compile time, which a cache hit still pays in part), as metrics."""
        return {}

    def close(self) -> None:
        """Release device memory and workers."""
