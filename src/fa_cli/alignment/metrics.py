"""How far a rule is from backprop: angles between ``W`` and ``B``, and between updates and gradients.

Angles are in degrees between the two tensors flattened to vectors: 0 means the same direction,
90 unrelated (what two independent random matrices give in a wide layer), 180 opposite.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fa_cli.alignment.exact import exact_gradients
from fa_cli.alignment.feedback import WEIGHT_SHAPED
from fa_cli.alignment.layers import AlignmentLayer


def angle(a: Tensor, b: Tensor) -> float:
    """Angle in degrees between two tensors of the same number of elements, as flat vectors."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    norms = a.norm() * b.norm()
    if norms == 0:
        return math.nan
    cosine = (a @ b / norms).clamp(-1.0, 1.0)
    return math.degrees(math.acos(cosine.item()))


def weight_feedback_angles(model: nn.Module) -> dict[str, float]:
    """Per layer, the angle between ``W`` and the matrix errors go through now (fa, kp, usf, frsf;
    brsf: the matrix of its last backward). Layers of other rules have no weight-shaped ``B`` and are
    left out."""
    return {
        name: angle(layer.weight, layer.effective_feedback())
        for name, layer in model.named_modules()
        if isinstance(layer, AlignmentLayer) and layer.method in WEIGHT_SHAPED
    }


def update_gradient_angles(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> dict[str, float]:
    """Per layer, the angle between the weight gradient the rule computes on this batch (its update
    direction, before the optimizer) and backprop's true gradient on the same batch.

    Every rule is covered, dfa included; bp gives 0 up to rounding. Frozen layers (``shallow``'s
    hidden ones) do not learn and are left out. The model is left as it was: ``.grad``, buffers
    (BatchNorm statistics, brsf magnitudes) and the RNG state are restored, so measuring does not
    change training.
    """
    layers = {
        name: layer
        for name, layer in model.named_modules()
        if isinstance(layer, AlignmentLayer) and layer.weight.requires_grad
    }
    weights = [layer.weight for layer in layers.values()]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    devices = sorted({w.device.index for w in weights if w.device.type == "cuda"})

    def gradients() -> tuple[Tensor, ...]:
        # Both passes see the same dropout, and the RNG is left as it was (brsf's backward draws).
        with torch.random.fork_rng(devices=devices):
            return torch.autograd.grad(loss_fn(model(inputs), targets), weights)

    try:
        rule = gradients()
        with exact_gradients():
            true = gradients()
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:  # a dfa projection made by this very forward stays
                    b.copy_(buffers[name])
    return {name: angle(r, t) for name, r, t in zip(layers, rule, true, strict=True)}
