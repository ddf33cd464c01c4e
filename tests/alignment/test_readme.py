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
    assert len(namespace["feedback_parameters"](kp)) == 2
