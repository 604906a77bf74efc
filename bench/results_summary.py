"""One table across tasks from `bench/repro.py` runs: the numbers docs/RESULTS.md summarises.

    python bench/results_summary.py bench/results/repro/maxof-*/repro.json bench/results/repro/upper-*/repro.json ...

Every cell is a difference of held-out gold paired over seeds: mean ± standard error over
seeds, and on how many seeds it was positive. Label accuracy is spa_dnd's (and
spa_stable's) self-label accuracy against gold at iterations 1 and 3, mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from repro import paired_cell, seed_gold  # bench/ is the script's folder, first on sys.path


def paired(results: dict, a: tuple, b: tuple) -> str:
    diffs = []
    for seed in results.get(a[0], {}):
        x, y = seed_gold(results, a[0], seed, *a[1:]), seed_gold(results, b[0], seed, *b[1:])
        if x is not None and y is not None:
            diffs.append(x - y)
    return paired_cell(diffs)


def label_accuracy(results: dict, arm: str, iteration: int) -> str:
    values = []
    for run in results.get(arm, {}).values():
        its = run.get("iterations", [])
        if run.get("status") == "ok" and len(its) >= iteration and its[iteration - 1]["label_accuracy"] is not None:
            values.append(its[iteration - 1]["label_accuracy"])
    return f"{statistics.fmean(values):.2f}" if values else "–"


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
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", help="repro.json files, one per task")
    args = parser.parse_args(argv)
    reports = [json.loads(Path(p).read_text()) for p in args.reports]
    names = [r["task_name"] if "task_name" in r else "listops" for r in reports]
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for title, cell in COLUMNS:
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
