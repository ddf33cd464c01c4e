"""DFA's plumbing: one projection per backward, no backprop-through-weights work, no stale state."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fa_cli.alignment import Conv2d, Linear, convert

pytestmark = pytest.mark.usefixtures("float64")


def _mlp(depth=4, width=16, classes=3):
    layers: list[nn.Module] = [nn.Linear(8, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("method", "backward_matmuls"), [("bp", 4 + 3), ("dfa", 4 + 1)])
def test_dfa_backward_does_one_projection_and_no_matmul_through_weights(method, backward_matmuls):
    # 4 layers: both rules compute 4 weight gradients. Backprop adds an input-gradient matmul for
    # every layer but the first; dfa adds exactly one matmul, the projection for all layers at once.
    model = convert(_mlp(depth=4), method, seed=0)
    loss = F.cross_entropy(model(torch.randn(5, 8)), torch.tensor([0, 1, 2, 0, 1]))
    with CountMatmuls() as counter:
        loss.backward()
    assert counter.count == backward_matmuls


def test_dfa_does_not_need_the_weights_in_backward():
    model = convert(_mlp(), "dfa", seed=0)
    loss = model(torch.randn(5, 8)).sum()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.add_(1.0)  # backprop would fail here: its backward reads W
    loss.backward()


def test_no_stale_state_across_eval_no_grad_and_batch_sizes():
    torch.manual_seed(0)
    model = convert(_mlp(), "dfa", seed=0)
    reference = convert(_mlp(), "dfa", seed=0)
    reference.load_state_dict(model.state_dict())

    def grads(m, x, y):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        return [p.grad.clone() for p in m.parameters()]

    x, y = torch.randn(7, 8), torch.randint(0, 3, (7,))
    expected = grads(reference, x, y)
    # Everything below happens between the forwards; none of it may change the gradients.
    model.eval()
    with torch.no_grad():
        model(torch.randn(3, 8))
    model.train()
    grads(model, torch.randn(2, 8), torch.randint(0, 3, (2,)))  # another batch size
    pending = model(torch.randn(4, 8)).sum()  # a forward whose backward comes later
    got = grads(model, x, y)
    pending.backward()  # and that one still works, with its own batch of 4
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(a, b)


def test_two_forwards_then_two_backwards_keep_their_own_errors():
    torch.manual_seed(0)
    model = convert(_mlp(), "dfa", seed=0)
    xa, xb = torch.randn(3, 8), torch.randn(5, 8)

    def grad_of(x):
        model.zero_grad()
        model(x).pow(2).sum().backward()
        return model[0].weight.grad.clone()

    alone_a, alone_b = grad_of(xa), grad_of(xb)
    model.zero_grad()
    loss_a, loss_b = model(xa).pow(2).sum(), model(xb).pow(2).sum()
    loss_b.backward()
    loss_a.backward()
    torch.testing.assert_close(model[0].weight.grad, alone_a + alone_b)


def test_input_gradient_is_the_projection_to_the_first_layer():
    model = convert(_mlp(), "dfa", seed=0)
    x = torch.randn(4, 8, requires_grad=True)
    out = model(x)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    torch.testing.assert_close(x.grad, upstream @ model[0].feedback)  # (N, K) @ (K, 8)


def test_feedback_shapes_and_seeds():
    model = convert(_mlp(classes=3), "dfa", seed=5)
    assert all(m.feedback is None for m in model if isinstance(m, Linear))  # made at the first forward
    model(torch.randn(2, 8))
    shapes = [tuple(m.feedback.shape) for m in model if isinstance(m, Linear)]
    assert shapes == [(3, 8), (3, 16), (3, 16), (3, 16)]
    again = convert(_mlp(classes=3), "dfa", seed=5)
    again(torch.randn(2, 8))
    for a, b in zip(model.buffers(), again.buffers(), strict=True):
        assert torch.equal(a, b)
    hidden = [m.feedback for m in model if isinstance(m, Linear)][1:]
    assert not torch.equal(hidden[0], hidden[1])  # independent matrices for layers of one shape


def test_conv_projection_full_and_per_channel():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 4 * 4, 3))  # fmt: skip
    x = torch.randn(2, 1, 6, 6)
    full, channel = convert(net, "dfa", seed=0), convert(net, "dfa", seed=0, dfa_projection="channel")
    for model in (full, channel):
        model(x).sum().backward()
    assert tuple(full[2].feedback.shape) == (3, 4, 6, 6)
    assert tuple(channel[2].feedback.shape) == (3, 4)  # one value per channel, shared over space
    assert tuple(channel[5].feedback.shape) == (3, 96)  # linear layers are always full

    # Per channel: the hidden conv's output gradient is e @ B, the same at every position.
    probe = convert(net, "dfa", seed=0, dfa_projection="channel")
    hidden = {}

    def keep_output_grad(module, grad_input, grad_output):
        hidden["grad"] = grad_output[0]

    probe[1].register_full_backward_hook(keep_output_grad)
    out = probe(x)
    out.backward(torch.ones_like(out))
    expected = torch.ones(2, 3) @ probe[2].feedback  # (N, C)
    torch.testing.assert_close(hidden["grad"], expected[:, :, None, None].expand(2, 4, 6, 6))


@pytest.mark.parametrize("projection", ["full", "channel"])
def test_a_single_projected_layer_gets_the_whole_projection_in_its_inputs_shape(projection):
    # One layer wants a projection (the first conv's input needs none): the pass's whole (N, width)
    # projection is that layer's, reshaped to its input (N, C, H, W) or spread over space per channel.
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    model = convert(net, "dfa", seed=0, num_classes=3, dfa_projection=projection)
    hidden = {}
    model[1].register_full_backward_hook(lambda module, grad_in, grad_out: hidden.update(grad=grad_out[0]))
    out = model(torch.randn(2, 1, 6, 6))
    error = torch.randn_like(out)
    out.backward(error)
    projected = error @ model[2].feedback.reshape(3, -1)  # (N, K) @ (K, width)
    expected = (
        projected.view(2, 2, 4, 4) if projection == "full" else projected[:, :, None, None].expand(2, 2, 4, 4)
    )
    torch.testing.assert_close(hidden["grad"], expected)


@pytest.mark.parametrize("projection", ["full", "channel"])
def test_projection_bound_is_that_of_a_linear_layer_from_the_input_to_the_output(projection):
    # U(-1/sqrt(n), 1/sqrt(n)), n = input elements per example: the error's size does not grow with
    # the layer's size (a 10-class bound sent sqrt(n)-times larger errors and conv nets diverged).
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 12 * 12, 10))  # fmt: skip
    for scale in (1.0, 0.5):
        model = convert(net, "dfa", seed=0, dfa_projection=projection, scale=scale)
        model(torch.randn(2, 1, 12, 12))
        for layer, n in ((model[2], 8 * 12 * 12), (model[5], 8 * 12 * 12)):
            bound = scale / n**0.5
            assert layer.feedback.abs().max() <= bound
            assert layer.feedback.abs().max() > 0.9 * bound
            assert abs(layer.feedback.std().item() - bound / 3**0.5) < 0.1 * bound


def test_dfa_feedback_of_the_last_hidden_layer_has_the_distribution_of_fa_feedback():
    # With one hidden layer fa and dfa are one rule; their random matrices must match in law too.
    net = nn.Sequential(nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 10))
    fa, dfa = convert(net, "fa", seed=0), convert(net, "dfa", seed=0)
    dfa(torch.randn(2, 784))
    fa_b, dfa_b = fa[2].feedback, dfa[2].feedback  # (10, 50) both: the weight of the output layer
    assert fa_b.shape == dfa_b.shape
    assert abs(fa_b.abs().max() - dfa_b.abs().max()) < 0.02 / 50**0.5
    assert abs(fa_b.std() - dfa_b.std()) < 0.1 / 50**0.5


def test_checkpoint_restores_projections_before_the_first_forward():
    model = convert(_mlp(), "dfa", seed=0)
    model(torch.randn(2, 8))
    fresh = convert(_mlp(), "dfa", seed=99)
    fresh.load_state_dict(model.state_dict())
    for a, b in zip(model.buffers(), fresh.buffers(), strict=True):
        assert torch.equal(a, b)


def test_custom_feedback_overwritten_in_place_is_used():
    model = convert(_mlp(), "dfa", seed=0)
    model(torch.randn(2, 8)).sum().backward()  # builds and caches the projection matrix
    model[2].feedback.zero_()  # the error no longer reaches layer 0 through layer 2's input
    model.zero_grad()
    model(torch.randn(2, 8)).sum().backward()
    assert torch.count_nonzero(model[0].weight.grad) == 0
    assert torch.count_nonzero(model[2].weight.grad) > 0


def test_clear_errors():
    with pytest.raises(ValueError, match="num_classes"):
        convert(nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), "dfa")
    with pytest.raises(RuntimeError, match="convert"):
        Linear(4, 2, method="dfa")(torch.randn(3, 4))
    model = convert(_mlp(classes=3), "dfa", num_classes=5)
    with pytest.raises(RuntimeError, match="num_classes=5"):
        model(torch.randn(2, 8)).sum().backward()
    with pytest.raises(ValueError, match="bp, fa, dfa"):
        convert(_mlp(), "backprop")


def test_hand_written_dfa_layers_train_once_the_model_is_converted():
    net = nn.Sequential(Conv2d(1, 2, 3, method="dfa"), nn.Flatten(), Linear(2 * 4 * 4, 3, method="dfa"))
    model = convert(net, "dfa")
    model(torch.randn(2, 1, 6, 6)).sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("projection", ["full", "channel"])
def test_xavier_projection_bound_is_glorots_for_the_projections_shape(projection):
    # (K, *in): fan-in the input's elements (or channels), fan-out K times the receptive field.
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 12 * 12, 10))  # fmt: skip
    model = convert(net, "dfa", seed=0, dfa_projection=projection, init="xavier")
    model(torch.randn(2, 1, 12, 12))
    conv_fans = (8 * 12 * 12, 10 * 12 * 12) if projection == "full" else (8, 10)
    for layer, (fan_in, fan_out) in ((model[2], conv_fans), (model[5], (8 * 12 * 12, 10))):
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert layer.feedback.abs().max() <= bound
        assert layer.feedback.abs().max() > 0.9 * bound


def test_the_first_layer_runs_pytorchs_backward_and_still_has_its_projection():
    # Its input needs no gradient: its weight gradient is backprop's, computed by PyTorch's own
    # backward; its projection is still made, so the state_dict has the same keys and shapes.
    model = convert(_mlp(), "dfa", seed=0)
    kinds = []
    model[0].register_forward_hook(lambda module, args, out: kinds.append(type(out.grad_fn).__name__))
    model[2].register_forward_hook(lambda module, args, out: kinds.append(type(out.grad_fn).__name__))
    model(torch.randn(5, 8)).sum().backward()
    assert "Direct" not in kinds[0] and "Direct" in kinds[1]
    assert model[0].feedback is not None and model[0].feedback.shape == (3, 8)
    assert model[0].weight.grad is not None
