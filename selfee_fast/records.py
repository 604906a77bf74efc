"""The records stages hand each other: sampled generations and judged pairs, typed.

Both are JSON Lines files in the run folder; this module is the one place that writes and
reads them. A pairs file is TRL's preference layout (`prompt`/`chosen`/`rejected` as chat
turns) plus the token ids, scores and log-probs training reuses. A line that cannot be read
is reported with its file and line; a record from an older release (missing a field added
since) reads with that field's default.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .data import DataError, Messages
from .files import write_jsonl_atomic


@dataclass
class Generation:
    """One prompt's sampled responses (token ids, cut after the first stop token) and their text."""

    index: int  # the prompt's position in its pool
    location: str  # where the prompt came from ("pool1.jsonl:17")
    prompt: Messages
    prompt_ids: list[int]
    responses: list[list[int]]
    texts: list[str]
    finished: list[bool]  # per response: ended with a stop token (False: cut at max_new_tokens)
    prompt_truncated: bool = False
    batch: int = 0  # the generation batch that produced it (resume unit)
    batch_limit: int | None = None  # the out-of-memory limit that batch left; None with vLLM

    @property
    def prompt_text(self) -> str:
        """The last user turn: what a task scores the responses against."""
        return self.prompt[-1]["content"]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> Generation:
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})


@dataclass
class JudgedPair:
    """A judged prompt: the responses the judge ranked best and worst, with its scores."""

    index: int
    location: str
    prompt: Messages
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_text: str
    rejected_text: str
    chosen_score: float  # the judge's reward
    rejected_score: float
    confidence: float  # sigmoid(chosen_score - rejected_score)
    chosen_logp_policy: float | None  # log pi_{i-1} of each response: training's reference (None: unknown)
    rejected_logp_policy: float | None
    # spa.judge_consistency: how far the previous iteration's judge ranks this prompt's
    # responses as this one does (Kendall's tau scaled to [0, 1]; None: not measured).
    agreement: float | None = None

    @property
    def identical(self) -> bool:
        """Two identical responses: the pair carries no preference."""
        return self.chosen_ids == self.rejected_ids

    @property
    def judges_disagree(self) -> bool:
        """The previous iteration's judge orders the responses the other way (agreement below 0.5:
        more orderings reversed than kept; over two responses, the pair itself reversed). A tie in
        either judge (0.5) orders nothing; an unmeasured agreement (None) is no disagreement."""
        return self.agreement is not None and self.agreement < 0.5

    @property
    def prompt_text(self) -> str:
        return self.prompt[-1]["content"]

    def to_json(self) -> dict:
        """TRL's conversational layout first, then what selfee_fast reuses."""
        return {
            "prompt": self.prompt,
            "chosen": [{"role": "assistant", "content": self.chosen_text}],
            "rejected": [{"role": "assistant", "content": self.rejected_text}],
            "prompt_ids": self.prompt_ids,
            "chosen_ids": self.chosen_ids,
            "rejected_ids": self.rejected_ids,
            "chosen_score": self.chosen_score,
            "rejected_score": self.rejected_score,
            "confidence": self.confidence,
            "chosen_logp_policy": self.chosen_logp_policy,
            "rejected_logp_policy": self.rejected_logp_policy,
            "agreement": self.agreement,
            "index": self.index,
            "location": self.location,
        }

    @classmethod
    def from_json(cls, record: dict) -> JudgedPair:
        return cls(
            index=record["index"],
            location=record["location"],
            prompt=record["prompt"],
            prompt_ids=record["prompt_ids"],
            chosen_ids=record["chosen_ids"],
            rejected_ids=record["rejected_ids"],
            chosen_text=record["chosen"][-1]["content"],
            rejected_text=record["rejected"][-1]["content"],
            chosen_score=record["chosen_score"],
            rejected_score=record["rejected_score"],
            confidence=record["confidence"],
            chosen_logp_policy=record.get("chosen_logp_policy"),
            rejected_logp_policy=record.get("rejected_logp_policy"),
            agreement=record.get("agreement"),
        )


def read_jsonl(path: str | Path, parse):
    """Every record of a JSON Lines file through `parse`; a bad line raises DataError naming it."""
    path, records = Path(path), []
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(parse(json.loads(line)))
            except (ValueError, KeyError, TypeError, IndexError) as error:
                raise DataError(f"{path}:{number}: not a readable record ({type(error).__name__}: {error})") from None
    return records


def read_generations(path: str | Path) -> list[Generation]:
    """A generations file (or its partial, unordered form) in prompt order."""
    return sorted(read_jsonl(path, Generation.from_json), key=lambda g: g.index)


def read_pairs(path: str | Path) -> list[JudgedPair]:
    return read_jsonl(path, JudgedPair.from_json)


def write_pairs(path: str | Path, pairs: list[JudgedPair]) -> None:
    write_jsonl_atomic(path, [p.to_json() for p in sorted(pairs, key=lambda p: p.index)])
