"""Model source: random-weight checkpoints of the named shapes are real, deterministic HF checkpoints, written once
and recorded under a truthful name; weights identity follows the files."""

import json

import pytest
import torch
from conftest import QUICK, run_sweep
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sweep import compose, run
from sweep.backends.trt.options import MMHA_HEAD_SIZES
from sweep.config.errors import ConfigError
from sweep.job.validate import validate
from sweep.model import SHAPES, random_model_name
from sweep.model.random_weights import write_random_checkpoint
from sweep.model.source import ModelShape, ModelSource, model_sizes, weights_digest
from sweep.multirun.sweeper_api import model_identity


def test_tiny_checkpoint_is_deterministic_per_seed_and_loads_like_any_checkpoint(tmp_path):
    a = write_random_checkpoint(tmp_path / "a", "tiny", "float32", seed=0, device="cpu")
    b = write_random_checkpoint(tmp_path / "b", "tiny", "float32", seed=0, device="cpu")
    c = write_random_checkpoint(tmp_path / "c", "tiny", "float32", seed=1, device="cpu")
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
    path = write_random_checkpoint(tmp_path, "tiny", "float32", seed=0, device="cpu")
    before = weights_digest(path)
    assert weights_digest(path) == before
    config = path / "config.json"
    config.write_text(config.read_text() + "\n")
    assert weights_digest(path) != before


# The parameter counts of the hub checkpoints (their model cards and safetensors indexes).
REAL_PARAMETERS = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512, "llama-3.1-8b": 8_030_261_248}


@pytest.mark.parametrize("shape", sorted(REAL_PARAMETERS))
def test_a_real_models_shape_builds_that_models_architecture(shape):
    spec = SHAPES[shape]
    config = AutoConfig.for_model(spec.model_type, **spec.config)
    with torch.device("meta"):  # the architecture without memory for its weights
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == REAL_PARAMETERS[shape]
    assert random_model_name(shape) == f"random-{shape}"
    cfg = compose(["model.generate=random", f"model.shape={shape}"])
    assert model_identity(cfg.model) == (f"random-{shape}", f"generated:random:{shape}:seed=0")


def test_generate_random_tiny_runs_end_to_end_and_is_written_once(tmp_path):
    cache = tmp_path / "cache"
    overrides = ["model.generate=random", "model.shape=tiny", f"cache_dir={cache}", "tracker=none", "device=cpu"]
    first = run(compose([*overrides, *QUICK]))
    path = first.plan.model.path
    assert path.parent == cache / "checkpoints" and path.name.startswith("random-tiny-float32-seed0-cpu-")
    assert first.plan.model.name == "tiny" and first.plan.model.identity["shape"] == "tiny"
    assert first.figures["output_throughput_tok_s"] > 0 and not first.cache_hit
    written = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    again = run(compose([*overrides, *QUICK]))
    assert again.plan.model.path == path and again.cache_hit
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == written  # reused, not written again

    bf16 = run(compose([*overrides, *QUICK, "engine.dtype=bfloat16"]))  # written in the dtype the run uses
    assert bf16.plan.model.path.name.startswith("random-tiny-bfloat16-seed0-cpu-")
    with safe_open(bf16.plan.model.path / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    assert [p.name for p in (cache / "checkpoints").iterdir() if p.name.startswith(".tmp")] == []


def test_an_unknown_shape_is_refused_in_one_line_before_anything_is_written(tmp_path):
    result = run_sweep(tmp_path, "model.shape=gpt-5")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    errors = [line for line in output.splitlines() if "ERROR" in line]
    message = "model.shape='gpt-5' is not allowed; choose one of: tiny, qwen2.5-0.5b, qwen2.5-7b, llama-3.1-8b"
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in output, output
    assert not (tmp_path / "engines_cache").exists()


def test_an_unknown_generator_is_refused():
    with pytest.raises(ConfigError, match="model.generate='tiny' is not allowed; choose one of: random$"):
        validate(compose(["model.generate=tiny"]))
