"""Bad input through the real CLI: a clear message naming key, value and what is allowed; a non-zero exit;
no MLflow run and no engine left behind."""

import pytest
from conftest import mlflow_runs, run_sweep

CASES = [
    (["engine.max_batch_size=0"], "engine.max_batch_size=0 is not allowed; it must be >= 1"),
    (["engine.max_batch_size=abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
    (["engine.no_such_option=1"], "Key 'no_such_option' not in 'EngineConfig'"),
    (["model=no-such-model"], "Could not find 'model/no-such-model'"),
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
