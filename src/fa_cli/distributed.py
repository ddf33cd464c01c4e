"""One run on several processes: ``torchrun --nproc_per_node=N -m fa_cli.train ...``.

Every rank builds the same model from the same seed, so its weights and feedback matrices are
identical from the start, and draws the same batch order. Each global batch of ``trainer.batch_size``
examples is split into contiguous shards, one per rank; DistributedDataParallel averages the weight
gradients, and the loss of a shard is weighted by its size, so that one step is the step a single
process takes on the whole batch (to floating-point rounding). Metrics are summed over the ranks, so
every rank sees the same validation accuracy and takes the same decisions (selection, early stop).

What DDP does not know about the learning rules is done here:

- feedback matrices are buffers, and DDP broadcasts rank 0's buffers before every forward. They are
  excluded: they are equal by construction, dfa creates them at the first forward (so the set of
  buffers would change under DDP's feet) and a broadcast would only cost bandwidth. Kolen-Pollack's
  ``B`` needs nothing more: its gradient is ``W``'s, averaged by DDP, or in its offset form it is
  rebuilt from ``W`` and a scale every rank trains alike (``fa_cli.alignment.train_feedback``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from fa_cli.alignment import AlignmentLayer
from fa_cli.config import ConfigError
from fa_cli.launcher import launched_by_torchrun


@dataclass(frozen=True)
class World:
    """The processes training one run together. ``World()`` is a single process, no process group."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the rank among this machine's processes: its GPU
    active: bool = False  # a process group is up: DDP, sharded batches, summed metrics

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files and prints (rank 0)."""
        return self.rank == 0

    @classmethod
    def current(cls) -> World:
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank()
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
            return cls(rank=rank, size=dist.get_world_size(), local_rank=local_rank, active=True)
        return cls()

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: under torchrun, ``cuda`` means this rank's GPU (``LOCAL_RANK``)."""
        if not self.active or device.type != "cuda":
            return device
        if device.index is not None and self.size > 1:
            raise ConfigError(
                "trainer.device",
                f"{device} under torchrun with {self.size} processes: use cuda (or auto), and each process "
                "takes the GPU of its LOCAL_RANK",
            )
        return device if device.index is not None else torch.device("cuda", self.local_rank)

    def shard(self, index: Tensor) -> Tensor:
        """This rank's contiguous part of a global batch (parts differ in size by at most one)."""
        return index if self.size == 1 else index.tensor_split(self.size)[self.rank]

    def span(self, length: int) -> tuple[int, int]:
        """This rank's contiguous part ``[start, end)`` of ``length`` examples (for evaluation)."""
        return length * self.rank // self.size, length * (self.rank + 1) // self.size

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the ranks, in place; unchanged in a single process."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def min_batch(self) -> int:
        """The smallest global batch that is trained: every rank gets at least two examples (BatchNorm
        cannot train on one, and an empty shard has no mean loss)."""
        return 2 * self.size

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. downloads a dataset), the others once it has finished."""
        if self.active and not self.main:
            dist.barrier()
        yield
        if self.active and self.main:
            dist.barrier()


SINGLE = World()


@contextlib.contextmanager
def process_group() -> Iterator[World]:
    """The world of this process: under torchrun, a process group joined for the block (gloo for CPU
    tensors, NCCL for CUDA ones) and left after it; else the single process. A group that is already
    up (set up by the caller) is used and left up."""
    if dist.is_initialized() or not launched_by_torchrun():
        yield World.current()
        return
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank < torch.cuda.device_count():  # more processes than GPUs is fine for CPU runs
            torch.cuda.set_device(local_rank)  # NCCL's communicator goes to this rank's GPU
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    try:
        yield World.current()
    finally:
        dist.destroy_process_group()


def leave(code: int | str | None) -> NoReturn:
    """End this torchrun process with ``code``, as ``sys.exit(code)`` would, once its process group is
    left and its files are written, but without the interpreter's shutdown.

    After DistributedDataParallel has been built on a gloo process group, the group's worker threads
    outlive ``destroy_process_group``. One that frees a finished collective's tensors while the
    interpreter shuts down needs the GIL, which is gone by then: the process aborts ("terminate called
    without an active exception", SIGABRT, in ``ProcessGroupGloo::AsyncWork``'s destructor), torchrun
    reports the run failed and stops the other ranks, rank 0 perhaps in the middle of its files. It
    happened at the end of 4 of 83 runs of tests/test_distributed.py (pytorch/pytorch#179291 describes
    the same crash). Nothing is left for the shutdown to do: files are closed and the trackers
    finished; logging and the standard streams are flushed here.
    """
    if isinstance(code, str):  # sys.exit("message") prints it and exits with 1
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def wrap(model: nn.Module, world: World) -> nn.Module:
    """``model`` in DistributedDataParallel, when there is a process group; else ``model`` itself.

    BatchNorm becomes SyncBatchNorm on CUDA (statistics over the global batch, as one process would
    compute them; it has no CPU kernel, so CPU runs keep per-rank statistics and rank 0's running
    averages, which DDP broadcasts).
    """
    if not world.active:
        return model
    device = next(model.parameters()).device
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    feedback = [
        f"{name}.{buffer}"
        for name, m in model.named_modules()
        if isinstance(m, AlignmentLayer)
        for buffer in ("feedback", "feedback_offset", "offset_scale")
    ]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, feedback)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (for evaluation and state dicts); ``model`` if not wrapped."""
    return model.module if isinstance(model, DistributedDataParallel) else model
