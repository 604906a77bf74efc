"""The data readers on hostile input: every file ends in records, a counted skip, or a DataError naming it."""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfee_fast.data import DataError, load_preferences, load_prompts

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
        ["prompt", "chosen", "rejected", "messages", "role", "content", "x"]), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
LINES = st.lists(st.one_of(JSON.map(json.dumps), st.binary(max_size=40)), max_size=8)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def write(tmp_path: Path, name: str, lines: list) -> Path:
    path = tmp_path / name
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass") for x in lines))
    return path


def check(path: Path, load) -> None:
    for skip_invalid in (False, True):
        try:
            records, report = load(path, skip_invalid=skip_invalid)
        except DataError as error:
            assert str(path) in str(error), error  # names the file (and the line, for a bad record)
            assert not skip_invalid or path.suffix == ".json", "with skip_invalid a bad record is counted"
            continue
        assert report.read == report.used + sum(report.skipped.values()) == len(records) + sum(report.skipped.values())


@FUZZ
@given(lines=LINES)
def test_jsonl_readers_never_raise_anything_but_a_named_error(tmp_path_factory, lines):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    check(write(tmp_path, "pool.jsonl", lines), load_prompts)
    check(write(tmp_path, "pairs.jsonl", lines), load_preferences)


@FUZZ
@given(data=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_json_readers_never_raise_anything_but_a_named_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "pool.json"
    path.write_bytes(data)
    check(path, load_prompts)
    check(path, load_preferences)


def test_deeply_nested_and_huge_lines(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000 + '\n{"prompt": "' + "x" * 1_000_000 + '"}\n')
    records, report = load_prompts(path, skip_invalid=True)
    assert len(records) == 1 and report.skipped == {"JSON nested too deeply to read": 1}
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"deep\.json: JSON nested too deeply to read"):
        load_prompts(tmp_path / "deep.json")


def test_responses_made_only_of_special_tokens_and_prompts_over_the_limit(tmp_path):
    from selfee_fast.data import tokenize_pairs
    from selfee_fast.demo.tiny import build_tokenizer

    tokenizer = build_tokenizer(["the cat sat on a mat"] * 20, tmp_path / "tok", vocab_size=100)
    specials = "".join(tokenizer.all_special_tokens)
    lines = [
        {"prompt": "the cat", "chosen": specials, "rejected": tokenizer.eos_token},
        {"prompt": "the cat " * 200, "chosen": "sat", "rejected": "mat"},
    ]
    path = write(tmp_path, "pairs.jsonl", [json.dumps(x) for x in lines])
    records, report = load_preferences(path)
    pairs, report = tokenize_pairs(tokenizer, records, max_length=64, max_prompt_length=32, report=report)
    assert len(pairs) == 2 and all(p.chosen and p.rejected for p in pairs)
    assert report.truncated_prompts == 1, "the long prompt is cut and counted, not dropped"
    assert len(pairs[1].prompt) <= 32
