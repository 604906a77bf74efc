"""The models SPA needs, by role: the policy, pi_init, the previous iterate, frozen copies.

LoRA keeps one copy of the base weights and plays each role with an adapter of it: the
policy is the trainable adapter, pi_init is the base with adapters off, pi_{i-1} a frozen
copy of the policy adapter. Full fine-tuning (model.lora_r: 0) makes each frozen role a
model of its own, its linear layers in the compute dtype. Every loader here takes the run's
`Runtime`, resolved once.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from . import models
from .config import ConfigError, RunConfig
from .distributed import barrier, full_tensor, world
from .files import folder_written_atomically, write_manifest
from .judge import EarlierJudge
from .runtime import Runtime


def load_policy(config: RunConfig, runtime: Runtime, previous_model: Path | None, log=print):
    """pi_{i-1} as the trainable policy: base + previous adapter (LoRA), or the previous full model."""
    if runtime.full_finetuning:
        model, tokenizer = models.load_model(
            previous_model or config.model.path, dtype=runtime.weight_dtype, device=runtime.device,
            gradient_checkpointing=config.model.gradient_checkpointing, attention=runtime.attention, disable_dropout=config.model.disable_dropout,
        )  # fmt: skip
        log(full_finetuning_memory(model, config, runtime))
    else:
        lora = models.LoraSettings(
            r=config.model.lora_r, alpha=config.model.lora_alpha, dropout=config.model.lora_dropout,
            target_modules=config.model.lora_target_modules,
        )  # fmt: skip
        model, tokenizer = models.load_model(
            config.model.path, dtype=runtime.weight_dtype, device=runtime.device, lora=lora,
            adapter_path=previous_model, gradient_checkpointing=config.model.gradient_checkpointing,
            quantization=config.model.quantization, attention=runtime.attention, disable_dropout=config.model.disable_dropout,
        )  # fmt: skip
        if config.model.quantization != "none":
            gib = model.get_memory_footprint() / 2**30
            log(f"QLoRA: {config.model.quantization} base, {gib:.2f} GiB of weights")
    check_packing(config, model)
    return model, tokenizer


def load_frozen(config: RunConfig, runtime: Runtime, stage_model: Path | None = None):
    """A frozen model of its own: pi_init (full fine-tuning), no-seed mode's judge_base, or a saved stage's model.

    `stage_model`: a saved stage's model (a full model, or a peft adapter on pi_init).
    """
    if stage_model is not None and (stage_model / "adapter_config.json").exists():
        model, _ = models.load_model(
            config.model.path, dtype=runtime.compute_dtype, device=runtime.device, adapter_path=stage_model,
            gradient_checkpointing=False, quantization=config.model.quantization, attention=runtime.attention, disable_dropout=config.model.disable_dropout,
        )  # fmt: skip
    elif runtime.full_finetuning and runtime.autocast_dtype is not None:
        # As frozen_copy: fp32 from disk (on the CPU: no fp32 copy on the GPU), linear layers in bf16.
        model, _ = models.load_model(
            stage_model or config.model.judge_base or config.model.path, dtype=runtime.weight_dtype,
            device="cpu", gradient_checkpointing=False, attention=runtime.attention, disable_dropout=config.model.disable_dropout,
        )  # fmt: skip
        model = linear_layers_in(model, runtime.autocast_dtype).to(runtime.device)
    else:
        model, _ = models.load_model(
            stage_model or config.model.judge_base or config.model.path, dtype=runtime.compute_dtype,
            device=runtime.device, gradient_checkpointing=False, quantization=config.model.quantization,
            attention=runtime.attention, disable_dropout=config.model.disable_dropout,
        )  # fmt: skip
    check_packing(config, model)
    return model.requires_grad_(False).eval()


def frozen_copy(model, dtype: torch.dtype | None = None):
    """A frozen copy for inference; `dtype` (the autocast dtype) halves what fp32 master weights would take."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return linear_layers_in(reference, dtype).eval()


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


def training_reference(model, runtime: Runtime, needs_forward: bool) -> tuple[str | None, object | None]:
    """(reference role on the shared model, or a frozen reference model) for training pi_i from pi_{i-1}.

    Without a forward (the judge's log pi_{i-1} values serve), neither. Taken before a
    checkpoint restore, so the copy is still pi_{i-1}.
    """
    if not needs_forward:
        return None, None
    if runtime.full_finetuning:
        return None, frozen_copy(model, runtime.autocast_dtype)
    models.freeze_reference_adapter(model)
    return models.REFERENCE_ADAPTER, None


def drop_reference_adapter(model) -> None:
    if models.is_peft(model) and models.REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(models.REFERENCE_ADAPTER)


def judge_reference(config: RunConfig, runtime: Runtime, model, earlier: Path) -> tuple[str, object | None]:
    """(judge_reference, base_model) for an iteration's judge; loads what the reference needs.

    base_model None: the shared model plays the reference, with its adapters off for "init",
    with an earlier iterate loaded as its "reference" adapter for "previous". Otherwise a
    frozen model of its own: no-seed mode's judge_base, or any reference of full fine-tuning.
    `earlier`: the iterate before pi_{i-1}, which "previous" judges against.
    """
    reference = config.spa.judge_reference
    if reference == "none":
        return "none", None
    if reference == "init":
        needs_own = config.model.judge_base or runtime.full_finetuning
        return "init", load_frozen(config, runtime) if needs_own else None
    # "previous", the paper's ablation: pi_{i-1} judged against the iterate before it.
    role, frozen = earlier_iterate(config, runtime, model, earlier)
    return ("init", None) if role == "init" else ("previous", frozen)


def earlier_judge(config: RunConfig, runtime: Runtime, model, earlier: Path | None) -> EarlierJudge:
    """The previous iteration's judge, for spa.judge_consistency; loads what it needs.

    `earlier`: the iterate before pi_{i-1}; None when it is the judge's own reference (pi_init
    in the first iteration): nothing to load.
    """
    if earlier is None:
        return EarlierJudge()
    role, frozen = earlier_iterate(config, runtime, model, earlier)
    return EarlierJudge(role=role, model=frozen)


def earlier_iterate(config: RunConfig, runtime: Runtime, model, earlier: Path) -> tuple[str, object | None]:
    """The iterate before pi_{i-1}, loaded: (the shared model's role that plays it, None), or ("policy", a model).

    LoRA plays pi_init with its adapters off ("init") and a saved iterate as its "reference"
    adapter (dropped after the judge); full fine-tuning loads a frozen model of its own.
    """
    if models.is_peft(model) and earlier == Path(config.model.path):
        return "init", None
    if models.is_peft(model) and (earlier / "adapter_config.json").exists():
        models.load_reference_adapter(model, earlier)
        return "reference", None
    return "policy", load_frozen(config, runtime, earlier)


def save_policy(model, tokenizer, path: Path) -> None:
    """The stage's model in standard form: a peft adapter, or the full model in safetensors.

    Under FSDP2 every rank gathers the whole tensors (of the adapter only, with LoRA) and
    rank 0 writes them: the folder is the one a single process saves.
    """
    ranks = world()
    state = None
    if ranks.distributed and models.is_peft(model):
        adapter = f".{models.POLICY_ADAPTER}"
        state = {n: full_tensor(v.detach()).cpu() for n, v in model.state_dict().items() if adapter in n}
    elif ranks.distributed:  # the whole model, gathered on rank 0 only
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ranks.is_main:
        with folder_written_atomically(path) as staging:
            if models.is_peft(model):
                model.save_pretrained(staging, selected_adapters=[models.POLICY_ADAPTER], state_dict=state)
            else:
                model.save_pretrained(staging, safe_serialization=True, state_dict=state)
            tokenizer.save_pretrained(staging)
            write_manifest(staging)
    barrier()


def check_packing(config: RunConfig, model) -> None:
    """With model.packing on, refuse a model that would attend across packed sequences."""
    if config.model.packing:
        problem = models.packing_problem(model)
        if problem:
            raise ConfigError(f"model.packing: {problem}; set model.packing=false for this model")


def full_finetuning_memory(model, config: RunConfig, runtime: Runtime) -> str:
    """What full fine-tuning holds, said up front: it is several times a LoRA run."""
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = next(model.parameters()).element_size()
    optimizer_bytes = 8 if config.train.optimizer == "adamw" else 2  # fp32 Adam moments vs 8-bit
    gib = 2**30
    policy = params * (2 * weight_bytes + optimizer_bytes) / gib  # weights + gradients + optimizer state
    frozen_bytes = runtime.autocast_dtype.itemsize if runtime.autocast_dtype is not None else weight_bytes
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
