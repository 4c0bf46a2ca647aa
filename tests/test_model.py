"""Model source: the tiny checkpoint is a real, deterministic HF checkpoint; weights identity follows the files."""

import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from sweep.backends.trt.options import MMHA_HEAD_SIZES
from sweep.model.source import ModelShape, ModelSource, generate_tiny_checkpoint, model_sizes, weights_digest


def test_tiny_checkpoint_is_deterministic_per_seed_and_loads_like_any_checkpoint(tmp_path):
    a = generate_tiny_checkpoint(tmp_path / "a", seed=0)
    b = generate_tiny_checkpoint(tmp_path / "b", seed=0)
    c = generate_tiny_checkpoint(tmp_path / "c", seed=1)
    assert weights_digest(a) == weights_digest(b) != weights_digest(c)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in a.iterdir()}
    assert json.loads((a / "config.json").read_text())["model_type"] == "qwen2"
    model = AutoModelForCausalLM.from_pretrained(a)
    tokenizer = AutoTokenizer.from_pretrained(a)
    ids = tokenizer("hello", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "hello" and len(ids) == 5  # one token per byte
    sizes = model_sizes(ModelSource("tiny", a, {}, ModelShape.read(a)), "float32")
    # Head size 64, which TensorRT-LLM's attention plugin (MMHA_HEAD_SIZES) and vLLM's CPU attention support, is
    # derived from hidden_size / heads: an explicit head_dim would be ignored by vLLM for Qwen2. Still GQA.
    config = json.loads((a / "config.json").read_text())
    shape = ModelShape.read(a)
    assert "head_dim" not in config and shape.head_dim == 64 and shape.head_dim in MMHA_HEAD_SIZES
    assert shape.num_kv_heads < shape.num_heads
    assert sizes["model_params"] == sum(p.numel() for p in model.parameters())
    assert sizes["model_bytes"] == 4 * sizes["model_params"]


def test_weights_digest_follows_the_files(tmp_path):
    path = generate_tiny_checkpoint(tmp_path, seed=0)
    before = weights_digest(path)
    assert weights_digest(path) == before
    config = path / "config.json"
    config.write_text(config.read_text() + "\n")
    assert weights_digest(path) != before
