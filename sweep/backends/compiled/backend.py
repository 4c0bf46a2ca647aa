"""compiled: the backend glue of a gpt-fast-style engine on transformers' model code.

The model is transformers' own (its embeddings, decoder layers, attention dispatch, rotary embedding, norm and
head, loaded exactly as the hf backend loads them). What this backend adds around it:

- decode attention over the static cache as matmul, masked softmax, matmul (static_cache_sdpa);
- fused projections: each layer's q/k/v weights (and biases) concatenated into one Linear, and gate/up into one,
  so decode runs two large GEMVs where it ran five, two of them small and slow (fuse_projections);
- a static KV cache of engine.max_batch_size x engine.max_seq_len per layer, allocated once, at fixed addresses
  (torch._dynamo.mark_static_address), that transformers' attention writes through `cache.update`;
- the step inputs (current token, cache column, left padding of each row) in persistent device buffers, so a
  decode step has no inputs of its own and its CUDA graph replays without being captured again;
- prefill (dynamic prompt width) and a decode step (forward + greedy argmax, written back into the buffers)
  compiled with torch.compile in engine.compile_mode;
- CUDA graphs for decode (engine.cuda_graphs): static, Inductor's cudagraph trees for reduce-overhead /
  max-autotune and a torch.cuda.CUDAGraph captured here for none / default; in flight, a torch.cuda.CUDAGraph per
  decode size and attention span in every mode, around one compiled decoder layer (compile_plan says why);
- the engine artifact: torch's compile caches (torch.compiler.save_cache_artifacts), hot-loaded on a cache hit
  so that a second run skips Inductor's code generation and Triton's kernel builds.

Two schedulers (backend.scheduler), so that both can be compared in one call:
- inflight (inflight.py): each cache row is a slot; a request joins the running batch at the next step after it
  arrives and leaves when it is done, prompts are prefilled in chunks under engine.max_num_tokens per step, and
  decode is captured for each size in engine.cuda_graph_batch_sizes and each attention span;
- static (engine.py): every batch padded to max_batch_size, the one batch size compiled and captured, run to its
  end while new arrivals wait.
The manifest says which.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from sweep.backends.base import Backend, DecodeLoop, Generation, TokenScores
from sweep.backends.compiled.config import SCHEDULERS
from sweep.backends.compiled.engine import (
    StaticState,
    capture_decode,
    compile_plan,
    describe,
    left_pad_batch,
    make_steps,
    sequence_logits,
    stream_tokens,
    warm_up,
    warm_up_widths,
)
from sweep.backends.compiled.inflight import (
    InflightScheduler,
    SlotState,
    attention_spans,
    decode_sizes,
    make_decode_calls,
    make_prefill_call,
    warm_up_inflight,
)
from sweep.backends.compiled.patches import ATTENTION, fuse_projections, register_attention
from sweep.backends.hf.backend import load_hf_model
from sweep.backends.quantization import quantize_model, torchao_refusals
from sweep.config.errors import ConfigError
from sweep.workload.requests import Request, Workload
from sweep.workload.stream import RequestStream

log = logging.getLogger(__name__)

COMPILE_CACHE = "compile_cache.bin"  # torch.compiler.save_cache_artifacts() bytes, inside the engine dir
# The model classes whose forward is embeddings, decoder layers, final norm and head, which the engine runs itself
# (StaticState's steps call the layers one by one); for each, tests check its tokens against transformers'. Another
# class may do more in its own forward (Granite scales the embeddings there), which the engine would skip.
ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Phi3ForCausalLM",
)
STATIC_OPTIONS = ("max_batch_size", "max_seq_len", "attn_implementation", "compile_mode", "cuda_graphs", "quantization")
INFLIGHT_OPTIONS = (*STATIC_OPTIONS, "max_num_tokens", "cuda_graph_batch_sizes")


class CompiledBackend(Backend):
    name = "compiled"
    scores = "full"
    compiles_in_process = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.inflight = self.cfg.backend.scheduler == "inflight"
        self.state: StaticState | None = None
        self.graphs: list = []  # decode CUDA graphs captured here (plan["graphs"] == "manual")
        self.scheduler: InflightScheduler | None = None

    @property
    def artifact_options(self) -> tuple[str, ...]:
        return INFLIGHT_OPTIONS if self.inflight else STATIC_OPTIONS

    @property
    def honoured_options(self) -> tuple[str, ...]:
        return ("dtype", *self.artifact_options)

    def artifact_settings(self) -> dict[str, Any]:
        return {"scheduler": self.cfg.backend.scheduler}

    def quantization_refusals(self) -> dict[str, str | None]:
        return torchao_refusals(self.device, self.dtype)

    def parallelism_refusals(self) -> dict[str, str | None]:
        why = (
            "the engine is built for one device: it fuses q/k/v and gate/up into single weights, which transformers' "
            "tensor-parallel plan (one shard per projection) cannot split, and captures its steps in CUDA graphs on "
            "that device; use backend=hf, vllm or trt to split a model"
        )
        return {"tp_size": why, "pp_size": why}

    def check(self, workload: Workload) -> None:
        e = self.cfg.engine
        scheduler = self.cfg.backend.scheduler
        if scheduler not in SCHEDULERS:
            raise ConfigError(f"backend.scheduler={scheduler!r} is not allowed; choose one of: {', '.join(SCHEDULERS)}")
        super().check(workload)  # every request's input + output fits max_seq_len: in flight, each has a whole row
        if e.attn_implementation not in ATTENTION:
            raise ConfigError(
                f"engine.attn_implementation={e.attn_implementation!r} is not supported by backend=compiled "
                f"(its static cache feeds masked attention); choose one of: {', '.join(ATTENTION)}"
            )
        if e.attn_implementation == "flex_attention" and self.device == "cpu" and e.compile_mode != "none":
            raise ConfigError(
                f"engine.attn_implementation='flex_attention' with engine.compile_mode={e.compile_mode!r} needs a GPU "
                "for backend=compiled: Inductor builds FlexAttention's kernel there, not on a CPU; on a CPU use "
                "engine.compile_mode=none (FlexAttention unfused) or engine.attn_implementation=sdpa"
            )
        if self.inflight and e.max_num_tokens < e.max_batch_size:
            raise ConfigError(
                f"engine.max_num_tokens={e.max_num_tokens} cannot hold one step of backend.scheduler=inflight: every "
                f"running request decodes one token per step; set engine.max_num_tokens >= "
                f"engine.max_batch_size={e.max_batch_size}"
            )
        requests = workload.warmup + workload.measured
        longest = max(r.input_len for r in requests) + max(r.output_len for r in requests)
        if (
            not self.inflight and longest > e.max_seq_len
        ):  # a batch is left-padded to its longest prompt and runs to its longest output
            raise ConfigError(
                f"engine.max_seq_len={e.max_seq_len} cannot hold a batch of the workload's longest input plus its "
                f"longest output ({longest} tokens); set engine.max_seq_len >= {longest}"
            )
        architecture = self.model.shape.architecture
        if architecture not in ARCHITECTURES:
            raise ConfigError(
                f"model {self.model.name!r} is a {architecture}, which backend=compiled does not run (it calls the "
                f"decoder layers itself, checked for: {', '.join(ARCHITECTURES)}); use backend=hf, hf_paged or vllm"
            )
        if self.model.shape.sliding_window:
            raise ConfigError(
                f"model {self.model.name!r} uses sliding-window attention, which backend=compiled does not mask"
            )

    def library_versions(self) -> dict[str, str]:
        versions = {"torch": torch.__version__, "transformers": transformers.__version__}
        if self.device == "cuda":
            import triton

            versions["triton"] = triton.__version__
        return versions

    # -- engine -------------------------------------------------------------------------------------------------
    def build(self, engine_dir: Path) -> dict[str, Any]:
        """Compile and warm up; what torch cached while doing it is the engine."""
        start = time.perf_counter()
        self._start_engine()
        build_s = time.perf_counter() - start
        e = self.cfg.engine
        extra: dict[str, Any] = {
            **describe(self.plan, e.compile_mode),
            "scheduler": self.cfg.backend.scheduler,
            "batch_padding": (
                "in flight: decode runs the smallest captured size that covers the highest running row, "
                "attending over the smallest captured span that covers the longest running sequence"
                if self.inflight
                else "every batch is padded to max_batch_size, the one compiled and captured batch size"
            ),
            "captured_batch_sizes": self.sizes,
            **({"attention_spans": self.spans} if self.inflight else {}),
            "kv_cache": {
                "shape_per_layer": list(self.state.keys[0].shape),
                "layers": len(self.state.keys),
                "dtype": self.dtype,
                "bytes": self.state.cache_bytes,
            },
            "attention": ATTENTION[e.attn_implementation],
            "weights": self.quantized,
            "compile_and_warmup_s": self.warmup_s,
            "model_load_s": self.model_load_s,
        }
        lines = [f"model loaded in {self.model_load_s:.1f} s", f"compile + warm-up {self.warmup_s:.1f} s"]
        # Everything torch's caches recorded in this process so far (hits included), so an engine built after
        # another one in the same process also carries the first one's graphs: bigger, never incomplete.
        saved = torch.compiler.save_cache_artifacts() if e.compile_mode != "none" else None
        if saved is None:
            extra["artifact"] = (
                "none: nothing was compiled (compile_mode=none)"
                if e.compile_mode == "none"
                else ("none: torch recorded no compile cache artifacts")
            )
        else:
            data, info = saved
            (engine_dir / COMPILE_CACHE).write_bytes(data)
            counts = {kind: len(keys) for kind, keys in info.artifacts.items()}
            extra.update(
                artifact=f"torch compile cache ({COMPILE_CACHE})",
                compile_cache_bytes=len(data),
                compile_cache_entries=counts,
            )
            lines.append(f"saved {len(data)} bytes of compile cache artifacts: {counts}")
        lines.append(f"build {build_s:.1f} s")
        (engine_dir / "build.log").write_text("\n".join(lines) + "\n")
        return extra

    def load(self, engine_dir: Path) -> None:
        if self.state is not None:  # built by this process a moment ago: compiled, captured and warm
            return
        cache_file = engine_dir / COMPILE_CACHE
        if cache_file.is_file():
            info = torch.compiler.load_cache_artifacts(cache_file.read_bytes())
            entries = sum(len(keys) for keys in info.artifacts.values()) if info else 0
            log.info("loaded %d compiled artifacts from the engine cache; compiling from them", entries)
            log.debug("torch compile cache: %s", info)
        self._start_engine()
        log.info("engine ready: model %.1f s, compile + warm-up %.1f s (from cache)", self.model_load_s, self.warmup_s)

    def _start_engine(self) -> None:
        e = self.cfg.engine
        register_attention()
        torch._dynamo.reset()  # a fresh dynamo for this engine: no guards or recompile budget left from an earlier one
        start = time.perf_counter()
        model, tokenizer = load_hf_model(self.model.path, self.dtype, ATTENTION[e.attn_implementation], self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        fuse_projections(model)  # before quantizing: each fused projection is quantized as one
        self.quantized = quantize_model(model, e.quantization, compiled=e.compile_mode != "none")
        self.model_load_s = time.perf_counter() - start

        log.info(
            "preparing prefill and decode (compile_mode=%s, cuda_graphs=%s) and warming up",
            e.compile_mode,
            e.cuda_graphs,
        )
        start = time.perf_counter()
        self.plan = compile_plan(e.compile_mode, e.cuda_graphs, self.device, self.inflight)
        with torch.inference_mode():
            if self.inflight:
                self._start_inflight(model)
            else:
                self.sizes = [e.max_batch_size]
                self.state = StaticState(model, e.max_batch_size, e.max_seq_len, e.attn_implementation)
                self.run_prefill, self.run_decode = make_steps(self.state, self.plan)
                if self.plan["graphs"] == "manual":
                    self.run_decode, graph = capture_decode(self.run_decode)
                    self.graphs = [graph]
                warm_up(self.state, self.run_prefill, self.run_decode)
        self.warmup_s = time.perf_counter() - start

    def _start_inflight(self, model) -> None:
        e = self.cfg.engine
        self.sizes = decode_sizes(e.cuda_graph_batch_sizes, e.max_batch_size)
        self.state = SlotState(model, e.max_batch_size, e.max_seq_len, e.attn_implementation)
        self.spans = attention_spans(e.max_seq_len)
        run_decode = make_decode_calls(self.state, self.plan, self.sizes, self.spans)
        if self.plan["graphs"] == "manual":  # one graph per (size, span), sharing one memory pool
            for pair, run in run_decode.items():
                run_decode[pair], graph = capture_decode(run, self.graphs[0].pool() if self.graphs else None)
                self.graphs.append(graph)
        run_prefill = make_prefill_call(self.state, self.plan)
        warm_up_inflight(self.state, run_decode, run_prefill)
        self.scheduler = InflightScheduler(self.state, run_decode, run_prefill, e.max_num_tokens)

    def warm_up(self, workload: Workload) -> None:
        """Static: every width a timed batch can have (its longest prompt's). In flight every decode size and span
        was captured at load, and every kind of prompt chunk compiled there (warm_up_inflight)."""
        if not self.inflight:
            widths = sorted({r.input_len for r in workload.warmup + workload.measured})
            with torch.inference_mode():
                warm_up_widths(self.state, self.run_prefill, widths)

    def decode_loop(self, batch: int, context: int, span: int | None = None) -> DecodeLoop:
        """Static: every row decodes, over the whole cache. In flight: `batch` rows, a captured size, over `span`
        columns, one of the captured attention spans (None: the whole row)."""
        state = self.state
        if not self.inflight:
            if batch != state.batch or span not in (None, state.max_seq_len):
                raise ConfigError(
                    f"backend.scheduler=static decodes all engine.max_batch_size={state.batch} rows over all "
                    f"{state.max_seq_len} columns; batch={batch}, span={span} asked for"
                )

            def reset_static() -> None:
                state.pad_len.zero_()
                state.input_pos.fill_(context)

            return DecodeLoop(self.run_decode, reset_static, state.max_seq_len)
        span = span or self.spans[-1]
        if (batch, span) not in self.scheduler.run_decode:
            raise ConfigError(
                f"batch={batch}, span={span} is not a captured decode of this engine: batch sizes {self.sizes}, "
                f"attention spans {self.spans}"
            )

        def reset_rows() -> None:
            state.reset_rows()
            state.pos[:batch].fill_(context)
            state.live[:batch].fill_(1)

        return DecodeLoop(self.scheduler.run_decode[(batch, span)], reset_rows, span)

    def engine_figures(self) -> dict[str, float]:
        """On a miss these are the build's; on a hit, what loading the model and compiling from the cache cost."""
        return {"compile_and_warmup_s": self.warmup_s, "model_load_s": self.model_load_s}

    # -- serving ------------------------------------------------------------------------------------------------
    def generate(self, requests: list[Request]) -> list[Generation]:
        if self.inflight:  # every request at once, through the scheduler
            stream = RequestStream(requests, offsets=[0.0] * len(requests))
            stream.start()
            tokens = self.serve_tokens(stream, len(requests))
            return [Generation(tokens[t.request_id], t.token_times) for t in stream.results()]
        state = self.state
        ids, pad_len = left_pad_batch(requests, state.batch, self.pad_id)
        count = max(r.output_len for r in requests)
        with torch.inference_mode():
            state.pad_len.copy_(pad_len)
            first = self.run_prefill(ids.to(state.device))
            state.token.copy_(first[:, None])
            state.input_pos.fill_(ids.shape[1])
            tokens, times = stream_tokens(state, self.run_decode, count)
        rows = tokens.T.tolist()
        return [
            Generation(token_ids=rows[row][: req.output_len], token_times=times[: req.output_len])
            for row, req in enumerate(requests)
        ]

    def score(self, sequences: list[list[int]], starts: list[int]) -> list[TokenScores]:
        with torch.inference_mode():
            return [
                TokenScores(sequence_logits(self.state, ids)[start - 1 : len(ids) - 1].float().log_softmax(-1).cpu())
                for ids, start in zip(sequences, starts)
            ]

    def serve(self, stream: RequestStream, max_batch: int) -> None:
        if self.inflight:
            self.serve_tokens(stream, max_batch)
        else:
            super().serve(stream, max_batch)

    def serve_tokens(self, stream: RequestStream, max_batch: int) -> dict[str, list[int]]:
        """In flight: serve the stream and return every request's tokens (serve() drops them; tests compare them)."""
        with torch.inference_mode():
            return self.scheduler.serve(stream, max_batch)

    def close(self) -> None:
        self.state = self.run_prefill = self.run_decode = self.scheduler = None
        self.graphs = []
        torch._dynamo.reset()  # drops compiled code and cudagraph trees, which hold the weights and their pools
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
