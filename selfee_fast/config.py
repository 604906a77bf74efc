"""Run configuration: a typed schema whose defaults are the paper's, except where a field's comment says ours.

A YAML file plus `section.key=value` overrides. Unknown keys are rejected with the nearest
valid name; values are checked against the field's type (`load_config`), then against the
choices, ranges and cross-field rules below (`check_values`), all before anything loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .kernels.spa_loss import LOSS_TYPE_INFO, LOSS_TYPES


class ConfigError(ValueError):
    pass


# Names users bring from TRL / transformers, pointed at ours in the "did you mean" hint.
ALIASES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "micro_batch_size",
    "num_train_epochs": "iteration_epochs",
    "lr_scheduler_warmup_ratio": "warmup_ratio",
    "max_grad_norm": "max_grad_norm",
    "model_name_or_path": "path",
    "torch_dtype": "dtype",
    "num_iterations": "iterations",
}


@dataclass
class ModelConfig:
    path: str = ""  # local Hugging Face folder of pi_init (the SFT model)
    judge_base: str | None = None  # no-seed mode: the base model the judge compares against
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # needs disable_dropout: false
    # Every dropout off in every role's forward (TRL's disable_dropout, on by default there too):
    # policy and reference then agree at step 1 and the judge is deterministic.
    disable_dropout: bool = True
    lora_target_modules: str = "all-linear"
    gradient_checkpointing: bool = True
    # none | 4bit: QLoRA, the frozen base stored in NF4 by bitsandbytes (4 bits per weight plus
    # its quantisation constants); the adapter, the LM head and the norms stay in 16/32 bits.
    quantization: str = "none"
    # auto: flash_attention_2 on a GPU with flash-attn where the architecture has it, else transformers' choice
    # (sdpa, or eager where sdpa is missing) | sdpa | eager | flash_attention_2
    attention: str = "auto"
    # Each training micro-batch and judge batch as one packed row: no padding tokens. Pays
    # off with flash-attention; under sdpa the row's block-diagonal mask costs attention work
    # quadratic in the whole row.
    packing: bool = False
    # Under torchrun with LoRA, where the frozen base lives: whole on every GPU (only the adapters
    # are sharded: DDP's traffic) or sharded by FSDP2 (an all-gather of the base per forward and
    # backward, for a base one GPU cannot hold). auto: whole when the memory plan's training
    # estimate fits the budget (or there is no budget), else sharded. Full fine-tuning always shards.
    shard_frozen_base: str = "auto"
    # GiB of GPU memory the memory plan (selfee_fast/plan.py) fits the batches under; null: the
    # card's total memory on a GPU, and on a CPU no budget (the plan reports estimates only).
    max_memory_gb: float | None = None


@dataclass
class DataConfig:
    seed_pairs: str | None = None  # gold-labelled preference pairs for stage 0; None: no-seed mode
    prompt_pools: list[str] = field(default_factory=list)  # one file per SPA iteration
    max_length: int = 2048
    max_prompt_length: int = 1024
    skip_invalid: bool = False
    # A system turn put before every prompt whose chat template takes one; null: none. The
    # official SPA code inserts an empty one (""), as the alignment-handbook does.
    system_prompt: str | None = None


@dataclass
class GenerationConfig:
    backend: str = "hf"  # hf: transformers generate; vllm: a vLLM engine for the generation step only
    vllm_gpu_memory_utilization: float = 0.9  # vLLM's share of the GPU while it generates
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 300
    responses_per_prompt: int = 2
    batch_size: int = 16
    # Ours, off by default: transformers' static KV cache (preallocated to prompt + max_new_tokens),
    # which transformers compiles with CUDA graphs on a GPU. The same samples on the CPU (tested),
    # where it is no faster (bench/NOTES.md); on a GPU it waits for a measurement.
    static_cache: bool = False


@dataclass
class TrainConfig:
    beta: float = 0.1
    lr: float | None = None  # null: per mode, see effective_lr (the paper's 5e-7 for full fine-tuning)
    warmup_ratio: float = 0.1
    batch_size: int = 32
    micro_batch_size: int = 4  # pairs per forward/backward; under torchrun split over the processes
    seed_epochs: int = 3
    iteration_epochs: int = 1
    max_grad_norm: float = 1.0
    optimizer: str = "adamw8bit"
    weight_decay: float = 0.0
    save_every: int = 100
    loss_type: str = "sigmoid"
    # Ours, off by default: + nll_alpha * the chosen response's per-token NLL (iterative RPO, Pang et
    # al. 2024), against likelihood displacement (log pi(chosen) falling while the margin grows).
    nll_alpha: float = 0.0
    # A step whose loss or gradient is not finite is skipped and counted; this many in a row stop the run.
    max_nonfinite_steps: int = 3


@dataclass
class SPAConfig:
    iterations: int = 3
    refine: bool = True  # self-refinement; False: data expansion only
    alpha: float = 0.1
    alpha_warmup: float = 0.2
    noise_percentile: float = 0.10
    tau_window: int = 50
    extrapolate: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.125])  # lam per iteration; [] = no DND
    judge_reference: str = "init"  # init | previous (the iterate before pi_{i-1}: the paper's ablation) | none
    # implicit (SPA) | reward_model: the paper's external-judge baseline, with a Bradley-Terry reward
    # model fit to the seed pairs standing in for the paper's PairRM
    judge: str = "implicit"
    reward_model_epochs: int = 3
    reward_model_lr: float = 1e-3
    # Options of ours for iteration-stable self-annotation (docs/RESULTS.md measures each):
    # judge_reward: sum (the paper: beta * summed log-ratio) | mean (per response token: no
    # length bias, and one rare token cannot dominate a long response's reward)
    judge_reward: str = "sum"
    # A pair whose two responses are identical carries no preference; the official code trains
    # on it (zero gradient, but it dilutes the batch and fills tau's window with zeros).
    keep_identical_pairs: bool = False
    # Seed (gold) pairs mixed into each iteration's training, as a fraction of its self-labelled
    # pairs (the experience replay of DICE, Chen et al. 2024); 0: the paper's self-labelled data only.
    seed_replay: float = 0.0
    # The previous iteration's judge ranks each prompt's responses too (CREAM, Wang et al. 2025),
    # and its agreement with this one (scaled Kendall tau) is used: "smooth" smooths every self-made
    # label by the iteration's mean disagreement (CREAM's consistency_avg); "filter" (ours) does not
    # train on the pairs the two judges order oppositely; "none": the paper's labels as judged.
    judge_consistency: str = "none"
    # Which earlier judge checks this one from iteration 3 on: "previous", pi_{i-2} (CREAM's), or
    # "stage0", pi_0, trained on the gold seed alone (ours): pi_{i-2} learnt from nearly the same
    # self-made labels as pi_{i-1}, so it shares their errors; pi_0's errors are not the loop's.
    consistency_judge: str = "previous"


@dataclass
class RunConfig:
    run_dir: str = "runs/spa"
    seed: int = 0
    # Filled by load_config, not by hand: each path setting the config file wrote relative to
    # its own folder, as written. Stage fingerprints hash these, so a run folder resumes from
    # any working directory and a folder begun when paths were read from the working
    # directory keeps its fingerprints.
    paths_as_written: dict[str, str | list[str]] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    spa: SPAConfig = field(default_factory=SPAConfig)


# --------------------------------------------------------------------------- what a valid config is

# Settings that change how the work is laid out, not what it computes: not part of a stage's
# fingerprint, so a run may switch them and resume; a training checkpoint ignores them too.
LAYOUT_SETTINGS = {
    "model": ("attention", "packing", "max_memory_gb", "shard_frozen_base"),
    "train": ("save_every",),
    "generation": ("vllm_gpu_memory_utilization",),
}

# The allowed values of every setting that is a choice.
CHOICES = {
    "model.dtype": ("auto", "bfloat16", "float16", "float32"),
    "model.quantization": ("none", "4bit"),
    "model.attention": ("auto", "sdpa", "eager", "flash_attention_2"),
    "model.shard_frozen_base": ("auto", "whole", "sharded"),
    "generation.backend": ("hf", "vllm"),
    "train.optimizer": ("adamw8bit", "paged_adamw8bit", "adamw"),
    # The training config has no label-smoothing setting and always has a reference model.
    "train.loss_type": tuple(
        name
        for name in LOSS_TYPES
        if LOSS_TYPE_INFO[name].smoothing != "required" and LOSS_TYPE_INFO[name].takes_reference
    ),
    "spa.judge_reference": ("init", "previous", "none"),
    "spa.judge": ("implicit", "reward_model"),
    "spa.judge_reward": ("sum", "mean"),
    "spa.judge_consistency": ("none", "smooth", "filter"),
    "spa.consistency_judge": ("previous", "stage0"),
}


def _finite(low: float | None = None, high: float | None = None, *, open_low=False, open_high=False):
    def ok(v) -> bool:
        if not math.isfinite(v):
            return False
        if low is not None and (v <= low if open_low else v < low):
            return False
        return not (high is not None and (v >= high if open_high else v > high))

    return ok


def _at_least(n: int) -> Callable[[int], bool]:
    return lambda v: v >= n


# Numeric ranges: the same ones the loss, the noise threshold and the samplers enforce, so a
# bad value is refused in seconds instead of after generation and judging have run.
RANGES: dict[str, tuple[Callable, str]] = {
    "model.lora_r": (_at_least(0), ">= 0 (0: full fine-tuning)"),
    "model.lora_alpha": (_at_least(1), ">= 1"),
    "model.lora_dropout": (_finite(0, 1, open_high=True), "in [0, 1)"),
    "model.max_memory_gb": (
        lambda v: v is None or _finite(0, 16384, open_low=True)(v),
        "a number of GiB in (0, 16384], or null (the card's memory)",
    ),
    "data.max_length": (_at_least(2), ">= 2"),
    "data.max_prompt_length": (_at_least(1), ">= 1"),
    "generation.vllm_gpu_memory_utilization": (_finite(0, 1, open_low=True), "in (0, 1]"),
    # vLLM's own limits (vllm/sampling_params.py _verify_args); hf refuses temperature 0 with sampling too.
    "generation.temperature": (_finite(0, 2, open_low=True), "in (0, 2]"),
    "generation.top_p": (_finite(0, 1, open_low=True), "in (0, 1]"),
    "generation.top_k": (_at_least(0), ">= 0 (0: off)"),
    "generation.max_new_tokens": (_at_least(1), ">= 1"),
    "generation.responses_per_prompt": (_at_least(2), ">= 2 to form a pair"),
    "generation.batch_size": (_at_least(1), ">= 1"),
    "train.beta": (_finite(0, open_low=True), "> 0 (the judge's labels and the loss both scale by it)"),
    "train.lr": (lambda v: v is None or _finite(0, open_low=True)(v), "a positive number or null (the mode's default)"),
    "train.nll_alpha": (_finite(0), ">= 0"),
    "train.max_nonfinite_steps": (_at_least(1), ">= 1"),
    "train.warmup_ratio": (_finite(0, 1), "in [0, 1]"),
    "train.batch_size": (_at_least(1), ">= 1"),
    "train.micro_batch_size": (_at_least(1), ">= 1"),
    "train.seed_epochs": (_at_least(1), ">= 1"),
    "train.iteration_epochs": (_at_least(1), ">= 1"),
    "train.max_grad_norm": (_finite(0, open_low=True), "> 0"),
    "train.weight_decay": (_finite(0), ">= 0"),
    "train.save_every": (_at_least(1), ">= 1"),
    "spa.iterations": (_at_least(0), ">= 0"),
    "spa.alpha": (_finite(0, 0.5, open_high=True), "in [0, 0.5) (a smoothed label must still prefer the chosen)"),
    "spa.alpha_warmup": (_finite(0, 1), "in [0, 1]"),
    "spa.noise_percentile": (_finite(0, 1, open_low=True, open_high=True), "in (0, 1)"),
    "spa.tau_window": (_at_least(2), ">= 2 (a percentile of one margin is no threshold)"),
    "spa.reward_model_epochs": (_at_least(1), ">= 1"),
    "spa.reward_model_lr": (_finite(0, open_low=True), "> 0"),
    "spa.seed_replay": (_finite(0, 10), "in [0, 10]"),
}

# The learning rate when train.lr is null. The paper's 5e-7 is for full fine-tuning; a LoRA
# adapter barely moves at it, so LoRA takes the alignment-handbook's QLoRA DPO recipe's 5e-6.
PAPER_LR = 5e-7
LORA_LR = 5e-6


def effective_lr(config: RunConfig) -> float:
    if config.train.lr is not None:
        return config.train.lr
    return PAPER_LR if config.model.lora_r == 0 else LORA_LR


def lr_note(config: RunConfig) -> str | None:
    """What the run says about its learning rate: which default it took, or a warning."""
    lr, lora = effective_lr(config), config.model.lora_r > 0
    if config.train.lr is None:
        mode = "LoRA (the paper's 5e-7 is for full fine-tuning)" if lora else "full fine-tuning (the paper's)"
        return f"train.lr: {lr:g}, the default for {mode}"
    if lora and lr < 1e-6:
        return (
            f"warning: train.lr={lr:g} with LoRA: an adapter barely moves below 1e-6 (the LoRA default is {LORA_LR:g})"
        )
    return None


def as_written(config: RunConfig, key: str):
    """A path setting as the user wrote it (what fingerprints hash); others as they are."""
    return config.paths_as_written.get(key, setting(config, key) if "." in key else getattr(config, key))


def setting(config: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def check_values(config: RunConfig) -> None:
    """Every choice, range and cross-field rule of the config; files and hardware are `preflight`'s."""
    if not config.model.path:
        raise ConfigError("model.path is required: the local folder of the SFT model (pi_init)")
    for key, options in CHOICES.items():
        if setting(config, key) not in options:
            raise ConfigError(f"{key} must be one of {options}, got {setting(config, key)!r}")
    for key, (ok, rule) in RANGES.items():
        if not ok(setting(config, key)):
            raise ConfigError(f"{key} must be {rule}, got {setting(config, key)}")
    for i, lam in enumerate(config.spa.extrapolate):
        if not (math.isfinite(lam) and lam >= 0):
            raise ConfigError(f"spa.extrapolate[{i}] must be a finite number >= 0 (DND's lambda), got {lam}")
    t, d, spa = config.train, config.data, config.spa
    if t.batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be a positive multiple of train.micro_batch_size ({t.micro_batch_size})"
        )
    if d.max_prompt_length + config.generation.max_new_tokens > d.max_length:
        raise ConfigError(
            f"data.max_prompt_length ({d.max_prompt_length}) + generation.max_new_tokens "
            f"({config.generation.max_new_tokens}) exceeds data.max_length ({d.max_length})"
        )
    if len(d.prompt_pools) < spa.iterations:
        raise ConfigError(
            f"spa.iterations is {spa.iterations} but data.prompt_pools lists {len(d.prompt_pools)} "
            "files: one disjoint prompt pool per iteration"
        )
    if not d.seed_pairs and not config.model.judge_base and spa.judge_reference != "none":
        raise ConfigError(
            "no-seed mode (data.seed_pairs is null) judges against a base model: set model.judge_base to its folder"
        )
    if not d.seed_pairs and spa.iterations == 0:
        raise ConfigError("nothing to do: no data.seed_pairs and spa.iterations=0")
    if spa.seed_replay and not d.seed_pairs:
        raise ConfigError("spa.seed_replay mixes seed pairs into the iterations: set data.seed_pairs")
    if spa.judge == "reward_model" and not d.seed_pairs:
        raise ConfigError("spa.judge=reward_model fits the reward model to data.seed_pairs: set them")
    if config.model.quantization != "none" and config.model.lora_r == 0:
        raise ConfigError("model.quantization=4bit trains LoRA adapters on a frozen base: set model.lora_r > 0")
    if config.model.lora_dropout > 0 and config.model.disable_dropout:
        raise ConfigError("model.lora_dropout > 0 has no effect while model.disable_dropout is true: set one of them")
    if spa.judge_consistency != "none" and (spa.judge != "implicit" or spa.judge_reference != "init"):
        raise ConfigError(
            "spa.judge_consistency compares this iteration's implicit-reward judge with the previous one, "
            "both against pi_init: it needs spa.judge=implicit and spa.judge_reference=init"
        )
    if spa.consistency_judge != "previous" and spa.judge_consistency == "none":
        raise ConfigError(
            f"spa.consistency_judge={spa.consistency_judge} has no effect while spa.judge_consistency is none: "
            "set spa.judge_consistency to smooth or filter"
        )
    if spa.consistency_judge == "stage0" and not d.seed_pairs:
        raise ConfigError(
            "spa.consistency_judge=stage0 checks the judge with pi_0, trained on data.seed_pairs: set them"
        )
    if spa.judge_consistency == "smooth" and LOSS_TYPE_INFO[t.loss_type].smoothing != "optional":
        raise ConfigError(
            f"spa.judge_consistency=smooth smooths labels, which train.loss_type={t.loss_type!r} has not: use sigmoid or robust"
        )
    if spa.refine and LOSS_TYPE_INFO[t.loss_type].smoothing != "optional":
        raise ConfigError(
            f"self-refinement smooths labels, which train.loss_type={t.loss_type!r} has not: use sigmoid or robust, or spa.refine=false"
        )


# Settings that name a file or folder. In a config file a relative one is read from the file's
# folder (the file and its data travel together); on the command line, from the working directory.
PATH_SETTINGS = ("run_dir", "model.path", "model.judge_base", "data.seed_pairs", "data.prompt_pools")


def _resolve_file_paths(raw: dict, folder: Path) -> None:
    """Rewrite the config file's relative path settings as paths from `folder`, keeping what was written."""
    written = raw.setdefault("paths_as_written", {})
    if not isinstance(written, dict):
        return  # _build names the bad value
    for key in PATH_SETTINGS:
        *parents, leaf = key.split(".")
        section = raw
        for part in parents:
            section = section.get(part) if isinstance(section, dict) else None
        if not isinstance(section, dict) or key in written:
            continue  # absent, or a saved run's config.yaml, whose paths are already resolved
        value = section.get(leaf)
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in values) or all(not v or Path(v).is_absolute() for v in values):
            continue
        resolved = [str(folder / v) if v and not Path(v).is_absolute() else v for v in values]
        section[leaf] = resolved if isinstance(value, list) else resolved[0]
        written[key] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        _resolve_file_paths(raw, path.resolve().parent)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        target = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        target[leaf] = yaml.safe_load(value)
        if key.strip() in PATH_SETTINGS:
            # Read from the working directory, as typed; the fingerprint takes it as typed too.
            raw.get("paths_as_written", {}).pop(key.strip(), None)
    return _build(RunConfig, raw, "")


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            candidates = {**{a: f for a, f in ALIASES.items() if f in fields}, **{f: f for f in fields}}
            near = difflib.get_close_matches(key, candidates, n=1)
            hint = f"; did you mean {prefix}{candidates[near[0]]}?" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            values[key] = _check_type(value, hint, f"{prefix}{key}")
    return cls(**values)


def _check_type(value, hint, name: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name} must be {hint}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{name} must be null, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_check_type(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return {_check_type(k, key_type, name): _check_type(v, value_type, f"{name}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads 5e-7 (no dot) as a string; it is the usual way to write a learning rate.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} must be float, got {value!r}") from None
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be {hint.__name__}, got {value!r}")
    return value


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: RunConfig, path: str | Path) -> None:
    from .files import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))
