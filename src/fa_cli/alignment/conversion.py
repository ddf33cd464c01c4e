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
    ``train_feedback(model, optimizer)``; until then ``B`` stays as drawn.
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

    Each ``B`` gets exactly the update ``optimizer`` gives its ``W``, from ``W``'s gradient: learning
    rate and schedule, momentum, weight decay (the decay is what makes ``B`` converge to ``W``), each
    ``W``'s own group's settings where groups differ, also after ``optimizer.load_state_dict``, and
    after whatever clipping, unscaling or averaging over processes ``W``'s gradient went through. A
    ``B`` whose ``W`` the optimizer does not train stays as it is, as its ``W`` does.

    Two forms, with the same ``B`` (see :mod:`fa_cli.alignment.feedback`):

    - **offset**, where the difference ``B - W`` provably moves by a scalar alone: ``torch.optim.SGD``
      with any settings, ``AdamW``, and ``Adam`` without weight decay or with it decoupled (the two
      Adams with ``eps > 0``). Each layer then keeps
      ``feedback_offset`` (``B - W`` now) and ``offset_scale`` (1 now), the optimizer trains the scale
      with a gradient of 0 and its ``W``'s settings, and each backward rebuilds ``B = W + scale *
      offset``: no optimizer pass over ``B``. The optimizer's settings are checked again before every
      step, and a step whose settings leave the offset form (weight decay given to Adam) is refused.
    - **matrix**, under any other optimizer: ``B`` joins the optimizer, and at every step its gradient
      is its ``W``'s, the very tensor as the step finds it. Between steps ``B.grad`` is None, so
      nothing that walks the optimizer's gradients (``GradScaler.unscale_``, clipping) meets ``W``'s
      twice.

    The tensors added to ``optimizer`` form a group of their own per group of ``W``s, which takes that
    group's settings before every step. Returns them (each layer's ``offset_scale``, or its ``B``), in
    the order of ``model.modules()``: empty for every other rule, or when the optimizer trains no kp
    ``W``, and then ``optimizer`` is left as it was. Call it before the optimizer's first step: after
    it, the offset form's ``B`` would take on ``W``'s momentum or moments, and the matrix form's would
    start without.
    """
    layers = [
        m
        for m in model.modules()
        if isinstance(m, AlignmentLayer) and m.method == "kp" and m.feedback is not None
    ]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if any(id(t) in held for m in layers for t in (m.feedback, *(m.offset_form() or ()))):
        raise ValueError("train_feedback: the optimizer already holds kp feedback (called twice?)")
    weights = {id(m.weight) for m in layers}
    groups = [
        i for i, group in enumerate(optimizer.param_groups) if any(id(p) in weights for p in group["params"])
    ]
    offset_form = _moves_by_a_scalar(optimizer, groups)
    companions, placed = [], set()
    for index in groups:
        group = optimizer.param_groups[index]
        position = {id(p): i for i, p in enumerate(group["params"])}
        mine = [(position[id(m.weight)], m) for m in layers if id(m.weight) in position]
        for _, m in mine:
            if offset_form:
                m._take_offset_form()
            else:
                m._leave_offset_form()
        added = [(i, _learned(m)) for i, m in mine]
        params: list = [t for _, t in added]
        if "param_names" in group:  # an optimizer built from named_parameters(): name them after W
            names = group["param_names"]
            params = [(_learned_name(names[i], offset_form), t) for i, t in added]
        optimizer.add_param_group({**_settings(group), "params": params})
        # Indices, not the group dicts: load_state_dict puts new dicts in the same places.
        companions.append((index, len(optimizer.param_groups) - 1))
        placed |= {id(m) for _, m in mine}
    trained = [m for m in layers if id(m) in placed]
    if trained:
        hooks = _OffsetSteps(trained, companions) if offset_form else _SharedGradients(trained, companions)
        optimizer.register_step_pre_hook(hooks.lend)
        optimizer.register_step_post_hook(hooks.take_back)
        optimizer.register_load_state_dict_pre_hook(_StateOf(trained))
    return [_learned(m) for m in trained]


def _moves_by_a_scalar(optimizer: torch.optim.Optimizer, groups: list[int]) -> bool:
    """Whether, under ``optimizer``'s ``groups`` (those of kp ``W``s), ``B - W`` moves by a scalar. ``B``
    and ``W`` get the same gradients, so their optimizer states differ only through the term in the
    parameter itself, weight decay: under SGD everything is linear, under AdamW (and Adam's decoupled
    decay) the decay is a factor apart from the moments, which the two share; Adam's L2 decay goes
    through the moments. The scale's moments are 0, and its Adam update 0 / (0 + eps): eps must not be 0."""
    settings = [optimizer.param_groups[i] for i in groups]
    if type(optimizer) is torch.optim.SGD:
        return True
    if type(optimizer) is torch.optim.AdamW:
        return all(g["eps"] > 0 for g in settings)
    if type(optimizer) is torch.optim.Adam:
        return all(
            g["eps"] > 0 and (g["weight_decay"] == 0 or g.get("decoupled_weight_decay")) for g in settings
        )
    return False


def _learned(layer: AlignmentLayer) -> Tensor:
    form = layer.offset_form()
    assert layer.feedback is not None
    return form[1] if form is not None else layer.feedback


def _settings(group: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in group.items() if key not in ("params", "param_names")}


def _learned_name(weight_name: str, offset_form: bool) -> str:
    prefix, _, last = weight_name.rpartition(".")
    name = "offset_scale" if offset_form else "feedback"
    return f"{prefix}.{name}" if last == "weight" and prefix else f"{weight_name}.{name}"


class _FeedbackSteps:
    """The optimizer step hooks of :func:`train_feedback`: ``lend`` gives each learned tensor (``B``, or
    its scale) a gradient for the step and its ``W``'s group's settings, ``take_back`` takes the
    gradient back after it."""

    def __init__(self, layers: list[AlignmentLayer], companions: list[tuple[int, int]]) -> None:
        self.layers = [(m, _learned(m)) for m in layers]
        self.companions = companions

    def lend(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        _check_held(self.layers)
        _follow_settings(optimizer, self.companions)
        self._give_gradients(optimizer)

    def _give_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        raise NotImplementedError

    def take_back(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        for _, learned in self.layers:
            learned.grad = None


class _SharedGradients(_FeedbackSteps):
    """The matrix form: ``B.grad`` is ``W.grad`` for the step."""

    def _give_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        # The same tensor, not a copy: copying every W's gradient cost a pass over memory each step
        # (docs/PERFORMANCE.md, seventh round).
        for layer, feedback in self.layers:
            feedback.grad = layer.weight.grad


class _OffsetSteps(_FeedbackSteps):
    """The offset form: each ``offset_scale`` steps, with a gradient of 0, where its ``W`` steps (it
    has a gradient)."""

    def __init__(self, layers: list[AlignmentLayer], companions: list[tuple[int, int]]) -> None:
        super().__init__(layers, companions)
        self.zeros = [torch.zeros_like(scale) for _, scale in self.layers]
        self.weight_groups = [weights for weights, _ in companions]

    def _give_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        if not _moves_by_a_scalar(optimizer, self.weight_groups):
            raise RuntimeError(
                "kp: this optimizer's settings no longer keep B - W a multiple of its start (weight "
                "decay on Adam?); build the optimizer with them before train_feedback"
            )
        for (layer, scale), zero in zip(self.layers, self.zeros, strict=True):
            scale.grad = zero if layer.weight.grad is not None else None


class _StateOf:
    """Before ``optimizer.load_state_dict``: a state saved for kp's ``B`` itself (the matrix form: an
    older fa-cli's, or another optimizer's) is rewritten for the offset form's scales. ``B``'s moments
    differ from ``W``'s by the scale's moments times ``B - W`` (by 0 for Adam's and AdamW's, whose ``B``
    and ``W`` share them), so a scale's moment is the projection of ``B``'s minus ``W``'s on the offset:
    exact wherever the offset form holds. The offset is the layer's as it is now, so load the model's
    state first (it becomes ``B - W`` with a scale of 1). A scale's state is refused for ``B`` itself,
    whose moments it cannot give without the scale."""

    def __init__(self, layers: list[AlignmentLayer]) -> None:
        self.layers = layers

    def __call__(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        # Groups or parameters of other lengths are left to load_state_dict, which refuses them after.
        index = {
            id(p): i
            for g, s in zip(optimizer.param_groups, state_dict["param_groups"], strict=False)
            for p, i in zip(g["params"], s["params"], strict=False)
        }
        # load_state_dict copied only the outer dict: the caller's states are replaced here, not changed.
        state = state_dict["state"] = dict(state_dict["state"])
        for layer in self.layers:
            learned = _learned(layer)
            saved = state.get(index.get(id(learned)), {})
            moments = {k: v for k, v in saved.items() if k != "step" and isinstance(v, Tensor)}
            if all(v.shape == learned.shape for v in moments.values()):
                continue
            weights = state.get(index.get(id(layer.weight)), {})
            if learned.dim() > 0 or any(
                v.shape != layer.weight.shape or k not in weights for k, v in moments.items()
            ):
                shapes = {k: tuple(v.shape) for k, v in moments.items()}
                raise ValueError(
                    f"the optimizer state has kp feedback's {shapes} for a tensor of shape "
                    f"{tuple(learned.shape)}, and no B of its W's shape to take them from (see "
                    "fa_cli.alignment.train_feedback)"
                )
            # B - W = scale * offset, in float64, where the saved moments lie (a checkpoint is read
            # onto the CPU, the model may be on a GPU); load_state_dict then moves each to its scale.
            offset, scale = layer.offset_form()  # type: ignore[misc]
            where = next(iter(moments.values())).device
            offset = offset.to(where, torch.float64) * scale.to(where, torch.float64)
            norm = offset.pow(2).sum()
            projected = {}
            for key, moment in moments.items():
                difference = moment.to(torch.float64) - weights[key].to(moment.device, torch.float64)
                value = (difference * offset).sum() / norm if norm > 0 else norm
                if key.endswith("_sq"):  # Adam's squares: 0 here, never below (a square root follows)
                    value = value.clamp(min=0.0)
                projected[key] = value.to(learned.dtype)
            state[index[id(learned)]] = {**saved, **projected}


def _check_held(layers: list[tuple[AlignmentLayer, Tensor]]) -> None:
    # .to() and .half() replace buffers, B and offset_scale among them, and another train_feedback
    # may have changed a layer's form: the optimizer would train a tensor the layer no longer uses.
    for layer, learned in layers:
        if _learned(layer) is not learned:
            raise RuntimeError(
                "kp: a layer's feedback is not the tensor this optimizer trains: the model was moved or "
                "cast (.to(), .half()) after train_feedback, or given to train_feedback with another "
                "optimizer since; move it first, then build the optimizer and call train_feedback"
            )


def _follow_settings(optimizer: torch.optim.Optimizer, companions: list[tuple[int, int]]) -> None:
    # Settings changed since the last step (a schedule, or by hand) reach the feedback's groups too.
    groups = optimizer.param_groups
    for weights, feedback in companions:
        groups[feedback].update(_settings(groups[weights]))


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
