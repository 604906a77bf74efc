"""Supervised fine-tuning of a small model on demonstrations: how the demo makes pi_init.

Full fine-tuning, next-token loss on the response tokens only, through the same fused
head as everything else (`linear_logprobs`: no logits tensor). Meant for the tiny models
of the demo and tests; a 7B SFT is out of scope (start SPA from an existing SFT model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import next_token_targets, padding_id, prompt_ids, response_ids, right_pad
from ..files import folder_written_atomically
from ..logprobs import linear_logprobs
from ..models import lm_head
from ..train import cosine_with_warmup, response_mask


@dataclass
class SFTSettings:
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0


def encode_demonstrations(tokenizer, demonstrations: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids from the chat template, response ids + EOS) for each {"prompt", "response"}."""
    return [
        (prompt_ids(tokenizer, [{"role": "user", "content": d["prompt"]}]), response_ids(tokenizer, d["response"]))
        for d in demonstrations
    ]


def sft(model, tokenizer, demonstrations: list[dict], settings: SFTSettings, *, log=print) -> list[float]:
    """Train every parameter of `model` on the demonstrations; return the loss of each step."""
    examples = encode_demonstrations(tokenizer, demonstrations)
    padding = padding_id(tokenizer)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(settings.steps, settings.warmup_ratio))
    generator = torch.Generator().manual_seed(settings.seed)
    weight, bias = lm_head(model)
    losses = []
    model.train()
    for step in range(settings.steps):
        picked = torch.randint(len(examples), (settings.batch_size,), generator=generator).tolist()
        batch = right_pad(
            [examples[i][0] + examples[i][1] for i in picked], [len(examples[i][0]) for i in picked], padding
        )
        input_ids, attention_mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        body = model.get_decoder()
        hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.to(weight.dtype)
        targets = next_token_targets(labels)
        logps = linear_logprobs(hidden, weight, targets, bias=bias).policy
        mask = response_mask(labels)
        loss = -(logps * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, settings.steps // 10) == 0 or step + 1 == settings.steps:
            log(f"sft: step {step + 1}/{settings.steps} loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
    model.eval()
    if not all(math.isfinite(v) for v in losses):
        raise FloatingPointError("SFT diverged: a loss was not finite")
    return losses


def save_model(model, tokenizer, path: str | Path) -> None:
    """Save in standard form (safetensors + tokenizer): loads with plain transformers."""
    with folder_written_atomically(path) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
