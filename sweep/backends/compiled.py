"""compiled: a gpt-fast-style engine on transformers' model code.

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
- CUDA graphs for decode (engine.cuda_graphs): Inductor's cudagraph trees for reduce-overhead / max-autotune,
  a torch.cuda.CUDAGraph captured here for none / default;
- the engine artifact: torch's compile caches (torch.compiler.save_cache_artifacts), hot-loaded on a cache hit
  so that a second run skips Inductor's code generation and Triton's kernel builds.

Every batch is padded to max_batch_size, the one batch size compiled and captured; the manifest says so.
"""
from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sweep.backends.base import Backend, Generation
from sweep.backends.hf import load_hf_model
from sweep.config import BackendConfig, ConfigError
from sweep.workload import Request, Workload

log = logging.getLogger(__name__)

COMPILE_CACHE = "compile_cache.bin"  # torch.compiler.save_cache_artifacts() bytes, inside the engine dir
STATIC_SDPA = "sweep_static_sdpa"  # the attention function registered with transformers for attn_implementation=sdpa
ATTENTION = {"sdpa": STATIC_SDPA, "eager": "eager"}  # engine.attn_implementation -> what the model is loaded with


@dataclass
class CompiledBackendConfig(BackendConfig):
    name: str = "compiled"


# -- attention ------------------------------------------------------------------------------------------------
def static_cache_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA, except for one query token against the static cache (decode).

    transformers repeats each KV head for its query heads (repeat_kv) whenever a mask is given: a copy of the
    whole cache per layer per step, which at batch 8 costs more bandwidth than the cache itself many times over.
    Decode instead lays the query heads of one KV head out as that head's query rows, so the cache is read once,
    as it is. And it is written as matmul, masked softmax, matmul rather than SDPA: for one query row SDPA launches
    a prefill-shaped kernel (cuDNN's, 20 us per layer on an H200), where two small batched GEMMs and the softmax
    that Inductor fuses between them take 9 us at batch 1 and 14 us at batch 8.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or heads == kv_heads:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = head_dim**-0.5 if scaling is None else scaling
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)  # head h = kv * groups + g, as repeat_kv
    scores = (grouped @ key.transpose(-1, -2)).float() * scale  # [batch, kv_heads, groups, max_seq_len]
    probs = scores.masked_fill(~attention_mask, float("-inf")).softmax(dim=-1).to(value.dtype)
    out = probs @ value
    return out.reshape(batch, 1, heads, head_dim), None  # [batch, tokens, heads, head_dim], as transformers returns


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(STATIC_SDPA, static_cache_sdpa)


# -- fused projections ----------------------------------------------------------------------------------------
def fuse_projections(model) -> None:
    """Concatenate each layer's q/k/v projections into one Linear and gate/up into one, in place.

    At decode every projection is a GEMV; q/k/v's are small (3584 x 512 for k and v on Qwen2.5-7B), and cuBLAS runs
    them as split-K GEMMs plus reduce kernels at a third of the bandwidth the big MLP GEMVs reach. One GEMV over the
    concatenated weights reads the same bytes with 4 kernels fewer per layer (on an H200: q/k/v at 3.0 TB/s instead
    of 1.3, and a decode step at batch 1 0.54 ms shorter). The attention and
    MLP modules keep transformers' rotary embedding, attention dispatch, activation and o/down projections: only
    their forward is swapped for one that calls the fused Linear and splits its output.
    """
    import types

    layers = model.model.layers
    if {n for n, _ in layers[0].self_attn.named_children()} != {"q_proj", "k_proj", "v_proj", "o_proj"} or (
        {n for n, _ in layers[0].mlp.named_children()} != {"gate_proj", "up_proj", "down_proj", "act_fn"}
    ):
        return  # another layout (q/k norms, say): its modules run as transformers wrote them
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_size, attn.kv_size = attn.q_proj.out_features, attn.k_proj.out_features
        attn.qkv_proj = concat_linears(attn.q_proj, attn.k_proj, attn.v_proj)
        del attn.q_proj, attn.k_proj, attn.v_proj  # the fused copy replaces them: no second set of weights in memory
        attn.forward = types.MethodType(fused_attention_forward, attn)
        mlp.gate_up_proj = concat_linears(mlp.gate_proj, mlp.up_proj)
        del mlp.gate_proj, mlp.up_proj
        mlp.forward = types.MethodType(fused_mlp_forward, mlp)


def concat_linears(*linears):
    """One Linear whose output is the given ones' outputs side by side."""
    import torch

    first = linears[0]
    fused = torch.nn.Linear(first.in_features, sum(l.out_features for l in linears), bias=first.bias is not None,
                            device="meta")  # no weights of its own: the concatenated ones are set below
    fused.weight = torch.nn.Parameter(torch.cat([l.weight for l in linears]), requires_grad=False)
    if first.bias is not None:
        fused.bias = torch.nn.Parameter(torch.cat([l.bias for l in linears]), requires_grad=False)
    return fused


def fused_attention_forward(self, hidden_states, position_embeddings, attention_mask, cache=None,
                            past_key_values=None, **kwargs):
    """transformers' Qwen2/Llama attention forward (5.1x and 5.2x alike), with q, k and v from one GEMV.

    The cache comes as `cache` from transformers 5.2x and as `past_key_values` before.
    """
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    modeling = sys.modules[type(self).__module__]  # the model's own rotary and eager attention functions
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query, key, value = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
    query = query.view(hidden_shape).transpose(1, 2)
    key = key.view(hidden_shape).transpose(1, 2)
    value = value.view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = modeling.apply_rotary_pos_emb(query, key, cos, sin)
    cache = cache if cache is not None else past_key_values
    key, value = cache.update(key, value, self.layer_idx)
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, modeling.eager_attention_forward
    )
    out, weights = attention_interface(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling,
                                       **kwargs)  # no sliding window: check() refuses models that use one
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def fused_mlp_forward(self, x):
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


class StaticKVCache:
    """What transformers' attention calls: update(keys, values, layer) writes the new keys and values at the
    step's cache columns, in place, and returns the whole layer cache (the mask hides what is not yet written)."""

    def __init__(self, keys: list, values: list, write_cols):
        self.keys, self.values, self.write_cols = keys, values, write_cols

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.write_cols, key_states)
        values.index_copy_(2, self.write_cols, value_states)
        return keys, values


# -- the engine's state: weights, cache and step buffers, all at fixed addresses ----------------------------
class StaticState:
    def __init__(self, model, batch: int, max_seq_len: int, attn_implementation: str):
        import torch

        cfg = model.config
        param = next(model.parameters())
        self.model = model
        self.batch, self.max_seq_len = batch, max_seq_len
        self.device, self.dtype = param.device, param.dtype
        self.additive_mask = attn_implementation == "eager"  # eager adds the mask to the scores; SDPA takes booleans
        self.cache_kwarg = layer_cache_kwarg(model.model.layers[0])
        kv_heads = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (batch, kv_heads, max_seq_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_hidden_layers)]
        self.token = torch.zeros((batch, 1), dtype=torch.long, device=self.device)  # the token each row feeds next
        self.input_pos = torch.zeros(1, dtype=torch.long, device=self.device)  # the cache column it goes to
        self.pad_len = torch.zeros(batch, dtype=torch.long, device=self.device)  # each row's first real column
        # Compiled graphs and CUDA graphs mutate these in place: tell dynamo they never move, so cudagraphs keep
        # them as they are instead of copying them in, or refusing to capture a graph that mutates its inputs.
        for tensor in (*self.keys, *self.values, self.token, self.input_pos, self.pad_len):
            torch._dynamo.mark_static_address(tensor)
        self.cache_bytes = 2 * sum(t.numel() * t.element_size() for t in self.keys)


def layer_cache_kwarg(layer) -> str:
    """The decoder layer's name for the cache argument: `cache` from transformers 5.2x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(type(layer).forward).parameters else "past_key_values"


def attention_mask(state: StaticState, query_cols, pad_len):
    """[batch, 1, queries, max_seq_len]: a query sees its row's real tokens up to its own column.

    A padding query (left of its row's prompt) sees only itself, so that no softmax row is empty: an empty row
    gives NaN, which would reach the cache through that column's keys and values.
    """
    import torch

    cols = torch.arange(state.max_seq_len, device=state.device)
    q = query_cols[None, :, None]
    allowed = ((cols >= pad_len[:, None, None]) & (cols <= q)) | (cols == q)
    mask = allowed[:, None]
    if state.additive_mask:
        mask = torch.where(mask, 0.0, torch.finfo(state.dtype).min).to(state.dtype)
    return mask


def forward_last(state: StaticState, input_ids, position_ids, mask, write_cols):
    """transformers' layers over the static cache; logits of the last position only (all the next token needs)."""
    base = state.model.model
    hidden = base.embed_tokens(input_ids)
    position_embeddings = base.rotary_emb(hidden, position_ids)
    cache = StaticKVCache(state.keys, state.values, write_cols)
    for layer in base.layers:
        out = layer(
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **{state.cache_kwarg: cache},
        )
        hidden = out[0] if isinstance(out, tuple) else out  # transformers 4.x returned a tuple
    hidden = base.norm(hidden[:, -1:])
    return state.model.lm_head(hidden)[:, -1]


def prefill(state: StaticState, input_ids):
    """Prompt [batch, width], left-padded per state.pad_len, into cache columns 0..width-1; next token [batch]."""
    import torch

    cols = torch.arange(input_ids.shape[1], device=state.device)
    position_ids = (cols[None, :] - state.pad_len[:, None]).clamp(min=0)  # rope positions count real tokens only
    logits = forward_last(state, input_ids, position_ids, attention_mask(state, cols, state.pad_len), cols)
    return logits.argmax(dim=-1)


def decode_step(state: StaticState) -> None:
    """One token per row, inputs and outputs in the state's buffers: it takes no arguments, so a CUDA graph of it
    replays as it was captured."""
    position_ids = (state.input_pos - state.pad_len)[:, None]
    mask = attention_mask(state, state.input_pos, state.pad_len)
    logits = forward_last(state, state.token, position_ids, mask, state.input_pos)
    state.token.copy_(logits.argmax(dim=-1, keepdim=True))
    state.input_pos.add_(1)


# -- compiling and capturing ----------------------------------------------------------------------------------
def compile_plan(compile_mode: str, cuda_graphs: bool, device: str) -> dict[str, Any]:
    """What runs decode and prefill for these options. Prefill is never graphed: its width changes per batch."""
    graphs = cuda_graphs and device == "cuda"
    if compile_mode == "none":
        return {"prefill": None, "decode": None, "graphs": "manual" if graphs else "off"}
    if compile_mode == "max-autotune":
        prefill_opts = {"max_autotune": True, "coordinate_descent_tuning": True}
    else:  # default and reduce-overhead compile prefill alike
        prefill_opts = {}
    decode_opts = dict(prefill_opts)
    if compile_mode in ("reduce-overhead", "max-autotune") and graphs:
        decode_opts["triton.cudagraphs"] = True  # Inductor's cudagraph trees capture and replay decode
        return {"prefill": prefill_opts, "decode": decode_opts, "graphs": "cudagraph trees"}
    return {"prefill": prefill_opts, "decode": decode_opts, "graphs": "manual" if graphs else "off"}


def describe(plan: dict[str, Any], compile_mode: str) -> dict[str, str]:
    compiled = "eager" if plan["decode"] is None else f"torch.compile ({compile_mode})"
    graphs = {
        "off": "no CUDA graph",
        "manual": "captured once in a torch.cuda.CUDAGraph and replayed",
        "cudagraph trees": "CUDA graph by Inductor's cudagraph trees, replayed",
    }[plan["graphs"]]
    return {
        "decode": f"{compiled}, {graphs}",
        "prefill": "eager" if plan["prefill"] is None else f"torch.compile ({compile_mode}), dynamic width, no CUDA graph",
    }


def make_steps(state: StaticState, plan: dict[str, Any]) -> tuple[Callable, Callable]:
    import torch

    prefill_fn, decode_fn = prefill, decode_step
    if plan["prefill"] is not None:
        prefill_fn = torch.compile(prefill, fullgraph=True, options=plan["prefill"])
    if plan["decode"] is not None:
        decode_fn = torch.compile(decode_step, fullgraph=True, dynamic=False, options=plan["decode"])

    def run_prefill(input_ids):
        if input_ids.shape[1] > 1:
            # One compiled prefill for every prompt width (width 1 gets its own: dynamo specialises 0 and 1).
            torch._dynamo.maybe_mark_dynamic(input_ids, 1)
        return prefill_fn(state, input_ids)

    if plan["graphs"] == "cudagraph trees":
        def run_decode():
            torch.compiler.cudagraph_mark_step_begin()  # each step is a new iteration: replay, don't wait
            decode_fn(state)
    else:
        def run_decode():
            decode_fn(state)
    return run_prefill, run_decode


def capture_decode(run_decode: Callable) -> tuple[Callable, Any]:
    """Capture one decode step (eager or compiled) in a CUDA graph; it reads and writes only the state's buffers,
    so replaying it is the whole step."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture: compilation, cuBLAS handles, allocator pools
        for _ in range(2):
            run_decode()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_decode()
    return graph.replay, graph


def warm_up(state: StaticState, run_prefill: Callable, run_decode: Callable) -> None:
    """Compile prefill and decode (and let cudagraph trees record) on a dummy prompt, before any timed request."""
    import torch

    width = max(2, min(16, state.max_seq_len // 2))
    steps = min(3, state.max_seq_len - width)
    state.pad_len.zero_()
    first = run_prefill(torch.zeros((state.batch, width), dtype=torch.long, device=state.device))
    state.token.copy_(first[:, None])
    state.input_pos.fill_(width)
    for _ in range(steps):  # cudagraph trees: a warm-up run, a recording, a replay
        run_decode()
    if state.device.type == "cuda":
        torch.cuda.synchronize()


# -- host side ------------------------------------------------------------------------------------------------
def left_pad_batch(requests: list[Request], batch: int, pad_id: int):
    """[batch, width] prompt ids, left-padded, and each row's padding; rows past the requests are one-token dummies."""
    import torch

    width = max(r.input_len for r in requests)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    pad_len = torch.full((batch,), width - 1, dtype=torch.long)
    for row, req in enumerate(requests):
        ids[row, width - req.input_len :] = torch.tensor(req.input_ids, dtype=torch.long)
        pad_len[row] = width - req.input_len
    return ids, pad_len


def stream_tokens(state: StaticState, run_decode: Callable, count: int):
    """Decode `count` tokens (the first one is already in state.token); [count, batch] ids and host times.

    On a GPU the next step is queued before the host waits for the current token, so the GPU never idles on the
    host; each token's time is when its copy to pinned host memory completed.
    """
    import torch

    cuda = state.device.type == "cuda"
    host = torch.empty((count, state.batch), dtype=torch.long, pin_memory=cuda)
    times: list[float] = []
    if not cuda:
        for i in range(count):
            if i:
                run_decode()
            host[i].copy_(state.token.view(-1))
            times.append(time.perf_counter())
        return host, times
    events = [torch.cuda.Event(), torch.cuda.Event()]
    for i in range(count):
        if i:
            run_decode()
        host[i].copy_(state.token.view(-1), non_blocking=True)
        events[i % 2].record()
        if i:
            events[(i - 1) % 2].synchronize()
            times.append(time.perf_counter())
    events[(count - 1) % 2].synchronize()
    times.append(time.perf_counter())
    return host, times


# -- the backend ----------------------------------------------------------------------------------------------
class CompiledBackend(Backend):
    name = "compiled"
    config_class = CompiledBackendConfig
    honoured_options = ("dtype", "max_batch_size", "max_seq_len", "attn_implementation", "compile_mode", "cuda_graphs")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.state: StaticState | None = None
        self.graph = None  # the decode CUDA graph, when captured here (compile_mode none or default)

    def check(self, workload: Workload, max_position_embeddings: int | None) -> None:
        super().check(workload, max_position_embeddings)
        e = self.cfg.engine
        if e.attn_implementation not in ATTENTION:
            raise ConfigError(
                f"engine.attn_implementation={e.attn_implementation!r} is not supported by backend=compiled "
                f"(its static cache feeds masked attention); choose one of: {', '.join(ATTENTION)}"
            )
        requests = workload.warmup + workload.measured
        longest = max(r.input_len for r in requests) + max(r.output_len for r in requests)
        if longest > e.max_seq_len:  # a batch is left-padded to its longest prompt and runs to its longest output
            raise ConfigError(
                f"engine.max_seq_len={e.max_seq_len} cannot hold a batch of the workload's longest input plus its "
                f"longest output ({longest} tokens); set engine.max_seq_len >= {longest}"
            )
        config = json.loads((Path(self.model.path) / "config.json").read_text())
        if config.get("use_sliding_window") or any(t != "full_attention" for t in config.get("layer_types") or []):
            raise ConfigError(
                f"model {self.model.name!r} uses sliding-window attention, which backend=compiled does not mask"
            )

    def library_versions(self) -> dict[str, str]:
        import torch
        import transformers

        versions = {"torch": torch.__version__, "transformers": transformers.__version__}
        if self.device == "cuda":
            import triton

            versions["triton"] = triton.__version__
        return versions

    # -- engine -------------------------------------------------------------------------------------------------
    def build(self, engine_dir: Path) -> dict[str, Any]:
        """Compile and warm up; what torch cached while doing it is the engine."""
        import torch

        start = time.perf_counter()
        self._start_engine()
        build_s = time.perf_counter() - start
        e = self.cfg.engine
        extra: dict[str, Any] = {
            **describe(self.plan, e.compile_mode),
            "batch_padding": "every batch is padded to max_batch_size, the one compiled and captured batch size",
            "captured_batch_sizes": [e.max_batch_size],
            "kv_cache": {
                "shape_per_layer": list(self.state.keys[0].shape),
                "layers": len(self.state.keys),
                "dtype": self.dtype,
                "bytes": self.state.cache_bytes,
            },
            "attention": ATTENTION[e.attn_implementation],
            "compile_and_warmup_s": self.warmup_s,
            "model_load_s": self.model_load_s,
        }
        lines = [f"model loaded in {self.model_load_s:.1f} s", f"compile + warm-up {self.warmup_s:.1f} s"]
        # Everything torch's caches recorded in this process so far (hits included), so an engine built after
        # another one in the same process also carries the first one's graphs: bigger, never incomplete.
        saved = torch.compiler.save_cache_artifacts() if e.compile_mode != "none" else None
        if saved is None:
            extra["artifact"] = "none: nothing was compiled (compile_mode=none)" if e.compile_mode == "none" else (
                "none: torch recorded no compile cache artifacts"
            )
        else:
            data, info = saved
            (engine_dir / COMPILE_CACHE).write_bytes(data)
            counts = {kind: len(keys) for kind, keys in info.artifacts.items()}
            extra.update(artifact=f"torch compile cache ({COMPILE_CACHE})", compile_cache_bytes=len(data),
                         compile_cache_entries=counts)
            lines.append(f"saved {len(data)} bytes of compile cache artifacts: {counts}")
        lines.append(f"build {build_s:.1f} s")
        (engine_dir / "build.log").write_text("\n".join(lines) + "\n")
        return extra

    def load(self, engine_dir: Path) -> None:
        if self.state is not None:  # built by this process a moment ago: compiled, captured and warm
            return
        import torch

        cache_file = engine_dir / COMPILE_CACHE
        if cache_file.is_file():
            info = torch.compiler.load_cache_artifacts(cache_file.read_bytes())
            log.info("hot-loaded torch compile caches from %s: %s", cache_file, info)
        self._start_engine()
        log.info("engine ready: model %.1f s, compile + warm-up %.1f s (from cache)", self.model_load_s, self.warmup_s)

    def _start_engine(self) -> None:
        import torch

        e = self.cfg.engine
        register_attention()
        torch._dynamo.reset()  # a fresh dynamo for this engine: no guards or recompile budget left from an earlier one
        start = time.perf_counter()
        model, tokenizer = load_hf_model(self.model.path, self.dtype, ATTENTION[e.attn_implementation], self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        fuse_projections(model)
        self.model_load_s = time.perf_counter() - start

        start = time.perf_counter()
        self.plan = compile_plan(e.compile_mode, e.cuda_graphs, self.device)
        with torch.inference_mode():
            self.state = StaticState(model, e.max_batch_size, e.max_seq_len, e.attn_implementation)
            self.run_prefill, self.run_decode = make_steps(self.state, self.plan)
            if self.plan["graphs"] == "manual":
                self.run_decode, self.graph = capture_decode(self.run_decode)
            warm_up(self.state, self.run_prefill, self.run_decode)
        self.warmup_s = time.perf_counter() - start

    def engine_figures(self) -> dict[str, float]:
        """On a miss these are the build's; on a hit, what loading the model and compiling from the cache cost."""
        return {"compile_and_warmup_s": self.warmup_s, "model_load_s": self.model_load_s}

    # -- serving ------------------------------------------------------------------------------------------------
    def generate(self, requests: list[Request]) -> list[Generation]:
        import torch

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

    def close(self) -> None:
        import gc

        import torch

        self.state = self.run_prefill = self.run_decode = self.graph = None
        torch._dynamo.reset()  # drops compiled code and cudagraph trees, which hold the weights and their pools
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
