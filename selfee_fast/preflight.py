"""Everything a run needs, checked before any model loads or anything is written.

`preflight(config)` checks the config's values (`config.check_values`), the libraries and
hardware the chosen options need, the model folders, and every data file the run will read
(present, decodable, each record valid or counted as skipped, none empty); it returns the
run's `Runtime`. Errors name the key, file or line at fault.
"""

from __future__ import annotations

import importlib.util

from . import models
from .config import ConfigError, RunConfig, check_values
from .data import DataError, load_preferences, load_prompts, record_prompt_ids, with_system_prompt
from .distributed import world
from .runtime import Runtime, resolve_runtime


def preflight(config: RunConfig, *, check_data: bool = True) -> Runtime:
    check_values(config)
    check_processes(config)
    runtime = resolve_runtime(config)
    check_libraries(config, runtime)
    check_model_folders(config)
    if check_data:
        check_data_files(config)
    return runtime


def check_processes(config: RunConfig, processes: int | None = None) -> None:
    """What several processes (torchrun) do not support yet, refused with what to set instead.

    `processes`: how many (the memory plan asks about a count of its own); by default this run's.
    """
    ranks = world().size if processes is None else processes
    if ranks == 1:
        return
    if config.train.micro_batch_size % ranks:
        raise ConfigError(
            f"train.micro_batch_size={config.train.micro_batch_size} must split evenly over the {ranks} processes: "
            f"each takes micro_batch_size / {ranks} pairs of a micro-batch"
        )
    if config.generation.backend == "vllm":
        raise ConfigError("generation.backend=vllm runs on one process; under torchrun use generation.backend=hf")
    if config.model.quantization != "none" and config.model.shard_frozen_base == "sharded":
        # QLoRA runs data-parallel instead: the NF4 base whole on every rank, the adapters sharded.
        raise ConfigError(
            "model.quantization=4bit with model.shard_frozen_base=sharded: FSDP2 cannot shard bitsandbytes' NF4 "
            "weights; use model.shard_frozen_base=whole (or auto): the 4-bit base whole on every rank, the adapters "
            "sharded"
        )
    if config.train.optimizer == "paged_adamw8bit":
        # adamw8bit steps each rank's shards (train.ShardedAdamW8bit); the paged variant's pages are not wired.
        raise ConfigError(
            "train.optimizer=paged_adamw8bit does not run on FSDP2's sharded parameters yet: use train.optimizer="
            "adamw8bit (its states are sharded N ways, in 8 bits) or adamw on several processes"
        )


def check_libraries(config: RunConfig, runtime: Runtime) -> None:
    have_bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    if config.model.quantization != "none" and not have_bitsandbytes:
        raise ConfigError("model.quantization=4bit needs bitsandbytes: pip install bitsandbytes")
    optimizer = config.train.optimizer
    if optimizer != "adamw" and not have_bitsandbytes:
        raise ConfigError(f"train.optimizer={optimizer!r} needs bitsandbytes: pip install bitsandbytes, or use adamw")
    if optimizer != "adamw" and runtime.device.type == "cuda":
        from .train import eight_bit_optimizer_problem

        problem = eight_bit_optimizer_problem(runtime.device)
        if problem:
            raise ConfigError(
                f"train.optimizer={optimizer!r}: bitsandbytes cannot run on {runtime.device} ({problem}); "
                "install a bitsandbytes built for this CUDA, or use train.optimizer=adamw"
            )
    if config.generation.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("generation.backend='vllm' needs vLLM: pip install 'selfee-fast[vllm]', or use 'hf'")


def check_model_folders(config: RunConfig) -> None:
    for key in ("path", "judge_base"):
        path = getattr(config.model, key)
        if path:
            try:
                models.check_model_dir(path)
            except FileNotFoundError as error:
                raise ConfigError(f"model.{key}: {error}") from None


def check_data_files(config: RunConfig) -> None:
    """Read every data file the run uses, as the run will, and render its prompts with the chat template.

    A file with nothing usable is refused; a prompt the template cannot render is named.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model.path, local_files_only=True, trust_remote_code=False)
    skip = config.data.skip_invalid
    files = [("data.seed_pairs", config.data.seed_pairs, load_preferences)] if config.data.seed_pairs else []
    for i, pool in enumerate(config.data.prompt_pools[: config.spa.iterations]):
        files.append((f"data.prompt_pools[{i}]", pool, load_prompts))
    for key, path, load in files:
        try:
            records, report = load(path, skip_invalid=skip)
            for record in with_system_prompt(records, config.data.system_prompt, tokenizer):
                record_prompt_ids(tokenizer, record)
        except (DataError, FileNotFoundError) as error:
            raise ConfigError(f"{key}: {error}") from None
        if report.used == 0:
            what = "preference pairs" if load is load_preferences else "prompts"
            raise ConfigError(f"{key}: {path} holds no usable {what} ({report.summary()})")
