"""The named model shapes: architectures whose checkpoints sweep can write with random weights (`model.generate=random
model.shape=<name>`), so that a machine without the hub measures a real model's speed, which does not depend on the
weights' values when EOS is ignored.

The numbers are the models' own config.json values (the hub checkpoints at the revisions conf/model/ pins); `tiny`
and `llama-3.1-8b-narrow` are made up here. Importing this module imports nothing heavy (validation reads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Shape:
    model_type: str  # transformers' model_type: qwen2 or llama
    config: Mapping[str, Any]  # config.json's architecture keys, as transformers' config class takes them
    about: str  # where the numbers come from


QWEN2_ROPE = dict(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768)
LLAMA_31 = dict(
    vocab_size=128256,
    num_hidden_layers=32,
    max_position_embeddings=131072,
    rope_theta=5e5,
    rms_norm_eps=1e-5,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=False,
)

SHAPES: dict[str, Shape] = {
    # Big enough to exercise GQA, rope and a multi-layer KV cache, small enough for CI. Head size 64
    # (hidden_size / num_attention_heads) is one every engine's attention kernel supports (TensorRT-LLM's MMHA and
    # vLLM's CPU attention reject 16). It is derived, never written as head_dim: vLLM ignores an explicit head_dim on
    # Qwen2 and would silently compute a different one.
    "tiny": Shape(
        "qwen2",
        dict(
            vocab_size=320,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
        "made up for CI: a 2-layer Qwen2 with GQA",
    ),
    "qwen2.5-0.5b": Shape(
        "qwen2",
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            **QWEN2_ROPE,
        ),
        "Qwen/Qwen2.5-0.5B-Instruct: 0.49e9 parameters",
    ),
    "qwen2.5-7b": Shape(
        "qwen2",
        dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            tie_word_embeddings=False,
            **QWEN2_ROPE,
        ),
        "Qwen/Qwen2.5-7B-Instruct: 7.62e9 parameters, 15.2 GB in 16 bits",
    ),
    "llama-3.1-8b": Shape(
        "llama",
        dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, **LLAMA_31),
        "meta-llama/Llama-3.1-8B-Instruct: 8.03e9 parameters, 16.1 GB in 16 bits",
    ),
    # Per-step host work depends on the layers and the Python around them, not on the width: all 32 of Llama-3.1's
    # layers, its vocabulary, GQA ratio and rope, at a width a CPU runs quickly.
    "llama-3.1-8b-narrow": Shape(
        "llama",
        dict(hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=2, **LLAMA_31),
        "Llama-3.1-8B's depth, vocabulary and rope at width 256 (made up here)",
    ),
}


def random_model_name(shape: str) -> str:
    """What records call random weights of `shape`: a real model's name prefixed with random-, so that no record
    passes them off as the real model's; tiny is no real model and keeps its name."""
    return shape if shape == "tiny" else f"random-{shape}"
