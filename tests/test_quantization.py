"""engine.quantization and engine.kv_cache_dtype: every value builds or is refused as documented, before anything is
built; the cache key holds them; model_sizes counts the bytes a quantized weight really occupies. Real torchao and
transformers on the tiny model on the CPU; a GPU's compute capability is faked where a test says so (no GPU here)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cpu_config

from sweep.backends import quantization
from sweep.backends.hf.backend import load_hf_model
from sweep.backends.quantization import quantize_model, torchao_refusals
from sweep.backends.vllm import options as vllm_options
from sweep.config.errors import ConfigError
from sweep.job.plan import make_plan, start_engine
from sweep.measure.metrics import decode_step_bytes
from sweep.model.source import ModelShape, ModelSource, linear_weight_bytes, model_sizes


def plan(checkpoint, cache_dir, *overrides):
    return make_plan(cpu_config(checkpoint, cache_dir, *overrides))


@pytest.mark.parametrize("backend", ["hf", "compiled"])
def test_int8_builds_and_int4_and_fp8_are_refused_on_the_cpu(tiny_checkpoint, tmp_path, backend):
    extra = [f"backend={backend}", "engine.compile_mode=none"]
    int8 = plan(tiny_checkpoint, tmp_path, *extra, "engine.quantization=int8_weight_only")
    start_engine(int8)
    try:
        model = int8.backend.state.model if backend == "compiled" else int8.backend.model_
        layer = model.model.layers[0]
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(type(m.weight).__name__ == "Int8Tensor" for m in linears)
    finally:
        int8.backend.close()
    for value, why in [
        (
            "int4_weight_only",
            "torchao's Int4WeightOnlyConfig packs int4 for CUDA (tinygemm, mslk), XPU and NPU only, not the CPU",
        ),
        ("fp8", "fp8 needs a CUDA GPU of compute capability 8.9+ (fp8 tensor cores), and this run is on the CPU"),
    ]:
        with pytest.raises(ConfigError) as refused:
            plan(tiny_checkpoint, tmp_path, *extra, f"engine.quantization={value}")
        assert str(refused.value) == (
            f"engine.quantization='{value}' is not allowed for backend={backend} on cpu (float32): {why}; "
            "allowed here: none, int8_weight_only"
        )
    built = {p.parent.parent.name for p in tmp_path.glob("*/*/manifest.json")}
    assert built == {backend}  # the refused values built nothing


def test_a_backend_that_ignores_the_options_records_them_as_ignored(tiny_checkpoint, tmp_path):
    options = ["engine.quantization=fp8", "engine.kv_cache_dtype=fp8"]
    paged = plan(tiny_checkpoint, tmp_path, "backend=hf_paged", *options)  # fp8 would be refused if it were honoured
    assert {"quantization", "kv_cache_dtype"} <= set(paged.backend.ignored_options())
    assert paged.sizes == plan(tiny_checkpoint, tmp_path, "backend=hf_paged").sizes  # it holds what it always holds
    hf = plan(tiny_checkpoint, tmp_path, "engine.kv_cache_dtype=fp8")
    assert "kv_cache_dtype" in hf.backend.ignored_options() and "quantization" not in hf.backend.ignored_options()


@pytest.mark.parametrize("backend", ["hf", "compiled"])
def test_the_cache_key_holds_the_quantization(tiny_checkpoint, tmp_path, backend):
    keys = {
        value: plan(tiny_checkpoint, tmp_path, f"backend={backend}", f"engine.quantization={value}").key_inputs
        for value in ("none", "int8_weight_only")
    }
    assert "quantization" not in keys["none"]["options"]  # an unquantized engine's key does not depend on it
    assert keys["int8_weight_only"]["options"]["quantization"] == "int8_weight_only"
    assert {k: v for k, v in keys["none"].items() if k != "options"} == {
        k: v for k, v in keys["int8_weight_only"].items() if k != "options"
    }


def test_gpu_requirements_from_torchao_and_vllm(monkeypatch):
    # Fake: the GPU's compute capability (there is no GPU here); the tables are the real ones.
    def on(capability):
        monkeypatch.setattr(quantization, "gpu_capability", lambda device: capability)

    on((8, 6))  # an A10 or RTX 3090: int4 tinygemm yes, fp8 no
    ampere = torchao_refusals("cuda", "bfloat16")
    assert ampere["int8_weight_only"] is None and ampere["int4_weight_only"] is None
    assert ampere["fp8"] == "fp8 needs a GPU of compute capability 8.9+ (fp8 tensor cores); this one has 8.6"
    assert "set engine.dtype=bfloat16 (not float16)" in torchao_refusals("cuda", "float16")["int4_weight_only"]
    monkeypatch.setattr(vllm_options, "gpu_capability", lambda device: (8, 6))
    assert "8.9+" in vllm_options.quantization_refusals("cuda", "bfloat16")["fp8"]
    on((9, 0))  # an H100
    assert all(why is None for why in torchao_refusals("cuda", "bfloat16").values())
    assert "takes bfloat16 weights" in torchao_refusals("cuda", "float16")["fp8"]  # torchao's per-row fp8
    monkeypatch.setattr(vllm_options, "gpu_capability", lambda device: (9, 0))
    assert vllm_options.quantization_refusals("cuda", "float16")["fp8"] is None  # vLLM's own fp8 takes float16


def test_without_torchao_every_quantized_value_says_how_to_install_it(monkeypatch):
    # Fake: torchao reported missing (it is installed here).
    monkeypatch.setattr(quantization.importlib.util, "find_spec", lambda name: None)
    refusals = torchao_refusals("cpu", "float32")
    assert refusals["none"] is None
    assert "pip install 'torchao>=0.18'" in refusals["int8_weight_only"]


def test_vllm_arguments_for_each_value(tiny_checkpoint, tmp_path):
    def kwargs(*overrides):
        cfg = cpu_config(tiny_checkpoint, tmp_path, "backend=vllm", *overrides)
        return vllm_options.engine_kwargs(cfg, "/m", "cpu", "float32", bytes_per_token=1024)

    assert "quantization" not in kwargs() and kwargs()["kv_cache_dtype"] == "auto"
    assert kwargs("engine.quantization=fp8")["quantization"] == "fp8"  # vLLM's own online fp8 (Fp8Config)
    int8 = kwargs("engine.quantization=int8_weight_only", "engine.kv_cache_dtype=fp8")
    assert int8["quantization"] == "torchao" and int8["kv_cache_dtype"] == "fp8"
    config = json.loads(int8["hf_overrides"]["quantization_config_dict_json"])  # what vLLM's TorchAOConfig reads
    assert config["_type"] == "Int8WeightOnlyConfig"
    from torchao.core.config import config_from_dict

    assert type(config_from_dict(config)).__name__ == "Int8WeightOnlyConfig"
    int4 = json.loads(kwargs("engine.quantization=int4_weight_only")["hf_overrides"]["quantization_config_dict_json"])
    assert int4["_type"] == "Int4WeightOnlyConfig" and int4["_data"]["int4_packing_format"] == "tile_packed_to_4d"


def held_bytes(model) -> int:
    """Bytes of every parameter as held in memory: a torchao tensor's inner tensors, or the plain tensor."""
    total = 0
    for param in model.parameters():
        names = getattr(param, "tensor_data_names", None)
        if names is None:
            total += param.numel() * param.element_size()
            continue
        inner = [getattr(param, n) for n in (*names, *getattr(param, "optional_tensor_data_names", ()))]
        total += sum(t.numel() * t.element_size() for t in inner if t is not None)
    return total


def test_model_sizes_count_the_bytes_a_quantized_weight_really_occupies(tiny_checkpoint, caplog):
    source = ModelSource("tiny", tiny_checkpoint, {}, ModelShape.read(tiny_checkpoint))
    model, _ = load_hf_model(tiny_checkpoint, "float32", "sdpa", "cpu")
    assert model_sizes(source, "float32")["model_bytes"] == held_bytes(model)
    quantize_model(model, "int8_weight_only", compiled=False)  # torchao on the CPU: real Int8Tensors
    # Eager int8 weight-only dequantizes before each matmul: the run says it will be slower, not faster.
    assert "without torch.compile dequantizes every weight" in caplog.text
    int8 = model_sizes(source, "float32", "int8_weight_only")
    assert int8["model_bytes"] == held_bytes(model)
    assert int8["model_params"] == model_sizes(source, "float32")["model_params"]
    assert model_sizes(source, "float32", kv_cache_dtype="fp8")["kv_bytes_per_token"] == 2 * 2 * 1 * 64 * 1


def test_the_decode_floor_of_a_quantized_llama_3_1_8b_counts_its_packed_weights():
    # Llama-3.1-8B's shapes (32 layers, hidden 4096, 8 KV heads, MLP 14336, vocabulary 128256), bfloat16.
    layer = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
    table = 128256 * 4096 * 2
    floors = {}
    for value in ("none", "int8_weight_only", "int4_weight_only", "fp8"):
        linears = 32 * sum(linear_weight_bytes(value, n, k, 2) for n, k in layer)
        sizes = {"model_bytes": linears + 2 * table, "input_embedding_bytes": table, "kv_bytes_per_token": 131072}
        floors[value] = decode_step_bytes(sizes, 128256, batch_size=1, mean_context=0)[0]
    assert floors["none"] == pytest.approx(15.0e9, rel=0.01)  # 6.98e9 decoder parameters x 2 + the LM head
    assert floors["int8_weight_only"] == pytest.approx(floors["none"] - 6.98e9, rel=0.01)  # a byte a weight
    assert floors["fp8"] == pytest.approx(floors["int8_weight_only"], rel=0.001)
    # int4: half a byte a weight plus a bfloat16 scale and zero point per 128 (down_proj's 14336 columns pad to 14336)
    assert floors["int4_weight_only"] == pytest.approx(1.05e9 + 6.98e9 * (0.5 + 4 / 128), rel=0.01)
