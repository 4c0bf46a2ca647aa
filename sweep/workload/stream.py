"""The harness's clock: when each request is offered to the engine, and what happened to it from then on.

Every scenario is one of two arrival processes:
- open loop (`rate`, and `throughput` as rate = inf): arrival times drawn up front, gamma-distributed gaps of
  shape `burstiness` at `request_rate` per second (1 = Poisson, as vLLM's benchmark), seeded;
- closed loop (`concurrency`, and `latency` as one client): N clients, each offering its next request the moment
  its previous one finished.

A backend serves a `RequestStream`: it takes requests that have arrived (`take`), says when it starts each one's
prefill (`admitted`), hands back tokens as they reach the host (`tokens`) and says when one is done (`finished`).
The stream stamps every event with one clock (time.perf_counter), so every figure can be recomputed from the
per-request records it returns (sweep.measure.metrics.RequestTiming).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Any, Awaitable, Callable

import numpy as np

from sweep.workload.requests import Request
from sweep.workload.timing import RequestTiming


def arrival_schedule_s(wcfg: Any) -> float:
    """Seconds over which an open loop's arrivals are spread, the warm-up and every iteration together (their mean
    gaps of 1/request_rate); 0 for a closed loop or everything at t0."""
    if wcfg.scenario != "rate" or math.isinf(wcfg.request_rate):
        return 0.0
    gaps = max(wcfg.warmup_requests - 1, 0) + wcfg.iterations * max(wcfg.num_requests - 1, 0)
    return gaps / wcfg.request_rate


def open_loop_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Arrival offsets from t0 (s): gaps ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)), mean 1/rate.

    rate = inf puts every request at t0. The first request arrives at t0, as in vLLM's benchmark.
    """
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(n - 1, 0))
    return [0.0, *np.cumsum(gaps).tolist()][:n]


class RequestStream:
    """Requests offered to one engine over one iteration, open or closed loop; thread-safe.

    Open loop: `offsets[i]` seconds after `start()`, request i becomes available. Closed loop: `clients` requests
    are available at start, and each `finished` makes that client's next request available at once.
    """

    def __init__(
        self,
        requests: list[Request],
        *,
        offsets: list[float] | None = None,
        clients: int | None = None,
        iteration: int = 0,
    ):
        if (offsets is None) == (clients is None):
            raise ValueError("a RequestStream is open loop (offsets) or closed loop (clients), not both")
        self.requests, self.offsets, self.clients, self.iteration = requests, offsets, clients, iteration
        self.records: dict[str, RequestTiming] = {}
        self.client_of: dict[str, int] = {}  # closed loop: which client sent each request
        self._pending: list[tuple[float, Request, int | None]] = []  # (arrival, request, client), arrival order
        self._next = 0  # index of the next request not yet scheduled
        self._done = 0
        self._cond = threading.Condition()
        self.t0: float | None = None

    # -- the clock ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            self.t0 = time.perf_counter()
            if self.offsets is not None:
                self._pending = [(self.t0 + off, req, None) for off, req in zip(self.offsets, self.requests)]
                self._next = len(self.requests)
            else:
                for client in range(min(self.clients, len(self.requests))):
                    self._schedule(self.t0, client)

    def _schedule(self, arrival: float, client: int) -> None:
        self._pending.append((arrival, self.requests[self._next], client))
        self._next += 1

    @property
    def exhausted(self) -> bool:
        """Every request has finished: nothing more will arrive."""
        with self._cond:
            return self._done == len(self.requests)

    def next_arrival(self) -> float | None:
        """perf_counter time of the earliest request not yet taken (None when none is scheduled)."""
        with self._cond:
            return self._pending[0][0] if self._pending else None

    # -- what a backend calls -----------------------------------------------------------------------------------
    def take(self, limit: int, wait: bool = False, timeout: float | None = None) -> list[Request]:
        """Up to `limit` requests that have arrived, oldest first. With `wait`, block until one has arrived, or
        until nothing more can arrive (then []), or `timeout` seconds passed."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        with self._cond:
            while True:
                now = time.perf_counter()
                ready = [p for p in self._pending if p[0] <= now][:limit]
                if ready or not wait or self._done == len(self.requests):
                    break
                if self._pending:  # sleep until the next arrival (or an earlier finish wakes us)
                    until = self._pending[0][0] if deadline is None else min(self._pending[0][0], deadline)
                else:  # closed loop: the next arrival comes with a finish
                    until = deadline
                if deadline is not None and now >= deadline:
                    break
                self._cond.wait(None if until is None else max(until - now, 0.0))
            for item in ready:
                self._pending.remove(item)
                arrival, req, client = item
                self.records[req.id] = RequestTiming(
                    req.id, req.input_len, req.output_len, arrival, [], self.iteration, t0=self.t0
                )
                if client is not None:
                    self.client_of[req.id] = client
            return [req for _, req, _ in ready]

    def admitted(self, request_id: str, at: float | None = None) -> None:
        """The engine starts this request's prefill."""
        self.records[request_id].admitted = time.perf_counter() if at is None else at

    def tokens(self, request_id: str, count: int = 1, at: float | None = None) -> None:
        """`count` new output tokens of one request reached the host (together, at one time)."""
        now = time.perf_counter() if at is None else at
        self.records[request_id].token_times += [now] * count

    def finished(self, request_id: str, at: float | None = None) -> None:
        """The request is done; in a closed loop its client sends its next request now."""
        now = time.perf_counter() if at is None else at
        with self._cond:
            self._done += 1
            if self.clients is not None and self._next < len(self.requests):
                self._schedule(now, self.client_of[request_id])
            self._cond.notify_all()

    def results(self) -> list[RequestTiming]:
        """Every request's record, in workload order; raises when some request was never served."""
        missing = [r.id for r in self.requests if r.id not in self.records]
        if missing or not self.exhausted:
            raise RuntimeError(f"the engine stopped with requests unserved, e.g. {(missing or ['?'])[0]}")
        return [self.records[r.id] for r in self.requests]


async def serve_in_flight(
    stream: RequestStream,
    max_in_flight: int,
    relay: Callable[[Request], Awaitable[None]],
    stop: Callable[[set[asyncio.Task]], None] | None = None,
) -> None:
    """The loop of an engine that batches in flight behind a streaming API (trt, vllm): each request is handed to
    `relay` as it arrives, up to `max_in_flight` at once; `relay` reports its admission, tokens and finish.

    One failed request fails the iteration: `stop` tells the engine to drop the others, which are then cancelled
    and awaited, so none stays bound to an event loop that is about to close.
    """
    in_flight: set[asyncio.Task] = set()
    while not stream.exhausted:
        for request in stream.take(max_in_flight - len(in_flight)):
            in_flight.add(asyncio.create_task(relay(request)))
        next_arrival = stream.next_arrival()
        full = len(in_flight) >= max_in_flight
        # Wake for the next arrival, unless every slot is taken (or none is due): then for the next finish.
        timeout = None if next_arrival is None or full else max(next_arrival - time.perf_counter(), 0.0)
        if not in_flight:
            if timeout is not None:
                await asyncio.sleep(timeout)
            continue
        done, in_flight = await asyncio.wait(in_flight, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        failed = [task for task in done if task.exception() is not None]
        if failed:
            if stop is not None:
                stop(in_flight)
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            raise failed[0].exception()
