"""Where and in what precision a run computes: resolved once from the config, then passed down.

model.dtype=auto on a GPU: LoRA keeps the frozen base in bf16 (peft keeps the adapter in
fp32); full fine-tuning keeps fp32 master weights, since a bf16 weight cannot take an update
below its rounding step (2^-8 of its size: lr 5e-7 moves nothing). Either way the forward
runs under bf16 autocast. float16 and float32 run in the weights' own dtype (fp16 autocast
would need loss scaling). On the CPU everything is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import models
from .config import ConfigError, RunConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    weight_dtype: torch.dtype  # what the trainable model's weights are loaded in
    autocast_dtype: torch.dtype | None  # what the forward computes in under torch.autocast; None: off
    attention: str | None  # every model's attention implementation; None: transformers' choice
    full_finetuning: bool  # model.lora_r == 0: frozen roles are whole model copies

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype frozen roles are held in: the autocast dtype, else the weights'."""
        return self.autocast_dtype or self.weight_dtype

    @property
    def autocast_name(self) -> str | None:
        return str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype is not None else None


def resolve_runtime(config: RunConfig) -> Runtime:
    """The run's device, dtypes and attention; raises ConfigError naming the model.* key at fault."""
    device = config.model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"model.device must be auto, cpu, cuda or cuda:N, got {config.model.device!r}") from None
    full = config.model.lora_r == 0
    if config.model.dtype == "auto":
        weight_dtype = torch.bfloat16 if device.type == "cuda" and not full else torch.float32
    elif config.model.dtype in DTYPES:
        weight_dtype = DTYPES[config.model.dtype]
    else:
        raise ConfigError(f"model.dtype must be one of {['auto', *DTYPES]}, got {config.model.dtype!r}")
    on_gpu_bf16 = device.type == "cuda" and config.model.dtype in ("auto", "bfloat16")
    autocast = torch.bfloat16 if on_gpu_bf16 else None
    half_precision = autocast is not None or weight_dtype in (torch.float16, torch.bfloat16)
    try:
        attention = models.attention_implementation(
            config.model.attention, device, half_precision=half_precision, model_path=config.model.path or None
        )
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"model.{error}") from None
    return Runtime(device, weight_dtype, autocast, attention, full)
