"""Optimizers and learning-rate schedules of ``conf/optim/``."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, MultiStepLR, StepLR

from fa_cli.alignment import train_feedback
from fa_cli.config import AdamConfig, AdamWConfig, OptimConfig, SGDConfig


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer over the parameters that learn (``shallow`` freezes all but the output layer).

    A rule that trains its own feedback (Kolen-Pollack) gets it as a second parameter group of the
    same optimizer, with ``W``'s settings and gradient (:func:`fa_cli.alignment.train_feedback`), so
    ``B`` follows exactly ``W``'s update: learning rate and schedule, momentum and weight decay (the
    decay is what makes ``B`` converge to ``W``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(cfg, SGDConfig):
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
            fused=_fusable(params),
        )
    elif isinstance(cfg, AdamWConfig):  # before AdamConfig, its base class
        optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    elif isinstance(cfg, AdamConfig):
        optimizer = torch.optim.Adam(
            params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    else:
        raise TypeError(f"no optimizer for {type(cfg).__name__}")
    train_feedback(model, optimizer)
    return optimizer


def _fusable(params: list[nn.Parameter]) -> bool | None:
    # The fused kernel updates every tensor in one pass (a third less time than the per-tensor loop
    # on a 4x1024 MLP on the CPU, benchmarks/speed.py). It takes floating-point CPU and CUDA tensors;
    # kp's B, added after, has its W's device and dtype.
    supported = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if params and supported else None


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, epochs: int) -> LRScheduler:
    """The learning-rate schedule, stepped once per epoch. ``none`` is a constant schedule, so that every
    run has a scheduler and its checkpoint the same keys."""
    if cfg.schedule == "step":
        return StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.schedule == "multistep":
        return MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
    if cfg.schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=epochs)
    if cfg.schedule == "none":
        return LambdaLR(optimizer, lambda epoch: 1.0)
    raise ValueError(f"unknown schedule {cfg.schedule!r}")
