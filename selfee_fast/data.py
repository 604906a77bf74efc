"""Data: read preference sets and prompt pools, tokenize with the chat template, collate.

Records are read from JSONL, JSON, Parquet or a `datasets.save_to_disk` folder. Every
record carries its location ("pairs.jsonl:17"), so a bad record is reported by file and
line — or, with `skip_invalid=True`, counted and skipped. Nothing is dropped silently:
`DataReport` counts what was skipped or truncated, and why.

Layouts accepted (TRL's):
- preferences: `prompt`/`chosen`/`rejected` strings; or conversational — `prompt` a message
  list and `chosen`/`rejected` the assistant turn(s); or UltraFeedback-binarized's layout,
  where `chosen`/`rejected` are whole conversations ending in the assistant's answer;
- prompt pools: `prompt` (string or message list) or `messages` (trailing assistant turns
  are dropped).

Token ids, not text, travel between stages: a response is tokenized once (or comes from
the generator as ids) and the prompt's ids are the chat template's own.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

Messages = list[dict]


class DataError(ValueError):
    """A record that cannot be used, with the file and line (or row) it came from."""


@dataclass
class DataReport:
    """What happened to the records of one file: nothing lost without a count."""

    read: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    truncated_prompts: int = 0
    truncated_responses: int = 0

    def summary(self) -> str:
        parts = [f"{self.used}/{self.read} records used"]
        if self.skipped:
            parts.append("skipped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())))
        if self.truncated_prompts or self.truncated_responses:
            parts.append(f"truncated: {self.truncated_prompts} prompts, {self.truncated_responses} responses")
        return "; ".join(parts)


# --------------------------------------------------------------------------- reading


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield (location, record) from a JSONL / JSON / Parquet file or a save_to_disk folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.is_dir():
        yield from _read_dataset_folder(path)
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix == ".json":
        yield from _read_json(path)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise DataError(f"{path}: unknown data format (expected .jsonl, .json, .parquet or a datasets folder)")


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            # Decoded per line, so a stray byte names its line (and, with skip_invalid, costs only that line).
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{number}", DataError(f"{path}:{number}: not UTF-8 text (byte {e.start + 1} of the line)")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                # Handed on, not raised: with skip_invalid a malformed line is counted like any bad record.
                record = DataError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})")
            except RecursionError:
                record = DataError(f"{path}:{number}: JSON nested too deeply to read")
            yield f"{path}:{number}", record


def _read_json(path: Path) -> Iterator[tuple[str, dict]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"train": [...]} or {"data": [...]}
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    for index, record in enumerate(data):
        yield f"{path}[{index}]", record


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    for index, record in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path} row {index}", record


def _read_dataset_folder(path: Path) -> Iterator[tuple[str, dict]]:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if len(dataset) != 1:
            raise DataError(f"{path}: a DatasetDict with splits {list(dataset)}; point at one split's folder")
        dataset = next(iter(dataset.values()))
    for index, record in enumerate(dataset):
        yield f"{path} row {index}", record


# --------------------------------------------------------------------------- normalising


@dataclass
class PreferenceRecord:
    location: str
    prompt: Messages
    chosen: str
    rejected: str


@dataclass
class PromptRecord:
    location: str
    prompt: Messages


def _as_messages(value, location: str, name: str) -> Messages:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{location}: empty {name}")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for m in value:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{location}: every message of {name} needs string 'role' and 'content'")
        if not any(m["content"].strip() for m in value):
            raise DataError(f"{location}: empty {name} (every message's content is blank)")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{location}: {name} must be a string or a non-empty list of messages, got {type(value).__name__}")


def _answer(value, location: str, name: str) -> tuple[Messages, str]:
    """(conversation before the answer, the answer's text) of a chosen/rejected field."""
    if isinstance(value, str):
        return [], value
    messages = _as_messages(value, location, name)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{location}: {name} must end with an assistant message")
    return messages[:-1], messages[-1]["content"]


def preference_record(location: str, record) -> PreferenceRecord:
    if not isinstance(record, dict):
        raise DataError(f"{location}: a record must be an object, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataError(f"{location}: missing field '{key}'")
    chosen_context, chosen = _answer(record["chosen"], location, "chosen")
    rejected_context, rejected = _answer(record["rejected"], location, "rejected")
    if chosen_context != rejected_context:
        raise DataError(f"{location}: chosen and rejected continue different conversations")
    if chosen_context:
        # UltraFeedback-binarized: chosen/rejected are whole conversations; the prompt
        # field, when present, must agree with the conversation they continue.
        prompt = chosen_context
        if record.get("prompt") is not None:
            given = _as_messages(record["prompt"], location, "prompt")
            if given != prompt and given[-1]["content"] != prompt[-1]["content"]:
                raise DataError(f"{location}: the prompt does not match the conversation in chosen")
    elif record.get("prompt") is not None:
        prompt = _as_messages(record["prompt"], location, "prompt")
    else:
        raise DataError(f"{location}: missing field 'prompt'")
    if not chosen.strip() or not rejected.strip():
        raise DataError(f"{location}: empty {'chosen' if not chosen.strip() else 'rejected'} response")
    return PreferenceRecord(location, prompt, chosen, rejected)


def prompt_record(location: str, record) -> PromptRecord:
    if not isinstance(record, dict):
        raise DataError(f"{location}: a record must be an object, got {type(record).__name__}")
    if "prompt" in record and record["prompt"] is not None:
        messages = _as_messages(record["prompt"], location, "prompt")
    elif "messages" in record:
        messages = _as_messages(record["messages"], location, "messages")
    else:
        raise DataError(f"{location}: missing field 'prompt' (or 'messages')")
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise DataError(f"{location}: the conversation has no user turn to answer")
    return PromptRecord(location, messages)


def load_preferences(path: str | Path, *, skip_invalid: bool = False, report: DataReport | None = None):
    return _load(path, preference_record, skip_invalid, report)


def load_prompts(path: str | Path, *, skip_invalid: bool = False, report: DataReport | None = None):
    return _load(path, prompt_record, skip_invalid, report)


def _load(path, parse, skip_invalid, report):
    report = report if report is not None else DataReport()
    records = []
    for location, raw in read_records(path):
        report.read += 1
        try:
            if isinstance(raw, DataError):
                raise raw
            records.append(parse(location, raw))
        except DataError as e:
            if not skip_invalid:
                raise
            reason = str(e).split(": ", 1)[1]
            report.skipped[reason] += 1
    report.used = len(records)
    return records, report


# --------------------------------------------------------------------------- tokenizing


_warned_no_template = False


def prompt_ids(tokenizer, messages: Messages) -> list[int]:
    """The chat template's token ids for `messages`, ending where the assistant's answer starts."""
    global _warned_no_template
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return list(ids)
    if not _warned_no_template:
        warnings.warn(
            "the tokenizer has no chat template: prompts are the message contents joined by blank lines",
            stacklevel=2,
        )
        _warned_no_template = True
    text = "\n\n".join(m["content"] for m in messages) + "\n\n"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def record_prompt_ids(tokenizer, record) -> list[int]:
    """`prompt_ids` of a record's prompt; a chat template that cannot render it is an error naming the record."""
    try:
        return prompt_ids(tokenizer, record.prompt)
    except Exception as error:  # jinja's TemplateError, or whatever a template raises (raise_exception(...))
        raise DataError(f"{record.location}: the chat template cannot render this prompt ({error})") from None


def takes_system_turn(tokenizer) -> bool:
    """Whether the chat template refers to a system role (the official SPA code's test, from the alignment-handbook)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "system" in template or "<|im_start|>" in template


def with_system_prompt(records: list, system_prompt: str | None, tokenizer) -> list:
    """Records whose prompt starts with a system turn holding `system_prompt` (None: as they are).

    The official code inserts an empty system turn ("") for templates that take one; a
    record that brings its own system turn keeps it, and a template without a system role
    gets none.
    """
    if system_prompt is None or not takes_system_turn(tokenizer):
        return records
    system = {"role": "system", "content": system_prompt}
    return [
        r if r.prompt and r.prompt[0]["role"] == "system" else replace(r, prompt=[system, *r.prompt]) for r in records
    ]


def response_ids(tokenizer, text: str) -> list[int]:
    """The answer's ids with EOS appended exactly once."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


@dataclass
class TokenizedPair:
    location: str
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def fit_lengths(
    prompt: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int, report: DataReport
) -> tuple[list[int], list[list[int]]]:
    """TRL's rule: keep the prompt's last max_prompt_length tokens, then cut responses to fit."""
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
        report.truncated_prompts += 1
    room = max_length - len(prompt)
    fitted = []
    for r in responses:
        if len(r) > room:
            r = r[:room]
            report.truncated_responses += 1
        fitted.append(r)
    return prompt, fitted


def tokenize_pairs(
    tokenizer, records: list[PreferenceRecord], *, max_length: int = 2048, max_prompt_length: int = 1024,
    report: DataReport | None = None,
) -> tuple[list[TokenizedPair], DataReport]:  # fmt: skip
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
    report = report if report is not None else DataReport(read=len(records))
    pairs = []
    for r in records:
        prompt, (chosen, rejected) = fit_lengths(
            record_prompt_ids(tokenizer, r),
            [response_ids(tokenizer, r.chosen), response_ids(tokenizer, r.rejected)],
            max_length, max_prompt_length, report,
        )  # fmt: skip
        pairs.append(TokenizedPair(r.location, prompt, chosen, rejected))
    report.used = len(pairs)
    return pairs, report


def padding_id(tokenizer) -> int:
    """The id that fills padding: the tokenizer's pad token, else its EOS (masks keep them apart)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def right_pad(sequences: list[list[int]], prompt_lengths: list[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels; labels are -100 on prompts and padding.

    Padding is found from lengths, never from token ids, so a pad id equal to EOS cannot
    mask a real EOS.
    """
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, (seq, start) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
        labels[row, start : len(seq)] = torch.tensor(seq[start:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack(sequences: list[list[int]], prompt_lengths: list[int]) -> dict[str, torch.Tensor]:
    """All sequences end to end in one [1, N] row: no padding at all.

    `position_ids` restart at 0 for each sequence; transformers reads the restarts as
    sequence boundaries (flash-attention's variable-length path, or a block-diagonal causal
    mask under sdpa/eager) when no attention_mask is passed. `labels` are -100 on prompts and
    on each sequence's first token, so the shifted targets never cross a boundary.
    `seq_ids` is aligned with the per-token log-probs (position t scores token t + 1): the
    sequence whose response token position t predicts, -1 elsewhere. `cu_seq_lens` (int32,
    [S + 1]) are the sequences' boundaries, which flash-attention's variable-length kernel
    takes directly (no per-layer search of position_ids on the device).
    """
    input_ids, position_ids, labels, seq_ids = [], [], [], []
    for index, (seq, start) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        input_ids += seq
        position_ids += range(len(seq))
        scored = max(start, 1)
        labels += [-100] * scored + seq[scored:]
        seq_ids += [-1] * (scored - 1) + [index] * (len(seq) - scored) + [-1]
    columns = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "seq_ids": seq_ids}
    batch = {name: torch.tensor([values], dtype=torch.long) for name, values in columns.items()}
    lengths = torch.tensor([0] + [len(seq) for seq in sequences], dtype=torch.int32)
    return {
        **batch,
        "attention_mask": torch.ones_like(batch["input_ids"]),
        "cu_seq_lens": lengths.cumsum(0, dtype=torch.int32),
    }


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int, *, packed: bool = False) -> dict[str, torch.Tensor]:
    """Sequences 0..B-1 chosen, B..2B-1 rejected: rows of a right-padded [2B, T] batch, or one packed row.

    Both layouts carry `seq_ids` (see `pack`), so the loss reads either the same way.
    """
    sequences = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    prompt_lengths = [len(p.prompt) for p in pairs] * 2
    if packed:
        return pack(sequences, prompt_lengths)
    batch = right_pad(sequences, prompt_lengths, pad_token_id)
    batch["seq_ids"] = padded_seq_ids(batch["labels"])
    return batch


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """What each position is scored on: position t predicts labels[t + 1] (-100: not scored)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)


def padded_seq_ids(labels: torch.Tensor) -> torch.Tensor:
    """`seq_ids` of a padded batch: the row where position t scores a label, -1 elsewhere."""
    scored = next_token_targets(labels) != -100
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    return torch.where(scored, rows, -1)
