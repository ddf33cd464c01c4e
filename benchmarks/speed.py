#!/usr/bin/env python
"""How fast each learning rule trains, measured against backprop and against BioTorch.

Sections (``--sections``, all by default):

steps     median milliseconds per training step (forward, loss, backward, optimizer step) of the
          report's ANN and CNN, LeNet and a 4x1024 MLP on MNIST-shaped input, per rule, with
          examples/s and the ratio to bp. Rules are interleaved in a new random order every round,
          so machine noise hits all of them alike; the ratio is the median of per-round ratios.
          Each timed block follows ``--settle`` untimed steps of the same network (see settle).
settle    the MLP's step by its place after a switch from another network: the first steps run
          slower while the network's weights, gradients and optimizer state come back into the
          caches, which is why every timed block waits for the steady state.
epoch     whole epochs on real MNIST (60,000 images) through the runner's own data path
          (``fa_cli.data.load`` -> ``fa_cli.engine.train_epoch``), and the same steps on batches
          gathered beforehand ("math only"): the difference is the time spent outside the math.
biotorch  BioTorch's training path (its MNIST DataLoader and ``biotorch.training.functions.train``,
          the function its ``Trainer`` runs each epoch) on the same model, batch size, device and
          data, each epoch paired with one of ours; ``--bt-trainer`` also times its whole
          ``Trainer.run`` epoch (validation, checkpoints, TensorBoard).
sweep     MLPs of widths 256-4096 and depths 2-8 for bp, fa and dfa: how each rule's step grows.
overhead  the real ``fa-train`` run (Hydra, progress bar, metrics.csv, checkpoints) under the
          py-spy sampling profiler (from outside the process, without pausing it): the share of
          each epoch spent outside the model's math. The sampling still takes CPU time, so the same
          run is timed without the profiler too.

Every model is built the way ``fa-train`` builds it (``conf/`` composed by Hydra, ``fa_cli.models``,
``fa_cli.alignment.convert``, ``fa_cli.optim``): SGD, lr 0.01, momentum 0.9 unless overridden.

    python benchmarks/speed.py --quick                      # smoke test, about a minute
    python benchmarks/speed.py                              # everything (see docs/PERFORMANCE.md)
    python benchmarks/speed.py --sections steps --models cnn mlp --reps 60
    python benchmarks/speed.py --sections steps epoch --device cuda --epoch-models ann cnn

BioTorch (``biotorch``) and py-spy are benchmark-only dependencies; their sections are skipped
with a note when they are not installed. See docs/PERFORMANCE.md for the install line.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import gc
import importlib.util
import io
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from fa_cli import data, engine, models
from fa_cli.alignment import METHODS, AlignmentLayer, aes, convert, feedback
from fa_cli.config import DFAConfig, RunConfig, validate
from fa_cli.optim import build_optimizer, build_scheduler
from fa_cli.run import cpu_model, seed_everything

SECTIONS = ("steps", "settle", "limits", "parts", "epoch", "biotorch", "sweep", "overhead")
#: The models of the step table: ``conf/model`` options, plus overrides for the 4x1024 MLP.
MODELS: dict[str, list[str]] = {
    "ann": ["model=ann"],
    "cnn": ["model=cnn"],
    "lenet": ["model=lenet"],
    "mlp": ["model=mlp", "model.widths=[1024,1024,1024,1024]"],
}
#: Our rule names -> BioTorch's ``mode`` names, for the rules both libraries have.
BIOTORCH_MODES = {
    "bp": "backpropagation",
    "fa": "fa",
    "dfa": "dfa",
    "usf": "usf",
    "brsf": "brsf",
    "frsf": "frsf",
}
DEFAULT_DATA_ROOT = os.environ.get("FA_DATA_DIR", "/work/shared/data")

# Tables wider than the 80 columns rich assumes when the output is a file or a pipe.
console = Console() if sys.stdout.isatty() else Console(width=150)


# --- building models exactly as fa-train does ------------------------------------------------------


def runner_config(overrides: Sequence[str]) -> RunConfig:
    """The validated config ``fa-train <overrides>`` would run with."""
    with initialize_config_module(config_module="fa_cli.conf", version_base=None):
        return validate(compose(config_name="train", overrides=list(overrides)))


@dataclass
class Case:
    """One network trained by one rule: the model and the optimizer a step uses."""

    method: str
    model: nn.Module
    optimizer: torch.optim.Optimizer


def build_case(run: RunConfig, device: torch.device) -> Case:
    """Network, rule and optimizer as ``fa_cli.run.train`` builds them (same calls, same order)."""
    torch.manual_seed(run.seed)
    shape = data.shape_of(run.dataset)
    network = models.build(
        run.model, in_channels=shape.channels, image_size=shape.size, num_classes=shape.num_classes
    )
    projection = run.method.projection if isinstance(run.method, DFAConfig) else "full"
    model = convert(
        network,
        run.method.name,
        num_classes=shape.num_classes,
        seed=run.seed,
        scale=run.method.scale,
        dfa_projection=projection,
        init=run.method.init,
    )
    model.to(device).train()
    return Case(run.method.name, model, build_optimizer(run.optim, model))


def cases_for(
    model_overrides: Sequence[str], methods: Sequence[str], device: torch.device, extra: Sequence[str] = ()
) -> dict[str, Case]:
    return {m: build_case(runner_config([*model_overrides, f"method={m}", *extra]), device) for m in methods}


def train_step(case: Case, inputs: Tensor, targets: Tensor) -> Tensor:
    """One step, in the order of ``fa_cli.engine.train_epoch`` (without its bookkeeping)."""
    logits = case.model(inputs)
    loss = F.cross_entropy(logits, targets)
    case.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    case.optimizer.step()
    return loss


def train_steps(case: Case, inputs: Tensor, targets: Tensor, steps: int) -> None:
    for _ in range(steps):
        train_step(case, inputs, targets)


def warm_up(cases: dict[str, Case], inputs: Tensor, targets: Tensor, steps: int) -> None:
    """``steps`` steps of every case: allocator, oneDNN primitives, dfa's first feedback draw."""
    for case in cases.values():
        train_steps(case, inputs, targets, steps)


def noise_batch(args: argparse.Namespace, device: torch.device) -> tuple[Tensor, Tensor]:
    """One batch of MNIST-shaped, normalised noise and its labels: what the step tables train on."""
    inputs = torch.randn(args.batch_size, 1, 28, 28, device=device)
    targets = torch.randint(0, 10, (args.batch_size,), device=device)
    return inputs, targets


# --- timing -------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    # CUDA runs asynchronously: the clock may only be read once the queued work is done.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: The clock samples are read with: wall time, or (``--clock thread``) the CPU time of this thread.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}
clock = CLOCKS["wall"]


def minor_faults() -> int:
    """The process's minor page faults so far (0 where getrusage is not available)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start


def interleaved(
    runs: dict[str, Callable[[], Any]],
    rounds: int,
    device: torch.device,
    seed: int = 0,
    before: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each run, ``rounds`` times; every round visits the runs in a new random order, so
    that a burst of load from another process lands on a random run instead of always the same one.
    No run starts a round that it ended, so that (with two runs or more) every timing follows another
    run's: section settle times the steps right after such a switch. (Two runs simply alternate.)
    ``before[name]``, where given, runs untimed right before each timing of ``runs[name]``."""
    order = list(runs)
    shuffler = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        last = order[-1]
        shuffler.shuffle(order)
        if len(order) > 1 and order[0] == last:
            swap = shuffler.randrange(1, len(order))
            order[0], order[swap] = order[swap], order[0]
        for name in order:
            if before is not None:
                before[name]()
            samples[name].append(timed(runs[name], device))
    return samples


def block_steps(step_seconds: float, min_sample: float) -> int:
    """How many steps of ``step_seconds`` a timed block takes to last at least ``min_sample`` seconds."""
    return max(1, math.ceil(min_sample / step_seconds))


def settling(
    cases: dict[str, Case], inputs: Tensor, targets: Tensor, steps: int
) -> dict[str, Callable[[], Any]]:
    """For ``interleaved``'s ``before``: ``steps`` untimed training steps of the network about to be
    timed. A network's first steps after another's run slower while its weights, gradients and
    optimizer state come back into the caches (section settle); a training run never switches, so
    its steps are the steady ones."""
    return {m: (lambda c=case: train_steps(c, inputs, targets, steps)) for m, case in cases.items()}


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def paired_ratios(samples: dict[str, list[float]], reference: str) -> dict[str, tuple[float, float, float]]:
    """Per run, quartiles of (its time / the reference's time in the same round)."""
    base = samples[reference]
    return {
        name: quartiles([t / b for t, b in zip(values, base, strict=True)])
        for name, values in samples.items()
    }


def spread(values: Sequence[float]) -> str:
    """The interquartile range as a share of the median: how noisy the samples were."""
    q1, q2, q3 = quartiles(values)
    return f"±{50 * (q3 - q1) / q2:.0f}%" if q2 > 0 else "-"


# --- output -------------------------------------------------------------------------------------


@dataclass
class Report:
    """Tables printed with rich, or as Markdown (``--markdown``) to paste into docs/PERFORMANCE.md; with
    ``output``, every table and line is also appended to that file as Markdown, flushed as it is made,
    so a run cut short by a time limit still leaves what it measured."""

    markdown: bool
    output: io.TextIOBase | None = None

    def table(
        self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], note: str = ""
    ) -> None:
        text = markdown_table(title, columns, rows, note)
        self._save(text)
        if self.markdown:
            print(text, flush=True)
            return
        table = Table(title=title, title_justify="left", caption=note or None, caption_justify="left")
        for i, column in enumerate(columns):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)

    def line(self, text: str) -> None:
        self._save(text)
        if self.markdown:
            print(text, flush=True)
        else:
            console.print(text, highlight=False)

    def _save(self, text: str) -> None:
        if self.output is not None:
            self.output.write(text + "\n")
            self.output.flush()


def markdown_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], note: str = "") -> str:
    lines = [f"\n**{title}**\n", "| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if note:
        lines.append(f"\n{note}")
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return (
        f"{1e3 * seconds:.3f}"
        if seconds < 0.01
        else f"{1e3 * seconds:.2f}"
        if seconds < 1
        else f"{1e3 * seconds:.0f}"
    )


def ratio(q: tuple[float, float, float]) -> str:
    return f"{q[1]:.2f} ({q[0]:.2f}–{q[2]:.2f})"


# --- the machine ---------------------------------------------------------------------------------


def matmul_peak(device: torch.device) -> float:
    """GFLOP/s of a large float32 matmul on ``device``: the ceiling a training step can approach."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a.mm(b)
    best = min(timed(lambda: a.mm(b), device) for _ in range(20))
    return 2 * n**3 / best / 1e9


def machine(report: Report, device: torch.device) -> float:
    peak = matmul_peak(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    report.line(
        f"device {device} ({what}); {cores} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads; float32 matmul peak {peak:.0f} GFLOP/s; "
        f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    return peak


# --- steps ---------------------------------------------------------------------------------------


def section_steps(args: argparse.Namespace, report: Report, device: torch.device) -> None:
    inputs, targets = noise_batch(args, device)
    for name in args.models:
        cases = cases_for(MODELS[name], args.methods, device)
        warm_up(cases, inputs, targets, args.warmup)
        # A sample times a block of steps long enough (>= ~20 ms) for the clock and the scheduler's
        # jitter to be small next to it; all rules of a model use the same block.
        first = next(iter(cases.values()))
        estimate = min(timed(lambda c=first: train_step(c, inputs, targets), device) for _ in range(3))
        block = block_steps(estimate, args.min_sample)

        faults = dict.fromkeys(cases, 0)  # minor page faults taken by each rule's timed steps

        def run(case: Case, n: int = block, faults: dict[str, int] = faults) -> None:
            before = minor_faults()
            train_steps(case, inputs, targets, n)
            faults[case.method] += minor_faults() - before

        runs = {m: (lambda c=case: run(c)) for m, case in cases.items()}
        settle = settling(cases, inputs, targets, args.settle)
        samples = interleaved(runs, args.reps, device, seed=args.seed, before=settle)
        per_step = {m: [s / block for s in v] for m, v in samples.items()}
        ratios = paired_ratios(per_step, "bp") if "bp" in per_step else {}
        parameters = sum(p.numel() for p in first.model.parameters())
        rows = []
        for m, values in per_step.items():
            median = statistics.median(values)
            rows.append(
                [
                    m,
                    ms(median),
                    spread(values),
                    f"{args.batch_size / median:,.0f}",
                    ratio(ratios[m]) if ratios else "-",
                    f"{faults[m] / (args.reps * block):.0f}",
                ]
            )
        report.table(
            f"{name} ({parameters:,} parameters): one training step, batch {args.batch_size}, {device}",
            ["method", "ms/step", "spread", "examples/s", "× bp (IQR)", "page faults/step"],
            rows,
            note=f"median of {args.reps} interleaved rounds of {block} step(s), each after {args.settle} "
            "untimed one(s) of the same network; spread = IQR/2 of the median; page faults: the process's "
            "minor faults (getrusage) in the rule's timed steps, per step",
        )
        del cases
        gc.collect()


def section_settle(args: argparse.Namespace, report: Report, device: torch.device) -> None:
    """The MLP's steps timed one by one after a switch from another network: why ``--settle``."""
    inputs, targets = noise_batch(args, device)
    cases = cases_for(MODELS["mlp"], args.methods, device)
    warm_up(cases, inputs, targets, args.warmup)
    # times[m][i]: the (i+1)-th step of rule m after the previous rule's steps, one list per place.
    times: dict[str, list[list[float]]] = {m: [[] for _ in range(args.settle_steps)] for m in cases}

    def run(case: Case) -> None:
        for place in times[case.method]:
            place.append(timed(lambda: train_step(case, inputs, targets), device))

    interleaved({m: (lambda c=case: run(c)) for m, case in cases.items()}, args.reps, device, seed=args.seed)
    rows = []
    for m, places in times.items():
        medians = [statistics.median(place) for place in places]
        rows.append([m, *(ms(t) for t in medians), f"{medians[0] / medians[-1]:.2f}"])
    report.table(
        f"mlp: ms per step by its place after another network's steps, batch {args.batch_size}, {device}",
        ["method", *(f"step {i + 1}" for i in range(args.settle_steps)), "first / last"],
        rows,
        note=f"median of {args.reps} rounds; each round runs every rule's network for {args.settle_steps} "
        "steps in a new random order (never first the one that ended the round before), each step timed "
        "alone",
    )
    del cases
    gc.collect()


# --- what a rule adds to a step --------------------------------------------------------------------


#: profile_step wraps brsf's draw in a record_function of this name, so that whatever the draw calls
#: (on the CPU a numba kernel torch.profiler does not see, which gives the signs too) is counted as
#: random numbers.
BRSF_DRAW = "brsf: draw sign(W) |R|"
#: Profiler op names -> what they are in a training step (the rest is "other").
OP_KINDS = {
    "matmul / conv": (
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::mkldnn_convolution",
        "aten::convolution_backward",
        "aten::_convolution",
    ),
    "optimizer arithmetic": (
        "aten::add_",
        "aten::mul_",
        "aten::_foreach_add_",
        "aten::_foreach_mul_",
        "aten::_fused_sgd_",
        "aten::_fused_adam_",
    ),
    "copysign (sign-concordant B)": ("aten::copysign", "aten::copysign_"),
    "random numbers (brsf)": ("aten::uniform_", "aten::random_", "aten::randint", BRSF_DRAW),
    "copies": ("aten::copy_", "aten::clone"),
    "rule's Python (autograd.Function)": tuple(
        f"{name}{suffix}"
        for name in ("LinearFeedback", "LinearDirect", "ConvFeedback", "ConvDirect", "OutputError")
        for suffix in ("", "Backward")
    ),
}


def profile_step(case: Case, inputs: Tensor, targets: Tensor, steps: int) -> dict[str, float]:
    """Milliseconds per step in each kind of op: the self time torch.profiler records per op name."""
    from torch.profiler import ProfilerActivity, profile, record_function

    draw = feedback.redraw_feedback

    def labelled_draw(*args: Any) -> None:
        with record_function(BRSF_DRAW):
            draw(*args)

    feedback.redraw_feedback = labelled_draw
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_steps(case, inputs, targets, steps)
    finally:
        feedback.redraw_feedback = draw
    kinds = {name: kind for kind, names in OP_KINDS.items() for name in names}
    totals: dict[str, float] = {kind: 0.0 for kind in [*OP_KINDS, "other"]}
    for event in prof.key_averages():
        totals[kinds.get(event.key, "other")] += event.self_cpu_time_total / 1e3 / steps
    return totals


def section_limits(args: argparse.Namespace, report: Report, device: torch.device) -> None:
    """Where each rule's step on the 4x1024 MLP goes, by kind of op (torch.profiler self times), so the
    work a rule adds to backprop shows up column by column."""
    if device.type != "cpu":
        report.line("limits: CPU only (the profiler's CPU self times are what is compared)")
        return
    inputs, targets = noise_batch(args, device)
    cases = cases_for(MODELS["mlp"], args.methods, device)
    warm_up(cases, inputs, targets, args.warmup)
    # Rounds in a random order each, and the median per kind over rounds, as elsewhere.
    rounds: dict[str, list[dict[str, float]]] = {m: [] for m in cases}
    shuffler, order = random.Random(args.seed), list(cases)
    for _ in range(args.limit_rounds):
        shuffler.shuffle(order)
        for m in order:
            rounds[m].append(profile_step(cases[m], inputs, targets, args.limit_steps))
    kinds = [*OP_KINDS, "other"]
    rows = []
    for m, profiles in rounds.items():
        per_kind = {kind: statistics.median(p[kind] for p in profiles) for kind in kinds}
        total = statistics.median(sum(p.values()) for p in profiles)
        rows.append([m, f"{total:.2f}", *(f"{per_kind[kind]:.2f}" for kind in kinds)])
    # Two costs to read the table with: one pass over all weights, and the CPU generator's rate.
    weights = torch.cat([p.detach().flatten() for p in cases[next(iter(cases))].model.parameters()])
    copy = statistics.median(timed(lambda: weights.clone(), device) for _ in range(20))
    draws = torch.empty(1_000_000)
    rng = statistics.median(timed(lambda: draws.uniform_(), device) for _ in range(20))
    signs = torch.randn(1_000_000)
    brsf = statistics.median(timed(lambda: aes_shared(draws, signs, 1.0), device) for _ in range(20))
    report.table(
        f"Where a step of the 4x1024 MLP goes, by kind of op: ms per step (torch.profiler), {device}",
        ["method", "total", *kinds],
        rows,
        note=(
            f"median of {args.limit_rounds} profiled rounds of {args.limit_steps} steps; self CPU time per "
            f"op name. For scale: one copy of all {weights.numel() / 1e6:.2f}M weights takes "
            f"{1e3 * copy:.2f} ms; uniform_ on the CPU generator (mt19937) draws 1M floats in "
            f"{1e3 * rng:.2f} ms, brsf's AES 1M signed ones in {1e3 * brsf:.2f} ms (its draw, signs "
            "included, is the random-numbers column: brsf's copysign column is 0)."
        ),
    )
    del cases
    gc.collect()
    fa_memory(args, report, device, inputs, targets)


def fa_memory(
    args: argparse.Namespace, report: Report, device: torch.device, inputs: Tensor, targets: Tensor
) -> None:
    """fa's step against bp's, split: fa whose ``B`` is stored in ``W``'s own memory does bp's arithmetic
    through the rule's Functions, so what fa costs beyond it is reading a second matrix the size of
    ``W`` (usf, frsf and brsf read it too)."""
    runs = cases_for(MODELS["mlp"], ["bp", "fa"], device)
    shared = cases_for(MODELS["mlp"], ["fa"], device)["fa"]
    for layer in shared.model.modules():
        if isinstance(layer, AlignmentLayer) and layer.feedback is not None:
            layer._buffers["feedback"] = layer.weight.detach()  # the same storage: B is W
    runs["fa, B in W's memory"] = shared
    warm_up(runs, inputs, targets, args.warmup)
    bp = runs["bp"]
    block = block_steps(timed(lambda: train_step(bp, inputs, targets), device), args.min_sample)

    settle = settling(runs, inputs, targets, args.settle)
    samples = interleaved(
        {m: (lambda c=c: train_steps(c, inputs, targets, block)) for m, c in runs.items()},
        args.reps,
        device,
        args.seed,
        settle,
    )
    ratios = paired_ratios(samples, "bp")
    rows = [[m, ms(statistics.median(v) / block), ratio(ratios[m])] for m, v in samples.items()]
    report.table(
        f"fa's step on the 4x1024 MLP, with B in its own memory and in W's, {device}",
        ["method", "ms/step", "× bp (IQR)"],
        rows,
        note=f"median of {args.reps} interleaved rounds of {block} step(s), each after {args.settle} untimed",
    )
    runs.clear()
    gc.collect()


# --- the parts the second round changed, old way against new ---------------------------------------


def sfc64_draw(out: Tensor, bound: float) -> None:
    """U(0, bound) into ``out`` with numpy's SFC64, seeded from torch's generator: the faster generator
    the second round tried for brsf (see docs/PERFORMANCE.md); kept here so the comparison can be rerun."""
    import numpy as np

    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    np.random.Generator(np.random.SFC64(seed)).random(out=out.numpy(), dtype=np.float32)
    out.mul_(bound)


def threaded_draw(out: Tensor, bound: float, pool: ThreadPoolExecutor) -> None:
    """U(0, bound) into ``out`` in two halves at once, each from a generator seeded from torch's: the
    parallel brsf draw the fourth round tried (uniform_ releases the GIL); kept here so it can be rerun."""
    seeds = torch.randint(0, 2**62, (2,)).tolist()
    halves = out.view(-1).chunk(2)

    def draw(i: int) -> None:
        halves[i].uniform_(0.0, bound, generator=torch.Generator().manual_seed(seeds[i]))

    other = pool.submit(draw, 1)
    draw(0)
    other.result()


@functools.cache
def philox() -> ModuleType:
    """benchmarks/philox.py: brsf's generator before the seventeenth round (Philox4x32-10), for the
    parts pair that times it against AES."""
    spec = importlib.util.spec_from_file_location("philox", Path(__file__).with_name("philox.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # numba's cache finds the module of its compiled functions by name
    spec.loader.exec_module(module)
    return module


def philox_shared(out: Tensor, signs: Tensor, bound: float) -> None:
    """brsf's draw before the seventeenth round: Philox, shared over torch's OpenMP team."""
    generator = philox()
    generator.signed_uniform_(out, signs, bound, generator.draw_key())


def aes_alone(out: Tensor, signs: Tensor, bound: float) -> None:
    """brsf's AES draw on the calling thread alone."""
    key = aes.draw_key()
    keys, scale = aes.round_keys(key), aes.magnitude_scale(bound)
    aes.fill_range(out.numpy(), signs.numpy(), keys, scale, aes.HARDWARE, 0, 1)


def aes_shared(out: Tensor, signs: Tensor, bound: float) -> None:
    """brsf's AES draw as it is made now: shared over torch's OpenMP team, where there is one."""
    aes.signed_uniform_(out, signs, bound, aes.draw_key())


def section_parts(args: argparse.Namespace, report: Report, device: torch.device) -> None:
    """Each per-step cost the second round of fixes changed, and the alternatives the rounds tried
    (marked "tried, not adopted"), timed against the way kept on the 4x1024 MLP's tensors (and the
    ANN's batches), interleaved as elsewhere; and the engine's gather of an ANN epoch against its floor,
    the same gather of the rows in order. Small, isolated timings that stay readable on a loaded
    machine, where whole-step ratios move by several percent."""
    if device.type != "cpu":
        report.line("parts: CPU only (the changes it times are CPU costs)")
        return
    parameters = list(cases_for(MODELS["mlp"], ["bp"], device)["bp"].model.parameters())
    weights = [p for p in parameters if p.dim() > 1]  # first layer first
    magnitudes = [torch.rand_like(w) for w in weights]
    draws = torch.empty(1_000_000, device=device)
    signs = torch.randn(1_000_000, device=device)
    grads = [torch.randn_like(p) for p in parameters]

    def sgd(fused: bool | None) -> torch.optim.Optimizer:
        params = [p.detach().clone().requires_grad_(True) for p in parameters]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, fused=fused)

    loop, fused = sgd(None), sgd(True)
    # kp's B: trained by the optimizer (every layer's, with its momentum), or rebuilt from W and its
    # offset in each backward (all but the first layer's, whose B no error goes through).
    trained_feedback = [w.detach().clone() for w in weights]
    for b in trained_feedback:
        b.grad = torch.randn_like(b)
    feedback_step = torch.optim.SGD(trained_feedback, lr=0.01, momentum=0.9, fused=True)
    offsets, scale = [torch.randn_like(w) for w in weights[1:]], torch.tensor(0.9, device=device)
    rebuilt = [torch.empty_like(w) for w in weights[1:]]
    pool = ThreadPoolExecutor(1)
    hidden = weights[1]  # 1024 x 1024
    activations = torch.randn(args.batch_size, hidden.shape[1], device=device)
    images = torch.randn(60_000, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (60_000,), device=device)
    steps = 100
    # A new random batch each step, as in an epoch: the rows come from memory, not from the cache.
    indices = torch.randperm(60_000, device=device).split(args.batch_size)[:steps]
    logits, loss = torch.randn(args.batch_size, 10, device=device), torch.tensor(0.5, device=device)
    input_buffer = images.new_empty((args.batch_size, 1, 28, 28))
    label_buffer = labels.new_empty(args.batch_size)

    def store_indexed() -> None:  # the engine before: an indexed store per step
        losses = torch.zeros(steps, device=device)
        correct = torch.zeros(steps, device=device, dtype=torch.long)
        targets = labels[: args.batch_size]
        for step in range(steps):
            losses[step] = loss.detach()
            correct[step] = (logits.argmax(dim=1) == targets).sum()

    def store_listed() -> None:  # the engine now: appended, stacked once
        step_losses, step_correct = [], []
        targets = labels[: args.batch_size]
        for _ in range(steps):
            step_losses.append(loss.detach())
            step_correct.append((logits.argmax(dim=1) == targets).sum())
        torch.stack(step_losses), torch.stack(step_correct)

    def gather_new() -> None:
        for index in indices:
            images.index_select(0, index), labels.index_select(0, index)

    def gather_reused() -> None:
        for index in indices:
            torch.index_select(images, 0, index, out=input_buffer)
            torch.index_select(labels, 0, index, out=label_buffer)

    # An ANN epoch's inputs (54,000 training images) as the engine gathers them, and the floor: the
    # same call over the rows in order, so that the two differ only in where the rows lie.
    train_split = data.Split(images[:54_000], labels[:54_000])
    epoch_order = torch.randperm(len(train_split), device=device)
    in_order = torch.arange(len(train_split), device=device)
    epoch_lengths = [len(index) for index in epoch_order.split(args.batch_size)]

    def gather_epoch(order: Tensor) -> None:
        for _ in engine.gathered(train_split, order, epoch_lengths, engine.GATHER_BYTES):
            pass

    pairs: dict[str, tuple[str, Callable[[], Any], str, Callable[[], Any]]] = {
        "sign-concordant B of every layer / of all but the first (ms per step)": (
            "every layer",
            lambda: [torch.copysign(m, w.detach()) for m, w in zip(magnitudes, weights, strict=True)],
            "all but the first",
            lambda: [torch.copysign(m, w.detach()) for m, w in zip(magnitudes[1:], weights[1:], strict=True)],
        ),
        "brsf's matrix, 1M entries with W's signs (ms): torch's generator and copysign_, or AES": (
            "uniform_, copysign_",
            lambda: draws.uniform_(0.0, 0.1).copysign_(signs),
            "AES (kept)",
            lambda: aes_shared(draws, signs, 0.1),
        ),
        "brsf's matrix, 1M entries with W's signs on torch's threads (ms): Philox4x32-10, or AES-128": (
            "Philox (before)",
            lambda: philox_shared(draws, signs, 0.1),
            "AES (kept)",
            lambda: aes_shared(draws, signs, 0.1),
        ),
        "brsf's matrix, 1M entries after a 1024x1024 matmul (ms): AES on one thread, or on torch's": (
            "calling thread",
            lambda: (activations.mm(hidden.t()), aes_alone(draws, signs, 0.1)),
            "torch's OpenMP team (kept)",
            lambda: (activations.mm(hidden.t()), aes_shared(draws, signs, 0.1)),
        ),
        "brsf's magnitudes, 1M draws (ms): torch's generator, or numpy's SFC64 seeded from it and scaled": (
            "uniform_ (mt19937)",
            lambda: draws.uniform_(0.0, 0.1),
            "SFC64 (tried, not adopted)",
            lambda: sfc64_draw(draws, 0.1),
        ),
        "brsf's magnitudes, 1M draws after a 1024x1024 matmul as in a step (ms): one thread, or two": (
            "uniform_",
            lambda: (activations.mm(hidden.t()), draws.uniform_(0.0, 0.1)),
            "two halves on two threads (tried, not adopted)",
            lambda: (activations.mm(hidden.t()), threaded_draw(draws, 0.1, pool)),
        ),
        "the same without the matmul (ms)": (
            "uniform_",
            lambda: draws.uniform_(0.0, 0.1),
            "two halves on two threads",
            lambda: threaded_draw(draws, 0.1, pool),
        ),
        "kp's B each step (ms): SGD over every layer's B, or W + s (B_0 - W_0) for all but the first": (
            "optimizer over B",
            feedback_step.step,
            "rebuilt (kept)",
            lambda: [
                feedback.from_offset(w.detach(), d, scale, out=b)
                for b, w, d in zip(rebuilt, weights[1:], offsets, strict=True)
            ],
        ),
        "SGD step with momentum, all 3.96M parameters (ms)": (
            "for-loop",
            loop.step,
            "fused",
            fused.step,
        ),
        f"engine: loss and accuracy bookkeeping, {steps} steps (ms per step)": (
            "indexed store",
            store_indexed,
            "stacked at refresh",
            store_listed,
        ),
        f"engine: gather a batch of {args.batch_size} images and labels, {steps} steps (ms per step)": (
            "new tensors",
            gather_new,
            "reused buffers",
            gather_reused,
        ),
        "an ANN epoch's 54,000 inputs through engine.gathered (ms per epoch): rows in order, or in the "
        "epoch's random order": (
            "in order (the floor)",
            lambda: gather_epoch(in_order),
            "random order (as in training)",
            lambda: gather_epoch(epoch_order),
        ),
    }
    rounds = max(5, args.reps // 2)
    rows = []
    for what, (old_name, old, new_name, new) in pairs.items():
        per = steps if "steps" in what else 1
        for fn in (old, new):
            fn()
        samples = interleaved({"old": old, "new": new}, rounds, device, seed=args.seed)
        old_ms = 1e3 * statistics.median(samples["old"]) / per
        new_ms = 1e3 * statistics.median(samples["new"]) / per
        q = paired_ratios(samples, "old")["new"]
        rows.append([what, f"{old_name}: {old_ms:.3f}", f"{new_name}: {new_ms:.3f}", ratio(q)])
    pool.shutdown()  # its thread would otherwise idle through every later section
    report.table(
        f"What the rounds changed or tried, old against new (and the ANN gather against its floor), {device}",
        ["part", "old", "new", "new / old (IQR)"],
        rows,
        note=f"median of {rounds} interleaved rounds each; ratios are medians of per-round ratios.",
    )
    gc.collect()


# --- epochs on real MNIST ------------------------------------------------------------------------


def mnist(args: argparse.Namespace, device: torch.device, val: bool = False) -> data.Data:
    """MNIST through the runner's data module: all 60,000 training images (no validation split is
    held out, as BioTorch trains on all of them), normalised, on ``device``."""
    overrides = [f"dataset.root={args.data_root}", "dataset.val_fraction=0"]
    if args.subset:
        overrides.append(f"dataset.subset={args.subset}")
    run = runner_config(overrides)
    loaded = data.load(run.dataset, device, run.seed)
    if val:  # BioTorch's Trainer validates on the 10,000 test images every epoch; so do we, then
        loaded.val = loaded.test
    return loaded


def runner_epoch(case: Case, split: data.Split, batch_size: int, seed: int) -> None:
    engine.train_epoch(case.model, case.optimizer, split, batch_size, torch.Generator().manual_seed(seed))


def math_only_epoch(case: Case, batches: list[tuple[Tensor, Tensor]]) -> None:
    for inputs, targets in batches:
        train_step(case, inputs, targets)


def gathered(split: data.Split, batch_size: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """The batches ``engine.train_epoch`` draws with this seed, gathered in advance."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed)).to(split.targets.device)
    batches = order.split(batch_size)
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches = batches[:-1]
    return [(split.inputs[i], split.targets[i]) for i in batches]


def section_epoch(args: argparse.Namespace, report: Report, device: torch.device) -> None:
    start = time.perf_counter()
    splits = mnist(args, device)
    loading = time.perf_counter() - start
    n = len(splits.train)
    batches = gathered(splits.train, args.batch_size, args.seed)
    for name in args.epoch_models:
        cases = cases_for(MODELS[name], args.methods, device)
        for case in cases.values():  # warm-up on a few batches
            math_only_epoch(case, batches[: args.warmup])
        runs: dict[str, Callable[[], Any]] = {}
        for m, case in cases.items():
            runs[m] = lambda c=case: runner_epoch(c, splits.train, args.batch_size, args.seed)
            runs[f"{m} math"] = lambda c=case: math_only_epoch(c, batches)
        samples = interleaved(runs, args.epoch_reps, device, seed=args.seed)
        ratios = paired_ratios(samples, "bp") if "bp" in cases else {}
        rows = []
        for m in cases:
            epoch, math_only = statistics.median(samples[m]), statistics.median(samples[f"{m} math"])
            rows.append(
                [
                    m,
                    f"{epoch:.3f}",
                    spread(samples[m]),
                    f"{n / epoch:,.0f}",
                    ratio(ratios[m]) if ratios else "-",
                    f"{math_only:.3f}",
                    f"{100 * (1 - math_only / epoch):.1f}%",
                ]
            )
        report.table(
            f"{name}: one epoch of MNIST ({n:,} images), batch {args.batch_size}, {device}",
            ["method", "s/epoch", "spread", "examples/s", "× bp (IQR)", "math only s", "outside math"],
            rows,
            note=(
                f"median of {args.epoch_reps} interleaved epochs through fa_cli.engine.train_epoch (batch "
                "gather from in-memory tensors, per-step loss/accuracy bookkeeping); 'math only' runs the "
                "same steps on batches gathered beforehand. Loading MNIST (fa_cli.data.load): "
                f"{loading:.2f} s, once per run."
            ),
        )
        del cases
        gc.collect()


# --- BioTorch ------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """BioTorch prints on every conversion and progress line; keep the tables readable."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        # Its dfa layers use Module.register_backward_hook, deprecated in torch 2 (it still works:
        # the hook does replace the input gradient, checked on torch 2.14).
        warnings.simplefilter("ignore", FutureWarning)
        yield


@dataclass
class BioTorchCase:
    mode: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_function: nn.Module
    extra: dict[str, Any] = field(default_factory=dict)


def biotorch_case(run: RunConfig, mode: str, device: torch.device) -> BioTorchCase:
    """The same network (built by fa_cli.models, same seed) converted by BioTorch's ``BioModule``, with
    the optimizer and loss its benchmark configs create."""
    from biotorch.benchmark.losses import select_loss_function
    from biotorch.benchmark.optimizers import create_optimizer
    from biotorch.module.biomodule import BioModule

    torch.manual_seed(run.seed)
    shape = data.shape_of(run.dataset)
    network = models.build(
        run.model, in_channels=shape.channels, image_size=shape.size, num_classes=shape.num_classes
    )
    with quiet():
        model = BioModule(network, mode=mode, output_dim=shape.num_classes).to(device)
    optimizer = create_optimizer(
        {"type": "SGD", "lr": run.optim.lr, "momentum": run.optim.momentum, "weight_decay": 0.0}, model
    )
    return BioTorchCase(mode, model, optimizer, select_loss_function({"name": "cross_entropy"}))


def biotorch_loaders(args: argparse.Namespace) -> tuple[Any, Any]:
    """BioTorch's MNIST (PIL images through Resize, ToTensor, Normalize) and the DataLoaders its
    benchmark creates: batch ``--batch-size``, shuffled, ``num_workers=0`` as in its configs."""
    from biotorch.datasets.mnist import MNIST

    with quiet():
        dataset = MNIST(target_size=28, dataset_path=args.data_root)
    if args.subset:
        dataset.train_dataset = torch.utils.data.Subset(dataset.train_dataset, range(args.subset))
    train_loader = dataset.create_train_dataloader(args.batch_size, num_workers=args.bt_workers)
    val_loader = dataset.create_val_dataloader(args.batch_size, num_workers=args.bt_workers)
    return train_loader, val_loader


def biotorch_train_epoch(case: BioTorchCase, loader: Any, device: torch.device) -> None:
    from biotorch.training.functions import train

    with quiet():
        train(
            model=case.model,
            mode=case.mode,
            loss_function=case.loss_function,
            optimizer=case.optimizer,
            train_dataloader=loader,
            device=str(device),
            epoch=0,
            multi_gpu=False,
            top_k=5,
            display_iterations=500,
        )


def biotorch_trainer_epoch(case: BioTorchCase, loaders: tuple[Any, Any], device: torch.device) -> None:
    from biotorch.training.trainer import Trainer

    # The schedule of BioTorch's MNIST configs. Its create_lr_scheduler passes verbose=True, which
    # torch 2.14's MultiStepLR no longer accepts: build the same schedule without it (the only shim).
    scheduler = torch.optim.lr_scheduler.MultiStepLR(case.optimizer, milestones=[100, 150, 200], gamma=0.1)
    with tempfile.TemporaryDirectory() as output_dir, quiet():
        trainer = Trainer(
            model=case.model,
            mode=case.mode,
            loss_function=case.loss_function,
            optimizer=case.optimizer,
            lr_scheduler=scheduler,
            train_dataloader=loaders[0],
            val_dataloader=loaders[1],
            device=str(device),
            epochs=1,
            output_dir=output_dir,
            metrics_config={
                "display_iterations": 500,
                "layer_alignment": True,
                "weight_ratio": True,
                "top_k": 5,
            },
        )
        trainer.run()
        # Its TensorBoard writer is never closed; close it (flushing its events) before the folder goes.
        trainer.writer.close()


def our_fit_epoch(case: Case, run: RunConfig, splits: data.Data, batch_size: int) -> None:
    """One epoch of ``fa_cli.engine.fit``: training, validation on the 10,000 test images, schedule."""
    scheduler = build_scheduler(run.optim, case.optimizer, 1)
    for _ in engine.fit(
        case.model,
        case.optimizer,
        scheduler,
        splits,
        epochs=1,
        batch_size=batch_size,
        eval_batch_size=run.trainer.eval_batch_size,
        generator=torch.Generator().manual_seed(0),
    ):
        pass


def section_biotorch(args: argparse.Namespace, report: Report, device: torch.device) -> None:
    try:
        import biotorch  # noqa: F401
    except ImportError:
        report.line("biotorch: not installed, section skipped (see docs/PERFORMANCE.md for the install line)")
        return
    splits = mnist(args, device, val=True)
    loaders = biotorch_loaders(args)
    methods = [m for m in args.methods if m in BIOTORCH_MODES]
    for name in args.bt_models:
        run = runner_config(MODELS[name])
        ours = cases_for(MODELS[name], methods, device)
        theirs = {m: biotorch_case(run, BIOTORCH_MODES[m], device) for m in methods}
        batches = gathered(splits.train, args.batch_size, args.seed)
        for m in methods:  # warm-up both on a few batches
            math_only_epoch(ours[m], batches[: args.warmup])
        # Pairs, interleaved: each of their epochs runs right after one of ours, in a random order of
        # rules per round, so the ratio compares the two under the same load.
        runs: dict[str, Callable[[], Any]] = {}
        for m in methods:
            runs[f"{m} ours"] = lambda c=ours[m]: runner_epoch(c, splits.train, args.batch_size, args.seed)
            runs[f"{m} theirs"] = lambda c=theirs[m]: biotorch_train_epoch(c, loaders[0], device)
            if args.bt_trainer:
                runs[f"{m} ours fit"] = lambda c=ours[m], r=run: our_fit_epoch(c, r, splits, args.batch_size)
                runs[f"{m} theirs trainer"] = lambda c=theirs[m]: biotorch_trainer_epoch(c, loaders, device)
        samples = interleaved(runs, args.bt_reps, device, seed=args.seed)
        rows = []
        for m in methods:
            row = [m, BIOTORCH_MODES[m]]
            for key in ("", " fit") if args.bt_trainer else ("",):
                mine = samples[f"{m} ours{key}"]
                other = samples[f"{m} theirs{' trainer' if key else ''}"]
                speedup = quartiles([o / s for s, o in zip(mine, other, strict=True)])
                row += [
                    f"{statistics.median(mine):.2f}",
                    f"{statistics.median(other):.2f}",
                    f"{speedup[1]:.1f}×",
                ]
            rows.append(row)
        columns = ["method", "BioTorch mode", "ours s", "BioTorch s", "speed-up"]
        if args.bt_trainer:
            columns += ["ours fit s", "BioTorch Trainer s", "speed-up"]
        n = len(splits.train)
        report.table(
            f"{name}: one MNIST epoch ({n:,} images), batch {args.batch_size}, {device}: fa-cli vs BioTorch",
            columns,
            rows,
            note=(
                f"median of {args.bt_reps} paired epoch(s). ours: fa_cli.engine.train_epoch on fa_cli.data "
                "tensors; BioTorch: biotorch.training.functions.train over its MNIST DataLoader "
                f"(num_workers={args.bt_workers}). speed-up = BioTorch s / ours s, median of the pairs."
                + (
                    " 'fit'/'Trainer': one whole epoch of fa_cli.engine.fit (train + validation on the "
                    "10,000 test images) against BioTorch's Trainer.run(epochs=1) (train + the same "
                    "validation + alignment metrics, TensorBoard, two torch.save)."
                    if args.bt_trainer
                    else ""
                )
            ),
        )


# --- width and depth sweep ------------------------------------------------------------------------


def mlp_flops(widths: Sequence[int], batch: int, method: str, inputs: int = 784, classes: int = 10) -> float:
    """Floating-point operations of one step's matmuls: forward, weight gradients, and the error sent
    down (through W or B for bp/fa, except to the input; one K-wide projection for dfa)."""
    sizes = [inputs, *widths, classes]
    layers = list(zip(sizes[:-1], sizes[1:], strict=True))
    forward = sum(2 * batch * i * o for i, o in layers)
    if method == "dfa":
        down = sum(2 * batch * classes * i for i, _ in layers[1:])
    else:
        down = sum(2 * batch * i * o for i, o in layers[1:])
    return 2 * forward + down


def section_sweep(args: argparse.Namespace, report: Report, device: torch.device, peak: float) -> None:
    inputs, targets = noise_batch(args, device)
    methods = [m for m in args.sweep_methods if m in METHODS]
    rows = []
    for width in args.widths:
        for depth in args.depths:
            widths = [width] * depth
            overrides = ["model=mlp", f"model.widths=[{','.join(map(str, widths))}]"]
            cases = cases_for(overrides, methods, device)
            warm_up(cases, inputs, targets, 2)
            step = timed(lambda c=cases[methods[0]]: train_step(c, inputs, targets), device)
            # Big networks get fewer rounds (at least 3) so the sweep stays within minutes.
            rounds = max(3, min(args.sweep_reps, int(args.sweep_budget / (step * len(methods)))))
            block = block_steps(step, args.min_sample)

            settle = settling(cases, inputs, targets, args.settle)
            runs = {m: (lambda c=c, n=block: train_steps(c, inputs, targets, n)) for m, c in cases.items()}
            samples = interleaved(runs, rounds, device, args.seed, settle)
            per_step = {m: [s / block for s in v] for m, v in samples.items()}
            ratios = paired_ratios(per_step, "bp") if "bp" in per_step else {}
            parameters = sum(p.numel() for p in cases[methods[0]].model.parameters())
            row = [f"{width}×{depth}", f"{parameters / 1e6:.2f}M"]
            for m in methods:
                median = statistics.median(per_step[m])
                gflops = mlp_flops(widths, args.batch_size, m) / median / 1e9
                row.append(ms(median) + (f" ({ratios[m][1]:.2f}×)" if ratios and m != "bp" else ""))
                if m == "bp":
                    row.append(f"{gflops:.0f} ({100 * gflops / peak:.0f}%)")
            rows.append(row)
            del cases
            gc.collect()
    columns = ["width×depth", "params"]
    for m in methods:
        columns.append(f"{m} ms" + (" (× bp)" if m != "bp" else ""))
        if m == "bp":
            columns.append("bp GFLOP/s (% of matmul peak)")
    report.table(
        f"MLP sweep: step time by width and depth (hidden layers), batch {args.batch_size}, {device}",
        columns,
        rows,
        note=(
            f"median of interleaved rounds (3 to {args.sweep_reps}, fewer for big networks), each block "
            f"after {args.settle} untimed step(s); ratios are medians of per-round ratios. GFLOP/s counts "
            "the step's matmuls only."
        ),
    )


# --- overhead: the real fa-train under a sampling profiler ---------------------------------------

#: Frames that are the model's math: module calls, the loss, backward, the optimizer. (file, function
#: names as py-spy prints them, None for any function of the file)
MATH_FRAMES = (
    ("torch/nn/modules/module.py", ("Module._wrapped_call_impl", "Module._call_impl")),
    ("torch/nn/functional.py", ("cross_entropy",)),
    ("torch/_tensor.py", ("Tensor.backward",)),
    ("torch/autograd/__init__.py", ("backward",)),
    ("torch/optim/optimizer.py", None),
    # Optimizer.zero_grad runs inside torch._disable_dynamo's wrapper.
    ("torch/_compile.py", None),
    ("torch/optim/sgd.py", None),
    ("torch/optim/adam.py", None),
    ("torch/optim/adamw.py", None),
)
#: What fa_cli.run does once per epoch besides engine.fit (metrics.csv, model selection, checkpoint,
#: log line, early stopping): the names of the methods its epoch loop (Run.fit) calls.
PER_EPOCH = ("end_epoch", "patience_ran_out")


def frame_parts(frame: str) -> tuple[str, str]:
    """``"Module._call_impl (torch/nn/modules/module.py:1794)"`` -> (function, file)."""
    function, _, where = frame.rpartition(" (")
    return function, where.rsplit(":", 1)[0]


def is_math(function: str, path: str) -> bool:
    return any(path.endswith(file) and (names is None or function in names) for file, names in MATH_FRAMES)


def is_engine_fit(function: str, path: str) -> bool:
    return function == "fit" and path.endswith("fa_cli/engine.py")


def epoch_loop(stacks: list[list[tuple[str, str]]]) -> tuple[str, str] | None:
    """The frame whose code runs ``for record in engine.fit(...)``: engine.fit's caller."""
    for parts in stacks:
        for caller, frame in zip(parts, parts[1:], strict=False):
            if is_engine_fit(*frame):
                return caller
    return None


def epoch_part(parts: list[tuple[str, str]], loop: tuple[str, str]) -> str | None:
    """Which part of an epoch one sampled stack (outermost frame first) is in, or None outside the epochs
    (Hydra, model, data load, final test, plots: once per run)."""
    fit = next((i for i, frame in enumerate(parts) if is_engine_fit(*frame)), None)
    if fit is None:  # in the epoch loop, the per-epoch work is in its PER_EPOCH calls
        at = parts.index(loop) if loop in parts else None
        called = parts[at + 1][0].rsplit(".", 1)[-1] if at is not None and at + 1 < len(parts) else None
        return "metrics.csv, checkpoint, log (run.py)" if called in PER_EPOCH else None
    label = "batches, metrics, epoch loop (engine)"
    for function, path in parts[fit + 1 :]:
        if is_math(function, path):
            return "math"
        if function == "ProgressBar.update":
            label = "progress bar"
        elif function == "gathered" and path.endswith("fa_cli/engine.py"):
            label = "batch gather (engine.gathered)"
        elif function == "evaluate" and path.endswith("fa_cli/engine.py"):
            label = "validation (outside the model call)"
    return label


def mean_epoch_seconds(run_dir: Path) -> float:
    """The mean epoch time (train + validation) a fa-train run wrote to its metrics.csv."""
    with open(run_dir / "metrics.csv", encoding="utf-8") as metrics:
        return statistics.mean(float(row["seconds"]) for row in csv.DictReader(metrics))


def last_line(done: subprocess.CompletedProcess[str]) -> str:
    """What a failed command said last on stderr: fa-train's one-line error, or py-spy's."""
    return (done.stderr.strip().splitlines() or ["no output"])[-1]


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")  # installed into this environment
    return str(beside) if beside.exists() else shutil.which("py-spy")


def section_overhead(args: argparse.Namespace, report: Report, device: torch.device) -> None:
    spy = py_spy()
    if spy is None:
        report.line("overhead: py-spy is not installed, section skipped (pip install py-spy)")
        return
    for name in args.overhead_models:
        overrides = [
            *MODELS[name],
            f"dataset.root={args.data_root}",
            f"trainer.epochs={args.overhead_epochs}",
            f"trainer.batch_size={args.batch_size}",
            f"trainer.device={device}",
            *([f"dataset.subset={args.subset}"] if args.subset else []),
        ]
        with tempfile.TemporaryDirectory() as run_dir:
            # The same run without the profiler first: py-spy does not pause the run, but its sampling
            # takes CPU time from it, which on a machine of few cores slows the epochs measurably.
            train = [sys.executable, "-m", "fa_cli.train", *overrides]
            done = subprocess.run(
                [*train, f"hydra.run.dir={run_dir}/plain"], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                why = last_line(done)
                report.line(f"overhead: fa-train failed without the profiler ({why}); section skipped")
                return
            plain_seconds = mean_epoch_seconds(Path(run_dir) / "plain")
            samples = Path(run_dir) / "samples.txt"
            command = [spy, "record", "--nonblocking", "--rate", str(args.overhead_rate), "--format", "raw"]
            command += ["--output", str(samples), "--", *train, f"hydra.run.dir={run_dir}/run"]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0 or not samples.exists():
                why = last_line(done)
                report.line(f"overhead: py-spy could not profile fa-train ({why}); section skipped")
                return
            counted = []
            for line in samples.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if not count.isdigit():  # a blank line
                    continue
                counted.append(([frame_parts(frame) for frame in stack.split(";")], int(count)))
            # The run's own clock for its epochs (train + validation), to turn sample shares into ms:
            # py-spy does not keep its nominal rate exactly when it does not pause the process.
            epoch_seconds = mean_epoch_seconds(Path(run_dir) / "run")
        total = sum(count for _, count in counted)
        loop = epoch_loop([parts for parts, _ in counted])
        buckets: dict[str, int] = {}
        for parts, count in counted:
            if loop is not None and (part := epoch_part(parts, loop)) is not None:
                buckets[part] = buckets.get(part, 0) + count
        epoch_total = sum(buckets.values())
        if not epoch_total:
            report.line(f"overhead: no engine.fit frames in the profile of {name}; has fa_cli.run changed?")
            continue
        per_epoch_ms = 1e3 * epoch_seconds / epoch_total  # a part's samples -> its ms per epoch
        outside = epoch_total - buckets.get("math", 0)
        rows = [
            [label, f"{count * per_epoch_ms:.1f}", f"{100 * count / epoch_total:.1f}%"]
            for label, count in sorted(buckets.items(), key=lambda kv: (kv[0] != "math", -kv[1]))
        ]
        rows.append(
            [
                "outside the model's math, total",
                f"{outside * per_epoch_ms:.1f}",
                f"{100 * outside / epoch_total:.1f}%",
            ]
        )
        report.table(
            f"{name}: where an epoch of the real fa-train run goes ({device}, py-spy)",
            ["part of the epoch", "ms/epoch", "share"],
            rows,
            note=(
                f"fa-train {' '.join(overrides)}, sampled from outside the process by py-spy "
                f"({args.overhead_rate} Hz, every Python thread, idle time left out; only the epoch "
                f"loop's stacks are counted); {args.overhead_epochs} "
                f"epoch(s), averaged ({1e3 * epoch_seconds:.0f} ms an epoch by the run's metrics.csv; "
                f"{1e3 * plain_seconds:.0f} ms in the same run without the profiler, just before); "
                f"{epoch_total:,} of {total:,} samples fell in the epochs. math = "
                "samples inside the model call, cross_entropy, backward and the optimizer's step/zero_grad "
                "(training and validation); every other sample in engine.fit, and in run.py's per-epoch "
                "work, is outside. The rest of the run (Hydra, model, data load, final test, plots) is "
                "once per run and not counted."
                + (
                    " On a GPU the host waits for the queued kernels where the engine reads the loss "
                    "(.item()), so GPU time shows up there as 'outside': read the epoch table's "
                    "'outside math' column instead."
                    if device.type == "cuda"
                    else ""
                )
            ),
        )


# --- command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run in this order"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default cpu; cuda with --gpu)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc thresholds at their defaults (fa-train fixes them: "
        "fa_cli.engine.keep_freed_memory)",
    )
    p.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="thread: count only the CPU time of the main thread, not the time other processes hold the "
        "cores (a loaded machine); needs --threads 1, where torch computes on the calling thread",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--reps", type=int, default=40, help="interleaved rounds per model in 'steps'")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps per model and rule")
    p.add_argument(
        "--settle",
        type=int,
        default=4,
        help="untimed steps of a network right before each of its timed blocks (steps, sweep, and the fa "
        "split in limits): its first steps after another network's run slower (section settle); 0 times "
        "them too",
    )
    p.add_argument("--settle-steps", type=int, default=8, help="steps timed one by one in 'settle'")
    p.add_argument("--min-sample", type=float, default=0.02, help="seconds a timed block lasts at least")
    p.add_argument("--limit-rounds", type=int, default=5, help="profiled rounds per rule in 'limits'")
    p.add_argument("--limit-steps", type=int, default=10, help="steps per profiled round in 'limits'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=DEFAULT_DATA_ROOT, help="holds MNIST/raw (torchvision layout)")
    p.add_argument("--subset", type=int, default=None, help="train on the first N images (quick runs)")
    p.add_argument("--epoch-models", nargs="+", choices=list(MODELS), default=["ann"])
    p.add_argument("--epoch-reps", type=int, default=5)
    p.add_argument("--bt-models", nargs="+", choices=["ann", "cnn", "mlp"], default=["ann"])
    p.add_argument("--bt-reps", type=int, default=3, help="paired epochs per rule (BioTorch's take ~8 s)")
    p.add_argument("--bt-workers", type=int, default=0, help="BioTorch DataLoader workers (its configs: 0)")
    p.add_argument("--bt-trainer", action="store_true", help="also time BioTorch's whole Trainer epoch")
    p.add_argument("--widths", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--depths", nargs="+", type=int, default=[2, 4, 6, 8])
    p.add_argument("--sweep-methods", nargs="+", choices=METHODS, default=["bp", "fa", "dfa"])
    p.add_argument("--sweep-reps", type=int, default=15)
    p.add_argument("--sweep-budget", type=float, default=6.0, help="seconds of timed rounds per network")
    p.add_argument("--overhead-models", nargs="+", choices=list(MODELS), default=["ann", "cnn"])
    p.add_argument("--overhead-epochs", type=int, default=3)
    p.add_argument(
        "--overhead-rate",
        type=int,
        default=250,
        help="py-spy samples per second (at 1000, its sampling slowed the ANN's run on 2 cores by a third)",
    )
    p.add_argument("--markdown", action="store_true", help="print Markdown tables instead of rich ones")
    p.add_argument("--quick", action="store_true", help="a fast smoke run: few rounds, small data")
    p.add_argument(
        "--gpu",
        action="store_true",
        help="about 3 minutes on one data-centre GPU: epochs (ann, cnn), steps, a small sweep, overhead",
    )
    p.add_argument(
        "--output",
        default=None,
        help="also write every table as Markdown to this file (default: $OUT/speed-<device>.md when "
        "the OUT environment variable is set)",
    )
    p.add_argument(
        "--time-limit", type=float, default=None, help="seconds; sections that would start later are skipped"
    )
    p.add_argument(
        "--nondeterministic",
        action="store_true",
        help="let cuDNN/cuBLAS pick non-deterministic kernels (fa-train's trainer.deterministic=false)",
    )
    args = p.parse_args(argv)
    if args.gpu:
        # The CNN's MNIST epoch first: it is the figure the issue asks of a GPU. BioTorch is left out
        # (its epoch is bound by its PIL data path on the CPU, ~5 s each); add it with --sections.
        given = set(argv if argv is not None else sys.argv[1:])
        if "--sections" not in given:
            args.sections = ["epoch", "steps", "sweep", "overhead"]
        args.device = args.device or "cuda"
        args.epoch_models, args.epoch_reps = ["cnn", "ann"], 2
        args.reps, args.warmup = 15, 5
        args.widths, args.depths, args.sweep_budget = [256, 1024, 4096], [2, 8], 1.0
        args.overhead_models, args.overhead_epochs = ["ann", "cnn"], 1
        # On an H200 epoch, steps and sweep took 113 s before --settle, the overhead section 42 s;
        # settling adds untimed steps to steps and sweep, estimated at some 15 s (not yet run on a GPU).
        args.time_limit = args.time_limit or 150.0
    args.device = args.device or "cpu"
    if args.clock == "thread" and (args.threads != 1 or args.device != "cpu"):
        p.error("--clock thread needs --threads 1 and the CPU (other threads' work would not be counted)")
    if args.quick:
        args.reps, args.warmup, args.epoch_reps, args.bt_reps, args.min_sample = 5, 2, 1, 1, 0.005
        args.settle, args.settle_steps = 1, 3
        args.limit_rounds, args.limit_steps = 1, 3
        args.subset = args.subset or 3000
        args.widths, args.depths, args.sweep_reps, args.sweep_budget = [256, 1024], [2, 4], 3, 0.5
        args.overhead_models, args.overhead_epochs = ["ann"], 1
    return args


def output_file(args: argparse.Namespace, device: torch.device) -> io.TextIOBase | None:
    path = args.output
    if path is None and os.environ.get("OUT"):
        path = str(Path(os.environ["OUT"]) / f"speed-{device.type}.md")
    if path is None:
        return None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed at the end of main)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # As fa-train does (fa_cli.engine.keep_freed_memory), unless asked to measure glibc's defaults.
    kept = False if args.default_malloc else engine.keep_freed_memory()
    global clock
    clock = CLOCKS[args.clock]
    # fa-train's own settings (trainer.deterministic, default true), set before CUDA starts: cuBLAS
    # reads its workspace setting once.
    seed_everything(args.seed, deterministic=not args.nondeterministic)
    device = torch.device(args.device)
    output = output_file(args, device)
    report = Report(args.markdown, output)
    if output is not None:
        output.write(f"python benchmarks/speed.py {' '.join(sys.argv[1:] if argv is None else argv)}\n\n")
    peak = machine(report, device)
    report.line(
        f"deterministic kernels: {not args.nondeterministic}; clock: {args.clock}; "
        f"freed memory kept by malloc: {kept}"
    )
    started = time.perf_counter()
    sections: dict[str, Callable[[], None]] = {
        "steps": lambda: section_steps(args, report, device),
        "settle": lambda: section_settle(args, report, device),
        "limits": lambda: section_limits(args, report, device),
        "parts": lambda: section_parts(args, report, device),
        "epoch": lambda: section_epoch(args, report, device),
        "biotorch": lambda: section_biotorch(args, report, device),
        "sweep": lambda: section_sweep(args, report, device, peak),
        "overhead": lambda: section_overhead(args, report, device),
    }
    # overhead last: fa-train installs its own logging and signal handlers.
    order = sorted(dict.fromkeys(args.sections), key=lambda name: name == "overhead")
    failed = []
    for name in order:
        elapsed = time.perf_counter() - started
        if args.time_limit is not None and elapsed >= args.time_limit:
            report.line(f"{name}: skipped, {elapsed:.0f} s of the {args.time_limit:.0f} s time limit spent")
            continue
        try:
            sections[name]()
        except Exception as error:  # one section's failure (no MNIST here, out of memory) spares the rest
            failed.append(name)
            report.line(f"{name}: failed: {type(error).__name__}: {error}")
            continue
        report.line(f"({name}: {time.perf_counter() - started - elapsed:.1f} s)")
    report.line(
        f"done in {time.perf_counter() - started:.0f} s; load average now "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    if output is not None:
        output.close()
    if failed:
        sys.exit(f"sections that failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
