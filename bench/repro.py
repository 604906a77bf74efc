"""The SPA paper's tables in miniature, on a task whose gold reward is known (ListOps by default).

Not part of CI. Every arm gets the same prompt budget and the same training settings
(prompt counts, epochs, batch size, learning rate); what differs is where the labels come
from and how the loss treats them. N seeds per arm (default 3); the tables give mean ± std
over seeds of the final model's held-out gold reward and gold win rate against π_init, and,
for the SPA arms, how good the self-made labels and SPA's noise flags were against gold.

Arms
----
main table (the paper's Table 1 and its ablation)
  sft             π_init itself (no preference training)
  dpo_seed        stage 0 only: DPO on the gold-labelled seed
  dpo_all_gold    stage 0 on gold labels for the WHOLE prompt budget: the seed plus every
                  iteration prompt, each labelled by gold from two π_init samples (the paper's
                  "100%" row)
  spa_expansion   SPA, spa.refine=false (self-labelled data only)
  spa_refine      SPA, self-refinement without DND (spa.extrapolate=[])
  spa_dnd         SPA, self-refinement + DND, λ = [0.5, 0.25] (the default)
  dpo_iter_rm     iterative DPO judged by a small Bradley-Terry reward model fit to the seed, our stand-in
                  for the paper's PairRM judge (the paper's
                  external-judge baseline; spa.judge=reward_model, no refinement, no DND)
seed-fraction sweep: spa_dnd and dpo_seed with seeds of 0.8%, 1.7%, 3.3%, 10% of the pool
  (arm names spa_dnd_seed0.8pct, dpo_seed_seed0.8pct, ...; the fraction equal to the scale's
  own seed is the main arm itself). A seed with fewer than 4 gold pairs is not run: the
  report says so.
judge-reference ablation: spa_dnd with spa.judge_reference = previous / none
  (spa_dnd_judge_previous, spa_dnd_judge_none; "init" is spa_dnd itself).
where the gap to all-gold DPO comes from (group "gap"). The gold_judge arms are diagnostics, not
methods: they see gold labels for every prompt, as dpo_all_gold does.
  dpo_all_gold_1ep      dpo_all_gold in one epoch instead of train.seed_epochs (3): about as many
                        optimizer steps as SPA's loop takes
  dpo_all_gold_2ep      the same in two epochs: more steps than the SPA arms with seed replay take
  gold_judge            iterative DPO with the gold reward as its judge (no refinement, no DND)
  gold_judge_dnd        spa_dnd's loop with the gold reward as its judge
  gold_judge_stable     spa_stable's loop with the gold reward as its judge
  gold_judge_3ep        gold_judge with train.iteration_epochs 3, all-gold DPO's passes over each pair
  spa_dnd_3ep           spa_dnd with train.iteration_epochs 3
  spa_stable_agree_3ep  spa_stable_agree (the demo's setting) with train.iteration_epochs 3
  spa_stable_agree_2ep  the same with 2: between the paper's one epoch and stage 0's three
  The gold judge ranks each prompt's responses by gold; a prompt whose best and worst tie has no
  preference and is written as one response paired with itself, which the engine never trains on.

Data per seed s (all arms of a seed share it)
----------------------------------------------
π_init is built once (demo.build_pi_init, cached in <out>/<scale>-<hash>/seed<s>/pi_init). The
prompt pool is task.prompts(pool, seed=s+1); the iteration prompts are the LAST
sum(iteration_prompts) prompts of the pool, the seeds the first n, so every seed fraction
sees the same iteration prompts. Gold seeds are nested: one demo.make_seed_pairs call
samples two π_init responses for the largest seed needed, and the seed of n prompts is
the gold-labelled pairs among its first n prompts. Evaluation prompts are
task.prompts(eval_prompts, seed=s+2), scored by demo.evaluate.

Usage
-----
    python bench/repro.py --quick --arms sft,dpo_seed,spa_dnd   # logic check, 1 seed, ~30 s
    python bench/repro.py                                       # everything, 3 seeds: ~8-10 min on 2 shared cores
    python bench/repro.py --arms main --seeds 5
    python bench/repro.py --arms sweep,judge
    python bench/repro.py --task maxof --iterations 3 --arms sft,dpo_seed,dpo_all_gold,spa_dnd --seeds 5
    python bench/repro.py --task ends --seeds 5 --first-seed 5 --out bench/results/repro-confirm   # fresh seeds

--task takes a short name (ends, listops, maxof, next, upper; see selfee_fast.demo.learnable_tasks) or
module:object; --iterations n runs that many SPA iterations of the scale's per-iteration prompt
count, as many as the pool holds beside the largest gold seed (5 at the default scale). DND's λ is
the paper's 0.5, 0.25, 0.125 for iterations 1-3 and keeps halving past them (ours: the paper runs
three). docs/RESULTS.md gathers one such report per task (see its head).

--first-seed N runs seeds N, N + 1, ...: new π_init, pools, gold seeds and evaluation prompts, to
confirm on data no decision looked at what earlier seeds suggested (a separate --out keeps both reports).

--arms takes arm names and the groups main, sweep, judge, stable, gap, all (default). Results go to
<out>/[<task>-<task hash>-]<scale>-<hash>/ (default out: bench/results/repro; scale: quick or default; hash: of the DemoScale
values, so a changed scale never reuses another's π_init, pools or seeds): repro.json with
every number, repro.md with the tables, repro.log, and one folder per seed and arm.
Reruns skip what is finished: run_pipeline resumes its stages and each arm's evaluation is
cached (arm.json, keyed by a fingerprint of the arm's configuration).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from selfee_fast import models
from selfee_fast.demo.run import (
    DEFAULT,
    QUICK,
    DemoScale,
    build_pi_init,
    demo_config,
    evaluate,
    make_seed_pairs,
    sample,
    with_options,
    write_pools,
)
from selfee_fast.demo.tasks import gold_label_pairs, load_task
from selfee_fast.files import write_json_atomic
from selfee_fast.judge import pair_by_scores
from selfee_fast.pipeline import run_pipeline, run_stage
from selfee_fast.preflight import preflight
from selfee_fast.records import Generation, JudgedPair, read_generations, read_pairs, write_pairs
from selfee_fast.stages import stage_list

SWEEP_FRACTIONS = (0.008, 0.017, 0.033, 0.10)
MIN_SEED_PAIRS = 4
CACHE_VERSION = 2  # bump when what arm.json holds changes (2: pairs = pairs trained on)

# Rough minutes per seed on a shared 2-core CPU with --threads 1, measured with this script, with some
# margin (default scale of pool 3000, iterations 512+512, seed 0, all 14 arms in 2.6 min: data 39 s — π_init
# SFT plus gold seeds —, sft 0.4 s, DPO arms 1-10 s, SPA arms 10-13 s; quick: data 14 s, arms 1-3 s).
# With two OpenMP threads on the busy machine the tiny model's matmuls ran ~50x slower.
MINUTES = {
    "quick": {"pi_init": 0.3, "sft": 0.02, "dpo": 0.05, "spa": 0.07},
    "default": {"pi_init": 0.8, "sft": 0.02, "dpo": 0.12, "spa": 0.2},
}


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # sft | dpo | spa
    group: str  # main | sweep | judge
    gold: str = "seed"  # seed: the gold seed; all: gold labels for the whole prompt budget
    seed_fraction: float | None = None  # None: the scale's own seed fraction
    refine: bool = True
    dnd: bool = True
    judge_reference: str = "init"
    judge: str = "implicit"  # implicit (SPA) | reward_model (the external-judge baseline) | gold (a diagnostic)
    description: str = ""
    options: tuple[tuple[str, object], ...] = ()  # ("section.key", value) on top of the arm's config


def pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}".rstrip("0").rstrip(".")


def seed_count(fraction: float, scale: DemoScale) -> int:
    return max(2, round(fraction * scale.pool))  # the demo's rule


def build_arms(scale: DemoScale) -> tuple[dict[str, Arm], dict[str, str]]:
    """All arms by name, and aliases (sweep names that are a main arm at this scale) to their arm."""
    arms = [
        Arm("sft", "sft", "main", description="π_init, no preference training"),
        Arm("dpo_seed", "dpo", "main", description="DPO on the gold seed (stage 0 only)"),
        Arm("dpo_all_gold", "dpo", "main", gold="all", description="DPO on gold labels for every prompt (100%)"),
        Arm("spa_expansion", "spa", "main", refine=False, dnd=False, description="SPA, self-labelled data only"),
        Arm("spa_refine", "spa", "main", dnd=False, description="SPA + self-refinement, no DND"),
        Arm("spa_dnd", "spa", "main", description="SPA + self-refinement + DND (default)"),
        Arm(
            "dpo_iter_rm",
            "spa",
            "main",
            refine=False,
            dnd=False,
            judge="reward_model",
            description="iterative DPO, judged by a reward model fit to the seed (stand-in for PairRM)",
        ),
    ]
    # Our options for iteration-stable self-annotation, each on top of spa_dnd, then together.
    stable = {
        "spa_mean": ((("spa.judge_reward", "mean"),), "judge reward per response token"),
        "spa_nll": ((("train.nll_alpha", 1.0),), "+ NLL of the chosen response (iterative RPO, alpha 1)"),
        "spa_replay": ((("spa.seed_replay", 0.5),), "+ seed pairs replayed, half as many as self-labelled (DICE)"),
        "spa_stable": (
            (("spa.judge_reward", "mean"), ("train.nll_alpha", 1.0), ("spa.seed_replay", 0.5)),
            "the three together",
        ),
        "spa_mean_replay": ((("spa.judge_reward", "mean"), ("spa.seed_replay", 0.5)), "judge mean + seed replay"),
        "spa_stable_n4": (
            (
                ("spa.judge_reward", "mean"),
                ("train.nll_alpha", 1.0),
                ("spa.seed_replay", 0.5),
                ("generation.responses_per_prompt", 4),
            ),
            "the three together, best and worst of 4 responses per prompt",
        ),
        "spa_stable_no_reference": (
            (
                ("spa.judge_reward", "mean"),
                ("train.nll_alpha", 1.0),
                ("spa.seed_replay", 0.5),
                ("spa.judge_reference", "none"),
            ),
            "the three together, judged by log pi_{i-1} alone (the paper's no-reference ablation)",
        ),
        "spa_cream": (
            (("spa.judge_consistency", "smooth"),),
            "+ labels smoothed by the disagreement of this and the previous iteration's judge (CREAM)",
        ),
        "spa_agree": (
            (("spa.judge_consistency", "filter"),),
            "+ pairs the previous iteration's judge orders the other way not trained on",
        ),
        "spa_stable_cream": (
            (
                ("spa.judge_reward", "mean"),
                ("train.nll_alpha", 1.0),
                ("spa.seed_replay", 0.5),
                ("spa.judge_consistency", "smooth"),
            ),
            "the three together, labels smoothed by the judges' disagreement (CREAM)",
        ),
        "spa_stable_agree": (
            (
                ("spa.judge_reward", "mean"),
                ("train.nll_alpha", 1.0),
                ("spa.seed_replay", 0.5),
                ("spa.judge_consistency", "filter"),
            ),
            "the three together, pairs the two judges order oppositely not trained on",
        ),
        "spa_agree_stage0": (
            (("spa.judge_consistency", "filter"), ("spa.consistency_judge", "stage0")),
            "+ pairs pi_0's judge (gold seed only) orders oppositely not trained on, from iteration 3 on",
        ),
        "spa_stable_agree_stage0": (
            (
                ("spa.judge_reward", "mean"),
                ("train.nll_alpha", 1.0),
                ("spa.seed_replay", 0.5),
                ("spa.judge_consistency", "filter"),
                ("spa.consistency_judge", "stage0"),
            ),
            "the three together, pairs pi_0's judge orders oppositely not trained on (from iteration 3)",
        ),
        "spa_dice": (
            (("spa.judge_reference", "previous"), ("spa.judge_reward", "mean"), ("spa.seed_replay", 0.5)),
            "DICE's recipe in our terms: judge against the previous iterate, per token, seed replay",
        ),
    }
    for name, (options, what) in stable.items():
        arms.append(Arm(name, "spa", "stable", options=options, description=f"spa_dnd, {what}"))
    # Where the gap to all-gold DPO comes from: its extra epochs, or the self-made labels (the same loops
    # with the gold reward as the judge).
    three_epochs = (("train.iteration_epochs", 3),)
    arms += [
        Arm("dpo_all_gold_1ep", "dpo", "gap", gold="all", options=(("train.seed_epochs", 1),),
            description="DPO on gold labels for every prompt, one epoch"),
        Arm("dpo_all_gold_2ep", "dpo", "gap", gold="all", options=(("train.seed_epochs", 2),),
            description="DPO on gold labels for every prompt, two epochs"),
        Arm("gold_judge", "spa", "gap", refine=False, dnd=False, judge="gold",
            description="iterative DPO judged by the gold reward"),
        Arm("gold_judge_dnd", "spa", "gap", judge="gold", description="spa_dnd, judged by the gold reward"),
        Arm("gold_judge_stable", "spa", "gap", judge="gold", options=stable["spa_stable"][0],
            description="spa_stable, judged by the gold reward"),
        Arm("gold_judge_3ep", "spa", "gap", refine=False, dnd=False, judge="gold", options=three_epochs,
            description="iterative DPO judged by the gold reward, 3 epochs per iteration"),
        Arm("spa_dnd_3ep", "spa", "gap", options=three_epochs, description="spa_dnd, 3 epochs per iteration"),
        Arm("spa_stable_agree_3ep", "spa", "gap", options=stable["spa_stable_agree"][0] + three_epochs,
            description="spa_stable_agree, 3 epochs per iteration"),
        Arm("spa_stable_agree_2ep", "spa", "gap", options=(*stable["spa_stable_agree"][0], ("train.iteration_epochs", 2)),
            description="spa_stable_agree, 2 epochs per iteration"),
    ]  # fmt: skip
    # The official code's handling of identical pairs (trained on, with zero gradient), next to ours (dropped).
    arms.append(Arm("spa_keep_identical", "spa", "judge", options=(("spa.keep_identical_pairs", True),),
                    description="spa_dnd, pairs of two identical responses trained on (the official code)"))  # fmt: skip
    aliases = {"spa_dnd_judge_init": "spa_dnd"}
    own = seed_count(scale.seed_fraction, scale)
    for fraction in SWEEP_FRACTIONS:
        for base in ("spa_dnd", "dpo_seed"):
            name = f"{base}_seed{pct(fraction)}pct"
            if seed_count(fraction, scale) == own:
                aliases[name] = base
                continue
            kind = "spa" if base == "spa_dnd" else "dpo"
            what = "SPA + refinement + DND" if kind == "spa" else "DPO on the gold seed"
            arms.append(Arm(name, kind, "sweep", seed_fraction=fraction, description=f"{what}, seed {pct(fraction)}%"))
    for reference in ("previous", "none"):
        arms.append(
            Arm(
                f"spa_dnd_judge_{reference}",
                "spa",
                "judge",
                judge_reference=reference,
                description=f"spa_dnd, judge reference {reference}",
            )
        )
    return {a.name: a for a in arms}, aliases


GROUPS = ("main", "sweep", "judge", "stable", "gap")


def select_arms(spec: str, arms: dict[str, Arm], aliases: dict[str, str]) -> list[str]:
    chosen: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "all":
            names = list(arms)
        elif item in GROUPS:
            names = [a.name for a in arms.values() if a.group == item]
            if item == "sweep":  # the sweep's row at the scale's own fraction is the main arm
                names = [aliases[n] for n in aliases if "_seed" in n] + names
            if item in ("judge", "stable"):
                names = ["spa_dnd", *names]
            if item == "gap":  # what its arms are compared with
                names = ["dpo_all_gold", "spa_dnd", "spa_stable", "spa_stable_agree", *names]
        elif item in arms:
            names = [item]
        elif item in aliases:
            names = [aliases[item]]
        else:
            known = ", ".join([*arms, *aliases, *GROUPS, "all"])
            raise SystemExit(f"repro: unknown arm {item!r}; known: {known}")
        chosen += [n for n in names if n not in chosen]
    return [n for n in arms if n in chosen]  # registry order


# --------------------------------------------------------------------------- data per seed


@dataclass
class SeedData:
    seed: int
    pi_init: Path
    pools: list[str]
    iteration_prompts: int
    eval_prompts: list[str]
    seed_paths: dict[int, Path]  # seed prompt count -> gold pairs file
    seed_pairs: dict[int, int]  # seed prompt count -> gold pairs kept
    all_gold_path: Path
    all_gold_pairs: int
    all_gold_prompts: int
    notes: list[str]
    pi_init_seconds: float | None  # the SFT's time when π_init was built (maybe by an earlier invocation)
    # DND's λ halves every this many iteration prompts (None: every iteration): the scale's own
    # iteration size, so iterations made smaller with --iteration-prompts keep the λ of the prompts they hold.
    lambda_prompts: int | None = None


def dnd_lambdas(iteration_prompts: tuple[int, ...], every: int) -> list[float]:
    """DND's λ per iteration by prompt position: an iteration ending at prompt k takes λ = 2^-ceil(k / every),
    so iterations of `every` prompts take the paper's 1/2, 1/4, 1/8, halving on past them."""
    return [0.5 ** math.ceil(end / every) for end in itertools.accumulate(iteration_prompts)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def nonempty(pairs: list[dict]) -> tuple[list[dict], int]:
    """data.load_preferences refuses an empty response; gold_label_pairs may keep one (it scores 0)."""
    kept = [p for p in pairs if p["chosen"].strip() and p["rejected"].strip()]
    return kept, len(pairs) - len(kept)


def gold_pairs_of(task, generations: list[Generation], limit: int | None = None) -> tuple[list[dict], object, int]:
    records = [
        {"prompt": g.prompt_text, "response_a": g.texts[0], "response_b": g.texts[1]}
        for g in generations
        if limit is None or g.index < limit
    ]
    pairs, report = gold_label_pairs(task, records)
    pairs, empty = nonempty(pairs)
    return pairs, report, empty


def prepare_seed(task, scale: DemoScale, seed: int, seed_dir: Path, counts: list[int], log) -> SeedData:
    seed_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pi_init = build_pi_init(task, seed_dir, scale, seed, log)
    sft_info = json.loads((pi_init / "sft.json").read_text())
    notes: list[str] = []

    pool = task.prompts(scale.pool, seed=seed + 1)
    iteration_total = sum(scale.iteration_prompts)
    largest = max(counts)
    if largest + iteration_total > scale.pool:
        raise SystemExit(
            f"repro: a pool of {scale.pool} prompts cannot hold a seed of {largest} and iterations of "
            f"{scale.iteration_prompts}"
        )
    data = seed_dir / "data"
    data.mkdir(exist_ok=True)
    tail, lists = pool[scale.pool - iteration_total :], []
    for n in scale.iteration_prompts:
        lists.append(tail[:n])
        tail = tail[n:]
    pools = write_pools(lists, data)

    # Nested gold seeds: two pi_init samples for the largest seed's prompts, cut to each size.
    seed_max = data / "seed_max"
    seed_max.mkdir(exist_ok=True)
    make_seed_pairs(task, pi_init, pool[:largest], seed_max, scale, seed, log)
    generations = read_generations(seed_max / "seed_generations.jsonl")
    if len(generations) < largest:  # an older, smaller seed_max: redo it for the larger seed
        for f in ("seed.jsonl", "seed_generations.jsonl"):
            (seed_max / f).unlink(missing_ok=True)
        make_seed_pairs(task, pi_init, pool[:largest], seed_max, scale, seed, log)
        generations = read_generations(seed_max / "seed_generations.jsonl")
    seed_paths, seed_pairs = {}, {}
    for n in sorted(set(counts)):
        pairs, report, empty = gold_pairs_of(task, generations, limit=n)
        path = data / f"seed_n{n}.jsonl"
        if not path.exists():
            write_jsonl(path, pairs)
        seed_paths[n], seed_pairs[n] = path, len(pairs)
        log(f"seed of {n} prompts: {report.summary()}" + (f", {empty} with an empty response dropped" if empty else ""))
        if empty:
            notes.append(f"seed of {n} prompts: {empty} gold pairs with an empty response dropped")

    # Gold labels for the whole prompt budget: the scale's own seed plus every iteration prompt.
    own = seed_count(scale.seed_fraction, scale)
    if own not in seed_paths:
        raise AssertionError("the scale's own seed count is always prepared")
    iter_dir = data / "iteration_gold"
    iter_dir.mkdir(exist_ok=True)
    iter_prompts = [p for lst in lists for p in lst]
    make_seed_pairs(task, pi_init, iter_prompts, iter_dir, scale, seed, log)
    iter_pairs, report, empty = gold_pairs_of(task, read_generations(iter_dir / "seed_generations.jsonl"))
    log(f"gold labels of the iteration prompts: {report.summary()}")
    if empty:
        notes.append(f"all-gold: {empty} gold pairs with an empty response dropped")
    all_gold = read_jsonl(seed_paths[own]) + iter_pairs
    all_gold_path = data / "all_gold.jsonl"
    if not all_gold_path.exists():
        write_jsonl(all_gold_path, all_gold)

    eval_prompts = task.prompts(scale.eval_prompts, seed=seed + 2)
    log(f"seed {seed}: data ready in {time.perf_counter() - started:.0f} s")
    return SeedData(
        seed=seed,
        pi_init=pi_init,
        pools=pools,
        iteration_prompts=iteration_total,
        eval_prompts=eval_prompts,
        seed_paths=seed_paths,
        seed_pairs=seed_pairs,
        all_gold_path=all_gold_path,
        all_gold_pairs=len(all_gold),
        all_gold_prompts=own + iteration_total,
        notes=notes,
        pi_init_seconds=sft_info.get("seconds"),
    )


# --------------------------------------------------------------------------- one arm


def arm_config(arm: Arm, scale: DemoScale, sd: SeedData, arm_dir: Path, seed_n: int):
    seed_path = sd.all_gold_path if arm.gold == "all" else sd.seed_paths[seed_n]
    pools = sd.pools if arm.kind == "spa" else []
    base = demo_config(arm_dir, sd.pi_init, seed_path, pools, scale, sd.seed)
    if arm.kind == "dpo":
        return with_options(replace(base, spa=replace(base.spa, iterations=0)), dict(arm.options))
    config = replace(
        base,
        spa=replace(
            base.spa,
            refine=arm.refine,
            extrapolate=dnd_lambdas(scale.iteration_prompts, sd.lambda_prompts or scale.iteration_prompts[0])
            if arm.dnd
            else [],
            judge_reference=arm.judge_reference,
            judge="implicit" if arm.judge == "gold" else arm.judge,  # never runs: run_with_gold_judge
        ),
    )
    return with_options(config, dict(arm.options))


def gold_judged_pairs(task, generations: list[Generation]) -> tuple[list[JudgedPair], int]:
    """The gold reward in the judge's place: per prompt its best and worst response by gold, as the
    engine pairs an external judge's scores (`judge.pair_by_scores`).

    A prompt whose best and worst responses tie has no preference: it is written as its first
    response paired with itself, which the engine counts and never trains on. Returns the pairs
    and the number of such ties (two identical samples included).
    """
    pairs, ties = [], 0
    for g in generations:
        if len(g.responses) < 2:
            continue
        pair = pair_by_scores(g, [task.gold(g.prompt_text, text) for text in g.texts])
        if pair.chosen_score == pair.rejected_score:
            ties += 1
            pair = replace(pair, rejected_ids=pair.chosen_ids, rejected_text=pair.chosen_text)
        pairs.append(pair)
    return pairs, ties


def run_with_gold_judge(task, config, log) -> None:
    """The engine's loop with the gold reward as its judge, one stage at a time.

    Each iteration generates, then its pairs file is written from gold before the engine's judge
    would run; the engine reuses a pairs file made of its stage's generations (`pipeline.judge`).
    Run from scratch every time (seconds at this scale), so no stage is ever judged otherwise.
    """
    shutil.rmtree(config.run_dir, ignore_errors=True)
    for i in range(config.spa.iterations + 1):
        upto = replace(config, spa=replace(config.spa, iterations=i))
        if i:
            stage = stage_list(upto)[-1]
            run_stage(upto, preflight(upto), stage, until="generate", log=log)
            stage_dir = Path(config.run_dir) / stage.name
            pairs, ties = gold_judged_pairs(task, read_generations(stage_dir / "generations.jsonl"))
            write_pairs(stage_dir / "pairs.jsonl", pairs)
            log(f"{stage.name}: gold judge, {len(pairs)} pairs, {ties} with no gold preference")
        run_pipeline(upto, log=log)
        if i and [p.to_json() for p in read_pairs(stage_dir / "pairs.jsonl")] != [p.to_json() for p in pairs]:
            raise RuntimeError(f"{stage.name}: the engine judged again instead of using the gold pairs")


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_gold(task, path: Path) -> list[float]:
    """Per-prompt gold of one evaluated model, in prompt order (as demo.evaluate computes it)."""
    return [task.gold(g.prompt_text, g.texts[0]) for g in read_generations(path)]


def eval_pi_init(task, sd: SeedData, arm_dir: Path, scale: DemoScale) -> list[dict]:
    """demo.evaluate's pi_init row alone (evaluate always goes on to stage0)."""
    model, tokenizer = models.load_model(sd.pi_init, gradient_checkpointing=False)
    generations = sample(
        model,
        tokenizer,
        sd.eval_prompts,
        arm_dir / "eval" / "pi_init.jsonl",
        n=1,
        max_new_tokens=scale.max_new_tokens,
        seed=sd.seed + 17,  # demo.evaluate's sampling seed: the same samples as its pi_init row
        log=lambda *_: None,
    )
    gold = [task.gold(g.prompt_text, g.texts[0]) for g in generations]
    return [
        {
            "model": "pi_init",
            "gold_reward": sum(gold) / len(gold),
            "win_rate_vs_init": 0.5,
            "response_tokens": sum(len(g.responses[0]) for g in generations) / len(generations),
        }
    ]


def training_budget(run_dir: Path, stages: list[str]) -> dict:
    steps, pairs = 0, 0
    for stage in stages:
        metrics = run_dir / stage / "train" / "metrics.jsonl"
        lines = read_jsonl(metrics) if metrics.exists() else []
        steps += lines[-1]["step"] if lines else 0
        done = run_dir / stage / "done.json"
        record = json.loads(done.read_text()) if done.exists() else {}
        pairs += record.get("trained_pairs", record.get("pairs", 0))  # trained on (identical pairs are not)
    return {"optimizer_steps": steps, "train_pairs": pairs}


def run_arm(task, arm: Arm, scale: DemoScale, sd: SeedData, arm_dir: Path, log, cached_only: bool = False):
    """Run and evaluate one arm for one seed, or return its cached result; cached_only: None if not cached."""
    seed_n = seed_count(arm.seed_fraction if arm.seed_fraction is not None else scale.seed_fraction, scale)
    config = None if arm.kind == "sft" else arm_config(arm, scale, sd, arm_dir, seed_n)
    key = fingerprint(CACHE_VERSION, asdict(arm), asdict(scale), sd.seed, asdict(config) if config else None)
    cache = arm_dir / "arm.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("fingerprint") == key:
            if not cached_only:
                log(f"finished earlier ({cached['seconds']['total']:.0f} s then), skipped")
            return {**cached, "cached": True}
        if not cached_only:
            log("arm.json is from another configuration: running and evaluating again")
    if cached_only:
        return None
    arm_dir.mkdir(parents=True, exist_ok=True)

    gold_prompts = {"sft": 0, "dpo": seed_n, "spa": seed_n}[arm.kind]
    gold_pairs = 0 if arm.kind == "sft" else sd.seed_pairs[seed_n]
    if arm.gold == "all":
        gold_prompts, gold_pairs = sd.all_gold_prompts, sd.all_gold_pairs
    if arm.judge == "gold":  # every prompt is gold-labelled; the pairs themselves come from the arm's own samples
        gold_prompts = sd.all_gold_prompts
    result = {
        "fingerprint": key,
        "arm": arm.name,
        "seed": sd.seed,
        "seed_prompts": None if arm.kind == "sft" else (sd.all_gold_prompts if arm.gold == "all" else seed_n),
        "gold_prompts": gold_prompts,
        "gold_pairs": gold_pairs,
        "prompt_budget": seed_count(scale.seed_fraction, scale) + sd.iteration_prompts,
    }
    if arm.kind != "sft" and gold_pairs < MIN_SEED_PAIRS:
        reason = f"seed of {seed_n} prompts gave {gold_pairs} gold pairs (< {MIN_SEED_PAIRS}): not run"
        log(reason)
        result.update(status="skipped", reason=reason, seconds={"pipeline": 0, "eval": 0, "total": 0})
        write_json_atomic(cache, result)
        return {**result, "cached": False}

    started = time.perf_counter()
    if config is not None:
        # force: a stage recorded under another configuration (the library changed what demo_config makes)
        # is redone; stages whose fingerprint matches are still skipped or resumed.
        if arm.judge == "gold":
            run_with_gold_judge(task, config, log)
        else:
            run_pipeline(config, force=True, log=log)
    shutil.rmtree(arm_dir / "eval", ignore_errors=True)  # generation resumes from files: never from stale ones
    trained = time.perf_counter()
    if config is None:
        rows = eval_pi_init(task, sd, arm_dir, scale)
        final_eval = arm_dir / "eval" / "pi_init.jsonl"
        budget = {"optimizer_steps": 0, "train_pairs": 0}
    else:
        rows = evaluate(task, config, sd.eval_prompts, arm_dir, scale, sd.seed, log)
        stages = ["stage0"] + [f"iter{i}" for i in range(1, config.spa.iterations + 1)]
        final_eval = arm_dir / "eval" / f"{stages[-1]}.jsonl"
        budget = training_budget(Path(config.run_dir), stages)
    done = time.perf_counter()
    result.update(
        status="ok",
        rows=rows,
        final=rows[-1],
        iterations=[r for r in rows if r["model"].startswith("pi_") and r["model"] not in ("pi_init", "pi_0")],
        gold_per_prompt=stage_gold(task, final_eval),
        pi_init_gold_per_prompt=stage_gold(task, arm_dir / "eval" / "pi_init.jsonl"),
        seconds={"pipeline": trained - started, "eval": done - trained, "total": done - started},
        **budget,
    )
    write_json_atomic(cache, result)
    log(
        f"final gold {rows[-1]['gold_reward']:.3f}, win vs init {rows[-1]['win_rate_vs_init']:.3f} "
        f"({done - started:.0f} s)"
    )
    return {**result, "cached": False}


# --------------------------------------------------------------------------- statistics and text


def mean_std(values: list[float]) -> tuple[float | None, float | None, int]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def fmt_ms(values: list[float], digits: int = 3, signed: bool = False) -> str:
    mean, std, _ = mean_std(values)
    if mean is None:
        return "–"
    sign = "+" if signed else ""
    text = f"{mean:{sign}.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if std is not None else f"{text} (n=1)"


def paired_se(a: list[float], b: list[float]) -> float:
    """Standard error of mean(a - b) over prompts: the evaluation's own sampling noise."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")


def compare(results: dict, a: str, b: str, metric: str = "gold_reward") -> dict | None:
    """a − b paired over the seeds where both arms finished."""
    ra, rb = results.get(a, {}), results.get(b, {})
    seeds = sorted(s for s in ra if s in rb and ra[s].get("status") == "ok" and rb[s].get("status") == "ok")
    if not seeds:
        return None
    diffs = [ra[s]["final"][metric] - rb[s]["final"][metric] for s in seeds]
    mean, std, n = mean_std(diffs)
    out = {"a": a, "b": b, "metric": metric, "seeds": seeds, "diffs": diffs, "mean": mean, "std": std, "n": n}
    out["higher_on"] = sum(d > 0 for d in diffs)
    if metric == "gold_reward":
        ses = [paired_se(ra[s]["gold_per_prompt"], rb[s]["gold_per_prompt"]) for s in seeds]
        out["eval_se"] = math.sqrt(sum(se * se for se in ses)) / len(ses)
    return out


def seed_gold(results: dict, arm: str, seed, iteration: int | None = None) -> float | None:
    """Held-out gold of an arm's final model on one seed, or of its π_iteration; None if not run."""
    run = results.get(arm, {}).get(seed, {})
    if run.get("status") != "ok":
        return None
    if iteration is None:
        return run["final"]["gold_reward"]
    its = run["iterations"]
    return its[iteration - 1]["gold_reward"] if len(its) >= iteration else None


def paired_cell(diffs: list[float]) -> str:
    """Differences paired over seeds as `mean ± standard error (seeds higher/seeds)`."""
    if len(diffs) < 2:
        return "–"
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"{statistics.fmean(diffs):+.3f} ± {se:.3f} ({sum(d > 0 for d in diffs)}/{len(diffs)})"


def trend_columns(iterations: int) -> list[str]:
    """Headers of the iteration-trend table: each step, then the last iterate against π_1 and all-gold DPO."""
    steps = ["π_1 − dpo_seed"] + [f"π_{i} − π_{i - 1}" for i in range(2, iterations + 1)]
    return steps + ([f"π_{iterations} − π_1"] if iterations > 1 else []) + ["π_last − dpo_all_gold"]


def iteration_trend(results: dict, name: str, iterations: int) -> list[str]:
    """Cells of the iteration-trend table for one SPA arm (`trend_columns`): differences paired over seeds."""

    def cell(a, b) -> str:
        return paired_cell(
            [x - y for s in results.get(name, {}) if (x := a(s)) is not None and (y := b(s)) is not None]
        )

    def gold(arm, i=None):
        return lambda s: seed_gold(results, arm, s, i)

    steps = [cell(gold(name, 1), gold("dpo_seed"))]
    steps += [cell(gold(name, i), gold(name, i - 1)) for i in range(2, iterations + 1)]
    overall = [cell(gold(name, iterations), gold(name, 1))] if iterations > 1 else []
    return steps + overall + [cell(gold(name), gold("dpo_all_gold"))]


def sentence(c: dict) -> str:
    unit = {"gold_reward": "gold", "win_rate_vs_init": "win rate vs π_init"}[c["metric"]]
    # ± the standard error of the mean paired difference over seeds
    spread = f" ± {c['std'] / math.sqrt(c['n']):.3f} (SE)" if c["std"] is not None else ""
    text = f"{c['a']} − {c['b']} = {c['mean']:+.3f}{spread} {unit} (paired over {c['n']} seed{'s' * (c['n'] > 1)}"
    if "eval_se" in c:
        text += f"; evaluation-sampling SE ±{c['eval_se']:.3f}"
    text += "): "
    if all(d == 0 for d in c["diffs"]):
        text += f"{c['a']} and {c['b']} score exactly the same on every seed run (no difference to report)."
    elif c["n"] == 1:
        noise = c.get("eval_se")
        within = noise is not None and abs(c["mean"]) <= 2 * noise
        verdict = "is above" if c["mean"] > 0 else "is level with" if c["mean"] == 0 else "does NOT beat"
        text += f"{c['a']} {verdict} {c['b']} on the one seed run"
        text += (
            ", a difference within twice the evaluation's sampling noise" if within else ""
        ) + "; one seed is not evidence either way."
    elif c["mean"] > 0 and c["higher_on"] == c["n"]:
        text += f"{c['a']} beats {c['b']} on every seed ({c['n']}/{c['n']})."
    elif c["mean"] > 0:
        text += f"{c['a']} is ahead on average but higher on only {c['higher_on']}/{c['n']} seeds: not a reliable win."
    else:
        text += f"{c['a']} does NOT beat {c['b']} (higher on {c['higher_on']}/{c['n']} seeds)."
    return text


COMPARISONS = [
    ("spa_dnd", "dpo_seed"),
    ("spa_dnd", "sft"),
    ("spa_dnd", "dpo_all_gold"),
    ("spa_dnd", "dpo_iter_rm"),
    ("dpo_iter_rm", "dpo_seed"),
    ("dpo_seed", "sft"),
    ("dpo_all_gold", "dpo_seed"),
    ("spa_expansion", "dpo_seed"),
    ("spa_refine", "spa_expansion"),
    ("spa_dnd", "spa_refine"),
    ("spa_dnd", "spa_expansion"),
    ("spa_dnd", "spa_dnd_judge_previous"),
    ("spa_dnd", "spa_dnd_judge_none"),
    ("spa_keep_identical", "spa_dnd"),
    ("spa_mean", "spa_dnd"),
    ("spa_nll", "spa_dnd"),
    ("spa_replay", "spa_dnd"),
    ("spa_stable", "spa_dnd"),
    ("spa_mean_replay", "spa_dnd"),
    ("spa_stable_n4", "spa_stable"),
    ("spa_dice", "spa_stable"),
    ("spa_stable_no_reference", "spa_stable"),
    ("spa_cream", "spa_dnd"),
    ("spa_stable_cream", "spa_stable"),
    ("spa_agree", "spa_dnd"),
    ("spa_stable_agree", "spa_stable"),
    ("spa_stable", "dpo_seed"),
    ("spa_stable", "dpo_all_gold"),
    ("dpo_all_gold_1ep", "dpo_all_gold"),
    ("gold_judge", "dpo_all_gold_1ep"),
    ("spa_stable_agree", "dpo_all_gold_2ep"),
    ("spa_dnd", "dpo_all_gold_1ep"),
    ("spa_dnd", "gold_judge_dnd"),
    ("spa_stable", "gold_judge_stable"),
    ("spa_stable_agree", "gold_judge_stable"),
    ("gold_judge_3ep", "dpo_all_gold"),
    ("spa_dnd_3ep", "spa_dnd"),
    ("spa_stable_agree_3ep", "spa_stable_agree"),
    ("spa_stable_agree_3ep", "dpo_all_gold"),
    ("spa_stable_agree_2ep", "spa_stable_agree"),
]


def ordering_check(results: dict, names: list[str], claim: str) -> str | None:
    """Whether the means follow the paper's order (best first)."""
    means = {}
    for n in names:
        m, _, _ = mean_std([r["final"]["gold_reward"] for r in results.get(n, {}).values() if r.get("status") == "ok"])
        if m is None:
            return None
        means[n] = m
    holds = all(means[x] > means[y] for x, y in itertools.pairwise(names))
    ranked = " > ".join(f"{n} {means[n]:.3f}" for n in sorted(means, key=means.get, reverse=True))
    return f"Paper's order {claim}: {'holds' if holds else 'does NOT hold'} here by mean gold ({ranked})."


# --------------------------------------------------------------------------- report


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def cell_final(runs: dict, key: str, digits: int = 3) -> str:
    return fmt_ms([r["final"][key] for r in runs.values() if r.get("status") == "ok"], digits)


def iteration_values(runs: dict, key: str) -> list[float]:
    """Per seed: the mean over iterations of a label-quality number (None where not measurable)."""
    out = []
    for r in runs.values():
        if r.get("status") != "ok" or not r["iterations"]:
            continue
        values = [it[key] for it in r["iterations"] if it.get(key) is not None]
        out.append(statistics.fmean(values) if values else None)
    return out


def status_note(runs: dict) -> str:
    bad = [f"seed {s}: {r.get('reason') or r.get('error')}" for s, r in sorted(runs.items()) if r.get("status") != "ok"]
    return "; ".join(bad)


def markdown(report: dict, arms: dict[str, Arm]) -> str:
    results, info = report["results"], report
    seeds_run = info["seeds"]
    iterations = len(info["scale"]["iteration_prompts"])
    lines = [
        f"# SPA on {info.get('task_name', 'listops')}: the paper's tables in miniature",
        "",
        "Generated by `bench/repro.py`"
        + (" — a **--quick logic check**, not a measurement." if info["quick"] else "."),
        "",
        f"- command: `{info['command']}`",
        f"- machine: {info['machine']['platform']}, {info['machine']['processor']}, "
        f"{info['machine']['cpus_usable']} usable of {info['machine']['cpu_count']} CPUs, "
        f"torch {info['machine']['torch']} ({info['machine']['torch_threads']} threads), "
        f"Python {info['machine']['python']}, load average at start {info['machine']['load_average_at_start']}",
        f"- scale: `{info['scale_name']}` {json.dumps(info['scale'])}",
        f"- seeds: {seeds_run}; started {info['started']}; total wall time {info['wall_seconds'] / 60:.1f} min",
        "",
        "## What is measured",
        "",
        "Each arm starts from the same π_init (a tiny Llama made by SFT on the task's noisy demonstrations, "
        "one per seed) and uses the same prompt budget and training settings "
        f"(seed {info['own_seed_prompts']} prompts = {pct(info['scale']['seed_fraction'])}% of a pool of "
        f"{info['scale']['pool']}, iterations of {info['scale']['iteration_prompts']} prompts, "
        f"{info['scale']['seed_epochs']} seed epochs, 1 epoch per iteration, batch {info['scale']['batch_size']}, "
        f"lr {info['scale']['lr']}). The final model answers {info['scale']['eval_prompts']} held-out prompts "
        "(one sample each, temperature 0.7); **gold** is the mean hidden gold reward (1.0 = a fully "
        "correct answer, partial credit below), **win** the gold win rate against π_init on the same prompts (ties ½). "
        "Label accuracy is the fraction of SPA's self-made pairs (gold ties excluded) whose chosen response "
        "has the higher gold; flag precision the fraction of pairs SPA flagged as noisy that were truly "
        "mislabelled, next to the base rate of wrong labels. Cells are mean ± sample std over seeds "
        "(n=1: no spread). Steps = optimizer steps over all stages; pairs = pairs trained on over all stages.",
        "",
        "## Main table",
        "",
        "| arm | gold-labelled prompts | gold | win vs π_init | label acc | flagged | flag precision | wrong-label rate | steps | pairs | wall s per seed | |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(name: str) -> str:
        runs = results.get(name, {})
        ok = {s: r for s, r in runs.items() if r.get("status") == "ok"}
        any_run = next(iter(runs.values()), {})
        gold_prompts = any_run.get("gold_prompts")
        budget = any_run.get("prompt_budget")
        pool = info["scale"]["pool"]
        gold_cell = (
            "–"
            if gold_prompts is None
            else f"{gold_prompts} ({pct(gold_prompts / pool)}% of pool, {100 * gold_prompts / budget:.0f}% of prompts used)"
        )
        return (
            "| "
            + " | ".join(
                [
                    name,
                    gold_cell,
                    cell_final(ok, "gold_reward"),
                    cell_final(ok, "win_rate_vs_init"),
                    fmt_ms(iteration_values(ok, "label_accuracy")),
                    fmt_ms(iteration_values(ok, "flagged_fraction")),
                    fmt_ms(iteration_values(ok, "flag_precision")),
                    fmt_ms(iteration_values(ok, "wrong_label_rate")),
                    fmt_ms([r["optimizer_steps"] for r in ok.values()], 0),
                    fmt_ms([r["train_pairs"] for r in ok.values()], 0),
                    fmt_ms([r["seconds"]["total"] for r in runs.values() if r.get("status") == "ok"], 0),
                    status_note(runs),
                ]
            )
            + " |"
        )

    main_arms = ("sft", "dpo_seed", "dpo_all_gold", "dpo_iter_rm", "spa_expansion", "spa_refine", "spa_dnd")
    main = [n for n in main_arms if n in results] + [n for n in results if arms[n].group == "stable"]
    lines += [row(n) for n in main]
    lines += [
        "",
        "Label acc / flagged / flag precision / wrong-label rate: mean over the SPA iterations of each seed, then "
        "mean ± std over seeds; flags exist only with spa.refine=true (a flag needs τ, i.e. a full window of margins).",
        "",
    ]
    spa_names = [n for n in results if arms[n].kind == "spa"]
    if spa_names:
        lines += [
            "## Self-made labels per iteration",
            "",
            "| arm | iteration | gold of π_i | pairs | decided by gold | label acc | flagged | flag precision | "
            "wrong-label rate |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name in spa_names:
            ok = [r for r in results[name].values() if r.get("status") == "ok"]
            count = max((len(r["iterations"]) for r in ok), default=0)
            for i in range(count):
                its = [r["iterations"][i] for r in ok if len(r["iterations"]) > i]
                lines.append(
                    f"| {name} | {i + 1} | {fmt_ms([it['gold_reward'] for it in its])} | "
                    f"{fmt_ms([it['pairs'] for it in its], 0)} | "
                    f"{fmt_ms([it['pairs'] - it['tied_pairs'] for it in its], 0)} | "
                    + " | ".join(
                        fmt_ms([it.get(k) for it in its])
                        for k in ("label_accuracy", "flagged_fraction", "flag_precision", "wrong_label_rate")
                    )
                    + " |"
                )
        lines.append("")

    trend_arms = [n for n in ("spa_dnd", *[a for a in results if arms[a].group == "stable"]) if n in results]
    if trend_arms:
        lines += [
            "## Does gold rise every iteration?",
            "",
            "Per-seed paired differences of held-out gold, mean ± standard error over seeds (seeds higher / seeds).",
            "",
            "| arm | " + " | ".join(trend_columns(iterations)) + " |",
            "|---|" + "---|" * len(trend_columns(iterations)),
        ]
        lines += [f"| {name} | " + " | ".join(iteration_trend(results, name, iterations)) + " |" for name in trend_arms]
        lines.append("")

    sweep = report["sweep"]
    if sweep:
        lines += [
            "## Seed-fraction sweep",
            "",
            "| seed fraction | seed prompts | gold pairs (per seed) | dpo_seed gold | spa_dnd gold | spa_dnd − dpo_seed gold | notes |",
            "|---|---|---|---|---|---|---|",
        ]
        for entry in sweep:
            d_runs, s_runs = results.get(entry["dpo"], {}), results.get(entry["spa"], {})
            pairs = sorted({r["gold_pairs"] for r in [*d_runs.values(), *s_runs.values()]})
            c = compare(results, entry["spa"], entry["dpo"])
            diff = "–"
            if c:
                diff = f"{c['mean']:+.3f}" + (f" ± {c['std']:.3f}" if c["std"] is not None else " (n=1)")
            notes = "; ".join(dict.fromkeys(x for x in (status_note(d_runs), status_note(s_runs)) if x))
            lines.append(
                f"| {entry['fraction_pct']}% | {entry['seed_prompts']} | {', '.join(map(str, pairs)) or '–'} | "
                f"{cell_final({s: r for s, r in d_runs.items() if r.get('status') == 'ok'}, 'gold_reward')} | "
                f"{cell_final({s: r for s, r in s_runs.items() if r.get('status') == 'ok'}, 'gold_reward')} | "
                f"{diff} | {notes} |"
            )
        lines += [
            "",
            f"A seed with fewer than {MIN_SEED_PAIRS} gold pairs (two π_init samples per prompt, gold ties "
            "dropped) is not run; such rows say so.",
            "",
        ]

    judge = [n for n in ("spa_dnd", "spa_dnd_judge_previous", "spa_dnd_judge_none") if n in results]
    if len(judge) > 1 or (judge and judge[0] != "spa_dnd"):
        lines += [
            "## Judge-reference ablation (spa_dnd)",
            "",
            "| judge reference | arm | gold | win vs π_init | label acc |",
            "|---|---|---|---|---|",
        ]
        for name in judge:
            ok = {s: r for s, r in results[name].items() if r.get("status") == "ok"}
            reference = arms[name].judge_reference
            lines.append(
                f"| {reference} | {name} | {cell_final(ok, 'gold_reward')} | {cell_final(ok, 'win_rate_vs_init')} | "
                f"{fmt_ms(iteration_values(ok, 'label_accuracy'))} |"
            )
        lines += ["", "(`previous`: π_{i-1} judged against the iterate before it, π_{i-2}; π_init at iteration 1.)", ""]

    lines += ["## What the numbers say (generated from the numbers)", ""]
    if report["comparisons"]:
        lines += [f"- {sentence(c)}" for c in report["comparisons"]]
    else:
        lines.append("- No pair of finished arms to compare.")
    lines += [f"- {t}" for t in report["orderings"]]
    if info["quick"]:
        lines.append("- --quick scale (tiny π_init, 32 evaluation prompts): a logic check of the script, not a result.")
    if len(seeds_run) < 2:
        lines.append("- With one seed nothing here has a spread across seeds.")
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]

    lines += [
        "",
        "## Wall time",
        "",
        "| seed | arm | pipeline s | eval s | total s | cached |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        for s, r in sorted(runs.items()):
            t = r.get("seconds", {})
            lines.append(
                f"| {s} | {name} | {t.get('pipeline', 0):.0f} | {t.get('eval', 0):.0f} | {t.get('total', 0):.0f} | "
                f"{'yes (time of the run that made it)' if r.get('cached') else 'no'} |"
            )
    for s, t in sorted(report["seed_seconds"].items()):
        sft_s = "–" if t["pi_init_sft"] is None else f"{t['pi_init_sft']:.0f}"
        lines.append(
            f"| {s} | data: π_init SFT {sft_s} s when built; this invocation's data step (SFT if not cached, "
            f"gold seeds) | {t['data_this_invocation']:.0f} | | | |"
        )
    arm_total = sum(r.get("seconds", {}).get("total", 0) for runs in results.values() for r in runs.values())
    lines += [
        "",
        f"Sum of the per-arm times above (cached ones included): {arm_total / 60:.1f} min; "
        f"wall time of this invocation: {info['wall_seconds'] / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def estimate(selected: list[str], arms: dict[str, Arm], seeds: list[int], scale_name: str, out: Path) -> str:
    per = MINUTES[scale_name]
    todo = [(s, n) for s in seeds for n in selected if not (out / f"seed{s}" / n / "arm.json").exists()]
    done = len(seeds) * len(selected) - len(todo)  # an arm.json may be stale (another config): a hint only
    pi = sum(not (out / f"seed{s}" / "pi_init" / "sft.json").exists() for s in seeds) * per["pi_init"]
    minutes = pi + sum(per[arms[n].kind] for _, n in todo)
    return (
        f"repro: {len(selected)} arms × {len(seeds)} seed(s) at the {scale_name} scale; rough estimate "
        f"{minutes:.1f} min on a shared 2-core CPU with --threads 1 (~{per['spa']} min per SPA arm, ~{per['dpo']} "
        f"per DPO arm, ~{per['pi_init']} per seed for π_init and the gold seeds; 10-50x more with 2 busy threads){f'; {done} arm-runs already finished will be skipped' if done else ''}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="demo's QUICK scale, 1 seed: a logic check")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    parser.add_argument(
        "--first-seed", type=int, default=0,
        help="seeds first-seed, first-seed + 1, ...: fresh seeds confirm what earlier ones suggested",
    )  # fmt: skip
    parser.add_argument("--arms", default="all", help="comma-separated arm names or groups main, sweep, judge, all")
    parser.add_argument("--out", default="bench/results/repro", help="output folder (a subfolder per scale)")
    parser.add_argument("--docs", default=None, help="also write the report here (docs/RESULTS.md holds one per task)")
    parser.add_argument(
        "--task",
        default="listops",
        help="task: a short name (ends, listops, maxof, next, upper) or module:object (default listops)",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="SPA iterations, each with the scale's per-iteration prompt count (default: the scale's own, 2)",
    )
    parser.add_argument(
        "--iteration-prompts",
        type=int,
        default=None,
        help="prompts per SPA iteration (default: the scale's); smaller ones over the same prompts re-judge more "
        "often, DND's λ following the prompts' position",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: with two OpenMP threads on a busy 2-core machine the tiny model's "
        "matmuls ran ~50x slower)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, args.threads))
    started_wall, started_at = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    scale, scale_name = (QUICK, "quick") if args.quick else (DEFAULT, "default")
    lambda_prompts = scale.iteration_prompts[0]  # the scale's own iteration size
    if args.iteration_prompts is not None and args.iteration_prompts < 1:
        raise SystemExit("repro: --iteration-prompts must be >= 1")
    if args.iterations is not None or args.iteration_prompts is not None:
        size = args.iteration_prompts or scale.iteration_prompts[0]
        count = args.iterations or len(scale.iteration_prompts)
        # Every seed fraction's pairs come from the pool's head, the iterations' prompts from its tail.
        room = (scale.pool - seed_count(max(SWEEP_FRACTIONS), scale)) // size
        if not 1 <= count <= room:
            raise SystemExit(
                f"repro: --iterations must be 1 to {room}: a pool of {scale.pool} prompts holds the largest gold "
                f"seed and {room} iterations of {size}"
            )
        scale = replace(scale, iteration_prompts=(size,) * count)
    task = load_task(args.task)
    count = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    seeds = list(range(args.first_seed, args.first_seed + count))
    if not seeds:
        raise SystemExit("repro: --seeds must be >= 1")
    arms, aliases = build_arms(scale)
    selected = select_arms(args.arms, arms, aliases)
    # π_init, pools and gold seeds are cached by file name, so one folder per scale value and per task:
    # its settings and its class's code (a task redesigned under the same name gets new folders;
    # ListOps keeps the folder it always had).
    short = args.task.strip().lower()
    try:
        source = inspect.getsource(type(task))
    except (OSError, TypeError):  # a class without a source file: its settings alone
        source = ""
    identity = fingerprint(repr(task), source)[:6]
    prefix = "" if short == "listops" else f"{task.name}-{identity}-"
    out = Path(args.out) / f"{prefix}{scale_name}-{fingerprint(asdict(scale))[:8]}"
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "repro.log").open("a", encoding="utf-8")

    def logger(prefix: str):
        def log(*parts):
            text = f"[{prefix}] " + " ".join(str(p) for p in parts)
            print(text, flush=True)
            log_file.write(f"{time.strftime('%H:%M:%S')} {text}\n")
            log_file.flush()

        return log

    main_log = logger("repro")
    main_log(estimate(selected, arms, seeds, scale_name, out))
    main_log(f"arms: {', '.join(selected)}; results in {out}")
    own = seed_count(scale.seed_fraction, scale)

    def sweep_entries_of(names: list[str]) -> list[dict]:
        """Sweep rows, when a sweep arm is among `names` (the row at the scale's own fraction is a main arm)."""
        if not any(arms[n].group == "sweep" for n in names):
            return []
        entries = []
        for fraction in SWEEP_FRACTIONS:
            spa_name = aliases.get(f"spa_dnd_seed{pct(fraction)}pct", f"spa_dnd_seed{pct(fraction)}pct")
            dpo_name = aliases.get(f"dpo_seed_seed{pct(fraction)}pct", f"dpo_seed_seed{pct(fraction)}pct")
            if spa_name in names or dpo_name in names:
                entries.append(
                    {"fraction": fraction, "fraction_pct": pct(fraction), "seed_prompts": seed_count(fraction, scale),
                     "spa": spa_name, "dpo": dpo_name}
                )  # fmt: skip
        return entries

    for entry in sweep_entries_of(selected):
        main_log(
            f"seed fraction {entry['fraction_pct']}% of {scale.pool} = {entry['seed_prompts']} prompts "
            "(two π_init samples each)"
        )
    counts = sorted(
        {own}
        | {seed_count(arms[n].seed_fraction, scale) for n in selected if arms[n].seed_fraction is not None}
        | {seed_count(f, scale) for f in SWEEP_FRACTIONS}  # the same nested seeds whatever is selected
    )

    results: dict[str, dict[int, dict]] = {n: {} for n in selected}
    seed_seconds: dict[int, dict] = {}
    notes: list[str] = []
    failed = 0
    for seed in seeds:
        t0 = time.perf_counter()
        sd = prepare_seed(task, scale, seed, out / f"seed{seed}", counts, logger(f"seed{seed} data"))
        sd = replace(sd, lambda_prompts=lambda_prompts)
        seed_seconds[seed] = {"data_this_invocation": time.perf_counter() - t0, "pi_init_sft": sd.pi_init_seconds}
        notes += [f"seed {seed}: {n}" for n in sd.notes]
        for name in selected:
            log = logger(f"seed{seed} {name}")
            try:
                results[name][seed] = run_arm(task, arms[name], scale, sd, out / f"seed{seed}" / name, log)
            except Exception as error:  # one broken arm must not lose the others' numbers
                failed += 1
                log(f"FAILED: {error!r}\n{traceback.format_exc()}")
                results[name][seed] = {"status": "error", "error": repr(error), "seconds": {"total": 0}}
        for name in arms:  # arms finished by earlier invocations join the report
            if name not in selected:
                cached = run_arm(task, arms[name], scale, sd, out / f"seed{seed}" / name, None, cached_only=True)
                if cached is not None:
                    results.setdefault(name, {})[seed] = cached

    reported = [n for n in arms if n in results]
    results = {n: results[n] for n in reported}
    extra = [n for n in reported if n not in selected]
    if extra:
        main_log(f"also in the report, finished earlier: {', '.join(extra)}")
    sweep_entries = sweep_entries_of(reported)

    comparisons = []
    pairs = list(COMPARISONS) + [(e["spa"], e["dpo"]) for e in sweep_entries if e["spa"] != "spa_dnd"]
    for a, b in pairs:
        for metric in ("gold_reward", "win_rate_vs_init"):
            c = compare(results, a, b, metric)
            if c:
                comparisons.append(c)
    orderings = [
        t
        for t in (
            ordering_check(
                results, ["spa_dnd", "dpo_all_gold", "dpo_seed", "sft"], "SPA > DPO on 100% gold > DPO on seed > SFT"
            ),
            ordering_check(
                results,
                ["spa_dnd", "dpo_iter_rm", "dpo_seed"],
                "SPA > iterative DPO with a reward-model judge > DPO on seed",
            ),
            ordering_check(
                results,
                ["spa_dnd", "spa_refine", "spa_expansion", "dpo_seed"],
                "+DND > +refinement > expansion only > DPO on seed",
            ),
            ordering_check(
                results,
                ["spa_dnd", "spa_dnd_judge_previous", "spa_dnd_judge_none"],
                "judge reference init > previous > none",
            ),
        )
        if t
    ]
    report = {
        "quick": args.quick,
        "task": args.task,
        "task_name": task.name,
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "machine": machine(),
        "scale_name": scale_name,
        "scale": asdict(scale),
        "own_seed_prompts": own,
        "seeds": seeds,
        "arms": {n: asdict(arms[n]) for n in reported},
        "arms_run_now": selected,
        "not_implemented": {},
        "started": started_at,
        "results": results,
        "sweep": sweep_entries,
        "comparisons": comparisons,
        "orderings": orderings,
        "notes": notes,
        "seed_seconds": seed_seconds,
    }
    report["wall_seconds"] = time.perf_counter() - started_wall
    write_json_atomic(out / "repro.json", report)
    text = markdown(report, arms)
    (out / "repro.md").write_text(text)
    docs = args.docs
    if docs:
        Path(docs).parent.mkdir(parents=True, exist_ok=True)
        Path(docs).write_text(text)
    print("\n" + text)
    main_log(f"report: {out / 'repro.md'}, numbers: {out / 'repro.json'}" + (f", docs: {docs}" if docs else ""))
    log_file.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
