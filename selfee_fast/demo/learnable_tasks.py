"""Demo tasks whose gold preference a tiny model can learn: format, content, position, relation.

The bundled ListOps task (`selfee_fast.demo.tasks`) is too hard for the demo's tiny Llama: DPO on
gold labels for the whole prompt budget does not improve on π_init there, so it cannot tell a
good labelling method from a bad one. The tasks here pass that prerequisite: at the demo's
default scale, DPO on gold labels beats π_init on every one of five seeds. Each follows the
`selfee_fast.demo.tasks.Task` protocol exactly and draws prompt pools by `split_of` like ListOps
(pools of seeds that differ modulo 64 are disjoint). Items are single letters,
whitespace-separated; gold scores whitespace-split tokens, never raises on a response, lies in
[0, 1] and is 1.0 only for a fully correct answer. Answers are one token (upper, maxof) or
two (ends, next), so all fit the demo's lengths with room to spare. No constraint-satisfaction task
passed (see the end).

upper — format: the last item, in upper case
    last: c a d b     -> B
Items are 3–6 letters of a–p (repeats allowed). A noisy demonstration (probability `noise`,
default 0.4) keeps the item in lower case: "b". Gold is ½ for naming the last item (either
case) plus ½ for upper case, divided by the token count: "B" 1.0, "b" 0.5, "C" 0.5. The error is
a pure format feature, independent of the content; good and bad answers have the same length.

maxof — content: the alphabetically last letter of the list
    max: c a f b      -> f
Items are 3–6 letters of a–h (repeats allowed). A noisy demonstration (probability `noise`,
default 0.4) answers with the list's first item when that is not the largest, else the
second-largest distinct item — the "first item" shortcut. Gold, for a one-token answer: 1.0 for
the largest, an item of rank r (0 = smallest) among the list's d distinct items ½·r/(d − 1),
anything else 0; more tokens divide the first token's score by their count. Good and bad
answers have the same length.

ends — position, two tokens: the list's first and last items
    ends: c a f b     -> c b
Items are 3–6 letters of a–p (repeats allowed, but the last item differs from the first and the
second, so that every noisy answer is wrong). A noisy demonstration (probability `noise`, default
0.4) is, with equal chance, the two swapped ("b c") or the second item in place of the last
("c a"). Gold gives each of the two slots ½ for its own item and ¼ for the other slot's item,
times 2 / max(2, token count): "c b" 1.0, "b c" 0.5, "c a" 0.5, "c" 0.5, "c b c" ⅔. Right and
wrong answers have the same length (two tokens) and differ at a known position.

next — relation, two tokens: the letters after the first and the last items in the alphabet
    next: c a f b     -> d c
Items are 3–6 letters of a–o (repeats allowed; p, the last letter, has no successor and never
appears in a prompt). A noisy demonstration (probability `noise`, default 0.4) names, in one slot
chosen at random, the item itself instead of the letter after it: "c c" or "d b". Gold gives each
slot ½·max(0, 1 − d/3), d the alphabet distance to its letter, times 2 / max(2, token count):
"d c" 1.0, "c c" ⅚, "e d" ⅔, "d" ½. π_init is near the ceiling here (0.96), so the gold-label
gain is small (+0.028) though positive on every seed.

Why they suit SPA: the noisy demonstrations teach π_init one or two specific mistakes at a known
rate, so two samples of one prompt often differ in gold, and the decision that separates good
from bad is a single token (per slot, for ends and next) the tiny model can learn to get
right. Measured (default demo scale, 3 SPA iterations of 512 prompts, five seeds, one CPU
thread; the full tables are in bench/TASKS.md), held-out gold, mean ± std over seeds:

    task    π_init         DPO on all gold   all-gold − π_init (SE)   SPA (DND) π_1 / π_2 / π_3
    maxof   0.710 ± 0.027  0.963 ± 0.035     +0.252 ± 0.016, 5/5      0.824 / 0.903 / 0.939
    upper   0.828 ± 0.010  0.866 ± 0.014     +0.039 ± 0.003, 5/5      0.836 / 0.843 / 0.850
    ends    0.851 ± 0.022  0.948 ± 0.014     +0.097 ± 0.010, 5/5      0.874 / 0.873 / 0.835
    next    0.960 ± 0.007  0.988 ± 0.002     +0.028 ± 0.004, 5/5      0.970 / 0.975 / 0.975

On ends SPA's self-made labels are far worse than on the one-token tasks (label accuracy
0.762 / 0.677 / 0.545 over iterations 1–3, against 0.92–0.96 for maxof and upper) and its held-out
gold falls at iteration 3 while DPO on gold labels gains +0.097: a task where the labelling
method, not the policy's capacity, is what limits SPA.

Designs that failed the prerequisite (kept out of this module)
--------------------------------------------------------------
- echo (copy a list; noise: one item written twice), insert (insert the prompt's keyword
  anywhere into the list; noise: the keyword forgotten), with 8 letters and 2–5 items: a split
  holds only ~140 distinct echo prompts, so π_init memorised its SFT prompts instead of learning
  to copy (held-out gold 0.29–0.45 for echo); DPO on all-gold labels −0.03/−0.02 for insert.
- echo with 16 letters and 4–6 distinct items, position-wise gold: π_init 0.74/0.87, DPO on
  all-gold 0.56/0.62 (two seeds): gold preferred a truncated answer to a stuttered one, and
  DPO learned to stop early. With edit-similarity gold (one stutter = one edit): still worse
  than π_init on all five seeds (−0.061, −0.078, −0.060, −0.005, −0.077).
- insert with 16 letters, 3–5 items, edit-similarity gold: +0.083, +0.030, +0.052, −0.185,
  +0.015 over five seeds: not on every seed.
- terse ("last: c a d b" -> "b"; noise: a trailing "!", so the correct answer is the shorter
  one; gold ½ item + ½/token count): π_init 0.90–0.91 on five seeds, DPO on all-gold 0.780,
  0.040, 0.730, 0.003, 0.130. Every gold pair differs only after the shared item (end of turn
  vs "!"), and DPO on ~600 such pairs for 3 epochs wrecked the policy on three seeds.
- avoid (constraint: "avoid: c a d a" -> any letter of a–p not in the list; noise: an item of
  the list; gold 1 / ¼ / 0): π_init 0.69–0.77, DPO on all-gold +0.011, −0.007, −0.379, +0.019,
  0.000 over five seeds.
- insert and avoid were the constraint tasks tried; neither passed.
- count (arithmetic: "count: c a f b" -> "4", 2–7 letters of a–p, answer one digit; noise: off by
  one, n − 1 or n + 1; gold max(0, 1 − |error|/3) / token count): π_init 0.87–0.92, DPO on
  all-gold +0.005, −0.012, −0.223, +0.020, −0.003 over five seeds.
- count with 2–5 letters (fewer answers to tell apart): +0.032 on one seed, −0.577 on another
  (−0.165, −0.005, −0.577, +0.032, −0.025).
- one-token next ("next: c a f b" -> "c", the letter after the last item only; gold
  max(0, 1 − (alphabet distance)/3) / token count). Noise the item itself or the letter before
  it, half each: DPO on all-gold −0.025, +0.135, +0.033, +0.095, +0.097; noise always the item
  itself: +0.068, +0.063, +0.093, +0.070, −0.048. Not on every seed either way; the two-token
  next above replaced it. (A bare "next: c" -> "d" has 15 prompts, too few for 64 disjoint
  splits; hence the list.)
What passed: an answer with one right token per position (one or two positions; the others are
worse by gold), and good and bad answers of the same length. What failed: answers of several
tokens with errors at varying positions, a right answer that is a prefix of the wrong one, many
right answers (avoid), and two one-token designs, count and one-token next, whose gold-label
DPO fell below π_init on one to four seeds of five (by 0.22 and 0.58 on one count seed each).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .tasks import TaskError, split_pool

__all__ = ["Ends", "MaxOf", "Next", "Upper"]

LETTERS = "abcdefgh"
LETTERS16 = "abcdefghijklmnop"


def _tokens(response) -> list[str]:
    return response.split() if isinstance(response, str) else []


def _edit_similarity(reference: list[str], answer: list[str]) -> float:
    """1 − (token edit distance) / max(len(reference), len(answer)): one stutter or one dropped item costs one edit."""
    if not reference and not answer:
        return 1.0
    previous = list(range(len(answer) + 1))
    for i, r in enumerate(reference, start=1):
        current = [i]
        for j, a in enumerate(answer, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != a)))
        previous = current
    return 1.0 - previous[-1] / max(len(reference), len(answer))


class _LetterTask:
    """Shared data plumbing: split-filtered prompt pools, noisy demonstrations, a corpus."""

    name: str
    noise: float
    alphabet: str
    WORDS: tuple[str, ...] = ()

    min_len: int
    max_len: int

    def _check(self, lowest: int, most: int):
        letters = self.alphabet
        if not letters.isalpha() or not letters.isascii() or len(set(letters)) != len(letters) or len(letters) < 3:
            raise ValueError(f"alphabet must be at least three distinct ASCII letters, got {letters!r}")
        if not lowest <= self.min_len <= self.max_len <= most:
            raise ValueError(f"need {lowest} <= min_len <= max_len <= {most}, got {self.min_len}, {self.max_len}")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {self.noise}")

    def _prompt_letters(self) -> str:
        """The letters a prompt's list may hold."""
        return self.alphabet

    def _parse(self, prompt: str) -> list[str]:
        """The list of a `<instruction>: c a f b` prompt (the instruction is WORDS[0]); anything else is a TaskError."""
        letters = re.escape(self._prompt_letters())
        pattern = rf"\s*{self.WORDS[0]}:((?:\s+[{letters}])+)\s*"
        match = re.fullmatch(pattern, prompt) if isinstance(prompt, str) else None
        if match is None:
            raise TaskError(f"not a {self.name} prompt: {prompt!r}")
        return match.group(1).split()

    def _random_prompt(self, rng: random.Random) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def _demonstration(self, prompt: str, rng: random.Random) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def prompts(self, n: int, seed: int) -> list[str]:
        """`n` prompts of split `seed % SPLITS`, drawn with replacement (as ListOps does)."""
        return split_pool(self.name, n, seed, self._random_prompt)

    def demonstrations(self, n: int, seed: int) -> list[dict]:
        """SFT examples on `prompts(n, seed)`; each answer is wrong with probability `noise`."""
        rng = random.Random(f"{self.name}/noise/{seed}")
        return [{"prompt": p, "response": self._demonstration(p, rng)} for p in self.prompts(n, seed)]

    def corpus(self) -> list[str]:
        """Every word and letter, then prompts and answers (reference and noisy) of a fixed sample."""
        words = [*self.WORDS, *self.alphabet]
        texts = [" ".join(words), " ".join(f"{w}:" for w in words)]
        rng = random.Random(f"{self.name}/corpus")
        for _ in range(2000):
            prompt = self._random_prompt(rng)
            texts += [prompt, self.reference_answer(prompt), self._demonstration(prompt, rng)]
        return texts


# --------------------------------------------------------------------------- upper


@dataclass(frozen=True)
class Upper(_LetterTask):
    """Answer with the list's last item in upper case; noisy demonstrations keep it lower case."""

    name: str = "upper"
    alphabet: str = LETTERS16
    min_len: int = 3
    max_len: int = 6
    noise: float = 0.4

    WORDS = ("last", *LETTERS16.upper())

    def __post_init__(self):
        self._check(1, 9)

    def reference_answer(self, prompt: str) -> str:
        return self._parse(prompt)[-1].upper()

    def gold(self, prompt: str, response: str) -> float:
        """½·(first token is the last item, in either case) + ½·(it is upper case); / token count."""
        last = self._parse(prompt)[-1]
        answer = _tokens(response)
        if not answer:
            return 0.0
        first = answer[0]
        score = 0.5 * (first.lower() == last) + 0.5 * (len(first) == 1 and first.isupper() and first.isascii())
        return score / len(answer)

    def _random_prompt(self, rng: random.Random) -> str:
        length = rng.randint(self.min_len, self.max_len)
        return "last: " + " ".join(rng.choices(self.alphabet, k=length))

    def _demonstration(self, prompt: str, rng: random.Random) -> str:
        last = self._parse(prompt)[-1]
        return last if rng.random() < self.noise else last.upper()


# --------------------------------------------------------------------------- maxof


@dataclass(frozen=True)
class MaxOf(_LetterTask):
    """Name the alphabetically last letter of the list; noisy demonstrations take the first item."""

    name: str = "maxof"
    alphabet: str = LETTERS
    min_len: int = 3
    max_len: int = 6
    noise: float = 0.4

    WORDS = ("max",)

    def __post_init__(self):
        self._check(2, 9)

    def reference_answer(self, prompt: str) -> str:
        return max(self._parse(prompt))

    def gold(self, prompt: str, response: str) -> float:
        """1 for the largest item; an item of rank r among d distinct ones ½·r/(d−1); else 0; / token count."""
        distinct = sorted(set(self._parse(prompt)))
        answer = _tokens(response)
        if not answer:
            return 0.0
        first = answer[0]
        if first == distinct[-1]:
            score = 1.0
        elif first in distinct:
            score = 0.5 * distinct.index(first) / (len(distinct) - 1)
        else:
            score = 0.0
        return score / len(answer)

    def _random_prompt(self, rng: random.Random) -> str:
        length = rng.randint(self.min_len, self.max_len)
        while True:
            items = rng.choices(self.alphabet, k=length)
            if len(set(items)) > 1:  # one distinct letter would have no wrong item to pick
                return "max: " + " ".join(items)

    def _demonstration(self, prompt: str, rng: random.Random) -> str:
        items = self._parse(prompt)
        best = max(items)
        if rng.random() < self.noise:
            return items[0] if items[0] != best else sorted(set(items))[-2]
        return best


# --------------------------------------------------------------------------- ends


@dataclass(frozen=True)
class Ends(_LetterTask):
    """Answer with the list's first and last items; noise swaps them or names the second item for the last."""

    name: str = "ends"
    alphabet: str = LETTERS16
    min_len: int = 3
    max_len: int = 6
    noise: float = 0.4

    WORDS = ("ends",)

    def __post_init__(self):
        self._check(3, 9)

    def reference_answer(self, prompt: str) -> str:
        items = self._parse(prompt)
        return f"{items[0]} {items[-1]}"

    def gold(self, prompt: str, response: str) -> float:
        """½ per slot holding its item (first, last), ¼ for the other slot's item; × 2 / max(2, token count)."""
        items = self._parse(prompt)
        wanted = [items[0], items[-1]]
        answer = _tokens(response)
        score = 0.0
        for slot, token in enumerate(answer[:2]):
            if token == wanted[slot]:
                score += 0.5
            elif token == wanted[1 - slot]:
                score += 0.25
        return score * 2 / max(2, len(answer))

    def _random_prompt(self, rng: random.Random) -> str:
        length = rng.randint(self.min_len, self.max_len)
        while True:
            items = rng.choices(self.alphabet, k=length)
            if items[-1] not in (items[0], items[1]):  # so that both noises are wrong answers
                return "ends: " + " ".join(items)

    def _demonstration(self, prompt: str, rng: random.Random) -> str:
        items = self._parse(prompt)
        if rng.random() < self.noise:
            return f"{items[-1]} {items[0]}" if rng.random() < 0.5 else f"{items[0]} {items[1]}"
        return f"{items[0]} {items[-1]}"


# --------------------------------------------------------------------------- next


@dataclass(frozen=True)
class Next(_LetterTask):
    """Answer with the letters that follow the first and the last items; noise names one item itself."""

    name: str = "next"
    alphabet: str = LETTERS16
    min_len: int = 3
    max_len: int = 6
    noise: float = 0.4

    WORDS = ("next",)

    def __post_init__(self):
        self._check(2, 9)

    def _prompt_letters(self) -> str:
        return self.alphabet[:-1]  # the alphabet's last letter has no successor

    def _targets(self, prompt: str) -> list[int]:
        items = self._parse(prompt)
        return [self.alphabet.index(items[0]) + 1, self.alphabet.index(items[-1]) + 1]

    def reference_answer(self, prompt: str) -> str:
        return " ".join(self.alphabet[target] for target in self._targets(prompt))

    def gold(self, prompt: str, response: str) -> float:
        """Per slot ½·max(0, 1 − (alphabet distance to its letter)/3); × 2 / max(2, token count)."""
        targets = self._targets(prompt)
        answer = _tokens(response)
        score = 0.0
        for target, token in zip(targets, answer, strict=False):
            if len(token) == 1 and token in self.alphabet:
                score += 0.5 * max(0.0, 1.0 - abs(self.alphabet.index(token) - target) / 3)
        return score * 2 / max(2, len(answer))

    def _random_prompt(self, rng: random.Random) -> str:
        length = rng.randint(self.min_len, self.max_len)
        return "next: " + " ".join(rng.choices(self.alphabet[:-1], k=length))

    def _demonstration(self, prompt: str, rng: random.Random) -> str:
        targets = self._targets(prompt)
        letters = [self.alphabet[target] for target in targets]
        if rng.random() < self.noise:  # one slot names the item itself instead of the letter after it
            slot = rng.randrange(2)
            letters[slot] = self.alphabet[targets[slot] - 1]
        return " ".join(letters)
