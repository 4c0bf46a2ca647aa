"""vllm: vLLM's engine through its async front end (AsyncLLM), requests streamed into its in-flight scheduler.

Check: vLLM's own config is built in-process (nothing started, about a second) and every constraint that would
only fail an engine start (or its first request) is checked against it: the CPU attention's block sizes and head
sizes, the KV cache against free memory, vLLM's length rules. A search prunes such trials without an engine start.
Build: vLLM builds no engine file. Where it compiles, its torch.compile cache (VLLM_CACHE_ROOT) is the artifact:
the build starts the engine with the cache root inside the engine directory, which compiles and fills it, and that
engine then serves the run; a cache hit starts vLLM on the filled cache. Eager engines store nothing.
Serve: one event loop for the engine's lifetime (AsyncLLM's output handler lives on the loop that started it);
each request is streamed with DELTA outputs and every delta's tokens are stamped when they reach this process.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sweep.backends.base import Backend, Generation, TokenScores, engine_gpus
from sweep.backends.cache import final_dir
from sweep.backends.vllm import options, runtime
from sweep.config.errors import ConfigError
from sweep.workload.requests import Request, Workload
from sweep.workload.stream import RequestStream, serve_in_flight

log = logging.getLogger(__name__)

VLLM_CACHE = "vllm_cache"  # VLLM_CACHE_ROOT inside the engine directory
# vLLM's index of its compiled graphs; on a GPU each entry holds the absolute path of the graph's saved artifact.
COMPILE_INDEX = "vllm_compile_cache.py"
SHUTDOWN_TIMEOUT_S = 30  # vLLM's default (5 s) SIGKILLs a CPU engine core that is still tearing down
CPU_MEMORY_HEADROOM = 2 * options.GIB  # what vLLM's CPU worker takes of the node (torch, weights) before it checks
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class VLLMBackend(Backend):
    name = "vllm"
    honoured_options = (
        "dtype",
        "max_batch_size",
        "max_seq_len",
        "max_num_tokens",
        "tokens_per_block",
        "paged_kv_cache",
        "compile_mode",
        "cuda_graphs",
        "cuda_graph_batch_sizes",
        "quantization",
        "kv_cache_dtype",
        "tp_size",
        "pp_size",
    )
    # What vLLM's compile cache depends on (it hashes the same config into its own directory names).
    artifact_options = (
        "max_batch_size",
        "max_seq_len",
        "max_num_tokens",
        "tokens_per_block",
        "compile_mode",
        "cuda_graphs",
        "cuda_graph_batch_sizes",
        "quantization",
        "kv_cache_dtype",
        "tp_size",
        "pp_size",
    )
    scores = f"top-{options.PROMPT_LOGPROBS} prompt logprobs"
    replicates_kv_heads = True  # vllm/model_executor/models/{llama,qwen2}.py: tp_size % total_num_kv_heads == 0

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.engine: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.environ = ExitStack()  # os.environ as vLLM wants it, for the engine's lifetime
        self.request_ids = itertools.count()
        self.deltas = self.multi_token_deltas = 0
        self.build_dir: Path | None = None  # the engine cache's temporary directory, when this process built

    # -- before anything is built ---------------------------------------------------------------------------
    @classmethod
    def check_installed(cls) -> None:
        options.check_supported_version(options.installed_version())

    def library_versions(self) -> dict[str, str]:
        import torch

        return {"vllm": options.installed_version(), "torch": torch.__version__}

    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per token of one worker (its share of the layers and KV heads): vLLM sizes each one's."""
        e = self.cfg.engine
        dtype_bytes = 1 if e.kv_cache_dtype == "fp8" else DTYPE_BYTES[self.dtype]
        return options.kv_bytes_per_token(self.model.shape, dtype_bytes, e.tp_size, e.pp_size)

    def quantization_refusals(self) -> dict[str, str | None]:
        return options.quantization_refusals(self.device, self.dtype)

    def kv_cache_dtype_refusals(self) -> dict[str, str | None]:
        return options.kv_cache_dtype_refusals(self.device)

    def engine_kwargs(self) -> dict[str, Any]:
        return options.engine_kwargs(self.cfg, str(self.model.path), self.device, self.dtype, self.kv_bytes_per_token())

    def memory_estimate_bytes(self, model_bytes: int, kv_bytes_per_token: int) -> int:
        """Weights plus one full-length sequence: vLLM pages its KV cache and admits as many requests as fit."""
        return model_bytes + self.cfg.engine.max_seq_len * kv_bytes_per_token

    def check(self, workload: Workload) -> None:
        super().check(workload)
        options.check_settings(self.cfg, workload.max_input_len)
        with runtime.vllm_environ(self.cfg.backend.log_level):
            config = runtime.engine_config(self.engine_kwargs())
            if self.device == "cpu":
                self.check_cpu(config)
            elif self.engine is None:  # a loaded engine (held open for the next job) holds its memory already
                self.check_gpu_memory()

    def check_cpu(self, config: Any) -> None:
        """What vLLM's CPU path rejects only when the engine starts, or at its first request."""
        from vllm.utils.cpu_resource_utils import get_memory_node_info
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        e, b = self.cfg.engine, self.cfg.backend
        for rule in CPUAttentionBackend.get_supported_kernel_block_sizes():
            base = getattr(rule, "base", None)
            if base is not None and e.tokens_per_block % base:
                raise ConfigError(
                    f"engine.tokens_per_block={e.tokens_per_block} is not allowed for backend=vllm on the CPU; "
                    f"vLLM's CPU attention needs a multiple of {base}"
                )
        model_config = config.model_config
        head_size = model_config.get_head_size()
        if head_size not in CPUAttentionBackend.get_supported_head_sizes():
            raise ConfigError(
                f"model {self.model.name} has head dim {head_size}, which vLLM's CPU attention does not support "
                f"(it supports {CPUAttentionBackend.get_supported_head_sizes()}); use another model or a GPU"
            )
        hf = model_config.hf_text_config
        explicit = getattr(hf, "head_dim", None)
        if hf.model_type == "qwen2" and explicit and explicit != hf.hidden_size // hf.num_attention_heads:
            raise ConfigError(  # vLLM's Qwen2 takes hidden/heads, loads the weights anyway and generates wrong tokens
                f"model {self.model.name} sets head_dim={explicit}, but vLLM's Qwen2 uses hidden_size / "
                f"num_attention_heads = {hf.hidden_size // hf.num_attention_heads} and would generate wrong tokens"
            )
        node = get_memory_node_info(0)  # vLLM binds its CPU worker's memory to node 0 and sizes it from there
        free = node.available_memory - CPU_MEMORY_HEADROOM
        cache = config.cache_config
        workers = engine_gpus(e)  # a split engine's workers each take their share, all on this host
        if cache.kv_cache_memory_bytes is None:
            want = cache.gpu_memory_utilization * node.total_memory * workers
            if want > free:
                raise ConfigError(
                    f"backend.memory_fraction={cache.gpu_memory_utilization} asks vLLM's CPU "
                    f"{'worker' if workers == 1 else f'workers ({workers})'} for "
                    f"{want / options.GIB:.1f} GiB of NUMA node 0's {node.total_memory / options.GIB:.1f} GiB, more "
                    f"than the {max(free, 0) / options.GIB:.1f} GiB free (after {CPU_MEMORY_HEADROOM // options.GIB} "
                    "GiB for the worker itself); lower it, or size the KV cache with backend.kv_cache_gb"
                )
            return
        kv = cache.kv_cache_memory_bytes * workers
        key = "backend.kv_cache_gb" if b.kv_cache_gb is not None else "engine.max_batch_size x engine.max_seq_len"
        if kv > free:
            raise ConfigError(
                f"{key} asks for a KV cache of {kv / options.GIB:.2f} GiB"
                + (f" ({workers} workers' together)" if workers > 1 else "")
                + ", more than the "
                f"{max(free, 0) / options.GIB:.1f} GiB free on NUMA node 0 (after "
                f"{CPU_MEMORY_HEADROOM // options.GIB} GiB for the worker); lower it"
            )
        one_sequence = options.full_kv_cache_bytes(e, self.kv_bytes_per_token(), 1)
        if cache.kv_cache_memory_bytes < one_sequence:
            raise ConfigError(
                f"backend.kv_cache_gb={b.kv_cache_gb} cannot hold one sequence of engine.max_seq_len={e.max_seq_len} "
                f"({one_sequence / options.GIB:.4f} GiB); raise it or lower max_seq_len"
            )

    def check_gpu_memory(self) -> None:
        fraction = self.cfg.backend.memory_fraction
        if fraction is None:
            return
        import torch

        free, total = torch.cuda.mem_get_info()
        if fraction * total > free:
            raise ConfigError(
                f"backend.memory_fraction={fraction} asks for {fraction * total / 1e9:.1f} GB of the GPU's "
                f"{total / 1e9:.1f} GB, more than the {free / 1e9:.1f} GB free; lower it"
            )

    # -- engine ---------------------------------------------------------------------------------------------
    def build(self, engine_dir: Path) -> dict[str, Any]:
        kwargs = self.engine_kwargs()
        extra: dict[str, Any] = {
            "vllm_version": options.installed_version(),
            "engine_args": {k: v for k, v in kwargs.items() if k not in ("model", "tokenizer")},
        }
        if not options.compiles(self.cfg.engine, self.device):
            extra["artifact"] = "none: vLLM builds no engine file, and an eager engine compiles nothing"
            return extra
        cache_root = engine_dir / VLLM_CACHE
        start = time.perf_counter()
        self.build_dir = engine_dir
        self.start(cache_root)  # compiles into cache_root; this engine then serves the run (load keeps it)
        relocate_compile_index(cache_root, engine_dir, final_dir(engine_dir))
        files = sorted(str(p.relative_to(cache_root)) for p in cache_root.rglob("*") if p.is_file())
        extra.update(
            artifact=f"vLLM's torch.compile cache ({VLLM_CACHE}/, its VLLM_CACHE_ROOT)",
            engine_start_s=time.perf_counter() - start,
            cache_files=files,
            cache_bytes=sum((cache_root / f).stat().st_size for f in files),
        )
        return extra

    def load(self, engine_dir: Path) -> None:
        if self.engine is None:  # else the build started it a moment ago, on the cache it filled
            self.start(engine_dir / VLLM_CACHE)

    def start(self, cache_root: Path) -> None:
        cache_root = cache_root.absolute()  # vLLM writes the paths it is given into its compile-cache index
        self.environ.enter_context(runtime.vllm_environ(self.cfg.backend.log_level, cache_root))
        try:
            config = runtime.engine_config(self.engine_kwargs())
            from vllm.v1.engine.async_llm import AsyncLLM

            async def make() -> Any:  # inside the loop, so the output handler is bound to it
                return AsyncLLM.from_vllm_config(config, disable_log_stats=True)

            start = time.perf_counter()
            self.loop = asyncio.new_event_loop()
            self.engine = self.loop.run_until_complete(make())
            log.info("vLLM engine started in %.1f s (cache root %s)", time.perf_counter() - start, cache_root)
        except BaseException:
            self.close()
            raise

    # -- serving --------------------------------------------------------------------------------------------
    def sampling_params(self, request: Request) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        n = request.output_len
        return SamplingParams(
            temperature=0.0,
            max_tokens=n,
            min_tokens=n,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,  # each output holds only the tokens new since the last one
            detokenize=False,
        )

    async def stream(self, request: Request) -> Any:
        """The request's outputs as they reach this process: (perf_counter time, new token ids) per delta."""
        from vllm.inputs import tokens_input

        outputs = self.engine.generate(
            tokens_input(request.input_ids),
            self.sampling_params(request),
            request_id=f"{request.id}-{next(self.request_ids)}",
        )
        async for output in outputs:
            now = time.perf_counter()
            new = list(output.outputs[0].token_ids)
            self.deltas += 1
            # A delta holds several tokens when the front end fell behind the engine; they share one time.
            self.multi_token_deltas += len(new) > 1
            yield now, new

    def generate(self, requests: list[Request]) -> list[Generation]:
        async def one(request: Request) -> Generation:
            gen = Generation([], [])
            async for at, new in self.stream(request):
                gen.token_ids += new
                gen.token_times += [at] * len(new)
            return gen

        async def all_at_once() -> list[Generation]:
            return list(await asyncio.gather(*(one(r) for r in requests)))

        return self.loop.run_until_complete(all_at_once())

    def score(self, sequences: list[list[int]], starts: list[int]) -> list[TokenScores]:
        """vLLM returns no logits: each sequence's prompt logprobs, its top PROMPT_LOGPROBS tokens per position."""
        import torch
        from vllm import SamplingParams
        from vllm.inputs import tokens_input

        params = SamplingParams(
            temperature=0.0, max_tokens=1, prompt_logprobs=options.PROMPT_LOGPROBS, detokenize=False
        )

        async def one(ids: list[int]) -> Any:
            request_id = f"score-{next(self.request_ids)}"
            async for output in self.engine.generate(tokens_input(ids), params, request_id=request_id):
                last = output
            return last.prompt_logprobs

        async def every() -> list[Any]:
            return list(await asyncio.gather(*(one(ids) for ids in sequences)))

        scores = []
        for positions, ids, start in zip(self.loop.run_until_complete(every()), sequences, starts):
            token_ids, logprobs = options.top_k_rows(positions[start : len(ids)], options.PROMPT_LOGPROBS)
            scores.append(TokenScores(torch.tensor(logprobs), torch.tensor(token_ids)))
        return scores

    def serve(self, stream: RequestStream, max_batch: int) -> None:
        """Requests go to vLLM as they arrive (up to `max_batch` in flight); its scheduler admits them between
        steps (up to max_num_seqs). `admitted` is when a request was handed to vLLM: its queue is not visible."""
        self.loop.run_until_complete(self.serve_async(stream, max_batch))

    async def serve_async(self, stream: RequestStream, max_in_flight: int) -> None:
        async def relay(request: Request) -> None:
            stream.admitted(request.id)
            async for at, new in self.stream(request):
                if new:
                    stream.tokens(request.id, len(new), at=at)
            stream.finished(request.id)

        await serve_in_flight(stream, max_in_flight, relay)

    def close(self) -> None:
        if self.deltas:
            log.info(
                "vLLM streamed %d outputs; %d carried more than one token (those share one host time)",
                self.deltas,
                self.multi_token_deltas,
            )
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
            del engine  # now, not at interpreter exit (where AsyncLLM.__del__ fails)
        if self.loop is not None:
            pending = asyncio.all_tasks(self.loop)  # the output handler, cancelled by shutdown

            async def drain() -> None:
                await asyncio.gather(*pending, return_exceptions=True)

            self.loop.run_until_complete(drain())
            self.loop.close()
            self.loop = None
        self.environ.close()
        if self.build_dir is not None and final_dir(self.build_dir).is_dir():
            # The engine cache renamed the build directory; what vLLM compiled afterwards (the sampler's logprob-rank
            # helper, on the quality check's prompt logprobs) went to the old path, which only this process knows.
            shutil.rmtree(self.build_dir, ignore_errors=True)
            self.build_dir = None


def relocate_compile_index(cache_root: Path, built_in: Path, served_from: Path) -> None:
    """Point vLLM's compile-cache index at the engine's final directory: the build runs in a temporary directory that
    the engine cache renames, and vLLM loads each compiled graph from the absolute path its index recorded."""
    old, new = str(built_in.absolute()), str(served_from.absolute())
    for index in cache_root.rglob(COMPILE_INDEX):
        text = index.read_text()
        if old in text:
            index.write_text(text.replace(old, new))
