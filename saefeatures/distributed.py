"""The processes of one run under `torchrun`: rank, world size and the few collectives the study needs.

`torchrun --nproc_per_node N -m saefeatures run ...` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous in their environment; `init_world` joins them in a
`torch.distributed` process group (NCCL on GPUs, gloo on CPUs). Without those variables, or with
one process, it is the single-process world: every helper then does nothing and costs nothing, so
the study has one code path.

Every exchange starts with `World.sync`, an all-gather of a small JSON status from every rank: a
rank that failed sends its error there instead of its result, and every rank raises `RankFailure`
naming it and the stage, rather than waiting in a collective the failed rank never joins. Each
collective waits at most ``timeout_s`` (``$SAEFEATURES_DIST_TIMEOUT``); a rank that died is noticed
at once (its sockets close), one that hangs after the timeout.

Example:
    >>> world = init_world()
    >>> mine = world.mine(batches)          # batches[rank::size]
    >>> world.sync("scoring")               # raises RankFailure if another rank failed
    >>> world.all_reduce(counts)            # summed over ranks, in place
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TIMEOUT_ENV = "SAEFEATURES_DIST_TIMEOUT"
"""Seconds a rank waits at a collective inside a stage before giving up (default 1,800)."""
WAIT_ENV = "SAEFEATURES_DIST_WAIT"
"""Seconds the other ranks wait for rank 0 while it runs the stages it alone runs (default 86,400)."""
T = TypeVar("T")
_ABANDONED: list[Any] = []
"""Collectives given up on, kept to the end of the process: the gloo thread running one may still hold
it, and if that thread drops the last reference it frees the work's tensors, which needs the GIL; at
interpreter exit that aborts the process ('terminate called without an active exception')."""


class RankFailure(RuntimeError):
    """Another rank failed (its error is in the message), or the ranks lost contact during a stage."""


def rank_tag() -> str:
    """'rank R/N ' under torchrun (from its environment, before the group is joined), else ''."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return f"rank {os.environ.get('RANK', '0')}/{size} " if size > 1 else ""


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes; ``World()`` is the single-process world."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    timeout_s: float = 1800.0
    """Longest wait at a collective inside a stage."""
    wait_s: float = 86400.0
    """Longest wait of the other ranks while rank 0 runs the stages it alone runs."""

    @property
    def leader(self) -> bool:
        """Rank 0: it holds the run directory's lock and writes metrics, report and wandb."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where collective tensors live: the local GPU under NCCL, else the CPU."""
        if self.size > 1 and dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def own_device(self, device: str) -> str:
        """Where this rank computes when ``device`` is asked for: a CUDA device becomes the rank's
        own GPU, ``cuda:LOCAL_RANK``, when there are several ranks; any other device stays."""
        if self.size > 1 and torch.device(device).type == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    def mine(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every size-th item from its rank on (deterministic; with
        length-sorted batches each rank gets a like share of tokens)."""
        return list(items[self.rank :: self.size])

    def sync(self, stage: str, error: BaseException | None = None, payload: Any = None,
             timeout_s: float | None = None) -> list[Any]:
        """Every rank's ``payload`` (JSON), in rank order, once every rank got here; `RankFailure`
        naming the rank and ``stage`` if one of them reports an ``error`` (this one included) or the
        ranks lose contact."""
        if self.size == 1:
            if error is not None:
                raise error
            return [payload]
        status = {"stage": stage, "error": None if error is None else f"{type(error).__name__}: {error}",
                  "payload": payload}
        data = json.dumps(status).encode()
        try:
            sizes = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.size)]
            self._wait(dist.all_gather(sizes, torch.tensor([len(data)], device=self.device), async_op=True),
                       stage, timeout_s)
            width = int(max(s.item() for s in sizes))
            mine = torch.zeros(width, dtype=torch.uint8, device=self.device)
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            parts = [torch.zeros(width, dtype=torch.uint8, device=self.device) for _ in range(self.size)]
            self._wait(dist.all_gather(parts, mine, async_op=True), stage, timeout_s)
        except RankFailure:
            if error is not None:
                raise error from None
            raise
        statuses = [json.loads(bytes(p[: int(n.item())].cpu().tolist())) for p, n in zip(parts, sizes)]
        failed = [(r, s) for r, s in enumerate(statuses) if s["error"] is not None]
        if failed:
            rank, s = failed[0]
            if rank == self.rank and error is not None:
                raise error
            raise RankFailure(f"rank {rank} of {self.size} failed in stage '{s['stage']}': {s['error']} "
                              f"(this is rank {self.rank}, in stage '{stage}'); see rank {rank}'s log, fix, and "
                              "rerun the same command to resume")
        return [s["payload"] for s in statuses]

    def agree(self, stage: str, value: Any = None, timeout_s: float | None = None) -> Any:
        """Rank 0's ``value`` on every rank (JSON), after a `sync`."""
        return self.sync(stage, payload=value if self.leader else None, timeout_s=timeout_s)[0]

    def all_reduce(self, t: torch.Tensor, stage: str, op: str = "sum") -> torch.Tensor:
        """``t`` reduced over ranks (``op``: 'sum', 'max' or 'min'), in place; call right after a
        successful `sync`, so every rank is at the same collective."""
        if self.size == 1:
            return t
        work = t.to(self.device)
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        self._wait(dist.all_reduce(work, op=ops[op], async_op=True), stage)
        if work is not t:
            t.copy_(work)
        return t

    def run(self, stage: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on this rank, then a `sync`: its error, or another rank's, is
        raised on every rank."""
        try:
            out = fn(*args, **kwargs)
        except Exception as e:
            self.sync(stage, error=e)
            raise
        self.sync(stage)
        return out

    def fail(self, stage: str, error: BaseException) -> None:
        """Tell the other ranks that this one failed in ``stage`` (they raise `RankFailure` at their
        next exchange), waiting at most ``timeout_s`` for them; nothing in the single-process world or
        when the failure is itself another rank's."""
        if self.size == 1 or isinstance(error, RankFailure):
            return
        log.error("%sfailed in stage '%s': %s: %s", rank_tag(), stage, type(error).__name__, error)
        try:
            self.sync(stage, error=error)
        except BaseException:  # noqa: BLE001 - the caller raises the original error
            pass

    def _wait(self, work, stage: str, timeout_s: float | None = None) -> None:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            work.wait(timeout=datetime.timedelta(seconds=timeout))
        except RuntimeError as e:
            _ABANDONED.append(work)
            raise RankFailure(
                f"rank {self.rank} of {self.size}: lost contact with the other ranks in stage '{stage}' "
                f"(waited up to {timeout:.0f} s; {' '.join(str(e).split())[:200]}): another rank died or hangs; "
                "see the other ranks' logs, then rerun the same command to resume") from None


def init_world(timeout_s: float | None = None) -> World:
    """Join the process group `torchrun` describes in the environment (``WORLD_SIZE`` > 1), or return
    the single-process world. NCCL when CUDA is available (each rank on GPU ``LOCAL_RANK``), else gloo."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    timeout = float(os.environ.get(TIMEOUT_ENV, 1800)) if timeout_s is None else timeout_s
    wait = max(timeout, float(os.environ.get(WAIT_ENV, 86400)))
    if size == 1:
        return World(timeout_s=timeout, wait_s=wait)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=wait))
        log.info("joined a %s process group of %d ranks", backend, size)
    return World(rank, size, local, timeout, wait)


def close_world(world: World) -> None:
    """Leave the process group (nothing in the single-process world)."""
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def joined(timeout_s: float | None = None) -> Iterator[World]:
    """`init_world` for the block, leaving the process group after it however it ends."""
    world = init_world(timeout_s)
    try:
        yield world
    finally:
        close_world(world)
