"""Optimizers see only what learns, Kolen-Pollack's feedback included; schedules step per epoch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fa_cli.alignment import AlignmentLayer, convert
from fa_cli.config import AdamConfig, SGDConfig
from fa_cli.optim import build_optimizer, build_scheduler


def network() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def lrs(schedule: str, epochs: int = 6, **kwargs) -> list[float]:
    cfg = SGDConfig(lr=1.0, momentum=0.0, schedule=schedule, **kwargs)
    optimizer = build_optimizer(cfg, network())
    scheduler = build_scheduler(cfg, optimizer, epochs)
    out = []
    for _ in range(epochs):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_schedules():
    assert lrs("none") == [1.0] * 6
    assert lrs("step", step_size=2, gamma=0.5) == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert lrs("multistep", milestones=[1, 4], gamma=0.1) == pytest.approx([1, 0.1, 0.1, 0.1, 0.01, 0.01])
    cosine = lrs("cosine")
    assert cosine[0] == 1.0 and cosine == sorted(cosine, reverse=True) and cosine[-1] < 0.1


def test_kp_feedback_learns_in_the_same_optimizer_with_the_same_rule():
    model = convert(network(), "kp", seed=0)
    cfg = SGDConfig(lr=0.1, momentum=0.9, weight_decay=1e-3)
    optimizer = build_optimizer(cfg, model)
    scales = [m.offset_form()[1] for m in model.modules() if isinstance(m, AlignmentLayer)]
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["params"] == scales
    assert {k: v for k, v in optimizer.param_groups[1].items() if k != "params"} == {
        k: v for k, v in optimizer.param_groups[0].items() if k != "params"
    }


@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_sgd_makes_the_updates_of_torchs_reference_loop_for_w_and_kp_feedback(nesterov):
    # build_optimizer uses the fused kernel (speed); it must update W and kp's B (here in its offset
    # form: the fused kernel updates the scale) as the for-loop does when B is given a copy of W's
    # gradient.
    torch.manual_seed(0)
    cfg = SGDConfig(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=nesterov)
    net = network()
    fused_model, loop_model = convert(net, "kp", seed=0), convert(net, "kp", seed=0)
    fused = build_optimizer(cfg, fused_model)
    assert fused.param_groups[0]["fused"] and fused.param_groups[1]["fused"]
    loop = torch.optim.SGD(
        loop_model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov
    )
    layers = [m for m in loop_model.modules() if isinstance(m, AlignmentLayer)]
    loop.add_param_group({"params": [m.feedback for m in layers]})
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    for _ in range(3):
        for model, optimizer in ((fused_model, fused), (loop_model, loop)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if optimizer is loop:
                for m in layers:
                    m.feedback.grad = m.weight.grad.clone()
            optimizer.step()
    for m, r in zip(fused_model.modules(), loop_model.modules(), strict=True):
        if isinstance(m, AlignmentLayer):
            torch.testing.assert_close(m.weight, r.weight)
            torch.testing.assert_close(m.bias, r.bias)
            torch.testing.assert_close(m.effective_feedback(), r.feedback)


@pytest.mark.parametrize("method", ["bp", "fa", "dfa"])
def test_fixed_feedback_stays_out_of_the_optimizer(method):
    model = convert(network(), method, num_classes=4, seed=0)
    optimizer = build_optimizer(AdamConfig(lr=1e-3), model)
    assert len(optimizer.param_groups) == 1
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == sum(
        p.numel() for p in model.parameters()
    )


def test_shallow_optimizes_only_the_output_layer():
    model = convert(network(), "shallow", seed=0)
    optimizer = build_optimizer(SGDConfig(lr=0.1, momentum=0.0), model)
    (params,) = [g["params"] for g in optimizer.param_groups]
    assert [tuple(p.shape) for p in params] == [(4, 8), (4,)]


def test_adam_settings_reach_torch():
    cfg = AdamConfig(lr=0.003, betas=[0.8, 0.99], weight_decay=0.01)
    group = build_optimizer(cfg, network()).param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.003, (0.8, 0.99), 0.01)
    assert isinstance(build_optimizer(cfg, network()), torch.optim.Adam)
