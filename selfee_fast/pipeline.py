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

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import roles
from .config import LAYOUT_SETTINGS, PAPER_LR, ConfigError, RunConfig, SPAConfig, effective_lr, lr_note, save_config
from .data import DataReport, load_preferences, load_prompts, padding_id, tokenize_pairs, with_system_prompt
from .files import write_json_atomic
from .generate import GenerationSettings, generate_responses, generate_stage_vllm
from .judge import judge_generations
from .preflight import preflight
from .records import JudgedPair, read_pairs
from .reward_model import RewardModel, fit_to_seed
from .runtime import Runtime
from .train import TrainPair, TrainSettings, last_metrics, train_stage

STEPS = ("generate", "judge", "train")
FORCE_REMEDY = "rerun with --force to redo it and every stage after it, or use a new run_dir"


@dataclass(frozen=True)
class Stage:
    name: str  # "stage0" or "iter<i>"
    iteration: int  # 0 for stage 0
    index: int  # position in the run's stage list


def stage_list(config: RunConfig) -> list[Stage]:
    names = (["stage0"] if config.data.seed_pairs else []) + [f"iter{i}" for i in range(1, config.spa.iterations + 1)]
    return [Stage(name, 0 if name == "stage0" else int(name[4:]), index) for index, name in enumerate(names)]


def parse_stage(config: RunConfig, name: str) -> Stage:
    """The stage of this config called `name` (stage0, iter1, ...); the one place stage names are read."""
    for stage in stage_list(config):
        if stage.name == name:
            return stage
    raise ConfigError(f"unknown stage {name!r}; this config has {', '.join(s.name for s in stage_list(config))}")


# --------------------------------------------------------------------------- fingerprints


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_settings(section) -> dict:
    """A config section's values that differ from their defaults.

    Fingerprints hash these, not the whole section: a setting added in a later version
    (at its default) leaves every fingerprint as it was, so upgrading does not orphan runs.
    """
    defaults = asdict(type(section)())
    return {k: v for k, v in asdict(section).items() if v != defaults[k]}


def without(settings: dict, *names: str) -> dict:
    return {k: v for k, v in settings.items() if k not in names}


def iteration_lambda(extrapolate: list[float], i: int) -> float | None:
    """DND's lambda for iteration i (1-based); None past the list's end: no DND."""
    return extrapolate[i - 1] if i <= len(extrapolate) else None


def stage_inputs(config: RunConfig) -> dict[str, dict]:
    """What each stage's result depends on beyond its predecessor's, by setting name ("base": every stage's).

    A stage takes only what it uses, so a finished run can be extended (spa.iterations=4
    with a fourth pool and lambda) and its layout settings changed without --force.
    """
    changed = {s: without(changed_settings(getattr(config, s)), *LAYOUT_SETTINGS.get(s, ())) for s in
               ("model", "train", "generation", "spa")}  # fmt: skip
    # The learning rate counts by its value; every earlier release defaulted to the paper's 5e-7.
    changed["train"] = without(changed["train"], "lr")
    if effective_lr(config) != PAPER_LR:
        changed["train"]["lr"] = effective_lr(config)
    spa = without(changed["spa"], "iterations", "extrapolate")
    if config.spa.judge != "reward_model":
        spa = without(spa, "reward_model_epochs", "reward_model_lr")
    d = config.data
    inputs = {"base": {"model": changed["model"], "seed": config.seed, "data.max_length": d.max_length,
                       "data.max_prompt_length": d.max_prompt_length}}  # fmt: skip
    if d.system_prompt is not None:
        inputs["base"]["data.system_prompt"] = d.system_prompt
    if d.seed_pairs:
        inputs["stage0"] = {"data.seed_pairs": d.seed_pairs, "train": without(changed["train"], "iteration_epochs")}
    for i in range(1, config.spa.iterations + 1):
        stage_spa = dict(spa)
        lam = iteration_lambda(config.spa.extrapolate, i)
        if lam != iteration_lambda(SPAConfig().extrapolate, i):
            stage_spa["lambda"] = lam
        inputs[f"iter{i}"] = {
            f"data.prompt_pools[{i - 1}]": d.prompt_pools[i - 1] if i <= len(d.prompt_pools) else None,
            "generation": changed["generation"], "train": without(changed["train"], "seed_epochs"),
            "spa": stage_spa, "iteration": i,
        }  # fmt: skip
    return inputs


def stage_fingerprints(config: RunConfig) -> dict[str, str]:
    """Per stage, a hash of its inputs chained with its predecessor's print."""
    inputs = stage_inputs(config)
    previous = fingerprint(*inputs.pop("base").values())
    prints = {}
    for stage, parts in inputs.items():
        previous = prints[stage] = fingerprint(previous, *parts.values())
    return prints


def flat(settings: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def stage_record(config: RunConfig, stage: Stage) -> dict:
    """What started.json holds: the fingerprint and the inputs of the stage and those before it, by name."""
    inputs = stage_inputs(config)
    names = ["base", *list(inputs)[1 : list(inputs).index(stage.name) + 1]]
    return {"fingerprint": stage_fingerprints(config)[stage.name], "inputs": {n: flat(inputs[n]) for n in names}}


def settings_changed(recorded: dict, current: dict) -> str:
    """The settings that differ between two stage records, in words (a setting at its default is absent)."""
    if "inputs" not in recorded:
        return (
            "this folder's record holds only a fingerprint, so which settings changed is not known (a LoRA run "
            "begun with the earlier default learning rate continues with train.lr=5e-7)"
        )
    changes = []
    for part in recorded["inputs"].keys() | current["inputs"].keys():
        old, new = recorded["inputs"].get(part, {}), current["inputs"].get(part, {})
        for key in sorted(old.keys() | new.keys()):
            if old.get(key, "default") != new.get(key, "default"):
                where = "" if part == "base" else f" ({part})"
                changes.append(f"{key}{where}: {old.get(key, 'default')!r} -> {new.get(key, 'default')!r}")
    return "; ".join(sorted(set(changes))) or "the stage list changed"


def check_unchanged(config: RunConfig, stage: Stage, remedy: str) -> None:
    """Refuse to continue a stage that was started with another configuration, naming what changed."""
    started_path = Path(config.run_dir) / stage.name / "started.json"
    recorded, current = read_json(started_path), stage_record(config, stage)
    if recorded and recorded["fingerprint"] != current["fingerprint"]:
        changed = settings_changed(recorded, current)
        raise ConfigError(f"{stage.name} was started with another configuration ({started_path}): {changed}; {remedy}")


def claim_stage(config: RunConfig, stage: Stage, remedy: str) -> None:
    """Hold a stage to the configuration it started with: refuse another, else record this one as work begins."""
    check_unchanged(config, stage, remedy)
    stage_dir = Path(config.run_dir) / stage.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    # Saved as a stage starts, not before: a refused command leaves the run's config as it was.
    save_config(config, Path(config.run_dir) / "config.yaml")
    write_json_atomic(stage_dir / "started.json", stage_record(config, stage))


# --------------------------------------------------------------------------- the loop


def run_pipeline(config: RunConfig, *, force: bool = False, log=print) -> dict:
    runtime = preflight(config)
    if lr_note(config):
        log(lr_note(config))
    prints = stage_fingerprints(config)
    finished = {}
    for stage in stage_list(config):  # every refusal before any work
        done = read_json(Path(config.run_dir) / stage.name / "done.json")
        if done and done["fingerprint"] == prints[stage.name] and len(finished) == stage.index:
            finished[stage.name] = done
        elif not force:
            check_unchanged(config, stage, FORCE_REMEDY)
    summary, redo_rest = {"stages": {}}, False
    for stage in stage_list(config):
        stage_dir = Path(config.run_dir) / stage.name
        if stage.name in finished:
            log(f"{stage.name}: finished earlier, skipped")
            summary["stages"][stage.name] = finished[stage.name]
            continue
        started = read_json(stage_dir / "started.json")
        if redo_rest or (started and started["fingerprint"] != prints[stage.name]):
            shutil.rmtree(stage_dir, ignore_errors=True)  # force: redo it and every stage after it
            redo_rest = True
        done = {"fingerprint": prints[stage.name], **run_stage(config, runtime, stage, log=log)}
        write_json_atomic(stage_dir / "done.json", done)
        summary["stages"][stage.name] = done
    write_json_atomic(Path(config.run_dir) / "summary.json", summary)
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
    return {
        "pairs": len(pairs),
        "data": report.summary(),
        "last_metrics": last_metrics(stage_dir / "train" / "metrics.jsonl"),
    }


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
        judged = read_pairs(pairs_path)
        log(f"{stage.name}: {len(judged)} judged pairs found, judgment skipped")
        return judged
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
    # The same autocast as training: the judge's log pi_{i-1} is reused as the training reference.
    judged = judge_generations(
        model, tokenizer, generations, pairs_path, beta=config.train.beta, judge_reference=reference,
        base_model=base_model, autocast_dtype=runtime.autocast_dtype, packing=config.model.packing,
        reward=config.spa.judge_reward, log=log,
    )  # fmt: skip
    roles.drop_reference_adapter(model)  # pi_{i-2}, loaded for the judge only
    return judged


def train_iteration(config: RunConfig, runtime: Runtime, stage: Stage, model, tokenizer, judged, report, log):
    """Train pi_i from pi_{i-1} on the judged pairs with self-refinement; return (lambda used, pairs trained on)."""
    i, spa = stage.iteration, config.spa
    lam = (iteration_lambda(spa.extrapolate, i) if spa.refine else None) or None
    if spa.refine and spa.extrapolate and i > len(spa.extrapolate):
        log(f"{stage.name}: spa.extrapolate lists {len(spa.extrapolate)} lambdas; iteration {i} runs without DND")
    kept = [p for p in judged if spa.keep_identical_pairs or p.chosen_ids != p.rejected_ids]
    if len(kept) < len(judged):
        report.skipped["pairs of two identical responses"] += len(judged) - len(kept)
    pairs = [
        TrainPair(p.location, p.prompt_ids, p.chosen_ids, p.rejected_ids, p.chosen_logp_policy, p.rejected_logp_policy)
        for p in kept
    ]
    if spa.seed_replay and config.data.seed_pairs:
        seed, _ = seed_train_pairs(config, tokenizer)
        count = round(spa.seed_replay * len(pairs))
        pairs += [seed[(i * count + k) % len(seed)] for k in range(count)]  # each iteration the next ones
        log(f"{stage.name}: {count} seed pairs replayed beside {len(kept)} self-labelled ones")
    if not pairs:
        log(f"{stage.name}: no pair with two different responses to train on; pi_{i} is pi_{i - 1}")
        return lam, 0
    settings = TrainSettings.for_stage(config, epochs=config.train.iteration_epochs, refine=spa.refine,
                                       extrapolate=lam, autocast_dtype=runtime.autocast_name)  # fmt: skip
    # Without DND the judge's log pi_{i-1} values are the reference: no reference forward at all.
    # DND needs pi_{i-1}'s per-token logits; so does a judge that kept no log-probs (a reward model).
    needs_forward = lam is not None or any(p.ref_chosen is None for p in pairs)
    reference, reference_model = roles.training_reference(model, runtime, needs_forward)
    train_stage(model, pairs, settings, Path(config.run_dir) / stage.name / "train", pad_id=padding_id(tokenizer),
                reference=reference, reference_model=reference_model, log=log)  # fmt: skip
    roles.drop_reference_adapter(model)
    return lam, len(pairs)


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None
