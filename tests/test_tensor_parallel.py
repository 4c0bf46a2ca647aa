"""engine.tp_size / engine.pp_size: backend=hf split over two gloo ranks on the CPU (real transformers tensor
parallelism, real spawned processes), every refusal through the real CLI (exit 2, one line, nothing recorded), the
vLLM mapping, the per-GPU and roofline figures, and the sweeper's GPUs per trial.

The tiny model has 2 attention heads and 1 KV head, which transformers' tensor parallelism cannot split in two (it
shards each projection, so tp_size must divide the KV heads): the hf path is run on a checkpoint of the tiny shape
with 2 KV heads, written here. No GPU exists here: the one test that needs one fakes CUDA and says so.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
from pathlib import Path

import pytest
from conftest import REPO, cpu_config, make_requests, mlflow_runs, run_sweep

needs_accelerate = pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None,
    reason="accelerate (a dependency in pyproject.toml, which transformers' tensor parallelism needs) is not installed",
)


@pytest.fixture(scope="module")
def two_kv_heads_checkpoint(tmp_path_factory) -> Path:
    """The tiny shape with 2 KV heads (2 attention heads): splittable over two tensor-parallel ranks."""
    import torch
    import transformers

    from sweep.model.random_weights import build_byte_tokenizer
    from sweep.model.shapes import SHAPES

    path = tmp_path_factory.mktemp("two-kv-heads")
    tokenizer = build_byte_tokenizer()
    config = transformers.AutoConfig.for_model(
        "qwen2",
        **{**SHAPES["tiny"].config, "num_key_value_heads": 2},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def serve_once(checkpoint: Path, cache_dir: Path, tp_size: int):
    """Greedy tokens of a left-padded batch of two and teacher-forced scores, from an hf engine at `tp_size`."""
    from sweep.job.plan import make_plan, start_engine

    plan = make_plan(cpu_config(checkpoint, cache_dir, "backend=hf", f"engine.tp_size={tp_size}"))
    start_engine(plan)
    try:
        requests = make_requests([5, 9], output_len=6)
        tokens = [g.token_ids for g in plan.backend.generate(requests)]
        scores = plan.backend.score([r.input_ids for r in requests], [2, 2])
        return plan, tokens, scores
    finally:
        plan.backend.close()


@needs_accelerate
def test_hf_split_over_two_gloo_ranks_generates_the_unsplit_models_tokens(two_kv_heads_checkpoint, tmp_path):
    import torch
    import torch.distributed as dist

    one, tokens_1, scores_1 = serve_once(two_kv_heads_checkpoint, tmp_path, tp_size=1)
    two, tokens_2, scores_2 = serve_once(two_kv_heads_checkpoint, tmp_path, tp_size=2)
    assert tokens_2 == tokens_1 and all(len(t) == 6 for t in tokens_2)
    for a, b in zip(scores_1, scores_2):
        torch.testing.assert_close(b.logprobs, a.logprobs, atol=1e-4, rtol=1e-4)
    # tp_size enters the engine's key only when set, and the split engine is an entry of its own
    assert "tp_size" not in one.key_inputs["options"] and two.key_inputs["options"]["tp_size"] == 2
    assert "pp_size" in two.backend.ignored_options() and "tp_size" not in two.backend.ignored_options()
    # closed: the other rank's process has ended and this process has left the group
    assert not dist.is_initialized()
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]


REFUSED = [
    (
        ["engine.tp_size=2"],  # the tiny model: 2 heads, 1 KV head
        "engine.tp_size=2 is not allowed for model 'tiny' on backend=hf: its 2 attention heads and 1 KV heads are "
        "split over the tensor-parallel ranks, so tp_size must divide both; allowed: 1",
    ),
    (
        ["engine.pp_size=2"],
        "engine.pp_size=2 is not allowed for backend=hf on cpu: transformers' pipeline parallelism (5.19) generates "
        "different greedy tokens",
    ),
    (
        ["backend=compiled", "engine.tp_size=2"],
        "engine.tp_size=2 is not allowed for backend=compiled on cpu: the engine is built for one device",
    ),
    (
        ["backend=compiled", "engine.pp_size=2"],
        "engine.pp_size=2 is not allowed for backend=compiled on cpu: the engine is built for one device",
    ),
    (
        ["backend=hf_paged", "engine.tp_size=2"],
        "engine.tp_size=2 is not allowed for backend=hf_paged on cpu: its continuous-batching manager",
    ),
    (["engine.tp_size=0"], "engine.tp_size=0 is not allowed; it must be >= 1"),
]


def assert_refused(tmp_path: Path, result, message: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert len([line for line in output.splitlines() if message in line]) == 1, output[-3000:]
    assert "Traceback" not in output
    assert mlflow_runs(tmp_path) == []
    assert [p for p in (tmp_path / "engines_cache").glob("*/*") if p.parent.name != "checkpoints"] == []


@pytest.mark.parametrize("overrides, message", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_a_split_the_backend_or_model_cannot_take_is_refused_before_anything_is_built(tmp_path, overrides, message):
    assert_refused(tmp_path, run_sweep(tmp_path, "device=cpu", *overrides), message)


def test_more_gpus_than_visible_is_refused_before_the_model_is_touched(tmp_path):
    # Fake: CUDA with one visible GPU (torch.cuda.is_available / device_count, patched by a sitecustomize on the
    # subprocess's path), since no GPU can exist here. Nothing past the count is reached: the refusal comes first.
    fake = tmp_path / "fake_cuda"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(
        "import torch\ntorch.cuda.is_available = lambda: True\ntorch.cuda.device_count = lambda: 1\n"
    )
    result = run_sweep(
        tmp_path, "device=cuda", "engine.tp_size=2", "engine.pp_size=2", env={"PYTHONPATH": f"{REPO}:{fake}"}
    )
    assert_refused(
        tmp_path,
        result,
        "engine.tp_size=2 x engine.pp_size=2 needs 4 GPUs, and 1 is visible to this run; allowed: "
        "tp_size x pp_size <= 1",
    )
    assert not (tmp_path / "engines_cache" / "checkpoints").exists()  # the model was not written on the fake GPU


def test_vllm_gets_its_parallel_sizes_and_sizes_each_workers_kv_cache(tiny_checkpoint, tmp_path):
    from sweep.backends.vllm.options import engine_kwargs, kv_bytes_per_token
    from sweep.model.source import ModelShape

    cfg = cpu_config(tiny_checkpoint, tmp_path, "backend=vllm", "engine.tp_size=2", "engine.pp_size=2")
    kwargs = engine_kwargs(cfg, "/m", "cpu", "float32", bytes_per_token=1024)
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["pipeline_parallel_size"] == 2
    shape = ModelShape.read(tiny_checkpoint)  # 2 layers, 1 KV head of 64
    assert kv_bytes_per_token(shape, 4) == 2 * 2 * 1 * 64 * 4
    # each worker holds one layer; the one KV head is copied to both tensor-parallel ranks
    assert kv_bytes_per_token(shape, 4, tp_size=2, pp_size=2) == 2 * 1 * 1 * 64 * 4


def test_per_gpu_throughput_and_the_tensor_parallel_roofline():
    from sweep.measure.metrics import per_gpu_figures, roofline_figures

    assert per_gpu_figures({"output_throughput_tok_s": 300.0}, gpus=4) == {"output_throughput_tok_s_per_gpu": 75.0}
    sizes = {"model_bytes": 1e9, "input_embedding_bytes": 0.0, "kv_bytes_per_token": 0.0}
    one = roofline_figures(sizes, 1000, 1, 10.0, bandwidth=1e12, tpot_s=2e-3)
    two = roofline_figures(sizes, 1000, 1, 10.0, bandwidth=1e12, tpot_s=2e-3, tp_size=2)
    assert one["decode_floor_ms"] == pytest.approx(1.0) and two["decode_floor_ms"] == pytest.approx(0.5)
    assert two["roofline_efficiency"] == pytest.approx(one["roofline_efficiency"] / 2)


def sweeper_case(launcher: str, gpus_per_trial: int, *overrides: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from hydra_plugins.sweep_optuna_sweeper._space import split_overrides
    from hydra_plugins.sweep_optuna_sweeper.config import OptunaSweeperConf

    config = OmegaConf.create({"engine": {"tp_size": 1, "pp_size": 1}, "hydra": {"launcher": {"_target_": launcher}}})
    space, fixed = split_overrides(OverridesParser.create().parse_overrides(list(overrides)))
    return OptunaSweeperConf(gpus_per_trial=gpus_per_trial), config, space, fixed


LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def test_each_trial_gets_the_gpus_of_the_searchs_largest_engine():
    from hydra_plugins.sweep_optuna_sweeper._prepare import trial_gpus
    from sweep.multirun.sweeper_api import ConfigError

    swept = ("engine.tp_size=choice(1,2,4)", "engine.pp_size=2")
    assert trial_gpus(*sweeper_case(LOCAL, 1, *swept)) == 8  # the default follows the largest engine
    assert trial_gpus(*sweeper_case(LOCAL, 1, "engine.tp_size=range(1,3)")) == 2
    assert trial_gpus(*sweeper_case(LOCAL, 8, *swept)) == 8
    assert trial_gpus(*sweeper_case(LOCAL, 1, "engine.max_batch_size=choice(1,2)")) == 1
    with pytest.raises(ConfigError, match=r"hydra.sweeper.gpus_per_trial=4 is not allowed: .* = 8 GPUs, .* >= 8$"):
        trial_gpus(*sweeper_case(LOCAL, 4, *swept))
    with pytest.raises(ConfigError, match="the launcher asks its scheduler for that many"):
        trial_gpus(*sweeper_case(SLURM, 1, "engine.tp_size=2", "engine.max_batch_size=choice(1,2)"))
