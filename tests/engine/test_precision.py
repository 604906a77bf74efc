"""Mixed precision: which dtype the weights live in, which one the forward computes in, and why.

The reason for fp32 master weights in full fine-tuning is checked, not asserted: one AdamW
step at the paper's lr (5e-7) moves fp32 weights and leaves bf16 weights exactly as they
were (the update is far below bf16's rounding step).
"""

import random

import pytest
import torch

from selfee_fast import models
from selfee_fast.config import load_config
from selfee_fast.demo.tiny import build_tiny_llama, build_tokenizer
from selfee_fast.runtime import resolve_runtime
from selfee_fast.train import TrainPair, TrainSettings, train_stage

pytestmark = pytest.mark.usefixtures("chunked_backend")


@pytest.mark.parametrize(
    ("device", "dtype", "lora_r", "weights", "compute"),
    [
        ("cuda", "auto", 8, torch.bfloat16, torch.bfloat16),  # frozen base in bf16, adapter fp32 (peft)
        ("cuda", "auto", 0, torch.float32, torch.bfloat16),  # full fine-tuning: fp32 master weights
        ("cuda", "bfloat16", 0, torch.bfloat16, torch.bfloat16),  # asked for: pure bf16 (warned)
        ("cuda", "float32", 8, torch.float32, None),
        ("cuda", "float16", 8, torch.float16, None),  # no loss scaling: fp16 is not autocast
        ("cpu", "auto", 8, torch.float32, None),
        ("cpu", "auto", 0, torch.float32, None),
    ],
)
def test_weight_and_compute_dtypes(device, dtype, lora_r, weights, compute):
    config = load_config(None, [f"model.device={device}", f"model.dtype={dtype}", f"model.lora_r={lora_r}"])
    runtime = resolve_runtime(config)
    assert (runtime.device, runtime.weight_dtype) == (torch.device(device), weights)
    assert runtime.autocast_dtype == compute


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    rng = random.Random(0)
    words = "the cat dog sat ran on a mat log".split()
    texts = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(50)]
    tokenizer = build_tokenizer(texts, root / "model", vocab_size=120)
    build_tiny_llama(root / "model", tokenizer, hidden_size=32, layers=1)
    return root / "model"


def one_step(model_dir, tmp_path, *, dtype, autocast, monkeypatch) -> tuple[float, set]:
    """Fraction of trainable weights one full-fine-tuning step at lr 5e-7 changed; dtypes the head saw."""
    model, tokenizer = models.load_model(model_dir, dtype=dtype, gradient_checkpointing=False)
    reference, _ = models.load_model(model_dir, dtype=autocast or dtype, gradient_checkpointing=False)
    reference.requires_grad_(False).eval()
    seen = set()
    real = models.linear_logprobs

    def spy(hidden, weight, *args, **kwargs):
        seen.add((hidden.dtype, weight.dtype))
        return real(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(models, "linear_logprobs", spy)
    ids = tokenizer("the cat sat on a mat").input_ids
    eos = tokenizer.eos_token_id
    pairs = [TrainPair(f"p{i}", ids[:3], [*ids[3:], eos], [*ids[:2], eos]) for i in range(4)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = TrainSettings(lr=5e-7, warmup_ratio=0.0, batch_size=4, micro_batch_size=2, optimizer="adamw",
                             save_every=100, autocast_dtype=str(autocast).removeprefix("torch.") if autocast else None)  # fmt: skip
    train_stage(model, pairs, settings, tmp_path / "train", pad_id=tokenizer.pad_token_id, reference=None,
                reference_model=reference, log=lambda *_: None)  # fmt: skip
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    changed = sum(int((p.detach() != before[name]).sum()) for name, p in trainable)
    return changed / sum(p.numel() for _, p in trainable), seen


def test_fp32_master_weights_take_updates_bf16_weights_lose(tiny_model_dir, tmp_path, monkeypatch):
    mixed, seen = one_step(tiny_model_dir, tmp_path / "mixed", dtype=torch.float32, autocast=torch.bfloat16,
                           monkeypatch=monkeypatch)  # fmt: skip
    assert seen == {(torch.bfloat16, torch.bfloat16)}, "under autocast the fused head computes in bf16"
    pure, _ = one_step(tiny_model_dir, tmp_path / "pure", dtype=torch.bfloat16, autocast=None,
                       monkeypatch=monkeypatch)  # fmt: skip
    assert mixed > 0.5, f"fp32 master weights: {mixed:.1%} of the weights moved"
    assert pure < 0.01, f"pure bf16: {pure:.1%} of the weights moved at lr 5e-7"


def test_a_bf16_frozen_copy_computes_what_the_fp32_policy_computes_under_autocast(tiny_model_dir):
    from selfee_fast.roles import frozen_copy

    model, tokenizer = models.load_model(tiny_model_dir, dtype=torch.float32, gradient_checkpointing=False)
    reference = frozen_copy(model, torch.bfloat16)
    assert reference.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.tensor([tokenizer("the cat sat on a mat the dog ran").input_ids] * 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        policy = models.sequence_token_logprobs(model.eval(), ids, torch.ones_like(ids), ids).policy
        frozen = models.sequence_token_logprobs(reference, ids, torch.ones_like(ids), ids).policy
    assert torch.equal(policy, frozen), "reference and policy must agree at step 0"
