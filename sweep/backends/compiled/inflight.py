"""In-flight batching over the static cache: each row of the cache is a slot that one request holds from its
admission to its last token.

Device side (what is compiled and captured):
- `decode_rows(state, n, span)`: one token for each of rows 0..n-1, each at its own cache column `state.pos[row]`,
  attending over the first `span` columns of the cache; rows that are not decoding (free, or in the middle of their
  prefill) compute a throw-away token, and only rows marked in `state.live` advance. Its decoder layer
  (`decode_layer`) is what compiles, one code for every layer: for size 1, then with n and span symbolic; one CUDA
  graph of the whole step per (size, span) of `decode_sizes` x `attention_spans`.
- `prefill_chunk(state, row, ids, start)`: part of one prompt into the row's cache columns start..start+width-1,
  attending over columns 0..start+width-1, its last position's greedy token into `state.token[row]`. Its decoder
  layer (`prefill_layer`) compiles apart from decode's, one code for every layer and chunk of two tokens or more;
  not graphed (compile_plan says why).

Host side (`InflightScheduler.serve`): every step takes what has arrived into free rows, decodes the running rows
with the smallest captured size that covers them and the smallest span that covers their longest sequence, then
spends what is left of `max_num_tokens` on prompt chunks,
oldest admission first. A request whose prompt is complete decodes from the next step on, and its row is free again
the step it produces its last token. Nothing the host decides depends on a token's value (every request runs to
its output length), so the host queues step i+1 before it waits for step i's tokens, and the GPU never idles on it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from sweep.backends.compiled.engine import StaticState, forward_last, layer_forward
from sweep.backends.compiled.patches import FLEX_BLOCK, block_mask_of
from sweep.workload.requests import Request
from sweep.workload.stream import RequestStream

log = logging.getLogger(__name__)


class SlotState(StaticState):
    """The static state plus each row's own cache column and whether it is decoding."""

    def __init__(self, model, batch: int, max_seq_len: int, attn_implementation: str):
        # Eight columns more than any span reads: a span that were the whole row would be a contiguous slice, which
        # Inductor compiles as a case of its own (one more compile of the decode layer).
        super().__init__(model, batch, max_seq_len + 8, attn_implementation)
        self.max_seq_len = max_seq_len
        self.pos = torch.zeros(batch, dtype=torch.long, device=self.device)  # the column the row's next token fills
        self.live = torch.zeros(batch, dtype=torch.long, device=self.device)  # 1: the row decodes, its pos advances
        for tensor in (self.pos, self.live):
            torch._dynamo.mark_static_address(tensor)
        # Each row's index as a tensor of its own, as prompt chunks take it (a value, not a constant compiled in).
        self.row_ids = [torch.tensor([row], device=self.device) for row in range(batch)]
        self.block_masks = attn_implementation == "flex_attention"  # decode attention takes a FlexAttention mask
        pos = self.pos

        def row_sees(b, h, q_idx, kv_idx):  # one function for every step: compiled code that takes it is reused
            return kv_idx <= pos[b]

        self.row_sees = row_sees

    def reset_rows(self) -> None:
        self.pos.zero_()
        self.live.zero_()
        self.token.zero_()


def decode_sizes(requested, max_batch_size: int) -> list[int]:
    """The decode batch sizes to compile and capture: the requested ones (None: powers of two below
    max_batch_size) and max_batch_size itself, so that every batch has one."""
    sizes = {1 << i for i in range(max_batch_size.bit_length())} if requested is None else set(requested)
    return sorted({s for s in sizes if s <= max_batch_size} | {max_batch_size})


def attention_spans(max_seq_len: int) -> list[int]:
    """The key lengths decode attends over: sixteen even steps up to max_seq_len (multiples of 8). A step attends
    over the smallest span that covers its longest running sequence, so attention reads at most a sixteenth of
    max_seq_len past it instead of all max_seq_len columns of every row: on an H100, batch 32 of Llama-3.1-8B at
    max_seq_len 2048 reads 8.6 GB of keys and values a step over the whole row, ~2.8 ms of a ~10 ms step. Each span
    is one more CUDA graph per decode size; the compiled layer serves them all."""
    step = -(-max_seq_len // 128) * 8  # max_seq_len / 16, rounded up to a multiple of 8
    return sorted({min(max_seq_len, step * i) for i in range(1, 17)} | {max_seq_len})


class RowCache:
    """One layer's cache, decoding rows 0..n-1: row i writes its new key and value at its own column pos[i];
    attention reads the first `span` columns."""

    def __init__(self, keys, values, pos, span):
        self.keys, self.values, self.pos, self.span = keys, values, pos, span

    def update(self, key_states, value_states, *args, **kwargs):
        # Written through the whole layer cache, not through its view of rows [:n]: with n symbolic, Inductor
        # turned a write through the view into a copy of those rows' whole cache and back, every layer and step
        # (on an H200, batch 16 of Llama-3.1-8B at max_seq_len 1536: 4 of a step's 10 ms).
        n = self.pos.shape[0]
        rows = torch.arange(n, device=self.keys.device)
        self.keys[rows, :, self.pos] = key_states[:, :, 0]  # key_states: [n, kv_heads, 1, head_dim]
        self.values[rows, :, self.pos] = value_states[:, :, 0]
        return self.keys[:n, :, : self.span], self.values[:n, :, : self.span]


def decode_layer(layer, hidden, residual, mask, position_ids, position_embeddings, cache, cache_kwarg: str):
    """One decoder layer of a decode step, `cache` the layer's (keys, values): what in-flight decode compiles. Its
    arguments are tensors (and the layer, whose weights dynamo takes as inputs), the batch size and span are their
    shapes, so one compiled code serves every layer, size and span."""
    keys, values = cache
    row_cache = RowCache(keys, values, position_ids[:, 0], mask.shape[-1])
    return layer_forward(layer, hidden, residual, mask, position_ids, position_embeddings, row_cache, cache_kwarg)


def visible(state: StaticState, query_cols, span: int):
    """[queries, span]: a query at column c sees columns 0..c of its row (a row starts at column 0)."""
    cols = torch.arange(span, device=state.device)
    return cols[None, :] <= query_cols[:, None]


def as_mask(state: StaticState, allowed):
    if state.additive_mask:
        return torch.where(allowed, 0.0, torch.finfo(state.dtype).min).to(state.dtype)
    return allowed


def decode_mask(state: SlotState, n: int, span: int):
    """What decode attention of rows 0..n-1 over columns 0..span-1 takes: each row sees its columns up to its own,
    as a dense mask [n, 1, 1, span], or as FlexAttention's block mask (only the blocks that hold them)."""
    pos = state.pos[:n]
    if state.block_masks:
        return block_mask_of(torch.zeros_like(pos), pos // FLEX_BLOCK + 1, span, state.row_sees)
    return as_mask(state, visible(state, pos, span)[:, None, None, :])


def decode_rows(state: SlotState, n: int, span: int, layer_fn: Callable = decode_layer) -> None:
    """One token for each of rows 0..n-1, attending over columns 0..span-1, inputs and outputs in the state's
    buffers (no arguments but the two sizes, so each one's CUDA graph replays as captured)."""
    pos = state.pos[:n]
    mask = decode_mask(state, n, span)
    caches = list(zip(state.keys, state.values))
    logits = forward_last(state, state.token[:n], pos[:, None], mask, caches, layer_fn)
    state.token[:n].copy_(logits.argmax(dim=-1, keepdim=True))
    state.pos[:n].add_(state.live[:n])


class ChunkCache:
    """One layer's cache, prefilling one row: the chunk's keys and values go to its columns `cols` of row `row` (a
    one-element tensor); attention reads that row's columns up to the chunk's last (`end`, a shape, so that a compiled
    chunk takes its row, columns and width as values and shapes, not as constants)."""

    def __init__(self, keys, values, row, cols, end):
        self.keys, self.values, self.row, self.cols, self.end = keys, values, row, cols, end

    def update(self, key_states, value_states, *args, **kwargs):
        # key_states: [1, kv_heads, width, head_dim]; indexed by row and columns: [width, kv_heads, head_dim]
        self.keys[self.row, :, self.cols] = key_states[0].transpose(0, 1)
        self.values[self.row, :, self.cols] = value_states[0].transpose(0, 1)
        return self.keys[self.row, :, : self.end], self.values[self.row, :, : self.end]


def prefill_layer(layer, hidden, residual, mask, position_ids, position_embeddings, cache, cache_kwarg: str):
    """One decoder layer of a prompt chunk, `cache` the layer's (keys, values, row): what in-flight prefill
    compiles. The chunk's columns are its rope positions (a row starts at column 0) and it reads up to its last
    column: the mask's width, or the chunk's own when it starts the row (no mask)."""
    keys, values, row = cache
    end = hidden.shape[1] if mask is None else mask.shape[-1]
    chunk_cache = ChunkCache(keys, values, row, position_ids[0], end)
    return layer_forward(layer, hidden, residual, mask, position_ids, position_embeddings, chunk_cache, cache_kwarg)


def prefill_chunk(state: SlotState, row: int, input_ids, start: int, layer_fn: Callable = prefill_layer) -> None:
    """Prompt tokens [width] into `row` at columns start..start+width-1; their last position's greedy token goes to
    the row's state.token (the request's first output token when this chunk ends its prompt)."""
    end = start + input_ids.shape[0]
    cols = torch.arange(start, end, device=state.device)
    if start == 0 and end > 1 and not state.additive_mask:
        # A prompt's first chunk sees exactly the causal square of its own columns: no mask lets SDPA run
        # FlashAttention over the KV heads as they are (with a mask it repeats them per query head, and runs a
        # kernel that reads the mask).
        mask = None
    else:
        mask = as_mask(state, visible(state, cols, end)[None, None])  # [1, 1, width, end]
    caches = [(k, v, state.row_ids[row]) for k, v in zip(state.keys, state.values)]
    logits = forward_last(state, input_ids[None], cols[None, :], mask, caches, layer_fn)
    state.token[row].copy_(logits.argmax(dim=-1))
    state.pos[row].fill_(end)


def make_prefill_call(state: SlotState, plan: dict) -> Callable:
    """The prompt-chunk call (row, input_ids, start), its layers compiled as `plan` says (see compile_plan). A
    one-token chunk runs eager: dynamo would compile width 1 apart, and such chunks are rare (a 1-token prompt, or
    a step's last token of budget)."""
    if plan["prefill"] is None:
        return functools.partial(prefill_chunk, state)
    compiled = torch.compile(prefill_layer, fullgraph=True, dynamic=None, options=plan["prefill"])

    def run_prefill(row: int, input_ids, start: int) -> None:
        prefill_chunk(state, row, input_ids, start, compiled if input_ids.shape[0] > 1 else prefill_layer)

    return run_prefill


def make_decode_calls(
    state: SlotState, plan: dict, sizes: list[int], spans: list[int]
) -> dict[tuple[int, int], Callable]:
    """One decode call per (size, span), its layers compiled as `plan` says (see compile_plan); warm_up_inflight
    says in which order they compile."""
    layer_fn = decode_layer
    if plan["decode"] is not None:
        layer_fn = torch.compile(decode_layer, fullgraph=True, dynamic=None, options=plan["decode"])
    return {(n, span): functools.partial(decode_rows, state, n, span, layer_fn) for n in sizes for span in spans}


def warm_up_inflight(state: SlotState, run_decode: dict[tuple[int, int], Callable], run_prefill: Callable) -> None:
    """Run every decode (size, span) and the four kinds of prompt chunk before any timed request; then clear the
    rows.

    Compiles (one layer each, see compile_plan). Decode: the first call (size 1, the smallest span) compiles static;
    the next one, chosen to differ in both, compiles with n and span symbolic and serves every other pair but size 1,
    which dynamo specialises and compiles once more (span symbolic): at most three compiles however many pairs are
    captured (graphs captured before this call compiled in their capture's warm-up runs). Prompt chunks: a chunk
    that starts its row (no mask) and one that goes on from an earlier chunk (a mask), each at two widths and ends,
    static then symbolic: four compiles that serve every chunk of two tokens or more."""
    short = max(2, min(16, state.max_seq_len // 4))
    start = 0
    for width in (short, short + 1):  # from column 0, then on from there
        run_prefill(0, torch.zeros(width, dtype=torch.long, device=state.device), 0)
    for width in (short, short + 1):
        start += width
        run_prefill(0, torch.zeros(width, dtype=torch.long, device=state.device), start)
    first, *rest = sorted(run_decode)
    order = [first, *sorted(rest, key=lambda pair: (pair[0] == first[0] or pair[1] == first[1], pair))]
    for pair in order:
        for _ in range(3):
            run_decode[pair]()
    state.reset_rows()
    if state.device.type == "cuda":
        torch.cuda.synchronize()


# -- host side ------------------------------------------------------------------------------------------------
@dataclass
class Running:
    request: Request
    row: int
    ids: torch.Tensor  # the prompt on the device, [input_len]
    prefilled: int = 0  # prompt tokens in the cache
    generated: int = 0  # output tokens produced (queued on the device)


@dataclass
class StepRecord:
    """What one step processed: `decoded` + `prefilled` tokens never exceed max_num_tokens. `graph_rows` and
    `span` are the decode graph's size and key length (rows not decoding in it compute a throw-away token).
    `marks`, when the scheduler records them, are when the step began, its decode ended and its prompt chunks ended:
    CUDA events on a GPU (when the device reached them), perf_counter seconds on a CPU; step_phases turns them into
    milliseconds."""

    decoded: int
    prefilled: int
    graph_rows: int
    span: int
    marks: tuple = ()


class Marks:
    """Timestamps of the device's progress: CUDA events recorded in stream order on a GPU, host times on a CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else 1e3 * (end - start)


def step_phases(steps: list[StepRecord], marks: Marks) -> list[dict[str, float]]:
    """Each step's decode and prompt-chunk milliseconds, and the gap since the previous step ended (the device
    waiting for the host). On a GPU, call it after the steps' work is done (it reads their events)."""
    if marks.cuda:
        torch.cuda.synchronize()
    phases = []
    for i, step in enumerate(steps):
        start, decoded, end = step.marks
        gap = marks.ms(steps[i - 1].marks[2], start) if i else 0.0
        phases.append({"decode_ms": marks.ms(start, decoded), "prefill_ms": marks.ms(decoded, end), "gap_ms": gap})
    return phases


@dataclass
class Report:
    """One step's tokens on their way to the host, reported to the stream when they arrive."""

    host: torch.Tensor  # a snapshot of state.token after the step
    event: torch.cuda.Event | None
    produced: list[Running] = field(default_factory=list)
    finished: list[Running] = field(default_factory=list)


class InflightScheduler:
    def __init__(
        self,
        state: SlotState,
        run_decode: dict[tuple[int, int], Callable],
        run_prefill: Callable,
        max_num_tokens: int,
    ):
        self.state, self.run_decode, self.run_prefill = state, run_decode, run_prefill
        self.sizes = sorted({n for n, _ in run_decode})
        self.spans = sorted({span for _, span in run_decode})
        self.max_num_tokens = max_num_tokens
        self.cuda = state.device.type == "cuda"
        # Two host buffers for token snapshots: step i+1 is queued into one while step i's is read.
        self.buffers = [torch.empty(state.batch, dtype=torch.long, pin_memory=self.cuda) for _ in range(2)]
        self.steps: list[StepRecord] = []  # of the last serve() call, for logs, tests and step_phases
        self.marks: Marks | None = None  # set, each step records its marks (benchmarks/inflight_steps.py)

    def serve(self, stream: RequestStream, max_batch: int) -> dict[str, list[int]]:
        """Serve the stream until it is exhausted, with at most `max_batch` requests running; every request's
        greedy tokens."""
        state = self.state
        free = list(range(min(max_batch, state.batch)))  # rows, lowest first: low rows keep the decode size small
        running: dict[int, Running] = {}
        prefilling: deque[Running] = deque()  # admitted, prompt not yet complete, oldest first
        outputs: dict[str, list[int]] = {}
        pending: Report | None = None
        self.steps = []
        state.reset_rows()  # every row free: nothing left from warm-up or from a caller that drove the rows itself
        while True:
            if not running and pending is not None:  # its finishes may be what the stream waits for
                self._report(pending, stream, outputs)
                pending = None
            if free:
                for req in stream.take(len(free), wait=not running):
                    row = free.pop(0)
                    ids = torch.tensor(req.input_ids, dtype=torch.long, pin_memory=self.cuda)
                    running[row] = Running(req, row, ids.to(state.device, non_blocking=True))
                    prefilling.append(running[row])
                    outputs[req.id] = []
            if not running:
                if stream.exhausted:
                    return outputs
                continue  # take() gave nothing yet: wait again
            report = self._step(stream, running, prefilling, free, len(self.steps) % 2)
            if not self.cuda:  # the step is done already: its tokens are on the host now
                self._report(report, stream, outputs)
                continue
            if pending is not None:  # this step is queued: now wait for the previous one's tokens
                self._report(pending, stream, outputs)
            pending = report

    def _step(
        self, stream: RequestStream, running: dict[int, Running], prefilling: deque, free: list[int], buffer: int
    ) -> Report:
        state = self.state
        report = Report(self.buffers[buffer], torch.cuda.Event() if self.cuda else None)
        decoding = [r for r in running.values() if r.prefilled == r.request.input_len]
        graph_rows = span = 0
        began = self._mark()
        if decoding:
            top = max(r.row for r in decoding) + 1
            graph_rows = next(n for n in self.sizes if n >= top)
            longest = max(r.request.input_len + r.generated for r in decoding)  # its new token's column + 1
            span = next(s for s in self.spans if s >= longest)
            self.run_decode[(graph_rows, span)]()
            for r in decoding:
                r.generated += 1
            report.produced += decoding
        decoded_at = self._mark()
        budget = self.max_num_tokens - len(decoding)
        prefilled = 0
        while prefilling and budget > 0:
            r = prefilling[0]
            width = min(r.request.input_len - r.prefilled, budget)
            if r.prefilled == 0:
                stream.admitted(r.request.id)
            self.run_prefill(r.row, r.ids[r.prefilled : r.prefilled + width], r.prefilled)
            r.prefilled += width
            budget -= width
            prefilled += width
            if r.prefilled < r.request.input_len:
                break  # the budget is spent on this prompt
            prefilling.popleft()
            r.generated = 1  # its first token, from the prompt's last position
            report.produced.append(r)
            state.live[r.row].fill_(1)
        ended = self._mark()
        report.host.copy_(state.token.view(-1), non_blocking=self.cuda)
        if report.event is not None:
            report.event.record()
        for r in report.produced:
            if r.generated == r.request.output_len:  # done: its row is free from the next step on
                report.finished.append(r)
                del running[r.row]
                state.live[r.row].fill_(0)
                state.pos[r.row].fill_(0)
                free.append(r.row)
        free.sort()
        marks = (began, decoded_at, ended) if self.marks is not None else ()
        self.steps.append(StepRecord(len(decoding), prefilled, graph_rows, span, marks))
        return report

    def _mark(self):
        return self.marks.now() if self.marks is not None else None

    @staticmethod
    def _report(report: Report, stream: RequestStream, outputs: dict[str, list[int]]) -> None:
        if report.event is not None:
            report.event.synchronize()
        now = time.perf_counter()
        tokens = report.host.tolist()
        for r in report.produced:
            outputs[r.request.id].append(tokens[r.row])
            stream.tokens(r.request.id, 1, at=now)
        for r in report.finished:
            stream.finished(r.request.id, at=now)
