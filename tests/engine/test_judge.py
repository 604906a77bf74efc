"""Direct preference judgment: batched implicit rewards, tie-breaking, the reference choice."""

import json
import math

import pytest
import torch

from selfee_fast import models
from selfee_fast.demo.tiny import build_tiny_llama, build_tokenizer
from selfee_fast.judge import EarlierJudge, _pair_of, judge_generations, rank_agreement, score_responses
from selfee_fast.records import Generation

pytestmark = pytest.mark.usefixtures("chunked_backend")


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("judge-model")
    tokenizer = build_tokenizer(["the cat sat on the mat", "a dog ran"] * 20, path, vocab_size=120)
    build_tiny_llama(path, tokenizer, hidden_size=32, layers=2)
    model, tokenizer = models.load_model(path, lora=models.LoraSettings(r=4, alpha=8), gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # pi_{i-1} != pi_init
    model.eval()
    return model, tokenizer


def test_batched_scores_equal_one_prompt_at_a_time(lora_model):
    model, tokenizer = lora_model
    items = [([5, 6, 7], [[8, 9, 2], [10, 2]]), ([5, 11], [[12, 13, 14, 2], [2], [9, 9, 2]])]
    together = score_responses(model, items, tokenizer.pad_token_id)
    for item, (policy, ref) in zip(items, together, strict=True):
        alone_policy, alone_ref = score_responses(model, [item], tokenizer.pad_token_id)[0]
        assert len(policy) == len(item[1])
        torch.testing.assert_close(torch.tensor(policy), torch.tensor(alone_policy), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(ref), torch.tensor(alone_ref), rtol=1e-5, atol=1e-5)
        assert all(p != r for p, r in zip(policy, ref, strict=True)), "pi_{i-1} and pi_init must differ here"


def test_a_packed_batch_scores_like_a_padded_one(lora_model):
    model, tokenizer = lora_model
    items = [([5, 6, 7], [[8, 9, 2], [10, 2]]), ([5, 11], [[12, 13, 14, 2], [2], [9, 9, 2]])]
    padded = score_responses(model, items, tokenizer.pad_token_id)
    packed = score_responses(model, items, tokenizer.pad_token_id, packed=True)
    for (policy, ref), (want_policy, want_ref) in zip(packed, padded, strict=True):
        torch.testing.assert_close(torch.tensor(policy), torch.tensor(want_policy), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(ref), torch.tensor(want_ref), rtol=1e-5, atol=1e-5)


def test_reference_choices(lora_model, tmp_path):
    model, tokenizer = lora_model
    items = [([5, 6], [[8, 2], [9, 10, 2]])]
    ((policy, ref_init),) = score_responses(model, items, tokenizer.pad_token_id)
    assert ref_init != policy
    # "previous" scores against the earlier iterate: a model handed in, or the "reference"
    # adapter (here both are a copy of pi_{i-1} itself, so the rewards vanish).
    ((_, ref_given),) = score_responses(model, items, tokenizer.pad_token_id, judge_reference="previous",
                                        base_model=model)  # fmt: skip
    torch.testing.assert_close(torch.tensor(ref_given), torch.tensor(policy), rtol=1e-6, atol=1e-6)
    model.save_pretrained(tmp_path / "earlier")
    models.load_reference_adapter(model, tmp_path / "earlier")
    try:
        ((_, ref_adapter),) = score_responses(model, items, tokenizer.pad_token_id, judge_reference="previous")
        frozen = [not p.requires_grad for n, p in model.named_parameters() if ".reference." in n]
    finally:
        model.delete_adapter(models.REFERENCE_ADAPTER)
    torch.testing.assert_close(torch.tensor(ref_adapter), torch.tensor(policy), rtol=1e-6, atol=1e-6)
    assert frozen and all(frozen)
    ((_, ref_none),) = score_responses(model, items, tokenizer.pad_token_id, judge_reference="none")
    assert ref_none == [0.0, 0.0]
    with pytest.raises(ValueError, match="judge_reference must be one of"):
        score_responses(model, items, tokenizer.pad_token_id, judge_reference="base")


def test_pair_choice_and_ties():
    record = Generation(index=0, location="x:1", prompt=[], prompt_ids=[1], responses=[[2], [3], [4]],
                        texts=["a", "b", "c"], finished=[True] * 3)  # fmt: skip
    pair = _pair_of(record, policy=[-1.0, -3.0, -2.0], ref=[0.0, 0.0, 0.0], beta=0.1)
    assert (pair.chosen_ids, pair.rejected_ids) == ([2], [3])
    assert pair.confidence == pytest.approx(1 / (1 + math.exp(-0.2)))
    tie = _pair_of(record, policy=[-1.0, -1.0, -1.0], ref=[0.0, 0.0, 0.0], beta=0.1)
    assert (tie.chosen_ids, tie.rejected_ids) == ([2], [3]) and tie.confidence == 0.5


def test_judge_resumes_from_a_partial_file(lora_model, tmp_path):
    model, tokenizer = lora_model
    generations = [
        Generation(index=i, location=f"p:{i}", prompt=[{"role": "user", "content": "x"}], prompt_ids=[5, 6 + i],
                   responses=[[8, 9, 2], [10 + i, 2]], texts=["a", "b"], finished=[True, True])
        for i in range(7)
    ]  # fmt: skip
    whole = judge_generations(model, tokenizer, generations, tmp_path / "whole.jsonl", batch_prompts=3, log=print)
    assert not (tmp_path / "whole.jsonl.partial").exists()
    # A kill after the first batch, mid-way through writing the second: one complete batch and a torn line.
    partial = tmp_path / "resumed.jsonl.partial"
    lines = [json.dumps({**p.to_json(), "batch": 0}) for p in whole[:3]]
    lines.append(json.dumps({**whole[3].to_json(), "batch": 1})[:25])
    partial.write_text("\n".join(lines))
    messages = []
    resumed = judge_generations(model, tokenizer, generations, tmp_path / "resumed.jsonl", batch_prompts=3,
                                log=messages.append)  # fmt: skip
    assert messages[0] == "judge: resuming, 1/3 batches already judged"
    assert resumed == whole


def test_per_token_judge_reward_removes_the_length_advantage():
    record = Generation(index=0, location="x:1", prompt=[], prompt_ids=[1], responses=[[2, 2, 2, 2], [3]],
                        texts=["long", "short"], finished=[True, True])  # fmt: skip
    summed = _pair_of(record, policy=[-2.0, -1.0], ref=[-4.0, -1.6], beta=1.0)
    assert summed.chosen_ids == [2, 2, 2, 2]  # +2.0 summed beats +0.6
    mean = _pair_of(record, policy=[-2.0, -1.0], ref=[-4.0, -1.6], beta=1.0, per_token=True)
    assert mean.chosen_ids == [3] and mean.chosen_score == pytest.approx(0.6)  # 0.6 per token beats 2.0 / 4


def test_rank_agreement_is_kendalls_tau_scaled_to_one():
    assert rank_agreement([3.0, 1.0], [0.5, -2.0]) == 1.0
    assert rank_agreement([3.0, 1.0], [-2.0, 0.5]) == 0.0
    assert rank_agreement([1.0, 1.0], [-2.0, 0.5]) == 0.5  # a tie orders nothing
    # Four responses, one swapped neighbour: 5 of 6 orderings concordant, tau = 4/6.
    assert rank_agreement([4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 1.0, 2.0]) == pytest.approx((1 + 4 / 6) / 2)
    with pytest.raises(ValueError, match="two or more responses"):
        rank_agreement([1.0], [1.0])


def three_response_generations(count: int) -> list[Generation]:
    return [
        Generation(index=i, location=f"p:{i}", prompt=[{"role": "user", "content": "x"}], prompt_ids=[5, 6 + i],
                   responses=[[8, 9, 2], [10 + i, 2], [7, 12 + i, 13, 2]], texts=["a", "b", "c"],
                   finished=[True] * 3)
        for i in range(count)
    ]  # fmt: skip


def test_the_first_iterations_earlier_judge_is_pi_init_by_its_per_token_likelihood(lora_model, tmp_path):
    model, tokenizer = lora_model
    generations = three_response_generations(6)
    pairs = judge_generations(model, tokenizer, generations, tmp_path / "pairs.jsonl", beta=0.1,
                              earlier=EarlierJudge(), log=print)  # fmt: skip
    items = [(g.prompt_ids, g.responses) for g in generations]
    for pair, g, (policy, ref) in zip(
        pairs, generations, score_responses(model, items, tokenizer.pad_token_id), strict=True
    ):
        rewards = [0.1 * (p - r) for p, r in zip(policy, ref, strict=True)]
        likelihood = [r / len(ids) for r, ids in zip(ref, g.responses, strict=True)]
        assert pair.agreement == pytest.approx(rank_agreement(rewards, likelihood))
    assert len({p.agreement for p in pairs}) > 1, "the test needs prompts on which the two judges differ"
    # The agreement travels with the pair through the file.
    from selfee_fast.records import read_pairs

    assert [p.agreement for p in read_pairs(tmp_path / "pairs.jsonl")] == [p.agreement for p in pairs]


def test_a_later_iterations_earlier_judge_is_the_iterate_loaded_as_the_reference_adapter(lora_model, tmp_path):
    model, tokenizer = lora_model
    generations = three_response_generations(4)
    # The earlier iterate saved here is pi_{i-1} itself: its judge ranks exactly as this one (agreement 1),
    # where pi_init (the wrong role) would score every response 0 (ties: 0.5).
    model.save_pretrained(tmp_path / "earlier")
    models.load_reference_adapter(model, tmp_path / "earlier")
    try:
        pairs = judge_generations(model, tokenizer, generations, tmp_path / "pairs.jsonl", beta=0.1,
                                  earlier=EarlierJudge(role="reference"), log=print)  # fmt: skip
    finally:
        model.delete_adapter(models.REFERENCE_ADAPTER)
    assert [p.agreement for p in pairs] == [1.0] * len(generations)
    unmeasured = judge_generations(model, tokenizer, generations, tmp_path / "plain.jsonl", log=print)
    assert all(p.agreement is None for p in unmeasured)
