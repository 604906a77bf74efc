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
A finished stage whose configuration changed is refused unless `force=True`, which redoes
it and every stage after it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import models
from .config import ConfigError, RunConfig, SPAConfig, save_config
from .data import DataReport, load_preferences, load_prompts, padding_id, tokenize_pairs
from .files import folder_written_atomically, write_json_atomic
from .generate import GenerationSettings, generate_responses, generate_responses_vllm
from .judge import judge_generations
from .reward_model import RewardModel, RewardModelSettings, train_reward_model
from .train import TrainPair, TrainSettings, train_stage

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(config: RunConfig) -> tuple[torch.device, torch.dtype]:
    """(device, dtype the weights are loaded in).

    model.dtype=auto on a GPU: LoRA keeps the frozen base in bf16 (peft keeps the adapter in
    fp32); full fine-tuning keeps fp32 master weights, since a bf16 weight cannot take an
    update below its rounding step (2^-8 of its size: lr 5e-7 moves nothing). Either way
    the forward runs under bf16 autocast (`autocast_dtype`). On the CPU: fp32.
    """
    device = config.model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if config.model.dtype == "auto":
        lora_on_gpu = device.type == "cuda" and not full_finetuning(config)
        return device, torch.bfloat16 if lora_on_gpu else torch.float32
    if config.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {['auto', *DTYPES]}, got {config.model.dtype!r}")
    return device, DTYPES[config.model.dtype]


def autocast_dtype(config: RunConfig) -> torch.dtype | None:
    """The dtype the forward computes in under torch.autocast: bf16 on a GPU with dtype auto or bfloat16.

    float16 and float32 run in the weights' own dtype (fp16 autocast would need loss scaling).
    """
    device, _ = resolve_device(config)
    if device.type != "cuda" or config.model.dtype not in ("auto", "bfloat16"):
        return None
    return torch.bfloat16


def attention_for(config: RunConfig) -> str | None:
    """The attention implementation every model of the run loads with (model.attention resolved)."""
    device, dtype = resolve_device(config)
    half_precision = autocast_dtype(config) is not None or dtype in (torch.float16, torch.bfloat16)
    return models.attention_implementation(
        config.model.attention, device, half_precision=half_precision, model_path=config.model.path or None
    )


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_settings(section) -> dict:
    """A config section's values that differ from their defaults.

    Fingerprints hash these, not the whole section: a setting added in a later version
    (at its default) leaves every fingerprint as it was, so upgrading does not orphan runs.
    """
    defaults = asdict(type(section)())
    return {k: v for k, v in asdict(section).items() if v != defaults[k]}


# Settings that change how the work is laid out, not what it computes: not hashed, so a run
# may switch them and resume.
UNHASHED = {
    "model": ("attention", "packing"),
    "train": ("save_every",),
    "generation": ("vllm_gpu_memory_utilization",),
}


def stage_fingerprints(config: RunConfig) -> dict[str, str]:
    """Per stage, a hash of everything its result depends on: its own settings and its predecessor's print.

    A stage hashes only what it uses, so a finished run can be extended (spa.iterations=4
    with a fourth pool and lambda) and its checkpoint cadence changed without --force.
    """
    model = without(changed_settings(config.model), *UNHASHED["model"])
    train = without(changed_settings(config.train), *UNHASHED["train"])
    generation = without(changed_settings(config.generation), *UNHASHED["generation"])
    spa = without(changed_settings(config.spa), "iterations", "extrapolate")
    if config.spa.judge != "reward_model":
        spa = without(spa, "reward_model_epochs", "reward_model_lr")
    default_lams = SPAConfig().extrapolate
    base = fingerprint(model, config.seed, config.data.max_length, config.data.max_prompt_length)
    prints = {}
    previous = base
    if config.data.seed_pairs:
        previous = prints["stage0"] = fingerprint(base, config.data.seed_pairs, without(train, "iteration_epochs"))
    for i in range(1, config.spa.iterations + 1):
        pool = config.data.prompt_pools[i - 1] if i <= len(config.data.prompt_pools) else None
        stage_spa = dict(spa)
        lam, default_lam = iteration_lambda(config.spa.extrapolate, i), iteration_lambda(default_lams, i)
        if lam != default_lam:
            stage_spa["lambda"] = lam
        previous = prints[f"iter{i}"] = fingerprint(previous, pool, generation, without(train, "seed_epochs"),
                                                    stage_spa, i)  # fmt: skip
    return prints


def without(settings: dict, *names: str) -> dict:
    return {k: v for k, v in settings.items() if k not in names}


def iteration_lambda(extrapolate: list[float], i: int) -> float | None:
    """DND's lambda for iteration i (1-based); None past the list's end: no DND."""
    return extrapolate[i - 1] if i <= len(extrapolate) else None


def check_config(config: RunConfig) -> None:
    if not config.model.path:
        raise ConfigError("model.path is required: the local folder of the SFT model (pi_init)")
    if config.model.lora_r < 0:
        raise ConfigError(f"model.lora_r must be >= 0 (0: full fine-tuning), got {config.model.lora_r}")
    if config.model.quantization not in models.QUANTIZATIONS:
        raise ConfigError(
            f"model.quantization must be one of {models.QUANTIZATIONS}, got {config.model.quantization!r}"
        )
    try:
        attention_for(config)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"model.{error}") from None
    if config.model.quantization != "none":
        if config.model.lora_r == 0:
            raise ConfigError("model.quantization=4bit trains LoRA adapters on a frozen base: set model.lora_r > 0")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("model.quantization=4bit needs bitsandbytes: pip install bitsandbytes")
    if len(config.data.prompt_pools) < config.spa.iterations:
        raise ConfigError(
            f"spa.iterations is {config.spa.iterations} but data.prompt_pools lists {len(config.data.prompt_pools)} "
            "files: one disjoint prompt pool per iteration"
        )
    if not config.data.seed_pairs and not config.model.judge_base and config.spa.judge_reference != "none":
        raise ConfigError(
            "no-seed mode (data.seed_pairs is null) judges against a base model: set model.judge_base to its folder"
        )
    from .judge import JUDGE_REFERENCES
    from .loss import LOSS_TYPES
    from .train import OPTIMIZERS

    t = config.train
    if config.spa.judge_reference not in JUDGE_REFERENCES:
        raise ConfigError(f"spa.judge_reference must be one of {JUDGE_REFERENCES}, got {config.spa.judge_reference!r}")
    if config.spa.judge not in ("implicit", "reward_model"):
        raise ConfigError(f"spa.judge must be 'implicit' or 'reward_model', got {config.spa.judge!r}")
    if config.spa.judge == "reward_model" and not config.data.seed_pairs:
        raise ConfigError("spa.judge=reward_model fits the reward model to data.seed_pairs: set them")
    if t.optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer must be one of {OPTIMIZERS}, got {t.optimizer!r}")
    if t.optimizer != "adamw" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"train.optimizer={t.optimizer!r} needs bitsandbytes: pip install bitsandbytes, or use adamw")
    device, _ = resolve_device(config)
    if t.optimizer != "adamw" and device.type == "cuda":
        from .train import eight_bit_optimizer_problem

        problem = eight_bit_optimizer_problem(device)
        if problem:
            raise ConfigError(
                f"train.optimizer={t.optimizer!r}: bitsandbytes cannot run on {device} ({problem}); "
                "install a bitsandbytes built for this CUDA, or use train.optimizer=adamw"
            )
    if t.loss_type not in LOSS_TYPES:
        raise ConfigError(f"train.loss_type must be one of {LOSS_TYPES}, got {t.loss_type!r}")
    if config.spa.refine and t.loss_type in ("ipo", "hinge"):
        raise ConfigError(
            f"self-refinement smooths labels, which train.loss_type={t.loss_type!r} has not: use sigmoid or robust, or spa.refine=false"
        )
    if not (math.isfinite(t.lr) and t.lr > 0):
        raise ConfigError(f"train.lr must be a positive number, got {t.lr}")
    if t.batch_size < 1 or t.micro_batch_size < 1 or t.batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be a positive multiple of train.micro_batch_size ({t.micro_batch_size})"
        )
    d = config.data
    if d.max_prompt_length + config.generation.max_new_tokens > d.max_length:
        raise ConfigError(
            f"data.max_prompt_length ({d.max_prompt_length}) + generation.max_new_tokens "
            f"({config.generation.max_new_tokens}) exceeds data.max_length ({d.max_length})"
        )
    if config.generation.backend not in ("hf", "vllm"):
        raise ConfigError(f"generation.backend must be 'hf' or 'vllm', got {config.generation.backend!r}")
    if config.generation.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("generation.backend='vllm' needs vLLM: pip install 'selfee-fast[vllm]', or use 'hf'")
    g = config.generation
    if not 0 < g.temperature <= 2 or not 0 < g.top_p <= 1 or g.top_k < 0:
        # vLLM's own limits (vllm/sampling_params.py _verify_args); hf refuses temperature 0 with sampling too.
        raise ConfigError(
            f"generation needs 0 < temperature <= 2, 0 < top_p <= 1, top_k >= 0 (0: off); "
            f"got {g.temperature}, {g.top_p}, {g.top_k}"
        )
    if config.generation.responses_per_prompt < 2:
        raise ConfigError("generation.responses_per_prompt must be >= 2 to form a pair")


def recorded_fingerprint(path: Path) -> str | None:
    """The fingerprint in a stage's started.json or done.json (None: no such file)."""
    return json.loads(path.read_text())["fingerprint"] if path.exists() else None


def changed_stage(stage: str, started_path: Path, remedy: str) -> ConfigError:
    return ConfigError(f"{stage} was started with another configuration ({started_path}); {remedy}")


FORCE_REMEDY = "rerun with --force to redo it and every stage after it, or use a new run_dir"


def claim_stage(config: RunConfig, stage: str) -> None:
    """Hold `stage` to this configuration, as `run` does: refuse if it started with another, else record it.

    For the single-step commands (generate / judge / train), so that a step run alone and a
    later `selfee-fast run` cannot mix two configurations in one stage.
    """
    prints = stage_fingerprints(config)
    if stage not in prints:
        raise ConfigError(f"unknown stage {stage!r}; this config has {', '.join(prints)}")
    stage_dir = Path(config.run_dir) / stage
    started_path = stage_dir / "started.json"
    recorded = recorded_fingerprint(started_path)
    if recorded is not None and recorded != prints[stage]:
        raise changed_stage(stage, started_path, "redo it with `selfee-fast run --force`, or use a new run_dir")
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(started_path, {"fingerprint": prints[stage]})


def run_pipeline(config: RunConfig, *, force: bool = False, log=print) -> dict:
    check_config(config)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prints = stage_fingerprints(config)
    stages = list(prints)
    summary = {"stages": {}}
    previous_model: Path | None = None
    redo_rest = False
    for stage in stages:
        stage_dir = run_dir / stage
        done_path, started_path = stage_dir / "done.json", stage_dir / "started.json"
        if done_path.exists() and not redo_rest:
            done = json.loads(done_path.read_text())
            if done["fingerprint"] == prints[stage]:
                log(f"{stage}: finished earlier, skipped")
                summary["stages"][stage] = done
                previous_model = stage_dir / "model"
                continue
        # A started (or finished) stage may only be continued with the configuration it began with.
        recorded = recorded_fingerprint(started_path)
        if redo_rest or (recorded is not None and recorded != prints[stage]):
            if not force and not redo_rest:
                raise changed_stage(stage, started_path, FORCE_REMEDY)
            shutil.rmtree(stage_dir, ignore_errors=True)
            redo_rest = True
        # Saved as a stage is accepted, not before: a refused command leaves the run's config as it was.
        save_config(config, run_dir / "config.yaml")
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(started_path, {"fingerprint": prints[stage]})
        started = time.time()
        generated = None
        if stage != "stage0" and config.generation.backend == "vllm":
            # vLLM wants the GPU memory the policy would hold: generate first, free the engine, then load.
            generated = step_generate_vllm(config, int(stage[4:]), previous_model, stage_dir, log)
        # Each stage starts from a known RNG state (LoRA's initialisation draws from it), so a
        # stage gives the same result whatever ran before it in this process (an in-process
        # vLLM engine reseeds torch's global RNG with its own seed).
        torch.manual_seed(config.seed * 1000 + stages.index(stage))
        model, tokenizer = load_policy(config, previous_model, log)
        pad_id = padding_id(tokenizer)
        if stage == "stage0":
            result = run_seed_stage(config, model, tokenizer, stage_dir, pad_id, log)
        else:
            result = run_iteration(config, int(stage[4:]), model, tokenizer, stage_dir, pad_id, log, generated)
        save_policy(model, tokenizer, stage_dir / "model")
        done = {"fingerprint": prints[stage], "seconds": time.time() - started, **result}
        write_json_atomic(done_path, done)
        summary["stages"][stage] = done
        previous_model = stage_dir / "model"
        del model
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def full_finetuning(config: RunConfig) -> bool:
    return config.model.lora_r == 0


def load_policy(config: RunConfig, previous_model: Path | None, log=print):
    """pi_{i-1} as the trainable policy: base + previous adapter (LoRA), or the previous full model."""
    device, dtype = resolve_device(config)
    if full_finetuning(config):
        model, tokenizer = models.load_model(
            previous_model or config.model.path, dtype=dtype, device=device,
            gradient_checkpointing=config.model.gradient_checkpointing, attention=attention_for(config),
        )  # fmt: skip
        log(full_finetuning_memory(model, config))
        check_packing(config, model)
        return model, tokenizer
    lora = models.LoraSettings(
        r=config.model.lora_r, alpha=config.model.lora_alpha, dropout=config.model.lora_dropout,
        target_modules=config.model.lora_target_modules,
    )  # fmt: skip
    model, tokenizer = models.load_model(
        config.model.path, dtype=dtype, device=device, lora=lora, adapter_path=previous_model,
        gradient_checkpointing=config.model.gradient_checkpointing, quantization=config.model.quantization,
        attention=attention_for(config),
    )  # fmt: skip
    if config.model.quantization != "none":
        log(f"QLoRA: {config.model.quantization} base, {model.get_memory_footprint() / 2**30:.2f} GiB of weights")
    check_packing(config, model)
    return model, tokenizer


def check_packing(config: RunConfig, model) -> None:
    """With model.packing on, refuse a model that would attend across packed sequences."""
    if config.model.packing:
        problem = models.packing_problem(model)
        if problem:
            raise ConfigError(f"model.packing: {problem}; set model.packing=false for this model")


def full_finetuning_memory(model, config: RunConfig) -> str:
    """What full fine-tuning holds, said up front: it is several times a LoRA run."""
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = next(model.parameters()).element_size()
    optimizer_bytes = 8 if config.train.optimizer == "adamw" else 2  # fp32 Adam moments vs 8-bit
    gib = 2**30
    policy = params * (2 * weight_bytes + optimizer_bytes) / gib  # weights + gradients + optimizer state
    compute = autocast_dtype(config)
    frozen_bytes = compute.itemsize if compute is not None else weight_bytes
    frozen = params * frozen_bytes / gib  # one frozen copy: pi_init, or pi_{i-1} for DND
    message = (
        f"full fine-tuning of {params / 1e6:.1f}M parameters: policy {policy:.2f} GiB (weights, gradients, "
        f"{config.train.optimizer} state) + {frozen:.2f} GiB per frozen copy (pi_init; pi_{{i-1}} too with DND), "
        "before activations; LoRA (model.lora_r > 0) keeps one copy of the weights instead"
    )
    if weight_bytes < 4:
        message += (
            f"; warning: {next(model.parameters()).dtype} weights lose every update below their rounding step "
            f"(about 2^-8 of a weight; train.lr={config.train.lr:g}): model.dtype=auto keeps fp32 master weights"
        )
    return message


def linear_layers_in(model, dtype: torch.dtype | None):
    """Store the linear layers in `dtype` (the autocast dtype); embeddings, norms and buffers keep theirs.

    Under autocast an fp32 model computes each linear layer from its weights rounded to
    `dtype` and keeps its residual stream, norms and RoPE frequencies in fp32: a copy cast
    this way computes exactly what the fp32 policy computes (reference == policy at step 0),
    at about half the memory. Casting the whole model would also round the embeddings, the
    norms and RoPE's inv_freq, and run the residual stream in bf16.
    """
    if dtype is None:
        return model
    tied = model.get_input_embeddings().weight
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not tied:
            module.to(dtype)
    return model


def frozen_copy(model, dtype: torch.dtype | None = None):
    """A frozen copy for inference; `dtype` (the autocast dtype) halves what fp32 master weights would take."""
    import copy

    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return linear_layers_in(reference, dtype).eval()


def load_init_model(config: RunConfig, stage_model: Path | None = None):
    """pi_init as its own frozen model (full fine-tuning, or no-seed mode's judge_base).

    `stage_model`: a saved stage's model instead (a full model, or a peft adapter on pi_init).
    """
    device, dtype = resolve_device(config)
    compute = autocast_dtype(config)
    if stage_model is not None and (stage_model / "adapter_config.json").exists():
        model, _ = models.load_model(
            config.model.path, dtype=compute or dtype, device=device, adapter_path=stage_model,
            gradient_checkpointing=False, quantization=config.model.quantization, attention=attention_for(config),
        )  # fmt: skip
        check_packing(config, model)
        return model.requires_grad_(False).eval()
    path = stage_model or config.model.judge_base or config.model.path
    if full_finetuning(config) and compute is not None:
        # As frozen_copy: fp32 from disk (on the CPU: no fp32 copy on the GPU), linear layers in bf16.
        model, _ = models.load_model(
            path, dtype=dtype, device="cpu", gradient_checkpointing=False, attention=attention_for(config)
        )
        model = linear_layers_in(model, compute).to(device)
    else:
        model, _ = models.load_model(
            path, dtype=compute or dtype, device=device, gradient_checkpointing=False,
            quantization=config.model.quantization, attention=attention_for(config),
        )  # fmt: skip
    check_packing(config, model)
    return model.requires_grad_(False).eval()


def save_policy(model, tokenizer, path: Path) -> None:
    """The stage's model in standard form: a peft adapter, or the full model in safetensors."""
    with folder_written_atomically(path) as staging:
        if models.is_peft(model):
            model.save_pretrained(staging, selected_adapters=[models.POLICY_ADAPTER])
        else:
            model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)


def run_seed_stage(config: RunConfig, model, tokenizer, stage_dir: Path, pad_id: int, log) -> dict:
    report = DataReport()
    records, report = load_preferences(config.data.seed_pairs, skip_invalid=config.data.skip_invalid, report=report)
    tokenized, report = tokenize_pairs(
        tokenizer, records, max_length=config.data.max_length, max_prompt_length=config.data.max_prompt_length,
        report=report,
    )  # fmt: skip
    log(f"stage0: seed pairs from {config.data.seed_pairs}: {report.summary()}")
    pairs = [TrainPair(p.location, p.prompt, p.chosen, p.rejected) for p in tokenized]
    settings = train_settings(config, epochs=config.train.seed_epochs, refine=False, extrapolate=None)
    if full_finetuning(config):
        reference_model = load_init_model(config)
        train_stage(model, pairs, settings, stage_dir / "train", pad_id=pad_id, reference=None,
                    reference_model=reference_model, log=log)  # fmt: skip
        del reference_model
    else:
        train_stage(model, pairs, settings, stage_dir / "train", pad_id=pad_id, reference="init", log=log)
    return {"pairs": len(pairs), "data": report.summary(), "last_metrics": last_metrics(stage_dir / "train")}


def run_iteration(
    config: RunConfig, i: int, model, tokenizer, stage_dir: Path, pad_id: int, log, generated=None
) -> dict:
    """Generate (unless `generated` holds vLLM's output already), judge, train."""
    generations, report = generated or step_generate(config, i, model, tokenizer, stage_dir, log)
    report.truncated_prompts += sum(bool(r.get("prompt_truncated")) for r in generations)
    judged = step_judge(config, i, model, tokenizer, generations, stage_dir, log)
    lam = step_train_iteration(config, i, model, judged, stage_dir, pad_id, log)
    return {
        "prompts": len(generations),
        "pairs": len(judged),
        "lambda": lam,
        "data": report.summary(),
        "last_metrics": last_metrics(stage_dir / "train"),
    }


def generation_inputs(config: RunConfig, i: int, log) -> tuple[list, DataReport, GenerationSettings]:
    pool = config.data.prompt_pools[i - 1]
    prompts, report = load_prompts(pool, skip_invalid=config.data.skip_invalid, report=DataReport())
    log(f"iter{i}: prompts from {pool}: {report.summary()}")
    gen = config.generation
    settings = GenerationSettings(
        temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k, max_new_tokens=gen.max_new_tokens,
        responses_per_prompt=gen.responses_per_prompt, batch_size=gen.batch_size, seed=config.seed * 1000 + i,
        max_prompt_length=config.data.max_prompt_length,
    )  # fmt: skip
    return prompts, report, settings


def step_generate(config: RunConfig, i: int, model, tokenizer, stage_dir: Path, log) -> tuple[list[dict], DataReport]:
    """Sample responses from pi_{i-1} (the loaded policy) for iteration i's prompt pool."""
    prompts, report, settings = generation_inputs(config, i, log)
    generations = generate_responses(
        model, tokenizer, prompts, settings, stage_dir / "generations.jsonl", autocast_dtype=autocast_dtype(config),
        log=log,
    )  # fmt: skip
    return generations, report


def step_generate_vllm(
    config: RunConfig, i: int, previous_model: Path | None, stage_dir: Path, log
) -> tuple[list[dict], DataReport]:
    """Sample from pi_{i-1} with vLLM: the base model plus the previous stage's adapter, or its full model."""
    from transformers import AutoTokenizer

    prompts, report, settings = generation_inputs(config, i, log)
    if full_finetuning(config):
        model_path, adapter_path = previous_model or Path(config.model.path), None
    else:
        model_path, adapter_path = Path(config.model.path), previous_model
    tokenizer = AutoTokenizer.from_pretrained(models.check_model_dir(model_path), local_files_only=True)
    _, dtype = resolve_device(config)
    dtype = autocast_dtype(config) or dtype  # full fine-tuning's fp32 master weights sample in bf16, as they compute
    generations = generate_responses_vllm(
        model_path, tokenizer, prompts, settings, stage_dir / "generations.jsonl", adapter_path=adapter_path,
        dtype=str(dtype).removeprefix("torch."), gpu_memory_utilization=config.generation.vllm_gpu_memory_utilization,
        quantization=config.model.quantization, log=log,
    )  # fmt: skip
    return generations, report


def step_judge(
    config: RunConfig, i: int, model, tokenizer, generations: list[dict], stage_dir: Path, log
) -> list[dict]:
    """Label the generations with the implicit reward; reuse a pairs file already written."""
    pairs_path = stage_dir / "pairs.jsonl"
    if pairs_path.exists():
        judged = [json.loads(line) for line in pairs_path.read_text().splitlines() if line.strip()]
        log(f"iter{i}: {len(judged)} judged pairs found, judgment skipped")
        return judged
    if config.spa.judge == "reward_model":
        reward_model = RewardModel(ensure_reward_model(config, tokenizer, log), device=next(model.parameters()).device)
        return judge_generations(model, tokenizer, generations, pairs_path, reward_model=reward_model, log=log)
    judge_reference, base_model = judge_reference_model(config, i, model, log)
    # The same autocast as training: the judge's log pi_{i-1} is reused as the training reference.
    judged = judge_generations(
        model, tokenizer, generations, pairs_path, beta=config.train.beta,
        judge_reference=judge_reference, base_model=base_model, autocast_dtype=autocast_dtype(config),
        packing=config.model.packing, log=log,
    )  # fmt: skip
    if models.is_peft(model) and models.REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(models.REFERENCE_ADAPTER)  # pi_{i-2}, loaded for the judge only
    return judged


def judge_reference_model(config: RunConfig, i: int, model, log) -> tuple[str, object | None]:
    """(judge_reference, base_model) for iteration i's judge; loads what the reference needs.

    base_model None: the shared model plays the reference, with its adapters off for "init",
    with an earlier iterate loaded as its "reference" adapter for "previous". Otherwise a
    frozen model of its own: no-seed mode's judge_base, or any reference of full fine-tuning.
    """
    reference = config.spa.judge_reference
    if reference == "none":
        return "none", None
    if reference == "init":
        needs_own = config.model.judge_base or full_finetuning(config)
        return "init", load_init_model(config) if needs_own else None
    # "previous", the paper's ablation: pi_{i-1} judged against the iterate before it.
    stages = list(stage_fingerprints(config))
    index = stages.index(f"iter{i}")
    if index >= 2:
        earlier = Path(config.run_dir) / stages[index - 2] / "model"  # pi_{i-2}
    elif index == 1:
        earlier = Path(config.model.path)  # pi_init, the model the run started from
    else:
        earlier = Path(config.model.judge_base)  # no-seed iteration 1: before the instruct model, its base
    log(f"iter{i}: judging against the iterate before pi_{i - 1}: {earlier}")
    if index == 1 and not full_finetuning(config):
        return "init", None  # pi_init: the shared model with its adapters off
    if models.is_peft(model) and (earlier / "adapter_config.json").exists():
        models.load_reference_adapter(model, earlier)
        return "previous", None
    return "previous", load_init_model(config, earlier)


def ensure_reward_model(config: RunConfig, tokenizer, log) -> Path:
    """The baseline's judge: a reward model fit to the seed pairs, trained once per run."""
    records, report = load_preferences(config.data.seed_pairs, skip_invalid=config.data.skip_invalid)
    pairs, report = tokenize_pairs(
        tokenizer, records, max_length=config.data.max_length, max_prompt_length=config.data.max_prompt_length,
        report=report,
    )  # fmt: skip
    settings = RewardModelSettings(
        epochs=config.spa.reward_model_epochs, lr=config.spa.reward_model_lr, seed=config.seed
    )
    return train_reward_model(config.model.path, pairs, Path(config.run_dir) / "reward_model", settings, log=log)


def step_train_iteration(config: RunConfig, i: int, model, judged: list[dict], stage_dir: Path, pad_id: int, log):
    """Train pi_i from pi_{i-1} on the judged pairs with self-refinement; return the lam used."""
    lam = iteration_lambda(config.spa.extrapolate, i) if config.spa.refine else None
    if config.spa.refine and i > len(config.spa.extrapolate) and config.spa.extrapolate:
        log(f"iter{i}: spa.extrapolate lists {len(config.spa.extrapolate)} lambdas; iteration {i} runs without DND")
    lam = lam if lam else None
    pairs = [
        TrainPair(
            location=p["location"],
            prompt=p["prompt_ids"],
            chosen=p["chosen_ids"],
            rejected=p["rejected_ids"],
            ref_chosen=p["chosen_logp_policy"],
            ref_rejected=p["rejected_logp_policy"],
        )
        for p in judged
    ]
    settings = train_settings(config, epochs=config.train.iteration_epochs, refine=config.spa.refine, extrapolate=lam)
    # Without DND the judge's log pi_{i-1} values are the reference: no reference forward at all.
    # DND needs pi_{i-1}'s per-token logits: a frozen adapter copy, or a frozen model copy.
    reference, reference_model = None, None
    needs_reference_forward = lam is not None or any(p.ref_chosen is None for p in pairs)  # e.g. a reward-model judge
    if needs_reference_forward and full_finetuning(config):
        # Taken before a checkpoint restore: still pi_{i-1}.
        reference_model = frozen_copy(model, autocast_dtype(config))
    elif needs_reference_forward:
        models.freeze_reference_adapter(model)
        reference = "reference"
    train_stage(model, pairs, settings, stage_dir / "train", pad_id=pad_id, reference=reference,
                reference_model=reference_model, log=log)  # fmt: skip
    if models.is_peft(model) and models.REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(models.REFERENCE_ADAPTER)
    return lam


def previous_stage_model(config: RunConfig, stage: str) -> Path | None:
    """The saved model stage `stage` starts from (None: pi_init itself); checked to exist."""
    check_config(config)
    stages = list(stage_fingerprints(config))
    if stage not in stages:
        raise ConfigError(f"unknown stage {stage!r}; this config has {', '.join(stages)}")
    index = stages.index(stage)
    previous = Path(config.run_dir) / stages[index - 1] / "model" if index > 0 else None
    if (
        previous is not None
        and not (previous / "config.json").exists()
        and not (previous / "adapter_config.json").exists()
    ):
        raise ConfigError(f"{stage} starts from {previous}, which does not exist yet: run {stages[index - 1]} first")
    return previous


def load_stage_model(config: RunConfig, stage: str):
    """(model, tokenizer) as stage `stage` starts: pi_init plus the previous stage's adapter (or model)."""
    previous = previous_stage_model(config, stage)
    torch.manual_seed(config.seed * 1000 + list(stage_fingerprints(config)).index(stage))
    return load_policy(config, previous)


def train_settings(config: RunConfig, *, epochs: int, refine: bool, extrapolate: float | None) -> TrainSettings:
    t, spa = config.train, config.spa
    compute = autocast_dtype(config)
    return TrainSettings(
        beta=t.beta, lr=t.lr, warmup_ratio=t.warmup_ratio, batch_size=t.batch_size,
        micro_batch_size=t.micro_batch_size, epochs=epochs, max_grad_norm=t.max_grad_norm, optimizer=t.optimizer,
        weight_decay=t.weight_decay, save_every=t.save_every, seed=config.seed, loss_type=t.loss_type,
        refine=refine, alpha=spa.alpha, alpha_warmup=spa.alpha_warmup, noise_percentile=spa.noise_percentile,
        tau_window=spa.tau_window, extrapolate=extrapolate,
        autocast_dtype=str(compute).removeprefix("torch.") if compute is not None else None,
        packing=config.model.packing,
    )  # fmt: skip


def last_metrics(train_dir: Path) -> dict:
    path = train_dir / "metrics.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return json.loads(lines[-1]) if lines else {}
