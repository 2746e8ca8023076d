"""The README's Python example runs as written (on a small slice of the data)."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_own_training_loop_example_runs():
    text = README.read_text()
    section = text.split("## Use a head in your own training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'create_dataset("animals")' in code
    code = code.replace('create_dataset("animals")', 'create_dataset("animals", limit=120)')
    code = code.replace("num_prototypes=100, dim=64", "num_prototypes=12, dim=8, backbone_options={'width': 4}")
    code = code.replace("print(", "result = (")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    preds = namespace["result"]
    assert set(preds) == {"k=1", "k=3", "k=5", "k=10"}
    assert all(p.shape == (120,) for p in preds.values())
    assert namespace["model"].projection is not None
