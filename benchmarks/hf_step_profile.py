"""Where an hf decode step's time goes at batch 1 and batch 8, on the CPU: is any per-step host work ours?

On an H200 (Llama-3.1-8B shape, ISL 1024) hf took 23 ms per step at batch 1 and 81 ms at batch 8 with the GPU
13% busy: host-bound. Host work per step depends on the number of layers and on the Python around them, not on the
width, so the shape llama-3.1-8b-narrow (all 32 layers and the real vocabulary at a narrow width, random weights;
conf/experiment/hf_step_profile.yaml) reproduces the 8B's per-step host work on a CPU with little arithmetic. For each
batch size this times a decode step three ways, after a first pass over the same lengths (reported apart: the first
time a key length is seen costs more on a GPU):
- as served: the hf engine's own generate (sweep.open_engine), its streamer reading every token back to the host;
- the same transformers generate call on the same checkpoint, with a streamer that only takes timestamps (the
  difference is what reading the tokens back costs, and any other work of the engine's around the call);
- as that, without the attention mask (the prompts have one length, so nothing is padded).
Then it profiles the served generate: torch ops per step, the top entries by self CPU time (torch.profiler) and the
top Python functions (cProfile); on a GPU also the kernels' time per step (how busy the GPU was) and the top
entries by device time.

    python benchmarks/hf_step_profile.py [--shape llama-3.1-8b-narrow|tiny] [--isl 1024] [--osl 24] [--threads 1]
    python benchmarks/hf_step_profile.py --device cuda --dtype bfloat16 --shape llama-3.1-8b

A step's time is the median gap between the streamer's timestamps (prefill excluded), the fastest of --reps runs;
torch runs on --threads threads so that other processes on a shared host disturb it less.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from sweep import compose, open_engine
from sweep.model import SHAPES


class StepClock:
    """A streamer that only timestamps each step: no token is read back to the host."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def median_step_ms(times: list[float]) -> float:
    return statistics.median(b - a for a, b in zip(times, times[1:])) * 1e3


def served_step_ms(engine, requests, reps: int) -> float:
    """Median decode step of the engine's own generate, the fastest of `reps` runs (token times after the first)."""
    return min(median_step_ms(engine.generate(requests)[0].token_times) for _ in range(reps))


def bare_step_ms(model, ids, new_tokens: int, reps: int, mask: bool) -> float:
    """The same transformers call with a timestamps-only streamer (its first put() is the prompt, its second the
    prefill's token)."""
    steps = []
    for _ in range(reps):
        clock = StepClock()
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids) if mask else None,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            streamer=clock,
        )
        steps.append(median_step_ms(clock.times[1:]))
    return min(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shape",
        default="llama-3.1-8b-narrow",
        choices=list(SHAPES),
        help="the model architecture: tiny for a rehearsal",
    )
    parser.add_argument("--isl", type=int, default=1024)
    parser.add_argument("--osl", type=int, default=24)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cache-dir", default="build/hf_step_profile", help="where the random checkpoint is kept")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    cfg = compose(
        [
            "+experiment=hf_step_profile",
            f"model.shape={args.shape}",
            f"device={args.device}",
            f"engine.dtype={args.dtype}",
            f"engine.max_batch_size={max(batches)}",
            f"engine.max_input_len={args.isl}",
            f"engine.max_seq_len={args.isl + args.osl}",
            f"workload.num_requests={max(batches)}",
            f"workload.input_len={args.isl}",
            f"workload.output_len={args.osl}",
            f"cache_dir={args.cache_dir}",
        ]
    )
    variants = ("as served", "timestamps only", "timestamps only, no attention mask")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    rows, profiles = [], {}
    with open_engine(cfg) as engine, torch.inference_mode():
        bare = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=getattr(torch, args.dtype))
        bare = bare.to(args.device).eval()
        for b in batches:
            requests = engine.requests[:b]
            ids = torch.tensor([r.input_ids for r in requests], device=args.device)
            engine.generate([dataclasses.replace(r, output_len=2) for r in requests])  # warm-up: the prompt's shapes
            # The first pass over key lengths not seen before, as served: on an H200 its steps cost ~35 ms more
            # than the same steps again, at batch 1 and 8 alike (a per-shape cost in the attention call).
            first_pass = served_step_ms(engine, requests, 1)
            warm = [
                served_step_ms(engine, requests, args.reps),
                bare_step_ms(bare, ids, args.osl, args.reps, mask=True),
                bare_step_ms(bare, ids, args.osl, args.reps, mask=False),
            ]
            rows.append([b, first_pass, *warm])
            with profile(activities=activities) as prof:
                engine.generate(requests)
            python = cProfile.Profile()
            python.runcall(engine.generate, requests)
            profiles[b] = (prof, python)

    setup = f"{args.shape}, ISL {args.isl}, OSL {args.osl}, {args.dtype}, sdpa, {args.device}, {args.threads} thread(s)"
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
