"""Gradient checks of every rule against references written here in plain tensor math."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fa_cli.alignment import Conv1d, Conv2d, Linear, aes, convert, exact_gradients, train_feedback
from fa_cli.alignment.feedback import SIGN_CONCORDANT
from fa_cli.alignment.metrics import angle

pytestmark = pytest.mark.usefixtures("float64")


def _grads(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of <module(x), upstream>, i.e. with ``upstream`` as dL/d(output)."""
    x = x.clone().requires_grad_(True)
    (module(x) * upstream).sum().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    grads["input"] = x.grad
    return grads


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7)])  # Linear on inputs of any rank
def test_fa_linear_sends_error_through_feedback(shape):
    layer = Linear(7, 4, method="fa", seed=0)
    x, delta = torch.randn(shape), torch.randn(*shape[:-1], 4)
    g = _grads(layer, x, delta)
    B = layer.feedback
    assert torch.equal(g["input"], delta @ B)
    flat_delta, flat_x = delta.reshape(-1, 4), x.reshape(-1, 7)
    torch.testing.assert_close(g["weight"], flat_delta.T @ flat_x)
    torch.testing.assert_close(g["bias"], flat_delta.sum(0))


CONVS = [
    (Conv1d, dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1), (2, 3, 11)),
    (Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, dilation=2), (2, 3, 9, 8)),
    (Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, stride=2), (2, 4, 9, 9)),
    (
        Conv2d,
        dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, padding=1),
        (2, 4, 7, 7),
    ),  # depthwise
    (Conv2d, dict(in_channels=3, out_channels=2, kernel_size=4, padding="same"), (2, 3, 7, 7)),  # asymmetric
    (
        Conv2d,
        dict(in_channels=3, out_channels=2, kernel_size=3, padding=1, padding_mode="circular"),
        (2, 3, 6, 6),
    ),
    (Conv2d, dict(in_channels=3, out_channels=2, kernel_size=3, padding="valid", bias=False), (2, 3, 6, 6)),
]


# PyTorch's own nn.Conv2d, the reference, warns that asymmetric 'same' padding copies the input.
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize(("cls", "kwargs", "shape"), CONVS)
def test_fa_conv_sends_error_through_feedback(cls, kwargs, shape):
    layer = cls(**kwargs, method="fa", seed=0)
    reference = getattr(nn, cls.__name__)(**kwargs)
    reference.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "feedback"})
    x = torch.randn(shape)
    delta = torch.randn_like(reference(x))
    g = _grads(layer, x, delta)

    # Reference input gradient: the same convolution with B in the weight's place, differentiated
    # w.r.t. its input (a linear map, so this is exactly "the transposed convolution with B").
    with_feedback = getattr(nn, cls.__name__)(**kwargs)
    with_feedback.weight = nn.Parameter(layer.feedback.clone())
    expected = _grads(with_feedback, x, delta)["input"]
    torch.testing.assert_close(g["input"], expected)
    # Weight and bias gradients are the usual ones.
    usual = _grads(reference, x, delta)
    torch.testing.assert_close(g["weight"], usual["weight"])
    if reference.bias is not None:
        torch.testing.assert_close(g["bias"], usual["bias"])


@pytest.mark.parametrize(("cls", "kwargs", "shape"), CONVS[:4])
@pytest.mark.parametrize("method", ["usf", "frsf", "kp"])
def test_weight_shaped_rules_use_their_effective_feedback(cls, kwargs, shape, method):
    layer = cls(**kwargs, method=method, seed=3)
    x = torch.randn(shape)
    delta = torch.randn_like(layer(x))
    with_feedback = getattr(nn, cls.__name__)(**kwargs)
    with_feedback.weight = nn.Parameter(layer.effective_feedback().clone())
    torch.testing.assert_close(_grads(layer, x, delta)["input"], _grads(with_feedback, x, delta)["input"])


def _tanh_mlp(widths=(6, 9, 8, 7, 4)):
    layers = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def test_dfa_matches_the_report_formula_on_a_three_hidden_layer_tanh_mlp():
    torch.manual_seed(0)
    model = convert(_tanh_mlp(), "dfa", seed=1)
    x, target = torch.randn(5, 6), torch.tensor([0, 3, 1, 2, 3])
    F.cross_entropy(model(x), target).backward()

    linears = [m for m in model if isinstance(m, nn.Linear)]
    W = [m.weight.detach() for m in linears]
    b = [m.bias.detach() for m in linears]
    # Forward by hand: z_i = W_i y_{i-1} + b_i, y_i = tanh(z_i); the output layer is linear.
    ys, zs = [x], []
    for i in range(4):
        zs.append(ys[-1] @ W[i].T + b[i])
        ys.append(torch.tanh(zs[-1]) if i < 3 else zs[-1])
    e = (torch.softmax(zs[3], dim=1) - F.one_hot(target, 4)) / 5  # dL/dz_N for the mean cross entropy
    torch.testing.assert_close(linears[3].weight.grad, e.T @ ys[3])
    for i in range(3):
        # dW_i = ((B_i e) ⊙ φ'(z_i)) y_{i-1}^T; B_i maps the error to layer i's output, which is the
        # next layer's input: that layer's feedback, (num_classes, width of y_i).
        B = linears[i + 1].feedback
        delta = (e @ B) * (1 - torch.tanh(zs[i]) ** 2)
        torch.testing.assert_close(linears[i].weight.grad, delta.T @ ys[i])
        torch.testing.assert_close(linears[i].bias.grad, delta.sum(0))


def test_fa_and_dfa_agree_on_one_hidden_layer_with_the_same_feedback():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    fa, dfa = convert(net, "fa", seed=0), convert(net, "dfa", seed=1)
    x, target = torch.randn(8, 6), torch.randint(0, 3, (8,))
    dfa(x)  # dfa's projections are made at the first forward
    dfa[2].feedback.copy_(fa[2].feedback)  # (3, 10) both: the output error to the hidden layer
    for model in (fa, dfa):
        F.cross_entropy(model(x), target).backward()
    for p, q in zip(fa.parameters(), dfa.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("method", ["usf", "frsf", "brsf"])
def test_sign_concordant_feedback_follows_the_sign_of_w(method):
    torch.manual_seed(0)
    layer = Linear(20, 10, method=method, seed=0)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    signs = torch.sign(layer.weight.detach()).clone()
    for _ in range(3):  # large steps flip some signs
        opt.zero_grad()
        x = torch.randn(16, 20, requires_grad=True)
        out = layer(x)
        out.pow(2).sum().backward()
        # the error went through sign(W) * |B| for W as it is now, and the buffer holds that matrix
        torch.testing.assert_close(x.grad, 2 * out.detach() @ layer.effective_feedback())
        assert torch.equal(layer.feedback, layer.effective_feedback())
        opt.step()
        assert torch.equal(torch.sign(layer.effective_feedback()), torch.sign(layer.weight.detach()))
    assert not torch.equal(signs, torch.sign(layer.weight.detach()))


@pytest.mark.parametrize(("method", "changes"), [("brsf", True), ("frsf", False), ("usf", False)])
def test_brsf_redraws_magnitudes_every_batch_and_frsf_keeps_them(method, changes):
    layer = Linear(20, 10, method=method, seed=0)
    x = torch.randn(4, 20, requires_grad=True)  # an input that gets an error, so B is used
    seen = []
    for _ in range(2):
        layer(x).sum().backward()
        seen.append(layer.feedback.clone())
    assert (not torch.equal(seen[0], seen[1])) == changes
    # the buffer is the matrix the error went through: W's signs, the rule's magnitudes
    assert torch.equal(seen[1], torch.copysign(seen[1], layer.weight.detach()))


@pytest.mark.parametrize("method", ["usf", "frsf"])
def test_two_forwards_then_one_backward_send_each_error_through_its_own_matrix(method):
    # The signs are given in place, in the backward; a second forward must neither break the first
    # one's graph nor change the matrix it sends its error through.
    torch.manual_seed(0)
    layer = Linear(20, 10, method=method, seed=0)
    x1, x2 = (torch.randn(4, 20, requires_grad=True) for _ in range(2))
    out1 = layer(x1)
    matrix1 = layer.effective_feedback().clone()
    out2 = layer(x2)
    matrix2 = layer.effective_feedback().clone()
    delta1, delta2 = torch.randn_like(out1), torch.randn_like(out2)
    ((out1 * delta1).sum() + (out2 * delta2).sum()).backward()
    torch.testing.assert_close(x1.grad, delta1 @ matrix1)
    torch.testing.assert_close(x2.grad, delta2 @ matrix2)
    assert torch.equal(matrix1, matrix2)


def replayed_draw(weight: torch.Tensor, bound: float) -> torch.Tensor:
    """The next brsf matrix the global RNG gives for this weight, drawn here as the backward draws it."""
    matrix = torch.empty_like(weight)
    aes.signed_uniform_(matrix, weight, bound, aes.draw_key())
    return matrix


def test_brsf_draws_each_batchs_matrix_in_its_backward_two_forwards_or_one():
    # brsf's backward draws the batch's matrix into the buffer right before using it: with two
    # graphs alive, each error still goes through a draw of its own, the two draws that follow in
    # the global RNG (which of the two backwards runs first is autograd's choice).
    layer = Linear(20, 10, method="brsf", seed=0)
    weight = layer.weight.detach().clone()
    x1, x2 = (torch.randn(4, 20, requires_grad=True) for _ in range(2))
    out1, out2 = layer(x1), layer(x2)
    delta1, delta2 = torch.randn_like(out1), torch.randn_like(out2)
    torch.manual_seed(7)
    ((out1 * delta1).sum() + (out2 * delta2).sum()).backward()
    torch.manual_seed(7)
    matrices = [replayed_draw(weight, 1 / 20**0.5) for _ in range(2)]
    assert not torch.equal(*matrices)
    matrix1, matrix2 = matrices if torch.allclose(x1.grad, delta1 @ matrices[0]) else matrices[::-1]
    torch.testing.assert_close(x1.grad, delta1 @ matrix1)
    torch.testing.assert_close(x2.grad, delta2 @ matrix2)
    assert torch.equal(layer.feedback, matrices[1])  # the buffer holds the later draw


def test_a_brsf_convolution_sends_its_error_through_the_draw_of_its_backward():
    layer = Conv2d(3, 4, 3, padding=1, method="brsf", seed=0)
    weight = layer.weight.detach().clone()
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    out = layer(x)
    delta = torch.randn_like(out)
    torch.manual_seed(7)
    (out * delta).sum().backward()
    torch.manual_seed(7)
    matrix = replayed_draw(weight, 1 / 27**0.5)  # fan-in 3 * 3 * 3
    assert torch.equal(layer.feedback, matrix)
    torch.testing.assert_close(x.grad, torch.nn.grad.conv2d_input(x.shape, matrix, delta, padding=1))


def test_brsf_draws_again_for_each_backward_in_training_and_never_in_evaluation():
    layer = Linear(20, 10, method="brsf", seed=0)
    x = torch.randn(4, 20, requires_grad=True)
    out = layer(x)
    out.sum().backward(retain_graph=True)
    first = layer.feedback.clone()
    out.sum().backward()  # the same graph again: a new draw
    assert not torch.equal(layer.feedback, first)
    layer.eval()
    kept, rng = layer.feedback.clone(), torch.get_rng_state()
    x.grad = None
    layer(x).sum().backward()
    assert torch.equal(layer.feedback, kept) and torch.equal(torch.get_rng_state(), rng)
    torch.testing.assert_close(x.grad, torch.ones(4, 10) @ kept)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_brsf_draws_on_cuda_with_the_signs_of_w():
    layer = Linear(200, 100, method="brsf", seed=0).cuda()
    x = torch.randn(8, 200, device="cuda", requires_grad=True)
    layer(x).sum().backward()
    drawn = layer.feedback.clone()
    layer(x).sum().backward()
    assert not torch.equal(layer.feedback, drawn)
    assert torch.equal(torch.signbit(drawn), torch.signbit(layer.weight.detach()))
    assert drawn.abs().max() < 1 / 200**0.5 and drawn.abs().mean() > 0.4 / 200**0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_brsf_magnitudes_follow_the_global_seed_and_are_uniform_up_to_the_bound(dtype):
    layer = Linear(400, 300, method="brsf", seed=0).to(dtype)
    x = torch.randn(2, 400, dtype=dtype, requires_grad=True)

    def draw(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        layer(x).sum().backward()  # the backward draws
        return layer.feedback.abs()

    first, again, other = draw(1), draw(1), draw(2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    bound = 1 / 400**0.5
    assert first.dtype == dtype and first.min() >= 0 and first.max() < bound
    # U(0, bound): mean bound/2, standard deviation bound/sqrt(12), 120,000 draws
    assert abs(first.mean().item() - bound / 2) < 0.01 * bound
    assert abs(first.std().item() - bound / 12**0.5) < 0.01 * bound
    assert len(first.unique()) > 0.99 * first.numel()  # not a coarse grid


@pytest.mark.parametrize("method", ["fa", "usf", "frsf", "brsf", "kp"])
@pytest.mark.parametrize("conv", [False, True])
def test_a_layer_whose_input_needs_no_gradient_builds_no_feedback(method, conv, monkeypatch):
    # The first layer sends no error anywhere: its B is never read, so neither copysign nor brsf's
    # draws may run for it, and its parameter gradients stay exact.
    torch.manual_seed(0)
    layer = Conv2d(2, 3, 3, method=method, seed=0) if conv else Linear(6, 3, method=method, seed=0)
    x = torch.randn(4, 2, 5, 5) if conv else torch.randn(4, 6)
    upstream = torch.randn_like(layer(x))
    feedback_before = layer.feedback.clone()
    calls = []
    monkeypatch.setattr(torch.Tensor, "copysign_", lambda *a, **k: calls.append("copysign"))
    rng_before = torch.get_rng_state()
    layer.zero_grad()
    out = layer(x)
    assert "Feedback" not in type(out.grad_fn).__name__  # PyTorch's own backward, not the rule's
    (out * upstream).sum().backward()
    assert calls == []
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(layer.feedback, feedback_before)
    reference = getattr(nn, type(layer).__name__)(*((2, 3, 3) if conv else (6, 3)))
    reference.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "feedback"})
    (reference(x) * upstream).sum().backward()
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad)
    assert layer.feedback.grad is None  # kp's B takes W's gradient at the optimizer's step, not here


def test_kp_feedback_gets_w_gradient_and_aligns_with_w():
    torch.manual_seed(0)
    model = convert(
        nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)), "kp"
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-2)
    train_feedback(model, opt)
    teacher = nn.Linear(10, 3)
    x = torch.randn(256, 10)
    y = teacher(x).argmax(1)
    first = [angle(m.weight, m.effective_feedback()) for m in model if isinstance(m, Linear)]
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    last = [angle(m.weight, m.effective_feedback()) for m in model if isinstance(m, Linear)]
    assert all(a > 80 for a in first)
    assert all(b < a - 20 for a, b in zip(first, last, strict=True)), (first, last)


def _kp_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    net = nn.Sequential(
        Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), Linear(3 * 6 * 6, 8), nn.Tanh(), Linear(8, 4)
    )
    return convert(net, "kp", seed=0), convert(net, "kp", seed=0)


def _aligned(model: nn.Module) -> list[Linear | Conv2d]:
    return [m for m in model.modules() if isinstance(m, (Linear, Conv2d))]


def _assert_same_kp(model: nn.Module, reference: nn.Module, exact: bool) -> None:
    # The reference trains B itself; model's B is its effective feedback in either form. Bit for bit
    # where model trains B too; to float64 rounding where it rebuilds B from its offset.
    for m, r in zip(_aligned(model), _aligned(reference), strict=True):
        for a, b in ((m.weight, r.weight), (m.bias, r.bias), (m.effective_feedback(), r.feedback)):
            if exact:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


KP_OPTIMIZERS = {  # name: (optimizer, whether B - W moves by a scalar under it)
    "sgd-nesterov": (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
        True,
    ),
    "sgd-fused": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, fused=True), True),
    "sgd-dampening": (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=1e-2),
        True,
    ),
    "sgd-maximize": (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, maximize=True, foreach=False),
        True,
    ),
    "sgd-foreach": (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=True),
        True,
    ),
    "adamw-amsgrad": (lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=1e-1, amsgrad=True), True),
    "adamw-fused": (lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=1e-1, fused=True), True),
    "adam-decoupled": (
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-1, decoupled_weight_decay=True),
        True,
    ),
    "adam-no-decay": (lambda p: torch.optim.Adam(p, lr=0.01), True),
    "adam-l2-decay": (lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-2), False),
    "adamw-eps-0": (lambda p: torch.optim.AdamW(p, lr=0.01, eps=0.0), False),  # 0/0 for the scale
    "rmsprop": (lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5), False),
}


@pytest.mark.parametrize("name", list(KP_OPTIMIZERS))
@pytest.mark.parametrize("clip", [False, True])
def test_kp_feedback_takes_exactly_ws_update(name, clip):
    # Reference written here: B in the optimizer, given a copy of W's gradient (clipped or not) just
    # before each step. train_feedback must give B the same updates: bit for bit where it trains B
    # itself, to rounding where it keeps B - W as a scale times its start (and W with it, whose
    # error went through that B).
    make, offset_form = KP_OPTIMIZERS[name]
    model, reference = _kp_pair()
    opt, ref_opt = make(model.parameters()), make(reference.parameters())
    added = train_feedback(model, opt)
    assert [t.shape for t in added] == [() if offset_form else m.weight.shape for m in _aligned(model)]
    assert all((m.offset_form() is not None) == offset_form for m in _aligned(model))
    layers = _aligned(reference)
    ref_opt.add_param_group({"params": [m.feedback for m in layers]})
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    for _ in range(8):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            if m is reference:
                for layer in layers:
                    layer.feedback.grad = layer.weight.grad.clone()
            o.step()
    _assert_same_kp(model, reference, exact=not offset_form)
    assert all(t.grad is None for t in added)
    assert not torch.equal(_aligned(model)[0].effective_feedback(), _kp_pair()[0][0].feedback)  # B learned


def _kp_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, matrix=False):
    """One training step of a kp model; ``matrix``: its B in ``opt`` itself (not through
    train_feedback), given a copy of W's gradient by hand."""
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if matrix:
        for m in _aligned(model):
            m.feedback.grad = m.weight.grad.clone()
    opt.step()


def _kp_trained(steps: int) -> nn.Module:
    """A kp model in the offset form after ``steps`` SGD steps with momentum and weight decay."""
    model = _kp_pair()[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    train_feedback(model, opt)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    for _ in range(steps):
        _kp_step(model, opt, x, y)
    return model


def test_kp_offset_form_keeps_offset_and_scale_in_the_state_dict_and_loads_either_form():
    model = _kp_trained(3)
    state = model.state_dict()
    assert [k for k in state if k.startswith("3.")] == [
        "3.weight", "3.bias", "3.feedback_offset", "3.offset_scale"
    ]  # fmt: skip
    assert 0 < state["3.offset_scale"].item() < 1  # the decay has shrunk B - W
    matrices = [m.effective_feedback() for m in _aligned(model)]
    # Into a model that holds B itself (converted, never given to train_feedback), and back.
    plain = _kp_pair()[0]
    plain.load_state_dict(state)
    assert all(m.offset_form() is None for m in _aligned(plain))
    for m, b in zip(_aligned(plain), matrices, strict=True):
        torch.testing.assert_close(m.feedback, b, rtol=0, atol=1e-15)
    again = _kp_pair()[0]
    train_feedback(again, torch.optim.SGD(again.parameters(), lr=0.1))
    again.load_state_dict(plain.state_dict())
    for m, b in zip(_aligned(again), matrices, strict=True):
        assert m.offset_form()[1].item() == 1.0
        torch.testing.assert_close(m.effective_feedback(), b, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1, dampening=0.2),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, amsgrad=True),
    ],
    ids=["sgd", "adamw"],
)
def test_kp_state_of_b_itself_resumes_in_the_offset_form(make):
    # An older fa-cli's checkpoint: B in the optimizer (matrix form). Three steps, then saved; loaded
    # into a model in the offset form, three more steps must match going on in the matrix form.
    model, _ = _kp_pair()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    opt = make(model.parameters())
    opt.add_param_group({"params": [m.feedback for m in _aligned(model)]})
    for _ in range(3):
        _kp_step(model, opt, x, y, matrix=True)
    # Copies: load_state_dict keeps a saved tensor that needs no cast, which would be opt's own.
    model_state, optimizer_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    untouched = copy.deepcopy(optimizer_state)
    resumed = _kp_pair()[0]
    resumed.load_state_dict(model_state)  # the model first: its offset is B - W, its scale 1
    resumed_opt = make(resumed.parameters())
    train_feedback(resumed, resumed_opt)
    resumed_opt.load_state_dict(optimizer_state)
    for index, entry in untouched["state"].items():  # the state given is left as it was
        assert optimizer_state["state"][index].keys() == entry.keys()
        assert all(torch.equal(optimizer_state["state"][index][k], v) for k, v in entry.items())
    assert all(
        v.dim() == 0 for m in _aligned(resumed) for v in resumed_opt.state[m.offset_form()[1]].values()
    )
    for _ in range(3):
        _kp_step(model, opt, x, y, matrix=True)
        _kp_step(resumed, resumed_opt, x, y)
    _assert_same_kp(resumed, model, exact=False)


def test_kp_scale_state_for_b_itself_and_decay_given_to_adam_later_are_refused():
    model = _kp_pair()[0]
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_feedback(model, sgd)
    _kp_step(model, sgd, x, y)
    state = sgd.state_dict()  # the scales' 0-d momentum in group 1
    rprop = torch.optim.Rprop(model.parameters())  # B itself learns
    train_feedback(model, rprop)
    with pytest.raises(
        ValueError, match=r"kp feedback's \{'momentum_buffer': \(\)\} for a tensor of shape \(3, 1, 3, 3\)"
    ):
        rprop.load_state_dict(state)
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    train_feedback(model, adam)
    _kp_step(model, adam, x, y)
    for group in adam.param_groups:
        group["weight_decay"] = 1e-2
    with pytest.raises(RuntimeError, match="no longer keep B - W a multiple of its start"):
        _kp_step(model, adam, x, y)


@pytest.mark.parametrize(
    "make",
    [lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.1), torch.optim.Rprop],
    ids=["offset", "matrix"],
)
def test_kp_feedback_moved_or_cast_after_train_feedback_is_refused_at_the_step(make):
    # .to() and .float() replace buffers: the optimizer would train a B or scale the layer no longer uses.
    model = _kp_pair()[0]
    opt = make(model.parameters())
    train_feedback(model, opt)
    model.float()  # from float64 (the tests' default dtype)
    F.cross_entropy(model(torch.randn(4, 1, 8, 8, dtype=torch.float32)), torch.randint(0, 4, (4,))).backward()
    with pytest.raises(RuntimeError, match=r"moved or cast \(\.to\(\), \.half\(\)\) after train_feedback"):
        opt.step()


def test_kp_offset_scale_is_float32_under_low_precision_weights():
    # In bfloat16, 1 - lr * decay would round to 1: no decay at all.
    layer = Linear(6, 4, method="kp", seed=0).to(torch.bfloat16)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01, weight_decay=1e-2)
    train_feedback(layer, opt)
    assert layer.offset_form()[1].dtype == torch.float32
    x = torch.randn(3, 6, dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()
    opt.step()
    assert layer.offset_form()[1].item() == pytest.approx(1 - 1e-4)
    assert x.grad.dtype == torch.bfloat16


def test_kp_layer_leaves_the_offset_form_with_the_same_b_and_reset_starts_it_again():
    model = _kp_trained(2)
    matrices = [m.effective_feedback() for m in _aligned(model)]
    adam = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-2)  # B itself must learn
    assert train_feedback(model, adam) == [m.feedback for m in _aligned(model)]
    for m, b in zip(_aligned(model), matrices, strict=True):
        assert m.offset_form() is None and torch.equal(m.feedback, b)
    assert list(model.state_dict())[:3] == ["0.weight", "0.bias", "0.feedback"]
    layer = Linear(6, 4, method="kp", seed=0)  # in the matrix form, reset redraws the B trained
    added = train_feedback(layer, torch.optim.Rprop(layer.parameters()))
    layer.feedback.add_(1.0)
    layer.reset_feedback()
    assert added == [layer.feedback] and torch.equal(
        layer.feedback, Linear(6, 4, method="kp", seed=0).feedback
    )
    layer = Linear(6, 4, method="kp", seed=0)
    train_feedback(layer, torch.optim.SGD(layer.parameters(), lr=0.1))
    scale = layer.offset_form()[1]
    scale.fill_(0.5)
    layer.reset_feedback()
    assert layer.offset_form()[1] is scale and scale.item() == 1.0
    torch.testing.assert_close(
        layer.effective_feedback(), Linear(6, 4, method="kp", seed=0).feedback, rtol=0, atol=1e-15
    )


@pytest.mark.parametrize("resume", [False, True], ids=["", "after-load_state_dict"])
def test_kp_feedback_follows_its_own_weights_group_settings(resume):
    # Weights in groups of their own settings (one changed by hand between steps, as a schedule
    # would; after the optimizer is rebuilt from its state_dict, as on resuming), and one layer's W
    # not in the optimizer at all: each B must take the update of a reference B placed in its W's
    # group, and the untrained W's B must stay as it is.
    model, reference = _kp_pair()
    conv, first, last = _aligned(model)
    ref_conv, ref_first, ref_last = _aligned(reference)

    def optimizer(conv, first, last, feedback=False):
        return torch.optim.SGD(
            [
                {"params": [conv.weight, conv.bias] + ([conv.feedback] if feedback else [])},
                {
                    "params": [first.weight, first.bias] + ([first.feedback] if feedback else []),
                    "lr": 0.3,
                    "weight_decay": 0.1,
                    "nesterov": True,
                },
                {"params": [last.bias]},  # last.weight is not trained
            ],
            lr=0.1,
            momentum=0.9,
            weight_decay=1e-2,
        )

    opt, ref_opt = optimizer(conv, first, last), optimizer(ref_conv, ref_first, ref_last, feedback=True)
    added = train_feedback(model, opt)
    assert len(added) == 2 and added[0] is conv.offset_form()[1] and added[1] is first.offset_form()[1]
    assert last.offset_form() is None
    untrained, first_before = last.feedback.clone(), first.effective_feedback()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    for step in range(4):
        if step == 2:
            if resume:
                state = opt.state_dict()
                opt = optimizer(conv, first, last)
                train_feedback(model, opt)
                opt.load_state_dict(state)
            for o in (opt, ref_opt):
                o.param_groups[1]["lr"] = 0.05
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            if m is reference:
                for layer in (ref_conv, ref_first):
                    layer.feedback.grad = layer.weight.grad.clone()
            o.step()
    _assert_same_kp(model, reference, exact=False)
    assert 0 < first.offset_form()[1].item() < conv.offset_form()[1].item() < 1  # first's decay is 10x
    assert not torch.equal(first.effective_feedback(), first_before)  # B did learn
    assert torch.equal(last.feedback, untrained)


def test_kp_feedback_of_named_parameters_is_named_after_its_weight():
    for make, learned in (
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "offset_scale"),
        (lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=1e-3), "feedback"),
    ):
        model = _kp_pair()[0]
        opt = make(model.named_parameters())
        added = train_feedback(model, opt)
        assert opt.param_groups[1]["params"] == added
        names = [f"{i}.{learned}" for i in (0, 3, 5)]
        assert opt.param_groups[1]["param_names"] == names
        assert opt.state_dict()["param_groups"][1]["param_names"] == names
        with pytest.raises(ValueError, match="already holds kp feedback"):
            train_feedback(model, opt)


def test_kp_feedback_gradient_is_unscaled_once_under_a_grad_scaler():
    # GradScaler.unscale_ walks the optimizer's gradients: B.grad (or the offset scale's) is None
    # then, so W's gradient is unscaled once. With a power-of-two scale the result is exactly the
    # unscaled run's.
    for make in (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-2),
    ):
        model, reference = _kp_pair()
        opt, ref_opt = make(model.parameters()), make(reference.parameters())
        train_feedback(model, opt)
        train_feedback(reference, ref_opt)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
        for _ in range(3):
            opt.zero_grad(set_to_none=False)  # W.grad is kept and accumulated into in place
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            ref_opt.zero_grad(set_to_none=False)
            F.cross_entropy(reference(x), y).backward()
            ref_opt.step()
        state, ref_state = model.state_dict(), reference.state_dict()
        assert list(state) == list(ref_state)
        for (name, a), b in zip(state.items(), ref_state.values(), strict=True):
            assert torch.equal(a, b), name


def test_bp_is_plain_autograd_bit_for_bit():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model = convert(net, "bp")
    x, target = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    for m in (net, model):
        F.cross_entropy(m(x), target).backward()
    for p, q in zip(net.parameters(), model.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("method", ["fa", "dfa", "usf", "brsf", "frsf", "kp"])
def test_exact_gradients_switches_any_rule_back_to_backprop(method):
    torch.manual_seed(0)
    net = _tanh_mlp()
    model = convert(net, method, seed=0)
    x, target = torch.randn(5, 6), torch.tensor([0, 3, 1, 2, 3])
    F.cross_entropy(net(x), target).backward()
    with exact_gradients():
        F.cross_entropy(model(x), target).backward()
    for p, q in zip(net.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def _glorot(weight: torch.Tensor) -> float:
    # Written out here, independently of the library: Glorot's bound sqrt(6 / (fan_in + fan_out)).
    receptive = weight[0][0].numel()
    return (6.0 / (weight.shape[1] * receptive + weight.shape[0] * receptive)) ** 0.5


@pytest.mark.parametrize("method", ["fa", "kp", "usf", "frsf", "brsf"])
@pytest.mark.parametrize(
    "layer", [lambda **k: Linear(300, 40, **k), lambda **k: Conv2d(16, 32, 5, **k)], ids=["linear", "conv"]
)
def test_xavier_init_draws_feedback_from_glorots_law(method, layer):
    # BioTorch draws W and B alike from xavier_uniform_; init="xavier" gives B that law, whatever W.
    for scale in (1.0, 0.5):
        built = layer(method=method, seed=0, scale=scale, init="xavier")
        bound = scale * _glorot(built.weight)
        values = built.feedback
        if method in SIGN_CONCORDANT:  # W's signs from the start, the rule's magnitudes
            assert torch.equal(values, torch.copysign(values, built.weight.detach()))
        if method == "usf":  # one value: the RMS of U(-b, b)
            torch.testing.assert_close(values.abs(), torch.full_like(values, bound / 3**0.5))
            continue
        assert values.abs().max() <= bound and values.abs().max() > 0.95 * bound
        assert abs(values.abs().mean().item() - bound / 2) < 0.05 * bound
        assert "init=xavier" in repr(built)


def test_brsf_redraws_from_the_xavier_bound_too():
    layer = Linear(300, 40, method="brsf", seed=0, init="xavier")
    layer(torch.randn(4, 300, requires_grad=True)).sum().backward()
    bound = _glorot(layer.weight)
    magnitudes = layer.feedback.abs()
    assert magnitudes.max() <= bound and magnitudes.max() > 0.95 * bound


def test_an_unknown_init_is_refused():
    with pytest.raises(ValueError, match="unknown feedback init 'he'"):
        Linear(3, 2, method="fa", init="he")
    with pytest.raises(ValueError, match="unknown feedback init"):
        convert(nn.Linear(3, 2), "fa", init="he")
