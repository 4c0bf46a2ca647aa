"""trt: TensorRT-LLM engines through the TensorRT-engine path of tensorrt-llm 1.2.x.

`tensorrt_llm.LLM` is the PyTorch backend in 1.2 and rejects `build_config`; the engine path is
`tensorrt_llm._tensorrt_engine.LLM`. Upstream removed that path in July 2026, so only the releases that still ship
it are accepted (options.has_engine_path: 1.2.x and 1.3.0rc0 to rc15).

Build: HF checkpoint dir in, `LLM(model=hf_dir, build_config=...)` converts and builds, then starts its executor
(worker, engine load, KV cache); `llm.save(dir)` writes config.json + rank0.engine. That LLM then serves the run, so
a cache miss loads the engine once. Load on a hit: `LLM(model=engine_dir)`. Serve: requests are submitted at once
with `generate_async(streaming=True)` and the runtime's in-flight batcher schedules them.

tensorrt_llm is imported through runtime.import_tensorrt_llm(), after its version has been checked.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import time
from pathlib import Path
from typing import Any, Mapping

from sweep.backends.base import Backend, Generation, engine_gpus
from sweep.backends.quantization import fp8_refusal, gpu_capability
from sweep.backends.trt import runtime
from sweep.backends.trt.options import (
    LOG_LEVELS,
    MMHA_HEAD_SIZES,
    OPTION_MAP,
    build_config_kwargs,
    cache_key_libraries,
    check_fields,
    check_servable,
    convert_checkpoint_note,
    effective_max_num_tokens,
    field_names,
    kv_cache_kwargs,
    mapped_kwargs,
    plugin_config_kwargs,
    predicted_overrides,
    quant_config_kwargs,
    sampling_kwargs,
    trtllm_build_argv,
)
from sweep.config.errors import ConfigError
from sweep.workload.requests import Request, Workload
from sweep.workload.stream import RequestStream, serve_in_flight

log = logging.getLogger(__name__)


class TRTBackend(Backend):
    name = "trt"
    honoured_options = tuple(m.option for m in OPTION_MAP)
    artifact_options = tuple(m.option for m in OPTION_MAP if m.option != "dtype")
    supported_head_sizes = MMHA_HEAD_SIZES
    # tensorrt_llm's checkpoint converters duplicate a KV head for each rank when tp_size exceeds the KV heads.
    replicates_kv_heads = True

    def __init__(self, cfg: Any, model: Any, device: str, dtype: str):
        super().__init__(cfg, model, device, dtype)
        self.llm: Any = None
        self.warnings: list[str] = []
        self.timings: dict[str, float] = {}  # build_time_s and model_load_s, as engine_figures() reports them

    # -- before anything is built ---------------------------------------------------------------------------
    @classmethod
    def check_installed(cls) -> None:
        """Cheap (no import): is a supported tensorrt-llm there? For callers that want to fail before any work."""
        runtime.check_supported_version(runtime.installed_version())

    def engine_options(self) -> dict[str, Any]:
        """The honoured engine.* options, with dtype resolved (engine.dtype may say auto)."""
        engine = {m.option: self.cfg.engine[m.option] for m in OPTION_MAP}
        engine["dtype"] = self.dtype
        return engine

    def check(self, workload: Workload) -> None:
        version = runtime.import_tensorrt_llm().__version__  # first: without it nothing else here can be checked
        if self.device != "cuda":
            raise ConfigError(f"backend=trt needs a CUDA GPU, but device resolved to {self.device!r}")
        check_servable(self.engine_options())
        self.check_runtime_settings()
        super().check(workload)  # lengths, and the head size against MMHA_HEAD_SIZES
        build_kw, plugin_kw, plugin_defaults = self.check_against_installed(version)
        self.check_prompt_fits(workload, build_kw, {**plugin_defaults, **plugin_kw})
        architecture = self.model.shape.architecture
        engine = self.engine_options()
        fp8 = engine["quantization"] == "fp8" or engine["kv_cache_dtype"] == "fp8"
        self.warnings = predicted_overrides(
            build_kw, plugin_kw, plugin_defaults, architecture, tp_size=engine["tp_size"], fp8=fp8
        )
        for note in self.warnings:
            log.warning("tensorrt_llm will override: %s", note)

    def check_against_installed(self, version: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """BuildConfig, PluginConfig and QuantConfig keywords, checked against the installed classes; PluginConfig's
        defaults."""
        from tensorrt_llm.builder import BuildConfig
        from tensorrt_llm.llmapi import QuantConfig
        from tensorrt_llm.plugin import PluginConfig

        engine = self.engine_options()
        build_kw, plugin_kw = build_config_kwargs(engine), plugin_config_kwargs(engine)
        check_fields(build_kw, field_names(BuildConfig), "BuildConfig", version)
        check_fields(plugin_kw, field_names(PluginConfig), "PluginConfig", version)
        check_fields(quant_config_kwargs(engine) or {}, field_names(QuantConfig), "QuantConfig", version)
        return build_kw, plugin_kw, runtime.plugin_field_defaults(PluginConfig)

    def quantization_refusals(self) -> dict[str, str | None]:
        fp8 = fp8_refusal(self.device, gpu_capability(self.device))
        return {"none": None, "int8_weight_only": None, "int4_weight_only": None, "fp8": fp8}

    def kv_cache_dtype_refusals(self) -> dict[str, str | None]:
        return {"auto": None, "fp8": fp8_refusal(self.device, gpu_capability(self.device))}

    def check_runtime_settings(self) -> None:
        b = self.cfg.backend
        if not 0 < b.free_gpu_memory_fraction <= 1:
            raise ConfigError(
                f"backend.free_gpu_memory_fraction={b.free_gpu_memory_fraction!r} is not allowed; it must be in (0, 1]"
            )
        if b.log_level not in LOG_LEVELS:
            raise ConfigError(
                f"backend.log_level={b.log_level!r} is not allowed; choose one of: {', '.join(LOG_LEVELS)}"
            )
        if b.single_process_worker and engine_gpus(self.cfg.engine) > 1:
            raise ConfigError(
                f"backend.single_process_worker=true is not allowed with engine.tp_size={self.cfg.engine.tp_size} x "
                f"engine.pp_size={self.cfg.engine.pp_size}: the worker in this process drives one GPU; an engine on "
                "several needs MPI's worker processes"
            )

    def check_prompt_fits(self, workload: Workload, build_kw: Mapping[str, Any], plugin: Mapping[str, Any]) -> None:
        # check_max_num_tokens warns that a context longer than max_num_tokens needs chunked context at runtime.
        limit = effective_max_num_tokens(build_kw, plugin)
        if workload.max_input_len > limit and not self.cfg.backend.enable_chunked_prefill:
            raise ConfigError(
                f"the workload's longest input ({workload.max_input_len} tokens) exceeds the engine's max_num_tokens "
                f"({limit} after the builder's adjustment); raise engine.max_num_tokens or set "
                "backend.enable_chunked_prefill=true"
            )

    def memory_estimate_bytes(self, model_bytes: int, kv_bytes_per_token: int) -> int:
        """Weights plus one full-length sequence of KV cache.

        The runtime does not reserve KV cache for every batch slot: it takes free_gpu_memory_fraction of what is free
        after loading and the in-flight batcher admits as many requests as fit, so only one sequence must fit.
        """
        return model_bytes + self.cfg.engine.max_seq_len * kv_bytes_per_token

    def library_versions(self) -> dict[str, str]:
        import tensorrt_llm

        return cache_key_libraries(tensorrt_llm.__version__, runtime.gpu_sm(), runtime.tensorrt_version())

    # -- engine ---------------------------------------------------------------------------------------------
    def build(self, engine_dir: Path) -> dict[str, Any]:
        """Build and save the engine; keep the LLM that built it (its executor is running) to serve this run."""
        import tensorrt_llm
        from tensorrt_llm._tensorrt_engine import LLM
        from tensorrt_llm.builder import BuildConfig
        from tensorrt_llm.llmapi import QuantConfig
        from tensorrt_llm.plugin import PluginConfig

        engine = self.engine_options()
        build_kw, plugin_kw = build_config_kwargs(engine), plugin_config_kwargs(engine)
        quant_kw = quant_config_kwargs(engine)
        build_config = BuildConfig(**build_kw, plugin_config=PluginConfig(**plugin_kw))
        quantized = {"quant_config": QuantConfig(**quant_kw)} if quant_kw else {}
        log_path = engine_dir / "build.log"
        log.info("building a TensorRT-LLM engine from %s; build log: %s", self.model.path, log_path)
        self.set_log_level()
        try:
            with runtime.output_to(log_path), runtime.worker_environment(self.cfg.backend):
                start = time.perf_counter()
                self.llm = LLM(
                    model=str(self.model.path),
                    **mapped_kwargs(engine, "llm"),  # dtype, tensor_parallel_size, pipeline_parallel_size
                    build_config=build_config,
                    **quantized,
                    **self.runtime_kwargs(),
                )
                constructed = time.perf_counter()
                self.llm.save(str(engine_dir))
                saved = time.perf_counter()
        except BaseException:
            log.error("TensorRT-LLM engine build failed; last lines of its log:\n%s", runtime.log_tail(log_path))
            self.close()
            raise
        steps = [(str(name), float(s)) for name, s in self.llm.llm_build_stats.build_steps_info]
        self.timings = runtime.split_build_time(constructed - start, saved - constructed, steps)
        self.set_token_ids()
        return {
            "artifact": "tensorrt-llm engine (TensorRT-engine path)",
            "tensorrt_llm_version": tensorrt_llm.__version__,
            "gpu_sm": runtime.gpu_sm(),
            "llm_kwargs": mapped_kwargs(engine, "llm"),
            "build_config": build_kw,
            "plugin_config": plugin_kw,
            "quant_config": quant_kw,
            "trtllm_build_command": shlex.join(trtllm_build_argv(engine)),
            "convert_checkpoint": convert_checkpoint_note(self.dtype, engine["tp_size"], engine["pp_size"]),
            "warnings": self.warnings,
            "build_steps_s": dict(steps),
            **self.timings,
            "engine_files": sorted(p.name for p in engine_dir.iterdir()),
        }

    def parallel_kwargs(self) -> dict[str, Any]:
        """The ranks a saved engine is loaded on: the ones it was built for (the LLM API checks them against the
        engine's config.json)."""
        llm = mapped_kwargs(self.engine_options(), "llm")
        return {k: llm[k] for k in ("tensor_parallel_size", "pipeline_parallel_size")}

    def runtime_kwargs(self) -> dict[str, Any]:
        """What the LLM call gets beyond the engine: the KV cache and chunked prefill (backend.*)."""
        from tensorrt_llm.llmapi.llm_args import KvCacheConfig

        return {
            "kv_cache_config": KvCacheConfig(**kv_cache_kwargs(self.cfg.backend)),
            "enable_chunked_prefill": self.cfg.backend.enable_chunked_prefill,
        }

    def set_log_level(self) -> None:
        """tensorrt_llm's logger in this process; the worker reads TLLM_LOG_LEVEL (runtime.worker_environment)."""
        from tensorrt_llm.logger import logger

        logger.set_level(self.cfg.backend.log_level)

    def set_token_ids(self) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model.path)
        self.end_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id

    def load(self, engine_dir: Path) -> None:
        if self.llm is not None:  # built in this process: its LLM already serves the engine it just saved
            return
        from tensorrt_llm._tensorrt_engine import LLM

        self.set_log_level()
        self.set_token_ids()
        start = time.perf_counter()
        with runtime.worker_environment(self.cfg.backend):
            # llm.save copies the checkpoint's tokenizer* files too, but the checkpoint stays the one source of it.
            self.llm = LLM(
                model=str(engine_dir),
                tokenizer=str(self.model.path),
                **self.parallel_kwargs(),
                **self.runtime_kwargs(),
            )
        self.timings = {"model_load_s": time.perf_counter() - start}

    def engine_figures(self) -> dict[str, float]:
        """On a miss, build_time_s is the build alone and model_load_s the executor start it included."""
        return dict(self.timings)

    # -- serving --------------------------------------------------------------------------------------------
    def sampling_params(self, request: Request) -> Any:
        from tensorrt_llm.sampling_params import SamplingParams

        return SamplingParams(**sampling_kwargs(request.output_len, self.end_id, self.pad_id))

    async def stream_one(self, request: Request, slots: asyncio.Semaphore, streams: list[Any]) -> Generation:
        async with slots:
            # Called inside the event loop, so the result gets an asyncio queue and can be awaited token by token.
            stream = self.llm.generate_async(
                request.input_ids, sampling_params=self.sampling_params(request), streaming=True
            )
            streams.append(stream)
            return await runtime.collect_stream(stream)

    async def stream_all(self, requests: list[Request], in_flight: int) -> list[Generation]:
        """Every request's stream; if one fails, the others are aborted and awaited before the error is raised.

        Left running, they would stay bound to this event loop after asyncio.run closes it, and the executor would
        keep delivering their tokens into a dead loop.
        """
        slots, streams = asyncio.Semaphore(in_flight), []
        tasks = [asyncio.ensure_future(self.stream_one(r, slots, streams)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            runtime.abort_streams(streams, tasks)
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def generate(self, requests: list[Request]) -> list[Generation]:
        return asyncio.run(self.stream_all(requests, in_flight=len(requests)))

    def serve(self, stream: RequestStream, max_batch: int) -> None:
        """Requests go to the runtime as they arrive (up to `max_batch` in flight); its in-flight batcher admits
        them between steps. `admitted` is when a request was handed to the runtime: its own queue is not visible."""
        asyncio.run(self.serve_async(stream, max_batch))

    async def serve_async(self, stream: RequestStream, max_in_flight: int) -> None:
        streams: list[Any] = []

        async def relay(request: Request) -> None:
            stream.admitted(request.id)
            responses = self.llm.generate_async(
                request.input_ids, sampling_params=self.sampling_params(request), streaming=True
            )
            streams.append(responses)
            seen = 0
            async for step in responses:
                new = len(step.outputs[0].token_ids) - seen
                seen += new
                stream.tokens(request.id, new)
            stream.finished(request.id)

        await serve_in_flight(
            stream, max_in_flight, relay, stop=lambda tasks: runtime.abort_streams(streams, list(tasks))
        )

    def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
