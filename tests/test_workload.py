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


def test_dataset_in_trtllm_bench_format(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [
        {"task_id": 0, "prompt": "hello world", "output_tokens": 5},
        {"task_id": 1, "input_ids": [10, 11, 12], "output_tokens": 2},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    w = make_workload(wcfg(num_requests=3, warmup_requests=1, dataset=str(path)), TOKENIZER, 300)
    assert w.warmup[0].id == "0" and w.warmup[0].input_len == len("hello world")
    assert [r.id for r in w.measured] == ["1", "0", "1"]  # the file is cycled to fill the requests
    assert w.measured[0].input_ids == [10, 11, 12] and w.measured[0].output_len == 2


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
