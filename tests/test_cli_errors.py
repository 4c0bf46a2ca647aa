"""Bad input through the real CLI: a clear message naming key, value and what is allowed; a non-zero exit;
no MLflow run and no engine left behind."""

import logging
import signal
import sys

import pytest
from conftest import mlflow_runs, run_sweep

CASES = [
    (["engine.max_batch_size=0"], "engine.max_batch_size=0 is not allowed; it must be >= 1"),
    (["engine.max_batch_size=abc"], "engine.max_batch_size='abc' is not allowed; it must be an integer"),
    (["engine.no_such_option=1"], "engine.no_such_option is not a key of the config"),
    (["engine.max_batch=4"], "engine.max_batch is not a key of the config: did you mean engine.max_batch_size?"),
    (["model=no-such-model"], "model='no-such-model' is not allowed; choose one of: llama-3.1-8b, qwen2.5-0.5b"),
    (["engine.dtype=float8"], "engine.dtype='float8' is not allowed; choose one of: auto, float32, float16, bfloat16"),
    (["workload.scenario=offline"], "workload.scenario='offline' is not allowed; choose one of: latency, throughput"),
    (["model.path=/does/not/exist"], "model.path='/does/not/exist' is not a Hugging Face checkpoint directory"),
    (["workload.dataset=/does/not/exist.jsonl"], "workload.dataset='/does/not/exist.jsonl' cannot be read"),
    (["engine.max_input_len=16"], "engine.max_input_len=16 cannot hold the workload's longest input (32 tokens)"),
    (["engine.max_seq_len=48"], "engine.max_seq_len=48 cannot hold the workload's longest input + output (64 tokens)"),
    (["engine.max_seq_len=8192"], "engine.max_seq_len=8192 is longer than the model supports"),
    (
        ["workload=throughput", "workload.batch_size=4"],
        "workload.batch_size=4 is not allowed; it must be <= engine.max_batch_size=1",
    ),
    (["objective.metric=speed"], "objective.metric='speed' is not allowed; choose a figure sweep records"),
    (
        ["engine.quantization=int3"],
        "engine.quantization='int3' is not allowed; choose one of: none, int8_weight_only, int4_weight_only, fp8",
    ),
    (
        ["engine.quantization=fp8"],
        "engine.quantization='fp8' is not allowed for backend=hf on cpu (float32): fp8 needs a CUDA GPU of compute "
        "capability 8.9+ (fp8 tensor cores), and this run is on the CPU; allowed here: none, int8_weight_only",
    ),
    (
        ["engine.attn_implementation=flex_attention"],
        "engine.attn_implementation='flex_attention' needs a GPU for backend=hf: transformers compiles FlexAttention",
    ),
    (["quality.prompts=0"], "quality.prompts=0 is not allowed; it must be >= 1"),
    (
        ["model.hub_id=Qwen/Qwen2.5-0.5B-Instruct"],
        "the hub cannot be reached and Qwen/Qwen2.5-0.5B-Instruct@None is not in the local",
    ),
]


@pytest.mark.parametrize("overrides, message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_refused_before_anything_is_built_or_recorded(tmp_path, overrides, message):
    result = run_sweep(tmp_path, *overrides)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert message in output
    assert "Traceback" not in output
    assert mlflow_runs(tmp_path) == []
    engines = [p for p in (tmp_path / "engines_cache").glob("*/*") if p.parent.name != "checkpoints"]
    assert engines == []


def test_an_unreachable_hub_fails_at_once_with_one_line(tmp_path):
    # Offline mode not set, and the hub's address refuses connections: what a machine without network sees
    # (HF_ENDPOINT points at a closed local port, so no request leaves this machine).
    result = run_sweep(tmp_path, "model=qwen2.5-7b", env={"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"})
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    errors = [line for line in output.splitlines() if "ERROR" in line or "WARNING" in line]
    assert len(errors) == 1 and "the hub cannot be reached" in errors[0], output
    assert "Retrying" not in output and "Traceback" not in output
    assert mlflow_runs(tmp_path) == []


def test_help_lists_the_real_choices_and_explains_sweeps(tmp_path):
    result = run_sweep(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "backend:   compiled, hf, hf_paged, trt, vllm" in text and "_schema" not in text
    assert "model.dtype" in text and "engine.dtype" in text
    assert "hydra/sweeper=optuna" in text and "search=throughput" in text and "hydra.sweeper.*" in text
    assert "output_throughput_tok_s" in text


# What Hydra refuses while it composes the config (a value of the wrong type, a group option that does not exist,
# sweep syntax it cannot parse, a key the schema lacks): one line on stderr, exit 2, before anything is written.
HYDRA_CASES = [
    (["engine.max_batch_size=abc"], "engine.max_batch_size='abc' is not allowed; it must be an integer"),
    (["engine.max_batch_size=1.5"], "engine.max_batch_size=1.5 is not allowed; it must be an integer"),
    (
        ["engine.max_batch_size=null"],
        "engine.max_batch_size=null is not allowed; it must be an integer (this key cannot be null)",
    ),
    (["workload.concurrency=2.5"], "workload.concurrency=2.5 is not allowed; it must be an integer"),
    (["slo.ttft_ms=abc"], "slo.ttft_ms='abc' is not allowed; it must be a number"),
    (["engine.cuda_graphs=maybe"], "engine.cuda_graphs='maybe' is not allowed; it must be true or false"),
    (
        ["model=nonexistent"],
        "model='nonexistent' is not allowed; choose one of: llama-3.1-8b, qwen2.5-0.5b, qwen2.5-7b, tiny",
    ),
    (
        ["workload=nonexistent"],
        "workload='nonexistent' is not allowed; choose one of: concurrency, latency, rate, throughput",
    ),
    (["slo=fast"], "slo='fast' is not allowed; choose one of: batch, interactive, none"),
    (
        ["workload=thruput"],
        "workload='thruput' is not allowed; choose one of: concurrency, latency, rate, throughput; "
        "did you mean throughput?",
    ),
    (["backend=hf_pagd"], "backend='hf_pagd' is not allowed; choose one of: compiled, hf, hf_paged, trt, vllm; did"),
    (
        ["-m", "engine.max_batch_size=choice(1,2"],
        "engine.max_batch_size='choice(1,2' cannot be parsed; write one value, or a sweep: a,b,c, choice(a,b,c)",
    ),
    (["-m", "engine.max_batch_size=1,,2"], "engine.max_batch_size='1,,2' cannot be parsed; write one value"),
    # a sweep's values are composed before the first job runs: Hydra would compose the bad one only in its turn
    (["-m", "engine.max_batch_size=1,abc"], "engine.max_batch_size='abc' is not allowed; it must be an integer"),
    (["-m", "model=tiny,nonexistent"], "model='nonexistent' is not allowed; choose one of: llama-3.1-8b"),
    (["-m", "engine.max_batch_size=choice(2,1.5)"], "engine.max_batch_size=1.5 is not allowed; it must be an integer"),
    (["+engine.foo=1"], "engine.foo is not a key of the config"),
    (
        ["++workload.num_request=2"],
        "workload.num_request is not a key of the config: did you mean workload.num_requests?",
    ),
]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`sweep ARGS` in this process (the refusals come before any run), with the signal handler and log record
    factory it installs put back after."""
    from sweep.__main__ import cli

    monkeypatch.setattr(sys, "argv", ["sweep", *args])
    handler, factory = signal.getsignal(signal.SIGTERM), logging.getLogRecordFactory()
    try:
        with pytest.raises(SystemExit) as exited:
            cli()
    finally:
        signal.signal(signal.SIGTERM, handler)
        logging.setLogRecordFactory(factory)
    captured = capsys.readouterr()
    return exited.value.code, captured.out + captured.err


@pytest.mark.parametrize("args, message", HYDRA_CASES, ids=[" ".join(c[0]) for c in HYDRA_CASES])
def test_what_hydra_refuses_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    code, output = run_cli(monkeypatch, capsys, *args, "tracker=none")
    assert code == 2, output
    (line,) = output.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert list(tmp_path.iterdir()) == []  # no output directory, no store


def test_a_free_top_level_key_and_any_tag_may_be_added():
    from sweep.job.command_line import unknown_key

    assert unknown_key(["+note=first try", "+tracker.tags.owner=me", "++engine.max_batch_size=2"]) is None
    assert unknown_key(["+engine.foo=1"]).startswith("engine.foo is not a key of the config")
