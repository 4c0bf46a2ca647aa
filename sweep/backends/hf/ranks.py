"""backend=hf split over several ranks: transformers' own tensor parallelism, one process per rank.

transformers shards the model as it loads (`from_pretrained(distributed_config=DistributedConfig(tp_size=N))`, by
the model's `base_model_tp_plan`), inside a torch.distributed process group that must exist in every rank's
process: gloo on the CPU, NCCL on GPUs (rank r on cuda:r of the visible GPUs).
Every forward pass is a collective, so every rank must make the same calls in the same order:

- rank 0 is sweep's own process: it serves, and its streamer stamps each token as on one device;
- ranks 1..N-1 are processes rank 0 spawns (torch.multiprocessing, spawn start method): each loads its shard and
  then waits for calls;
- before each call (generate a batch, score sequences, stop) rank 0 broadcasts it to them over a gloo group, then
  all ranks make it together.

A rank that dies in a collective closes its connections, and the others' collective fails with gloo's or NCCL's
error; a rank that never joins fails the group's set-up after PROCESS_GROUP_TIMEOUT.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

log = logging.getLogger(__name__)

PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)  # sharded loading of a large checkpoint takes minutes on every rank
JOIN_TIMEOUT_S = 60  # for a rank to end after the stop call, before it is terminated


def distributed_refusal() -> str | None:
    """Why transformers cannot split a model here (None: it can). from_pretrained's distributed path places the
    shards with a device_map, which transformers hands to accelerate."""
    try:
        from transformers.distributed import DistributedConfig  # noqa: F401
    except ImportError:
        import transformers

        return (
            f"transformers {transformers.__version__} has no DistributedConfig (its tensor and pipeline parallelism "
            "since 5.x; verified with 5.19); upgrade transformers"
        )
    if "pp_size" not in DistributedConfig.__dataclass_fields__:
        return "this transformers' DistributedConfig has no pp_size; upgrade transformers (verified with 5.19)"
    if importlib.util.find_spec("accelerate") is None:
        return (
            "transformers places a split model's shards through accelerate, which is not installed; "
            "pip install accelerate"
        )
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RankSpec:
    """What every rank needs to join the group and load its shard."""

    world_size: int
    port: int
    device: str  # cpu or cuda
    path: str
    dtype: str
    attn_implementation: str


@dataclass(frozen=True)
class Call:
    """One call every rank makes together: `name` is a key of the calls table the ranks share; None stops them."""

    name: str | None
    args: tuple = ()


def join_group(spec: RankSpec, rank: int) -> Any:
    """This process's place in the process group; returns the gloo group the calls travel on."""
    if spec.device == "cuda":
        torch.cuda.set_device(rank)
    else:  # the ranks share the host's cores, each its part, rather than every rank spinning on all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world_size))
    os.environ["LOCAL_RANK"] = str(rank)  # transformers picks the rank's GPU from it (initialize_distributed_mesh)
    dist.init_process_group(
        backend="nccl" if spec.device == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{spec.port}",
        rank=rank,
        world_size=spec.world_size,
        timeout=PROCESS_GROUP_TIMEOUT,
        device_id=torch.device("cuda", rank) if spec.device == "cuda" else None,
    )
    return dist.new_group(backend="gloo", timeout=PROCESS_GROUP_TIMEOUT)


def load_shard(spec: RankSpec) -> Any:
    """This rank's shard of the model, loaded by transformers inside the process group."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    model = AutoModelForCausalLM.from_pretrained(
        Path(spec.path),
        dtype=getattr(torch, spec.dtype),
        attn_implementation=spec.attn_implementation,
        distributed_config=DistributedConfig(tp_size=spec.world_size),
    )
    return model.eval()


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def serve_rank(rank: int, spec: RankSpec, calls: dict[str, Callable[..., Any]]) -> None:
    """A spawned rank: join, load, then make every call rank 0 broadcasts until it says stop."""
    try:
        control = join_group(spec, rank)
        model = load_shard(spec)
        while True:
            received = [None]
            dist.broadcast_object_list(received, src=0, group=control)
            call: Call = received[0]
            if call.name is None:
                return
            calls[call.name](model, *call.args)
    finally:
        leave_group()


class RankGroup:
    """Rank 0's side: the spawned ranks, the call channel, and the model shard of this process."""

    def __init__(self, spec: RankSpec, calls: dict[str, Callable[..., Any]]):
        self.spec, self.calls = spec, calls
        self.workers: list[Any] = []
        self.control: Any = None
        self.model: Any = None
        self.threads = torch.get_num_threads()  # this process's own, given back when the group closes

    def start(self) -> Any:
        """Spawn ranks 1..N-1, join the group as rank 0 and load this rank's shard; returns it."""
        context = mp.get_context("spawn")
        try:
            for rank in range(1, self.spec.world_size):
                worker = context.Process(target=serve_rank, args=(rank, self.spec, self.calls), daemon=True)
                worker.start()
                self.workers.append(worker)
            self.control = join_group(self.spec, 0)
            self.model = load_shard(self.spec)
        except BaseException:
            self.close()
            raise
        log.info(
            "%d tensor-parallel ranks serve the model (%s); ranks 1..%d are processes %s",
            self.spec.world_size,
            "NCCL" if self.spec.device == "cuda" else "gloo",
            self.spec.world_size - 1,
            ", ".join(str(w.pid) for w in self.workers),
        )
        return self.model

    def run(self, name: str, *args: Any, **local: Any) -> Any:
        """Make a call on every rank: the others get `args`; this rank also gets `local` (e.g. its token clock)."""
        dist.broadcast_object_list([Call(name, args)], src=0, group=self.control)
        return self.calls[name](self.model, *args, **local)

    def close(self) -> None:
        """Stop the ranks, wait for them (terminate a rank that does not end), and leave the group."""
        if self.control is not None and any(w.is_alive() for w in self.workers):
            try:
                dist.broadcast_object_list([Call(None)], src=0, group=self.control)
            except Exception as exc:  # a rank already gone: the ones left are terminated below
                log.warning("could not tell the other ranks to stop: %s", exc)
        self.control = self.model = None
        for worker in self.workers:
            worker.join(JOIN_TIMEOUT_S)
            if worker.is_alive():
                log.warning("rank process %d did not stop; terminating it", worker.pid)
                worker.terminate()
                worker.join()
        self.workers = []
        leave_group()
        torch.set_num_threads(self.threads)
