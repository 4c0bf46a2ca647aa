"""Patches to transformers' model code for decode over a static cache: the attention function and fused projections.

The model stays transformers' own (embeddings, decoder layers, rotary embedding, norm and head); these swap two
things inside it for what a memory-bound decode step needs.
"""

from __future__ import annotations

import functools
import sys
import types
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

STATIC_SDPA = "sweep_static_sdpa"  # the attention function registered with transformers for attn_implementation=sdpa
STATIC_FLEX = "sweep_static_flex"  # ... and for attn_implementation=flex_attention
# engine.attn_implementation -> what the model is loaded with
ATTENTION = {"sdpa": STATIC_SDPA, "flex_attention": STATIC_FLEX, "eager": "eager"}
# What attention through SDPA may run (prompts; decode too where query and KV heads are as many). Never cuDNN's
# kernel: it builds a graph for every new prompt length (~1.4 ms of host time per layer on an H100), so under a
# load of varied prompts the GPU waited on the host through every prefill.
PROMPT_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or heads == kv_heads:
        with sdpa_kernel(PROMPT_KERNELS):
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
    scale = head_dim**-0.5 if scaling is None else scaling
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)  # head h = kv * groups + g, as repeat_kv
    scores = (grouped @ key.transpose(-1, -2)).float() * scale  # [batch, kv_heads, groups, max_seq_len]
    probs = scores.masked_fill(~attention_mask, float("-inf")).softmax(dim=-1).to(value.dtype)
    out = probs @ value
    return out.reshape(batch, 1, heads, head_dim), None  # [batch, tokens, heads, head_dim], as transformers returns


FLEX_BLOCK = 128  # the key columns of one FlexAttention block: a row reads its own tokens rounded up to this


def static_cache_flex(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Decode attention through FlexAttention, prompts as static_cache_sdpa runs them.

    The two GEMMs of static_cache_sdpa read every row's keys and values up to the step's span, its longest sequence;
    FlexAttention reads only the blocks that hold a row's own tokens, with the query heads of one KV head together
    (enable_gqa), and its decode kernel splits the keys over the GPU's SMs even at batch 1. In-flight decode gives
    its block mask (built once a step); a dense decode mask (the static scheduler's) becomes one here.
    """
    if query.shape[2] != 1:
        return static_cache_sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    block_mask = attention_mask if isinstance(attention_mask, BlockMask) else run_block_mask(attention_mask)
    out = flex(query)(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2), None  # [batch, tokens, heads, head_dim], as transformers returns


def run_block_mask(mask) -> BlockMask:
    """The block mask of a decode mask [rows, 1, 1, span] in which each row sees one run of columns (from its first
    real one, after left padding, to its own): each row's first block and block count."""
    span = mask.shape[-1]
    visible = mask[:, 0, 0, :]
    first = visible.to(torch.int32).argmax(dim=-1)  # the run's first column (argmax: the first maximum)
    end = first + visible.sum(dim=-1)  # one past its last

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= first[b]) & (kv_idx < end[b])

    first_block = first // FLEX_BLOCK
    return block_mask_of(first_block, (end - 1) // FLEX_BLOCK + 1 - first_block, span, mask_mod)


def block_mask_of(first_block, num_blocks, span: int, mask_mod) -> BlockMask:
    """A decode block mask: row b reads num_blocks[b] blocks of keys from first_block[b] on (their columns masked
    by mask_mod)."""
    rows, span_blocks = first_block.shape[0], -(-span // FLEX_BLOCK)
    blocks = first_block[:, None] + torch.arange(span_blocks, device=first_block.device, dtype=torch.int32)
    return BlockMask.from_kv_blocks(
        num_blocks.to(torch.int32).view(rows, 1, 1),
        blocks.clamp(max=span_blocks - 1).to(torch.int32).view(rows, 1, 1, span_blocks),  # past num_blocks: unread
        BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(1, span),
        compute_q_blocks=False,  # the query-side blocks serve the backward pass only
    )


def flex(query):
    """flex_attention as it should run here: traced as it is inside a compiled layer; called eagerly, compiled on
    its own on a GPU (eager FlexAttention computes the whole score matrix), and as it is on a CPU (tests and
    rehearsals), without its warning that it is not compiled."""
    if torch.compiler.is_compiling():
        return flex_attention
    if query.device.type == "cuda":
        return compiled_flex()
    return eager_flex


@functools.cache
def compiled_flex():
    return torch.compile(flex_attention)  # static first, then sizes and spans symbolic (head sizes stay static)


def eager_flex(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def register_attention() -> None:
    AttentionInterface.register(STATIC_SDPA, static_cache_sdpa)
    AttentionInterface.register(STATIC_FLEX, static_cache_flex)


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
    first = linears[0]
    fused = torch.nn.Linear(
        first.in_features, sum(linear.out_features for linear in linears), bias=first.bias is not None, device="meta"
    )  # no weights of its own: the concatenated ones are set below
    fused.weight = torch.nn.Parameter(torch.cat([linear.weight for linear in linears]), requires_grad=False)
    if first.bias is not None:
        fused.bias = torch.nn.Parameter(torch.cat([linear.bias for linear in linears]), requires_grad=False)
    return fused


def fused_attention_forward(
    self, hidden_states, position_embeddings, attention_mask, cache=None, past_key_values=None, **kwargs
):
    """transformers' Qwen2/Llama attention forward (5.1x and 5.2x alike), with q, k and v from one GEMV.

    The cache comes as `cache` from transformers 5.2x and as `past_key_values` before.
    """
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
    out, weights = attention_interface(
        self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
    )  # no sliding window: check() refuses models that use one
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def fused_mlp_forward(self, x):
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)
