"""Reading, normalising, tokenizing and collating preference data and prompt pools."""

import json

import pytest
import torch

from selfee_fast import data
from selfee_fast.demo.tiny import build_tokenizer

CORPUS = ["the cat sat on the mat", "what is two plus two", "four", "five", "hello there"] * 10


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(CORPUS, tmp_path_factory.mktemp("tok"), vocab_size=150)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


PLAIN = {"prompt": "what is two plus two", "chosen": "four", "rejected": "five"}
CONVERSATIONAL = {
    "prompt": [{"role": "user", "content": "what is two plus two"}],
    "chosen": [{"role": "assistant", "content": "four"}],
    "rejected": [{"role": "assistant", "content": "five"}],
}
ULTRAFEEDBACK = {
    "prompt": "what is two plus two",
    "chosen": [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"}],
    "rejected": [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "five"}],
    "score_chosen": 9.0,
    "score_rejected": 2.0,
}


@pytest.mark.parametrize("layout", [PLAIN, CONVERSATIONAL, ULTRAFEEDBACK])
def test_layouts_normalise_alike(tmp_path, layout):
    (record,), report = data.load_preferences(write_jsonl(tmp_path / "p.jsonl", [layout]))
    assert record.prompt == [{"role": "user", "content": "what is two plus two"}]
    assert (record.chosen, record.rejected) == ("four", "five")
    assert record.location.endswith("p.jsonl:1") and report.used == 1


def test_formats(tmp_path):
    records = [PLAIN, CONVERSATIONAL]
    (tmp_path / "p.json").write_text(json.dumps(records))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([PLAIN, PLAIN]), tmp_path / "p.parquet")
    from datasets import Dataset

    Dataset.from_list([PLAIN]).save_to_disk(str(tmp_path / "ds"))
    for name, count in (("p.json", 2), ("p.parquet", 2), ("ds", 1)):
        loaded, _ = data.load_preferences(tmp_path / name)
        assert len(loaded) == count and loaded[0].chosen == "four"


def test_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PLAIN) + "\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(data.DataError, match=r"bad\.jsonl:2: malformed JSON"):
        data.load_preferences(path)
    cases = {
        "missing field 'rejected'": {"prompt": "x", "chosen": "y"},
        "empty prompt": {"prompt": " ", "chosen": "y", "rejected": "z"},
        r"empty prompt \(every message's content is blank\)": {
            "prompt": [{"role": "user", "content": " "}],
            "chosen": "y",
            "rejected": "z",
        },
        "empty rejected response": {"prompt": "x", "chosen": "y", "rejected": ""},
        "prompt must be a string": {"prompt": 3, "chosen": "y", "rejected": "z"},
        "a record must be an object": ["x"],
    }
    for message, record in cases.items():
        write_jsonl(path, [PLAIN, record])
        with pytest.raises(data.DataError, match=rf"bad\.jsonl:2: {message}"):
            data.load_preferences(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_preferences(tmp_path / "missing.jsonl")


def test_skip_invalid_counts_every_skip(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl", [PLAIN, {"prompt": "x"}, {"prompt": "", "chosen": "a", "rejected": "b"}, PLAIN]
    )
    with path.open("a") as f:
        f.write('{"prompt": "torn line", "chosen": \n')
    records, report = data.load_preferences(path, skip_invalid=True)
    assert len(records) == 2 and report.read == 5 and report.used == 2
    assert sum(report.skipped.values()) == 3
    assert any("malformed JSON" in reason for reason in report.skipped), report.skipped
    assert "2/5 records used" in report.summary()


def test_prompt_pools(tmp_path):
    path = write_jsonl(
        tmp_path / "pool.jsonl",
        [
            {"prompt": "hello there"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "old answer"}]},
        ],
    )
    prompts, _ = data.load_prompts(path)
    assert prompts[0].prompt == [{"role": "user", "content": "hello there"}]
    assert prompts[1].prompt == [{"role": "user", "content": "hi"}]
    write_jsonl(path, [{"text": "no prompt"}])
    with pytest.raises(data.DataError, match=r"pool\.jsonl:1: missing field 'prompt'"):
        data.load_prompts(path)
    write_jsonl(path, [{"messages": [{"role": "user", "content": "  "}]}])
    with pytest.raises(data.DataError, match=r"pool\.jsonl:1: empty"):
        data.load_prompts(path)


def test_tokenization_masks_prompt_and_appends_eos_once(tokenizer):
    record = data.preference_record("x:1", PLAIN)
    (pair,), report = data.tokenize_pairs(tokenizer, [record])
    assert pair.chosen[-1] == tokenizer.eos_token_id and pair.chosen.count(tokenizer.eos_token_id) == 1
    prompt_text = tokenizer.decode(pair.prompt)
    assert prompt_text.startswith("<|user|>") and prompt_text.endswith("<|assistant|>\n")
    assert tokenizer.decode(pair.chosen, skip_special_tokens=True) == "four"
    assert report.truncated_prompts == report.truncated_responses == 0
    bos = tokenizer.bos_token_id
    assert pair.prompt.count(bos) <= 1, "no doubled BOS"
    again = data.response_ids(tokenizer, "four" + tokenizer.eos_token)
    assert again.count(tokenizer.eos_token_id) == 1


@pytest.mark.parametrize("template", ["bos in template", "no template"])
def test_a_llama_style_tokenizer_gets_one_bos(tokenizer, template):
    """A tokenizer whose post-processor adds BOS, and a template that writes {{ bos_token }}
    too (Llama's layout): the prompt starts with exactly one BOS, the responses with none."""
    import copy

    from tokenizers import processors

    llama_like = copy.deepcopy(tokenizer)
    bos = llama_like.bos_token_id
    llama_like.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    assert llama_like("hello there").input_ids[0] == bos, "the post-processor adds BOS: the test can fail"
    if template == "bos in template":
        llama_like.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    else:
        llama_like.chat_template = None
    record = data.preference_record("x:1", PLAIN)
    (pair,), _ = data.tokenize_pairs(llama_like, [record])
    assert pair.prompt[0] == bos and pair.prompt.count(bos) == 1
    assert bos not in pair.chosen and bos not in pair.rejected


def test_collate_keeps_eos_when_pad_is_eos(tokenizer):
    pairs = [
        data.TokenizedPair("a", [5, 6], [7, 2], [8, 9, 10, 2]),
        data.TokenizedPair("b", [5], [2], [11, 2]),
    ]
    batch = data.collate_pairs(pairs, pad_token_id=2)  # pad id == EOS id
    labels, mask = batch["labels"], batch["attention_mask"]
    assert labels.shape == (4, 6)
    assert labels[0].tolist() == [-100, -100, 7, 2, -100, -100]
    assert labels[2].tolist() == [-100, -100, 8, 9, 10, 2]
    assert labels[1].tolist() == [-100, 2, -100, -100, -100, -100]
    assert mask.sum(1).tolist() == [4, 2, 6, 3]
    assert torch.equal(batch["input_ids"][3, :3], torch.tensor([5, 11, 2]))


def test_a_packed_row_scores_the_same_tokens_as_padded_rows():
    pairs = [
        data.TokenizedPair("a", [5, 6], [7, 2], [8, 9, 10, 2]),
        data.TokenizedPair("b", [5], [2], [11, 2]),
    ]
    padded = data.collate_pairs(pairs, pad_token_id=2)
    packed = data.collate_pairs(pairs, pad_token_id=2, packed=True)
    lengths = padded["attention_mask"].sum(1).tolist()  # [4, 2, 6, 3]: no padding in the packed row
    assert packed["input_ids"].shape == (1, sum(lengths)) and bool(packed["attention_mask"].all())
    assert packed["position_ids"][0].tolist() == [t for n in lengths for t in range(n)]
    # Per sequence, in order: the token each scored position predicts.
    for k in range(4):
        rows, cols = (padded["seq_ids"] == k).nonzero(as_tuple=True)
        predicted_padded = padded["input_ids"][rows, cols + 1].tolist()
        (cols_packed,) = (packed["seq_ids"][0] == k).nonzero(as_tuple=True)
        assert packed["input_ids"][0, cols_packed + 1].tolist() == predicted_padded
    assert predicted_padded == [11, 2]  # sequence 3: b's rejected response, its EOS (== pad id) included
    # No target crosses a boundary: each sequence's first token is never scored.
    starts = [sum(lengths[:k]) for k in range(4)]
    assert all(packed["labels"][0, s] == -100 for s in starts)


def test_truncation_is_counted(tokenizer):
    long_prompt = " ".join(["the cat sat on the mat"] * 20)
    record = data.preference_record("x:1", {"prompt": long_prompt, "chosen": "four " * 30, "rejected": "five"})
    (pair,), report = data.tokenize_pairs(tokenizer, [record], max_length=32, max_prompt_length=16)
    assert len(pair.prompt) == 16 and len(pair.prompt) + len(pair.chosen) <= 32
    assert report.truncated_prompts == 1 and report.truncated_responses == 1
    with pytest.raises(ValueError, match="max_prompt_length"):
        data.tokenize_pairs(tokenizer, [record], max_length=16, max_prompt_length=16)


def test_no_chat_template_fallback(tokenizer, tmp_path):
    plain = build_tokenizer(CORPUS, tmp_path, vocab_size=150)
    plain.chat_template = None
    with pytest.warns(UserWarning, match="no chat template"):
        data._warned_no_template = False
        ids = data.prompt_ids(plain, [{"role": "user", "content": "hello there"}])
    assert ids[0] == plain.bos_token_id and ids.count(plain.bos_token_id) == 1


def test_system_prompt_goes_where_the_template_takes_one(tmp_path):
    from selfee_fast.data import PromptRecord, takes_system_turn, with_system_prompt

    class Tokenizer:
        def __init__(self, template):
            self.chat_template = template

    records = [PromptRecord("a:1", [{"role": "user", "content": "hi"}]),
               PromptRecord("a:2", [{"role": "system", "content": "own"}, {"role": "user", "content": "yo"}])]  # fmt: skip
    chatml = Tokenizer("{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}")
    assert takes_system_turn(chatml) and not takes_system_turn(Tokenizer("{{ messages[0].content }}"))
    out = with_system_prompt(records, "", chatml)  # the official code's empty system turn
    assert out[0].prompt == [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]
    assert out[1].prompt == records[1].prompt, "a record's own system turn is kept"
    assert with_system_prompt(records, "", Tokenizer("{{ messages[0].content }}")) == records
    assert with_system_prompt(records, None, chatml) == records
