"""`FusedDPOTrainer` against TRL's own `DPOTrainer`: the same first batch gives the same loss and gradients.

A tiny Llama and a word-level tokenizer are built here, so nothing is downloaded. trl is a
bench extra: without it the module is skipped.
"""

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from conftest import assert_close

pytest.importorskip("trl", reason="trl is not installed (a bench extra; CI installs only .[test])")
pytestmark = pytest.mark.trl

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from selfee_fast.trl_dpo import FusedDPOTrainer  # noqa: E402

WORDS = ["<pad>", "<eos>", "<unk>", *"the cat dog sat ran on a mat fast slow red blue big small".split()]
PAIRS = {
    "prompt": ["the cat", "a dog ran", "the red mat", "big"],
    "chosen": [" sat on a mat", " fast", " sat", " blue cat ran"],
    "rejected": [" ran", " slow on the mat", " big dog", " small"],
}


def tiny_models():
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, eos_token_id=1, bos_token_id=None,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    reference = copy.deepcopy(model)
    with torch.no_grad():  # a reference that differs from the policy, so the log-ratios are not 0
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tokenizer, model, reference


def make_trainer(cls, tmp_path, **config):
    """bf16 off unless asked: TRL autocasts the reference model's forward, and the comparison is at fp32."""
    config.setdefault("bf16", False)
    tokenizer, model, reference = tiny_models()
    args = DPOConfig(output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=4, report_to="none",
                     use_cpu=True, disable_dropout=True, max_steps=1, logging_steps=1, save_strategy="no",
                     **config)  # fmt: skip
    return cls(model=model, ref_model=reference, args=args, train_dataset=Dataset.from_dict(PAIRS),
               processing_class=tokenizer)  # fmt: skip


def loss_and_grads(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "config",
    [
        dict(beta=0.3),
        dict(beta=0.5, loss_type=["ipo"]),
        dict(beta=0.2, loss_type=["robust"], label_smoothing=0.1),
        dict(beta=0.4, loss_type=["discopop"], discopop_tau=0.3),
        dict(beta=0.3, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    ],
    ids=["sigmoid", "ipo", "robust", "discopop", "sigmoid+sft"],
)
def test_first_step_equals_trl(tmp_path, config):
    theirs = make_trainer(DPOTrainer, tmp_path, **config)
    ours = make_trainer(FusedDPOTrainer, tmp_path, **config)
    batch = next(iter(theirs.get_train_dataloader()))
    assert (batch["completion_mask"] == 0).any()  # prompts and padding are excluded
    want_loss, want_grads = loss_and_grads(theirs, batch)
    got_loss, got_grads = loss_and_grads(ours, batch)
    assert_close(got_loss, want_loss, torch.float32, scale=want_loss.abs().item())
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 0
    for name, want in want_grads.items():
        assert_close(got_grads[name], want, torch.float32, scale=want.abs().max().item())
    assert ours._metrics["train"]["rewards/margins"]


def test_trains_a_step(tmp_path):
    """Through Trainer.train, with TRL's default mixed precision (bf16 backbones, fp32 heads)."""
    trainer = make_trainer(FusedDPOTrainer, tmp_path, beta=0.3, bf16=True)
    before = trainer.model.lm_head.weight.detach().clone()
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(trainer.model.lm_head.weight, before)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (dict(loss_type=["aot"]), "loss types"),
        (dict(loss_type=["sigmoid", "hinge"]), "several preference loss types"),
        (dict(f_divergence_type="js_divergence"), "f_divergence_type"),
        (dict(ld_alpha=0.5), "ld_alpha"),
    ],
)
def test_settings_it_cannot_reproduce_are_refused(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(FusedDPOTrainer, tmp_path, **config)
