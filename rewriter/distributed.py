"""Data-parallel calibration: N processes share the forward passes of a run and take the same decisions.

    rewriter run --nproc N recipe.yaml                 N local processes (this module's `launch`, gloo)
    torchrun --nproc_per_node N -m rewriter run r.yaml  the same, ranks from RANK / WORLD_SIZE / MASTER_*

Every rank loads the model and draws the same calibration, validation and held-out batches (cheap:
token ids). What costs, the forward passes, is sharded: batch i of every list (the gate's
reference and candidate outputs, activations a rule captures, the damage ranking, the held-out
check) is run by rank i mod N only. The per-batch results, already reduced where the single-process
code reduces them (a perplexity gate's per-token NLLs, not logits), are all-gathered, so every rank
holds the same list in the single-process run's batch order and goes on with the very code and
arithmetic of one process: every metric, every fitted tensor (LLM-Drop importance and mean shift,
hedgehog feature maps, MASA's whitened bases, k-means centroids, NormLin statistics, agent pooling)
is computed from identical inputs in an identical order. That is why the records and the saved
tensors equal the one-process run's bit for bit (float sums in another order would not), given the
same per-process thread count (torch's CPU reductions split work by thread). Fits after the capture
(Adam steps of the hedgehog attention transfer) run on every rank on the gathered activations, the
same steps, rather than splitting each minibatch: splitting it would change the loss's summation
order, and with it the fitted maps.

Checks that hold the ranks together: each decision's record (status, reason, metrics) is compared
across ranks (`World.agree`: a mismatch raises naming the ranks), a time budget is rank 0's
decision, and a rank whose share of a sharded step raises makes that step raise on every rank as a
DistributedError naming it. Latency is timed on rank 0 alone (the other ranks wait) and its numbers
are sent to the others, so every rank's report is the same; rank 0 writes the output and prints.
With one process (`World()`, size 1) no collective is called and every function is the identity.
"""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["DistributedError", "World", "current", "init_from_env", "launch", "SINGLE"]

TIMEOUT_S = float(os.environ.get("REWRITER_DIST_TIMEOUT", 1800))   # a collective waits this long at most


class DistributedError(RuntimeError):
    """A rank's share of a sharded step failed (the message names the rank), or the ranks disagree."""

    def __init__(self, message: str, ranks: Sequence[int] = ()):
        super().__init__(message)
        self.ranks = tuple(ranks)


@dataclass(frozen=True)
class World:
    """This process's place among the `size` processes of a run (rank 0 writes and prints)."""

    rank: int = 0
    size: int = 1
    group: object = None           # the torch.distributed process group (None: the default one)

    @property
    def single(self) -> bool:
        return self.size == 1

    def mine(self, items: list) -> list:
        """The items this rank runs: every `size`-th from `rank` (the list itself with one process)."""
        return items if self.single else items[self.rank::self.size]

    def shard(self, fn: Callable[[list], list], items: list, what: str) -> list:
        """`fn(items)` with the work shared: each rank calls `fn` on its own items (`mine`), which must
        return one result per item, and every rank gets all results in `items`' order. With one
        process: `fn(items)`. A rank whose `fn` raises makes every rank raise DistributedError,
        naming the rank(s) and `what` was being done."""
        if self.single:
            return fn(items)
        mine = self.mine(items)
        try:
            local, err = list(fn(mine)), None
            if len(local) != len(mine):
                raise RuntimeError(f"{len(local)} results for {len(mine)} items")
        except Exception as e:  # noqa: BLE001 (sent to every rank, raised there as DistributedError)
            local, err = None, f"{type(e).__name__}: {e}".strip()
        parts = self.gather((err, local))
        self._raise_failed([p[0] for p in parts], what)
        out: list = [None] * len(items)
        for r, (_, loc) in enumerate(parts):
            out[r::self.size] = loc
        return out

    def gather(self, obj) -> list:
        """`obj` of every rank, by rank; tensors travel pickled, bit for bit. Each rank broadcasts in
        turn rather than all_gather_object: a rank keeps its own object (no unpickled copy of it) and
        holds one rank's serialized bytes at a time, not a buffer of N times the largest."""
        return [self.broadcast(obj, src) for src in range(self.size)]

    def broadcast(self, obj, src: int = 0):
        """Rank `src`'s `obj` on every rank."""
        import torch.distributed as dist
        if self.single or self.rank == src:
            if not self.single:
                dist.broadcast_object_list([obj], src=src, group=self.group)
            return obj
        box = [None]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def on_rank0(self, fn: Callable[[], object], what: str):
        """`fn()` computed on rank 0 alone (the others wait) and its value sent to every rank; if it
        raises, every rank raises DistributedError naming rank 0. With one process: `fn()`."""
        if self.single:
            return fn()
        err = value = None
        if self.rank == 0:
            try:
                value = fn()
            except Exception as e:  # noqa: BLE001 (sent to every rank)
                err = f"{type(e).__name__}: {e}".strip()
        err, value = self.broadcast((err, value))
        self._raise_failed([err] + [None] * (self.size - 1), what)
        return value

    def agree(self, value, what: str) -> None:
        """Raise DistributedError on every rank unless every rank holds an equal `value`."""
        if self.single:
            return
        values = self.gather(value)
        odd = [r for r, v in enumerate(values) if repr(v) != repr(values[0])]   # NaN equals NaN here
        if odd:
            raise DistributedError(f"ranks disagree on {what}: rank 0 has {values[0]!r}, "
                                   + ", ".join(f"rank {r} has {values[r]!r}" for r in odd), odd)

    def _raise_failed(self, errors: list, what: str) -> None:
        bad = [(r, e) for r, e in enumerate(errors) if e is not None]
        if bad:
            raise DistributedError("; ".join(f"rank {r} of {self.size} failed while {what}: {e}"
                                             for r, e in bad), [r for r, _ in bad])


SINGLE = World()


def current() -> World:
    """The world of this process: the initialized default process group's ranks (init_from_env, or
    your own torch.distributed.init_process_group), else one process."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return World(dist.get_rank(), dist.get_world_size())
    return SINGLE


def env_world_size() -> int:
    """WORLD_SIZE from the environment (torchrun, `launch`), 1 when unset; a bad value names it."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE={raw!r} is not an integer") from None
    if n < 1:
        raise ValueError(f"environment variable WORLD_SIZE={raw!r} must be ≥ 1")
    return n


def init_from_env() -> World:
    """Join the process group the environment describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    as torchrun sets them): gloo on the CPU (plus NCCL for CUDA tensors when a GPU is present).
    One process (WORLD_SIZE unset or 1): nothing is initialized. A missing variable is named."""
    import torch.distributed as dist
    size = env_world_size()
    if size == 1:
        return current()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={size} but the environment lacks {', '.join(missing)} "
                         "(start the ranks with torchrun or `rewriter run --nproc N`)")
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method="env://", rank=int(os.environ["RANK"]), world_size=size,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
    return current()


def close() -> None:
    """Leave the process group (if this process is in one)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, argv: Sequence[str], *, threads: int | None = None,
           poll_s: float = 0.05) -> tuple[int, list[int | None]]:
    """Run `python -m rewriter *argv` as `nproc` local ranks (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    a free MASTER_PORT in their environment) and wait. Each rank gets `threads` torch threads
    (OMP_NUM_THREADS; default: the environment's, else the CPU count divided by `nproc`). When a rank
    exits with an error the others are given 10 s to fail too (a collective raises on all ranks) and
    are then terminated. Returns (exit status: the first failing rank's, else 0; every rank's status,
    None where it was terminated)."""
    if nproc < 1:
        raise ValueError(f"--nproc: must be ≥ 1, not {nproc}")
    threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, (os.cpu_count() or 1) // nproc)
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": str(threads)}
        procs.append(subprocess.Popen([sys.executable, "-m", "rewriter", *argv], env=env))
    codes: list[int | None] = [None] * nproc
    failed_at = None
    try:
        while any(c is None for c in codes):
            for r, p in enumerate(procs):
                if codes[r] is None and (c := p.poll()) is not None:
                    codes[r] = c
                    if c != 0 and failed_at is None:
                        failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > 10:
                break
            time.sleep(poll_s)
    finally:
        for r, p in enumerate(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            elif codes[r] is None:
                codes[r] = p.returncode
    first = next((c for c in codes if c not in (0, None)), 0)
    return first, codes
