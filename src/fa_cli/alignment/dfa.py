"""Direct feedback alignment: capture the output error once, project it to every layer in one matmul.

How a converted model runs (Nøkland 2016; the report's ``dW_i = -((B_i e) ⊙ φ'(z_i)) y_{i-1}^T``):

forward
    A pre-hook on the model opens a :class:`Pass` for this forward. Each dfa layer whose input needs
    a gradient adds its feedback matrix to the pass and keeps a :class:`Projection` ticket. A hook
    on the model's output wraps it in :class:`OutputError`, an identity.
backward
    ``OutputError`` runs first (it is the last op of the forward). It sees ``e = dL/d(output)``, and
    computes ``e @ [B_1 | B_2 | ... | B_L]`` once for every layer of the pass. Each layer's backward
    then returns its slice as the gradient of its input, instead of ``delta @ W``: the chain through
    the weights is never computed, and the exact backward of activations, pooling, BatchNorm and
    residual adds between layers turns ``B_i e`` into ``(B_i e) ⊙ φ'(z_i)``, the report's formula.

All state of one forward lives in its ``Pass``, which the autograd graph owns; nothing stale is
left on the modules. Eval passes under ``torch.no_grad()`` open no pass at all, two forwards before
one backward keep separate passes, and each backward can use another batch size.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import Function

from fa_cli.alignment.exact import rules_active

_open = threading.local()  # .passes: stack of (model, Pass) for the forwards in progress


class DirectFeedback:
    """What a dfa model keeps between steps: the output width and the concatenated projections.

    ``matrix`` caches ``[B_1 | ... | B_L]`` (``num_classes`` rows) and rebuilds it only when a
    layer's ``feedback`` was replaced or changed in place, or moved to another device.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._key: list[tuple[Tensor, int, bool]] = []
        self._matrix: Tensor | None = None

    def matrix(self, parts: list[tuple[Tensor, bool]]) -> Tensor:
        stale = (
            self._matrix is None
            or len(parts) != len(self._key)
            or any(
                feedback is not kept or feedback._version != version or channel != kept_channel
                for (feedback, channel), (kept, version, kept_channel) in zip(parts, self._key, strict=True)
            )
        )
        if stale:
            rows = [feedback.reshape(self.num_classes, -1) for feedback, _ in parts]  # (K, width_i)
            self._matrix = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)  # (K, sum width_i)
            self._key = [(feedback, feedback._version, channel) for feedback, channel in parts]
        assert self._matrix is not None
        return self._matrix


class Projection:
    """A layer's ticket for its slice of the projected output error."""

    def __init__(self, owner: Pass, offset: int, width: int, shape: torch.Size, channel: bool) -> None:
        self.owner, self.offset, self.width, self.shape, self.channel = owner, offset, width, shape, channel

    def gradient(self) -> Tensor:
        """``e @ B`` for this layer, shaped like its input ``(N, *shape)``."""
        projected = self.owner.projected
        if projected is None:
            raise RuntimeError(
                "dfa: a layer's backward ran before the output error was seen. The loss must be computed "
                "from the converted model's output (the error is captured there)."
            )
        n, total = projected.shape
        # (N, width): a slice, unless this layer is the pass's only one (then the slice and the view
        # below would only cost time: the ANN's output layer, every step).
        whole = self.offset == 0 and self.width == total
        part = projected if whole else projected[:, self.offset : self.offset + self.width]
        if self.channel:  # one value per channel, shared over space: (N, C) -> (N, C, *S)
            spatial = (1,) * (len(self.shape) - 1)
            return part.reshape(n, self.shape[0], *spatial).expand(n, *self.shape)
        return part if len(self.shape) == 1 else part.view(n, *self.shape)


class Pass:
    """One forward of a dfa model: the layers that want a projection, and the projection itself."""

    def __init__(self, state: DirectFeedback) -> None:
        self.state = state
        self.parts: list[tuple[Tensor, bool]] = []
        self.width = 0
        self.projected: Tensor | None = None  # (N, width), set by OutputError.backward

    def add(self, feedback: Tensor, input_shape: torch.Size, channel: bool) -> Projection:
        width = math.prod(feedback.shape[1:])  # per example; feedback[0].numel() would make a view
        ticket = Projection(self, self.width, width, input_shape, channel)
        self.parts.append((feedback, channel))
        self.width += width
        return ticket

    def project(self, output_grad: Tensor) -> None:
        # e = dL/d(output), (N, K): a classifier's output is that already; others are flattened.
        error = output_grad if output_grad.dim() == 2 else output_grad.reshape(output_grad.shape[0], -1)
        if error.shape[1] != self.state.num_classes:
            raise RuntimeError(
                f"dfa: the model's output has {error.shape[1]} values per example, but its feedback "
                f"matrices were made for num_classes={self.state.num_classes}"
            )
        if self.parts:
            self.projected = error.mm(self.state.matrix(self.parts))  # (N, K) @ (K, width) -> (N, width)


class OutputError(Function):
    """Identity on the model's output whose backward captures the output error and projects it."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, current: Pass) -> Tensor:
        ctx.current = current
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):  # type: ignore[override]
        ctx.current.project(grad_output)
        return grad_output, None


def current_pass() -> Pass | None:
    """The pass of the innermost dfa model whose forward is running on this thread, if any."""
    stack = getattr(_open, "passes", None)
    return stack[-1][1] if stack else None


def _open_pass(model: nn.Module, args: tuple[Any, ...]) -> None:
    if rules_active():
        _open.__dict__.setdefault("passes", []).append((model, Pass(model._direct_feedback)))


def _close_pass(model: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    stack = getattr(_open, "passes", None)
    if not stack or stack[-1][0] is not model:
        return None  # no pass was opened (no_grad, exact_gradients)
    _, current = stack.pop()
    if output is None:  # the forward raised; the hook only had to close the pass
        return None
    if not isinstance(output, Tensor):
        raise TypeError(
            "dfa needs the model to return one tensor of outputs to capture the error from, "
            f"got {type(output).__name__}"
        )
    return OutputError.apply(output, current) if output.requires_grad else output


def attach(model: nn.Module, num_classes: int) -> None:
    """Make ``model`` capture its output error for the dfa layers inside it (done by ``convert``)."""
    if not hasattr(model, "_direct_feedback"):
        model.register_forward_pre_hook(_open_pass)
        model.register_forward_hook(_close_pass, always_call=True)
    model._direct_feedback = DirectFeedback(num_classes)
