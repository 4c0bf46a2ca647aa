"""Figure arithmetic on synthetic timestamps, against values worked out by hand."""

import numpy as np
import pytest

from sweep.measure.metrics import (
    benchmark_figures,
    decode_step_bytes,
    iteration_throughput,
    roofline_figures,
    summarize,
)
from sweep.workload.timing import RequestTiming


def timing(rid, arrival, times, input_len=10, iteration=0, output_len=None):
    return RequestTiming(rid, input_len, output_len or len(times), arrival, times, iteration)


def test_request_figures_follow_the_definitions():
    t = timing("a", 1.0, [1.5, 1.6, 1.8, 2.1])
    assert t.ttft == pytest.approx(0.5)
    assert t.e2e == pytest.approx(1.1)
    assert t.tpot == pytest.approx((1.1 - 0.5) / 3)
    assert t.itls == pytest.approx([0.1, 0.2, 0.3])


def test_itl_is_per_chunk_when_a_response_carries_several_tokens():
    # Tokens that reached the host in one streamed response share its timestamp: chunks of 1, 3, 1 and 2 tokens.
    t = timing("a", 0.0, [0.5, 0.6, 0.6, 0.6, 0.9, 1.0, 1.0])
    assert t.chunk_sizes == [1, 3, 1, 2]
    assert t.itls == pytest.approx([0.1, 0.3, 0.1])  # one gap per chunk, as vLLM and AIPerf count it; no zeros
    assert t.tpot == pytest.approx(0.5 / 6)  # TPOT still counts tokens
    figures = benchmark_figures([t, timing("b", 0.0, [0.2, 0.4])])
    assert figures["itl_ms_n"] == 4 and figures["itl_ms_min"] == pytest.approx(100.0)
    assert figures["tokens_per_chunk_n"] == 6 and figures["tokens_per_chunk_max"] == 3
    assert figures["tokens_per_chunk_mean"] == pytest.approx(9 / 6)


def test_tpot_is_undefined_for_one_output_token():
    figures = benchmark_figures([timing("a", 0.0, [0.2]), timing("b", 0.0, [0.4])])
    assert figures["tpot_ms_n"] == 0 and "tpot_ms_p50" not in figures
    assert figures["itl_ms_n"] == 0
    assert figures["ttft_ms_p50"] == pytest.approx(300.0)


def test_summary_uses_linear_percentiles_and_population_stdev():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    s = summarize(values)
    assert s["p50"] == 3.0
    assert s["p90"] == pytest.approx(np.percentile(values, 90))  # 7.6 by linear interpolation
    assert s["p90"] == pytest.approx(7.6)
    assert s["p99"] == pytest.approx(9.76)
    assert s["mean"] == 4.0 and s["min"] == 1.0 and s["max"] == 10.0 and s["n"] == 5
    assert s["stdev"] == pytest.approx(np.sqrt(np.mean((np.array(values) - 4.0) ** 2)))
    assert summarize([]) == {"n": 0}


def test_throughput_is_tokens_over_first_arrival_to_last_token():
    # Two requests arrive at t0 = 10 s; the last token lands at 12 s: 2 s for 3 + 2 output tokens.
    its = [timing("a", 10.0, [10.5, 11.0, 11.5], input_len=4), timing("b", 10.0, [11.5, 12.0], input_len=6)]
    thr = iteration_throughput(its)
    assert thr["duration_s"] == pytest.approx(2.0)
    assert thr["output_throughput_tok_s"] == pytest.approx(2.5)
    assert thr["total_token_throughput_tok_s"] == pytest.approx((10 + 5) / 2)
    assert thr["request_throughput_req_s"] == pytest.approx(1.0)


def test_run_throughput_is_the_median_over_iterations_with_min_and_max():
    its = [timing(f"r{i}", 0.0, [d / 2, d], iteration=i) for i, d in enumerate([1.0, 2.0, 4.0])]
    figures = benchmark_figures(its)  # 2 tokens in 1 s, 2 s and 4 s
    assert figures["output_throughput_tok_s"] == pytest.approx(1.0)
    assert figures["output_throughput_tok_s_min"] == pytest.approx(0.5)
    assert figures["output_throughput_tok_s_max"] == pytest.approx(2.0)
    assert figures["iterations"] == 3


def test_wrong_output_count_fails_the_run():
    with pytest.raises(RuntimeError, match="wrong number of output tokens.*3 produced, 4 asked for"):
        benchmark_figures([timing("a", 0.0, [0.1, 0.2, 0.3], output_len=4)])


def test_roofline_floor_reads_weights_once_plus_each_sequence_kv():
    # 1 GB of weights (tied embeddings: nothing left out) + 8 sequences x 100 tokens x 1 kB of KV, at 1 TB/s.
    sizes = {"model_bytes": 10**9, "kv_bytes_per_token": 1000, "input_embedding_bytes": 0}
    r = roofline_figures(sizes, vocab_size=1000, batch_size=8, mean_context=100, bandwidth=1e12, tpot_s=2.0016e-3)
    assert r["decode_floor_ms"] == pytest.approx(1.0008)
    assert r["roofline_efficiency"] == pytest.approx(0.5) == r["roofline_efficiency_all_weights"]
    assert r["roofline_floor_tok_s"] == pytest.approx(8 / 1.0008e-3)


def test_decode_floor_of_qwen2_5_7b_leaves_out_the_input_embedding_table():
    # Qwen2.5-7B in fp16: 7,615,616,512 parameters, untied 152064 x 3584 input table, GQA with 4 KV heads of 128.
    table = 152064 * 3584 * 2
    sizes = {
        "model_bytes": 7_615_616_512 * 2,
        "kv_bytes_per_token": 2 * 28 * 4 * 128 * 2,
        "input_embedding_bytes": table,
    }
    assert table == 1_089_994_752  # 1.09 GB: the embedding table alone
    read, all_weights = decode_step_bytes(sizes, vocab_size=152064, batch_size=8, mean_context=1088)
    kv = 8 * 1088 * 57_344
    assert read == pytest.approx(15_231_233_024 - table + 8 * 3584 * 2 + kv)
    assert all_weights == pytest.approx(15_231_233_024 + kv)
    r = roofline_figures(sizes, 152064, 8, 1088, bandwidth=4.2e12, tpot_s=5e-3)
    assert r["roofline_efficiency_all_weights"] / r["roofline_efficiency"] == pytest.approx(all_weights / read)
    assert 1.06 < all_weights / read < 1.08  # counting the whole table flatters efficiency by 6-8%


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("bfloat16", 2)])
def test_decode_floor_on_real_checkpoints_tied_and_untied(tiny_checkpoint, tmp_path, dtype, itemsize):
    import json

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sweep.model.source import ModelShape, ModelSource, model_sizes

    config = json.loads((tiny_checkpoint / "config.json").read_text())
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    untied = model_sizes(ModelSource("tiny", tiny_checkpoint, {}, ModelShape.read(tiny_checkpoint)), dtype)
    assert untied["input_embedding_bytes"] == vocab * hidden * itemsize
    read, all_weights = decode_step_bytes(untied, vocab, batch_size=2, mean_context=10)
    kv = 2 * 10 * untied["kv_bytes_per_token"]  # GQA: 1 KV head of 64 per layer
    assert untied["kv_bytes_per_token"] == 2 * 2 * 1 * 64 * itemsize
    assert read == untied["model_bytes"] - vocab * hidden * itemsize + 2 * hidden * itemsize + kv
    assert all_weights == untied["model_bytes"] + kv

    # The same shape with tied embeddings: the table is stored once and read whole by the LM head.
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    tied_cfg = Qwen2Config(**{k: config[k] for k in keep}, num_key_value_heads=1, tie_word_embeddings=True)
    Qwen2ForCausalLM(tied_cfg).save_pretrained(tmp_path, safe_serialization=True)
    tied = model_sizes(ModelSource("tied", tmp_path, {}, ModelShape.read(tmp_path)), dtype)
    assert tied["model_bytes"] == untied["model_bytes"] - vocab * hidden * itemsize  # no separate LM head
    assert tied["input_embedding_bytes"] == 0
    read, all_weights = decode_step_bytes(tied, vocab, batch_size=2, mean_context=10)
    assert read == all_weights == tied["model_bytes"] + kv
