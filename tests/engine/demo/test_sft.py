"""SFT (how the demo makes pi_init): the loss falls and the model saves in standard form."""

import random

import pytest
import torch

from selfee_fast.demo.sft import SFTSettings, save_model, sft
from selfee_fast.demo.tiny import build_tiny_llama, build_tokenizer

pytestmark = pytest.mark.usefixtures("chunked_backend")


def test_sft_learns_and_reloads(tmp_path):
    rng = random.Random(0)
    demos = []
    for _ in range(300):
        letters = [rng.choice("abcdef") for _ in range(4)]
        demos.append({"prompt": "reverse: " + " ".join(letters), "response": " ".join(reversed(letters))})
    tokenizer = build_tokenizer([d["prompt"] + " " + d["response"] for d in demos], tmp_path / "m", vocab_size=120)
    model = build_tiny_llama(tmp_path / "m", tokenizer, hidden_size=32, layers=2)
    losses = sft(model, tokenizer, demos, SFTSettings(steps=60, batch_size=16, lr=3e-3), log=lambda *_: None)
    assert losses[-1] < 0.5 * losses[0]
    save_model(model, tokenizer, tmp_path / "sft")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    ids = tokenizer("reverse: a b c d", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
