"""The SPA loop end to end: stage 0 (seed DPO), then per iteration generate -> judge -> train.

Everything lands in one run folder:

    run_dir/config.yaml            the effective configuration
    run_dir/stage0/model/          pi_0 (peft adapter, loads with plain peft)
    run_dir/stage0/train/          checkpoints and metrics.jsonl
    run_dir/iter1/generations.jsonl
    run_dir/iter1/pairs.jsonl      TRL-format prompt/chosen/rejected + scores and token ids
    run_dir/iter1/train/, iter1/model/
    run_dir/summary.json

Running the same command again resumes: finished stages (a `done.json` whose fingerprint
matches the config) are skipped, a partial generation continues from its last complete
batch, a written pairs file is reused, training continues from its latest checkpoint.
A stage started with another configuration is refused, naming the settings that changed,
unless `force=True`, which redoes it and every stage after it. `run_stage` is the one body
of a stage, used by `run` and by the single-step commands (generate / judge / train).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import torch

from . import roles
from .config import ConfigError, RunConfig, lr_note, save_config
from .data import DataError, DataReport, load_preferences, load_prompts, padding_id, tokenize_pairs, with_system_prompt
from .distributed import barrier, world
from .files import folder_problem, refuse_if_busy, run_folder_lock, write_json_atomic
from .generate import GenerationSettings, generate_responses, generate_stage_vllm
from .judge import judge_generations
from .preflight import preflight
from .records import JudgedPair, read_pairs
from .reward_model import RewardModel, fit_to_seed
from .runtime import Runtime
from .stages import (
    FORCE_REMEDY,
    Stage,
    as_begun,
    check_unchanged,
    claim_stage,
    iteration_lambda,
    read_stage_record,
    stage_fingerprints,
    stage_list,
)
from .stopping import stop_requests
from .train import TrainPair, TrainSettings, iteration_pairs, last_metrics, train_stage, without_identical


def run_pipeline(config: RunConfig, *, force: bool = False, log=print) -> dict:
    """The whole run; under torchrun every process calls it, rank 0 holds the folder and speaks."""
    ranks = world()
    if not ranks.is_main:
        log = quiet
    else:
        refuse_if_busy(config.run_dir)  # at once: the preflight reads every data file
    runtime = preflight(config)
    with main_holds_folder(config.run_dir, "selfee-fast run"), stop_requests():
        return run_stages(config, runtime, force=force, log=log)


def quiet(*_) -> None:
    """The log of ranks other than 0: they do the same work, rank 0 reports it."""


@contextlib.contextmanager
def main_holds_folder(run_dir: str, command: str):
    """Rank 0 takes the run folder's lock; the others start once it holds it (one process: the lock)."""
    if world().is_main:
        with run_folder_lock(run_dir, command):
            barrier()
            yield
    else:
        barrier()
        yield


def run_stages(config: RunConfig, runtime: Runtime, *, force: bool, log) -> dict:
    """Every stage in order, as `run_pipeline` does it once the run folder is held."""
    config = as_begun(config, log)
    note = lr_note(config)
    if note:
        log(note)
    prints = stage_fingerprints(config)
    finished = {}
    for stage in stage_list(config):  # every refusal before any work
        done = read_stage_record(Path(config.run_dir) / stage.name / "done.json")
        if done and done["fingerprint"] == prints[stage.name] and len(finished) == stage.index:
            finished[stage.name] = done
        elif not force:
            check_unchanged(config, stage, FORCE_REMEDY)
    if finished:
        # The newest finished model (the one the next stage starts from, or the run's result) is
        # verified against its manifest; only that one: hashing every stage's weights on each
        # restart would cost minutes at 7B.
        last = list(finished)[-1]
        damaged = folder_problem(Path(config.run_dir) / last / "model")
        if damaged:
            log(f"{last}: its saved model is damaged ({damaged}): the stage saves it again")
            del finished[last]
    summary, redo_rest = {"stages": {}}, False
    for stage in stage_list(config):
        stage_dir = Path(config.run_dir) / stage.name
        if stage.name in finished:
            log(f"{stage.name}: finished earlier, skipped")
            summary["stages"][stage.name] = finished[stage.name]
            continue
        started = read_stage_record(stage_dir / "started.json")
        if redo_rest or (started and started["fingerprint"] != prints[stage.name]):
            barrier()  # every rank has read the record before rank 0 removes it
            if world().is_main:
                shutil.rmtree(stage_dir, ignore_errors=True)  # force: redo it and every stage after it
            barrier()
            redo_rest = True
        done = {"fingerprint": prints[stage.name], **run_stage(config, runtime, stage, log=log)}
        if world().is_main:
            write_json_atomic(stage_dir / "done.json", done)
        summary["stages"][stage.name] = done
    if world().is_main:
        # The configuration the summary describes, even when every stage was finished before.
        save_config(config, Path(config.run_dir) / "config.yaml")
        write_json_atomic(Path(config.run_dir) / "summary.json", summary)
    barrier()
    return summary


def run_stage(
    config: RunConfig, runtime: Runtime, stage: Stage, *, until: str = "train", remedy: str = FORCE_REMEDY, log=print
) -> dict:
    """One stage, as `run` does it, through step `until`; returns what its done.json records."""
    started, stage_dir = time.time(), Path(config.run_dir) / stage.name
    check_unchanged(config, stage, remedy)
    previous = previous_stage_model(config, stage)
    generated = None
    if stage.iteration and config.generation.backend == "vllm":
        # vLLM wants the GPU memory the policy would hold: generate first, free the engine, then load.
        claim_stage(config, stage, remedy)
        generated = generate_vllm(config, runtime, stage, previous, log)
        if until == "generate":
            return {}
    # Each stage starts from a known RNG state (LoRA's initialisation draws from it), so it gives
    # the same result whatever ran before it in this process (vLLM reseeds torch's global RNG).
    torch.manual_seed(config.seed * 1000 + stage.index)
    model, tokenizer = roles.load_policy(config, runtime, previous, log)
    claim_stage(config, stage, remedy)
    if stage.iteration == 0:
        result = train_seed_stage(config, runtime, model, tokenizer, stage_dir, log)
    else:
        result = run_iteration(config, runtime, stage, model, tokenizer, generated, until, log)
    if until == "train":
        roles.save_policy(model, tokenizer, stage_dir / "model")
    return {"seconds": time.time() - started, **result}


def previous_stage_model(config: RunConfig, stage: Stage) -> Path | None:
    """The saved model a stage starts from (None: pi_init itself); checked to exist."""
    if stage.index == 0:
        return None
    before = stage_list(config)[stage.index - 1].name
    path = Path(config.run_dir) / before / "model"
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise ConfigError(f"{stage.name} starts from {path}, which does not exist yet: run {before} first")
    damaged = folder_problem(path)
    if damaged:
        raise ConfigError(
            f"{stage.name} starts from {path}, which is damaged ({damaged}): `selfee-fast run` saves it again"
        )
    return path


# --------------------------------------------------------------------------- stage 0


def seed_train_pairs(config: RunConfig, tokenizer) -> tuple[list[TrainPair], DataReport]:
    records, report = load_preferences(config.data.seed_pairs, skip_invalid=config.data.skip_invalid)
    records = with_system_prompt(records, config.data.system_prompt, tokenizer)
    tokenized, report = tokenize_pairs(
        tokenizer, records, max_length=config.data.max_length, max_prompt_length=config.data.max_prompt_length,
        report=report,
    )  # fmt: skip
    return [TrainPair(p.location, p.prompt, p.chosen, p.rejected) for p in tokenized], report


def train_seed_stage(config: RunConfig, runtime: Runtime, model, tokenizer, stage_dir: Path, log) -> dict:
    pairs, report = seed_train_pairs(config, tokenizer)
    log(f"stage0: seed pairs from {config.data.seed_pairs}: {report.summary()}")
    settings = TrainSettings.for_stage(config, epochs=config.train.seed_epochs, refine=False, extrapolate=None,
                                       autocast_dtype=runtime.autocast_name)  # fmt: skip
    # Full fine-tuning: pi_init is a frozen model of its own; LoRA: the shared model, adapters off.
    reference_model = roles.load_frozen(config, runtime) if runtime.full_finetuning else None
    reference = None if reference_model is not None else "init"
    train_stage(model, pairs, settings, stage_dir / "train", pad_id=padding_id(tokenizer), reference=reference,
                reference_model=reference_model, log=log)  # fmt: skip
    metrics = last_metrics(stage_dir / "train" / "metrics.jsonl")
    return {"pairs": len(pairs), "data": report.summary(), "last_metrics": metrics}


# --------------------------------------------------------------------------- an iteration


def run_iteration(config: RunConfig, runtime: Runtime, stage: Stage, model, tokenizer, generated, until, log) -> dict:
    """Generate (unless `generated` holds vLLM's output already), judge, train: as far as `until`."""
    stage_dir = Path(config.run_dir) / stage.name
    if generated is None:
        prompts, report = iteration_prompts(config, stage, log)
        settings = GenerationSettings.for_iteration(config, stage.iteration)
        generations = generate_responses(model, tokenizer, prompts, settings, stage_dir / "generations.jsonl",
                                         autocast_dtype=runtime.autocast_dtype, log=log)  # fmt: skip
    else:
        generations, report = generated
    report.truncated_prompts += sum(g.prompt_truncated for g in generations)
    if until == "generate":
        return {}
    judged = judge(config, runtime, stage, model, tokenizer, generations, log)
    if until == "judge":
        return {}
    lam, trained = train_iteration(config, runtime, stage, model, tokenizer, judged, report, log)
    return {"prompts": len(generations), "pairs": len(judged), "trained_pairs": trained, "lambda": lam,
            "data": report.summary(),
            "last_metrics": last_metrics(stage_dir / "train" / "metrics.jsonl")}  # fmt: skip


def iteration_prompts(config: RunConfig, stage: Stage, log) -> tuple[list, DataReport]:
    pool = config.data.prompt_pools[stage.iteration - 1]
    prompts, report = load_prompts(pool, skip_invalid=config.data.skip_invalid, report=DataReport())
    log(f"{stage.name}: prompts from {pool}: {report.summary()}")
    return prompts, report


def generate_vllm(config: RunConfig, runtime: Runtime, stage: Stage, previous: Path | None, log):
    prompts, report = iteration_prompts(config, stage, log)
    out_path = Path(config.run_dir) / stage.name / "generations.jsonl"
    return generate_stage_vllm(config, runtime, prompts, stage.iteration, previous, out_path, log), report


def judge(config: RunConfig, runtime: Runtime, stage: Stage, model, tokenizer, generations, log) -> list[JudgedPair]:
    """Label the generations with the implicit reward (or the reward-model baseline); reuse a pairs file written."""
    pairs_path = Path(config.run_dir) / stage.name / "pairs.jsonl"
    if pairs_path.exists():
        problem = pairs_problem(pairs_path, generations)
        if problem is None:
            judged = read_pairs(pairs_path)
            log(f"{stage.name}: {len(judged)} judged pairs found, judgment skipped")
            return judged
        log(f"{stage.name}: {problem}: judging again")
        barrier()  # every rank has read it
        if world().is_main:
            pairs_path.unlink()
    if config.spa.judge == "reward_model":
        reward_model = RewardModel(fit_to_seed(config, tokenizer, log), device=runtime.device)
        return judge_generations(model, tokenizer, generations, pairs_path, reward_model=reward_model, log=log)
    stages = stage_list(config)
    earlier = (
        Path(config.run_dir) / stages[stage.index - 2].name / "model" if stage.index >= 2  # pi_{i-2}
        else Path(config.model.path) if stage.index == 1  # pi_init, the model the run started from
        else Path(config.model.judge_base or config.model.path)  # no-seed iteration 1: the instruct model's base
    )  # fmt: skip
    if config.spa.judge_reference == "previous":
        log(f"{stage.name}: judging against the iterate before pi_{stage.iteration - 1}: {earlier}")
    reference, base_model = roles.judge_reference(config, runtime, model, earlier)
    earlier_judge = None
    if config.spa.judge_consistency != "none":
        # The previous iteration's judge: pi_{i-2} against pi_init, or pi_init alone when it is pi_{i-2};
        # with consistency_judge=stage0, pi_0 from iteration 3 on (in iteration 2 pi_0 is pi_{i-2}).
        checker = earlier
        if config.spa.consistency_judge == "stage0" and stage.index > 2:
            checker = Path(config.run_dir) / stages[0].name / "model"
            log(f"{stage.name}: pi_0 ({checker}) checks the judge's labels (spa.consistency_judge=stage0)")
        own_reference = checker == Path(config.model.judge_base or config.model.path)
        earlier_judge = roles.earlier_judge(config, runtime, model, None if own_reference else checker)
    # The same autocast as training: the judge's log pi_{i-1} is reused as the training reference.
    judged = judge_generations(
        model, tokenizer, generations, pairs_path, beta=config.train.beta, judge_reference=reference,
        base_model=base_model, autocast_dtype=runtime.autocast_dtype, packing=config.model.packing,
        reward=config.spa.judge_reward, earlier=earlier_judge, log=log,
    )  # fmt: skip
    roles.drop_reference_adapter(model)  # pi_{i-2}, loaded for the judge only
    return judged


def judges_agreement(pairs: list[JudgedPair], stage_name: str) -> float:
    """The mean agreement of the two judges over the pairs an iteration trains on (CREAM's consistency rate)."""
    unmeasured = sum(p.agreement is None for p in pairs)
    if unmeasured:
        raise ConfigError(
            f"{stage_name}: {unmeasured} judged pairs have no agreement (judged with spa.judge_consistency=none): "
            f"delete {stage_name}/pairs.jsonl to judge again"
        )
    return sum(p.agreement for p in pairs) / len(pairs)


def consistency_label_smoothing(agreement: float, spa_alpha: float) -> float | None:
    """CREAM's label smoothing, 1 - agreement; None where it would leave no preference.

    A pair SPA flags is smoothed by SPA's alpha on top. At 0.5 in all a label says nothing, and
    past it the label is reversed, which CREAM's loss allows; here such an iteration is not trained on.
    """
    smoothing = 1.0 - agreement
    return smoothing if smoothing + spa_alpha < 0.5 else None


def pairs_problem(pairs_path: Path, generations) -> str | None:
    """Why a written pairs file cannot be the judgment of these generations (None: it can).

    One pair per generation with two or more responses, the same prompts: a file cut short at
    a line boundary, or made from other generations, is rebuilt, never trained on.
    """
    try:
        pairs = read_pairs(pairs_path)
    except DataError as error:
        return str(error)
    expected = {g.index: g for g in generations if len(g.responses) >= 2}
    if sorted(p.index for p in pairs) != sorted(expected):
        return f"{pairs_path} holds {len(pairs)} pairs for {len(expected)} judged prompts"
    for p in pairs:
        g = expected[p.index]
        if p.prompt_ids != g.prompt_ids or p.chosen_ids not in g.responses or p.rejected_ids not in g.responses:
            return f"{pairs_path}: the pair of {p.location} is not made of that prompt's generations"
    return None


def train_iteration(config: RunConfig, runtime: Runtime, stage: Stage, model, tokenizer, judged, report, log):
    """Train pi_i from pi_{i-1} on the judged pairs with self-refinement; return (lambda used, pairs trained on)."""
    i, spa = stage.iteration, config.spa
    lam = (iteration_lambda(spa.extrapolate, i) if spa.refine else None) or None
    if spa.refine and spa.extrapolate and i > len(spa.extrapolate):
        log(f"{stage.name}: spa.extrapolate lists {len(spa.extrapolate)} lambdas; iteration {i} runs without DND")
    self_labelled = without_identical(judged, i, keep=spa.keep_identical_pairs, report=report, log=log)
    agreement = None
    if spa.judge_consistency != "none" and self_labelled:
        agreement = judges_agreement(self_labelled, stage.name)
        log(f"{stage.name}: the previous iteration's judge ranks the responses alike on {agreement:.3f} "
            "(CREAM's consistency rate)")  # fmt: skip
    settings = TrainSettings.for_stage(config, epochs=config.train.iteration_epochs, refine=spa.refine,
                                       extrapolate=lam, autocast_dtype=runtime.autocast_name)  # fmt: skip
    smoothing = 0.0
    if spa.judge_consistency == "smooth" and agreement is not None:
        smoothing = consistency_label_smoothing(agreement, settings.alpha if spa.refine else 0.0)
        if smoothing is None:
            log(f"{stage.name}: smoothing by {1.0 - agreement:.3f} leaves no preference: pi_{i} is pi_{i - 1}")
            return lam, 0
    seed = seed_train_pairs(config, tokenizer)[0] if spa.seed_replay else []
    pairs = iteration_pairs(self_labelled, i, seed=seed, replay=spa.seed_replay,
                            drop_disagreeing=spa.judge_consistency == "filter", label_smoothing=smoothing,
                            report=report, log=log)  # fmt: skip
    if not pairs:
        log(f"{stage.name}: no pair with two different responses to train on; pi_{i} is pi_{i - 1}")
        return lam, 0

    # Without DND the judge's log pi_{i-1} values are the reference: no reference forward at all.
    # DND needs pi_{i-1}'s per-token logits; so does a judge that kept no log-probs (a reward model).
    needs_forward = lam is not None or any(p.ref_chosen is None for p in pairs)
    reference, reference_model = roles.training_reference(model, runtime, needs_forward)
    train_stage(model, pairs, settings, Path(config.run_dir) / stage.name / "train", pad_id=padding_id(tokenizer),
                reference=reference, reference_model=reference_model, log=log)  # fmt: skip
    roles.drop_reference_adapter(model)
    return lam, len(pairs)
