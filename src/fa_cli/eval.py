"""Test accuracy under adversarial attack (``conf/eval/``): ``eval.attack=fgsm`` or ``pgd`` at each
``eval.eps``, an L∞ budget in pixel units (images scaled to [0, 1]; MNIST's usual 0.1 to 0.3).

The attacks follow the true gradient of the loss with respect to the input: exact backprop through the
forward graph (:func:`fa_cli.alignment.exact_gradients`), whatever rule trained the model. A rule's
own backward would send the error back through its feedback matrices instead of the weights the
forward pass used, and so point the attack in a direction that is not the steepest one for the model
being attacked: the attack would be weaker than it could be, and the model would look more robust than
it is. Robustness measured that way is a property of the measurement, not of the model.

Perturbed images stay valid images: pixels are clipped to [0, 1] (in the normalised space the splits
live in). An epsilon of 0 gives the clean test accuracy exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fa_cli.alignment import exact_gradients
from fa_cli.config import EvalConfig
from fa_cli.data import Data, Split


def input_gradient(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Gradient of the summed cross-entropy with respect to ``inputs``, by exact backprop; the model's
    parameters' ``.grad`` are left alone."""
    inputs = inputs.detach().requires_grad_(True)
    with torch.enable_grad(), exact_gradients():
        loss = F.cross_entropy(model(inputs), targets, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, inputs)
    return gradient


def fgsm(
    model: nn.Module, inputs: Tensor, targets: Tensor, eps: Tensor, lower: Tensor, upper: Tensor
) -> Tensor:
    """Fast gradient sign method (Goodfellow 2015): one step of ``eps`` along the input gradient's
    sign. ``eps``, ``lower`` and ``upper`` are per channel in the inputs' (normalised) units."""
    step = eps * input_gradient(model, inputs, targets).sign()
    return torch.clamp(inputs + step, lower, upper)


def pgd(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    eps: Tensor,
    lower: Tensor,
    upper: Tensor,
    *,
    steps: int,
    step_size: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient descent (Madry 2018): ``steps`` sign-gradient steps of ``step_size * eps``,
    each projected back onto the eps-ball around ``inputs`` and the valid pixel range. With a
    ``generator`` it starts from a uniform random point of the ball, else from ``inputs``."""
    adversarial = inputs
    if generator is not None:
        noise = torch.rand(inputs.shape, generator=generator, device=inputs.device, dtype=inputs.dtype)
        adversarial = torch.clamp(inputs + (2 * noise - 1) * eps, lower, upper)
    low, high = torch.maximum(inputs - eps, lower), torch.minimum(inputs + eps, upper)
    for _ in range(steps):
        step = step_size * eps * input_gradient(model, adversarial, targets).sign()
        adversarial = torch.clamp(adversarial + step, low, high)
    return adversarial


def attack_accuracies(
    model: nn.Module, data: Data, cfg: EvalConfig, *, batch_size: int, seed: int, split: Split | None = None
) -> list[dict[str, Any]]:
    """Loss and accuracy (percent) of ``model`` (in eval mode) on ``split`` (default: the test set)
    under ``cfg.attack`` at each of ``cfg.eps``: ``[{"eps": 0.1, "accuracy": 81.2, "loss": 0.61}, ...]``.
    PGD's random starts are drawn from ``seed``."""
    if cfg.attack not in ("fgsm", "pgd"):
        raise ValueError(f"unknown attack {cfg.attack!r}: fgsm or pgd")
    split = data.test if split is None else split
    model.eval()
    device = split.inputs.device
    lower, upper = data.pixel_bounds()
    std = data.std.to(device)
    results = []
    for eps in cfg.eps:
        budget = eps / std  # the pixel-space budget in each channel's normalised units
        generator = torch.Generator(device=device).manual_seed(seed) if cfg.random_start else None
        loss = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for start in range(0, len(split), batch_size):
            inputs = split.inputs[start : start + batch_size]
            targets = split.targets[start : start + batch_size]
            if cfg.attack == "fgsm":
                adversarial = fgsm(model, inputs, targets, budget, lower, upper)
            else:
                adversarial = pgd(
                    model,
                    inputs,
                    targets,
                    budget,
                    lower,
                    upper,
                    steps=cfg.steps,
                    step_size=cfg.step_size,
                    generator=generator,
                )
            with torch.no_grad():
                logits = model(adversarial)
                loss += F.cross_entropy(logits, targets, reduction="sum")
                correct += (logits.argmax(dim=1) == targets).sum()
        results.append(
            {"eps": eps, "accuracy": 100.0 * correct.item() / len(split), "loss": loss.item() / len(split)}
        )
    return results
