"""Pure mapping from engine.* options to tensorrt_llm's arguments, and what its builder changes without saying so.

Field and flag names were read from tensorrt-llm's source (NVIDIA/TensorRT-LLM; paths and commits in
tests/fixtures/trtllm_1_2_fields.json, which the tests check this mapping against). Nothing here imports
tensorrt_llm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from sweep.config.errors import ConfigError

# Releases that still ship tensorrt_llm._tensorrt_engine, the TensorRT-engine path this backend drives: 1.2.x, and
# the 1.3 release candidates published before the path was deleted on main (July 2026). The newest
# release known to have it is LAST_WITH_ENGINE_PATH; how this was determined is in docs/backends.md (trt).
SUPPORTED_SERIES = "1.2"
LAST_WITH_ENGINE_PATH = "1.3.0rc15"
INSTALL_HINT = (
    "install it with: pip install 'tensorrt-llm==1.2.*' --extra-index-url https://pypi.nvidia.com "
    "(or pip install -e '.[trt]' --extra-index-url https://pypi.nvidia.com), plus MPI: "
    "apt-get install -y openmpi-bin libopenmpi-dev; it needs a Linux machine with an NVIDIA GPU"
)
# tensorrt_llm/commands/build.py: the choices of trtllm-build --log_level (its logger's severity_map).
LOG_LEVELS = ("internal_error", "error", "warning", "info", "verbose", "debug", "trace")
# cpp/tensorrt_llm/kernels/decoderMaskedMultiheadAttention/decoderMaskedMultiheadAttention.cpp,
# MMHA_SUPPORTED_HEAD_SIZES: the GPT attention plugin fails a build with "Head size N is not supported by MMHA".
MMHA_HEAD_SIZES = (32, 48, 64, 80, 96, 104, 112, 128, 144, 160, 192, 224, 256)
# tensorrt_llm/builder.py build(): reduce_fusion survives only for these architectures and tp_size > 1.
REDUCE_FUSION_ARCHITECTURES = ("LlamaForCausalLM", "Gemma2ForCausalLM", "MedusaForCausalLM")


@dataclass(frozen=True)
class OptionMapping:
    """Where one engine.* option goes: a field of BuildConfig, PluginConfig or the LLM call, and a trtllm-build flag."""

    option: str
    target: str  # "build_config", "plugin_config", "llm" or "quant_config" (the LLM call's QuantConfig)
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
    # Quantized while the LLM API converts the checkpoint (trtllm-build takes an already quantized one).
    OptionMapping("quantization", "quant_config", "quant_algo", None),
    OptionMapping("kv_cache_dtype", "quant_config", "kv_cache_quant_algo", None),
    # BaseLlmArgs.tensor_parallel_size / pipeline_parallel_size: the LLM API converts the checkpoint into one shard
    # per rank and builds rank<N>.engine for each (by hand: convert_checkpoint.py --tp_size / --pp_size).
    OptionMapping("tp_size", "llm", "tensor_parallel_size", None),
    OptionMapping("pp_size", "llm", "pipeline_parallel_size", None),
)
# engine.quantization -> QuantAlgo (tensorrt_llm/quantization/mode.py). W8A16 and W4A16 are per-channel weight-only
# and FP8_PER_CHANNEL_PER_TOKEN is fp8 weights per channel with fp8 activations per token: none of the three needs
# calibration data (QuantConfig._requires_calibration).
QUANT_ALGOS = {
    "none": None,
    "int8_weight_only": "W8A16",
    "int4_weight_only": "W4A16",
    "fp8": "FP8_PER_CHANNEL_PER_TOKEN",
}
# engine.kv_cache_dtype -> kv_cache_quant_algo. An FP8 KV cache is calibrated by ModelOpt while the LLM API
# converts the checkpoint (its CalibConfig: a calibration dataset, from the hub unless calib_config names a local one).
KV_CACHE_QUANT_ALGOS = {"auto": None, "fp8": "FP8"}


# -- pure functions: engine options -> tensorrt_llm arguments ----------------------------------------------------


def plugin_value(value: Any) -> Any:
    """engine.* plugin values to PluginConfig values: 'disable' (plugin off) is spelled None by PluginConfig."""
    return None if value == "disable" else value


def mapped_kwargs(engine: Mapping[str, Any], target: str) -> dict[str, Any]:
    """The keyword arguments that `target` ("build_config", "plugin_config", "llm" or "quant_config") gets from the
    engine options."""
    kwargs = {m.field: engine[m.option] for m in OPTION_MAP if m.target == target}
    if target == "plugin_config":
        kwargs = {k: plugin_value(v) for k, v in kwargs.items()}
    if target == "quant_config":
        kwargs = {
            "quant_algo": QUANT_ALGOS[kwargs["quant_algo"]],
            "kv_cache_quant_algo": KV_CACHE_QUANT_ALGOS[kwargs["kv_cache_quant_algo"]],
        }
    return kwargs


def quant_config_kwargs(engine: Mapping[str, Any]) -> dict[str, Any] | None:
    """QuantConfig keywords for the LLM call; None for an unquantized engine (no quant_config passed at all)."""
    kwargs = mapped_kwargs(engine, "quant_config")
    return kwargs if any(v is not None for v in kwargs.values()) else None


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


def convert_checkpoint_note(dtype: str, tp_size: int = 1, pp_size: int = 1) -> str:
    return (
        "trtllm-build reads a TensorRT-LLM checkpoint, not a Hugging Face one: first run the model family's "
        f"convert_checkpoint.py from the TensorRT-LLM examples with --model_dir <hf_dir> --dtype {dtype} "
        f"--tp_size {tp_size} --pp_size {pp_size} --output_dir <trtllm_checkpoint_dir> (the LLM API does this "
        "conversion itself)"
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


def check_servable(engine: Mapping[str, Any]) -> None:
    """Refuse options that build an engine the LLM API cannot serve.

    The LLM API always batches in flight (_TrtLLM._build_model: batching_type INFLIGHT), and the runtime's
    TrtGptModelInflightBatching needs the GPT attention plugin and a paged KV cache, so either one off gives an
    engine that fails when it loads.
    """
    why = "the LLM API always batches in flight, which needs the GPT attention plugin and a paged KV cache"
    if not engine["paged_kv_cache"]:
        raise ConfigError(
            f"engine.paged_kv_cache={engine['paged_kv_cache']} is not allowed for backend=trt; it must be true ({why})"
        )
    if engine["gpt_attention_plugin"] == "disable":
        raise ConfigError(
            "engine.gpt_attention_plugin='disable' is not allowed for backend=trt; choose auto, float16, float32 or "
            f"bfloat16 ({why})"
        )


def has_engine_path(version: str) -> bool:
    """Whether this tensorrt-llm release ships tensorrt_llm._tensorrt_engine: 1.2.x, or 1.3.0rc0 to rc15."""
    from packaging.version import InvalidVersion, Version

    try:
        v = Version(version)
    except InvalidVersion:
        return False
    last = Version(LAST_WITH_ENGINE_PATH)
    if v.release[:2] == (1, 2):
        return True
    return v.release == last.release and v.pre is not None and v.pre[0] == "rc" and v.pre <= last.pre


def check_supported_version(version: Optional[str]) -> None:
    if version is None:
        raise ConfigError(
            f"backend=trt needs tensorrt-llm {SUPPORTED_SERIES}.x, which is not installed; {INSTALL_HINT}"
        )
    if not has_engine_path(version):
        raise ConfigError(
            f"backend=trt supports tensorrt-llm {SUPPORTED_SERIES}.x up to {LAST_WITH_ENGINE_PATH}, the last release "
            f"known to ship its TensorRT-engine path (tensorrt_llm._tensorrt_engine, removed afterwards); found "
            f"tensorrt-llm {version}. {INSTALL_HINT}"
        )


def cache_key_libraries(trtllm_version: str, gpu_sm: str, tensorrt_version: Optional[str]) -> dict[str, str]:
    """What the engine depends on beyond the options: a TensorRT engine runs only on the SM and versions it was
    built for."""
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
    max_input_len = min(build_kw["max_input_len"], build_kw["max_seq_len"])  # clipped first (_init_max_seq_len)
    if not plugin["context_fmha"] and n < max_input_len:
        return max_input_len
    if plugin["context_fmha"] and n < plugin["tokens_per_block"]:
        return plugin["tokens_per_block"]
    return n


def length_overrides(build_kw: Mapping[str, Any], plugin: Mapping[str, Any]) -> list[str]:
    """The builder's corrections to max_input_len and max_num_tokens (_init_max_seq_len, check_max_num_tokens)."""
    notes = []
    if build_kw["max_input_len"] > build_kw["max_seq_len"]:
        notes.append(
            f"max_input_len={build_kw['max_input_len']} is clipped to max_seq_len={build_kw['max_seq_len']} "
            "by the builder"
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
    if plugin["norm_quant_fusion"]:  # the builder keeps it for an NVFP4-quantized Llama only; sweep never uses NVFP4
        notes.append(
            f"norm_quant_fusion is forced off (only an NVFP4-quantized Llama keeps it; architecture {architecture})"
        )
    return notes


def fmha_overrides(plugin: Mapping[str, Any], fp8: bool) -> list[str]:
    """builder.build(): which context-FMHA variants survive (FP8 context FMHA only with FP8 weights or KV cache)."""
    if not plugin["context_fmha"]:
        return [
            "context_fmha is off, so the builder also turns off use_paged_context_fmha and use_fp8_context_fmha "
            "(no KV cache reuse, no chunked context)"
        ]
    if plugin["use_fp8_context_fmha"] and not fp8:
        return ["use_fp8_context_fmha (on by default) is forced off: neither the weights nor the KV cache are FP8"]
    return []


def predicted_overrides(
    build_kw: Mapping[str, Any],
    plugin_kw: Mapping[str, Any],
    plugin_defaults: Mapping[str, Any],
    architecture: str,
    tp_size: int = 1,
    fp8: bool = False,
) -> list[str]:
    """Known silent overrides of the build, as warnings (`fp8`: FP8 weights or an FP8 KV cache)."""
    plugin = {**plugin_defaults, **plugin_kw}
    overrides = length_overrides(build_kw, plugin) + fusion_overrides(plugin, architecture, tp_size)
    return overrides + fmha_overrides(plugin, fp8)
