"""backend=trt without TensorRT-LLM: the option mapping (against names read from tensorrt-llm 1.2's source, kept in
tests/fixtures/trtllm_1_2_fields.json), the trtllm-build command line, the cache key, and the clean failure when the
package is missing. Nothing here runs TensorRT-LLM; tests that stand in for parts of it say so.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from sweep.backends.cache import engine_key
from sweep.backends.registry import BACKENDS
from sweep.backends.trt import options as trt  # the pure option mapping
from sweep.backends.trt import runtime
from sweep.backends.trt.backend import TRTBackend
from sweep.backends.trt.config import TRTBackendConfig
from sweep.config.errors import ConfigError
from sweep.config.schema import EngineConfig
from sweep.workload.stream import RequestStream

REPO = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((REPO / "tests" / "fixtures" / "trtllm_1_2_fields.json").read_text())

ENGINE = {  # EngineConfig's defaults, dtype resolved as make_plan does on a GPU
    "dtype": "bfloat16",
    "max_batch_size": 8,
    "max_input_len": 1024,
    "max_seq_len": 2048,
    "max_num_tokens": 8192,
    "gemm_plugin": "auto",
    "gpt_attention_plugin": "auto",
    "context_fmha": True,
    "paged_kv_cache": True,
    "tokens_per_block": 32,
    "quantization": "none",
    "kv_cache_dtype": "auto",
    "tp_size": 1,
    "pp_size": 1,
}


def flag_pairs(argv: list[str]) -> dict[str, str]:
    assert argv[0] == "trtllm-build"
    rest = argv[1:]
    assert len(rest) % 2 == 0, rest  # every flag sweep writes takes one value
    return dict(zip(rest[::2], rest[1::2]))


# -- the option mapping against the 1.2 source ---------------------------------------------------------------------


def test_every_honoured_option_is_an_engine_option():
    engine_fields = {f.name for f in fields(EngineConfig)}
    assert set(TRTBackend.honoured_options) <= engine_fields
    assert set(TRTBackend.honoured_options) == set(ENGINE)


def test_build_config_kwargs_are_buildconfig_fields():
    kwargs = trt.build_config_kwargs(ENGINE)
    assert kwargs == {"max_batch_size": 8, "max_input_len": 1024, "max_seq_len": 2048, "max_num_tokens": 8192}
    assert set(kwargs) <= set(FIXTURE["build_config_fields"])


def test_plugin_config_kwargs_are_pluginconfig_fields():
    kwargs = trt.plugin_config_kwargs(ENGINE)
    assert kwargs == {
        "gemm_plugin": "auto",
        "gpt_attention_plugin": "auto",
        "context_fmha": True,
        "paged_kv_cache": True,
        "tokens_per_block": 32,
    }
    assert set(kwargs) <= set(FIXTURE["plugin_config_fields"])


def test_disable_maps_to_none_as_pluginconfig_spells_it():
    kwargs = trt.plugin_config_kwargs({**ENGINE, "gemm_plugin": "disable", "gpt_attention_plugin": "float16"})
    assert kwargs["gemm_plugin"] is None
    assert kwargs["gpt_attention_plugin"] == "float16"


def test_every_option_lands_somewhere():
    # An honoured option that reached neither BuildConfig, PluginConfig nor the LLM call would be silently dropped.
    targets = {m.option: m.target for m in trt.OPTION_MAP}
    assert set(targets) == set(TRTBackend.honoured_options)
    assert set(targets.values()) <= {"build_config", "plugin_config", "llm", "quant_config"}
    assert set(trt.mapped_kwargs(ENGINE, "llm")) <= set(FIXTURE["llm_kwargs"])
    assert set(trt.mapped_kwargs(ENGINE, "quant_config")) <= set(FIXTURE["quant_config_fields"])
    assert "quant_config" in FIXTURE["llm_kwargs"]


def test_quantization_maps_to_quant_algos_that_need_no_calibration_data():
    assert trt.quant_config_kwargs(ENGINE) is None  # unquantized: no quant_config at all
    algos = {}
    for value in ("int8_weight_only", "int4_weight_only", "fp8"):
        algos[value] = trt.quant_config_kwargs({**ENGINE, "quantization": value})["quant_algo"]
    assert algos == {"int8_weight_only": "W8A16", "int4_weight_only": "W4A16", "fp8": "FP8_PER_CHANNEL_PER_TOKEN"}
    assert set(algos.values()) <= set(FIXTURE["quant_algos"]) - set(FIXTURE["quant_algos_needing_calibration"])
    kv = trt.quant_config_kwargs({**ENGINE, "kv_cache_dtype": "fp8"})
    assert kv == {"quant_algo": None, "kv_cache_quant_algo": "FP8"} and "FP8" in FIXTURE["kv_cache_quant_algos"]


def test_runtime_kwargs_are_fields_of_their_classes():
    backend_cfg = SimpleNamespace(free_gpu_memory_fraction=0.8, enable_block_reuse=False, max_tokens_in_kv_cache=4096)
    kv = trt.kv_cache_kwargs(backend_cfg)
    assert kv == {"free_gpu_memory_fraction": 0.8, "enable_block_reuse": False, "max_tokens": 4096}
    assert set(kv) <= set(FIXTURE["kv_cache_config_fields"])
    sp = trt.sampling_kwargs(output_len=17, end_id=2, pad_id=0)
    assert sp["max_tokens"] == 17 and sp["ignore_eos"] is True and sp["top_k"] == 1
    assert set(sp) <= set(FIXTURE["sampling_params_fields"])


def test_log_levels_are_trtllm_builds():
    assert list(trt.LOG_LEVELS) == FIXTURE["trtllm_build_log_levels"]


def test_reduce_fusion_architectures_are_the_builders():
    assert list(trt.REDUCE_FUSION_ARCHITECTURES) == FIXTURE["reduce_fusion_architectures"]


# -- field validation ----------------------------------------------------------------------------------------------


def test_unknown_field_gives_an_error_listing_the_valid_ones():
    valid = ["context_fmha", "gemm_plugin", "tokens_per_block"]
    with pytest.raises(ConfigError) as err:
        trt.check_fields({"gemm_plugin": "auto", "paged_kv_cache": True}, valid, "PluginConfig", "1.2.9")
    message = str(err.value)
    assert "engine option(s) paged_kv_cache" in message
    assert "PluginConfig field(s) paged_kv_cache" in message
    assert "tensorrt_llm 1.2.9" in message
    assert "context_fmha, gemm_plugin, tokens_per_block" in message


def test_mapping_passes_validation_against_the_1_2_fields():
    trt.check_fields(trt.build_config_kwargs(ENGINE), FIXTURE["build_config_fields"], "BuildConfig", "1.2")
    trt.check_fields(trt.plugin_config_kwargs(ENGINE), FIXTURE["plugin_config_fields"], "PluginConfig", "1.2")


def test_field_names_reads_dataclasses_and_pydantic_models():
    # BuildConfig was a dataclass and became a pydantic model during 1.2; these two stand-ins are neither's real class.
    from dataclasses import dataclass

    from pydantic import BaseModel

    @dataclass
    class AsDataclass:
        max_seq_len: int = 0
        max_batch_size: int = 1

    class AsPydantic(BaseModel):
        max_seq_len: int = 0
        max_batch_size: int = 1

    assert trt.field_names(AsDataclass) == ["max_batch_size", "max_seq_len"]
    assert trt.field_names(AsPydantic) == ["max_batch_size", "max_seq_len"]


# -- the trtllm-build command line ---------------------------------------------------------------------------------


def test_trtllm_build_command_uses_flags_from_the_source():
    argv = trt.trtllm_build_argv(ENGINE, checkpoint_dir="/ckpt", output_dir="/engine")
    flags = flag_pairs(argv)
    assert set(flags) <= set(FIXTURE["trtllm_build_flags"])
    assert flags == {
        "--checkpoint_dir": "/ckpt",
        "--output_dir": "/engine",
        "--max_batch_size": "8",
        "--max_input_len": "1024",
        "--max_seq_len": "2048",
        "--max_num_tokens": "8192",
        "--gemm_plugin": "auto",
        "--gpt_attention_plugin": "auto",
        "--context_fmha": "enable",
        "--kv_cache_type": "paged",
        "--tokens_per_block": "32",
    }


def test_trtllm_build_values_are_allowed_choices():
    choices = FIXTURE["plugin_flag_choices"]
    for engine in (
        ENGINE,
        {
            **ENGINE,
            "gemm_plugin": "disable",
            "gpt_attention_plugin": "bfloat16",
            "context_fmha": False,
            "paged_kv_cache": False,
        },
    ):
        flags = flag_pairs(trt.trtllm_build_argv(engine))
        assert flags["--gemm_plugin"] in choices["gemm_plugin"]
        assert flags["--gpt_attention_plugin"] in choices["gpt_attention_plugin"]
        assert flags["--context_fmha"] in choices["switch"]
        assert flags["--kv_cache_type"] in FIXTURE["kv_cache_type_choices"]


def test_trtllm_build_always_sets_max_seq_len():
    # Left out, trtllm-build deduces max_seq_len from max_position_embeddings: a different engine.
    for max_seq_len in (64, 2048, 32768):
        flags = flag_pairs(trt.trtllm_build_argv({**ENGINE, "max_seq_len": max_seq_len}))
        assert flags["--max_seq_len"] == str(max_seq_len)


def test_contiguous_kv_cache_and_disabled_switches():
    flags = flag_pairs(trt.trtllm_build_argv({**ENGINE, "paged_kv_cache": False, "context_fmha": False}))
    assert flags["--kv_cache_type"] == "continuous"
    assert flags["--context_fmha"] == "disable"


# -- silent overrides ----------------------------------------------------------------------------------------------


def overrides(build_changes=None, plugin_changes=None, architecture="Qwen2ForCausalLM", tp_size=1):
    engine = {**ENGINE, **(build_changes or {})}
    plugin = {**trt.plugin_config_kwargs(engine), **(plugin_changes or {})}
    return trt.predicted_overrides(
        trt.build_config_kwargs(engine), plugin, FIXTURE["plugin_config_defaults"], architecture, tp_size
    )


def test_reduce_fusion_is_forced_off_for_qwen_even_with_tensor_parallelism():
    notes = overrides(plugin_changes={"reduce_fusion": True}, tp_size=2)
    assert any("reduce_fusion is forced off" in n and "Qwen2ForCausalLM" in n for n in notes)


def test_reduce_fusion_survives_for_llama_with_tensor_parallelism_only():
    assert not any(
        "reduce_fusion" in n
        for n in overrides(plugin_changes={"reduce_fusion": True}, architecture="LlamaForCausalLM", tp_size=2)
    )
    assert any(
        "reduce_fusion is forced off" in n
        for n in overrides(plugin_changes={"reduce_fusion": True}, architecture="LlamaForCausalLM", tp_size=1)
    )


def test_user_buffer_follows_reduce_fusion():
    notes = overrides(plugin_changes={"reduce_fusion": True, "user_buffer": True})
    assert any("user_buffer is forced off" in n for n in notes)


def test_max_num_tokens_is_clamped_to_batch_times_seq_len():
    notes = overrides({"max_batch_size": 1, "max_seq_len": 2048, "max_num_tokens": 8192})
    assert "max_num_tokens=8192 is changed to 2048 by the builder" in notes


def test_max_num_tokens_below_a_block_is_raised_to_a_block():
    engine = {**ENGINE, "max_num_tokens": 16, "tokens_per_block": 64}
    plugin = {**FIXTURE["plugin_config_defaults"], **trt.plugin_config_kwargs(engine)}
    assert trt.effective_max_num_tokens(trt.build_config_kwargs(engine), plugin) == 64


def test_max_input_len_is_ignored_with_padding_removal_and_fmha():
    assert any("ignores max_input_len" in n for n in overrides())
    assert not any("ignores max_input_len" in n for n in overrides({"context_fmha": False}))


def test_max_input_len_above_max_seq_len_is_clipped():
    notes = overrides({"max_input_len": 4096, "max_seq_len": 2048, "max_num_tokens": 8192})
    assert "max_input_len=4096 is clipped to max_seq_len=2048 by the builder" in notes


def test_disabling_context_fmha_disables_paged_context_fmha():
    notes = overrides({"context_fmha": False})
    assert any("use_paged_context_fmha" in n for n in notes)


def test_no_length_override_for_consistent_options():
    notes = overrides({"max_batch_size": 8, "max_seq_len": 2048, "max_num_tokens": 8192})
    assert not any("max_num_tokens" in n or "clipped" in n for n in notes)


# -- versions and the cache key ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version",
    ["1.2.0", "1.2.1", "1.2.0rc2", "1.2.0.post1", "1.2.0rc6.post3", "1.3.0rc0", "1.3.0rc5.post2", "1.3.0rc15"],
)
def test_releases_with_the_engine_path_are_supported(version):
    trt.check_supported_version(version)


@pytest.mark.parametrize(
    "version", ["1.1.0", "1.3.0rc22", "1.3.0", "1.4.0rc1", "1.20.0", "0.21.0", "2.0.0", "nonsense"]
)
def test_releases_without_the_engine_path_are_refused(version):
    with pytest.raises(ConfigError, match=rf"up to 1\.3\.0rc15, the last release.*found tensorrt-llm {version}"):
        trt.check_supported_version(version)


def test_missing_package_gives_the_install_hint():
    with pytest.raises(
        ConfigError, match=r"pip install 'tensorrt-llm==1\.2\.\*' --extra-index-url https://pypi\.nvidia\.com"
    ):
        trt.check_supported_version(None)


def key_inputs(libraries):
    """Shaped as sweep.job.plan.make_plan builds them; only the libraries differ between the keys compared."""
    return {
        "model": {"hub_id": "Qwen/Qwen2.5-7B-Instruct", "revision": "a09a35458c702b33eeacc393d103063234e8bc28"},
        "backend": "trt",
        "libraries": libraries,
        "options": {k: v for k, v in ENGINE.items() if k != "dtype"},
        "dtype": "bfloat16",
        "gpu": {"gpu_name": "NVIDIA H100 80GB HBM3", "gpu_compute_capability": "9.0"},
    }


def test_cache_key_changes_with_tensorrt_llm_version_and_sm():
    base = engine_key(key_inputs(trt.cache_key_libraries("1.2.0", "90", "10.13.3.9")))
    assert base == engine_key(key_inputs(trt.cache_key_libraries("1.2.0", "90", "10.13.3.9")))
    assert base != engine_key(key_inputs(trt.cache_key_libraries("1.2.1", "90", "10.13.3.9")))
    assert base != engine_key(key_inputs(trt.cache_key_libraries("1.2.0", "89", "10.13.3.9")))
    assert base != engine_key(key_inputs(trt.cache_key_libraries("1.2.0", "90", "10.14.1.48")))


def test_library_versions_reads_the_installed_packages(monkeypatch):
    # Fakes: a stand-in tensorrt_llm module and GPU capability; the real ones cannot be installed here.
    monkeypatch.setitem(sys.modules, "tensorrt_llm", SimpleNamespace(__version__="1.2.1"))
    monkeypatch.setattr(runtime, "gpu_sm", lambda: "100")
    monkeypatch.setattr(runtime, "tensorrt_version", lambda: None)
    backend = TRTBackend(SimpleNamespace(), model=None, device="cuda", dtype="bfloat16")
    assert backend.library_versions() == {"tensorrt_llm": "1.2.1", "gpu_sm": "100"}


def test_check_refuses_an_unsupported_installed_version(monkeypatch):
    # Fake: pretend tensorrt-llm 1.3.0 is installed (only its reported version; nothing is imported).
    monkeypatch.setattr(runtime, "installed_version", lambda: "1.3.0")
    backend = TRTBackend(SimpleNamespace(), model=None, device="cuda", dtype="bfloat16")
    with pytest.raises(ConfigError, match="found tensorrt-llm 1.3.0"):
        backend.check(workload=None)


# -- streaming timestamps ------------------------------------------------------------------------------------------


def test_collect_stream_timestamps_each_new_token():
    # Fake: an async iterator shaped like a streamed RequestOutput (outputs[0].token_ids grows with each response).
    async def fake_stream():
        for ids in ([5], [5, 9], [5, 9, 7, 3]):
            await asyncio.sleep(0.01)
            yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(ids))])

    gen = asyncio.run(runtime.collect_stream(fake_stream()))
    assert gen.token_ids == [5, 9, 7, 3]
    assert len(gen.token_times) == 4
    assert gen.token_times[0] < gen.token_times[1] < gen.token_times[2]
    assert gen.token_times[2] == gen.token_times[3]  # two tokens in one response reached the host together


# -- config and the CLI --------------------------------------------------------------------------------------------


def test_trt_is_registered_and_composes():
    from sweep.job.compose import compose

    assert BACKENDS["trt"].load() is TRTBackend
    cfg = compose(["backend=trt", "backend.free_gpu_memory_fraction=0.5"])  # trt_schema from the ConfigStore
    assert cfg.backend.name == "trt"
    assert cfg.backend.free_gpu_memory_fraction == 0.5
    assert cfg.backend.enable_block_reuse is False
    ignored = [k for k in cfg.engine if k not in TRTBackend.honoured_options]
    assert sorted(ignored) == ["attn_implementation", "compile_mode", "cuda_graph_batch_sizes", "cuda_graphs"]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="tensorrt_llm is installed here")
def test_cli_without_tensorrt_llm_fails_before_recording_anything(tmp_path):
    db = tmp_path / "mlflow.db"
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sweep",
            "backend=trt",
            f"tracker.uri=sqlite:///{db}",
            f"cache_dir={cache}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "needs tensorrt-llm 1.2.x, which is not installed" in output
    assert "pip install 'tensorrt-llm==1.2.*' --extra-index-url https://pypi.nvidia.com" in output

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiment_ids) == []

    # Nothing at all in the cache: the install check runs before the model is even generated.
    assert not cache.exists() or not any(cache.iterdir())


# -- the glue around the LLM API, with a stand-in tensorrt_llm -----------------------------------------------------


class FakeLLM:
    """Fake: records what sweep passes to tensorrt_llm._tensorrt_engine.LLM and streams made-up tokens."""

    instances: list[FakeLLM] = []
    fail_request: int | None = None  # max_tokens of a request whose stream fails after two tokens

    def __init__(self, model, **kwargs):
        self.model, self.kwargs, self.shut_down = model, kwargs, False
        self.in_flight = self.max_in_flight = 0
        self.aborted: list[int] = []
        # ModelLoader times the conversion and the build steps (tensorrt_llm/llmapi/llm_utils.py).
        steps = [("Loading model from HF", 0.25), ("Building TRT-LLM engine", 2.0)] if "build_config" in kwargs else []
        self.llm_build_stats = SimpleNamespace(build_steps_info=steps)
        FakeLLM.instances.append(self)
        # build() must capture both into build.log: Python prints, and C++ or MPI workers writing to fd 2.
        print("fake builder output on stdout")
        os.write(2, b"fake native output on fd 2\n")

    def save(self, engine_dir):
        Path(engine_dir, "config.json").write_text("{}")
        Path(engine_dir, "rank0.engine").write_bytes(b"\0")

    def shutdown(self):
        self.shut_down = True

    def generate_async(self, token_ids, sampling_params, streaming):
        assert streaming and sampling_params.kwargs["ignore_eos"]
        asyncio.get_running_loop()  # sweep must call this inside an event loop, as the streaming API expects
        return FakeStream(self, sampling_params.kwargs["max_tokens"])


class FakeStream:
    """Fake: a streamed GenerationResult (async iterator of RequestOutput-shaped responses, abort(), finished)."""

    def __init__(self, llm, n):
        self.llm, self.n, self.finished, self.ids = llm, n, False, []

    def __aiter__(self):
        self.llm.in_flight += 1
        self.llm.max_in_flight = max(self.llm.max_in_flight, self.llm.in_flight)
        return self

    async def __anext__(self):
        if len(self.ids) == self.n:
            self.finished = True
            self.llm.in_flight -= 1
            raise StopAsyncIteration
        await asyncio.sleep(0.001)
        if self.n == FakeLLM.fail_request and len(self.ids) == 2:
            self.finished = True
            raise RuntimeError("fake executor error")
        self.ids.append(len(self.ids))
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(self.ids))])

    def abort(self):
        self.llm.aborted.append(self.n)


class Recorder:
    """Fake config class: keeps its keyword arguments."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


def install_fake_tensorrt_llm(monkeypatch):
    # Fakes: every tensorrt_llm module the backend imports, with only what it touches.
    from pydantic import BaseModel

    class BuildConfig(BaseModel):
        max_batch_size: int = 2048
        max_input_len: int = 1024
        max_seq_len: int | None = None
        max_num_tokens: int = 8192
        plugin_config: object = None

    class QuantConfig(BaseModel):
        quant_algo: str | None = None
        kv_cache_quant_algo: str | None = None
        group_size: int = 128
        exclude_modules: list[str] | None = None

    class PluginConfig(BaseModel):
        gemm_plugin: str | None = None
        gpt_attention_plugin: str | None = "auto"
        context_fmha: bool = True
        paged_kv_cache: bool | None = None
        tokens_per_block: int = 32
        remove_input_padding: bool = True
        use_paged_context_fmha: bool = True
        use_fp8_context_fmha: bool = True
        reduce_fusion: bool = False
        user_buffer: bool = False
        norm_quant_fusion: bool = False

    modules = {
        "tensorrt_llm": SimpleNamespace(__version__="1.2.1"),
        "tensorrt_llm._tensorrt_engine": SimpleNamespace(LLM=FakeLLM),
        "tensorrt_llm.builder": SimpleNamespace(BuildConfig=BuildConfig),
        "tensorrt_llm.plugin": SimpleNamespace(PluginConfig=PluginConfig),
        "tensorrt_llm.llmapi": SimpleNamespace(QuantConfig=QuantConfig),
        "tensorrt_llm.llmapi.llm_args": SimpleNamespace(KvCacheConfig=Recorder),
        "tensorrt_llm.sampling_params": SimpleNamespace(SamplingParams=Recorder),
        "tensorrt_llm.logger": SimpleNamespace(logger=SimpleNamespace(set_level=lambda level: None)),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(runtime, "installed_version", lambda: "1.2.1")
    monkeypatch.setattr(runtime, "gpu_sm", lambda: "90")
    import transformers

    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda path: SimpleNamespace(eos_token_id=2, pad_token_id=None)
    )


def fake_backend(monkeypatch, tmp_path, shape=None, **engine):
    """A TRTBackend on a stand-in tensorrt_llm and a config.json-only checkpoint (Qwen2.5-7B's attention shape)."""
    from omegaconf import OmegaConf

    from sweep.model.source import ModelShape, ModelSource

    install_fake_tensorrt_llm(monkeypatch)
    FakeLLM.instances.clear()
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "num_hidden_layers": 2,
        "hidden_size": 3584,
        "vocab_size": 1000,
        "max_position_embeddings": 4096,
        **(shape or {}),
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    cfg = OmegaConf.create(
        {
            "engine": {**{f.name: f.default for f in fields(EngineConfig)}, "max_batch_size": 4, **engine},
            "backend": {f.name: f.default for f in fields(TRTBackendConfig)},
        }
    )
    model = ModelSource("fake", model_dir, {}, ModelShape.read(model_dir))
    return TRTBackend(cfg, model, device="cuda", dtype="bfloat16")


def fake_requests(n=6):
    from sweep.workload.requests import Request

    return [Request(f"r{i}", [1, 2, 3], output_len=5 + i) for i in range(n)]


def test_build_load_serve_plumbing_with_a_fake_tensorrt_llm(monkeypatch, tmp_path):
    from sweep.workload.requests import Workload

    backend = fake_backend(monkeypatch, tmp_path)
    requests = fake_requests()
    backend.check(Workload(warmup=[], measured=requests))
    assert not any("max_num_tokens" in w for w in backend.warnings)  # 4 * 2048 = 8192: nothing to clamp
    assert any("use_fp8_context_fmha" in w for w in backend.warnings)

    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    manifest = backend.build(engine_dir)
    built = FakeLLM.instances[-1]
    assert built.model == str(backend.model.path) and built.kwargs["dtype"] == "bfloat16"
    assert built.kwargs["build_config"].max_seq_len == 2048
    assert built.kwargs["build_config"].plugin_config.paged_kv_cache is True
    assert built.kwargs["kv_cache_config"].kwargs == {"free_gpu_memory_fraction": 0.9, "enable_block_reuse": False}
    assert "quant_config" not in built.kwargs and manifest["quant_config"] is None  # unquantized
    build_log = (engine_dir / "build.log").read_text()
    assert "fake builder output on stdout" in build_log and "fake native output on fd 2" in build_log
    assert manifest["trtllm_build_command"].startswith("trtllm-build --checkpoint_dir")
    assert "--max_seq_len 2048" in manifest["trtllm_build_command"]
    assert manifest["warnings"] == backend.warnings
    assert manifest["build_steps_s"] == {"Loading model from HF": 0.25, "Building TRT-LLM engine": 2.0}
    assert {"config.json", "rank0.engine", "build.log"} <= set(manifest["engine_files"])

    # A miss: the LLM that built the engine serves it; the engine is not loaded a second time.
    backend.load(engine_dir)
    assert FakeLLM.instances == [built] and not built.shut_down
    figures = backend.engine_figures()
    assert figures["build_time_s"] >= 2.25 and set(figures) == {"build_time_s", "model_load_s"}

    stream = RequestStream(requests, offsets=[0.0] * len(requests))  # all arrive at t0
    stream.start()
    backend.serve(stream, max_batch=2)
    timings = stream.results()
    assert [len(t.token_times) for t in timings] == [r.output_len for r in requests]
    assert len({t.arrival for t in timings}) == 1
    assert all(t.admitted >= t.arrival for t in timings)
    assert built.max_in_flight == 2  # no more than max_batch requests in flight

    # Arrivals over time: the runtime gets each request when it arrives, not before.
    stream = RequestStream(requests[:3], offsets=[0.0, 0.05, 0.1])
    stream.start()
    backend.serve(stream, max_batch=2)
    late = stream.results()[2]
    assert late.admitted - stream.t0 >= 0.1 and late.admitted >= late.arrival
    (single,) = backend.generate([requests[0]])
    assert single.token_ids == list(range(5))
    backend.close()
    assert built.shut_down

    # A hit: another run loads the saved engine, with the same runtime settings.
    hit = TRTBackend(backend.cfg, backend.model, device="cuda", dtype="bfloat16")
    hit.load(engine_dir)
    loaded = FakeLLM.instances[-1]
    assert loaded is not built and loaded.model == str(engine_dir)
    assert loaded.kwargs["kv_cache_config"].kwargs == built.kwargs["kv_cache_config"].kwargs
    assert set(hit.engine_figures()) == {"model_load_s"}  # the build time of a hit is 0, recorded by the run
    hit.close()


def test_a_quantized_build_passes_its_quant_config_and_fp8_needs_compute_capability_8_9(monkeypatch, tmp_path):
    from sweep.backends.trt import backend as trt_backend
    from sweep.workload.requests import Workload

    # Fake: the GPU's compute capability, beside the stand-in tensorrt_llm.
    backend = fake_backend(monkeypatch, tmp_path, quantization="int4_weight_only", kv_cache_dtype="fp8")
    monkeypatch.setattr(trt_backend, "gpu_capability", lambda device: (9, 0))
    backend.check(Workload(warmup=[], measured=fake_requests()))
    assert not any("use_fp8_context_fmha" in w for w in backend.warnings)  # an FP8 KV cache keeps FP8 context FMHA
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    manifest = backend.build(engine_dir)
    quant = FakeLLM.instances[-1].kwargs["quant_config"]
    assert (quant.quant_algo, quant.kv_cache_quant_algo) == ("W4A16", "FP8")
    assert manifest["quant_config"] == {"quant_algo": "W4A16", "kv_cache_quant_algo": "FP8"}
    backend.close()

    monkeypatch.setattr(trt_backend, "gpu_capability", lambda device: (8, 0))  # an A100
    for key, value in (("quantization", "fp8"), ("kv_cache_dtype", "fp8")):
        engine = {"quantization": "none", "kv_cache_dtype": "auto", key: value}
        ampere = TRTBackend(OmegaConf.merge(backend.cfg, {"engine": engine}), backend.model, "cuda", "bfloat16")
        with pytest.raises(ConfigError, match=rf"engine.{key}='fp8' is not allowed for backend=trt on cuda .*8\.9\+"):
            ampere.check(Workload(warmup=[], measured=fake_requests()))


def test_build_time_leaves_out_the_executor_start():
    # LLM(model=hf_dir, build_config=...) took 10 s: 2.25 s of timed build steps, the rest starting the executor.
    steps = [("Loading model from HF", 0.25), ("Building TRT-LLM engine", 2.0)]
    assert runtime.split_build_time(10.0, 0.5, steps) == {"build_time_s": 2.75, "model_load_s": 7.75}
    assert runtime.split_build_time(10.0, 0.5, []) == {"build_time_s": 10.5}  # nothing timed: all of it


def test_a_failed_request_fails_the_iteration_and_aborts_the_others(monkeypatch, tmp_path):
    backend = fake_backend(monkeypatch, tmp_path)
    backend.load(tmp_path)
    llm = FakeLLM.instances[-1]
    monkeypatch.setattr(FakeLLM, "fail_request", 7)  # the third request (output_len 7) fails after two tokens
    with pytest.raises(RuntimeError, match="fake executor error"):
        backend.serve(all_at_t0(fake_requests(4)), max_batch=4)
    assert sorted(llm.aborted) == [5, 6, 8]  # every other request still in flight was stopped
    monkeypatch.setattr(FakeLLM, "fail_request", None)
    stream = all_at_t0(fake_requests(2))
    backend.serve(stream, max_batch=2)  # the engine still serves afterwards
    assert [len(t.token_times) for t in stream.results()] == [5, 6]


def all_at_t0(requests) -> RequestStream:
    stream = RequestStream(requests, offsets=[0.0] * len(requests))
    stream.start()
    return stream


@pytest.mark.parametrize(
    "engine, message",
    [
        ({"paged_kv_cache": False}, r"engine.paged_kv_cache=False is not allowed for backend=trt; it must be true"),
        ({"gpt_attention_plugin": "disable"}, r"engine.gpt_attention_plugin='disable' is not allowed for backend=trt"),
    ],
)
def test_options_the_llm_api_cannot_serve_are_refused(monkeypatch, tmp_path, engine, message):
    from sweep.workload.requests import Workload

    backend = fake_backend(monkeypatch, tmp_path, **engine)
    with pytest.raises(ConfigError, match=message + r".*batches in flight"):
        backend.check(Workload(warmup=[], measured=fake_requests()))
    assert FakeLLM.instances == []  # refused before anything was built


def test_an_unsupported_head_size_is_refused_before_building(monkeypatch, tmp_path):
    from sweep.workload.requests import Workload

    backend = fake_backend(monkeypatch, tmp_path, shape={"hidden_size": 64, "num_attention_heads": 4})
    with pytest.raises(ConfigError, match=r"attention head size 16, which backend=trt does not support; .*32, 48, 64"):
        backend.check(Workload(warmup=[], measured=fake_requests()))
    assert list(trt.MMHA_HEAD_SIZES) == FIXTURE["mmha_supported_head_sizes"]


def test_worker_environment_is_set_for_the_worker_and_restored(monkeypatch):
    monkeypatch.delenv("TLLM_WORKER_USE_SINGLE_PROCESS", raising=False)
    monkeypatch.setenv("TLLM_LOG_LEVEL", "error")
    settings = SimpleNamespace(log_level="debug", single_process_worker=True)
    with runtime.worker_environment(settings):
        assert os.environ["TLLM_LOG_LEVEL"] == "debug" and os.environ["TLLM_WORKER_USE_SINGLE_PROCESS"] == "1"
    assert os.environ["TLLM_LOG_LEVEL"] == "error" and "TLLM_WORKER_USE_SINGLE_PROCESS" not in os.environ
    with runtime.worker_environment(SimpleNamespace(log_level="info", single_process_worker=False)):
        assert "TLLM_WORKER_USE_SINGLE_PROCESS" not in os.environ


def test_memory_estimate_does_not_reserve_kv_for_every_slot():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"engine": {"max_batch_size": 256, "max_seq_len": 4096}})
    backend = TRTBackend(cfg, model=None, device="cuda", dtype="bfloat16")
    assert backend.memory_estimate_bytes(model_bytes=15_000_000_000, kv_bytes_per_token=57_344) == (
        15_000_000_000 + 4096 * 57_344
    )


def test_a_split_engine_is_built_and_loaded_on_its_ranks(monkeypatch, tmp_path):
    from sweep.workload.requests import Workload

    # Fake: the stand-in tensorrt_llm above; the build and the load are only recorded.
    backend = fake_backend(monkeypatch, tmp_path, tp_size=4, pp_size=2)  # 28 heads, 4 KV heads
    backend.check(Workload(warmup=[], measured=fake_requests()))
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    manifest = backend.build(engine_dir)
    built = FakeLLM.instances[-1]
    assert built.kwargs["tensor_parallel_size"] == 4 and built.kwargs["pipeline_parallel_size"] == 2
    assert "--tp_size 4 --pp_size 2" in manifest["convert_checkpoint"]
    assert manifest["llm_kwargs"] == {"dtype": "bfloat16", "tensor_parallel_size": 4, "pipeline_parallel_size": 2}
    backend.close()
    hit = TRTBackend(backend.cfg, backend.model, device="cuda", dtype="bfloat16")
    hit.load(engine_dir)
    loaded = FakeLLM.instances[-1]
    assert loaded.kwargs["tensor_parallel_size"] == 4 and loaded.kwargs["pipeline_parallel_size"] == 2
    hit.close()
    # 28 heads and 4 KV heads: 8 is a multiple of the KV heads (each copied to two ranks) but does not divide 28
    (tmp_path / "8").mkdir()
    with pytest.raises(ConfigError, match=r"engine.tp_size=8 is not allowed .* allowed: 1, 2, 4, 28$"):
        fake_backend(monkeypatch, tmp_path / "8", tp_size=8).check(Workload(warmup=[], measured=fake_requests()))
