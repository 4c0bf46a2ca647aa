"""A request's clock: when it was offered, admitted, and each of its output tokens reached the host."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestTiming:
    """One request's clock (perf_counter seconds): arrival (offered), admitted (its prefill starts), and the time
    each output token became available on the host. `t0` is its iteration's start, for relative times."""

    request_id: str
    input_len: int
    output_len: int  # the number of tokens asked for
    arrival: float
    token_times: list[float]
    iteration: int = 0
    admitted: float | None = None
    t0: float = 0.0

    @property
    def queue(self) -> float | None:
        return None if self.admitted is None else self.admitted - self.arrival

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.arrival

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        return chunk_gaps(self.token_times)

    @property
    def chunk_sizes(self) -> list[int]:
        return chunk_sizes(self.token_times)


def chunk_sizes(token_times: list[float]) -> list[int]:
    """Tokens per streamed chunk: tokens that reached the host in one response carry the same timestamp."""
    sizes: list[int] = []
    for i, t in enumerate(token_times):
        if i and t == token_times[i - 1]:
            sizes[-1] += 1
        else:
            sizes.append(1)
    return sizes


def chunk_gaps(token_times: list[float]) -> list[float]:
    """ITL per chunk, as vLLM's benchmark and AIPerf's inter-chunk latency count it: the gap between consecutive
    responses. With one token per response this is every gap between tokens; a response carrying several tokens
    adds one gap, not one gap plus zeros for the tokens that shared its timestamp."""
    starts = [t for i, t in enumerate(token_times) if i == 0 or t != token_times[i - 1]]
    return [b - a for a, b in zip(starts, starts[1:])]
