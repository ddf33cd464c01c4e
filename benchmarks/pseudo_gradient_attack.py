"""How much a rule's pseudo-gradient would overstate robustness: FGSM on trained runs, once with the true
input gradient (what ``eval.attack`` uses) and once with the gradient the rule's own backward gives.

    python benchmarks/pseudo_gradient_attack.py outputs/inside/ann_a outputs/inside/ann_b \\
        --eps 0 0.05 0.1 0.2 --data /work/shared/data

For each completed run under the folders (its ``checkpoint.pt``'s selected model), prints a Markdown
row: the angle between the two input gradients over the test set, and the test accuracy under FGSM
at each epsilon with the true gradient and with the rule's. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from fa_cli import data
from fa_cli.alignment import metrics
from fa_cli.config import EvalConfig, validate
from fa_cli.eval import attack_accuracies, input_gradient
from fa_cli.report import LABELS
from fa_cli.run import Run


def rule_gradient(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The input gradient as the rule's backward computes it (feedback matrices, not weights)."""
    inputs = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(F.cross_entropy(model(inputs), targets, reduction="sum"), inputs)
    return gradient


def fgsm_with_rule_gradient(model, splits: data.Data, eps: float, batch_size: int) -> float:
    lower, upper = splits.pixel_bounds()
    correct = 0
    for start in range(0, len(splits.test), batch_size):
        x = splits.test.inputs[start : start + batch_size]
        y = splits.test.targets[start : start + batch_size]
        step = eps / splits.std * rule_gradient(model, x, y).sign()
        adversarial = torch.minimum(torch.maximum(x + step, lower), upper)
        with torch.no_grad():
            correct += (model(adversarial).argmax(1) == y).sum().item()
    return 100.0 * correct / len(splits.test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--eps", nargs="+", type=float, default=[0.0, 0.05, 0.1, 0.2])
    parser.add_argument("--data", help="dataset.root for the runs (default: as they were run)")
    args = parser.parse_args()

    rows: dict[str, list[tuple[float, list[float], list[float]]]] = defaultdict(list)
    loaded: dict[str, data.Data] = {}
    for file in sorted(f for folder in args.folders for f in folder.glob("**/results.json")):
        results = json.loads(file.read_text())
        if results.get("status") != "completed" or not (file.parent / "checkpoint.pt").is_file():
            continue
        overrides = [o for o in results["overrides"] if not o.startswith("dataset.root=")]
        overrides += [f"dataset.root={args.data}"] if args.data else []
        with initialize_config_module(config_module="fa_cli.conf", version_base=None):
            cfg = validate(compose(config_name="train", overrides=overrides))
        with tempfile.TemporaryDirectory() as scratch:
            model = Run(cfg, Path(scratch), overrides).model  # built as the run built it
        model.load_state_dict(torch.load(file.parent / "checkpoint.pt", weights_only=True)["best_model"])
        model.eval()
        key = f"{cfg.dataset.name}/{cfg.seed}"
        if key not in loaded:
            loaded[key] = data.load(cfg.dataset, torch.device("cpu"), cfg.seed)
        splits = loaded[key]
        x, y = splits.test.inputs, splits.test.targets
        angle = metrics.angle(rule_gradient(model, x, y), input_gradient(model, x, y))
        true = [p["accuracy"] for p in attack_accuracies(
            model, splits, EvalConfig(attack="fgsm", eps=args.eps), batch_size=1000, seed=cfg.seed
        )]  # fmt: skip
        pseudo = [fgsm_with_rule_gradient(model, splits, eps, 1000) for eps in args.eps]
        rows[cfg.method.name].append((angle, true, pseudo))

    eps_cells = " | ".join(f"ε = {e:g}: true / rule's" for e in args.eps)
    print(f"| Method | Runs | ∠(rule's, true input gradient) | {eps_cells} |")
    print("|---|---:|---:|" + "---:|" * len(args.eps))
    for method, runs in rows.items():
        angle = statistics.fmean(a for a, _, _ in runs)
        cells = []
        for i in range(len(args.eps)):
            true = statistics.fmean(t[i] for _, t, _ in runs)
            pseudo = statistics.fmean(p[i] for _, _, p in runs)
            cells.append(f"{true:.1f} % / {pseudo:.1f} %")
        label = LABELS.get(method, method.capitalize())
        print(f"| {label} | {len(runs)} | {angle:.1f}° | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
