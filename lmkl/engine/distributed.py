"""Several processes (``torchrun``, ``accelerate launch``) sharing one run, one process per device.

A launcher starts K copies of ``lmkl compare ...`` with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
(and ``MASTER_ADDR``/``MASTER_PORT``) in the environment. Every rank builds the same windows and
batches (deterministically), scores only the batches whose index ``i`` has ``i % K == rank``, and
writes them as parts named by ``i`` into the run directory. Rank 0 then merges the parts in batch
order, exactly as a single process would have written them, so the run directory does not depend
on K. On a shared filesystem the parts are simply there; otherwise rank 0 receives the missing
ones over ``torch.distributed`` (gloo), which also carries the barriers. Only small Python objects
travel (per-token tables are tens of bytes per token), so gloo is used even next to NCCL.

The ranks score in rounds (round ``r``: part ``r*K + rank`` on each rank) and agree after each
round whether to go on, so a graceful stop (Ctrl-C, SIGTERM) on any one rank stops every rank
after its current part, with those parts kept, instead of leaving the others waiting for it.
Rank 0 alone writes progress.json and holds the run directory's lock.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from lmkl.errors import LmklError, UsageError


@dataclass
class Shard:
    """This process's place in a multi-process run (rank 0 of 1 when launched alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _group: Any = field(default=None, repr=False)
    _owns_process_group: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def owns(self, index: int) -> bool:
        """Whether this rank scores batch ``index`` (round-robin: balanced and deterministic)."""
        return index % self.world_size == self.rank

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self._group)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0; ``None`` elsewhere."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self._group)
        return out

    def highest(self, flag: int) -> int:
        """The largest of every rank's ``flag`` on every rank (how a stop on one reaches all)."""
        if not self.distributed:
            return flag
        import torch
        import torch.distributed as dist

        value = torch.tensor([flag], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._group)
        return int(value.item())

    def on_main(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on rank 0 only and hand its result (or its error) to every rank."""
        if not self.distributed:
            return fn(*args, **kwargs)
        result: Any = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                # Tell the other ranks before raising, or they would wait for rank 0 forever.
                self.broadcast((None, _portable(exc)))
                raise
        result, error = self.broadcast((result, None))
        if error is not None:
            cls, message, hint = error
            clone = cls.__new__(cls)
            LmklError.__init__(clone, message, hint)
            clone.problems = []  # type: ignore[attr-defined]  # ConfigError's extra field
            raise clone
        return result

    def close(self) -> None:
        """Tear down the process group if this module created it."""
        if self._owns_process_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_process_group = False


def _portable(error: BaseException) -> tuple[type[LmklError], str, str | None]:
    """How the other ranks re-raise rank 0's error: class, message and hint (picklable)."""
    if not isinstance(error, LmklError):
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        return (
            LmklError,
            f"rank 0 failed: {type(error).__name__}: {first}",
            ("see rank 0's message"),
        )
    return type(error), error.message, error.hint


def env_world_size() -> int:
    """``WORLD_SIZE`` from a launcher's environment (1 when launched alone)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """Whether this process is rank 0 of its launch (or launched alone), from the environment."""
    return env_world_size() <= 1 or os.environ.get("RANK", "0") == "0"


def init_shard() -> Shard:
    """The :class:`Shard` for this process, joining the launcher's process group if there is one.

    Uses an existing default process group when the caller created one, else creates a gloo
    group from the ``env://`` variables that torchrun and accelerate set.
    """
    world = env_world_size()
    if world <= 1:
        return Shard()
    try:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as exc:
        raise UsageError(
            "WORLD_SIZE > 1 but RANK is missing or invalid in the environment",
            "start multi-process runs with torchrun or accelerate launch",
        ) from exc
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed", "run with one process")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", init_method="env://", rank=rank, world_size=world)
        owns = True
        group = None
    elif dist.get_backend() == "gloo":
        group = None
    else:
        # Object collectives on NCCL would need CUDA tensors; a gloo side group avoids that.
        group = dist.new_group(backend="gloo")
    return Shard(
        rank=rank, world_size=world, local_rank=local_rank, _group=group, _owns_process_group=owns
    )


def device_for_rank(device: str, shard: Shard) -> str:
    """One GPU per local rank: ``auto``/``cuda`` become ``cuda:LOCAL_RANK`` when CUDA is present."""
    if not shard.distributed or device not in ("auto", "cuda"):
        return device
    import torch

    if torch.cuda.is_available():
        return f"cuda:{shard.local_rank % torch.cuda.device_count()}"
    return device
