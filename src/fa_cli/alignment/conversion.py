"""Turn any network into one trained by a chosen rule."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from fa_cli.alignment.dfa import attach
from fa_cli.alignment.feedback import check_init
from fa_cli.alignment.layers import CONVERTIBLE, AlignmentLayer, check_method


def convert(
    module: nn.Module,
    method: str,
    *,
    num_classes: int | None = None,
    seed: int | None = None,
    scale: float = 1.0,
    dfa_projection: str = "full",
    init: str = "default",
) -> nn.Module:
    """A copy of ``module`` whose ``nn.Linear`` and ``nn.Conv1d/2d/3d`` layers learn with ``method``.

    The original is left untouched. The copy keeps every weight, bias, buffer and hook; only the
    layers' classes change (to :class:`~fa_cli.alignment.Linear` and friends) and a ``feedback``
    buffer is added, so its forward output equals the original's. Other modules (activations,
    BatchNorm, pooling, attention, residual adds) keep their exact gradients.

    Args:
        method: one of ``METHODS``: bp, fa, dfa, usf, brsf, frsf, kp, shallow.
        num_classes: width of the output error for dfa; inferred from the last ``nn.Linear``
            (in module order) when not given.
        seed: makes every layer's feedback reproducible; layers get independent matrices. ``None``
            draws from the global RNG (so ``torch.manual_seed`` fixes it too).
        scale: multiplies the feedback's initial bound (see :mod:`fa_cli.alignment.feedback`).
        init: the law feedback is drawn from: ``"default"``, that of PyTorch's default weight
            initialisation, or ``"xavier"``, Glorot's (BioTorch's). The weights are not touched.
        dfa_projection: dfa on convolutions: ``"full"`` projects the error to every input position,
            ``"channel"`` to one value per channel shared over space (for large feature maps).

    ``shallow`` freezes every parameter (``requires_grad=False``) except the output layer's: the
    last converted layer in module order. For ``kp``, have the optimizer train the feedback too:
    ``train_feedback(model, optimizer)``.
    """
    check_method(method)
    check_init(init)
    model = copy.deepcopy(module)
    layers = [m for m in model.modules() if type(m) in CONVERTIBLE or isinstance(m, AlignmentLayer)]
    if not layers:
        raise ValueError(f"{type(module).__name__} has no Linear or Conv1d/2d/3d layer to convert")
    if method == "dfa":
        num_classes = num_classes or _infer_num_classes(model)
        attach(model, num_classes)
    if method == "shallow":
        model.requires_grad_(False)

    seeds = _layer_seeds(seed, len(layers))
    for i, layer in enumerate(layers):
        output_layer = i == len(layers) - 1
        rule = "bp" if method == "shallow" and output_layer else method
        if not isinstance(layer, AlignmentLayer):
            layer.__class__ = CONVERTIBLE[type(layer)]  # same module, same parameters: a rule-aware class
        layer.setup_rule(
            rule, scale=scale, seed=seeds[i], num_classes=num_classes, projection=dfa_projection, init=init
        )
        if method == "shallow" and output_layer:
            layer.requires_grad_(True)
    return model


def train_feedback(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Have ``optimizer`` train the feedback of ``model``'s Kolen-Pollack layers by ``W``'s update rule.

    The ``B``s of the weights in each of ``optimizer``'s parameter groups join it in a group of their
    own that takes that group's settings before every step (learning rate and schedule, momentum,
    weight decay: the decay is what makes ``B`` converge to ``W``), so each ``B`` follows its own
    ``W``'s settings even where groups differ, and after ``optimizer.load_state_dict``. At every step
    ``B``'s gradient is its ``W``'s: the very tensor, as the step finds it, so ``B`` gets ``W``'s
    update after whatever clipping, unscaling or averaging over processes ``W``'s gradient went
    through. Between steps ``B.grad`` is None, so nothing that walks the optimizer's gradients
    (``GradScaler.unscale_``, clipping) meets ``W``'s twice. A ``B`` whose ``W`` the optimizer does
    not train stays as it is, as its ``W`` does. Returns the feedback tensors added, in the order of
    ``model.modules()``: empty for every other rule, or when the optimizer trains no kp ``W``, and then
    ``optimizer`` is left as it was.
    """
    pairs = [
        (m.weight, m.feedback)
        for m in model.modules()
        if isinstance(m, AlignmentLayer) and m.method == "kp" and m.feedback is not None
    ]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if any(id(b) in held for _, b in pairs):
        raise ValueError("train_feedback: the optimizer already holds kp feedback (called twice?)")
    companions, trained = [], set()
    for index, group in enumerate(list(optimizer.param_groups)):
        position = {id(p): i for i, p in enumerate(group["params"])}
        feedback = [(position[id(w)], b) for w, b in pairs if id(w) in position]
        if not feedback:
            continue
        params: list = [b for _, b in feedback]
        if "param_names" in group:  # an optimizer built from named_parameters(): name B after its W
            names = group["param_names"]
            params = [(_feedback_name(names[i]), b) for i, b in feedback]
        optimizer.add_param_group({**_settings(group), "params": params})
        # Indices, not the group dicts: load_state_dict puts new dicts in the same places.
        companions.append((index, len(optimizer.param_groups) - 1))
        trained |= {id(b) for _, b in feedback}
    pairs = [(w, b) for w, b in pairs if id(b) in trained]
    if pairs:
        gradients = _SharedGradients(pairs, companions)
        optimizer.register_step_pre_hook(gradients.lend)
        optimizer.register_step_post_hook(gradients.take_back)
    return [b for _, b in pairs]


def _settings(group: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in group.items() if key not in ("params", "param_names")}


def _feedback_name(weight_name: str) -> str:
    prefix, _, last = weight_name.rpartition(".")
    return f"{prefix}.feedback" if last == "weight" and prefix else f"{weight_name}.feedback"


class _SharedGradients:
    """The optimizer step hooks of :func:`train_feedback`: ``B.grad`` is ``W.grad`` for the step, and
    each group of ``B``s has its ``W``s' group's settings."""

    def __init__(self, pairs: list[tuple[Tensor, Tensor]], companions: list[tuple[int, int]]) -> None:
        self.pairs, self.companions = pairs, companions

    def lend(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        # The same tensor, not a copy: copying every W's gradient cost a pass over memory each step
        # (docs/PERFORMANCE.md, seventh round).
        for weight, feedback in self.pairs:
            feedback.grad = weight.grad
        # Settings changed since the last step (a schedule, or by hand) reach B too.
        groups = optimizer.param_groups
        for weights, feedback in self.companions:
            groups[feedback].update(_settings(groups[weights]))

    def take_back(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        for _, feedback in self.pairs:
            feedback.grad = None


def _infer_num_classes(model: nn.Module) -> int:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            "dfa needs the width of the model's output: pass num_classes= (it cannot be inferred: "
            f"{type(model).__name__} has no nn.Linear layer)"
        )
    return linears[-1].out_features


def _layer_seeds(seed: int | None, count: int) -> list[int]:
    # One independent seed per layer from one generator: same seed, same matrices; no two layers
    # share a stream or slices of one matrix.
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randint(0, 2**62, (count,), generator=generator).tolist()
