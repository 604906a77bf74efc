"""bench/repro.py's gold judge: the diagnostic arms' pairs, and that the engine trains on them as written."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

from selfee_fast.demo.tasks import load_task
from selfee_fast.pipeline import pairs_problem
from selfee_fast.records import Generation, JudgedPair, read_pairs, write_pairs

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


def test_past_the_papers_three_iterations_dnd_keeps_halving_and_the_pool_bounds_the_count(tmp_path):
    scale = replace(repro.DEFAULT, iteration_prompts=(512,) * 5)
    arms, _ = repro.build_arms(scale)
    own = repro.seed_count(scale.seed_fraction, scale)
    seed_data = repro.SeedData(
        seed=0, pi_init=tmp_path / "pi_init", pools=[f"p{i}.jsonl" for i in range(1, 6)], iteration_prompts=2560,
        eval_prompts=[], seed_paths={own: tmp_path / "seed.jsonl"}, seed_pairs={own: 30},
        all_gold_path=tmp_path / "all_gold.jsonl", all_gold_pairs=600, all_gold_prompts=own + 2560, notes=[],
        pi_init_seconds=None,
    )  # fmt: skip
    config = repro.arm_config(arms["spa_dnd"], scale, seed_data, tmp_path / "spa_dnd", own)
    assert config.spa.iterations == 5 and config.spa.extrapolate == [0.5, 0.25, 0.125, 0.0625, 0.03125]

    # 300 prompts for the largest gold seed (10% of 3000) leave room for five iterations of 512, not six.
    try:
        repro.main(["--iterations", "6", "--out", str(tmp_path)])
    except SystemExit as stop:
        assert "must be 1 to 5" in str(stop)
    else:
        raise AssertionError("six iterations of 512 prompts do not fit a pool of 3000")
    assert not any(tmp_path.iterdir())  # refused before any folder was made

    # Ten iterations of 256 over the same prompts re-judge twice as often; each keeps the λ of its prompts.
    halves = replace(scale, iteration_prompts=(256,) * 10)
    halved = replace(seed_data, pools=[f"p{i}.jsonl" for i in range(1, 11)], lambda_prompts=512)
    config = repro.arm_config(arms["spa_dnd"], halves, halved, tmp_path / "spa_dnd_256", own)
    assert config.spa.iterations == 10
    assert config.spa.extrapolate == [0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.0625, 0.0625, 0.03125, 0.03125]
    try:
        repro.main(["--iterations", "11", "--iteration-prompts", "256", "--out", str(tmp_path)])
    except SystemExit as stop:
        assert "must be 1 to 10" in str(stop)
    else:
        raise AssertionError("eleven iterations of 256 prompts do not fit beside a seed of 300 in 3000")


def fake_results(arm: str, golds: list[list[float]], accuracy: list[float] | None = None) -> dict:
    """repro.json's results for one arm, per seed: the gold of pi_1..pi_n with `accuracy` (an SPA arm),
    or of the final model alone (a DPO arm)."""
    runs = {}
    for seed, g in enumerate(golds):
        its = (
            []
            if accuracy is None
            else [{"gold_reward": x, "label_accuracy": a} for x, a in zip(g, accuracy, strict=True)]
        )
        runs[seed] = {"status": "ok", "final": {"gold_reward": g[-1]}, "iterations": its}
    return {arm: runs}


def test_the_trend_and_the_goals_follow_the_number_of_iterations():
    sys.path.insert(0, str(ROOT / "bench"))
    import results_summary

    rising = [[0.50 + 0.1 * i + 0.01 * s for i in range(1, 5)] for s in range(5)]  # four iterations, five seeds
    flat_last = [[*g[:3], g[2] - 0.001 * (s % 2)] for s, g in enumerate(rising)]
    results = fake_results("spa", flat_last, accuracy=[0.9, 0.9, 0.88, 0.8])
    results |= fake_results("dpo_seed", [[0.5 + 0.01 * s] for s in range(5)])
    results |= fake_results("dpo_all_gold", [[0.9] for s in range(5)])

    assert repro.trend_columns(4) == [
        "π_1 − dpo_seed", "π_2 − π_1", "π_3 − π_2", "π_4 − π_3", "π_4 − π_1", "π_last − dpo_all_gold",
    ]  # fmt: skip
    cells = repro.iteration_trend(results, "spa", 4)
    assert cells[0] == "+0.100 ± 0.000 (5/5)" and cells[3] == "-0.000 ± 0.000 (0/5)"
    assert repro.trend_columns(1) == ["π_1 − dpo_seed", "π_last − dpo_all_gold"]

    goals = dict(results_summary.goal_rows("spa", 4))
    assert goals["gold rises every iteration (each step > 2 SE)"](results).startswith("no: π_4 − π_3")
    assert goals["π_4 > π_1 (> 2 SE)"](results) == "+0.200 ± 0.000 (5/5)"
    # Labels fall 0.10 from iteration 1 to 4: more than the goal's 0.05.
    assert goals["label accuracy at iteration 4 ≥ 0.7 and within 0.05 of iteration 1"](results) == "no: 0.90 → 0.80"
    trajectory = dict(results_summary.trajectory_rows("spa", 4))
    assert trajectory["label accuracy, iterations 1 → 4"](results) == "0.90 → 0.90 → 0.88 → 0.80"
    assert list(trajectory)[:4] == ["π_1 − dpo_seed", "π_2 − π_1", "π_3 − π_2", "π_4 − π_3"]
    horizon = dict(results_summary.horizon_rows(4))
    assert list(horizon)[:3] == [
        "spa_dnd π_4 − π_3",
        "all three + filter π_4 − π_3",
        "all three's loop, gold judge, π_4 − π_3",
    ]
    results |= fake_results("spa_dnd", flat_last, accuracy=[0.9, 0.9, 0.88, 0.8])
    assert horizon["spa_dnd π_4 − π_3"](results) == cells[3]


def test_the_earlier_judges_accuracy_is_its_own_order_of_each_gold_decided_pair():
    sys.path.insert(0, str(ROOT / "bench"))
    from label_diagnostics import iteration_stats

    task = load_task("maxof")
    prompt = "max: c a f b"  # gold: f 1, c 1/3, a 0

    def pair(chosen: str, rejected: str, agreement: float | None):
        return JudgedPair(
            index=0, location="pool1.jsonl:1", prompt=[{"role": "user", "content": prompt}], prompt_ids=[1],
            chosen_ids=[ord(chosen)], rejected_ids=[ord(rejected)], chosen_text=chosen, rejected_text=rejected,
            chosen_score=1.0, rejected_score=0.0, confidence=0.7, chosen_logp_policy=None, rejected_logp_policy=None,
            agreement=agreement,
        )  # fmt: skip

    pairs = [
        pair("f", "c", 1.0),  # label right, the earlier judge agrees: right
        pair("f", "a", 0.0),  # label right, the earlier judge reverses it: wrong
        pair("a", "c", 0.0),  # label wrong, reversed: the earlier judge is right
        pair("c", "f", 0.5),  # the earlier judge ties: it orders nothing
        pair("f", "c", None),  # not measured
    ]
    stats = iteration_stats(task, pairs)
    assert stats["label_accuracy"] == 3 / 5
    assert stats["earlier_judge_acc"] == 2 / 3
    assert iteration_stats(task, pairs, pairwise=False)["earlier_judge_acc"] is None


def test_label_accuracy_by_quarter_of_judge_margin():
    sys.path.insert(0, str(ROOT / "bench"))
    from label_diagnostics import margin_quarters

    margins = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    decided = [(0.1, False), (0.2, True), (0.3, False), (0.5, True), (0.6, True), (0.8, False)]  # 0.4, 0.7: gold ties
    assert margin_quarters(margins, decided) == {
        "acc_margin_q1": 0.5, "acc_margin_q2": 0.0, "acc_margin_q3": 1.0, "acc_margin_q4": 0.0,
    }  # fmt: skip
    assert margin_quarters(margins[:3], decided[:3]) == dict.fromkeys(
        ["acc_margin_q1", "acc_margin_q2", "acc_margin_q3", "acc_margin_q4"]
    )


def test_finer_iterations_are_paired_with_coarser_ones_over_the_same_prompts():
    sys.path.insert(0, str(ROOT / "bench"))
    import results_summary

    def report(size: int, count: int, golds: list[list[float]], accuracy: list[float]) -> dict:
        results = fake_results("spa_stable_agree", golds, accuracy)
        return {"task_name": "maxof", "scale": {"iteration_prompts": [size] * count}, "results": results}

    coarse = report(512, 2, [[0.5, 0.6], [0.6, 0.7]], [0.9, 0.8])
    fine = report(256, 4, [[0.5, 0.52, 0.6, 0.65], [0.6, 0.61, 0.7, 0.74]], [0.9, 0.9, 0.7, 0.7])
    unrelated = {**report(512, 3, [[0.1, 0.2, 0.3]] * 2, [0.5] * 3), "task_name": "upper"}  # nothing to pair with
    tasks, rows = results_summary.finer_columns([coarse, fine, unrelated])
    assert tasks == ["maxof"]
    cells = dict(rows)
    assert cells["spa_stable_agree: 4×256 − 2×512, final gold"] == ["+0.045 ± 0.005 (2/2)"]
    assert cells["spa_stable_agree: after 512 prompts, 4×256 − 2×512"] == [
        "+0.015 ± 0.005 (2/2)"
    ]  # pi_2 of 256s against pi_1 of 512s
    assert cells["spa_stable_agree: labels on the first → last 512 prompts (2×512 ; finer)"] == [
        "0.90 → 0.80 ; 0.90 → 0.70"
    ]
