"""The README's library examples run as written (one namespace, in order)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_library_section_examples_run():
    text = README.read_text()
    section = text.split("### `fa_cli.alignment`", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    model, kp = namespace["model"], namespace["kp"]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # kp's optimizer (SGD): each layer's offset scale, in a group of its own
    scales = [m.offset_form()[1] for m in kp if isinstance(m, (namespace["Conv2d"], namespace["Linear"]))]
    added = namespace["optimizer"].param_groups[1]["params"]
    assert len(scales) == len(added) == 2 and all(a is b for a, b in zip(added, scales, strict=True))
