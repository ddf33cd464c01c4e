"""eval.attack=fgsm|pgd: test accuracy under an L-infinity attack that follows the true input gradient."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fa_cli import data, engine, models, report
from fa_cli.alignment import convert, metrics
from fa_cli.config import ConfigError, EvalConfig, MLPConfig, SyntheticDatasetConfig
from fa_cli.eval import attack_accuracies, fgsm, input_gradient, pgd
from inprocess import config, run


@pytest.fixture(scope="module")
def splits() -> data.Data:
    cfg = SyntheticDatasetConfig(name="synthetic", train_size=600, test_size=300, noise=4.0)
    return data.load(cfg, torch.device("cpu"), seed=0)


@pytest.fixture(scope="module")
def trained(splits) -> torch.nn.Module:
    """An FA-trained MLP that classifies the generated images well."""
    torch.manual_seed(0)
    network = models.build(MLPConfig(name="mlp", widths=[64]), in_channels=1, image_size=28, num_classes=10)
    model = convert(network, "fa", seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    for _ in engine.fit(model, optimizer, scheduler, splits, epochs=4, batch_size=32, eval_batch_size=100,
                        generator=torch.Generator().manual_seed(0)):  # fmt: skip
        pass
    assert engine.evaluate(model, splits.test, 100)[1] > 80
    return model


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_an_attack_at_eps_0_gives_the_clean_accuracy_exactly(trained, splits, attack):
    clean_loss, clean_accuracy = engine.evaluate(trained, splits.test, 100)
    cfg = EvalConfig(attack=attack, eps=[0.0])
    (point,) = attack_accuracies(trained, splits, cfg, batch_size=100, seed=0)
    assert (point["eps"], point["accuracy"], point["loss"]) == (0.0, clean_accuracy, clean_loss)


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_an_attack_lowers_the_accuracy_of_a_trained_model(trained, splits, attack):
    cfg = EvalConfig(attack=attack, eps=[0.0, 0.02, 0.1])
    points = attack_accuracies(trained, splits, cfg, batch_size=100, seed=0)
    clean, small, large = (p["accuracy"] for p in points)
    assert clean - 10 > small >= large
    assert large < 20


def test_pgd_is_at_least_as_strong_as_fgsm(trained, splits):
    fgsm_points, pgd_points = (
        attack_accuracies(trained, splits, EvalConfig(attack=attack, eps=[0.03]), batch_size=100, seed=0)
        for attack in ("fgsm", "pgd")
    )
    assert pgd_points[0]["accuracy"] <= fgsm_points[0]["accuracy"]


def test_adversarial_images_stay_within_eps_and_are_valid_images(trained, splits):
    x, y = splits.test.inputs[:100], splits.test.targets[:100]
    lower, upper = splits.pixel_bounds()
    eps = 0.1 / splits.std
    for adversarial in (
        fgsm(trained, x, y, eps, lower, upper),
        pgd(trained, x, y, eps, lower, upper, steps=5, step_size=0.5, generator=torch.Generator()),
    ):
        pixels, original = adversarial * splits.std + splits.mean, x * splits.std + splits.mean
        assert (pixels - original).abs().max() <= 0.1 + 1e-5
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
        assert (pixels - original).abs().max() > 0.09  # the budget is used


def test_the_attack_follows_the_true_gradient_not_the_rules(trained, splits):
    x, y = splits.test.inputs[:200], splits.test.targets[:200]
    plain = copy.deepcopy(trained)
    for layer in plain.modules():  # the same weights, with exact backprop as the rule
        if hasattr(layer, "method"):
            layer.method = "bp"
    x_plain = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.cross_entropy(plain(x_plain), y, reduction="sum"), x_plain)
    trained.zero_grad(set_to_none=True)
    assert torch.allclose(input_gradient(trained, x, y), expected, atol=1e-6)
    assert all(p.grad is None for p in trained.parameters())  # the attack leaves the model's gradients
    # The rule's own backward sends the error through B: another direction, which an attack should not use.
    x_rule = x.clone().requires_grad_(True)
    trained.train()
    (pseudo,) = torch.autograd.grad(F.cross_entropy(trained(x_rule), y, reduction="sum"), x_rule)
    assert metrics.angle(pseudo, expected) > 45


def test_a_run_with_an_attack_records_it_in_results_and_summaries(tmp_path):
    results = run(tmp_path, "method=fa", "eval.attack=fgsm", "eval.eps=[0,0.1]")
    robustness = results["robustness"]
    assert robustness["attack"] == "fgsm" and [p["eps"] for p in robustness["results"]] == [0.0, 0.1]
    assert robustness["results"][0]["accuracy"] == results["test_accuracy"]
    assert robustness["results"][1]["accuracy"] < results["test_accuracy"]
    no_attack = run(tmp_path / "clean", "method=fa")
    assert no_attack["robustness"] is None

    points = [{"eps": 0.0, "accuracy": results["test_accuracy"] + 2}, {"eps": 0.1, "accuracy": 3.0}]
    other = {**results, "seed": 1, "robustness": {"attack": "fgsm", "results": points}}
    text = report.to_markdown(report.summarize([results, other]))
    table = text.split("### synthetic · ann: test accuracy under FGSM attack\n\n", 1)[1]
    header, rule, row = table.splitlines()[:3]
    assert header == "| Method | ε = 0 | ε = 0.1 |" and rule == "|---|---:|---:|"
    clean = results["test_accuracy"] + 1
    assert row.startswith(f"| FA | {clean:.2f} ± 1.41 % | ")
    assert any("under FGSM" in str(t.title) for t in report.to_rich(report.summarize([results])))


@pytest.mark.parametrize(
    "override,key",
    [
        ("eval.attack=cw", "eval.attack"),
        ("eval.eps=[0.1,2]", r"eval.eps\[1\]"),
        ("eval.steps=0", "eval.steps"),
    ],
)
def test_bad_attack_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        config(override)
