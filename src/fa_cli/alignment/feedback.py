"""How each rule builds the feedback matrix it sends errors through.

Every rule stores one tensor per layer, the layer's ``feedback`` buffer (kp in its offset form, below,
stores two):

========  ===========================  =================================================  ==========
rule      ``feedback`` holds           matrix the error goes through (``effective``)      changes
========  ===========================  =================================================  ==========
fa        ``B``, weight's shape        ``B``                                              never
kp        ``B``, weight's shape        ``B``                                              W's update
usf       ``sign(W) * m``, one ``m``   ``sign(W) * |feedback|``                           sign(W)
frsf      ``sign(W) * |R|``            ``sign(W) * |feedback|``                           sign(W)
brsf      ``sign(W) * |R|``            ``feedback``, drawn by each backward in training   every step
dfa       ``(num_classes, *in)``       output error ``e`` projected: ``e @ feedback``     never
========  ===========================  =================================================  ==========

The sign-concordant rules keep the matrix itself, signs and all, and only its magnitudes are
theirs: every backward that sends an error through ``feedback`` first gives it the signs of ``W``,
in place (:func:`take_signs`, called by :mod:`fa_cli.alignment.functional`), so after a step the
buffer is the matrix the last error went through, and ``effective`` is the one for ``W`` as it is now.
brsf in training draws the whole matrix there instead, fresh magnitudes and W's signs in one pass
(:func:`redraw_feedback`).

kp has a second, offset form. Kolen-Pollack gives ``B`` the update the optimizer gives ``W``, from the same
gradient, so the difference ``B - W`` sees no gradient at all: only weight decay moves it. Under
SGD (momentum, dampening, Nesterov, weight decay, any learning-rate schedule) the update is linear in
the parameter, its momentum and the gradient, so ``B_t - W_t = s_t (B_0 - W_0)`` exactly, with ``s_t``
what the same optimizer makes of a scalar that starts at 1 and whose gradient is always 0; under AdamW
(decoupled decay) too, and under Adam without weight decay ``s`` stays 1 (with ``eps > 0``: the
scale's Adam step is ``0 / (0 + eps)``). There
:func:`fa_cli.alignment.train_feedback` keeps ``D = B_0 - W_0`` (``feedback_offset``) and ``s``
(``offset_scale``, the one tensor it trains) instead of ``B`` and its optimizer state, and a backward
rebuilds ``B`` from them right before its error goes through it (:func:`from_offset`): one
pass over ``W`` and ``D``, as usf's ``copysign_`` is one pass, where training ``B`` took the
optimizer's pass over ``B``, its gradient and momentum, for every layer, the first included (whose
``B`` no error goes through). ``feedback`` is then the matrix of the last backward, like brsf's, and
not part of ``state_dict``. Under other optimizers (Adam with L2 weight decay: the decay goes through
Adam's normalisation) ``B`` itself is trained, as the table's kp row says.

Scales. A random ``B`` is drawn from the distribution PyTorch initialises the weight of a fresh
``nn.Linear``/``nn.ConvNd`` with, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, so that at initialisation the
error reaching each layer is as large as backprop's would be. The sign-concordant magnitudes follow
from it: ``|R|`` has the distribution of ``|B|``, and usf's single value has ``B``'s root-mean-square,
so all of them send errors of the same size. A dfa matrix ``(num_classes, *in)`` is drawn as the
transposed weight of a fresh ``nn.Linear`` from the layer's input straight to the output would be,
``U(-1/sqrt(n), 1/sqrt(n))`` with ``n`` the number of input elements per example: the error then
reaches every layer with the size backprop gives it through one linear layer, however large the layer
(a ``num_classes``-based bound makes the signal grow with ``sqrt(n)``: conv layers get errors tens of
times backprop's). For
the input of the output layer it is fa's distribution, as it must be: with one hidden layer fa and
dfa are the same rule. ``scale`` multiplies every bound.

``init="xavier"`` draws every feedback matrix from Glorot's ``U(-b, b)``, ``b = sqrt(6 / (fan_in +
fan_out))`` of the matrix's own shape, as ``nn.init.xavier_uniform_`` would (BioTorch's default, for
its weights and feedback alike): for a weight-shaped ``B`` the fans are the weight's, for a dfa matrix
``(num_classes, *in)`` they are ``n`` and ``num_classes`` times the receptive field. usf's value and
the ``|R|`` laws follow from that ``B`` as above.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fa_cli.alignment.names import INITS

#: Rules whose feedback has the weight's shape.
WEIGHT_SHAPED = ("fa", "kp", "usf", "frsf", "brsf")
#: Rules whose feedback is ``sign(W)`` times a stored magnitude.
SIGN_CONCORDANT = ("usf", "frsf", "brsf")


def check_init(init: str) -> str:
    if init not in INITS:
        raise ValueError(f"unknown feedback init {init!r}; choose one of: {', '.join(INITS)}")
    return init


def _xavier_bound(shape: tuple[int, ...]) -> float:
    # nn.init.xavier_uniform_'s bound for a tensor of this shape: dim 1 (and on) is fan-in, dim 0
    # fan-out, each times the receptive field (the dims after the first two).
    receptive = math.prod(shape[2:])
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    return math.sqrt(6.0 / (fan_in + fan_out))


def weight_bound(weight: Tensor, scale: float, init: str = "default") -> float:
    """Bound of ``U(-b, b)`` that ``B`` is drawn from, times scale: PyTorch's default initialisation of
    this weight, or (``init="xavier"``) Glorot's."""
    if init == "xavier":
        return scale * _xavier_bound(tuple(weight.shape))
    # in_features, or in_channels / groups * prod(kernel_size); from the shape, since weight[0]
    # would make a view, and brsf asks for this bound every step.
    fan_in = math.prod(weight.shape[1:])
    return scale / math.sqrt(fan_in)


def direct_bound(shape: tuple[int, ...], input_numel: int, scale: float, init: str = "default") -> float:
    """Bound of the entries of a dfa projection of ``shape`` ``(num_classes, *in)`` for a layer whose
    input has ``input_numel`` elements per example: by default that of a fresh linear layer from this
    input to the output; with ``init="xavier"``, Glorot's for a tensor of ``shape``."""
    if init == "xavier":
        return scale * _xavier_bound(shape)
    return scale / math.sqrt(input_numel)


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None) -> Tensor:
    # Always drawn on the CPU in float32, then moved: the same seed gives the same matrix on any
    # device and in any dtype.
    return torch.empty(shape).uniform_(low, high, generator=generator)


def initial_feedback(
    method: str, weight: Tensor, scale: float, generator: torch.Generator | None, init: str = "default"
) -> Tensor:
    """The ``feedback`` buffer a weight-shaped rule starts with (see the table above)."""
    bound = weight_bound(weight, scale, init)
    shape = tuple(weight.shape)
    if method in ("fa", "kp"):
        values = _uniform(shape, -bound, bound, generator)
    elif method in ("frsf", "brsf"):
        values = _uniform(shape, 0.0, bound, generator)
    elif method == "usf":
        values = torch.full(shape, bound / math.sqrt(3.0))  # RMS of U(-b, b)
    else:
        raise ValueError(f"{method!r} has no weight-shaped feedback")
    values = values.to(device=weight.device, dtype=weight.dtype)
    if method in SIGN_CONCORDANT:
        take_signs(values, weight)
    return values


def initial_direct_feedback(
    num_classes: int,
    shape: tuple[int, ...],
    input_numel: int,
    scale: float,
    generator: torch.Generator | None,
    like: Tensor,
    init: str = "default",
) -> Tensor:
    """A dfa projection ``(num_classes, *shape)`` from the output error to a layer's input of
    ``input_numel`` elements per example (``shape`` is the input's, or its channels alone)."""
    full_shape = (num_classes, *shape)
    bound = direct_bound(full_shape, input_numel, scale, init)
    values = _uniform(full_shape, -bound, bound, generator)
    return values.to(device=like.device, dtype=like.dtype)


def redraw_feedback(feedback: Tensor, weight: Tensor, bound: float) -> None:
    """brsf: ``feedback`` becomes ``sign(W) * |R|`` with a fresh ``|R|`` from ``U(0, bound)``, in place,
    in one pass. Every backward in training calls it right before its matmul reads ``feedback`` (as it
    calls :func:`take_signs` for usf and frsf), so every batch's error goes through a matrix of its own
    (a second backward of the same graph draws again), and the buffer then holds it. Drawn from the
    global RNG, so ``torch.manual_seed`` makes training reproducible and checkpoints of the RNG state
    resume it exactly; written through ``.data``, as :func:`take_signs` writes."""
    if feedback.device.type != "cpu":
        # CUDA's generator is already counter-based (Philox) and parallel.
        feedback.data.uniform_(0.0, bound).copysign_(weight.data)
        return
    # On the CPU torch's generator is a serial mt19937, which made brsf's step 1.7-2.0x backprop's on
    # the 4x1024 MLP; a counter-based generator compiled to SIMD code, with the signs in the same
    # pass, is several times faster (docs/PERFORMANCE.md, twelfth round: Philox), shared over torch's
    # own threads it takes both cores (sixteenth round), and AES in the CPU's AES instructions takes
    # 0.67-0.73 of Philox's time on two threads (seventeenth round). Imported here: only brsf pays
    # numba's import.
    from fa_cli.alignment import aes

    aes.signed_uniform_(feedback.data, weight.data, bound, aes.draw_key())


def from_offset(weight: Tensor, offset: Tensor, scale: Tensor, out: Tensor | None = None) -> Tensor:
    """kp in its offset form: ``B = W + scale * offset``, the ``B`` the optimizer has trained, in one
    pass; into ``out`` when given (the backward rebuilds its ``feedback`` buffer so, through ``.data``,
    as :func:`take_signs` writes)."""
    # weight, offset, out: the weight's shape; scale: a 0-d tensor (no host sync on CUDA).
    return torch.addcmul(weight, offset, scale, out=out)


def take_signs(feedback: Tensor, weight: Tensor) -> None:
    """usf, frsf, brsf: ``feedback`` becomes ``sign(W) * |feedback|``, in place, in one copysign pass
    (for a weight of exactly 0 it keeps the sign bit of that zero instead of giving 0).

    The backward calls it right before its matmul reads ``feedback``, which then finds it in cache,
    and no new matrix is written: 0.77 ms a step on the 4x1024 MLP, where round 1's fresh copysign
    of every layer before the forward took 2.0 ms (docs/PERFORMANCE.md, fourth round). It writes
    through ``.data``, so that the version autograd checks does not move: a graph of an earlier
    forward that saved this same buffer (two forwards, one backward) stays valid, and so do its
    values, which change only when W does."""
    feedback.data.copysign_(weight.data)


def effective(method: str, weight: Tensor, feedback: Tensor) -> Tensor:
    """The matrix a weight-shaped rule sends errors through, for the weight as it is now."""
    if method in SIGN_CONCORDANT:
        return torch.copysign(feedback, weight.detach())
    return feedback
