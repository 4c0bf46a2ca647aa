"""The static-cache engine loop: weights, KV cache and step buffers at fixed addresses, prefill and a decode step,
compiled and captured in CUDA graphs, and the host side that streams tokens out with their times.
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Callable

import torch

from sweep.workload.requests import Request


class StaticKVCache:
    """One layer's cache as transformers' attention calls it: update(keys, values, layer) writes the new keys and
    values at the step's cache columns, in place, and returns the whole layer cache (the mask hides what is not yet
    written). One object per layer, so that no layer index reaches the code that runs it."""

    def __init__(self, keys, values, write_cols):
        self.keys, self.values, self.write_cols = keys, values, write_cols

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys.index_copy_(2, self.write_cols, key_states)
        self.values.index_copy_(2, self.write_cols, value_states)
        return self.keys, self.values


def static_caches(keys: list, values: list, write_cols) -> list[StaticKVCache]:
    return [StaticKVCache(k, v, write_cols) for k, v in zip(keys, values)]


# -- the engine's state: weights, cache and step buffers, all at fixed addresses ----------------------------
class StaticState:
    def __init__(self, model, batch: int, max_seq_len: int, attn_implementation: str):
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
    cols = torch.arange(state.max_seq_len, device=state.device)
    q = query_cols[None, :, None]
    allowed = ((cols >= pad_len[:, None, None]) & (cols <= q)) | (cols == q)
    mask = allowed[:, None]
    if state.additive_mask:
        mask = torch.where(mask, 0.0, torch.finfo(state.dtype).min).to(state.dtype)
    return mask


# Decoder layers whose forward is transformers' pre-norm one (norm, attention, add; norm, MLP, add), which
# layer_forward runs piece by piece; any other layer runs its own forward.
PRE_NORM_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"})


def layer_forward(layer, hidden, residual, mask, position_ids, position_embeddings, cache, cache_kwarg: str):
    """One transformers decoder layer over a static cache (`cache.update` writes its new keys and values). Its input
    is `hidden + residual`, and it returns its output the same way, as (hidden, residual): a pre-norm layer's last
    residual add is left to the next layer, where it fuses with that layer's first norm into one kernel (the layer
    compiled on its own would run it as a kernel of its own, once per layer per step)."""
    hidden = hidden + residual
    kwargs = {"attention_mask": mask, "position_ids": position_ids, "position_embeddings": position_embeddings}
    if type(layer).__name__ not in PRE_NORM_LAYERS:
        out = layer(hidden, **kwargs, **{cache_kwarg: cache})
        out = out[0] if isinstance(out, tuple) else out  # transformers 4.x returned a tuple
        return out, torch.zeros_like(out)
    attention, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **kwargs, **{cache_kwarg: cache})
    hidden = hidden + attention
    return layer.mlp(layer.post_attention_layernorm(hidden)), hidden


def decoder_hidden(state: StaticState, input_ids, position_ids, mask, caches: list, layer_fn: Callable = layer_forward):
    """transformers' layers, layer i over caches[i] through `layer_fn` (layer_forward's arguments); the last layer's
    hidden states, before the final norm."""
    base = state.model.model
    hidden = base.embed_tokens(input_ids)
    position_embeddings = base.rotary_emb(hidden, position_ids)
    residual = torch.zeros_like(hidden)
    for layer, cache in zip(base.layers, caches):
        hidden, residual = layer_fn(
            layer, hidden, residual, mask, position_ids, position_embeddings, cache, state.cache_kwarg
        )
    return hidden + residual


def forward_last(state: StaticState, input_ids, position_ids, mask, caches: list, layer_fn: Callable = layer_forward):
    """Logits of the last position only (all the next token needs)."""
    hidden = decoder_hidden(state, input_ids, position_ids, mask, caches, layer_fn)
    return state.model.lm_head(state.model.model.norm(hidden[:, -1:]))[:, -1]


def sequence_logits(state: StaticState, ids: list[int]):
    """Logits at every position of one sequence through the engine's own weights and attention, over a cache of its
    own (the engine's rows stay as they are): what a teacher-forced quality check reads. Eager, after the benchmark."""
    n = len(ids)
    _, kv_heads, _, head_dim = state.keys[0].shape
    layer_shape = (1, kv_heads, n, head_dim)
    keys = [torch.zeros(layer_shape, dtype=state.dtype, device=state.device) for _ in state.keys]
    values = [torch.zeros(layer_shape, dtype=state.dtype, device=state.device) for _ in state.values]
    cols = torch.arange(n, device=state.device)
    mask = (cols[None, :] <= cols[:, None])[None, None]  # causal: [1, 1, n, n]
    if state.additive_mask:
        mask = torch.where(mask, 0.0, torch.finfo(state.dtype).min).to(state.dtype)
    input_ids = torch.tensor([ids], dtype=torch.long, device=state.device)
    hidden = decoder_hidden(state, input_ids, cols[None, :], mask, static_caches(keys, values, cols))
    return state.model.lm_head(state.model.model.norm(hidden))[0]


def prefill(state: StaticState, input_ids):
    """Prompt [batch, width], left-padded per state.pad_len, into cache columns 0..width-1; next token [batch]."""
    cols = torch.arange(input_ids.shape[1], device=state.device)
    position_ids = (cols[None, :] - state.pad_len[:, None]).clamp(min=0)  # rope positions count real tokens only
    mask = attention_mask(state, cols, state.pad_len)
    logits = forward_last(state, input_ids, position_ids, mask, static_caches(state.keys, state.values, cols))
    return logits.argmax(dim=-1)


def decode_step(state: StaticState) -> None:
    """One token per row, inputs and outputs in the state's buffers: it takes no arguments, so a CUDA graph of it
    replays as it was captured."""
    position_ids = (state.input_pos - state.pad_len)[:, None]
    mask = attention_mask(state, state.input_pos, state.pad_len)
    logits = forward_last(
        state, state.token, position_ids, mask, static_caches(state.keys, state.values, state.input_pos)
    )
    state.token.copy_(logits.argmax(dim=-1, keepdim=True))
    state.input_pos.add_(1)


# -- compiling and capturing ----------------------------------------------------------------------------------
def compile_plan(compile_mode: str, cuda_graphs: bool, device: str, inflight: bool = False) -> dict[str, Any]:
    """What runs decode and prefill for these options. Prefill is never graphed: its width changes per batch.

    Static: the whole decode step compiles as one graph (Inductor fuses across layers), captured by Inductor's
    cudagraph trees for reduce-overhead / max-autotune, by a torch.cuda.CUDAGraph here otherwise.

    In flight, decode compiles one decoder layer, whose code serves every layer (regional compilation), and each
    (size, span) step is captured here in a torch.cuda.CUDAGraph, whatever the mode: the step must compile for
    dynamic batch sizes and key lengths, and compiling the whole 8B model that way three times (static, dynamic,
    size 1) kept a batch-32 build going for over 3 minutes on an H100, against seconds for one layer. Prompt chunks
    compile one decoder layer of their own the same way (their width, row and columns are shapes and values), so
    their norms, rotary embedding and activation run fused instead of as a dozen eager kernels a layer; they are
    not graphed (a chunk of hundreds of tokens is compute-bound)."""
    graphs = cuda_graphs and device == "cuda"
    if compile_mode == "none":
        return {"prefill": None, "decode": None, "graphs": "manual" if graphs else "off", "unit": "step"}
    if compile_mode == "max-autotune":
        decode_opts = {"max_autotune": True, "coordinate_descent_tuning": True}
    else:  # default and reduce-overhead compile alike
        decode_opts = {}
    if inflight:
        graphed = "manual" if graphs else "off"
        return {"prefill": dict(decode_opts), "decode": decode_opts, "graphs": graphed, "unit": "layer"}
    prefill_opts = dict(decode_opts)
    if compile_mode in ("reduce-overhead", "max-autotune") and graphs:
        decode_opts["triton.cudagraphs"] = True  # Inductor's cudagraph trees capture and replay decode
        return {"prefill": prefill_opts, "decode": decode_opts, "graphs": "cudagraph trees", "unit": "step"}
    return {"prefill": prefill_opts, "decode": decode_opts, "graphs": "manual" if graphs else "off", "unit": "step"}


def describe(plan: dict[str, Any], compile_mode: str) -> dict[str, str]:
    if plan["decode"] is None:
        compiled = "eager"
    elif plan["unit"] == "layer":
        compiled = f"torch.compile ({compile_mode}) of one decoder layer, its code shared by every layer"
    else:
        compiled = f"torch.compile ({compile_mode}) of the whole step"
    graphs = {
        "off": "no CUDA graph",
        "manual": "captured once in a torch.cuda.CUDAGraph and replayed",
        "cudagraph trees": "CUDA graph by Inductor's cudagraph trees, replayed",
    }[plan["graphs"]]
    if plan["prefill"] is None:
        prefill = "eager"
    elif plan["unit"] == "layer":
        prefill = (
            f"torch.compile ({compile_mode}) of one decoder layer per prompt chunk, its code shared by every layer, "
            "dynamic width and columns (1-token chunks eager), no CUDA graph"
        )
    else:
        prefill = f"torch.compile ({compile_mode}), dynamic width, no CUDA graph"
    return {"decode": f"{compiled}, {graphs}", "prefill": prefill}


def make_steps(state: StaticState, plan: dict[str, Any]) -> tuple[Callable, Callable]:
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


def capture_decode(run_decode: Callable, pool=None) -> tuple[Callable, Any]:
    """Capture one decode step (eager or compiled) in a CUDA graph; it reads and writes only the state's buffers,
    so replaying it is the whole step. Graphs captured with one `pool` share their intermediate memory."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture: compilation, cuBLAS handles, allocator pools
        for _ in range(2):
            run_decode()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        run_decode()
    return graph.replay, graph


def warm_up(state: StaticState, run_prefill: Callable, run_decode: Callable) -> None:
    """Compile prefill and decode (and let cudagraph trees record) on a dummy prompt, before any timed request."""
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


def warm_up_widths(state: StaticState, run_prefill: Callable, widths: list[int]) -> None:
    """Prefill at each of these prompt widths once (a batch is as wide as its longest prompt): a width the compiled
    prefill has not seen may recompile it (width 1 always does: dynamo specialises it), which a timed request must not
    pay for."""
    state.pad_len.zero_()
    for width in widths:
        run_prefill(torch.zeros((state.batch, width), dtype=torch.long, device=state.device))
    if state.device.type == "cuda":
        torch.cuda.synchronize()


# -- host side ------------------------------------------------------------------------------------------------
def left_pad_batch(requests: list[Request], batch: int, pad_id: int):
    """[batch, width] prompt ids, left-padded, and each row's padding; rows past the requests are one-token dummies."""
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
