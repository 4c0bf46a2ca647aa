"""Where an hf decode step's time goes at batch 1 and batch 8, on the CPU: is any per-step host work ours?

On an H200 (Llama-3.1-8B shape, ISL 1024) hf took 23 ms per step at batch 1 and 81 ms at batch 8 with the GPU
13% busy: host-bound. Host work per step depends on the number of layers and on the Python around them, not on the
width, so a Llama-3.1-shaped model with all 32 layers but a narrow width (and the real vocabulary) reproduces the
8B's per-step host work on a CPU with little arithmetic. For each batch size this times a decode step in three
variants, after a first pass over the same lengths (reported apart: the first time a key length is seen costs more
on a GPU): as `hf` serves (TokenClock streamer, attention mask), with a streamer that only takes timestamps (what
TokenClock's .tolist() costs), and without the attention mask (the prompts have one length, so nothing is padded);
then it profiles the served variant: torch ops per step, the top entries by self CPU time (torch.profiler) and the
top Python functions (cProfile); on a GPU also the kernels' time per step (how busy the GPU was) and the top entries
by device time.

    python benchmarks/hf_step_profile.py [--model llama32|tiny] [--isl 1024] [--osl 24] [--threads 1]
    python benchmarks/hf_step_profile.py --device cuda --dtype bfloat16 --model <checkpoint>

A step's time is the median gap between the streamer's timestamps (prefill excluded), the fastest of --reps runs;
torch runs on --threads threads so that other processes on a shared host disturb it less.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from sweep.backends.hf.backend import TokenClock, load_hf_model
from sweep.model.source import build_byte_tokenizer, generate_tiny_checkpoint

# Llama-3.1-8B's architecture (vocab, layers, GQA ratio, rope) at a width a CPU runs quickly.
LLAMA32 = dict(
    vocab_size=128256,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=32,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    bos_token_id=128000,
    eos_token_id=[128001, 128008, 128009],
    tie_word_embeddings=False,
)


def checkpoint(name: str, root: Path) -> Path:
    if name == "tiny":
        return generate_tiny_checkpoint(root, seed=0)
    if name != "llama32":  # any checkpoint directory, e.g. the full-width Llama-3.1-8B shape on a GPU
        return Path(name)
    path = root / "llama32"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA32)).save_pretrained(path)
    build_byte_tokenizer().save_pretrained(path)  # load_hf_model loads one; the prompts are random ids
    return path


class StepClock:
    """A streamer that only timestamps each step: beside TokenClock, it shows what TokenClock's .tolist() costs."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate(model, ids, new_tokens: int, clock, mask: bool) -> list[float]:
    """The call HFBackend.generate makes (left padding is a no-op for equal lengths), with parts switchable; returns
    each decode step's host time (the streamer's first put() is the prompt, its second the prefill's token)."""
    model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids) if mask else None,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        streamer=clock,
    )
    times = [t for t, _ in clock.steps] if isinstance(clock, TokenClock) else clock.times[1:]
    return [b - a for a, b in zip(times, times[1:])]


def step_ms(model, ids, osl: int, reps: int, clock: type, mask: bool) -> float:
    """Median decode step of the fastest of `reps` runs."""
    return min(statistics.median(generate(model, ids, osl, clock(), mask)) for _ in range(reps)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama32", help="llama32, tiny, or a checkpoint directory")
    parser.add_argument("--isl", type=int, default=1024)
    parser.add_argument("--osl", type=int, default=24)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        model, _ = load_hf_model(checkpoint(args.model, Path(root)), args.dtype, "sdpa", args.device)
    batches = [int(b) for b in args.batches.split(",")]
    variants = {
        "as served": dict(clock=TokenClock, mask=True),
        "timestamps only": dict(clock=StepClock, mask=True),
        "no attention mask": dict(clock=TokenClock, mask=False),
    }
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randint(3, 250, (b, args.isl), generator=gen).to(args.device) for b in batches}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    rows, profiles = [], {}
    with torch.inference_mode():
        for b in batches:
            generate(model, inputs[b], 2, TokenClock(), mask=True)  # warm-up: the prompt's shapes
            # The first pass over key lengths not seen before, as served: on an H200 its steps cost ~35 ms more
            # than the same steps again, at batch 1 and 8 alike (a per-shape cost in the attention call).
            first_pass = step_ms(model, inputs[b], args.osl, 1, TokenClock, mask=True)
            warm = [step_ms(model, inputs[b], args.osl, args.reps, **v) for v in variants.values()]
            rows.append([b, first_pass, *warm])
            with profile(activities=activities) as prof:
                generate(model, inputs[b], args.osl, TokenClock(), mask=True)
            python = cProfile.Profile()
            python.runcall(generate, model, inputs[b], args.osl, TokenClock(), mask=True)
            profiles[b] = (prof, python)

    setup = f"{args.model}, ISL {args.isl}, OSL {args.osl}, {args.dtype}, sdpa, {args.device}, {args.threads} thread(s)"
    print(f"\n{setup}\n")
    print("| batch | first pass, new key lengths (ms/step) | " + " | ".join(f"{v} (ms/step)" for v in variants) + " |")
    print("| --- | --- |" + " --- |" * len(variants))
    for row in rows:
        print(f"| {row[0]} | " + " | ".join(f"{x:.2f}" for x in row[1:]) + " |")
    for b, (prof, python) in profiles.items():
        events = prof.key_averages()
        calls = sum(e.count for e in events if e.key.startswith("aten::"))
        print(f"\n## batch {b}: {calls / args.osl:.0f} aten calls per generated token; top 8 by self CPU time\n")
        print(events.table(sort_by="self_cpu_time_total", row_limit=8))
        if args.device == "cuda":
            kernel_ms = sum(e.self_device_time_total for e in events) / 1e3 / args.osl
            step = rows[batches.index(b)][2]
            per_token = f"{kernel_ms:.2f} ms per generated token; a decode step {step:.2f} ms"
            print(f"## batch {b}: kernels of the whole generate (its prefill included) {per_token}\n")
            print(events.table(sort_by="self_device_time_total", row_limit=8))
        text = io.StringIO()
        pstats.Stats(python, stream=text).sort_stats("tottime").print_stats(10)
        print(f"## batch {b}: top Python functions by own time (cProfile)\n")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip()[:1].isdigit()))


if __name__ == "__main__":
    main()
