"""Launch configuration shared by the log-prob kernels.

Block sizes are the only tuning knobs; `tile_dot` is the one matmul every kernel uses.
The GPU defaults are a first guess for Hopper-class cards with bf16 inputs, not yet tuned
on a GPU (see bench/NOTES.md). `bench/compile_check.py` compiles every kernel with them
for sm_80, sm_86, sm_89 and sm_90 and checks that each fits the card's shared memory;
fp32 inputs halve BLOCK_K for that reason. The interpreter defaults keep the number of
Python-level loop iterations small, which is what dominates interpreter time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int = 64  # token rows per program
    block_v: int = 128  # vocabulary entries per tile
    block_k: int = 64  # hidden-dimension slice per dot product
    num_warps: int = 8
    num_stages: int = 3
    # Programs along the vocabulary (forward, grad-hidden) or token (grad-weight) axis.
    # None picks enough to fill the GPU; 1 is required for bit-for-bit determinism of the
    # backward (no atomics). The forward combines its splits in a fixed order either way.
    splits: int | None = None

    def with_overrides(self, **overrides: int | None) -> LaunchConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


INTERPRETER_CONFIG = LaunchConfig(block_m=16, block_v=64, block_k=32, num_warps=1, num_stages=1)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gpu_config(dtype: torch.dtype) -> LaunchConfig:
    """The compiled kernels' default for inputs of `dtype`.

    Each pipeline stage holds a hidden and a weight tile per head in shared memory. With
    4-byte inputs and BLOCK_K=64, three stages of the separate-head forward need 192 KiB,
    more than an RTX 3090/4090 (99 KiB) or an A100 (163 KiB) has; BLOCK_K=32 needs at
    most 96 KiB on every card (bench/compile_check.py).
    """
    if dtype.itemsize >= 4:
        return LaunchConfig(block_k=32)
    return LaunchConfig()


def default_config(device: torch.device, dtype: torch.dtype) -> LaunchConfig:
    if device.type != "cuda" or interpreting():
        return INTERPRETER_CONFIG
    return gpu_config(dtype)


def number_of_splits(config: LaunchConfig, device: torch.device, outer_programs: int, inner_tiles: int) -> int:
    """Split the inner loop across programs until the grid covers about two waves of SMs."""
    if config.splits is not None:
        return max(1, min(config.splits, inner_tiles))
    if device.type != "cuda" or interpreting():
        return 1
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = -(-2 * sm_count // max(outer_programs, 1))
    return max(1, min(wanted, inner_tiles))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products; TF32 would cost ~3 decimal digits of the log-prob.
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dots() -> bool:
    # Triton 3.9's interpreter returns garbage for bf16/fp16 tl.dot. Upcasting first gives
    # the same numbers a tensor core gives (16-bit products are exact in fp32).
    return interpreting()


@triton.jit
def tile_dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)
