"""hf_paged: transformers' own continuous batching (its ContinuousBatchingManager) with a paged KV cache.

The model is loaded as for `hf`; `model.init_continuous_batching(...)` builds the manager, whose background thread
schedules requests in flight: a request joins the running batch at the next step, long prompts are split over
steps under the batch-token budget (chunked prefill), and the KV cache is handed out in pages. The serving loop
hands arrivals to the manager with `add_request(streaming=True, record_timestamps=True)` and relays each
request's tokens back from `get_result`: the timestamps are the manager's own (perf_counter when each token id
reached the host) and admission is when the manager first scheduled the request (`lifespan[0]`).

Needs transformers >= 5.17 (ContinuousBatchingConfig, passed beside the GenerationConfig); read from the source of
5.17 (the page size is `block_size`, nothing switches attention on its own) and 5.24 (`page_size`,
`auto_switch_to_flash`), and run on both. It builds nothing: CUDA graphs, when on, are captured at load.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version

from sweep.backends.base import Backend, Generation
from sweep.backends.hf.backend import load_hf_model
from sweep.config.errors import ConfigError
from sweep.workload.requests import Request, Workload
from sweep.workload.stream import RequestStream

log = logging.getLogger(__name__)

MIN_TRANSFORMERS = "5.17"  # the first release with ContinuousBatchingConfig beside the GenerationConfig
MIN_PAGE_SIZE = 4  # transformers' BOUNDS["page_size"] in generation/continuous_batching/initialization.py
POLL_S = 0.5  # how long a wait for tokens lasts before it checks that the manager's thread is still alive
INIT_ARGS = ("generation_config", "continuous_batching_config")
SUBMIT_ARGS = ("request_id", "max_new_tokens", "streaming", "record_timestamps", "eos_token_id")


def config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(transformers.ContinuousBatchingConfig)}


def page_field(fields: set[str]) -> str:
    """The page size's name in ContinuousBatchingConfig: `page_size` from 5.2x, `block_size` in 5.17."""
    return "page_size" if "page_size" in fields else "block_size"


def check_transformers_version(installed: str) -> None:
    if Version(installed) < Version(MIN_TRANSFORMERS):
        raise ConfigError(
            f"backend=hf_paged needs transformers >= {MIN_TRANSFORMERS} (its continuous batching with "
            f"ContinuousBatchingConfig), but transformers {installed} is installed; "
            f"pip install 'transformers>={MIN_TRANSFORMERS}'"
        )


def admission_time(output: Any, handed_at: float) -> float:
    """When the manager first scheduled the request (`GenerationOutput.lifespan[0]`; releases without it: when the
    request was handed to the manager)."""
    scheduled = getattr(output, "lifespan", (-1, -1))[0]
    return scheduled if scheduled > 0 else handed_at


def new_token_times(output: Any, seen: int) -> list[float]:
    """Host times of the tokens `output` has beyond the first `seen`. The manager stamps every token it appends; a
    request it preempted and re-queued starts a new list of stamps, so missing ones are taken as now."""
    new = len(output.generated_tokens) - seen
    if new <= 0:
        return []
    stamps = output.timestamps or []
    return stamps[-new:] if len(stamps) >= new else [time.perf_counter()] * new


class HFPagedBackend(Backend):
    name = "hf_paged"
    honoured_options = (
        "dtype",
        "max_batch_size",
        "max_seq_len",
        "max_num_tokens",
        "attn_implementation",
        "paged_kv_cache",
        "tokens_per_block",
        "cuda_graphs",
    )
    artifact_options = ()  # it builds nothing: one cache entry per model, dtype and device

    def __init__(self, cfg: Any, model: Any, device: str, dtype: str):
        super().__init__(cfg, model, device, dtype)
        self.manager: Any = None
        self.warmup_s = 0.0
        self.submitted = 0  # makes the manager's request ids unique: a workload's ids repeat every iteration

    # -- before anything is built ---------------------------------------------------------------------------
    @classmethod
    def check_installed(cls) -> None:
        check_transformers_version(importlib.metadata.version("transformers"))

    def parallelism_refusals(self) -> dict[str, str | None]:
        why = (
            "its continuous-batching manager schedules in a background thread of this one process, and running one "
            "in lockstep on every rank of a split model is not wired here; use backend=hf, vllm or trt to split a "
            "model"
        )
        return {"tp_size": why, "pp_size": why}

    def check(self, workload: Workload) -> None:
        super().check(workload)
        e, b = self.cfg.engine, self.cfg.backend
        if e.attn_implementation == "flex_attention":
            raise ConfigError(
                "engine.attn_implementation='flex_attention' is not allowed for backend=hf_paged: transformers' "
                "continuous batching has no FlexAttention; choose one of: eager, sdpa, flash_attention_2"
            )
        if not e.paged_kv_cache:
            raise ConfigError(
                "engine.paged_kv_cache=False is not allowed for backend=hf_paged: transformers' continuous batching "
                "always pages its KV cache; set engine.paged_kv_cache=true, or use backend=hf for a contiguous cache"
            )
        if e.tokens_per_block < MIN_PAGE_SIZE:
            raise ConfigError(
                f"engine.tokens_per_block={e.tokens_per_block} is not allowed for backend=hf_paged; transformers' "
                f"pages hold at least {MIN_PAGE_SIZE} tokens"
            )
        if e.max_num_tokens < e.max_batch_size:
            raise ConfigError(
                f"engine.max_num_tokens={e.max_num_tokens} is below engine.max_batch_size={e.max_batch_size}: a step "
                f"could not decode every running request; set engine.max_num_tokens >= {e.max_batch_size}"
            )
        if b.kv_blocks is not None:
            if b.kv_blocks < 1:
                raise ConfigError(f"backend.kv_blocks={b.kv_blocks} is not allowed; it must be >= 1 (or null)")
            if b.kv_blocks * e.tokens_per_block < e.max_seq_len:
                need = math.ceil(e.max_seq_len / e.tokens_per_block)
                raise ConfigError(
                    f"backend.kv_blocks={b.kv_blocks} pages of engine.tokens_per_block={e.tokens_per_block} tokens "
                    f"cannot hold one request of engine.max_seq_len={e.max_seq_len} tokens; "
                    f"set backend.kv_blocks >= {need}"
                )
        if not 0 < b.kv_memory_fraction <= 1:
            raise ConfigError(f"backend.kv_memory_fraction={b.kv_memory_fraction} is not allowed; it must be in (0, 1]")
        self.check_library()

    def check_library(self) -> None:
        """The installed transformers has every setting and request argument this backend passes (5.17 and 5.24
        do; a release that renamed one is refused here rather than failing in the manager's thread)."""
        version = transformers.__version__
        try:
            fields = config_fields()
            init = inspect.signature(transformers.GenerationMixin.init_continuous_batching).parameters
            manager = transformers.generation.continuous_batching.ContinuousBatchingManager
            submit = inspect.signature(manager.add_request).parameters
        except AttributeError as missing_api:
            raise ConfigError(
                f"backend=hf_paged cannot run on transformers {version}: {missing_api}; "
                f"pip install 'transformers>={MIN_TRANSFORMERS}'"
            ) from None
        missing = sorted(set(self.continuous_batching_kwargs()) - fields)
        missing += [f"init_continuous_batching({arg}=...)" for arg in INIT_ARGS if arg not in init]
        missing += [f"add_request({arg}=...)" for arg in SUBMIT_ARGS if arg not in submit]
        if missing:
            raise ConfigError(
                f"backend=hf_paged cannot run on transformers {version}: its continuous batching lacks "
                f"{', '.join(missing)}; use a transformers release with them (5.17 to 5.24 were read)"
            )

    def kv_blocks(self) -> int | None:
        """KV pages to allocate; None lets transformers size the cache from the free GPU memory."""
        e, b = self.cfg.engine, self.cfg.backend
        if b.kv_blocks is not None:
            return b.kv_blocks
        if self.device == "cpu":  # transformers' own CPU default takes 60% of the host's RAM
            return e.max_batch_size * math.ceil(e.max_seq_len / e.tokens_per_block)
        return None

    def continuous_batching_kwargs(self) -> dict[str, Any]:
        e = self.cfg.engine
        fields = config_fields()
        kwargs = {
            page_field(fields): e.tokens_per_block,
            "max_batch_tokens": e.max_num_tokens,
            "max_requests_per_batch": e.max_batch_size,
            "num_blocks": self.kv_blocks(),
            "max_memory_percent": self.cfg.backend.kv_memory_fraction,
            "allow_block_sharing": False,  # off for benchmarks, or repeated prompts would skip their prefill
        }
        if "auto_switch_to_flash" in fields:  # 5.2x can switch attention on its own; 5.17 never does
            kwargs["auto_switch_to_flash"] = False  # engine.attn_implementation means what it says
        if self.device == "cuda":  # the CPU has no graphs (transformers would warn and turn them off)
            kwargs["use_cuda_graph"] = e.cuda_graphs
        if e.attn_implementation.startswith("flash"):
            # The decode fast path (flash_attn_with_kvcache) only serves requests whose block table fits this.
            kwargs["max_blocks_per_request"] = math.ceil(e.max_seq_len / e.tokens_per_block) + 1
        return kwargs

    def memory_estimate_bytes(self, model_bytes: int, kv_bytes_per_token: int) -> int:
        blocks = self.cfg.backend.kv_blocks
        if blocks is None:  # sized from the free memory after loading: at least every slot's full KV cache
            return super().memory_estimate_bytes(model_bytes, kv_bytes_per_token)
        return model_bytes + blocks * self.cfg.engine.tokens_per_block * kv_bytes_per_token

    # -- engine ---------------------------------------------------------------------------------------------
    def build(self, engine_dir: Path) -> dict[str, Any]:
        return {"artifact": "none", "note": "hf_paged runs the checkpoint as it is; nothing is built"}

    def load(self, engine_dir: Path) -> None:
        e = self.cfg.engine
        model, _ = load_hf_model(self.model.path, self.dtype, e.attn_implementation, self.device)
        generation = transformers.GenerationConfig(do_sample=False, eos_token_id=-1)  # greedy, EOS never stops
        cb_config = transformers.ContinuousBatchingConfig(**self.continuous_batching_kwargs())
        started = time.perf_counter()
        # Not inference_mode: from 5.24 the manager's thread runs in the caller's mode, but up to 5.19 it runs in
        # none, and cache pages made as inference tensors could then not be written ("Inplace update to inference
        # tensor outside InferenceMode"). Frozen weights and no_grad record no autograd graph in either release.
        model.requires_grad_(False)
        with torch.no_grad():
            self.manager = model.init_continuous_batching(
                generation_config=generation, continuous_batching_config=cb_config
            )
            self.manager.warmup()  # captures the CUDA graphs, when on, before any request is timed
            self.manager.start()
        self.warmup_s = time.perf_counter() - started
        resolved = self.manager.continuous_batching_config
        log.info(
            "hf_paged: %s pages of %s tokens, %s batch tokens, %s requests per step, CUDA graphs %s, attention %s",
            resolved.num_blocks,
            getattr(resolved, page_field(config_fields())),
            resolved.max_batch_tokens,
            resolved.max_requests_per_batch,
            resolved.use_cuda_graph,
            model.config._attn_implementation,
        )

    def engine_figures(self) -> dict[str, float]:
        return {"compile_and_warmup_s": self.warmup_s}

    # -- serving --------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> str:
        self.submitted += 1
        manager_id = self.manager.add_request(
            request.input_ids,
            request_id=f"{request.id}#{self.submitted}",
            max_new_tokens=request.output_len,
            streaming=True,
            record_timestamps=True,
            eos_token_id=-1,  # EOS ignored: every request gets exactly its output length
        )
        if manager_id is None:  # the manager drops requests (with a warning) once it is stopping
            raise RuntimeError(f"transformers' continuous batching did not accept request {request.id}")
        return manager_id

    def next_output(self, timeout: float | None) -> Any:
        """The manager's next streamed output, or None after `timeout`; raises when its thread has stopped."""
        output = self.manager.get_result(timeout=POLL_S if timeout is None else min(timeout, POLL_S))
        if output is None and not self.manager.is_running():
            error = self.manager.background_thread_status.fatal_error
            raise RuntimeError(f"transformers' continuous batching thread stopped: {error!r}")
        if output is not None and output.error is not None:
            raise RuntimeError(f"transformers' continuous batching failed request {output.request_id}: {output.error}")
        return output

    def serve(self, stream: RequestStream, max_batch: int) -> None:
        """Requests go to the manager as they arrive (up to `max_batch` in flight); its scheduler admits them between
        steps. `admitted` is when the manager first scheduled the request, tokens carry the manager's host times."""
        self.serve_collecting(stream, max_batch)

    def serve_collecting(self, stream: RequestStream, max_batch: int) -> dict[str, list[int]]:
        """serve(), returning every request's output token ids by request id."""
        in_flight: dict[str, tuple[Request, float, int]] = {}  # manager id -> (request, handed at, tokens relayed)
        outputs: dict[str, list[int]] = {}
        while not stream.exhausted:
            if not in_flight:  # idle: sleep until the next arrival
                arrived = stream.take(max_batch, wait=True)
            else:
                arrived = stream.take(max_batch - len(in_flight))
            for request in arrived:
                in_flight[self.submit(request)] = (request, time.perf_counter(), 0)
            if not in_flight:
                continue
            next_arrival = stream.next_arrival()
            full = len(in_flight) >= max_batch
            # Wake for the next arrival, unless every slot is taken (or none is due): then for the next token.
            timeout = None if next_arrival is None or full else max(next_arrival - time.perf_counter(), 0.0)
            output = self.next_output(timeout)
            if output is None:
                continue
            request, handed_at, seen = in_flight[output.request_id]
            if seen == 0:
                stream.admitted(request.id, at=admission_time(output, handed_at))
            times = new_token_times(output, seen)
            for t in times:
                stream.tokens(request.id, 1, at=t)
            in_flight[output.request_id] = (request, handed_at, seen + len(times))
            if output.is_finished():
                del in_flight[output.request_id]
                if len(output.generated_tokens) != request.output_len:
                    raise RuntimeError(
                        f"request {request.id} got {len(output.generated_tokens)} tokens, not its "
                        f"{request.output_len}: transformers' continuous batching stopped it early"
                    )
                outputs[request.id] = output.generated_tokens
                stream.finished(request.id, at=stream.records[request.id].token_times[-1])
        return outputs

    def generate(self, requests: list[Request]) -> list[Generation]:
        """All requests at once through the same in-flight serving, as one batch."""
        stream = RequestStream(requests, offsets=[0.0] * len(requests))
        stream.start()
        token_ids = self.serve_collecting(stream, len(requests))
        return [
            Generation(token_ids=token_ids[r.id], token_times=timing.token_times)
            for r, timing in zip(requests, stream.results())
        ]

    def close(self) -> None:
        if self.manager is not None:
            self.manager.stop(block=True, timeout=30)  # a failed run may leave requests in flight: 30 s at most
            self.manager.destroy()
            self.manager = None
