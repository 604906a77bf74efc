"""A run's stages: their names, what each one's result depends on, and what each one started with.

A stage's fingerprint hashes its inputs (the settings it uses, changed from their defaults)
chained with its predecessor's, so a finished run can be extended and its layout settings
changed without redoing anything. `started.json` keeps the fingerprint and the inputs by
name, so that a stage continued with other settings is refused naming each one that changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .config import (
    LAYOUT_SETTINGS,
    PAPER_LR,
    ConfigError,
    RunConfig,
    SPAConfig,
    as_written,
    effective_lr,
    save_config,
)
from .distributed import world
from .files import write_json_atomic

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
    for key in ("path", "judge_base"):
        if key in changed["model"]:
            changed["model"][key] = as_written(config, f"model.{key}")
    d = config.data
    pools = as_written(config, "data.prompt_pools")
    inputs = {"base": {"model": changed["model"], "seed": config.seed, "data.max_length": d.max_length,
                       "data.max_prompt_length": d.max_prompt_length}}  # fmt: skip
    if d.system_prompt is not None:
        inputs["base"]["data.system_prompt"] = d.system_prompt
    if d.seed_pairs:
        inputs["stage0"] = {
            "data.seed_pairs": as_written(config, "data.seed_pairs"),
            "train": without(changed["train"], "iteration_epochs"),
        }
    for i in range(1, config.spa.iterations + 1):
        stage_spa = dict(spa)
        if i < 3:  # up to iteration 2 the two consistency judges are one model, pi_{i-2}
            stage_spa.pop("consistency_judge", None)
        lam = iteration_lambda(config.spa.extrapolate, i)
        if lam != iteration_lambda(SPAConfig().extrapolate, i):
            stage_spa["lambda"] = lam
        inputs[f"iter{i}"] = {
            f"data.prompt_pools[{i - 1}]": pools[i - 1] if i <= len(pools) else None,
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
            "this folder's record, made by an earlier release, holds only a fingerprint, so which settings "
            "changed is not known"
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
    recorded, current = read_stage_record(started_path), stage_record(config, stage)
    if recorded and recorded["fingerprint"] != current["fingerprint"]:
        changed = settings_changed(recorded, current)
        raise ConfigError(f"{stage.name} was started with another configuration ({started_path}): {changed}; {remedy}")


def claim_stage(config: RunConfig, stage: Stage, remedy: str) -> None:
    """Hold a stage to the configuration it started with: refuse another, else record this one as work begins."""
    check_unchanged(config, stage, remedy)
    stage_dir = Path(config.run_dir) / stage.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    if world().is_main:  # under torchrun every rank claims, rank 0 writes
        # Saved as a stage starts, not before: a refused command leaves the run's config as it was.
        save_config(config, Path(config.run_dir) / "config.yaml")
        write_json_atomic(stage_dir / "started.json", stage_record(config, stage))


def read_stage_record(path: Path) -> dict | None:
    """A stage's record (None: not written yet); a damaged one is a clear error saying what to do."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str):
            raise ValueError("no fingerprint")
        return record
    except (ValueError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"{path} is damaged ({error}); delete it and rerun: the stage continues from what it saved "
            "(a done.json is rewritten when the stage is found finished, a started.json with this configuration)"
        ) from None


def as_begun(config: RunConfig, log=print) -> RunConfig:
    """The config a run folder begun by an earlier release continues with.

    Earlier releases defaulted train.lr to the paper's 5e-7 in every mode; this one takes 5e-6
    for LoRA. A folder whose stages were begun before (a started.json without inputs) keeps
    the rate it began with unless train.lr is set, so it resumes without --force.
    """
    if config.train.lr is not None or config.model.lora_r == 0:
        return config
    for stage in stage_list(config):
        started = read_stage_record(Path(config.run_dir) / stage.name / "started.json")
        if started is not None and "inputs" not in started:
            log(
                f"{config.run_dir} was begun by an earlier release at its default train.lr={PAPER_LR:g}: continuing with it"
            )
            return replace(config, train=replace(config.train, lr=PAPER_LR))
    return config
