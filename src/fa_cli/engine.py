"""The training loop: ``fit`` yields one record per epoch, ``evaluate`` measures a split.

Knows nothing of Hydra or files. Per-batch losses and correct counts stay on the device and are read
once per progress refresh and once per epoch, so a GPU is never stalled waiting for the host.
Accuracies are percentages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from fa_cli.data import Data, Split, shift_images
from fa_cli.distributed import SINGLE, World, unwrap

#: Called with (epoch, step, steps, running loss, running accuracy) at most every REFRESH_SECONDS.
Progress = Callable[[int, int, int, float, float], None]
REFRESH_SECONDS = 0.5
#: About how many bytes of training inputs ``gathered`` fetches at once.
GATHER_BYTES = 8 << 20
#: At most how many steps' logits wait to have their correct answers counted.
COUNT_EVERY = 64
#: Called with (epoch, step, steps, inputs, targets) before each training step, ``step`` counting the
#: epoch's updates done so far (from 0): the diagnostics' way in. None, the default, costs nothing.
BatchHook = Callable[[int, int, int, torch.Tensor, torch.Tensor], None]


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None  # None without a validation split
    val_accuracy: float | None
    lr: float  # the learning rate this epoch trained with
    seconds: float


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel.

    A training step allocates and frees the same few-megabyte tensors every time (the gradients,
    the activations). By default glibc returns such blocks to
    the kernel once its adaptive thresholds allow (``munmap``, or trimming the heap's top), and the
    next step then takes a page fault for every 4 KiB it touches again (on the 4x1024 MLP up to 339
    faults per step with glibc's defaults, 0-102 with these: docs/PERFORMANCE.md, third round).
    Fixed thresholds keep blocks up to 32 MiB on the heap and the heap's top
    up to 512 MiB. Process-wide and only where glibc is the C library; True when it took effect.
    Changes no result, only where memory comes from.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 512 << 20))


class Diverged(Exception):
    """The training loss of ``step`` (counted from 1) of ``epoch`` was NaN, infinite, or above
    ``max_loss``; ``loss`` is that batch's loss. With ``split="validation"`` (or ``"test"``, which the
    runner records) and no ``step``: that split's loss after ``epoch`` was not finite, though every
    training batch's was."""

    def __init__(
        self,
        epoch: int,
        step: int | None,
        loss: float = math.nan,
        max_loss: float | None = None,
        split: str = "training",
    ) -> None:
        what = "is not finite" if not math.isfinite(loss) else f"exceeds max_loss={max_loss:g}"
        where = f"at epoch {epoch}, step {step}" if split == "training" else f"after epoch {epoch}"
        super().__init__(f"{split} loss {loss:.4g} {what} {where}")
        self.epoch, self.step, self.loss, self.split = epoch, step, loss, split


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    data: Data,
    *,
    epochs: int,
    batch_size: int,
    eval_batch_size: int,
    generator: torch.Generator,
    first_epoch: int = 1,
    progress: Progress | None = None,
    max_loss: float | None = None,
    label_smoothing: float = 0.0,
    random_shift: int = 0,
    on_batch: BatchHook | None = None,
    world: World = SINGLE,
) -> Iterator[EpochRecord]:
    """Train from ``first_epoch`` to ``epochs`` (inclusive), yielding after each epoch (after validation
    and the scheduler step), so the caller can checkpoint, select and stop early between epochs.
    ``generator`` draws each epoch's batch order (and shifts). Raises :class:`Diverged` when a batch's
    loss is not finite or is above ``max_loss``. Under torchrun, ``model`` is the DDP-wrapped model and
    ``world`` its ranks: each trains on its share of every batch (see :mod:`fa_cli.distributed`)."""
    for epoch in range(first_epoch, epochs + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_accuracy = train_epoch(
            model,
            optimizer,
            data.train,
            batch_size,
            generator,
            epoch=epoch,
            progress=progress,
            max_loss=max_loss,
            label_smoothing=label_smoothing,
            random_shift=random_shift,
            on_batch=on_batch,
            world=world,
        )
        val = evaluate(model, data.val, eval_batch_size, world) if data.val else (None, None)
        val_loss, val_accuracy = val
        if val_loss is not None and not math.isfinite(val_loss):
            # Finite training losses, then weights so large that the logits overflow: no model to keep.
            raise Diverged(epoch, None, val_loss, split="validation")
        scheduler.step()
        seconds = time.perf_counter() - start
        yield EpochRecord(epoch, train_loss, train_accuracy, val_loss, val_accuracy, lr, seconds)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    split: Split,
    batch_size: int,
    generator: torch.Generator,
    *,
    epoch: int = 1,
    progress: Progress | None = None,
    max_loss: float | None = None,
    label_smoothing: float = 0.0,
    random_shift: int = 0,
    on_batch: BatchHook | None = None,
    world: World = SINGLE,
) -> tuple[float, float]:
    """One pass over ``split`` in a random order; returns its mean loss (with ``label_smoothing``) and
    accuracy. ``random_shift`` > 0 moves each image by a random offset of up to that many pixels in
    each direction, a new one per epoch."""
    model.train()
    device = split.targets.device
    permutation = torch.randperm(len(split), generator=generator).to(device)
    batches = permutation.split(batch_size)
    # Drawn on the host for the whole epoch and moved once, as the order is: no per-step transfer.
    shifts = (
        torch.randint(-random_shift, random_shift + 1, (len(split), 2), generator=generator).to(device)
        if random_shift
        else None
    )
    if len(batches) > 1 and batches[-1].shape[0] < world.min_batch():
        batches = batches[:-1]  # BatchNorm cannot train on a single example (per rank under torchrun)
    if world.active:
        global_sizes = torch.tensor([index.shape[0] for index in batches], device=device)
        # Each rank takes its shard of every batch and weights its mean loss by the shard's share, so
        # that DDP's average of the ranks' gradients is the gradient of the whole batch's mean loss.
        weights = [world.shard(index).shape[0] * world.size / index.shape[0] for index in batches]
        batches = [world.shard(index) for index in batches]
    # Sizes and offsets as Python ints (a tensor's len() costs microseconds, per step), and the epoch's
    # examples in training order, once: each step's targets are a slice of their targets, and
    # ``gathered`` fetches the inputs of many steps at once from a slice of ``order``.
    lengths = [index.shape[0] for index in batches]
    ends = list(itertools.accumulate(lengths))
    sizes = torch.tensor(lengths, device=device)
    # (Under torchrun the shards are not one run of the permutation: they are concatenated.)
    order = torch.cat(list(batches)) if world.active else permutation[: ends[-1]]
    order_targets = split.targets.index_select(0, order)
    step_targets = order_targets.split(lengths)  # views, made in one call rather than one per step
    # Each batch's mean loss, kept on the device and stacked at each refresh (one op, instead of an
    # indexed store per step, which on a small model costs a tenth of its step). Correct answers are
    # counted for many steps at once from their logits (one max instead of three ops per step):
    # ``pending`` holds the logits not counted yet, ``counted`` how many examples were.
    step_losses: list[torch.Tensor] = []
    correct_counts: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    counted = 0
    last_refresh = time.monotonic()
    steps = zip(batches, gathered(split, order, lengths, GATHER_BYTES), strict=True)
    for step, (index, inputs) in enumerate(steps):
        targets = step_targets[step]
        if shifts is not None:
            inputs = shift_images(inputs, shifts.index_select(0, index), random_shift)
        if on_batch is not None:
            on_batch(epoch, step, len(batches), inputs, targets)
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        (loss * weights[step] if world.active else loss).backward()
        optimizer.step()
        step_losses.append(loss.detach())
        pending.append(logits.detach())
        last = step == len(batches) - 1
        refresh = last or (progress is not None and time.monotonic() - last_refresh >= REFRESH_SECONDS)
        if refresh or len(pending) == COUNT_EVERY:
            # max's indices are argmax's (the first of tied maxima; NaN counts as the largest), and on
            # the CPU max finds them faster over rows this short.
            answers = torch.cat(pending).max(dim=1).indices
            correct_counts.append((answers == order_targets[counted : ends[step]]).sum())
            pending, counted = [], ends[step]
        if refresh:
            losses, correct = torch.stack(step_losses), torch.stack(correct_counts).sum()
        if last and world.active:
            # The whole epoch's numbers, summed over the ranks: every rank stops (or goes on) alike.
            losses, correct = world.sum(losses * sizes) / global_sizes, world.sum(correct)
            sizes = global_sizes
        if refresh:
            done = slice(0, step + 1)
            # In float64: float32 losses near 1e32 are finite, but their float32 sum is not.
            loss_sum = (losses[done].double() * sizes[done]).sum().item()
            seen = sizes[done].sum().item()
            # A bound costs one more read from the device per refresh; NaN and inf show in the sum.
            # Under torchrun a run stops only on the summed numbers: one rank stopping alone would hang.
            checked = last or not world.active
            high = checked and max_loss is not None and losses[done].max().item() > max_loss
            if checked and (not math.isfinite(loss_sum) or high):
                bad = ~torch.isfinite(losses[done])
                if max_loss is not None:
                    bad |= losses[done] > max_loss
                bad_step = int(torch.nonzero(bad)[0])
                raise Diverged(epoch, bad_step + 1, losses[bad_step].item(), max_loss)
            accuracy = 100.0 * correct.item() / seen
            if progress is not None:
                progress(epoch, step + 1, len(batches), loss_sum / seen, accuracy)
            last_refresh = time.monotonic()
    return loss_sum / seen, accuracy


def gathered(
    split: Split, order: torch.Tensor, lengths: Sequence[int], chunk_bytes: int
) -> Iterator[torch.Tensor]:
    """The inputs of each batch of ``split``, in order: the batches are consecutive runs of ``lengths``
    rows of ``order`` (row indices).

    Rows are gathered for many batches at once, about ``chunk_bytes`` of inputs, into one buffer
    reused for every chunk: one ``index_select`` of a few thousand random rows costs far less than
    as many small ones between training steps, whose rows' pages then miss the TLB and caches the
    step has filled (docs/PERFORMANCE.md, third round). What is left is mostly this gather's reads of
    the inputs: 1.18-1.29x the time of the same gather over the rows in order (sixth round). The batches are
    views into the buffer, valid until the next chunk is gathered: a hook that keeps one past its
    step must clone it.
    """
    row_bytes = split.inputs[0].numel() * split.inputs.element_size()
    per_chunk = max(1, chunk_bytes // (row_bytes * max(lengths)))
    bounds = [0, *itertools.accumulate(lengths)]
    chunks = [(first, min(first + per_chunk, len(lengths))) for first in range(0, len(lengths), per_chunk)]
    widest = max(bounds[last] - bounds[first] for first, last in chunks)
    buffer = split.inputs.new_empty((widest, *split.inputs.shape[1:]))
    for first, last in chunks:
        index = order[bounds[first] : bounds[last]]
        inputs = torch.index_select(split.inputs, 0, index, out=buffer[: len(index)])
        yield from inputs.split(lengths[first:last])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    batch_size: int,
    world: World = SINGLE,
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` (in eval mode) on ``split``. Under torchrun each rank
    measures its share of ``split`` and every rank returns the sums over all of them."""
    model = unwrap(model)  # no DDP in evaluation: ranks' shares can take different numbers of batches
    model.eval()
    loss = torch.zeros((), device=split.targets.device)
    correct = torch.zeros((), device=split.targets.device, dtype=torch.long)
    begin, end = world.span(len(split))
    for start in range(begin, end, batch_size):
        stop = min(start + batch_size, end)
        inputs, targets = split.inputs[start:stop], split.targets[start:stop]
        logits = model(inputs)
        loss += F.cross_entropy(logits, targets, reduction="sum")
        correct += (logits.argmax(dim=1) == targets).sum()
    world.sum(loss)
    world.sum(correct)
    return loss.item() / len(split), 100.0 * correct.item() / len(split)
