"""Run configuration: a typed schema whose defaults are the paper's.

A YAML file plus `section.key=value` overrides. Unknown keys are rejected with the nearest
valid name; values are checked against the field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


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
    lora_dropout: float = 0.0
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


@dataclass
class DataConfig:
    seed_pairs: str | None = None  # gold-labelled preference pairs for stage 0; None: no-seed mode
    prompt_pools: list[str] = field(default_factory=list)  # one file per SPA iteration
    max_length: int = 2048
    max_prompt_length: int = 1024
    skip_invalid: bool = False


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


@dataclass
class TrainConfig:
    beta: float = 0.1
    lr: float = 5e-7
    warmup_ratio: float = 0.1
    batch_size: int = 32
    micro_batch_size: int = 4
    seed_epochs: int = 3
    iteration_epochs: int = 1
    max_grad_norm: float = 1.0
    optimizer: str = "adamw8bit"
    weight_decay: float = 0.0
    save_every: int = 100
    loss_type: str = "sigmoid"


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
    judge: str = "implicit"  # implicit (SPA) | reward_model (the paper's baseline: a reward model fit to the seed)
    reward_model_epochs: int = 3
    reward_model_lr: float = 1e-3


@dataclass
class RunConfig:
    run_dir: str = "runs/spa"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    spa: SPAConfig = field(default_factory=SPAConfig)


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
