"""The torch.distributed seam: ranks, process group, sharding and the few collectives ffinterp needs.

Scans of 10^8 sequences outgrow one device, so ``ffinterp eval`` and ``ffinterp find-glitches``
run unchanged under ``torchrun``. This module is the only place that knows about it:

- :func:`init` reads torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, picks one device per
  rank (``cuda:LOCAL_RANK``, else the CPU) and joins the process group with the backend that
  fits (NCCL on GPUs, gloo on CPUs). Without those variables it returns world size 1 and
  creates no process group: every helper is then the identity, so the single-process run and
  the distributed one go through the same code.
- :meth:`Dist.shard` splits a stream of work items (batches, search units) into disjoint
  strided shares. The stream is never re-seeded per rank: the union over ranks is the
  single-process stream, which is why results do not depend on the world size.
- Collectives (sum of counts, gather/broadcast of Python objects, barrier) go through a gloo
  group with a timeout. A rank that dies or hangs turns into one :class:`DistributedError`
  line on the others instead of a hang or a C++ traceback; ``torchrun`` then stops the job.
  Callers write output atomically at agreed points, so a stopped job is resumable.
- ``torchrun`` stops the other ranks with SIGTERM. A signal handler runs between any two
  bytecodes, inside a finalizer or interpreter shutdown too, where an exception it raised
  would print a traceback and be dropped. So the handler only records the stop, and
  :func:`check_stop` raises it at safe points (every collective, every scored batch); once
  the process is exiting, the handler ends it at once (:func:`os._exit`, after flushing).
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from jaxtyping import Num
from torch import Tensor

from ffinterp.device import resolve_device
from ffinterp.errors import FFInterpError

ENV_TIMEOUT = "FFINTERP_DIST_TIMEOUT"
# One round of work between two collectives is a batch or a search restart plus the
# minimisation and diagnosis of what it found: minutes at most. A dead peer is noticed at
# once (its sockets close); the timeout only bounds a rank that hangs.
DEFAULT_TIMEOUT_S = 600.0
RESUME_HINT = "the output so far is complete up to the last agreed step; rerun with --resume"

T = TypeVar("T")


class DistributedError(FFInterpError):
    """A distributed job cannot go on (a rank died, hung, or could not join); one line."""


class PeerError(FFInterpError):
    """An error rank 0 found and already printed; the other ranks exit 2 without repeating it."""

    silent = True


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size and its one device.

    ``world_size == 1`` (no torchrun) needs no process group: every collective returns its
    input as it would with a single rank.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def active(self) -> bool:
        """True when there is more than one rank (and so a process group)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that prints results and writes output files."""
        return self.rank == 0

    def __str__(self) -> str:
        if not self.active:
            return f"1 process on {self.device}"
        return f"rank {self.rank} of {self.world_size} ({self.backend}, {self.device})"

    # ------------------------------------------------------------ sharding

    def shard(self, stream: int | range) -> range:
        """This rank's share of ``stream`` (``n`` means ``range(n)``): items ``rank, rank + world, ...``.

        Strided, so every rank gets early items (a budget cut keeps the shares balanced) and
        the shares are disjoint and cover the stream exactly.
        """
        items = range(stream) if isinstance(stream, int) else stream
        return items[self.rank :: self.world_size]

    # ------------------------------------------------------------ collectives

    def all_reduce_sum(self, values: Num[Tensor, "*shape"] | Sequence[int | float]) -> Num[Tensor, "*shape"]:
        """The element-wise sum over ranks, on the CPU (counts as int64 stay exact)."""
        t = torch.as_tensor(values)
        t = (t.to(torch.int64) if not t.is_floating_point() else t.to(torch.float64)).cpu().clone()
        if not self.active:
            return t
        with self._guard("sum of counts"):
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM, group=_control_group())
        return t

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` (picklable), in rank order, on rank 0; ``None`` elsewhere."""
        if not self.active:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        with self._guard("gather to rank 0"):
            tdist.gather_object(obj, out, dst=0, group=_control_group())
        return out

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self._guard("all-gather"):
            tdist.all_gather_object(out, obj, group=_control_group())
        return out

    def broadcast(self, obj: T | None = None) -> T:
        """Rank 0's ``obj`` on every rank (the others pass nothing)."""
        if not self.active:
            return obj  # type: ignore[return-value]
        box = [obj if self.is_main else None]
        with self._guard("broadcast from rank 0"):
            tdist.broadcast_object_list(box, src=0, group=_control_group())
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank gets here (or fail with one line when one never does)."""
        if self.active:
            with self._guard("barrier"):
                tdist.barrier(group=_control_group())

    def agree(self, error: BaseException | None) -> None:
        """Make a rank-0 decision binding: rank 0 passes the error it hit (or None); when
        there is one, rank 0 re-raises it and the other ranks raise a silent :class:`PeerError`.

        Use it where only rank 0 checks something (the output folder), so no rank is left
        waiting in a collective that rank 0 will never join.
        """
        message = self.broadcast(None if error is None else str(error)) if self.active else None
        if error is not None:
            raise error
        if message is not None:
            raise PeerError(message)

    @contextmanager
    def _guard(self, what: str):
        check_stop()
        try:
            yield
        except (RuntimeError, tdist.DistError) as e:
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: lost contact with the other ranks during "
                f"{what} ({_first_line(e)}): a rank died or hung; {RESUME_HINT}"
            ) from None


# ---------------------------------------------------------------- process-wide state

_DIST: Dist | None = None
_CONTROL: Any = None  # the gloo group the collectives above use
_OWNED = False  # whether init() created the default process group (and so destroys it)
_STOP: str | None = None  # why SIGTERM stopped this rank, until check_stop() raises it
_EXITING = False  # set at exit: a SIGTERM from then on ends the process quietly


def _first_line(e: BaseException) -> str:
    """The useful part of a backend error: gloo prefixes a source path and appends advice."""
    lines = str(e).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h)(:\d+)?\]\s*", "", lines[0] if lines else type(e).__name__)
    return text.split(". This is typically")[0][:200]


def _control_group():
    return _CONTROL


def env_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise DistributedError(
            f"RANK={os.environ['RANK']!r}, WORLD_SIZE={os.environ['WORLD_SIZE']!r}: expected integers "
            "(as torchrun sets them)"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return rank, world, local


def rank_device(device: str | torch.device, local_rank: int, world_size: int) -> torch.device:
    """One device per rank: ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK`` (``auto`` falls
    back to the CPU without CUDA); an explicit index is refused when ranks would share it."""
    device = str(device)
    if device == "cpu":
        return torch.device("cpu")
    if device == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if device not in ("auto", "cuda") and not device.startswith("cuda:"):
        raise DistributedError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if not torch.cuda.is_available():
        raise DistributedError(f"--device {device}: CUDA is not available on this node")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if device.startswith("cuda:"):
        if local_world > 1:
            raise DistributedError(
                f"--device {device} with {local_world} ranks on this node: each rank takes its own GPU "
                "(cuda:LOCAL_RANK); pass --device cuda or auto"
            )
        return torch.device(device)
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise DistributedError(
            f"LOCAL_RANK {local_rank} but this node has {n} GPU(s): start at most {n} processes per node "
            "(--nproc-per-node) or pass --device cpu"
        )
    return torch.device("cuda", local_rank)


def timeout_s() -> float:
    """The collective timeout: ``$FFINTERP_DIST_TIMEOUT`` seconds, else 600."""
    raw = os.environ.get(ENV_TIMEOUT)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise DistributedError(f"{ENV_TIMEOUT}={raw!r}: expected a positive number of seconds")
    return value


def init(device: str | torch.device = "auto") -> Dist:
    """Join the torchrun job this process belongs to (if any) and return its :class:`Dist`.

    Idempotent. Outside torchrun (or with one process) it returns world size 1 on
    ``device`` (``auto``: CUDA if present) and creates no process group.
    """
    global _DIST, _CONTROL, _OWNED
    if _DIST is not None:
        return _DIST
    found = env_world()
    if found is None or found[1] == 1:
        local = found[2] if found else 0
        dev = rank_device(device, local, 1) if found and str(device) in ("auto", "cuda") else None
        _DIST = Dist(device=dev or resolve_device(device), timeout_s=timeout_s())
        return _DIST
    rank, world, local = found
    dev = rank_device(device, local, world)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    limit = timeout_s()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise DistributedError(
                    f"RANK and WORLD_SIZE are set but {var} is not: start with torchrun "
                    "(or set MASTER_ADDR and MASTER_PORT)"
                )
        try:
            tdist.init_process_group(backend, timeout=timedelta(seconds=limit), rank=rank, world_size=world)
        except (RuntimeError, ValueError, tdist.DistError) as e:
            raise DistributedError(
                f"rank {rank} of {world}: could not join the process group at "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({_first_line(e)})"
            ) from None
        _OWNED = True
        atexit.register(shutdown)
    # Our collectives move small Python objects and counts: a CPU (gloo) group carries them
    # with a real timeout, leaving NCCL to any tensor work the caller does on GPUs.
    if backend == "nccl":
        _CONTROL = tdist.new_group(backend="gloo", timeout=timedelta(seconds=limit))
    _DIST = Dist(rank, world, local, dev, backend, limit)
    _stop_cleanly_on_sigterm(_DIST)
    return _DIST


def current() -> Dist:
    """The :class:`Dist` of this process: from :func:`init`, from a process group the caller
    created, or world size 1."""
    global _DIST
    if _DIST is not None:
        return _DIST
    if tdist.is_available() and tdist.is_initialized():
        backend = str(tdist.get_backend())
        dev = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        local = int(os.environ.get("LOCAL_RANK", tdist.get_rank()))
        _DIST = Dist(tdist.get_rank(), tdist.get_world_size(), local, dev, backend, timeout_s())
        return _DIST
    return Dist()


def shutdown() -> None:
    """Leave the process group if :func:`init` created it (also run at exit)."""
    global _DIST, _CONTROL, _OWNED
    if _OWNED and tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group at exit has nothing left to say
            pass
    _DIST, _CONTROL, _OWNED = None, None, False


def check_stop() -> None:
    """Raise the stop a SIGTERM asked for (one :class:`DistributedError` line), if one did.

    Called where unwinding is safe: before every collective and after every scored batch.
    """
    if _STOP is not None:
        raise DistributedError(_STOP)


def _exiting() -> bool:
    """Whether the interpreter is shutting down: atexit hooks, finalizers, module teardown
    (the main thread counts as stopped once ``threading._shutdown`` has run)."""
    return _EXITING or sys.is_finalizing() or not threading.main_thread().is_alive()


def _mark_exiting() -> None:
    global _EXITING
    _EXITING = True


def _quiet_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream has nothing left to flush
            pass
    os._exit(code)


def _stop_cleanly_on_sigterm(d: Dist) -> None:
    """torchrun stops every rank with SIGTERM when one fails: say so in one line and unwind
    (writes are atomic, so what is on disk stays resumable).

    The handler never raises, since it may run inside a finalizer or at shutdown: it records the
    stop for :func:`check_stop`, or, when the process is already exiting (its one line, if
    any, printed), ends it with status 128 + SIGTERM.
    """
    message = (
        f"rank {d.rank} of {d.world_size}: stopped by SIGTERM (torchrun sends it to every rank when "
        f"one fails; or the job was cancelled); {RESUME_HINT}"
    )

    def handler(signum, frame):
        global _STOP
        if _exiting():
            _quiet_exit(128 + signum)
        if _STOP is None:  # torchrun may signal again while this rank is already unwinding
            _STOP = message

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave the default
        return
    atexit.register(_mark_exiting)  # runs before the hooks registered earlier (torch's finalizers)


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Dist",
    "DistributedError",
    "PeerError",
    "check_stop",
    "current",
    "env_world",
    "init",
    "rank_device",
    "shutdown",
]
