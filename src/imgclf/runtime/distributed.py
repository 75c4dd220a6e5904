"""Data parallelism under torchrun, on PyTorch's own engine (DistributedDataParallel).

``torchrun --nproc-per-node N -m imgclf train ...`` starts N processes and tells each its
place through environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, ``TORCHELASTIC_RESTART_COUNT``:
https://pytorch.org/docs/stable/elastic/run.html#environment-variables). This module
reads them, joins the process group with the ``env://`` rendezvous torchrun prepared, and
offers the few collectives the trainer and predict need. Without those variables (a plain
``imgclf train``) nothing here starts a process group and every helper is the identity,
so a single process behaves exactly as it did before data parallelism existed.

Backends follow the device, as the DDP tutorial recommends
(https://pytorch.org/tutorials/intermediate/ddp_tutorial.html): NCCL for CUDA tensors,
Gloo for CPU tensors.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from imgclf.errors import RecipeError, UserError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; ``world_size == 1`` is a plain single process.

    Its methods are the few collectives the trainer and predict need; in a single process
    each is the identity (``any`` of flags is the flags), so callers never branch on it.
    ``device`` is where the collectives' tensors live (CUDA for NCCL, CPU for Gloo).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None  # "gloo" or "nccl" once a process group is joined
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable Python object)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, *flags: bool) -> list[bool]:
        """Each flag true on every rank when it is true on any (one rank's Ctrl-C stops
        them all)."""
        return [bool(v) for v in self.max([float(f) for f in flags])]

    def sum(self, values: list[float]) -> list[float]:
        return self._all_reduce(values, dist.ReduceOp.SUM if self.enabled else None)

    def max(self, values: list[float]) -> list[float]:
        """Elementwise maximum over ranks: for flags (any rank set it) and wall times."""
        return self._all_reduce(values, dist.ReduceOp.MAX if self.enabled else None)

    def _all_reduce(self, values: list[float], op: Any) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0; None elsewhere."""
        if not self.enabled:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_gather_rows(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """Reassemble a tensor whose rows ``rank::world_size`` each rank computed
        (``part``) into all ``n`` rows on every rank. ``all_gather`` needs equal shapes, so
        shorter parts are padded by a row and the padding dropped."""
        if not self.enabled:
            return part
        w = self.world_size
        rows = -(-n // w)
        padded = torch.zeros((rows, *part.shape[1:]), dtype=part.dtype, device=part.device)
        padded[: len(part)] = part
        parts = [torch.empty_like(padded) for _ in range(w)]
        dist.all_gather(parts, padded)
        full = torch.empty((n, *part.shape[1:]), dtype=part.dtype, device=part.device)
        for r, p in enumerate(parts):
            full[r::w] = p[: len(range(r, n, w))]
        return full

    def wrap(self, net: nn.Module) -> nn.Module:
        """``net`` in DistributedDataParallel, or ``net`` itself in a single process.

        Called after a stage has fixed which parameters train: DDP registers gradient
        hooks on the parameters that require grad when it is constructed, so a stage that
        unfreezes more layers needs a new wrapper (DDP docs: "changing the set of used
        parameters ... is not supported"). The wrapper's construction broadcasts rank 0's
        parameters and buffers, so every rank starts the stage from the same weights.
        """
        if not self.enabled:
            return net
        from torch.nn.parallel import DistributedDataParallel

        dev = self.device
        ids = [dev.index if dev.index is not None else self.local_rank]
        return DistributedDataParallel(net, device_ids=ids if dev.type == "cuda" else None)

    def check_sync_bn(self, wanted: bool) -> None:
        """PyTorch implements SyncBatchNorm for GPUs only (``SyncBatchNorm expected input
        tensor to be on GPU``): a CPU job says so before it starts, instead of training
        something other than what the recipe asks for."""
        if wanted and self.enabled and self.device.type != "cuda":
            raise RecipeError(
                "sync_bn: true needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs "
                "only); drop it for a CPU job (--set sync_bn=false)"
            )

    def sync_batchnorm(self, model: nn.Module) -> nn.Module:
        """Replace BatchNorm layers with SyncBatchNorm (statistics over the global batch;
        parameter and buffer names stay, so checkpoints load into the plain model)."""
        if not self.enabled:
            return model  # one process: its batch is the global batch already
        self.check_sync_bn(True)
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


SINGLE = Dist()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not a whole number") from None


def from_env() -> Dist:
    """What torchrun says about this process, without joining anything yet."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return SINGLE
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    return Dist(
        rank=_env_int("RANK", 0),
        world_size=world,
        local_rank=_env_int("LOCAL_RANK", 0),
        local_world_size=local_world,
    )


def restart_count() -> int:
    """How many times torchrun (``--max-restarts``) has restarted this job's workers."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def launch_id() -> str:
    """Names the torchrun job this worker belongs to, stable across its restarts: the
    host and pid of the torchrun agent that started this worker (our parent process)."""
    return f"{socket.gethostname()}:{os.getppid()}:{os.environ.get('TORCHELASTIC_RUN_ID', '')}"


def local_device(device: str | None) -> str | None:
    """Under torchrun on CUDA, each process drives its own GPU, ``cuda:LOCAL_RANK`` (the
    one-device-per-process layout DDP documents); anything else is left as given."""
    env = from_env()
    if not env.enabled:
        return device
    from imgclf.runtime.device import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        return f"cuda:{env.local_rank}"
    return device


def default_threads(threads: int | None) -> int | None:
    """CPU threads per process: the physical cores shared among this node's processes, so
    N processes do not each start one thread per core and fight over them."""
    env = from_env()
    if threads is not None or not env.enabled:
        return threads
    from imgclf.runtime.device import physical_cores

    return max(1, physical_cores() // env.local_world_size)


def init(device: torch.device, *, backend: str | None = None) -> Dist:
    """Join torchrun's process group (``env://``); the single-process :data:`SINGLE` when
    not launched by torchrun. ``backend``: by default NCCL on CUDA, Gloo otherwise."""
    env = from_env()
    if not env.enabled:
        return SINGLE
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed: run one process")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    if not dist.is_initialized():
        # The env:// rendezvous, as init_process_group(init_method="env://") does it, with
        # one change: torchrun's c10d rendezvous serves one store for the whole job, so
        # after a restart it still holds the Gloo addresses the killed attempt's ranks
        # published, and a new rank could read a dead peer's address before its successor
        # overwrites it (we saw restarted jobs hang in Gloo's connect). Each attempt gets
        # its own keys (attempt_prefix).
        store, rank, world_size = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(attempt_prefix(store, rank, world_size), store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
    # Gloo's tensors live on the CPU, NCCL's on this process's GPU.
    where = device if backend == "nccl" else torch.device("cpu")
    return Dist(env.rank, env.world_size, env.local_rank, env.local_world_size, backend, where)


HANDSHAKE_SECONDS = 600.0  # for every process of an attempt to start: imports, data
_POLL_SECONDS = 0.05
_HELLO, _GO = "imgclf/hello/", "imgclf/go/"  # + rank: a token; + token: the prefix


def attempt_prefix(store: dist.Store, rank: int, world_size: int) -> str:
    """A store key prefix that this attempt's processes, and no earlier ones, share.

    It cannot be made from TORCHELASTIC_RESTART_COUNT: with several nodes, the agents of
    the nodes that did not fail restart their workers with their count unchanged (a new
    rendezvous round, not a failure of theirs), so the nodes of one attempt disagree on
    it (and Gloo waited forever for keys under the other node's prefix). Rank 0 makes one
    up and hands it over: each other rank posts a fresh token under its rank, rank 0
    answers every token it finds there (a dead predecessor's too, harmlessly) under that
    token, and counts the acknowledgements, which only this attempt's ranks can send.
    """
    if rank != 0:
        return _receive_prefix(store, rank)
    prefix = f"imgclf/attempt/{uuid.uuid4().hex}"
    answered: dict[int, bytes] = {}
    waiting = set(range(1, world_size))
    deadline = time.monotonic() + HANDSHAKE_SECONDS
    while waiting:
        for r in sorted(waiting):
            key = f"{_HELLO}{r}"
            token = store.get(key) if store.check([key]) else None
            if token is not None and answered.get(r) != token:
                store.set(f"{_GO}{token.decode()}", prefix)
                answered[r] = token
            if store.check([f"{prefix}/ack/{r}"]):
                waiting.discard(r)
        if not waiting:
            break
        if time.monotonic() > deadline:
            raise UserError(f"ranks {sorted(waiting)} did not start in {HANDSHAKE_SECONDS:.0f} s")
        time.sleep(_POLL_SECONDS)
    return prefix


def _receive_prefix(store: dist.Store, rank: int) -> str:
    """Rank ``rank``'s side of :func:`attempt_prefix`."""
    token = uuid.uuid4().hex
    store.set(f"{_HELLO}{rank}", token)
    try:
        store.wait([f"{_GO}{token}"], timedelta(seconds=HANDSHAKE_SECONDS))
    except RuntimeError:  # c10d's DistStoreError: the wait timed out
        raise UserError(
            f"rank {rank}: rank 0 did not answer in {HANDSHAKE_SECONDS:.0f} s"
        ) from None
    prefix = store.get(f"{_GO}{token}").decode()
    store.set(f"{prefix}/ack/{rank}", "1")
    return prefix


def per_rank_batch(global_batch: int, d: Dist) -> int:
    """The recipe's ``batch_size`` is the global batch, so a recipe means the same
    optimisation on 1 or N processes; each rank takes an equal share of it."""
    if global_batch % d.world_size:
        raise RecipeError(
            f"batch_size {global_batch} does not divide among {d.world_size} processes: the "
            f"recipe's batch is the global one; use a multiple of {d.world_size} "
            f"(--set batch_size={max(d.world_size, global_batch - global_batch % d.world_size)})"
        )
    return global_batch // d.world_size


# ---------------------------------------------------------------- launching


NPROC_FLAG = "--nproc-per-node"


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """``imgclf ARGV`` as the torchrun job it is shorthand for: ``python -m
    torch.distributed.run --standalone --nproc-per-node N -m imgclf ARGV``, ARGV without
    the flag (nor an abbreviation argparse accepted, ``--nproc 2``). ``--standalone`` is
    torchrun's single-node mode: a rendezvous on this machine's loopback at a free port,
    so two jobs on one machine never collide on a fixed one."""
    import sys

    rest: list[str] = []
    skip = False
    for i, token in enumerate(argv):
        if skip:
            skip = False
            continue
        if token == "--":  # what follows is positional, never our flag
            rest += argv[i:]
            break
        name, eq, _ = token.partition("=")
        if len(name) >= len("--np") and NPROC_FLAG.startswith(name):
            skip = not eq  # "--nproc-per-node N": the value is the next token
            continue
        rest.append(token)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"{NPROC_FLAG}={nproc}",
        "-m",
        "imgclf",
        *rest,
    ]
