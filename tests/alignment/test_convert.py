"""convert() on the project's kind of models and on torchvision classifiers, for every rule."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fa_cli.alignment import METHODS, AlignmentLayer, Linear, convert, metrics, train_feedback


def _cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10),
    )  # fmt: skip


def _train_step(model, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    train_feedback(model, opt)
    before = [p.detach().clone() for p in params]
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    return sum(not torch.equal(a, p) for a, p in zip(before, params, strict=True)), len(params)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121"])
def test_torchvision_classifiers_convert_and_train_with_every_rule(name):
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(num_classes=10).eval()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    with torch.no_grad():
        expected = net(x)
    for method in METHODS:
        model = convert(net, method, seed=0).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
        changed, trainable = _train_step(model.train(), x, y)
        assert changed >= 0.9 * trainable, (method, changed, trainable)  # BN biases may see a zero gradient
        if method == "shallow":
            assert trainable == 2  # the classifier's weight and bias


@pytest.mark.parametrize("method", METHODS)
def test_convert_copies_and_leaves_the_original_untouched(method):
    torch.manual_seed(0)
    net = _cnn()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    model = convert(net, method, seed=0)
    x = torch.randn(4, 1, 14, 14)
    net.eval(), model.eval()
    torch.testing.assert_close(model(x), net(x), atol=1e-6, rtol=0)
    model.train()
    _train_step(model, x, torch.tensor([0, 1, 2, 3]))
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in net if isinstance(m, (nn.Conv2d, nn.Linear)))
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    converted = [m for m in model.modules() if isinstance(m, AlignmentLayer)]
    assert len(converted) == 4 and all(m.method in (method, "bp") for m in converted)


@pytest.mark.parametrize("method", ["fa", "usf", "brsf", "frsf", "kp", "dfa"])
def test_feedback_is_a_buffer_seeded_and_independent_per_layer(method):
    net = _cnn()
    a, b, c = (convert(net, method, seed=s) for s in (1, 1, 2))
    x = torch.randn(2, 1, 14, 14)
    for model in (a, b, c):
        model.eval()(x)  # dfa makes its projections at the first forward; brsf redraws only in training
    fa_, fb_, fc_ = (
        [m.feedback for m in model.modules() if isinstance(m, AlignmentLayer)] for model in (a, b, c)
    )
    assert all(torch.equal(p, q) for p, q in zip(fa_, fb_, strict=True))
    if method != "usf":  # usf's magnitude is one value, the same for every seed
        assert not any(torch.equal(p, q) for p, q in zip(fa_, fc_, strict=True))
    feedback_ids = {id(t) for t in fa_}
    assert not feedback_ids & {id(p) for p in a.parameters()}
    assert sum(k.endswith("feedback") for k in a.state_dict()) == 4
    # two layers whose feedback has the same shape do not share values
    same_shape = convert(nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 5)), method, seed=0)
    same_shape(torch.randn(1, 5))
    first, second = (m.feedback for m in list(same_shape)[1:])
    assert not torch.equal(first, second) or method == "usf"


def test_kp_feedback_trains_with_the_optimizer_and_others_do_not():
    fa = convert(_cnn(), "fa")
    opt = torch.optim.SGD(fa.parameters(), lr=0.1)
    assert train_feedback(fa, opt) == [] and len(opt.param_groups) == 1
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    for make, offset_form in ((lambda p: torch.optim.SGD(p, lr=0.1), True), (torch.optim.Rprop, False)):
        layer = Linear(6, 4, method="kp", seed=0)
        opt = make(layer.parameters())
        (added,) = train_feedback(layer, opt)
        assert opt.param_groups[1]["params"] == [added]
        assert added is (layer.offset_form()[1] if offset_form else layer.feedback)
        w, b = layer.weight.detach().clone(), layer.effective_feedback().clone()
        layer(torch.randn(3, 6)).sum().backward()
        opt.step()
        # Same update for W and B: their difference does not change (no weight decay here).
        torch.testing.assert_close(layer.effective_feedback() - b, layer.weight.detach() - w)
        assert not torch.equal(layer.effective_feedback(), b)


def test_metrics_angles():
    torch.manual_seed(0)
    bp = convert(_cnn(), "bp")
    x, y = torch.randn(8, 1, 14, 14), torch.randint(0, 10, (8,))
    assert all(a < 1e-3 for a in metrics.update_gradient_angles(bp, x, y).values())

    wide = convert(nn.Sequential(nn.Linear(512, 512)), "fa", seed=0)
    (angle,) = metrics.weight_feedback_angles(wide).values()
    assert 85 < angle < 95  # W and a fresh random B are nearly orthogonal

    dfa = convert(_cnn(), "dfa", seed=0)
    state = {k: v.clone() for k, v in dfa.state_dict().items()}
    angles = metrics.update_gradient_angles(dfa, x, y)
    assert set(angles) == {"0", "4", "7", "9"} and angles["9"] < 1e-3  # the output layer gets e itself
    assert 0 < angles["0"] < 180
    for k, v in state.items():  # measuring leaves BatchNorm statistics and the rest as they were
        assert torch.equal(v, dfa.state_dict()[k]), k
