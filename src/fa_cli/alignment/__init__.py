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

from fa_cli.alignment import metrics
from fa_cli.alignment.convert import convert, train_feedback
from fa_cli.alignment.exact import exact_gradients
from fa_cli.alignment.layers import METHODS, AlignmentLayer, Conv1d, Conv2d, Conv3d, Linear

__all__ = [
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
