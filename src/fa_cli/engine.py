"""The training loop: ``fit`` yields one record per epoch, ``evaluate`` measures a split.

Knows nothing of Hydra or files. Per-batch losses and correct counts stay on the device and are read
once per progress refresh and once per epoch, so a GPU is never stalled waiting for the host.
Accuracies are percentages.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
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


class Diverged(Exception):
    """The training loss of ``step`` (counted from 1) of ``epoch`` was NaN, infinite, or above
    ``max_loss``; ``loss`` is that batch's loss."""

    def __init__(self, epoch: int, step: int, loss: float = math.nan, max_loss: float | None = None) -> None:
        what = "is not finite" if not math.isfinite(loss) else f"exceeds max_loss={max_loss:g}"
        super().__init__(f"training loss {loss:.4g} {what} at epoch {epoch}, step {step}")
        self.epoch, self.step, self.loss = epoch, step, loss


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
    batches = torch.randperm(len(split), generator=generator).to(device).split(batch_size)
    # Drawn on the host for the whole epoch and moved once, as the order is: no per-step transfer.
    shifts = (
        torch.randint(-random_shift, random_shift + 1, (len(split), 2), generator=generator).to(device)
        if random_shift
        else None
    )
    if len(batches) > 1 and len(batches[-1]) < world.min_batch():
        batches = batches[:-1]  # BatchNorm cannot train on a single example (per rank under torchrun)
    global_sizes = torch.tensor([len(index) for index in batches], device=device)
    if world.active:
        # Each rank takes its shard of every batch and weights its mean loss by the shard's share, so
        # that DDP's average of the ranks' gradients is the gradient of the whole batch's mean loss.
        weights = [len(world.shard(index)) * world.size / len(index) for index in batches]
        batches = [world.shard(index) for index in batches]
    sizes = torch.tensor([len(index) for index in batches], device=device)
    # Each batch's mean loss and correct count, kept on the device; stacked at each refresh (one op,
    # instead of an indexed store per step, which on a small model costs a tenth of its step).
    step_losses: list[torch.Tensor] = []
    step_correct: list[torch.Tensor] = []
    # Batches are gathered into two reused buffers (no allocation per step). The model's graph of the
    # previous step is freed by then; a hook that keeps a batch past its step must clone it.
    widest = max(len(index) for index in batches)
    input_buffer = split.inputs.new_empty((widest, *split.inputs.shape[1:]))
    target_buffer = split.targets.new_empty(widest)
    last_refresh = time.monotonic()
    for step, index in enumerate(batches):
        inputs = torch.index_select(split.inputs, 0, index, out=input_buffer[: len(index)])
        targets = torch.index_select(split.targets, 0, index, out=target_buffer[: len(index)])
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
        step_correct.append((logits.argmax(dim=1) == targets).sum())
        last = step == len(batches) - 1
        refresh = last or (progress is not None and time.monotonic() - last_refresh >= REFRESH_SECONDS)
        if refresh:
            losses, correct = torch.stack(step_losses), torch.stack(step_correct)
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
            accuracy = 100.0 * correct[done].sum().item() / seen
            if progress is not None:
                progress(epoch, step + 1, len(batches), loss_sum / seen, accuracy)
            last_refresh = time.monotonic()
    return loss_sum / seen, accuracy


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
