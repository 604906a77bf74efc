"""Self-made labels per SPA iteration against gold, and how they relate to response length.

Reads a bench/repro.py results folder (<out>/<task>-...-<scale>-<hash>/) and, for one SPA arm
(default spa_dnd), every seed's run/iter<i>/pairs.jsonl: the pairs the policy π_{i-1} labelled
for itself, two of its own samples each. Per iteration it prints

- label acc: fraction of gold-decided pairs (gold ties excluded) whose chosen response has the
  higher gold;
- chosen longer: among pairs whose two responses differ in token length, the fraction where the
  self-made label chose the longer one; gold longer: the same fraction for the gold label (over
  the gold-decided ones), i.e. what a correct judge would do;
- acc (len differs) / acc (len equal): label accuracy split by whether the lengths differ;
- sample tokens: mean token length of the judged responses (π_{i-1}'s samples), and eval tokens:
  mean response length of π_i on the held-out prompts (from the arm's eval/iter<i>.jsonl);
- eval gold: held-out gold of π_i;
- judge margin: mean |chosen − rejected| reward of the judge over pairs of two different responses
  (β log π_{i-1}/π_ref, summed or per token as the arm's judge scores);
- acc margin q1 … q4: label accuracy within each quarter of those pairs by judge margin, least to
  most confident: whether the judge's confidence still tells its right labels from its wrong ones;
- with spa.judge_consistency: disagreeing, the fraction of pairs of two different responses that
  the previous iteration's judge orders the other way (agreement < 0.5), and the label accuracy
  where the two judges agree and where they disagree (what `filter` trains on, and drops);
- earlier judge acc: with two responses per prompt, the checking judge's own accuracy on the same
  gold-decided pairs (its order is the label's, or the label's reverse where the two disagree; a
  tie, agreement 0.5, counts as neither). With spa.consistency_judge=stage0 that judge is π_0 from
  iteration 2 on, one fixed judge: what it loses from one iteration to the next, the pairs lost
  by getting harder, not by a judge that drifted.

Numbers are mean over seeds, with the per-seed values in brackets.

    python bench/label_diagnostics.py bench/results/tasks/maxof-29d402-default-df65fb2b
    python bench/label_diagnostics.py DIR --arm spa_refine --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from selfee_fast.demo.tasks import load_task
from selfee_fast.records import JudgedPair, read_generations, read_pairs


def fraction(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def iteration_stats(task, pairs: list[JudgedPair], pairwise: bool = True) -> dict:
    """One iteration's label statistics; `pairwise`: two responses per prompt, so a pair's
    agreement is the earlier judge's order of that pair itself."""
    decided, longer_chosen, longer_gold, acc_diff, acc_same, lengths = [], [], [], [], [], []
    disagreeing, acc_agree, acc_disagree, earlier_right, margins, decided_margins = [], [], [], [], [], []
    for p in pairs:
        g_c, g_r = task.gold(p.prompt_text, p.chosen_text), task.gold(p.prompt_text, p.rejected_text)
        n_c, n_r = len(p.chosen_ids), len(p.rejected_ids)
        lengths += [n_c, n_r]
        if n_c != n_r:
            longer_chosen.append(n_c > n_r)
        if p.agreement is not None and not p.identical:
            disagreeing.append(p.judges_disagree)
        if not p.identical:
            margins.append(abs(p.chosen_score - p.rejected_score))
        if g_c == g_r:
            continue
        right = g_c > g_r
        decided.append(right)
        if not p.identical:
            decided_margins.append((abs(p.chosen_score - p.rejected_score), right))
        if p.agreement is not None:
            (acc_disagree if p.judges_disagree else acc_agree).append(right)
            if pairwise and p.agreement != 0.5:
                earlier_right.append(right != p.judges_disagree)
        if n_c != n_r:
            acc_diff.append(right)
            longer_gold.append((n_c > n_r) == right)  # the gold-better response is the longer one
        else:
            acc_same.append(right)
    return {
        "pairs": len(pairs),
        "label_accuracy": fraction(decided),
        "chosen_longer": fraction(longer_chosen),
        "gold_longer": fraction(longer_gold),
        "length_differs": fraction([a != b for a, b in zip(lengths[::2], lengths[1::2], strict=True)]),
        "acc_len_differs": fraction(acc_diff),
        "acc_len_equal": fraction(acc_same),
        "sample_tokens": statistics.fmean(lengths) if lengths else None,
        "judge_margin": statistics.fmean(margins) if margins else None,
        "disagreeing": fraction(disagreeing),
        "acc_judges_agree": fraction(acc_agree),
        "acc_judges_disagree": fraction(acc_disagree),
        "earlier_judge_acc": fraction(earlier_right),
        **margin_quarters(margins, decided_margins),
    }


def margin_quarters(margins: list[float], decided: list[tuple[float, bool]]) -> dict:
    """Label accuracy per quarter of the judged pairs by judge margin (cut at the margins' quartiles)."""
    keys = [f"acc_margin_q{k}" for k in (1, 2, 3, 4)]
    if len(margins) < 4:
        return dict.fromkeys(keys)
    ordered = sorted(margins)
    cuts = [ordered[len(ordered) * k // 4] for k in (1, 2, 3)]
    quarters: list[list[bool]] = [[], [], [], []]
    for margin, right in decided:
        quarters[sum(margin >= c for c in cuts)].append(right)
    return {key: fraction(q) for key, q in zip(keys, quarters, strict=True)}


def eval_stats(task, path: Path) -> dict:
    if not path.exists():
        return {"eval_tokens": None, "eval_gold": None}
    gens = read_generations(path)
    return {
        "eval_tokens": statistics.fmean(len(g.responses[0]) for g in gens),
        "eval_gold": statistics.fmean(task.gold(g.prompt_text, g.texts[0]) for g in gens),
    }


def collect(folder: Path, arm: str) -> tuple[str, dict[int, list[dict]]]:
    report = json.loads((folder / "repro.json").read_text())
    task = load_task(report.get("task", "listops"))
    options = dict(report["arms"][arm]["options"]) if arm in report.get("arms", {}) else {}
    pairwise = options.get("generation.responses_per_prompt", 2) == 2
    per_seed: dict[int, list[dict]] = {}
    for seed_dir in sorted(folder.glob("seed*"), key=lambda p: int(p.name[4:])):
        run = seed_dir / arm / "run"
        rows, i = [], 1
        while (run / f"iter{i}" / "pairs.jsonl").exists():
            row = {"iteration": i, **iteration_stats(task, read_pairs(run / f"iter{i}" / "pairs.jsonl"), pairwise)}
            row.update(eval_stats(task, seed_dir / arm / "eval" / f"iter{i}.jsonl"))
            rows.append(row)
            i += 1
        if rows:
            per_seed[int(seed_dir.name[4:])] = rows
    return task.name, per_seed


KEYS = (
    "label_accuracy",
    "chosen_longer",
    "gold_longer",
    "length_differs",
    "acc_len_differs",
    "acc_len_equal",
    "sample_tokens",
    "eval_tokens",
    "eval_gold",
    "judge_margin",
    "disagreeing",
    "acc_judges_agree",
    "acc_judges_disagree",
    "earlier_judge_acc",
    "acc_margin_q1",
    "acc_margin_q2",
    "acc_margin_q3",
    "acc_margin_q4",
)


def table(name: str, arm: str, per_seed: dict[int, list[dict]]) -> str:
    seeds = sorted(per_seed)
    lines = [
        f"{name}, {arm}, seeds {seeds}: mean over seeds [per seed]",
        "",
        "| iteration | " + " | ".join(k.replace("_", " ") for k in KEYS) + " |",
        "|---" * (len(KEYS) + 1) + "|",
    ]
    count = max(len(rows) for rows in per_seed.values())
    for i in range(count):
        cells = []
        for key in KEYS:
            values = [per_seed[s][i][key] for s in seeds if len(per_seed[s]) > i]
            known = [v for v in values if v is not None]
            if not known:
                cells.append("–")
                continue
            each = ", ".join("–" if v is None else f"{v:.2f}" for v in values)
            cells.append(f"{statistics.fmean(known):.3f} [{each}]")
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a bench/repro.py results folder (holds repro.json and seed*/)")
    parser.add_argument("--arm", default="spa_dnd", help="an SPA arm (default spa_dnd)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    name, per_seed = collect(args.folder, args.arm)
    if not per_seed:
        print(f"no {args.arm} iterations under {args.folder}", file=sys.stderr)
        return 1
    print(table(name, args.arm, per_seed))
    if args.json:
        args.json.write_text(json.dumps({"task": name, "arm": args.arm, "seeds": per_seed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
