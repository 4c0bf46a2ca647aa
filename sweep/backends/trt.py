"""trt: TensorRT-LLM engines through the TensorRT-engine path of tensorrt-llm 1.2.x.

`tensorrt_llm.LLM` is the PyTorch backend in 1.2 and rejects `build_config`; the engine path is
`tensorrt_llm._tensorrt_engine.LLM`. Upstream removed that path after 1.2, so only 1.2.x is accepted.

Build: HF checkpoint dir in, `LLM(model=hf_dir, build_config=...)` converts and builds, `llm.save(dir)` writes
config.json + rank0.engine. Load: `LLM(model=engine_dir)`. Serve: requests are submitted at once with
`generate_async(streaming=True)` and the runtime's in-flight batcher schedules them.

tensorrt_llm is imported only inside methods: importing it initialises CUDA and MPI, and this module must import
on machines without it (the backend registry imports every backend).

Field and flag names below were read from tensorrt-llm's source (NVIDIA/TensorRT-LLM; paths and commits in
tests/fixtures/trtllm_1_2_fields.json, which the tests check this mapping against).
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import re
import shlex
import sys
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from sweep.backends.base import Backend, Generation
from sweep.config import BackendConfig, ConfigError
from sweep.metrics import RequestTiming
from sweep.workload import Request, Workload

log = logging.getLogger(__name__)

SUPPORTED_SERIES = "1.2"
INSTALL_HINT = (
    "install it with: pip install 'tensorrt-llm==1.2.*' --extra-index-url https://pypi.nvidia.com "
    "(or pip install -e '.[trt]' --extra-index-url https://pypi.nvidia.com), plus MPI: "
    "apt-get install -y openmpi-bin libopenmpi-dev; it needs a Linux machine with an NVIDIA GPU"
)
# tensorrt_llm/commands/build.py: the choices of trtllm-build --log_level (its logger's severity_map).
LOG_LEVELS = ("internal_error", "error", "warning", "info", "verbose", "debug", "trace")
# tensorrt_llm/builder.py build(): reduce_fusion survives only for these architectures and tp_size > 1.
REDUCE_FUSION_ARCHITECTURES = ("LlamaForCausalLM", "Gemma2ForCausalLM", "MedusaForCausalLM")


@dataclass
class TRTBackendConfig(BackendConfig):
    """Runtime settings: they shape how the engine runs, not the engine, so they are not in the cache key."""

    name: str = "trt"
    # KvCacheConfig.free_gpu_memory_fraction: share of the free GPU memory (after the engine loads) for the KV cache.
    free_gpu_memory_fraction: float = 0.9
    # KvCacheConfig.enable_block_reuse: off for benchmarks, or repeated prompts skip their prefill.
    enable_block_reuse: bool = False
    # KvCacheConfig.max_tokens: a cap on KV cache tokens; null lets free_gpu_memory_fraction decide.
    max_tokens_in_kv_cache: Optional[int] = None
    # LLM(enable_chunked_prefill=...): needed when a prompt is longer than the engine's max_num_tokens.
    enable_chunked_prefill: bool = False
    # tensorrt_llm's logger level during build and serving (trtllm-build --log_level choices).
    log_level: str = "info"


@dataclass(frozen=True)
class OptionMapping:
    """Where one engine.* option goes: a field of BuildConfig, PluginConfig or the LLM call, and a trtllm-build flag."""

    option: str
    target: str  # "build_config", "plugin_config" or "llm"
    field: str
    flag: Optional[str]  # None: trtllm-build takes it from the checkpoint (dtype is fixed at conversion)


OPTION_MAP: tuple[OptionMapping, ...] = (
    OptionMapping("dtype", "llm", "dtype", None),
    OptionMapping("max_batch_size", "build_config", "max_batch_size", "--max_batch_size"),
    OptionMapping("max_input_len", "build_config", "max_input_len", "--max_input_len"),
    OptionMapping("max_seq_len", "build_config", "max_seq_len", "--max_seq_len"),
    OptionMapping("max_num_tokens", "build_config", "max_num_tokens", "--max_num_tokens"),
    OptionMapping("gemm_plugin", "plugin_config", "gemm_plugin", "--gemm_plugin"),
    OptionMapping("gpt_attention_plugin", "plugin_config", "gpt_attention_plugin", "--gpt_attention_plugin"),
    OptionMapping("context_fmha", "plugin_config", "context_fmha", "--context_fmha"),
    # trtllm-build calls --paged_kv_cache deprecated and points to --kv_cache_type paged|continuous.
    OptionMapping("paged_kv_cache", "plugin_config", "paged_kv_cache", "--kv_cache_type"),
    OptionMapping("tokens_per_block", "plugin_config", "tokens_per_block", "--tokens_per_block"),
)


# -- pure functions: engine options -> tensorrt_llm arguments ----------------------------------------------------


def plugin_value(value: Any) -> Any:
    """engine.* plugin values to PluginConfig values: 'disable' means the plugin is off, which PluginConfig spells None."""
    return None if value == "disable" else value


def mapped_kwargs(engine: Mapping[str, Any], target: str) -> dict[str, Any]:
    """The keyword arguments that `target` ("build_config", "plugin_config" or "llm") gets from the engine options."""
    kwargs = {m.field: engine[m.option] for m in OPTION_MAP if m.target == target}
    if target == "plugin_config":
        kwargs = {k: plugin_value(v) for k, v in kwargs.items()}
    return kwargs


def build_config_kwargs(engine: Mapping[str, Any]) -> dict[str, Any]:
    return mapped_kwargs(engine, "build_config")


def plugin_config_kwargs(engine: Mapping[str, Any]) -> dict[str, Any]:
    return mapped_kwargs(engine, "plugin_config")


def flag_value(mapping: OptionMapping, value: Any) -> str:
    """How trtllm-build spells a value: enable/disable for switches, paged/continuous for the KV cache type."""
    if mapping.flag == "--kv_cache_type":
        return "paged" if value else "continuous"
    if isinstance(value, bool):
        return "enable" if value else "disable"
    return str(value)


def trtllm_build_argv(
    engine: Mapping[str, Any], checkpoint_dir: str = "<trtllm_checkpoint_dir>", output_dir: str = "<engine_dir>"
) -> list[str]:
    """The trtllm-build command that builds the same engine by hand, from a TensorRT-LLM checkpoint.

    Every mapped option is written out, max_seq_len included: left out, trtllm-build would deduce it from the
    model's max_position_embeddings and build a different engine.
    """
    argv = ["trtllm-build", "--checkpoint_dir", checkpoint_dir, "--output_dir", output_dir]
    for m in OPTION_MAP:
        if m.flag is not None:
            argv += [m.flag, flag_value(m, engine[m.option])]
    return argv


def convert_checkpoint_note(dtype: str) -> str:
    return (
        "trtllm-build reads a TensorRT-LLM checkpoint, not a Hugging Face one: first run the model family's "
        f"convert_checkpoint.py from the TensorRT-LLM examples with --model_dir <hf_dir> --dtype {dtype} "
        "--output_dir <trtllm_checkpoint_dir> (the LLM API does this conversion itself)"
    )


def field_names(config_class: Any) -> list[str]:
    """The fields of a config class: BuildConfig was a dataclass and became a pydantic model during 1.2."""
    if hasattr(config_class, "model_fields"):
        return sorted(config_class.model_fields)
    import dataclasses

    return sorted(f.name for f in dataclasses.fields(config_class))


def check_fields(kwargs: Mapping[str, Any], valid: list[str], owner: str, version: str) -> None:
    """Refuse a keyword that the installed class lacks.

    PluginConfig ignores unknown keywords (pydantic extra="ignore"), so without this check a renamed field would
    build an engine without the option and nobody would know.
    """
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        options = [m.option for m in OPTION_MAP if m.target != "llm" and m.field in unknown]
        raise ConfigError(
            f"engine option(s) {', '.join(options)} map to {owner} field(s) {', '.join(unknown)}, which "
            f"tensorrt_llm {version} does not have; valid {owner} fields: {', '.join(sorted(valid))}"
        )


def check_supported_version(version: Optional[str]) -> None:
    if version is None:
        raise ConfigError(f"backend=trt needs tensorrt-llm {SUPPORTED_SERIES}.x, which is not installed; {INSTALL_HINT}")
    if not re.fullmatch(r"1\.2(\..*)?", version):
        raise ConfigError(
            f"backend=trt supports tensorrt-llm {SUPPORTED_SERIES}.x only (its TensorRT-engine path, "
            f"tensorrt_llm._tensorrt_engine, was removed after 1.2); found tensorrt-llm {version}. {INSTALL_HINT}"
        )


def cache_key_libraries(trtllm_version: str, gpu_sm: str, tensorrt_version: Optional[str]) -> dict[str, str]:
    """What the engine depends on beyond the options: a TensorRT engine only runs on the SM and versions it was built for."""
    libraries = {"tensorrt_llm": trtllm_version, "gpu_sm": gpu_sm}
    if tensorrt_version:
        libraries["tensorrt"] = tensorrt_version
    return libraries


def kv_cache_kwargs(backend_cfg: Any) -> dict[str, Any]:
    kwargs = {
        "free_gpu_memory_fraction": backend_cfg.free_gpu_memory_fraction,
        "enable_block_reuse": backend_cfg.enable_block_reuse,
    }
    if backend_cfg.max_tokens_in_kv_cache is not None:
        kwargs["max_tokens"] = backend_cfg.max_tokens_in_kv_cache
    return kwargs


def sampling_kwargs(output_len: int, end_id: int, pad_id: int) -> dict[str, Any]:
    """Greedy (top_k=1), exactly output_len tokens (EOS ignored), token ids only (no detokenisation cost)."""
    return {
        "max_tokens": output_len,
        "ignore_eos": True,
        "top_k": 1,
        "end_id": end_id,
        "pad_id": pad_id,
        "detokenize": False,
    }


# -- pure functions: what tensorrt_llm will change without saying so ----------------------------------------------


def effective_max_num_tokens(build_kw: Mapping[str, Any], plugin: Mapping[str, Any]) -> int:
    """max_num_tokens as tensorrt_llm._common.check_max_num_tokens leaves it."""
    ceiling = build_kw["max_seq_len"] * build_kw["max_batch_size"]
    if not plugin["remove_input_padding"]:  # padded batches: the builder sizes for the worst case itself
        return ceiling
    n = min(build_kw["max_num_tokens"], ceiling)
    if not plugin["context_fmha"] and n < build_kw["max_input_len"]:
        return build_kw["max_input_len"]
    if plugin["context_fmha"] and n < plugin["tokens_per_block"]:
        return plugin["tokens_per_block"]
    return n


def length_overrides(build_kw: Mapping[str, Any], plugin: Mapping[str, Any]) -> list[str]:
    """The builder's corrections to max_input_len and max_num_tokens (builder._init_max_seq_len, check_max_num_tokens)."""
    notes = []
    if build_kw["max_input_len"] > build_kw["max_seq_len"]:
        notes.append(
            f"max_input_len={build_kw['max_input_len']} is clipped to max_seq_len={build_kw['max_seq_len']} by the builder"
        )
    if plugin["remove_input_padding"] and plugin["context_fmha"]:
        notes.append(
            "with remove_input_padding and context_fmha both on, the builder ignores max_input_len "
            "(the runtime still refuses longer prompts)"
        )
    effective = effective_max_num_tokens(build_kw, plugin)
    if effective != build_kw["max_num_tokens"]:
        notes.append(f"max_num_tokens={build_kw['max_num_tokens']} is changed to {effective} by the builder")
    return notes


def fusion_overrides(plugin: Mapping[str, Any], architecture: str, tp_size: int) -> list[str]:
    """builder.build(): fusions that are switched off for most models, Qwen among them, and for a single GPU."""
    notes = []
    reduce_fusion = plugin["reduce_fusion"]
    if reduce_fusion and (tp_size == 1 or architecture not in REDUCE_FUSION_ARCHITECTURES):
        notes.append(f"reduce_fusion is forced off (architecture {architecture}, tp_size {tp_size})")
        reduce_fusion = False
    if plugin["user_buffer"] and not reduce_fusion:
        notes.append("user_buffer is forced off because reduce_fusion is off")
    if plugin["norm_quant_fusion"] and (reduce_fusion or architecture != "LlamaForCausalLM"):
        notes.append(f"norm_quant_fusion is forced off (only Llama with NVFP4 keeps it; architecture {architecture})")
    return notes


def fmha_overrides(plugin: Mapping[str, Any]) -> list[str]:
    """builder.build() for an unquantized model: which context-FMHA variants survive."""
    if not plugin["context_fmha"]:
        return [
            "context_fmha is off, so the builder also turns off use_paged_context_fmha and use_fp8_context_fmha "
            "(no KV cache reuse, no chunked context)"
        ]
    if plugin["use_fp8_context_fmha"]:
        return ["use_fp8_context_fmha (on by default) is forced off: the model is not FP8-quantized"]
    return []


def predicted_overrides(
    build_kw: Mapping[str, Any],
    plugin_kw: Mapping[str, Any],
    plugin_defaults: Mapping[str, Any],
    architecture: str,
    tp_size: int = 1,
) -> list[str]:
    """Known silent overrides of the build, as warnings, for an unquantized checkpoint (the only kind sweep builds)."""
    plugin = {**plugin_defaults, **plugin_kw}
    return length_overrides(build_kw, plugin) + fusion_overrides(plugin, architecture, tp_size) + fmha_overrides(plugin)


def checkpoint_architecture(model_path: Path) -> str:
    config = json.loads((Path(model_path) / "config.json").read_text())
    return (config.get("architectures") or ["unknown"])[0]


# -- tensorrt_llm, imported on demand ------------------------------------------------------------------------------


def installed_version() -> Optional[str]:
    """tensorrt-llm's version from its package metadata, without importing it (importing starts CUDA and MPI)."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return None
    try:
        return metadata.version("tensorrt_llm")
    except metadata.PackageNotFoundError:
        return "unknown (no package metadata)"


def import_tensorrt_llm() -> Any:
    check_supported_version(installed_version())
    try:
        import tensorrt_llm
    except (ImportError, OSError) as exc:  # e.g. a missing libmpi or CUDA library
        raise ConfigError(f"tensorrt_llm is installed but does not import ({exc}); {INSTALL_HINT}") from None
    return tensorrt_llm


def plugin_field_defaults(plugin_config_class: Any) -> dict[str, Any]:
    if hasattr(plugin_config_class, "model_fields"):
        return {name: f.default for name, f in plugin_config_class.model_fields.items()}
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(plugin_config_class)}


def gpu_sm() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}{minor}"


def tensorrt_version() -> Optional[str]:
    try:
        import tensorrt

        return tensorrt.__version__
    except ImportError:
        return None


@contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send everything written to stdout and stderr to `path`, at both levels.

    The builder logs from C++ and from MPI worker processes straight to file descriptors 1 and 2, so those are
    redirected; Python code writes to sys.stdout/sys.stderr, which need not be fds 1 and 2 (pytest, notebooks), so
    those are swapped too.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as sink, open(path, "a", buffering=1) as text:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with redirect_stdout(text), redirect_stderr(text):
                yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no build log)"


# -- streaming: per-token host timestamps -------------------------------------------------------------------------


async def collect_stream(stream: Any) -> Generation:
    """Timestamp each new token as its streamed response reaches this process.

    A streamed RequestOutput's outputs[0].token_ids grows with every response; the new ones are those past what we
    have. Tokens that arrive in one response share its timestamp: that is when they became available on the host.
    """
    ids: list[int] = []
    times: list[float] = []
    async for step in stream:
        new = list(step.outputs[0].token_ids[len(ids):])
        now = time.perf_counter()
        ids += new
        times += [now] * len(new)
    return Generation(token_ids=ids, token_times=times)


class TRTBackend(Backend):
    name = "trt"
    config_class = TRTBackendConfig
    honoured_options = tuple(m.option for m in OPTION_MAP)

    def __init__(self, cfg: Any, model: Any, device: str, dtype: str):
        super().__init__(cfg, model, device, dtype)
        self.llm: Any = None
        self.warnings: list[str] = []

    # -- before anything is built ---------------------------------------------------------------------------
    @classmethod
    def check_installed(cls) -> None:
        """Cheap (no import): is a supported tensorrt-llm there? For callers that want to fail before any work."""
        check_supported_version(installed_version())

    def engine_options(self) -> dict[str, Any]:
        """The honoured engine.* options, with dtype resolved (engine.dtype may say auto)."""
        engine = {m.option: self.cfg.engine[m.option] for m in OPTION_MAP}
        engine["dtype"] = self.dtype
        return engine

    def check(self, workload: Workload, max_position_embeddings: int | None) -> None:
        version = import_tensorrt_llm().__version__  # first: without it nothing else here can be checked
        if self.device != "cuda":
            raise ConfigError(f"backend=trt needs a CUDA GPU, but device resolved to {self.device!r}")
        self.check_runtime_settings()
        super().check(workload, max_position_embeddings)
        build_kw, plugin_kw, plugin_defaults = self.check_against_installed(version)
        self.check_prompt_fits(workload, build_kw, {**plugin_defaults, **plugin_kw})
        architecture = checkpoint_architecture(self.model.path)
        self.warnings = predicted_overrides(build_kw, plugin_kw, plugin_defaults, architecture)
        for note in self.warnings:
            log.warning("tensorrt_llm will override: %s", note)

    def check_against_installed(self, version: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """The BuildConfig and PluginConfig keywords, checked against the installed classes, and PluginConfig's defaults."""
        from tensorrt_llm.builder import BuildConfig
        from tensorrt_llm.plugin import PluginConfig

        engine = self.engine_options()
        build_kw, plugin_kw = build_config_kwargs(engine), plugin_config_kwargs(engine)
        check_fields(build_kw, field_names(BuildConfig), "BuildConfig", version)
        check_fields(plugin_kw, field_names(PluginConfig), "PluginConfig", version)
        return build_kw, plugin_kw, plugin_field_defaults(PluginConfig)

    def check_runtime_settings(self) -> None:
        b = self.cfg.backend
        if not 0 < b.free_gpu_memory_fraction <= 1:
            raise ConfigError(
                f"backend.free_gpu_memory_fraction={b.free_gpu_memory_fraction!r} is not allowed; it must be in (0, 1]"
            )
        if b.log_level not in LOG_LEVELS:
            raise ConfigError(f"backend.log_level={b.log_level!r} is not allowed; choose one of: {', '.join(LOG_LEVELS)}")

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

        return cache_key_libraries(tensorrt_llm.__version__, gpu_sm(), tensorrt_version())

    # -- engine ---------------------------------------------------------------------------------------------
    def build(self, engine_dir: Path) -> dict[str, Any]:
        import tensorrt_llm
        from tensorrt_llm._tensorrt_engine import LLM
        from tensorrt_llm.builder import BuildConfig
        from tensorrt_llm.plugin import PluginConfig

        engine = self.engine_options()
        build_kw, plugin_kw = build_config_kwargs(engine), plugin_config_kwargs(engine)
        build_config = BuildConfig(**build_kw, plugin_config=PluginConfig(**plugin_kw))
        log_path = engine_dir / "build.log"
        log.info("building a TensorRT-LLM engine from %s; build log: %s", self.model.path, log_path)
        self.set_log_level()
        try:
            with output_to(log_path):
                llm = LLM(model=str(self.model.path), dtype=self.dtype, build_config=build_config)
                try:
                    llm.save(str(engine_dir))
                finally:
                    llm.shutdown()
        except BaseException:
            log.error("TensorRT-LLM engine build failed; last lines of its log:\n%s", log_tail(log_path))
            raise
        return {
            "artifact": "tensorrt-llm engine (TensorRT-engine path)",
            "tensorrt_llm_version": tensorrt_llm.__version__,
            "gpu_sm": gpu_sm(),
            "llm_kwargs": mapped_kwargs(engine, "llm"),
            "build_config": build_kw,
            "plugin_config": plugin_kw,
            "trtllm_build_command": shlex.join(trtllm_build_argv(engine)),
            "convert_checkpoint": convert_checkpoint_note(self.dtype),
            "warnings": self.warnings,
            "engine_files": sorted(p.name for p in engine_dir.iterdir()),
        }

    def set_log_level(self) -> None:
        from tensorrt_llm.logger import logger

        logger.set_level(self.cfg.backend.log_level)

    def load(self, engine_dir: Path) -> None:
        from tensorrt_llm._tensorrt_engine import LLM
        from tensorrt_llm.llmapi.llm_args import KvCacheConfig
        from transformers import AutoTokenizer

        self.set_log_level()
        tokenizer = AutoTokenizer.from_pretrained(self.model.path)
        self.end_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id
        self.llm = LLM(
            model=str(engine_dir),
            tokenizer=str(self.model.path),  # the saved engine directory holds no tokenizer files
            kv_cache_config=KvCacheConfig(**kv_cache_kwargs(self.cfg.backend)),
            enable_chunked_prefill=self.cfg.backend.enable_chunked_prefill,
        )

    # -- serving --------------------------------------------------------------------------------------------
    def sampling_params(self, request: Request) -> Any:
        from tensorrt_llm.sampling_params import SamplingParams

        return SamplingParams(**sampling_kwargs(request.output_len, self.end_id, self.pad_id))

    async def stream_one(self, request: Request, slots: asyncio.Semaphore) -> Generation:
        async with slots:
            # Called inside the event loop, so the result gets an asyncio queue and can be awaited token by token.
            stream = self.llm.generate_async(request.input_ids, sampling_params=self.sampling_params(request), streaming=True)
            return await collect_stream(stream)

    async def stream_all(self, requests: list[Request], in_flight: int) -> list[Generation]:
        slots = asyncio.Semaphore(in_flight)
        return list(await asyncio.gather(*(self.stream_one(r, slots) for r in requests)))

    def generate(self, requests: list[Request]) -> list[Generation]:
        return asyncio.run(self.stream_all(requests, in_flight=len(requests)))

    def serve(self, requests: list[Request], batch_size: int, iteration: int) -> list[RequestTiming]:
        """All requests arrive at t0; up to batch_size are in flight and the runtime batches them as they come and go."""
        t0 = time.perf_counter()
        generations = asyncio.run(self.stream_all(requests, in_flight=batch_size))
        return [
            RequestTiming(r.id, r.input_len, r.output_len, t0, g.token_times, iteration)
            for r, g in zip(requests, generations)
        ]

    def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
