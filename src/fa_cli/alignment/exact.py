"""A switch back to exact backprop, for measuring a rule against the true gradient."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_exact: ContextVar[bool] = ContextVar("fa_cli_exact_gradients", default=False)


@contextmanager
def exact_gradients() -> Iterator[None]:
    """Within this block every converted layer runs as plain PyTorch: gradients are backprop's.

    Forwards run inside the block build an exact autograd graph; the switch is read at forward time.
    Use it for the true gradient a rule is compared with, and for attacks on a model trained with a
    rule (a rule's pseudo-gradient w.r.t. the input would overstate the model's robustness).
    """
    token = _exact.set(True)
    try:
        yield
    finally:
        _exact.reset(token)


def rules_active() -> bool:
    """Whether a forward run now should record a learning rule's backward."""
    return torch.is_grad_enabled() and not _exact.get()
