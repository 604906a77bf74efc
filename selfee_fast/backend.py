"""Which implementation runs a call: the Triton kernels or the chunked PyTorch path.

CUDA tensors run the Triton kernels. CPU tensors run the chunked PyTorch path, unless the
Triton interpreter is on (`SELFEE_FAST_TRITON_INTERPRET=1` or Triton's own
`TRITON_INTERPRET=1`), which runs the very same Triton kernels on the CPU — that is how CI
checks kernel numerics without a GPU. `SELFEE_FAST_BACKEND=torch|triton` overrides "auto". The interpreter switch must be set before the kernel
modules are imported; `selfee_fast/__init__.py` forwards ours to Triton's at import time.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]
BACKENDS = ("auto", "triton", "torch")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1" or os.environ.get("SELFEE_FAST_TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(device: torch.device, backend: Backend) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        # SELFEE_FAST_BACKEND pins what "auto" means for a whole process (e.g. "torch" to
        # debug the chunked path on a GPU, or to keep engine tests off the slow interpreter).
        backend = os.environ.get("SELFEE_FAST_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"SELFEE_FAST_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    runnable = triton_available() and (device.type == "cuda" or triton_interpreting())
    if backend == "triton" and not runnable:
        raise ValueError(
            "backend='triton' needs the triton package and CUDA tensors (or SELFEE_FAST_TRITON_INTERPRET=1 "
            f"to interpret the kernels on the CPU); got tensors on {device}"
        )
    return runnable
