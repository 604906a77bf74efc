"""Demo tasks with a known truth: a hidden gold reward to measure how good self-made labels are.

SPA labels its own preference pairs with the policy's implicit reward. To see whether those
labels are any good we need a task whose correct answers are known: a *gold* reward
`gold(prompt, response) -> float` that the algorithm never sees, used only to score the
labels and the policy from outside.

The `Task` interface
--------------------
- `demonstrations(n, seed)` — SFT data `{"prompt", "response"}`, deliberately noisy, so
  that SFT yields an imperfect π_init whose samples vary in quality;
- `prompts(n, seed)` — prompt pools for generation and evaluation;
- `gold(prompt, response)` — the hidden reward in [0, 1] with partial credit, 1.0 only for
  a fully correct answer; it never raises on a strange *response*. The caller strips the
  chat template's end-of-turn text (e.g. a trailing "</s>") before scoring: gold scores
  the answer text only, and such text counts as a wrong token;
- `reference_answer(prompt)` — the correct answer;
- `corpus()` — texts to train a small tokenizer on.

`load_task("module:object")` imports any object with that interface (an instance, or a
zero-argument class/factory); `load_task("listops")` gives the bundled task.
`gold_label_pairs(task, records)` turns two-response records into TRL-style pairs ordered
by gold, the upper bound that SPA's self-annotation is compared against.

The bundled task: ListOps
-------------------------
Instructions over short lists of single-letter items, both whitespace-separated::

    copy: c a d b       -> c a d b
    reverse: c a d b    -> b d a c
    sort: c a d b       -> a b c d
    first 2: c a d b    -> c a
    last 3: c a d b     -> a d b

Items are drawn from the letters a–h, lists have 3–6 items, `k` in "first k"/"last k" is
1..len-1. Prompts are at most 8 words and answers at most 6. The words are so few that a
byte-level BPE trained on `corpus()` stops at ~300 tokens whatever larger `vocab_size` is
asked for; every instruction word and every item is then one token, and a whole example,
chat template included, is at most 22 tokens.

Gold is position-wise token accuracy against the reference, normalised by the longer of
the two answers: `matches / max(len(reference), len(response))`, over whitespace-split
tokens (so spacing does not matter, case does). It lies in [0, 1], is 1.0 only for the exact
token sequence, gives partial credit per correct position, and penalises answers that are
too long or too short.

Demonstrations are the reference answers, except that with probability `noise` (default
0.3) the answer is corrupted — two items swapped, one dropped, one duplicated, one replaced
by another letter, or the answer to a different instruction on the same list. A corrupted
answer always differs from the reference, so exactly the corrupted fraction has gold < 1.

Why it suits SPA: a tiny Llama learns every instruction partly within half a minute of CPU
SFT, and it also learns the demonstrations' corruptions; sampled responses therefore vary in
quality from prompt to prompt and between two samples of the same prompt, so preference
pairs carry signal. Measured (hidden 64, 2 layers, 2000 demonstrations, 500 AdamW steps of
batch 64 at lr 3e-3, ~25 s on one CPU thread; two samples at temperature 0.7 on 300
held-out prompts, three model seeds): mean gold 0.63–0.69, 40–44% of samples fully correct,
the two samples' gold differ for 41–49% of prompts; "last k" is the hardest instruction
(gold ~0.5), sort the easiest (~0.8). Longer SFT sharpens the policy and makes the samples
agree more often (1000 steps: gold 0.70, differ 27%). Gold is exact and costs microseconds,
so every self-made label can be checked.

Prompt pools and disjointness
-----------------------------
Every prompt belongs to one of `SPLITS` (64) splits, `zlib.crc32(prompt) % 64`; a pool drawn
with seed `s` contains only prompts of split `s % 64` (rejection sampling from the task's
prompt distribution). Pools — and demonstrations, whose prompts are `prompts(n, seed)` —
from seeds that differ modulo 64 are therefore disjoint, guaranteed: SFT on seed 0, SPA on
seeds 1, 2, ... and evaluation on seed 63 never share a prompt. Within one pool prompts are
drawn with replacement, so the distribution does not depend on `n`; repeats are mostly
three-item lists (only ~56 distinct three-item prompts per split).
"""

from __future__ import annotations

import importlib
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "SPLITS",
    "GoldLabelReport",
    "ListOps",
    "Task",
    "TaskError",
    "gold_label_pairs",
    "load_task",
    "split_of",
]

SPLITS = 64


@runtime_checkable
class Task(Protocol):
    """A task with a known truth. See the module docstring for the contract of each method."""

    name: str

    def demonstrations(self, n: int, seed: int) -> list[dict]:
        """`n` SFT examples `{"prompt": str, "response": str}`, some deliberately wrong; deterministic by seed."""
        ...

    def prompts(self, n: int, seed: int) -> list[str]:
        """`n` prompts, deterministic by seed; the task documents how pools of different seeds overlap."""
        ...

    def gold(self, prompt: str, response: str) -> float:
        """Hidden reward in [0, 1] with partial credit; 1.0 only for a fully correct answer; never raises on a response."""
        ...

    def reference_answer(self, prompt: str) -> str:
        """The correct answer to `prompt`."""
        ...

    def corpus(self) -> list[str]:
        """Texts to train the tokenizer on, covering every symbol of prompts and answers."""
        ...


class TaskError(ValueError):
    """A task spec that cannot be loaded, or a prompt the task does not understand."""


def split_pool(task_name: str, n: int, seed: int, random_prompt: Callable[[random.Random], str]) -> list[str]:
    """`n` prompts of split `seed % SPLITS`, drawn with replacement by rejection from `random_prompt`."""
    rng = random.Random(f"{task_name}/prompts/{seed}")
    pool: list[str] = []
    while len(pool) < n:
        prompt = random_prompt(rng)
        if split_of(prompt) == seed % SPLITS:
            pool.append(prompt)
    return pool


def split_of(prompt: str) -> int:
    """The split (0..SPLITS-1) a prompt belongs to; a pool drawn with seed s holds only split s % SPLITS."""
    return zlib.crc32(prompt.encode("utf-8")) % SPLITS


# --------------------------------------------------------------------------- ListOps


@dataclass(frozen=True)
class ListOps:
    """List-manipulation instructions over single letters (see the module docstring for the rules).

    `noise` is the probability that a demonstration's answer is corrupted.
    """

    name: str = "listops"
    alphabet: str = "abcdefgh"
    min_len: int = 3
    max_len: int = 6
    noise: float = 0.3

    OPS = ("copy", "reverse", "sort", "first", "last")

    def __post_init__(self):
        if not self.alphabet.isalpha() or len(set(self.alphabet)) != len(self.alphabet) or len(self.alphabet) < 2:
            raise ValueError(f"alphabet must be at least two distinct letters, got {self.alphabet!r}")
        if not 2 <= self.min_len <= self.max_len <= 9:
            raise ValueError(f"need 2 <= min_len <= max_len <= 9, got {self.min_len}, {self.max_len}")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {self.noise}")

    # ---- the rules

    def _parse(self, prompt: str) -> tuple[str, int, list[str]]:
        letters = re.escape(self.alphabet)
        match = None
        if isinstance(prompt, str):
            match = re.fullmatch(rf"\s*(copy|reverse|sort|first \d|last \d):((?:\s+[{letters}])+)\s*", prompt)
        if match is None:
            raise TaskError(f"not a {self.name} prompt: {prompt!r}")
        op, _, k = match.group(1).partition(" ")
        items = match.group(2).split()
        if k and not 1 <= int(k) <= len(items):
            raise TaskError(f"not a {self.name} prompt (count out of range): {prompt!r}")
        return op, int(k) if k else 0, items

    @staticmethod
    def _apply(op: str, k: int, items: list[str]) -> list[str]:
        if op == "copy":
            return list(items)
        if op == "reverse":
            return items[::-1]
        if op == "sort":
            return sorted(items)
        if op == "first":
            return items[:k]
        if op == "last":
            return items[len(items) - k :]
        raise TaskError(f"unknown instruction {op!r}")

    def reference_answer(self, prompt: str) -> str:
        op, k, items = self._parse(prompt)
        return " ".join(self._apply(op, k, items))

    def gold(self, prompt: str, response: str) -> float:
        """Position-wise token accuracy, `matches / max(len(ref), len(response))` over whitespace-split tokens.

        Raises `TaskError` only for a prompt that is not this task's; any response string
        (empty, garbage, odd spacing) gets a score in [0, 1]. Strip end-of-turn text such as
        "</s>" before calling: it is scored as a wrong token.
        """
        reference = self.reference_answer(prompt).split()
        answer = response.split() if isinstance(response, str) else []
        matches = sum(r == a for r, a in zip(reference, answer, strict=False))
        return matches / max(len(reference), len(answer))

    # ---- data

    def _random_prompt(self, rng: random.Random) -> str:
        op = self.OPS[int(rng.random() * len(self.OPS))]
        length = self.min_len + int(rng.random() * (self.max_len - self.min_len + 1))
        items = " ".join(rng.choices(self.alphabet, k=length))
        if op in ("first", "last"):
            return f"{op} {1 + int(rng.random() * (length - 1))}: {items}"
        return f"{op}: {items}"

    def prompts(self, n: int, seed: int) -> list[str]:
        """`n` prompts of split `seed % SPLITS`, drawn with replacement (see "Prompt pools and disjointness")."""
        return split_pool(self.name, n, seed, self._random_prompt)

    def _corrupt(self, op: str, k: int, items: list[str], reference: list[str], rng: random.Random) -> list[str]:
        """A wrong answer near the reference: always different from it."""
        while True:
            kind = rng.choice(("swap", "drop", "duplicate", "replace", "other instruction"))
            answer = list(reference)
            if kind == "swap" and len(answer) >= 2:
                i, j = rng.sample(range(len(answer)), 2)
                answer[i], answer[j] = answer[j], answer[i]
            elif kind == "drop" and len(answer) >= 2:
                del answer[rng.randrange(len(answer))]
            elif kind == "duplicate":
                i = rng.randrange(len(answer))
                answer.insert(i, answer[i])
            elif kind == "replace":
                i = rng.randrange(len(answer))
                answer[i] = rng.choice([c for c in self.alphabet if c != answer[i]])
            elif kind == "other instruction":
                other = rng.choice([o for o in self.OPS if o != op])
                answer = self._apply(other, k or rng.randint(1, len(items) - 1), items)
            if answer != reference:
                return answer

    def demonstrations(self, n: int, seed: int) -> list[dict]:
        """SFT examples on `prompts(n, seed)`; each answer is corrupted with probability `noise`."""
        rng = random.Random(f"{self.name}/noise/{seed}")
        examples = []
        for prompt in self.prompts(n, seed):
            op, k, items = self._parse(prompt)
            answer = self._apply(op, k, items)
            if rng.random() < self.noise:
                answer = self._corrupt(op, k, items, answer, rng)
            examples.append({"prompt": prompt, "response": " ".join(answer)})
        return examples

    def corpus(self) -> list[str]:
        """Every instruction word, letter and count, then prompts and answers of a fixed sample."""
        words = [*self.OPS, *self.alphabet, *map(str, range(1, self.max_len))]
        texts = [" ".join(words), " ".join(f"{w}:" for w in words)]
        rng = random.Random(f"{self.name}/corpus")
        for _ in range(2000):
            prompt = self._random_prompt(rng)
            texts += [prompt, self.reference_answer(prompt)]
        return texts


# --------------------------------------------------------------------------- loading

SHORT_NAMES: dict[str, str] = {
    "ends": "selfee_fast.demo.learnable_tasks:Ends",
    "listops": "selfee_fast.demo.tasks:ListOps",
    "maxof": "selfee_fast.demo.learnable_tasks:MaxOf",
    "next": "selfee_fast.demo.learnable_tasks:Next",
    "upper": "selfee_fast.demo.learnable_tasks:Upper",
}
_METHODS = ("demonstrations", "prompts", "gold", "reference_answer", "corpus")


def load_task(spec: str) -> Task:
    """A task from "module:object" (a Task instance, or a zero-argument class/factory) or a short name.

    Short names: "listops" (the bundled `ListOps`); "maxof", "upper", "ends", "next" (the tasks of
    `selfee_fast.demo.learnable_tasks`, which a tiny model can learn). Raises `TaskError` naming the spec when
    the module or attribute cannot be imported or the object lacks the Task interface.
    """
    resolved = SHORT_NAMES.get(spec.strip().lower(), spec) if isinstance(spec, str) else spec
    if not isinstance(resolved, str) or resolved.count(":") != 1:
        known = ", ".join(sorted(SHORT_NAMES))
        raise TaskError(f"task spec {spec!r}: expected 'module:object' or a short name ({known})")
    module_name, attribute = (part.strip() for part in resolved.split(":"))
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or whatever the module raises while importing
        raise TaskError(f"task spec {spec!r}: cannot import module {module_name!r} ({error!r})") from error
    obj = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TaskError(f"task spec {spec!r}: module {module_name!r} has no attribute {attribute!r}") from None
    if callable(obj) and (isinstance(obj, type) or not isinstance(obj, Task)):
        factory: Callable = obj
        try:
            obj = factory()
        except Exception as error:
            raise TaskError(f"task spec {spec!r}: calling {attribute}() failed ({error!r})") from error
    lacks = [m for m in _METHODS if not callable(getattr(obj, m, None))]
    if not isinstance(getattr(obj, "name", None), str):
        lacks.append("name")
    if lacks:
        raise TaskError(f"task spec {spec!r}: {type(obj).__name__} object is not a Task (lacks {', '.join(lacks)})")
    return obj


# --------------------------------------------------------------------------- gold labels


@dataclass
class GoldLabelReport:
    """What `gold_label_pairs` did: every record is either kept or skipped as a tie."""

    read: int = 0
    kept: int = 0
    ties: int = 0  # equal gold: no preference, skipped
    mean_margin: float = 0.0  # mean gold(chosen) - gold(rejected) over kept pairs

    def summary(self) -> str:
        return f"{self.kept}/{self.read} pairs kept, {self.ties} ties skipped, mean gold margin {self.mean_margin:.3f}"


def gold_label_pairs(task: Task, records: list[dict]) -> tuple[list[dict], GoldLabelReport]:
    """Label `{"prompt", "response_a", "response_b"}` records with the gold reward.

    Returns TRL-style `{"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}`
    pairs, the higher-gold response chosen, in input order, and a `GoldLabelReport`. Ties
    (equal gold, including two identical responses) carry no preference and are skipped,
    counted in `report.ties`. Responses are scored as given: strip end-of-turn text first.
    A pair may hold an empty response (it scores 0); `data.load_preferences` refuses empty
    responses, so drop such pairs before writing them out if they are to be read back.
    """
    pairs, report, margin = [], GoldLabelReport(read=len(records)), 0.0
    for record in records:
        prompt, a, b = record["prompt"], record["response_a"], record["response_b"]
        gold_a, gold_b = task.gold(prompt, a), task.gold(prompt, b)
        if gold_a == gold_b:
            report.ties += 1
            continue
        (chosen, score_c), (rejected, score_r) = (
            ((a, gold_a), (b, gold_b)) if gold_a > gold_b else ((b, gold_b), (a, gold_a))
        )
        pairs.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "score_chosen": score_c,
                "score_rejected": score_r,
            }
        )
        margin += score_c - score_r
    report.kept = len(pairs)
    report.mean_margin = margin / len(pairs) if pairs else 0.0
    return pairs, report
