"""Workloads: seeded synthetic requests and trtllm-bench JSONL datasets."""

import json

import pytest
from omegaconf import OmegaConf

from sweep.config.errors import ConfigError
from sweep.config.schema import WorkloadConfig
from sweep.model.random_weights import build_byte_tokenizer
from sweep.workload.requests import make_workload

TOKENIZER = build_byte_tokenizer()


def wcfg(**kw):
    return OmegaConf.structured(WorkloadConfig(**kw))


def test_fixed_lengths_and_seeded_ids():
    a = make_workload(wcfg(num_requests=5, warmup_requests=2, input_len=7, output_len=3), TOKENIZER, 300)
    b = make_workload(wcfg(num_requests=5, warmup_requests=2, input_len=7, output_len=3), TOKENIZER, 300)
    assert len(a.warmup) == 2 and len(a.measured) == 5
    assert all(r.input_len == 7 and r.output_len == 3 for r in a.warmup + a.measured)
    assert a == b
    ids = {i for r in a.measured for i in r.input_ids}
    assert not ids & set(TOKENIZER.all_special_ids) and max(ids) < 300
    c = make_workload(wcfg(num_requests=5, warmup_requests=2, input_len=7, output_len=3, seed=1), TOKENIZER, 300)
    assert c.measured != a.measured


def test_normal_lengths_vary_around_the_mean_and_stay_positive():
    w = make_workload(
        wcfg(
            num_requests=400,
            warmup_requests=0,
            input_len=64,
            output_len=16,
            length_distribution="normal",
            input_len_std=8,
            output_len_std=20,
        ),
        TOKENIZER,
        300,
    )
    inputs = [r.input_len for r in w.measured]
    assert len(set(inputs)) > 10 and 60 < sum(inputs) / len(inputs) < 68
    assert min(r.output_len for r in w.measured) >= 1
    assert w.max_total_len == max(r.input_len + r.output_len for r in w.measured)


def test_dataset_in_trtllm_bench_format(tmp_path, caplog):
    path = tmp_path / "data.jsonl"
    rows = [
        {"task_id": 0, "prompt": "hello world", "output_tokens": 5},
        {"task_id": 1, "input_ids": [10, 11, 12], "output_tokens": 2},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    w = make_workload(wcfg(num_requests=3, warmup_requests=1, dataset=str(path)), TOKENIZER, 300)
    assert w.warmup[0].id == "0" and w.warmup[0].input_len == len("hello world")
    assert [r.id for r in w.measured] == ["1", "0#2", "1#2"]  # the file is cycled, each repeat under its own id
    assert w.measured[0].input_ids == [10, 11, 12] and w.measured[0].output_len == 2
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "holds 2 requests and the run takes 4 (workload.warmup_requests=1 + workload.num_requests=3)" in warning
    assert "the file is cycled" in warning


def test_a_longer_dataset_is_cut_saying_so_and_repeated_ids_are_told_apart(tmp_path, caplog):
    path = tmp_path / "data.jsonl"
    rows = [{"task_id": i % 2, "input_ids": [10 + i], "output_tokens": 2} for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    w = make_workload(wcfg(num_requests=3, warmup_requests=0, dataset=str(path)), TOKENIZER, 300)
    assert [(r.id, r.input_ids) for r in w.measured] == [("0", [10]), ("1", [11]), ("0#2", [12])]
    assert "holds 5 requests and the run takes 3" in caplog.text and "the first 3 are used" in caplog.text


def test_a_short_dataset_cycled_through_a_batched_engine_records_every_request_once(tmp_path, tiny_checkpoint):
    from conftest import cpu_config

    from sweep import run

    path = tmp_path / "data.jsonl"
    path.write_text(
        "".join(json.dumps({"task_id": i, "input_ids": [20 + i] * 4, "output_tokens": 3}) + "\n" for i in range(8))
    )
    cfg = cpu_config(
        tiny_checkpoint, tmp_path / "engines", f"workload.dataset={path}", "workload=throughput",
        "engine.max_batch_size=4", "workload.num_requests=16", "workload.warmup_requests=0", "workload.iterations=1",
    )  # fmt: skip
    result = run(cfg)
    assert len(result.timings) == 16 and len({t.request_id for t in result.timings}) == 16
    assert all(len(t.token_times) == 3 for t in result.timings)


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json\n", "line 1: not JSON"),
        ('{"task_id": 1, "prompt": "x"}\n', "line 1: each line needs output_tokens"),
        ('{"task_id": 1, "prompt": "x", "output_tokens": 0}\n', "output_tokens >= 1"),
        ("\n", "holds no requests"),
    ],
)
def test_bad_dataset_lines_are_named(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        make_workload(wcfg(dataset=str(path)), TOKENIZER, 300)


@pytest.mark.parametrize("rate, warned", [(0.001, True), (4, False)])
def test_a_long_arrival_schedule_is_warned_of_with_its_length(tmp_path, tiny_checkpoint, caplog, rate, warned):
    from conftest import cpu_config

    from sweep.job.plan import make_plan

    cfg = cpu_config(
        tiny_checkpoint, tmp_path / "engines", "workload=rate", f"workload.request_rate={rate}",
        "workload.num_requests=4", "workload.iterations=1", "workload.warmup_requests=0",
    )  # fmt: skip
    make_plan(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "request_rate" in r.getMessage()]
    if warned:
        (warning,) = warnings
        assert warning.startswith("workload.request_rate=0.001 spreads the arrivals over ~50 minutes")
        assert "raise workload.request_rate or lower workload.num_requests" in warning
    else:
        assert warnings == []
