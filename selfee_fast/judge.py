"""Direct preference judgment: the model labels its own responses with its implicit reward.

    r(x, y) = beta * [log pi_{i-1}(y|x) - log pi_init(y|x)]

Both log-probs come from one fused sweep over the LM head (`sequence_token_logprobs` with
the policy adapter as policy and the disabled adapter as reference). The higher-scoring
response is chosen (ties: the first), the lowest-scoring one rejected; the confidence is
sigmoid(r_w - r_l). The judge's log pi_{i-1} values are kept with the pair: pi_{i-1} is
also the DPO reference of the next training stage, so training need not recompute them.

`judge_reference`: "init" (the paper's choice), "previous" (the paper's ablation: the iterate
before pi_{i-1}, which the caller loads as the shared model's "reference" adapter or passes
as `base_model`) or "none" (r = beta * log pi_{i-1}(y|x)).

`earlier` (spa.judge_consistency, after CREAM, Wang et al. 2025): the previous iteration's
judge ranks the same responses too, and each pair records how far the two rankings agree;
training then smooths the labels by the iteration's mean disagreement, or drops the pairs
the two judges order oppositely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .batching import BatchLimit, split_on_oom
from .config import CHOICES
from .data import pack, padded_seq_ids, padding_id, right_pad
from .distributed import barrier, broadcast_value, my_batches, world
from .files import append_batch, merge_shards, rank_shard
from .models import sequence_token_logprobs
from .records import Generation, JudgedPair, read_jsonl, read_pairs, write_pairs
from .stopping import stop_here_together

JUDGE_REFERENCES = CHOICES["spa.judge_reference"]


@dataclass(frozen=True)
class EarlierJudge:
    """The previous iteration's judge (the iterate before pi_{i-1}), for the judges' agreement.

    `role` None: that iterate is the judge's own reference (pi_init in iteration 1), which
    judges by its per-token log-likelihood alone, as CREAM's code scores a model without a
    reference; its log-probs are the reference's, already computed. Otherwise the role of
    the shared model that plays it ("reference": pi_{i-2} loaded as that adapter), or
    "policy" of `model`, a frozen model of its own (full fine-tuning).
    """

    role: str | None = None
    model: object | None = None


@torch.no_grad()
def score_responses(
    model, items: list[tuple[list[int], list[list[int]]]], pad_id: int, *, judge_reference: str = "init",
    base_model=None, packed: bool = False, policy_role: str = "policy",
) -> list[tuple[list[float], list[float]]]:  # fmt: skip
    """Per (prompt ids, responses) item: (log pi_{i-1}(y|x), log pi_ref(y|x)) of each response.

    All responses of all items go through one batched forward: padded rows, or one packed
    row (`data.pack`). The reference is 0 for judge_reference="none". `base_model`: a
    separate model standing in for pi_init (no-seed mode: the instruct model's base);
    otherwise pi_init is the shared model with its adapters disabled. `policy_role`: the
    shared model's role that plays the scored model (an earlier judge: "reference").
    """
    if judge_reference not in JUDGE_REFERENCES:
        raise ValueError(f"judge_reference must be one of {JUDGE_REFERENCES}, got {judge_reference!r}")
    sequences = [prompt + r for prompt, responses in items for r in responses]
    prompt_lengths = [len(prompt) for prompt, responses in items for _ in responses]
    if packed:
        batch = pack(sequences, prompt_lengths)
    else:
        batch = right_pad(sequences, prompt_lengths, pad_id)
        batch["seq_ids"] = padded_seq_ids(batch["labels"])
    device = next(model.parameters()).device
    cu_seq_lens = batch.pop("cu_seq_lens", None)  # stays on the CPU: see models.final_hidden_states
    batch = {name: values.to(device) for name, values in batch.items()}
    use_reference = judge_reference != "none"
    role = "init" if judge_reference == "init" else "reference"
    out = sequence_token_logprobs(
        model, batch["input_ids"], batch["attention_mask"], batch["labels"], policy_role=policy_role,
        reference=role if use_reference and base_model is None else None,
        reference_model=base_model if use_reference else None, position_ids=batch.get("position_ids"),
        cu_seq_lens=cu_seq_lens,
    )  # fmt: skip
    policy = sequence_sums(out.policy, batch["seq_ids"], len(sequences))
    if use_reference:
        ref = sequence_sums(out.reference, batch["seq_ids"], len(sequences))
    else:
        ref = [0.0] * len(policy)
    scores, start = [], 0
    for _, responses in items:
        stop = start + len(responses)
        scores.append((policy[start:stop], ref[start:stop]))
        start = stop
    return scores


def sequence_sums(token_values: torch.Tensor, seq_ids: torch.Tensor, count: int) -> list[float]:
    """Per sequence, the sum of its tokens' values (in float64, in sequence order)."""
    flat, ids = token_values.reshape(-1).double(), seq_ids.reshape(-1)
    sums = torch.zeros(count + 1, dtype=torch.float64, device=flat.device)  # the last slot takes unscored tokens
    return sums.index_add_(0, torch.where(ids >= 0, ids, count), flat)[:count].tolist()


def judge_generations(
    model,
    tokenizer,
    generations: list[Generation],
    out_path: str | Path,
    *,
    beta: float = 0.1,
    judge_reference: str = "init",
    base_model=None,
    reward_model=None,
    batch_prompts: int = 16,
    autocast_dtype: torch.dtype | None = None,
    packing: bool = False,
    reward: str = "sum",
    earlier: EarlierJudge | None = None,
    log=print,
) -> list[JudgedPair]:
    """Turn generations into preference pairs; write them (TRL format plus scores) atomically.

    `reward`: "sum" (the paper's summed log-ratio) or "mean" (per response token).
    `earlier`: the previous iteration's judge; each pair then records the two judges' agreement.
    `autocast_dtype`: run the scoring under torch.autocast, as training does (its stored
    log pi_{i-1} serves as the training reference). `packing`: each batch as one packed row. Judged batches are appended to
    `<out_path>.partial` as they finish, so a killed judge
    resumes at its first unfinished batch; the batches are a pure function of the input
    (grouped by length), so a resumed judgment scores every pair exactly as an uninterrupted
    one would.
    """
    out_path = Path(out_path)
    partial_path = out_path.with_name(out_path.name + ".partial")
    padding = padding_id(tokenizer)
    usable = [g for g in generations if len(g.responses) >= 2]
    dropped = len(generations) - len(usable)
    # Batches of similar length pad less. The order is a pure function of the input, so a
    # resumed judgment still finds the same batches; pairs are written back in index order.
    usable.sort(key=lambda g: (len(g.prompt_ids) + max(len(x) for x in g.responses), g.index))
    batches = [usable[i : i + batch_prompts] for i in range(0, len(usable), batch_prompts)]
    plan = [[g.index for g in b] for b in batches]
    # Several processes: rank r judges every N-th batch into a shard of its own; rank 0 merges.
    ranks = world()
    finished = broadcast_value(merge_shards(partial_path, plan, log) if ranks.is_main else None)
    write_path = rank_shard(partial_path, ranks.rank) if ranks.distributed else partial_path
    if finished:
        log(f"judge: resuming, {len(finished)}/{len(batches)} batches already judged")
    was_training = model.training
    model.eval()
    device_type = next(model.parameters()).device.type

    def score(items, _offset):
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            scores = score_responses(
                model, items, padding, judge_reference=judge_reference, base_model=base_model, packed=packing
            )
            if earlier is None or earlier.role is None:
                return [(policy, ref, None) for policy, ref in scores]
            # Only the earlier iterate's log-probs are new: the reference's are those just computed.
            earlier_scores = score_responses(
                earlier.model or model, items, padding, judge_reference="none", packed=packing,
                policy_role=earlier.role,
            )  # fmt: skip
            return [(policy, ref, before) for (policy, ref), (before, _) in zip(scores, earlier_scores, strict=True)]

    limit = BatchLimit()  # what fitted for one batch is where the next one starts
    with write_path.open("a", encoding="utf-8") as out:
        for number in my_batches(len(batches)):
            if number is None or number in finished:  # nothing to do this round, but the others may stop
                stop_here_together(f"between judge batches ({write_path})")
                continue
            batch = batches[number]
            items = [(g.prompt_ids, g.responses) for g in batch]
            if reward_model is not None:
                # An external judge: its scores are the rewards; the policy's log-probs stay unknown.
                judged = [pair_by_scores(r, s) for r, s in zip(batch, reward_model.score(items), strict=True)]
            else:
                scores = split_on_oom(score, items, what=f"judge batch {number}", log=log, limit=limit)
                judged = [
                    _pair_of(
                        r, policy, ref, beta, per_token=reward == "mean", earlier_judge=earlier, earlier_logps=before
                    )
                    for r, (policy, ref, before) in zip(batch, scores, strict=True)
                ]
            append_batch(out, [{**pair.to_json(), "batch": number} for pair in judged])
            stop_here_together(f"after judge batch {number + 1}/{len(batches)} ({write_path})")
    model.train(was_training)
    barrier()  # every shard complete
    if ranks.is_main:
        merge_shards(partial_path, plan, log)
        pairs = sorted(read_jsonl(partial_path, JudgedPair.from_json), key=lambda p: p.index)
        write_pairs(out_path, pairs)
        partial_path.unlink()
    barrier()
    if not ranks.is_main:
        pairs = read_pairs(out_path)  # what rank 0 wrote
    log(
        f"judge: {len(pairs)} pairs written to {out_path}"
        + (f", {dropped} prompts with < 2 responses dropped" if dropped else "")
    )
    return pairs


def pair_by_scores(generation: Generation, scores: list[float]) -> JudgedPair:
    """The pair an external judge's scores make: its best and worst response (ties: the first), the
    scores as the rewards, the policy's log-probs unknown."""
    return _pair_of(generation, scores, [0.0] * len(scores), 1.0, policy_known=False)


def _pair_of(
    generation: Generation, policy: list[float], ref: list[float], beta: float, *, policy_known: bool = True,
    per_token: bool = False, earlier_judge: EarlierJudge | None = None, earlier_logps: list[float] | None = None,
) -> JudgedPair:  # fmt: skip
    lengths = [max(1, len(ids)) for ids in generation.responses]
    rewards = [beta * (p - r) for p, r in zip(policy, ref, strict=True)]
    if per_token:
        rewards = [value / n for value, n in zip(rewards, lengths, strict=True)]
    agreement = None
    if earlier_judge is not None:
        if earlier_judge.role is None:  # the reference judging by itself: its per-token likelihood
            before = [r / n for r, n in zip(ref, lengths, strict=True)]
        else:  # the same reward as this judge's, one iterate earlier
            before = [beta * (e - r) for e, r in zip(earlier_logps, ref, strict=True)]
            if per_token:
                before = [value / n for value, n in zip(before, lengths, strict=True)]
        agreement = rank_agreement(rewards, before)
    best = max(range(len(rewards)), key=lambda k: (rewards[k], -k))  # ties: the first response
    worst = min((k for k in range(len(rewards)) if k != best), key=lambda k: (rewards[k], k))
    margin = rewards[best] - rewards[worst]
    return JudgedPair(
        index=generation.index,
        location=generation.location,
        prompt=generation.prompt,
        prompt_ids=generation.prompt_ids,
        chosen_ids=generation.responses[best],
        rejected_ids=generation.responses[worst],
        chosen_text=generation.texts[best],
        rejected_text=generation.texts[worst],
        chosen_score=rewards[best],
        rejected_score=rewards[worst],
        confidence=1.0 / (1.0 + math.exp(-margin)),
        chosen_logp_policy=policy[best] if policy_known else None,
        rejected_logp_policy=policy[worst] if policy_known else None,
        agreement=agreement,
    )


def rank_agreement(scores: list[float], other: list[float]) -> float:
    """How far two scorings order the same responses alike: Kendall's tau scaled to [0, 1].

    CREAM's consistency rate: 1 = the same order, 0 = reversed. Over two responses it is 1 or 0;
    a tie in either scoring orders nothing and counts 0.5.
    """
    n = len(scores)
    if n < 2:
        raise ValueError("an agreement needs two or more responses")
    concordance = [_sign(scores[a] - scores[b]) * _sign(other[a] - other[b]) for a in range(n) for b in range(a + 1, n)]
    return (1.0 + sum(concordance) / len(concordance)) / 2.0


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)
