"""Autograd Functions whose backward sends the error down through feedback instead of the weight.

Backprop computes, for a layer ``z = W y + b``::

    dL/dW = delta^T y        dL/db = sum(delta)        dL/dy = delta W

with ``delta = dL/dz``. Every rule here keeps the first two (the layer's own update is local) and
replaces the third:

- feedback alignment and its relatives (fa, usf, brsf, frsf, kp): ``dL/dy = delta B`` with a
  feedback matrix ``B`` of the weight's shape (the report's ``B_{i+1}`` in place of ``W_{i+1}^T``);
  for the sign-concordant ones the backward first gives ``B`` the signs of ``W`` (brsf in training
  draws the whole ``B`` there, fresh magnitudes with ``W``'s signs, and kp in its offset form rebuilds
  ``B = W + s (B_0 - W_0)`` there). kp's ``B`` learns too, but not here: the optimizer gives it ``W``'s
  update at each step (:func:`fa_cli.alignment.train_feedback`);
- direct feedback alignment (dfa): ``dL/dy = e B_dfa``, the output error ``e`` projected straight to
  the layer's input. That projection is computed once for all layers by :mod:`fa_cli.alignment.dfa`,
  so the backward here only looks it up: no ``delta W`` work is done at all.

The forward passes are exactly PyTorch's ``F.linear`` and ``F.conv{1,2,3}d``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from fa_cli.alignment import feedback as fb

if TYPE_CHECKING:
    from fa_cli.alignment.dfa import Projection

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _linear_param_grads(
    ctx: Any, grad_output: Tensor, input: Tensor, has_bias: bool
) -> tuple[Tensor | None, Tensor | None]:
    # grad_output (*, out), input (*, in): fold every leading dimension into one batch dimension.
    delta = grad_output.reshape(-1, grad_output.shape[-1])  # (N, out)
    grad_weight = delta.t().mm(input.reshape(-1, input.shape[-1])) if ctx.needs_input_grad[1] else None
    grad_bias = delta.sum(0) if has_bias and ctx.needs_input_grad[2] else None
    return grad_weight, grad_bias


@dataclass(frozen=True)
class Remake:
    """How a backward remakes ``feedback`` right before its error goes through it, from ``W`` as it is
    then: usf and frsf give it W's signs; brsf in training (``redraw``, the bound of the magnitudes)
    draws this batch's matrix, fresh magnitudes with those signs, in the same place; kp in its offset
    form (``offset``: ``feedback_offset`` and ``offset_scale``) rebuilds ``B = W + scale * offset``.
    Only when an error goes down at all: a first layer's backward needs no ``B``."""

    weight: Tensor
    redraw: float | None = None
    offset: tuple[Tensor, Tensor] | None = None

    def __call__(self, feedback: Tensor) -> None:
        if self.offset is not None:
            fb.from_offset(self.weight.data, *self.offset, out=feedback.data)
        elif self.redraw is not None:
            fb.redraw_feedback(feedback, self.weight, self.redraw)
        else:
            fb.take_signs(feedback, self.weight)


class LinearFeedback(Function):
    """``F.linear`` whose input gradient is ``delta @ B`` instead of ``delta @ W``."""

    @staticmethod
    def forward(
        ctx: Any,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        feedback: Tensor,
        remake: Remake | None,
    ) -> Tensor:
        # input (*, in), weight (out, in), bias (out,), feedback (out, in) -> output (*, out)
        ctx.save_for_backward(input, feedback)
        ctx.has_bias = bias is not None
        ctx.remake = remake
        return F.linear(input, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):  # type: ignore[override]
        input, feedback = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            if ctx.remake is not None:
                ctx.remake(feedback)
            # (*, out) @ (out, in) -> (*, in): the error goes down through B, not W.
            grad_input = grad_output.matmul(feedback)
        grad_weight, grad_bias = _linear_param_grads(ctx, grad_output, input, ctx.has_bias)
        return grad_input, grad_weight, grad_bias, None, None


class LinearDirect(Function):
    """``F.linear`` whose input gradient is this layer's slice of the projected output error (dfa)."""

    @staticmethod
    def forward(
        ctx: Any, input: Tensor, weight: Tensor, bias: Tensor | None, projection: Projection | None
    ) -> Tensor:
        # input (*, in), weight (out, in) -> output (*, out); projection is None when the input
        # needs no gradient (the first layer), so nothing is projected for it.
        ctx.save_for_backward(input)
        ctx.has_bias = bias is not None
        ctx.projection = projection
        return F.linear(input, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):  # type: ignore[override]
        (input,) = ctx.saved_tensors
        grad_input = ctx.projection.gradient() if ctx.needs_input_grad[0] else None  # (*, in)
        grad_weight, grad_bias = _linear_param_grads(ctx, grad_output, input, ctx.has_bias)
        return grad_input, grad_weight, grad_bias, None


class ConvFeedback(Function):
    """``F.conv{1,2,3}d`` whose input gradient is the transposed convolution with ``B``, not ``W``.

    Zero padding only: other padding modes and asymmetric 'same' padding are applied by the layer
    with ``F.pad`` before this Function, so their gradient stays exact.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        feedback: Tensor,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
        remake: Remake | None,
    ) -> Tensor:
        # input (N, C_in, *S), weight (C_out, C_in / groups, *K), feedback like weight
        # -> output (N, C_out, *S_out)
        ctx.save_for_backward(input, feedback)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.remake = remake
        return _CONV[input.dim() - 2](input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):  # type: ignore[override]
        input, feedback = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        if ctx.remake is not None and ctx.needs_input_grad[0]:
            ctx.remake(feedback)
        # One fused call: the input gradient is computed with B in the weight's place; the weight
        # and bias gradients depend only on the input and grad_output, so they are the usual ones.
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_output, input, feedback, ctx.bias_sizes, stride, padding, dilation,
            False, [0] * len(stride), groups, mask,
        )  # fmt: skip
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class ConvDirect(Function):
    """``F.conv{1,2,3}d`` whose input gradient is this layer's slice of the projected output error."""

    @staticmethod
    def forward(
        ctx: Any,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        projection: Projection | None,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
    ) -> Tensor:
        # input (N, C_in, *S), weight (C_out, C_in / groups, *K) -> output (N, C_out, *S_out)
        ctx.save_for_backward(input, weight)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.projection = projection
        return _CONV[input.dim() - 2](input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):  # type: ignore[override]
        input, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        grad_input = ctx.projection.gradient() if ctx.needs_input_grad[0] else None  # (N, C_in, *S)
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # Weight and bias gradients only: the output mask skips the transposed convolution.
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_output, input, weight, ctx.bias_sizes, stride, padding, dilation,
                False, [0] * len(stride), groups, [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]],
            )  # fmt: skip
        return grad_input, grad_weight, grad_bias, None, None, None, None, None
