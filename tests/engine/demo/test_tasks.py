"""Demo tasks with a known truth: the ListOps rules, its gold reward, noisy data, pools, loading, gold labels."""

import random
import re

import pytest

from selfee_fast import data
from selfee_fast.demo.learnable_tasks import Ends, MaxOf, Next, Upper
from selfee_fast.demo.tasks import SPLITS, ListOps, Task, TaskError, gold_label_pairs, load_task, split_of
from selfee_fast.demo.tiny import build_tokenizer


@pytest.fixture(scope="module")
def task():
    return ListOps()


@pytest.fixture(scope="module")
def pool(task):
    return task.prompts(400, seed=5)


@pytest.fixture(scope="module")
def tokenizer(task, tmp_path_factory):
    return build_tokenizer(task.corpus(), tmp_path_factory.mktemp("tok"), vocab_size=400)


def test_is_a_task(task):
    assert isinstance(task, Task) and task.name == "listops"


@pytest.mark.parametrize(
    ("prompt", "answer"),
    [
        ("copy: c a d b", "c a d b"),
        ("reverse: c a d b", "b d a c"),
        ("sort: c a d b", "a b c d"),
        ("first 2: c a d b", "c a"),
        ("last 3: c a d b", "a d b"),
        ("  sort:   h  a a ", "a a h"),
    ],
)
def test_rules(task, prompt, answer):
    assert task.reference_answer(prompt) == answer
    assert task.gold(prompt, answer) == 1.0


@pytest.mark.parametrize("prompt", ["", "reverse:", "shuffle: a b c", "reverse: a b z", "first 5: a b c", "sort a b c"])
def test_foreign_prompts_are_refused(task, prompt):
    with pytest.raises(TaskError, match="not a listops prompt"):
        task.reference_answer(prompt)


def test_pool_shape(task, pool):
    ops = set()
    for prompt in pool:
        words = prompt.split()
        items = prompt.split(":")[1].split()
        assert len(words) <= 8 and 3 <= len(items) <= 6 and set(items) <= set("abcdefgh")
        assert 1 <= len(task.reference_answer(prompt).split()) <= 6
        ops.add(words[0].rstrip(":"))
    assert ops == {"copy", "reverse", "sort", "first", "last"}


def test_gold_of_reference_is_one(task, pool):
    assert all(task.gold(p, task.reference_answer(p)) == 1.0 for p in pool)
    # spacing does not matter
    assert all(task.gold(p, "  " + task.reference_answer(p).replace(" ", " \t ") + "\n") == 1.0 for p in pool)


def test_gold_of_wrong_answers_is_below_one(task, pool):
    rng = random.Random(0)
    for prompt in pool:
        reference = task.reference_answer(prompt).split()
        wrong = []
        i = rng.randrange(len(reference))
        wrong.append([*reference[:i], next(c for c in "abcdefgh" if c != reference[i]), *reference[i + 1 :]])
        wrong.append([*reference, reference[-1]])  # one too many
        wrong.append(reference[:-1])  # one too few
        wrong.append(reference[1:] + reference[:1] if len(set(reference)) > 1 else ["x"])
        for answer in wrong:
            assert answer != reference
            assert 0.0 <= task.gold(prompt, " ".join(answer)) < 1.0


def test_gold_is_monotone_in_correct_positions(task):
    prompt = "reverse: a b c d e f"
    reference = task.reference_answer(prompt).split()
    scores = []
    for wrong in range(len(reference) + 1):
        answer = ["h"] * wrong + reference[wrong:]
        scores.append(task.gold(prompt, " ".join(answer)))
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    assert scores[0] == 1.0 and scores[-1] == 0.0
    # wrong length costs credit: extra tokens dilute, missing tokens count as wrong
    right = " ".join(reference)
    assert task.gold(prompt, right + " a") < 1.0
    assert task.gold(prompt, right + " a a a") < task.gold(prompt, right + " a")
    assert task.gold(prompt, " ".join(reference[:3])) == 0.5


@pytest.mark.parametrize(
    "response",
    ["", "   ", "\n\t", "zzzz", "a b c d e f g h a b c d e f g h", "🙂 ☃", "</s>", "f e d c b a</s>", "x" * 10_000],
)
def test_gold_of_garbage_is_a_valid_score(task, response):
    score = task.gold("reverse: a b c d e f", response)
    assert isinstance(score, float) and 0.0 <= score < 1.0


def test_gold_of_empty_answer_is_zero(task, pool):
    assert all(task.gold(p, "") == 0.0 for p in pool)


def test_determinism(task):
    assert task.demonstrations(200, seed=3) == task.demonstrations(200, seed=3)
    assert task.prompts(200, seed=3) == task.prompts(200, seed=3)
    assert ListOps().prompts(50, seed=3) == task.prompts(50, seed=3)  # nothing hides in the instance
    assert task.demonstrations(200, seed=3) != task.demonstrations(200, seed=4)
    assert task.prompts(200, seed=3) != task.prompts(200, seed=4)
    # a longer pool extends a shorter one of the same seed
    assert task.prompts(300, seed=3)[:200] == task.prompts(200, seed=3)


def test_demonstrations_are_noisy_at_the_documented_rate(task):
    demos = task.demonstrations(1000, seed=0)
    assert all(set(d) == {"prompt", "response"} and d["response"].strip() for d in demos)
    assert [d["prompt"] for d in demos] == task.prompts(1000, seed=0)
    golds = [task.gold(d["prompt"], d["response"]) for d in demos]
    wrong = sum(g < 1.0 for g in golds) / len(golds)
    assert 0.25 <= wrong <= 0.35, wrong
    # partial credit: most corrupted answers are near misses, not garbage
    partial = [g for g in golds if g < 1.0]
    assert sum(g > 0 for g in partial) / len(partial) > 0.6
    assert all(task.gold(d["prompt"], d["response"]) == 1.0 for d in ListOps(noise=0.0).demonstrations(200, 0))
    assert all(task.gold(d["prompt"], d["response"]) < 1.0 for d in ListOps(noise=1.0).demonstrations(200, 0))


def test_pools_of_seeds_in_different_splits_are_disjoint(task):
    pools = {seed: task.prompts(300, seed) for seed in (0, 1, 2, 63)}
    for seed, prompts in pools.items():
        assert {split_of(p) for p in prompts} == {seed % SPLITS}
    seeds = list(pools)
    for i, a in enumerate(seeds):
        for b in seeds[i + 1 :]:
            assert not set(pools[a]) & set(pools[b]), (a, b)
    # SFT data and an evaluation pool never share a prompt
    demos = {d["prompt"] for d in task.demonstrations(300, seed=0)}
    assert not demos & set(pools[63])
    # seeds 64 apart share a split: their pools may overlap (documented), yet they differ
    assert task.prompts(300, 64) != pools[0] and {split_of(p) for p in task.prompts(300, 64)} == {0}


def test_tokenizer_round_trip(task, tokenizer, pool):
    assert len(tokenizer) <= 400  # byte alphabet + specials + merges: the corpus has few distinct words
    texts = pool + [task.reference_answer(p) for p in pool] + [d["response"] for d in task.demonstrations(200, 9)]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
        assert tokenizer.unk_token_id not in ids
    # one token per list item, so an answer's length in tokens is its length in items
    for prompt in pool:
        answer = task.reference_answer(prompt)
        assert len(tokenizer(answer, add_special_tokens=False).input_ids) == len(answer.split())
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": pool[0]}], add_generation_prompt=True, tokenize=False
    )
    assert pool[0] in chat


def test_load_task_by_path_and_short_name():
    assert load_task("selfee_fast.demo.tasks:ListOps") == ListOps()
    assert load_task("selfee_fast.tasks:ListOps") == ListOps(), "the spec of earlier releases still loads"
    assert load_task("listops") == ListOps()
    assert load_task(" ListOps ") == ListOps()


def test_load_task_instances_and_factories(tmp_path, monkeypatch):
    (tmp_path / "my_demo_tasks.py").write_text(
        "from selfee_fast.tasks import ListOps\n"
        "QUIET = ListOps(noise=0.1)\n"
        "def make():\n"
        "    return ListOps(noise=0.2)\n"
        "class Half:\n"
        "    name = 'half'\n"
        "    def gold(self, prompt, response):\n"
        "        return 0.0\n"
        "def broken():\n"
        "    raise RuntimeError('no such data')\n"
    )
    (tmp_path / "my_bad_module.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_task("my_demo_tasks:QUIET").noise == 0.1
    assert load_task("my_demo_tasks:make").noise == 0.2
    with pytest.raises(TaskError, match=re.escape("'my_demo_tasks:Half'") + ".*not a Task.*lacks demonstrations"):
        load_task("my_demo_tasks:Half")
    with pytest.raises(TaskError, match=re.escape("'my_demo_tasks:broken'") + ".*no such data"):
        load_task("my_demo_tasks:broken")
    with pytest.raises(TaskError, match=re.escape("'my_bad_module:X'") + ".*cannot import.*boom at import"):
        load_task("my_bad_module:X")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:Task", "'no_such_module_xyz:Task'.*cannot import module 'no_such_module_xyz'"),
        ("selfee_fast.tasks:NoSuchTask", "'selfee_fast.tasks:NoSuchTask'.*has no attribute 'NoSuchTask'"),
        ("selfee_fast.tasks:SPLITS", "'selfee_fast.tasks:SPLITS'.*int object is not a Task"),
        ("selfee_fast.tasks:GoldLabelReport", "'selfee_fast.tasks:GoldLabelReport'.*is not a Task"),
        (
            "list_ops",
            "'list_ops'.*expected 'module:object' or a short name \\(ends, listops, maxof, next, upper\\)",
        ),
        ("a:b:c", "'a:b:c'.*expected 'module:object'"),
    ],
)
def test_load_task_bad_specs(spec, message):
    with pytest.raises(TaskError, match=message):
        load_task(spec)


def test_gold_label_pairs(task):
    prompt = "reverse: a b c d"
    records = [
        {"prompt": prompt, "response_a": "d c b a", "response_b": "d c a b"},  # a better
        {"prompt": prompt, "response_a": "d c", "response_b": "d c b a"},  # b better
        {"prompt": prompt, "response_a": "d c b a", "response_b": "d c b a"},  # identical: tie
        {"prompt": prompt, "response_a": "d c b e", "response_b": "d c e a"},  # different, equal gold: tie
        {"prompt": "sort: b a c", "response_a": "", "response_b": "a b"},  # b better, a empty
    ]
    pairs, report = gold_label_pairs(task, records)
    assert (report.read, report.kept, report.ties) == (5, 3, 2)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("d c b a", "d c a b"), ("d c b a", "d c"), ("a b", "")]
    for pair in pairs:
        assert pair["score_chosen"] == task.gold(pair["prompt"], pair["chosen"]) > pair["score_rejected"]
    assert report.mean_margin == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    assert "3/5 pairs kept, 2 ties skipped" in report.summary()
    # the pairs are TRL-style preference records the data loader reads
    record = data.preference_record("gold:1", pairs[0])
    assert (record.chosen, record.rejected) == ("d c b a", "d c a b")
    assert gold_label_pairs(task, []) == ([], type(report)())


# --------------------------------------------------------------------------- learnable tasks

LEARNABLE = {"ends": Ends, "maxof": MaxOf, "next": Next, "upper": Upper}


@pytest.fixture(scope="module", params=sorted(LEARNABLE))
def learnable(request):
    return LEARNABLE[request.param]()


@pytest.fixture(scope="module")
def learnable_pool(learnable):
    return learnable.prompts(300, seed=5)


def test_learnable_tasks_are_tasks_and_load_by_short_name(learnable):
    assert isinstance(learnable, Task)
    assert load_task(learnable.name) == learnable
    assert load_task(f" {learnable.name.upper()} ") == learnable
    assert load_task(f"selfee_fast.demo.learnable_tasks:{type(learnable).__name__}") == learnable


@pytest.mark.parametrize(
    ("name", "prompt", "right", "wrong"),
    [
        ("upper", "last: c a d", ["D", " D\t"], ["d", "D D", "C", "c", "DD", "!", ""]),
        ("maxof", "max: c a f b f", ["f", " f "], ["c", "a", "b", "h", "f f", "f b", ""]),
        ("ends", "ends: c a f b", ["c b", " c\tb "], ["b c", "c a", "c", "b", "c b b", "cb", "C B", ""]),
        ("next", "next: c a f b", ["d c", " d\tc "], ["c c", "d b", "c d", "d", "d c c", "dc", "D C", "p q", ""]),
    ],
)
def test_learnable_rules(name, prompt, right, wrong):
    task = LEARNABLE[name]()
    assert task.gold(prompt, task.reference_answer(prompt)) == 1.0
    assert all(task.gold(prompt, r) == 1.0 for r in right)
    assert all(0.0 <= task.gold(prompt, w) < 1.0 for w in wrong)


def test_learnable_partial_credit():
    upper, maxof, ends, after = Upper(), MaxOf(), Ends(), Next()
    # upper: half for the right item, half for the upper case
    assert upper.gold("last: c a d", "d") == 0.5 == upper.gold("last: c a d", "C")
    assert upper.gold("last: c a d", "c") == 0.0 and upper.gold("last: c a d", "D !") == 0.5
    # maxof: rank among the distinct items; the longer answer gets no edge
    assert maxof.gold("max: c a f b", "c") == 0.5 * 2 / 3 and maxof.gold("max: c a f b", "a") == 0.0
    assert maxof.gold("max: c a f b", "f a") == 0.5
    # ends: half per slot, a quarter for the other slot's item; a third token costs a third
    assert (
        ends.gold("ends: c a f b", "b c") == 0.5 == ends.gold("ends: c a f b", "c a") == ends.gold("ends: c a f b", "c")
    )
    assert ends.gold("ends: c a f b", "c b c") == pytest.approx(2 / 3) and ends.gold("ends: c a f b", "a f") == 0.0
    # next: per slot, credit falls by a third per letter of distance
    assert after.gold("next: c a f b", "c c") == pytest.approx(5 / 6) == after.gold("next: c a f b", "d b")
    assert after.gold("next: c a f b", "e d") == pytest.approx(2 / 3) and after.gold("next: c a f b", "d") == 0.5
    assert after.gold("next: c a f b", "p p") == 0.0 and after.gold("next: c a f b", "d c d") == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "response", ["", "   ", "\n\t", "zzzz", "a b c d e f g h a b c d e f g h", "🙂 ☃", "</s>", "x" * 10_000]
)
def test_learnable_gold_of_garbage_is_a_valid_score(learnable, learnable_pool, response):
    for prompt in learnable_pool[:20]:
        score = learnable.gold(prompt, response)
        assert isinstance(score, float) and 0.0 <= score < 1.0
    assert learnable.gold(learnable_pool[0], None) == 0.0  # not even a string


def test_learnable_foreign_prompts_are_refused(learnable):
    for prompt in [
        "",
        "reverse: a b c",
        "last:",
        "avoid:",
        "max: a z",
        "avoid: a 1",
        "last: a b 7",
        "ends: a 3",
        "next: a p",
    ]:
        with pytest.raises(TaskError, match=f"not an? {learnable.name} prompt"):
            learnable.reference_answer(prompt)


def test_learnable_reference_scores_one_and_answers_are_short(learnable, learnable_pool):
    for prompt in learnable_pool:
        answer = learnable.reference_answer(prompt)
        assert learnable.gold(prompt, answer) == 1.0
        assert len(prompt.split()) <= 9 and 1 <= len(answer.split()) <= 6


def test_learnable_demonstrations_are_noisy_at_the_documented_rate(learnable):
    demos = learnable.demonstrations(2000, seed=0)
    assert [d["prompt"] for d in demos] == learnable.prompts(2000, seed=0)
    golds = [learnable.gold(d["prompt"], d["response"]) for d in demos]
    wrong = sum(g < 1.0 for g in golds) / len(golds)
    assert abs(wrong - learnable.noise) < 0.05, wrong
    assert all(g > 0 for g in golds if g < 1.0) or learnable.name == "maxof"  # near misses
    clean, dirty = type(learnable)(noise=0.0), type(learnable)(noise=1.0)
    assert all(clean.gold(d["prompt"], d["response"]) == 1.0 for d in clean.demonstrations(200, 0))
    assert all(dirty.gold(d["prompt"], d["response"]) < 1.0 for d in dirty.demonstrations(200, 0))


def test_learnable_determinism_and_disjoint_pools(learnable):
    assert learnable.demonstrations(200, seed=3) == learnable.demonstrations(200, seed=3)
    assert learnable.demonstrations(200, seed=3) != learnable.demonstrations(200, seed=4)
    assert learnable.prompts(300, seed=3)[:200] == learnable.prompts(200, seed=3)
    pools = {seed: set(learnable.prompts(300, seed)) for seed in (0, 1, 2, 63)}
    for seed, prompts in pools.items():
        assert {split_of(p) for p in prompts} == {seed % SPLITS}
        assert not any(prompts & other for s, other in pools.items() if s != seed)


def test_learnable_corpus_covers_every_symbol(learnable, learnable_pool, tmp_path):
    tokenizer = build_tokenizer(learnable.corpus(), tmp_path, vocab_size=400)
    demos = [d["response"] for d in learnable.demonstrations(200, 9)]
    for text in learnable_pool + demos + [learnable.reference_answer(p) for p in learnable_pool]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids
    for prompt in learnable_pool:  # fits the demo's max_prompt_length 32 and max_new_tokens 12 easily
        assert len(tokenizer(prompt, add_special_tokens=False).input_ids) <= 16
        answer = learnable.reference_answer(prompt)
        assert len(tokenizer(answer, add_special_tokens=False).input_ids) == len(answer.split())
