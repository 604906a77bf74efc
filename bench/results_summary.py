"""One table across tasks from `bench/repro.py` runs: the numbers docs/RESULTS.md summarises.

    python bench/results_summary.py bench/results/repro/maxof-*/repro.json bench/results/repro/upper-*/repro.json ...
    python bench/results_summary.py --goals spa_stable bench/results/repro/*/repro.json   # the stability goals
    python bench/results_summary.py --gap bench/results/repro/*/repro.json     # where the gap to all-gold comes from
    python bench/results_summary.py --trajectory spa_stable_agree bench/results/repro-horizon/*/repro.json
    python bench/results_summary.py --horizon bench/results/repro-horizon/*-c3510de3/repro.json   # past three iterations
    python bench/results_summary.py --finer bench/results/repro-horizon/*/repro.json   # re-judging more often

Every cell is a difference of held-out gold paired over seeds: mean ± standard error over
seeds, and on how many seeds it was positive. Label accuracy is spa_dnd's (and
spa_stable's) self-label accuracy against gold at iterations 1 and 3, mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from repro import paired_cell, seed_gold  # bench/ is the script's folder, first on sys.path


def paired_diffs(results: dict, a: tuple, b: tuple) -> list[float]:
    """Held-out gold of a minus b, per seed where both ran; (arm,) is the final model, (arm, i) its pi_i."""
    diffs = []
    for seed in results.get(a[0], {}):
        x, y = seed_gold(results, a[0], seed, *a[1:]), seed_gold(results, b[0], seed, *b[1:])
        if x is not None and y is not None:
            diffs.append(x - y)
    return diffs


def paired(results: dict, a: tuple, b: tuple) -> str:
    return paired_cell(paired_diffs(results, a, b))


def clearly_above(diffs: list[float]) -> bool:
    """The mean paired difference is more than two standard errors above 0."""
    return len(diffs) > 1 and statistics.fmean(diffs) > 2 * statistics.stdev(diffs) / math.sqrt(len(diffs))


def iteration_mean(results: dict, arm: str, key: str, iteration: int | range | None = None) -> float | None:
    """A label statistic of an arm's iterations: per seed its mean over iteration `iteration` (or a range
    of them, or every iteration), then the mean over seeds."""
    if isinstance(iteration, int):
        iteration = range(iteration, iteration + 1)
    per_seed = []
    for run in results.get(arm, {}).values():
        its = run.get("iterations", []) if run.get("status") == "ok" else []
        chosen = its if iteration is None else its[iteration.start - 1 : iteration.stop - 1]
        values = [it[key] for it in chosen if it.get(key) is not None]
        if values:
            per_seed.append(statistics.fmean(values))
    return statistics.fmean(per_seed) if per_seed else None


def goal_rows(arm: str, n: int = 3) -> list[tuple[str, object]]:
    """The iteration-stability goals over n iterations, checked for one arm: (goal, cell of one task's results)."""

    def rises(r) -> str:
        steps = [((arm, 1), ("dpo_seed",), "π_1 − π_0")]
        steps += [((arm, i), (arm, i - 1), f"π_{i} − π_{i - 1}") for i in range(2, n + 1)]
        for a, b, name in steps:
            if not clearly_above(paired_diffs(r, a, b)):
                return f"no: {name} = {paired(r, a, b)}"
        return "yes"

    def above(a, b):
        return lambda r: paired(r, a, b) if clearly_above(paired_diffs(r, a, b)) else f"no: {paired(r, a, b)}"

    def reaches_all_gold(r) -> str:
        diffs = paired_diffs(r, (arm,), ("dpo_all_gold",))
        return ("yes: " if diffs and statistics.fmean(diffs) >= 0 else "no: ") + paired_cell(diffs)

    def labels_hold(r) -> str:
        first, last = iteration_mean(r, arm, "label_accuracy", 1), iteration_mean(r, arm, "label_accuracy", n)
        if first is None or last is None:
            return "–"
        ok = last >= 0.7 and first - last <= 0.05
        return f"{'' if ok else 'no: '}{first:.2f} → {last:.2f}"

    def flags_useful(r) -> str:
        precision, base = iteration_mean(r, arm, "flag_precision"), iteration_mean(r, arm, "wrong_label_rate")
        if precision is None or base is None:
            return "–"
        return f"{'' if precision > base else 'no: '}{precision:.3f} vs {base:.3f}"

    return [
        ("gold rises every iteration (each step > 2 SE)", rises),
        ("π_1 > DPO on seed (> 2 SE)", above((arm, 1), ("dpo_seed",))),
        (f"π_{n} > π_1 (> 2 SE)", above((arm, n), (arm, 1))),
        (f"π_{n} ≥ DPO on all-gold labels", reaches_all_gold),
        (f"label accuracy at iteration {n} ≥ 0.7 and within 0.05 of iteration 1", labels_hold),
        ("flag precision above the wrong-label base rate (mean over iterations)", flags_useful),
    ]


def trajectory_rows(arm: str, n: int) -> list[tuple[str, object]]:
    """One arm iteration by iteration: each step's gold, paired over seeds, and the labels' accuracy."""
    rows = [("π_1 − dpo_seed", lambda r: paired(r, (arm, 1), ("dpo_seed",)))]
    rows += [(f"π_{i} − π_{i - 1}", lambda r, i=i: paired(r, (arm, i), (arm, i - 1))) for i in range(2, n + 1)]
    rows.append((f"π_{n} − π_1", lambda r: paired(r, (arm, n), (arm, 1))))
    rows.append(("label accuracy, iterations 1 → " + str(n),
                 lambda r: " → ".join(label_accuracy(r, arm, i) for i in range(1, n + 1))))  # fmt: skip
    return rows


def label_accuracy(results: dict, arm: str, iteration: int | range) -> str:
    accuracy = iteration_mean(results, arm, "label_accuracy", iteration)
    return "–" if accuracy is None else f"{accuracy:.2f}"


COLUMNS = [
    ("all-gold DPO − π_init (prerequisite)", lambda r: paired(r, ("dpo_all_gold",), ("sft",))),
    ("spa_dnd π_1 − dpo_seed", lambda r: paired(r, ("spa_dnd", 1), ("dpo_seed",))),
    ("spa_dnd π_3 − π_1", lambda r: paired(r, ("spa_dnd", 3), ("spa_dnd", 1))),
    ("spa_dnd label acc it. 1 → 3", lambda r: f"{label_accuracy(r, 'spa_dnd', 1)} → {label_accuracy(r, 'spa_dnd', 3)}"),
    ("keep identical pairs − spa_dnd", lambda r: paired(r, ("spa_keep_identical",), ("spa_dnd",))),
    ("judge mean − spa_dnd", lambda r: paired(r, ("spa_mean",), ("spa_dnd",))),
    ("NLL − spa_dnd", lambda r: paired(r, ("spa_nll",), ("spa_dnd",))),
    ("seed replay − spa_dnd", lambda r: paired(r, ("spa_replay",), ("spa_dnd",))),
    ("all three − spa_dnd", lambda r: paired(r, ("spa_stable",), ("spa_dnd",))),
    ("all three π_3 − π_1", lambda r: paired(r, ("spa_stable", 3), ("spa_stable", 1))),
    (
        "all three label acc it. 1 → 3",
        lambda r: f"{label_accuracy(r, 'spa_stable', 1)} → {label_accuracy(r, 'spa_stable', 3)}",
    ),
    ("all three − all-gold DPO", lambda r: paired(r, ("spa_stable",), ("dpo_all_gold",))),
    ("judge mean + replay − spa_dnd", lambda r: paired(r, ("spa_mean_replay",), ("spa_dnd",))),
    ("all three, best/worst of 4 − all three", lambda r: paired(r, ("spa_stable_n4",), ("spa_stable",))),
    ("DICE-like − all three", lambda r: paired(r, ("spa_dice",), ("spa_stable",))),
    ("all three, no judge reference − all three", lambda r: paired(r, ("spa_stable_no_reference",), ("spa_stable",))),
    ("CREAM smoothing − spa_dnd", lambda r: paired(r, ("spa_cream",), ("spa_dnd",))),
    ("all three + CREAM − all three", lambda r: paired(r, ("spa_stable_cream",), ("spa_stable",))),
    ("all three + CREAM π_3 − π_1", lambda r: paired(r, ("spa_stable_cream", 3), ("spa_stable_cream", 1))),
    ("judges agree (filter) − spa_dnd", lambda r: paired(r, ("spa_agree",), ("spa_dnd",))),
    ("all three + filter − all three", lambda r: paired(r, ("spa_stable_agree",), ("spa_stable",))),
    ("all three + filter π_3 − π_1", lambda r: paired(r, ("spa_stable_agree", 3), ("spa_stable_agree", 1))),
]

# Where the gap to all-gold DPO comes from (repro's group "gap"): its extra epochs, or the labels.
GAP_ROWS = [  # (title, arm a, arm b): held-out gold of a minus b
    ("all-gold DPO − π_init", "dpo_all_gold", "sft"),
    ("all-gold DPO, 1 epoch − 3 epochs", "dpo_all_gold_1ep", "dpo_all_gold"),
    ("iterative DPO, gold judge − all-gold DPO, 1 epoch", "gold_judge", "dpo_all_gold_1ep"),
    ("spa_dnd − all-gold DPO, 1 epoch", "spa_dnd", "dpo_all_gold_1ep"),
    ("spa_dnd − its loop with the gold judge", "spa_dnd", "gold_judge_dnd"),
    ("all three − their loop with the gold judge", "spa_stable", "gold_judge_stable"),
    ("all three + filter − all three's loop, gold judge", "spa_stable_agree", "gold_judge_stable"),
    ("all three + filter − all-gold DPO, 1 epoch", "spa_stable_agree", "dpo_all_gold_1ep"),
    ("all three + filter − all-gold DPO, 2 epochs", "spa_stable_agree", "dpo_all_gold_2ep"),
    ("iterative DPO, gold judge, 3 epochs − all-gold DPO", "gold_judge_3ep", "dpo_all_gold"),
    ("spa_dnd, 3 epochs − 1 epoch", "spa_dnd_3ep", "spa_dnd"),
    ("all three + filter, 3 epochs − 1 epoch", "spa_stable_agree_3ep", "spa_stable_agree"),
    ("all three + filter, 3 epochs − all-gold DPO", "spa_stable_agree_3ep", "dpo_all_gold"),
    ("all three + filter, 2 epochs − 1 epoch", "spa_stable_agree_2ep", "spa_stable_agree"),
]
GAP_COLUMNS = [(title, lambda r, a=a, b=b: paired(r, (a,), (b,))) for title, a, b in GAP_ROWS]


def horizon_rows(n: int) -> list[tuple[str, object]]:
    """Past the paper's three iterations (repro --iterations n): what the later ones add, and what helps there."""
    later = [(f"{title} π_{n} − π_3", lambda r, arm=arm: paired(r, (arm, n), (arm, 3)))
             for title, arm in (("spa_dnd", "spa_dnd"), ("all three + filter", "spa_stable_agree"),
                                ("all three's loop, gold judge,", "gold_judge_stable"))]  # fmt: skip
    finals = [
        ("all-gold DPO, 1 epoch − π_init (prerequisite)", "dpo_all_gold_1ep", "sft"),
        ("all-gold DPO, 3 epochs − π_init", "dpo_all_gold", "sft"),
        ("filter − spa_dnd", "spa_agree", "spa_dnd"),
        ("all three + filter − all three", "spa_stable_agree", "spa_stable"),
        ("all three + filter − spa_dnd", "spa_stable_agree", "spa_dnd"),
        ("all three + filter − all-gold DPO, 1 epoch", "spa_stable_agree", "dpo_all_gold_1ep"),
        ("all three + filter − all three's loop, gold judge", "spa_stable_agree", "gold_judge_stable"),
        ("filter, π_0 checking − filter", "spa_agree_stage0", "spa_agree"),
        ("all three + filter, π_0 checking − all three + filter", "spa_stable_agree_stage0", "spa_stable_agree"),
    ]
    return later + [(title, lambda r, a=a, b=b: paired(r, (a,), (b,))) for title, a, b in finals]


def finer_columns(reports: list[dict]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Re-judging more often: per task, the report with the smallest iterations against the one with the
    largest over the same prompts (repro --iteration-prompts). Returns the tasks and the rows."""
    by_task: dict[str, list[dict]] = {}
    for r in reports:
        by_task.setdefault(r.get("task_name", "listops"), []).append(r)
    pairs = {}
    for task, group in by_task.items():
        group.sort(key=lambda r: r["scale"]["iteration_prompts"][0])
        fine, coarse = group[0], group[-1]
        if sum(fine["scale"]["iteration_prompts"]) != sum(coarse["scale"]["iteration_prompts"]) or fine is coarse:
            continue
        pairs[task] = (fine, coarse)
    if not pairs:
        return [], []
    fine, coarse = next(iter(pairs.values()))
    ratio = coarse["scale"]["iteration_prompts"][0] // fine["scale"]["iteration_prompts"][0]
    n, size = len(coarse["scale"]["iteration_prompts"]), coarse["scale"]["iteration_prompts"][0]
    name = f"{len(fine['scale']['iteration_prompts'])}×{fine['scale']['iteration_prompts'][0]} − {n}×{size}"

    def gold_diff(task, arm, fine_i, coarse_i):
        f, c = pairs[task][0]["results"], pairs[task][1]["results"]
        golds = [(seed_gold(f, arm, seed, fine_i), seed_gold(c, arm, seed, coarse_i)) for seed in f.get(arm, {})]
        return paired_cell([x - y for x, y in golds if x is not None and y is not None])

    def labels(task, arm):
        f, c = pairs[task][0]["results"], pairs[task][1]["results"]
        first = label_accuracy(c, arm, 1), label_accuracy(f, arm, range(1, ratio + 1))
        last = label_accuracy(c, arm, n), label_accuracy(f, arm, range(n * ratio - ratio + 1, n * ratio + 1))
        return f"{first[0]} → {last[0]} ; {first[1]} → {last[1]}"

    rows = []
    for arm in ("spa_dnd", "spa_stable_agree"):
        rows.append((f"{arm}: {name}, final gold", [gold_diff(t, arm, None, None) for t in pairs]))
        rows += [(f"{arm}: after {k * size} prompts, {name}", [gold_diff(t, arm, k * ratio, k) for t in pairs])
                 for k in range(1, n)]  # fmt: skip
        rows.append(
            (f"{arm}: labels on the first → last {size} prompts ({n}×{size} ; finer)", [labels(t, arm) for t in pairs])
        )
    return list(pairs), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", help="repro.json files, one per task")
    parser.add_argument("--goals", metavar="ARM", help="instead: the iteration-stability goals, checked for ARM")
    parser.add_argument("--gap", action="store_true", help="instead: where the gap to all-gold DPO comes from")
    parser.add_argument("--trajectory", metavar="ARM", help="instead: ARM iteration by iteration, gold and labels")
    parser.add_argument("--horizon", action="store_true", help="instead: past the paper's three iterations")
    parser.add_argument(
        "--finer", action="store_true",
        help="instead: per task, smaller iterations against larger ones over the same prompts (re-judging more often)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    reports = [json.loads(Path(p).read_text()) for p in args.reports]
    if args.finer:
        tasks, finer = finer_columns(reports)
        if not tasks:
            parser.error("--finer needs, per task, two reports over the same prompts with different iteration sizes")
        print("| | " + " | ".join(tasks) + " |")
        print("|---|" + "---|" * len(tasks))
        for title, cells in finer:
            print(f"| {title} | " + " | ".join(cells) + " |")
        return 0
    names = [r["task_name"] if "task_name" in r else "listops" for r in reports]
    counts = sorted({len(r["scale"]["iteration_prompts"]) for r in reports})
    if (args.goals or args.trajectory or args.horizon) and len(counts) > 1:
        parser.error(f"the reports ran different numbers of iterations ({counts}); give one number's reports")
    if args.goals:
        rows = goal_rows(args.goals, counts[0])
    elif args.trajectory:
        rows = trajectory_rows(args.trajectory, counts[0])
    elif args.horizon:
        if counts[0] <= 3:
            parser.error(f"--horizon compares iterations past the third; these reports ran {counts[0]}")
        rows = horizon_rows(counts[0])
    else:
        rows = GAP_COLUMNS if args.gap else COLUMNS
    print(("| goal | " if args.goals else "| | ") + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for title, cell in rows:
        print(f"| {title} | " + " | ".join(cell(r["results"]) for r in reports) + " |")
    seeds = sorted({len(r["seeds"]) for r in reports})
    m = reports[0]["machine"]
    print(
        f"\nSeeds per task: {', '.join(map(str, seeds))}; machine: {m['cpus_usable']} usable CPUs ({m['processor']}), "
        f"torch {m['torch']} on {m['torch_threads']} thread(s), Python {m['python']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
