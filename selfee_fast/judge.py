"""Direct preference judgment: the model labels its own responses with its implicit reward.

    r(x, y) = beta * [log pi_{i-1}(y|x) - log pi_init(y|x)]

Both log-probs come from one fused sweep over the LM head (`sequence_token_logprobs` with
the policy adapter as policy and the disabled adapter as reference). The higher-scoring
response is chosen (ties: the first), the lowest-scoring one rejected; the confidence is
sigmoid(r_w - r_l). The judge's log pi_{i-1} values are kept with the pair: pi_{i-1} is
also the DPO reference of the next training stage, so training need not recompute them.

`judge_reference`: "init" (the paper's choice), "previous" (pi_{i-1} itself: every reward
is 0, kept for the ablation) or "none" (r = beta * log pi_{i-1}(y|x)).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .models import sequence_token_logprobs

JUDGE_REFERENCES = ("init", "previous", "none")


@torch.no_grad()
def score_responses(
    model, prompt_ids: list[int], responses: list[list[int]], pad_id: int, *, judge_reference: str = "init",
    base_model=None,
) -> tuple[list[float], list[float]]:  # fmt: skip
    """(log pi_{i-1}(y|x), log pi_ref(y|x)) for each response (ref = 0 for judge_reference="none").

    `base_model`: a separate model standing in for pi_init (no-seed mode: the instruct
    model's base); otherwise pi_init is the shared model with its adapters disabled.
    """
    if judge_reference not in JUDGE_REFERENCES:
        raise ValueError(f"judge_reference must be one of {JUDGE_REFERENCES}, got {judge_reference!r}")
    sequences = [prompt_ids + r for r in responses]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
        labels[row, len(prompt_ids) : len(seq)] = torch.tensor(seq[len(prompt_ids) :])
    device = next(model.parameters()).device
    use_init = judge_reference == "init"
    out = sequence_token_logprobs(
        model, input_ids.to(device), attention_mask.to(device), labels.to(device),
        reference="init" if use_init and base_model is None else None,
        reference_model=base_model if use_init else None,
    )  # fmt: skip
    policy = out.policy.sum(dim=1).double().tolist()
    if judge_reference == "init":
        ref = out.reference.sum(dim=1).double().tolist()
    elif judge_reference == "previous":
        ref = policy
    else:
        ref = [0.0] * len(policy)
    return policy, ref


def judge_generations(
    model,
    tokenizer,
    generations: list[dict],
    out_path: str | Path,
    *,
    beta: float = 0.1,
    judge_reference: str = "init",
    base_model=None,
    log=print,
) -> list[dict]:
    """Turn generations into preference pairs; write them (TRL format plus scores) atomically."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    pairs, dropped = [], 0
    for record in generations:
        responses = record["responses"]
        if len(responses) < 2:
            dropped += 1
            continue
        policy, ref = score_responses(
            model, record["prompt_ids"], responses, pad_id, judge_reference=judge_reference, base_model=base_model
        )
        rewards = [beta * (p - r) for p, r in zip(policy, ref, strict=True)]
        best = max(range(len(rewards)), key=lambda k: (rewards[k], -k))  # ties: the first response
        worst = min((k for k in range(len(rewards)) if k != best), key=lambda k: (rewards[k], k))
        margin = rewards[best] - rewards[worst]
        pairs.append(
            {
                "prompt": record["prompt"],
                "chosen": [{"role": "assistant", "content": record["texts"][best]}],
                "rejected": [{"role": "assistant", "content": record["texts"][worst]}],
                "prompt_ids": record["prompt_ids"],
                "chosen_ids": responses[best],
                "rejected_ids": responses[worst],
                "chosen_score": rewards[best],
                "rejected_score": rewards[worst],
                "confidence": 1.0 / (1.0 + math.exp(-margin)),
                "chosen_logp_policy": policy[best],
                "rejected_logp_policy": policy[worst],
                "index": record["index"],
                "location": record["location"],
            }
        )
    model.train(was_training)
    write_jsonl_atomic(out_path, pairs)
    log(
        f"judge: {len(pairs)} pairs written to {out_path}"
        + (f", {dropped} prompts with < 2 responses dropped" if dropped else "")
    )
    return pairs


def write_jsonl_atomic(path: str | Path, records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
