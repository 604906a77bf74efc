"""bench/repro.py's gold judge: the diagnostic arms' pairs, and that the engine trains on them as written."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

from selfee_fast.demo.tasks import load_task
from selfee_fast.pipeline import pairs_problem
from selfee_fast.records import Generation, read_pairs, write_pairs

ROOT = Path(__file__).resolve().parents[2]


def load_repro():
    spec = importlib.util.spec_from_file_location("repro", ROOT / "bench" / "repro.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["repro"] = module
    spec.loader.exec_module(module)
    return module


repro = load_repro()


def generation(index: int, prompt: str, texts: list[str]) -> Generation:
    return Generation(
        index=index, location=f"pool1.jsonl:{index + 1}", prompt=[{"role": "user", "content": prompt}],
        prompt_ids=[1, 2, 3], responses=[[10 + index, 20 + k] for k in range(len(texts))], texts=texts,
        finished=[True] * len(texts),
    )  # fmt: skip


def test_the_gold_judge_ranks_by_gold_and_writes_a_tie_as_no_preference(tmp_path):
    task = load_task("maxof")
    prompt = "max: c a f b"  # gold: f 1, c 1/3, b 1/6, a 0, a letter not in the list 0
    assert [task.gold(prompt, t) for t in ("f", "c", "a", "z")] == [1.0, 1 / 3, 0.0, 0.0]
    generations = [
        generation(0, prompt, ["c", "f"]),  # the better one second
        generation(1, prompt, ["a", "f", "c", "z"]),  # best of four: f; worst: the first of the zeros
        generation(2, prompt, ["z", "a"]),  # both 0: no gold preference
        generation(3, prompt, ["f"]),  # one response: nothing to judge
    ]
    pairs, ties = repro.gold_judged_pairs(task, generations)
    assert [p.index for p in pairs] == [0, 1, 2] and ties == 1
    assert (pairs[0].chosen_text, pairs[0].rejected_text) == ("f", "c")
    assert pairs[0].chosen_ids == generations[0].responses[1] and pairs[0].rejected_ids == generations[0].responses[0]
    assert (pairs[1].chosen_text, pairs[1].rejected_text) == ("f", "a")
    assert (pairs[1].chosen_score, pairs[1].rejected_score) == (1.0, 0.0)
    assert pairs[2].identical and not pairs[0].identical and not pairs[1].identical
    # Unknown policy log-probs: training computes the reference forward itself.
    assert all(p.chosen_logp_policy is None and p.agreement is None for p in pairs)

    # The engine reuses a pairs file made of its stage's generations, so the gold labels are what it trains on.
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, pairs)
    assert pairs_problem(path, generations) is None
    assert [p.to_json() for p in read_pairs(path)] == [p.to_json() for p in pairs]


def test_every_arm_gets_its_options_and_a_gold_arm_never_reaches_the_engines_judge(tmp_path):
    scale = repro.DEFAULT
    arms, _ = repro.build_arms(scale)
    own = repro.seed_count(scale.seed_fraction, scale)
    seed_data = repro.SeedData(
        seed=0, pi_init=tmp_path / "pi_init", pools=["p1.jsonl", "p2.jsonl", "p3.jsonl"], iteration_prompts=1536,
        eval_prompts=[], seed_paths={own: tmp_path / "seed.jsonl"}, seed_pairs={own: 30},
        all_gold_path=tmp_path / "all_gold.jsonl", all_gold_pairs=600, all_gold_prompts=own + 1536, notes=[],
        pi_init_seconds=None,
    )  # fmt: skip

    def config_of(name):
        return repro.arm_config(arms[name], scale, seed_data, tmp_path / name, own)

    assert config_of("dpo_all_gold").train.seed_epochs == scale.seed_epochs == 3
    one_epoch = config_of("dpo_all_gold_1ep")
    assert one_epoch.train.seed_epochs == 1 and one_epoch.spa.iterations == 0
    assert one_epoch.data.seed_pairs == str(tmp_path / "all_gold.jsonl")
    gold, spa_stable = config_of("gold_judge_stable"), config_of("spa_stable")
    assert gold.spa.judge == "implicit"  # a valid engine setting; run_with_gold_judge writes the pairs first
    assert (gold.train.nll_alpha, gold.spa.seed_replay) == (spa_stable.train.nll_alpha, spa_stable.spa.seed_replay)
    assert (gold.spa.refine, gold.spa.extrapolate) == (True, [0.5, 0.25, 0.125])
    assert (config_of("gold_judge").spa.refine, config_of("gold_judge").spa.extrapolate) == (False, [])
    agree, agree_3ep = config_of("spa_stable_agree"), config_of("spa_stable_agree_3ep")
    assert (agree.train.iteration_epochs, agree_3ep.train.iteration_epochs) == (1, 3)
    assert replace(agree_3ep, run_dir=agree.run_dir, train=replace(agree_3ep.train, iteration_epochs=1)) == agree
