"""``Linear`` and ``Conv1d/2d/3d`` that learn with a chosen rule.

They are ``nn.Linear`` and ``nn.ConvNd`` (``isinstance`` holds, the parameters and forward output are
the same); only the backward changes, by ``method``:

- ``bp``: exact backprop. ``shallow``: exact, but the layer is frozen (``requires_grad=False``).
- ``fa``, ``kp``, ``usf``, ``frsf``, ``brsf``: the error reaching the input goes through the layer's
  ``effective_feedback()`` instead of its weight (see :mod:`fa_cli.alignment.feedback`); brsf's
  backward in training first draws new magnitudes into it.
- ``dfa``: the input receives the model's output error projected by ``feedback``; the model must be
  converted with ``convert(model, "dfa")`` so the error is captured (see :mod:`fa_cli.alignment.dfa`).

``feedback`` is a buffer: in ``state_dict`` and moved by ``.to()``, never returned by
``parameters()``. Overwrite it in place (``layer.feedback.copy_(B)``) to use a matrix of your own (for
kp, before :func:`fa_cli.alignment.train_feedback`, which may put it in its offset form: the buffers
``feedback_offset`` and ``offset_scale`` then hold it, see :mod:`fa_cli.alignment.feedback`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fa_cli.alignment import feedback as fb
from fa_cli.alignment.dfa import Projection, current_pass
from fa_cli.alignment.exact import rules_active
from fa_cli.alignment.functional import ConvDirect, ConvFeedback, LinearDirect, LinearFeedback, Remake
from fa_cli.alignment.names import METHODS

PROJECTIONS = ("full", "channel")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    return method


class AlignmentLayer:
    """What ``Linear`` and ``ConvNd`` share: the rule, its feedback buffer, and the dfa plumbing."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    feedback: Tensor | None

    def setup_rule(
        self,
        method: str,
        *,
        scale: float = 1.0,
        seed: int | None = None,
        num_classes: int | None = None,
        projection: str = "full",
        init: str = "default",
    ) -> None:
        """(Re)configure the rule. ``seed`` fixes this layer's feedback; ``None`` draws a seed from
        the global RNG, so ``torch.manual_seed`` still makes it reproducible. ``scale`` and ``init``
        say how the feedback is drawn (see :mod:`fa_cli.alignment.feedback`)."""
        if projection not in PROJECTIONS:
            raise ValueError(
                f"unknown dfa projection {projection!r}; choose one of: {', '.join(PROJECTIONS)}"
            )
        self.method = check_method(method)
        self.scale = float(scale)
        self.init = fb.check_init(init)
        self.feedback_seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
        self.num_classes = num_classes
        self.projection = projection
        if method == "shallow":
            for p in self.parameters(recurse=False):  # type: ignore[attr-defined]
                p.requires_grad_(False)
        self.reset_feedback()

    def reset_feedback(self) -> None:
        """Draw the feedback again from the layer's seed (dfa's is drawn at the next forward). A kp
        layer in its offset form starts again from the new ``B``: ``feedback_offset`` becomes
        ``B - W`` and ``offset_scale`` 1. A matrix of the same shape is redrawn in place, so an optimizer
        that trains kp's ``B`` (or its scale) goes on doing so, with the momentum or moments it has."""
        feedback = None
        if self.method in fb.WEIGHT_SHAPED:
            feedback = fb.initial_feedback(self.method, self.weight, self.scale, self._generator(), self.init)
        current = self._buffers.get("feedback")  # type: ignore[attr-defined]
        if current is not None and feedback is not None and current.shape == feedback.shape:
            with torch.no_grad():  # in place: an optimizer may be training this very tensor (kp)
                current.copy_(feedback)
        elif "feedback" in self._buffers:  # type: ignore[attr-defined]
            self.feedback = feedback
        else:
            self.register_buffer("feedback", feedback)  # type: ignore[attr-defined]
        if self.offset_form() is not None:
            self._restart_offset()

    def effective_feedback(self) -> Tensor | None:
        """The matrix errors go through now: ``B`` (fa, kp), ``sign(W) * |feedback|`` (usf, frsf,
        brsf), the projection ``(num_classes, *input)`` (dfa), or None (bp, shallow). For brsf it is
        the one the last error went through: each backward in training draws its own."""
        offset = self.offset_form()
        if offset is not None:
            return fb.from_offset(self.weight.detach(), *offset)
        if self.feedback is None:
            return None
        return fb.effective(self.method, self.weight, self.feedback)

    def offset_form(self) -> tuple[Tensor, Tensor] | None:
        """kp in its offset form: ``(feedback_offset, offset_scale)``, with ``B = W + offset_scale *
        feedback_offset``; None for every other layer."""
        buffers = self._buffers  # type: ignore[attr-defined]
        if "feedback_offset" not in buffers:
            return None
        return buffers["feedback_offset"], buffers["offset_scale"]

    def _take_offset_form(self) -> None:
        """kp: keep ``B`` as ``W + offset_scale * feedback_offset`` from now on (see
        :mod:`fa_cli.alignment.feedback`). ``feedback`` stays, out of ``state_dict``, as the matrix the
        last backward rebuilt. A layer already in that form keeps its offset and scale."""
        assert self.method == "kp" and self.feedback is not None
        if self.offset_form() is not None:
            return
        self.register_buffer("feedback_offset", torch.empty_like(self.feedback))  # type: ignore[attr-defined]
        # At least float32: in bfloat16, 1 - lr * decay would round to 1.
        dtype = torch.promote_types(self.feedback.dtype, torch.float32)
        self.register_buffer("offset_scale", torch.empty((), dtype=dtype, device=self.feedback.device))  # type: ignore[attr-defined]
        self._non_persistent_buffers_set.add("feedback")  # type: ignore[attr-defined]
        self._restart_offset()

    def _restart_offset(self) -> None:
        """kp's offset form from ``B`` as ``feedback`` holds it: ``B - W``, scale 1, in place (an
        optimizer may hold ``offset_scale``)."""
        offset, scale = self.offset_form()  # type: ignore[misc]
        with torch.no_grad():
            torch.sub(self.feedback, self.weight, out=offset)
            scale.fill_(1.0)

    def _leave_offset_form(self) -> None:
        """kp: hold ``B`` itself again (``feedback``, in ``state_dict``), as it is now."""
        if self.offset_form() is None:
            return
        assert self.feedback is not None
        with torch.no_grad():
            fb.from_offset(self.weight, *self.offset_form(), out=self.feedback)  # type: ignore[misc]
        del self._buffers["feedback_offset"], self._buffers["offset_scale"]  # type: ignore[attr-defined]
        self._non_persistent_buffers_set.discard("feedback")  # type: ignore[attr-defined]

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.feedback_seed)

    def _backprop_suffices(self, input: Tensor) -> bool:
        """True when PyTorch's own forward and backward give exactly this rule's gradients: for bp and
        shallow; without autograd (evaluation, ``exact_gradients``); and where no error goes to the
        input (the first layer), since every rule's weight and bias gradients are then backprop's,
        computed in C++ rather than through a Python ``autograd.Function``."""
        if self.method in ("bp", "shallow") or not rules_active():
            return True
        return not input.requires_grad

    def _keep_projection(self, input: Tensor) -> None:
        """A dfa layer whose input needs no gradient (the first) still makes its projection when it
        trains, so that its state_dict is the same whether or not that input needs one. Once made,
        it is never read, so later forwards skip the ticket."""
        if self.method == "dfa" and self.feedback is None and rules_active():
            self._direct_ticket(input)

    def _feedback_args(self) -> tuple[Tensor, Remake | None]:
        """What the rule's Function needs to send errors through ``feedback``: the buffer, and how its
        backward remakes it first (usf, frsf: W's signs; brsf in training: fresh magnitudes with W's
        signs; kp in its offset form: ``W + offset_scale * feedback_offset``), or None (fa, kp)."""
        assert self.feedback is not None
        offset = self.offset_form()
        if offset is not None:
            return self.feedback, Remake(self.weight, offset=offset)
        if self.method == "brsf" and self.training:  # type: ignore[attr-defined]
            bound = fb.weight_bound(self.weight, self.scale, self.init)  # type: ignore[attr-defined]
            return self.feedback, Remake(self.weight, redraw=bound)
        if self.method in fb.SIGN_CONCORDANT:
            return self.feedback, Remake(self.weight)
        return self.feedback, None

    def _direct_ticket(self, input: Tensor) -> Projection | None:
        """dfa: make sure this layer has its projection, and ask the running pass for a slice."""
        current = current_pass()
        if current is None:
            raise RuntimeError(
                "a dfa layer ran outside a model converted for dfa: use "
                "fa_cli.alignment.convert(model, 'dfa') so the output error can be captured"
            )
        channel = (
            self.projection == "channel" and input.dim() > 2 and isinstance(self, nn.modules.conv._ConvNd)
        )
        shape = input.shape[1:]
        wanted = torch.Size((current.state.num_classes, *(shape[:1] if channel else shape)))
        feedback = self.feedback
        if feedback is None:
            feedback = self.feedback = fb.initial_direct_feedback(
                wanted[0], wanted[1:], shape.numel(), self.scale, self._generator(), self.weight, self.init
            )
        elif feedback.shape != wanted:
            raise RuntimeError(
                f"dfa feedback of shape {tuple(feedback.shape)} was made for other inputs; this input "
                f"needs {tuple(wanted)} (inputs of one shape per example, and the model's num_classes)"
            )
        return current.add(feedback, shape, channel) if input.requires_grad else None

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # A dfa layer makes its feedback at the first forward; a checkpoint may bring it sooner.
        saved = state_dict.get(prefix + "feedback")
        if self.feedback is None and saved is not None and self.method == "dfa":
            self.feedback = torch.empty_like(saved, device=self.weight.device, dtype=self.weight.dtype)
        if self.method == "kp":
            self._match_kp_form(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]

    def _match_kp_form(self, state_dict: dict[str, Any], prefix: str) -> None:
        # A kp state in the other form than this layer's (B itself, or its offset from W) is the same
        # B: rewritten in this layer's form, in the dict load_state_dict made for the load.
        weight, matrix = prefix + "weight", prefix + "feedback"
        offset, scale = prefix + "feedback_offset", prefix + "offset_scale"
        if weight not in state_dict:
            return
        has_matrix = matrix in state_dict
        has_offset = offset in state_dict and scale in state_dict
        if self.offset_form() is not None and has_matrix and not has_offset:
            state_dict[offset] = state_dict.pop(matrix) - state_dict[weight]
            state_dict[scale] = torch.ones((), dtype=state_dict[offset].dtype)
        elif self.offset_form() is None and has_offset and not has_matrix:
            d, s = state_dict.pop(offset), state_dict.pop(scale)
            state_dict[matrix] = fb.from_offset(state_dict[weight], d, s)

    def _rule_repr(self) -> str:
        text = f"method={self.method}"
        if self.method not in ("bp", "shallow") and self.scale != 1.0:
            text += f", scale={self.scale:g}"
        if self.method not in ("bp", "shallow") and self.init != "default":
            text += f", init={self.init}"
        if self.method == "dfa" and self.projection != "full":
            text += f", projection={self.projection}"
        return text


class Linear(AlignmentLayer, nn.Linear):
    """``nn.Linear`` on inputs of any rank ``(*, in_features)``, learning with ``method``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        method: str = "fa",
        scale: float = 1.0,
        seed: int | None = None,
        init: str = "default",
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self.setup_rule(method, scale=scale, seed=seed, init=init)

    def forward(self, input: Tensor) -> Tensor:
        if self._backprop_suffices(input):
            self._keep_projection(input)
            return F.linear(input, self.weight, self.bias)
        if self.method == "dfa":
            return LinearDirect.apply(input, self.weight, self.bias, self._direct_ticket(input))
        return LinearFeedback.apply(input, self.weight, self.bias, *self._feedback_args())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._rule_repr()}"


class _ConvNd(AlignmentLayer):
    """The rule-aware forward shared by Conv1d, Conv2d and Conv3d."""

    padding_mode: str
    padding: Any
    _reversed_padding_repeated_twice: list[int]

    def __init__(
        self,
        *args: Any,
        method: str = "fa",
        scale: float = 1.0,
        seed: int | None = None,
        init: str = "default",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)  # the nn.ConvNd next in the MRO: same arguments as PyTorch's
        self.setup_rule(method, scale=scale, seed=seed, init=init)

    def forward(self, input: Tensor) -> Tensor:
        if self._backprop_suffices(input):
            self._keep_projection(input)
            return self._conv_forward(input, self.weight, self.bias)  # type: ignore[attr-defined]
        input, padding = self._padded(input)
        conf = (self.stride, padding, self.dilation, self.groups)  # type: ignore[attr-defined]
        if self.method == "dfa":
            return ConvDirect.apply(input, self.weight, self.bias, self._direct_ticket(input), *conf)
        feedback, remake = self._feedback_args()
        return ConvFeedback.apply(input, self.weight, self.bias, feedback, *conf, remake)

    def _padded(self, input: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """The input and the symmetric zero padding left for the convolution itself.

        Non-zero padding modes and asymmetric 'same' padding are done here with ``F.pad``, whose
        gradient is exact, exactly as ``nn.ConvNd`` does them.
        """
        dims = input.dim() - 2
        pads = self._reversed_padding_repeated_twice  # (left, right) per dim, last dim first
        if self.padding_mode != "zeros":
            return F.pad(input, pads, mode=self.padding_mode), (0,) * dims
        if not isinstance(self.padding, str):
            return input, tuple(self.padding)
        if pads[0::2] == pads[1::2]:  # 'valid', or 'same' that splits evenly
            return input, tuple(reversed(pads[0::2]))
        return F.pad(input, pads), (0,) * dims

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._rule_repr()}"  # type: ignore[misc]


class Conv1d(_ConvNd, nn.Conv1d):
    """``nn.Conv1d`` with ``method``; stride, padding (also "same"), dilation, groups, padding_mode."""


class Conv2d(_ConvNd, nn.Conv2d):
    """``nn.Conv2d`` with ``method``; stride, padding (also "same"), dilation, groups, padding_mode."""


class Conv3d(_ConvNd, nn.Conv3d):
    """``nn.Conv3d`` with ``method``; stride, padding (also "same"), dilation, groups, padding_mode."""


#: PyTorch layer class -> the class it is converted to.
CONVERTIBLE: dict[type[nn.Module], type[AlignmentLayer]] = {
    nn.Linear: Linear,
    nn.Conv1d: Conv1d,
    nn.Conv2d: Conv2d,
    nn.Conv3d: Conv3d,
}
