"""Compile every Triton kernel for real GPUs on a machine without one.

    python bench/compile_check.py                      # sm_80, sm_86, sm_89, sm_90; bf16 and fp32
    python bench/compile_check.py --arch 90 --json out.json

The interpreter (what CI runs) checks numerics but not that a kernel compiles: it accepts
shapes, dtypes and keyword arguments the compiler rejects, and it says nothing about
shared memory or registers. This script calls the real launchers (`logprobs_forward`,
`logprobs_backward`, `spa_pair_loss`) with the GPU launch configuration on small CPU
tensors, intercepts each kernel launch, and compiles exactly that launch ahead of time
with `triton.compile` for each target architecture, down to a cubin with the ptxas
Triton ships. Per compiled kernel it reports shared memory (against the card's opt-in
limit), registers per thread and spilled bytes (from `ptxas -v`).

Exit status 1 when a kernel fails to compile or needs more shared memory than its card
has. Spills are reported, not failed: they cost speed, not correctness.

Must run with TRITON_INTERPRET unset or 0 (it is forced to 0 here, before the kernels
are imported): interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice; 1 is the old default

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from selfee_fast.kernels.config import LaunchConfig, gpu_config
from selfee_fast.kernels.logprobs_backward import logit_gradients, logprobs_backward
from selfee_fast.kernels.logprobs_forward import logprobs_forward
from selfee_fast.kernels.spa_loss import LOSS_TYPE_INFO, LOSS_TYPES, spa_pair_loss

# Opt-in shared memory per block (bytes), CUDA programming guide, "compute capabilities".
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
CARDS = {80: "A100", 86: "RTX 3090 / A6000", 89: "RTX 4090 / L4 / L40S", 90: "H100 / H200"}

TORCH_TO_TRITON = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int8: "i8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "i1",
}


@dataclass
class Launch:
    scenario: str
    kernel: JITFunction
    args: tuple
    kwargs: dict


@dataclass
class CompileResult:
    scenario: str
    kernel: str
    arch: int
    ok: bool
    seconds: float
    shared_bytes: int | None = None
    shared_limit: int | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    error: str | None = None

    @property
    def fits(self) -> bool:
        return self.ok and self.shared_bytes is not None and self.shared_bytes <= self.shared_limit


@contextmanager
def intercepted_launches(scenario: str, sink: list[Launch]) -> Iterator[None]:
    """Record `kernel[grid](...)` calls instead of running them."""
    real_run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        sink.append(Launch(scenario, self, args, kwargs))

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = real_run


def signature_of(launch: Launch) -> tuple[dict[str, str], dict[str, object], dict, dict[str, int]]:
    """Triton signature, constexprs, attributes and compile options of one recorded launch.

    The attributes mimic the JIT's specialisation: pointers to 16-byte aligned storage and
    integers divisible by 16 are marked so. Without them nothing is vectorised and the
    pipeliner (cp.async needs >= 4-byte copies) leaves every loop unpipelined.
    """
    fn = launch.kernel
    values = dict(zip(fn.arg_names, launch.args, strict=False))
    options = {}
    for key, value in launch.kwargs.items():
        if key in fn.arg_names:
            values[key] = value
        else:
            options[key] = value  # num_warps, num_stages
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TORCH_TO_TRITON[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and not getattr(param, "do_not_specialize", False):
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {param.name}={value!r}")
    return signature, constexprs, attrs, options


def ptxas_report(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers per thread, spill store bytes) from `ptxas -v`, or (None, None) if unavailable."""
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "kernel.ptx")
        source.write_text(ptx)
        done = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", str(source), "-o", str(Path(tmp, "k.o"))],
            capture_output=True,
            text=True,
        )
    text = done.stdout + done.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    return (int(registers.group(1)) if registers else None, int(spills.group(1)) if spills else None)


def compile_launch(launch: Launch, arch: int) -> CompileResult:
    name = launch.kernel.__name__
    start = time.perf_counter()
    try:
        signature, constexprs, attrs, options = signature_of(launch)
        source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as error:
        message = f"{type(error).__name__}: {error}".strip().splitlines()
        return CompileResult(
            launch.scenario, name, arch, False, time.perf_counter() - start, error=" | ".join(message[-6:])[:2000]
        )
    registers, spills = ptxas_report(compiled.asm["ptx"], arch)
    return CompileResult(
        launch.scenario,
        name,
        arch,
        True,
        time.perf_counter() - start,
        shared_bytes=int(compiled.metadata.shared),
        shared_limit=SHARED_MEMORY_LIMIT[arch],
        registers=registers,
        spill_bytes=spills,
    )


def scenarios(dtype: torch.dtype, config: LaunchConfig) -> list[tuple[str, Callable[[], object]]]:
    """Each GPU launch the library makes, on tiny CPU tensors (nothing runs; shapes only type the call)."""
    tag = TORCH_TO_TRITON[dtype]
    # Real heads have H and V divisible by 16 (4096 x 32000, 128256, 151936, ...), and the
    # compiler's vectorisation depends on it; the row count is deliberately odd.
    rows, vocab, hidden_size = 37, 1008, 128
    hidden = torch.randn(rows, hidden_size, dtype=dtype)
    weight = torch.randn(vocab, hidden_size, dtype=dtype)
    bias = torch.randn(vocab, dtype=dtype)
    active = torch.arange(rows, dtype=torch.int32)
    targets = torch.randint(0, vocab, (rows,), dtype=torch.int32)
    stat = torch.zeros(rows)
    single = config.with_overrides(splits=1)
    split = config.with_overrides(splits=4)

    def backward(with_bias: bool, chosen_config: LaunchConfig, want_weight: bool) -> None:
        logprobs_backward(
            hidden, weight, active, targets, stat, stat, stat,
            bias=bias if with_bias else None,
            grad_hidden=torch.zeros(rows, hidden_size),
            grad_weight=torch.zeros(vocab, hidden_size) if want_weight else None,
            grad_bias=torch.zeros(vocab) if (want_weight and with_bias) else None,
            config=chosen_config,
        )  # fmt: skip

    def forward_policy() -> None:
        logprobs_forward(hidden, weight, active, targets, config=split)

    def forward_shared_head() -> None:
        logprobs_forward(hidden, weight, active, targets, ref_hidden=hidden.clone(), extrapolate=0.5, config=split)

    def forward_separate_head() -> None:
        logprobs_forward(
            hidden, weight, active, targets, bias=bias,
            ref_hidden=hidden.clone(), ref_weight=weight.clone(), ref_bias=bias.clone(), extrapolate=0.5,
            config=split,
        )  # fmt: skip

    def loss(loss_type: str, per_pair_smoothing: bool = False) -> None:
        offsets = torch.tensor([0, 10, 20, 30, rows], dtype=torch.int32)
        smoothing = LOSS_TYPE_INFO[loss_type].smoothing
        label_smoothing = 0.1 if smoothing == "required" else 0.0
        spa_pair_loss(
            stat, stat if LOSS_TYPE_INFO[loss_type].takes_reference else None, stat, active, offsets,
            beta=0.1, alpha=0.1 if smoothing == "optional" else 0.0, tau=0.5,
            label_smoothing=torch.full((2,), 0.1) if per_pair_smoothing else label_smoothing, loss_type=loss_type,
            average_log_prob=False,
        )  # fmt: skip

    return [
        (f"forward policy {tag}", forward_policy),
        (f"forward shared head + extrapolated {tag}", forward_shared_head),
        (f"forward separate head, biases {tag}", forward_separate_head),
        (f"backward frozen head, deterministic {tag}", lambda: backward(False, single, False)),
        (f"backward frozen head, vocab splits {tag}", lambda: backward(False, split, False)),
        (f"backward trainable head + bias, vocab splits {tag}", lambda: backward(True, split, True)),
        (
            f"split backward: dz of a row chunk {tag}",
            lambda: logit_gradients(hidden, weight, active, targets, stat, stat, 3, rows, bias=bias, config=config),
        ),
        # Each loss type is its own compiled branch (LOSS is a constexpr).
        *((f"spa loss {loss_type}", lambda loss_type=loss_type: loss(loss_type)) for loss_type in LOSS_TYPES),
        # Each pair's own smoothing (spa.judge_consistency=smooth) is a constexpr branch of its own too.
        ("spa loss sigmoid, per-pair smoothing", lambda: loss("sigmoid", per_pair_smoothing=True)),
    ]


def collect_launches(dtypes: list[torch.dtype], overrides: dict[str, int | None]) -> list[Launch]:
    """Every launch the library makes for these input dtypes, with its GPU default config (plus overrides)."""
    launches: list[Launch] = []
    seen_losses: set[str] = set()
    for dtype in dtypes:
        for name, call in scenarios(dtype, gpu_config(dtype).with_overrides(**overrides)):
            if name.startswith("spa loss"):  # fp32 log-probs whatever the input dtype: once is enough
                if name in seen_losses:
                    continue
                seen_losses.add(name)
            with intercepted_launches(name, launches):
                call()
    return launches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_MEMORY_LIMIT), help="repeatable")
    parser.add_argument("--dtype", action="append", choices=["bf16", "fp32"], help="repeatable; default both")
    parser.add_argument("--json", type=Path, help="also write the results here")
    for field in ("block_m", "block_v", "block_k", "num_warps", "num_stages"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, help="override the library's GPU default")
    args = parser.parse_args(argv)
    arches = args.arch or sorted(SHARED_MEMORY_LIMIT)
    dtypes = [{"bf16": torch.bfloat16, "fp32": torch.float32}[d] for d in (args.dtype or ["bf16", "fp32"])]
    overrides = {f: getattr(args, f) for f in ("block_m", "block_v", "block_k", "num_warps", "num_stages")}
    configs = {TORCH_TO_TRITON[d]: gpu_config(d).with_overrides(**overrides) for d in dtypes}

    launches = collect_launches(dtypes, overrides)
    print(f"triton {triton.__version__}, torch {torch.__version__}")
    for tag, config in configs.items():
        print(f"{tag}: {config}")
    print(f"{len(launches)} launches x {len(arches)} architectures")
    results = []
    for arch in arches:
        for launch in launches:
            result = compile_launch(launch, arch)
            results.append(result)
            if not result.ok:
                status = "FAIL"
            elif not result.fits:
                status = "SMEM"
            else:
                status = "ok  "
            detail = (
                f"smem {result.shared_bytes / 1024:6.1f}/{result.shared_limit / 1024:.0f} KiB  "
                f"regs {result.registers}  spills {result.spill_bytes} B"
                if result.ok
                else result.error
            )
            print(f"{status} sm_{arch} {result.scenario:45s} {result.kernel:28s} {result.seconds:5.1f}s  {detail}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "triton": triton.__version__,
            "configs": {tag: asdict(config) for tag, config in configs.items()},
            "cards": {str(a): CARDS[a] for a in arches},
            "results": [asdict(r) | {"fits": r.fits} for r in results],
        }
        args.json.write_text(json.dumps(report, indent=2))
    failures = [r for r in results if not r.fits]
    print(f"{len(results) - len(failures)} compiled and fit, {len(failures)} failed or overflowed shared memory")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
