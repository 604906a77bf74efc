"""The README's Python examples run as written, on small random tensors."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has no Python example"
    torch.manual_seed(0)
    batch, length, hidden_size, vocab = 4, 6, 16, 50
    hidden = torch.randn(batch, length, hidden_size, requires_grad=True)
    lm_head = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(False)
    labels = torch.randint(0, vocab, (batch, length))
    labels[:, :2] = -100
    names = {"hidden": hidden, "ref_hidden": torch.randn(batch, length, hidden_size), "lm_head": lm_head,
             "labels": labels, "x": hidden, "target": labels}  # fmt: skip
    names["ref_x"] = names["ref_hidden"]
    for block in blocks:
        exec(block, dict(names))  # each example on its own
