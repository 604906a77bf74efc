"""Out of GPU memory on a batch: the batch finishes in halves, in order, and the log says so."""

import random

import pytest
import torch

from selfee_fast import judge as judge_module
from selfee_fast import models
from selfee_fast.batching import BatchLimit, split_on_oom
from selfee_fast.data import PromptRecord
from selfee_fast.demo.tiny import build_tiny_llama, build_tokenizer
from selfee_fast.generate import GenerationSettings, generate_responses
from selfee_fast.judge import judge_generations

pytestmark = pytest.mark.usefixtures("chunked_backend")


def test_split_keeps_order_and_offsets():
    calls, messages = [], []

    def run(items, offset):
        calls.append((list(items), offset))
        if len(items) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [(x, offset) for x in items]

    out = split_on_oom(run, [10, 11, 12, 13, 14], what="batch 7", log=messages.append)
    assert [x for x, _ in out] == [10, 11, 12, 13, 14]
    assert calls == [([10, 11, 12, 13, 14], 0), ([10, 11], 0), ([12, 13, 14], 2), ([12], 2), ([13, 14], 3)]
    assert messages == [
        "batch 7: out of GPU memory with 5 items, retrying as 2 + 3",
        "batch 7: out of GPU memory with 3 items, retrying as 1 + 2",
    ]


def test_a_limit_carries_what_fitted_to_the_next_batch():
    sizes = []

    def run(items, offset):
        sizes.append(len(items))
        if len(items) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return list(items)

    limit = BatchLimit()
    first = split_on_oom(run, list(range(8)), what="b0", log=lambda *_: None, limit=limit)
    second = split_on_oom(run, list(range(8, 15)), what="b1", log=lambda *_: None, limit=limit)
    assert first + second == list(range(15))
    assert limit.items == 2
    assert sizes == [8, 4, 2, 2, 2, 2, 2, 2, 2, 1], "after two splits every batch starts in pieces of 2"


def test_a_library_out_of_workspace_is_split_too_other_errors_are_not():
    def cublas(items, offset):
        if len(items) > 1:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return list(items)

    assert split_on_oom(cublas, [1, 2], what="x", log=lambda *_: None) == [1, 2]

    def bug(items, offset):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        split_on_oom(bug, [1, 2], what="x", log=lambda *_: None)


def test_a_single_item_that_does_not_fit_raises():
    def run(items, offset):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        split_on_oom(run, [1, 2], what="x", log=lambda *_: None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("oom")
    rng = random.Random(0)
    words = "the cat dog sat ran on a mat log".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) for _ in range(40)]
    tokenizer = build_tokenizer(texts, root / "m", vocab_size=120)
    build_tiny_llama(root / "m", tokenizer, hidden_size=32, layers=1)
    model, tokenizer = models.load_model(
        root / "m", lora=models.LoraSettings(r=4, alpha=8), gradient_checkpointing=False
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    prompts = [PromptRecord(f"pool:{i}", [{"role": "user", "content": t}]) for i, t in enumerate(texts[:8])]
    return model, tokenizer, prompts


def test_generation_batch_that_runs_out_of_memory_is_finished_in_halves(tiny, tmp_path, monkeypatch):
    model, tokenizer, prompts = tiny
    real_generate, sizes, messages = model.generate, [], []

    def generate(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", generate)
    settings = GenerationSettings(max_new_tokens=4, batch_size=4, seed=1)
    records = generate_responses(model, tokenizer, prompts, settings, tmp_path / "g.jsonl", log=messages.append)
    assert [r.index for r in records] == list(range(8)), "nothing lost"
    assert sizes == [4, 2, 2, 2, 2], "the second batch starts at the size that fitted"
    assert sum("out of GPU memory with 4 items" in m for m in messages) == 1


def test_a_resumed_generation_splits_its_batches_as_the_uninterrupted_run_did(tiny, tmp_path, monkeypatch):
    """Batches of 5 and 3 on a card that fits 2: the 3 is cut as 2 + 1 after the 5 taught the
    limit. A run killed after the first batch restarts with that limit, so the pieces, their
    seeds and the samples are the same (a fresh limit would try 3, fail, and cut 1 + 2)."""
    from selfee_fast import generate as generate_module

    model, tokenizer, prompts = tiny
    real_generate = model.generate

    def generate(**kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", generate)
    settings = GenerationSettings(max_new_tokens=6, batch_size=5, seed=3, temperature=1.0)
    quiet = {"log": lambda *_: None}
    path = tmp_path / "g.jsonl"
    whole = generate_responses(model, tokenizer, prompts, settings, path, **quiet)

    def killed_after_the_first_batch():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if '"batch": 0' in line))

    killed_after_the_first_batch()
    resumed = generate_responses(model, tokenizer, prompts, settings, path, **quiet)
    assert [r.responses for r in resumed] == [r.responses for r in whole]
    # Forgetting the limit changes the second batch's pieces: the check can fail.
    killed_after_the_first_batch()
    monkeypatch.setattr(generate_module, "resumed_batch_limit", lambda *_: None)
    forgetful = generate_responses(model, tokenizer, prompts, settings, path, **quiet)
    assert [r.responses for r in forgetful] != [r.responses for r in whole]


def test_judge_batch_that_runs_out_of_memory_scores_the_same(tiny, tmp_path, monkeypatch):
    model, tokenizer, prompts = tiny
    settings = GenerationSettings(max_new_tokens=4, batch_size=8, seed=2)
    generations = generate_responses(model, tokenizer, prompts, settings, tmp_path / "g.jsonl", log=lambda *_: None)
    whole = judge_generations(model, tokenizer, generations, tmp_path / "a.jsonl", log=lambda *_: None)
    real = judge_module.sequence_token_logprobs

    def limited(model, input_ids, *args, **kwargs):
        if input_ids.shape[0] > 4:  # 2 responses per prompt: more than 2 prompts do not fit
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(judge_module, "sequence_token_logprobs", limited)
    messages = []
    halves = judge_generations(model, tokenizer, generations, tmp_path / "b.jsonl", log=messages.append)
    assert any("judge batch 0: out of GPU memory with 8 items" in m for m in messages)
    assert [p.index for p in halves] == [p.index for p in whole]
    for a, b in zip(halves, whole, strict=True):
        assert (a.chosen_ids, a.rejected_ids) == (b.chosen_ids, b.rejected_ids)
        assert a.chosen_score == pytest.approx(b.chosen_score, abs=1e-5)
