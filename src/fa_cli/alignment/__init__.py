"""Learning rules as a PyTorch library: backprop, feedback alignment and its relatives.

PyTorch (and numba, for brsf's draws on the CPU), no configuration system, files or datasets::

    from fa_cli.alignment import convert, Linear, Conv2d, train_feedback

    model = convert(my_model, "dfa", seed=0)   # any network; the original is untouched
    layer = Conv2d(64, 128, kernel_size=3, method="usf")   # or build with aligned layers by hand

    kp = convert(my_model, "kp", seed=0)   # Kolen-Pollack: B learns too, by W's update
    optimizer = torch.optim.SGD(kp.parameters(), lr=0.01, weight_decay=1e-4)
    train_feedback(kp, optimizer)

Rules (``METHODS``): ``bp`` exact backprop; ``fa`` feedback alignment (Lillicrap 2016); ``dfa``
direct feedback alignment (Nøkland 2016); ``usf``, ``brsf``, ``frsf`` sign-concordant feedback
(Liao 2016, Moskovitz 2018); ``kp`` Kolen-Pollack (Akrout 2019); ``shallow`` only the output layer
learns.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fa_cli.alignment.names import INITS, METHODS

if TYPE_CHECKING:
    from fa_cli.alignment import metrics
    from fa_cli.alignment.conversion import convert, train_feedback
    from fa_cli.alignment.exact import exact_gradients
    from fa_cli.alignment.layers import AlignmentLayer, Conv1d, Conv2d, Conv3d, Linear

__all__ = [
    "INITS",
    "METHODS",
    "AlignmentLayer",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Linear",
    "convert",
    "exact_gradients",
    "metrics",
    "train_feedback",
]

#: The module each torch-backed name comes from, imported at its first use: the names of the rules
#: (what configs and result tables check against) then come without importing torch, which takes
#: seconds, so that fa-report answers at once. No module is named as a name it gives: importing a
#: submodule binds the package's attribute of that name to the module, which would hide the name.
_MODULES = {
    "AlignmentLayer": "layers",
    "Conv1d": "layers",
    "Conv2d": "layers",
    "Conv3d": "layers",
    "Linear": "layers",
    "convert": "conversion",
    "exact_gradients": "exact",
    "metrics": None,  # a module of its own
    "train_feedback": "conversion",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _MODULES[name]
    value = importlib.import_module(f"{__name__}.{module or name}")
    if module is not None:
        value = getattr(value, name)
    globals()[name] = value  # once: later uses find it without this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
