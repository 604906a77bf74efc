"""Forward+backward time, peak extra memory and accuracy of per-token log-prob implementations.

One run measures, side by side on the same inputs (frozen LM head, reference sharing it):

task "logprobs" -- policy log-probs with a gradient w.r.t. hidden, plus reference log-probs:
    naive          log_softmax(h @ W.T) gathered, reference under no_grad (materialised logits)
    ours-torch     selfee_fast.linear_logprobs(backend="torch") (chunked PyTorch)
    ours-triton    selfee_fast.linear_logprobs(backend="triton") (CUDA only)
    ours-triton-split  the same with SELFEE_FAST_TRITON_BACKWARD=split (dz per row chunk, then cuBLAS)
    cce            cut_cross_entropy.linear_cross_entropy twice (policy, reference under no_grad)
task "dpo" -- the whole sigmoid DPO loss from x [2B, T, H]:
    naive-dpo      materialised logits + DPO loss in PyTorch
    ours-dpo-*     selfee_fast.FusedLinearDPOLoss (backend "torch" / "triton")
    liger-dpo      liger_kernel.chunked_loss.LigerFusedLinearDPOLoss
tasks "simpo", "cpo", "orpo" -- the reference-free losses from x [2B, T, H], each class at its
    defaults (NLL term included):
    ours-<task>-torch  selfee_fast.FusedLinear{SimPO,CPO,ORPO}Loss (chunked PyTorch)
    liger-<task>       liger_kernel.chunked_loss.LigerFusedLinear{SimPO,CPO,ORPO}Loss

Every number in the output comes from this run: the matmul rate that defines the
6·M·H·V floor is measured on the same device right before the implementations.

    python bench/bench_kernels.py                      # CPU defaults, small shapes
    python bench/bench_kernels.py --device cuda        # M=8192, H=4096, V in {32000, 128256}, bf16
    python bench/bench_kernels.py --shapes 4096,4096,32000 --dtype bf16 --repeats 5 --out /tmp/res
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import selfee_fast as sf
from selfee_fast import rss

IGNORE_INDEX = -100
BETA = 0.1
LOGIT_SCALE = 3.0  # std of the logits: LM heads give peaked, not uniform, distributions
REF_NOISE = 0.1  # the reference's hidden states differ a little from the policy's
GRAD_CHECK_ROWS = 256  # rows whose input gradient is compared with float64 (cost: their share of V)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Llama-3's vocabulary first: if the time budget cuts the run short, the shape the issue cares
# most about is the one that ran.
GPU_SHAPES = [(8192, 4096, 128256), (8192, 4096, 32000)]
# V large enough that the chunked path really chunks (its 32 MiB budget holds 131 rows of V=32000).
CPU_SHAPES = [(256, 128, 32000)]
GPU_QUICK_SHAPES = [(8192, 4096, 32000)]
CPU_QUICK_SHAPES = [(256, 128, 4096)]

# task: (our class, Liger's class, whether its sequence log-probs are averages over tokens)
PAIR_TASKS = {
    "simpo": ("FusedLinearSimPOLoss", "LigerFusedLinearSimPOLoss", True),
    "cpo": ("FusedLinearCPOLoss", "LigerFusedLinearCPOLoss", False),
    "orpo": ("FusedLinearORPOLoss", "LigerFusedLinearORPOLoss", True),
}
OURS = ("ours-torch", "ours-triton", "ours-triton-split", "ours-dpo-torch", "ours-dpo-triton",
        *(f"ours-{task}-torch" for task in PAIR_TASKS))  # fmt: skip
TASKS = ("logprobs", "dpo", *PAIR_TASKS)


# --------------------------------------------------------------------------- arguments


def parse_args(argv=None) -> argparse.Namespace:
    # `selfee-fast bench` runs this script and names itself here, so that its usage line shows the
    # command the user typed; run directly, argparse names the script as usual.
    p = argparse.ArgumentParser(
        prog=os.environ.get("SELFEE_FAST_PROG"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", nargs="+", metavar="M,H,V", help="token rows, hidden size, vocabulary (several allowed)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="input dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument(
        "--repeats", type=int, help="timed runs per implementation, median reported (default 10 cuda, 3 cpu)"
    )
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="folder for JSON and MD")
    p.add_argument("--quick", action="store_true", help="one small shape and 2 repeats: a smoke test of the script")
    p.add_argument("--impls", nargs="+", help="run only these implementations (names as in the table)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, help="start no shape but the first after this many seconds")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    gpu = args.device == "cuda"
    if args.shapes:
        args.shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
        if any(len(s) != 3 or min(s) < 1 for s in args.shapes):
            p.error("--shapes takes M,H,V triples of positive integers")
    elif args.quick:
        args.shapes = GPU_QUICK_SHAPES if gpu else CPU_QUICK_SHAPES
    else:
        args.shapes = GPU_SHAPES if gpu else CPU_SHAPES
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.repeats = args.repeats or (2 if args.quick else 10 if gpu else 3)
    return args


# --------------------------------------------------------------------------- timing and memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds one call takes (CUDA events on the GPU, so queued work is counted) and its result."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, result
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def set_cpu_malloc_mode(device: torch.device, mode: str) -> None:
    """Steer glibc's malloc on the CPU so that RSS tells the truth when it must.

    "measure-memory": every block of 1 MiB or more gets its own mapping, returned to the OS
    on free. Otherwise glibc serves big tensors from its heap after a large free and keeps
    freed memory resident: RSS would not fall after a free, and one implementation's peak
    could hide in memory that the previous one left behind.
    "time": 32 MiB, the ceiling glibc's own adaptive threshold reaches, so the timed runs see
    the steady state of a default process (recycled heap memory, no page faults for the
    chunk-sized buffers) rather than a fresh mapping per tensor.
    Setting either turns glibc's adaptation off; both are no-ops off glibc.
    """
    if device.type == "cpu":
        rss.map_big_blocks_alone(1 << 20 if mode == "measure-memory" else 32 << 20)


def memory_start(device: torch.device, cpu_rss_ok: bool) -> int | None:
    """Reset the peak counter; return the bytes in use now (None: cannot be measured)."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if not cpu_rss_ok:
        return None
    return rss.reset_peak()


def memory_peak(device: torch.device, start: int | None) -> int | None:
    """Peak bytes in use since memory_start, above what was in use then."""
    if start is None:
        return None
    if device.type == "cuda":
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    return rss.peak() - start


def measure_matmul_rate(m: int, h: int, v: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """FLOP/s of the policy logits matmul [M, H] @ [H, V] in the benchmark's dtype (best of repeats)."""
    a = torch.randn(m, h, dtype=dtype, device=device)
    w = torch.randn(v, h, dtype=dtype, device=device)
    out = torch.empty(m, v, dtype=dtype, device=device)
    torch.matmul(a, w.T, out=out)  # warm-up: cuBLAS heuristics, CPU thread pool
    best = min(time_call(lambda: torch.matmul(a, w.T, out=out), device)[0] for _ in range(max(3, repeats)))
    return 2.0 * m * h * v / best


# --------------------------------------------------------------------------- inputs and float64 truth


@dataclass
class Inputs:
    hidden: torch.Tensor  # [M, H] leaf, requires grad
    ref_hidden: torch.Tensor  # [M, H]
    weight: torch.Tensor  # [V, H], frozen
    targets: torch.Tensor  # [M]
    seq_len: int  # T of the DPO view [2B, T]; 0: M cannot be split into pairs


def dpo_seq_len(m: int) -> int:
    """The longest of 1024, 512, ... so that M = 2B·T with B >= 1 (Liger chunks one pair at a time)."""
    for t in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if m % (2 * t) == 0:
            return t
    return 0


def make_inputs(m: int, h: int, v: int, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    # Drawn on the device itself: a 128256 x 4096 head takes seconds to draw on the host.
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    hidden = randn(m, h)
    ref_hidden = hidden + REF_NOISE * randn(m, h)
    weight = randn(v, h).mul_(LOGIT_SCALE / math.sqrt(h))
    targets = torch.randint(0, v, (m,), generator=gen, device=device)
    return Inputs(
        hidden=hidden.to(dtype).requires_grad_(True),
        ref_hidden=ref_hidden.to(dtype),
        weight=weight.to(dtype),
        targets=targets,
        seq_len=dpo_seq_len(m),
    )


@dataclass
class Truth:
    policy: torch.Tensor  # [M] float64 per-token log-probs
    reference: torch.Tensor  # [M]
    grad_rows: torch.Tensor  # [R] rows whose input gradient is checked
    grad_logprobs: torch.Tensor  # [R, H] d sum(policy) / d hidden, float64
    grad_dpo: torch.Tensor | None  # [R, H] d DPO loss / d hidden, float64
    seq_policy: torch.Tensor | None  # [2B] per-sequence sums of policy log-probs
    dpo_loss: float | None
    grad_pair: dict[str, torch.Tensor] = field(default_factory=dict)  # task -> [R, H] d loss / d hidden
    pair_loss: dict[str, float] = field(default_factory=dict)


def float64_truth(inp: Inputs, max_rows: int = GRAD_CHECK_ROWS) -> Truth:
    """Per-token log-probs and input gradients in float64 from the very same (rounded) inputs."""
    m = inp.hidden.shape[0]
    w = inp.weight.double()
    tgt = inp.targets
    policy = torch.empty(m, dtype=torch.float64, device=w.device)
    reference = torch.empty_like(policy)
    chunk = max(1, (256 << 20) // (w.shape[0] * 8))  # 256 MiB of float64 logits at a time
    for s in range(0, m, chunk):
        rows = slice(s, min(m, s + chunk))
        for src, dst in ((inp.hidden, policy), (inp.ref_hidden, reference)):
            logp = torch.log_softmax(src.detach()[rows].double() @ w.T, dim=1)
            dst[rows] = logp.gather(1, tgt[rows, None]).squeeze(1)
            del logp

    gen = torch.Generator(device="cpu").manual_seed(1)
    grad_rows = torch.randperm(m, generator=gen)[: min(m, max_rows)].sort().values.to(w.device)
    probs = torch.softmax(inp.hidden.detach()[grad_rows].double() @ w.T, dim=1)
    probs[torch.arange(len(grad_rows), device=w.device), tgt[grad_rows]] -= 1.0
    grad_logprobs = -(probs @ w)  # d logp / d h = W[y] - p @ W
    del probs

    grad_dpo = seq_policy = dpo_loss = None
    if inp.seq_len:
        num_seqs = m // inp.seq_len
        pairs = num_seqs // 2
        seq_policy = policy.view(num_seqs, -1).sum(1)
        seq_ref = reference.view(num_seqs, -1).sum(1)
        margin = BETA * ((seq_policy[:pairs] - seq_ref[:pairs]) - (seq_policy[pairs:] - seq_ref[pairs:]))
        dpo_loss = float(-F.logsigmoid(margin).mean())
        # d loss / d logp of each sequence: -beta·sigmoid(-margin)/P for chosen, the opposite for rejected.
        coef = -BETA * torch.sigmoid(-margin) / pairs
        per_seq = torch.cat([coef, -coef])
        grad_dpo = per_seq[grad_rows // inp.seq_len, None] * grad_logprobs
    truth = Truth(policy, reference, grad_rows, grad_logprobs, grad_dpo, seq_policy, dpo_loss)
    if inp.seq_len:
        for task in PAIR_TASKS:
            loss, per_seq = pair_loss_float64(task, seq_policy, inp.seq_len)
            truth.pair_loss[task] = loss
            truth.grad_pair[task] = per_seq[grad_rows // inp.seq_len, None] * grad_logprobs
    return truth


def pair_loss_float64(task: str, seq_policy: torch.Tensor, seq_len: int) -> tuple[float, torch.Tensor]:
    """The class's loss at its defaults (every token counts) and d loss / d sequence log-prob sum."""
    sums = seq_policy.detach().clone().requires_grad_(True)
    pairs = sums.shape[0] // 2
    logps = sums / seq_len if PAIR_TASKS[task][2] else sums
    chosen, rejected = logps[:pairs], logps[pairs:]
    if task == "simpo":  # beta 0.1, gamma 0.5
        preference = -F.logsigmoid(0.1 * (chosen - rejected) - 0.5).mean()
    elif task == "cpo":  # beta 0.1
        preference = -F.logsigmoid(0.1 * (chosen - rejected)).mean()
    else:  # orpo, beta 0.1
        log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
        preference = -0.1 * F.logsigmoid(log_odds).mean()
    nll = -sums[:pairs].sum() / (pairs * seq_len)  # weight 1: alpha's default, ORPO's fixed weight
    loss = preference + nll
    (per_seq,) = torch.autograd.grad(loss, sums)
    return float(loss), per_seq


# --------------------------------------------------------------------------- implementations
#
# Each returns a dict of detached outputs; the gradient lands in inp.hidden.grad.


def run_naive(inp: Inputs) -> dict:
    tgt = inp.targets[:, None]
    # Logits in the input dtype (what the LM head matmul gives), softmax in fp32 as HF models do.
    policy = torch.log_softmax((inp.hidden @ inp.weight.T).float(), dim=1).gather(1, tgt).squeeze(1)
    with torch.no_grad():
        reference = torch.log_softmax((inp.ref_hidden @ inp.weight.T).float(), dim=1).gather(1, tgt).squeeze(1)
    policy.sum().backward()
    return {"policy": policy.detach(), "reference": reference}


def run_ours(inp: Inputs, backend: str) -> dict:
    out = sf.linear_logprobs(inp.hidden, inp.weight, inp.targets, ref_hidden=inp.ref_hidden, backend=backend)
    out.policy.sum().backward()
    return {"policy": out.policy.detach(), "reference": out.reference}


def run_ours_split(inp: Inputs) -> dict:
    """ours-triton with the split backward: dz per chunk of rows (Triton), then dz @ W (cuBLAS)."""
    os.environ["SELFEE_FAST_TRITON_BACKWARD"] = "split"
    try:
        return run_ours(inp, "triton")
    finally:
        os.environ.pop("SELFEE_FAST_TRITON_BACKWARD")


def run_cce(inp: Inputs, lce) -> dict:
    # reduction="none" gives the per-token cross-entropy, i.e. minus the log-prob.
    policy = -lce(inp.hidden, inp.weight, inp.targets, reduction="none")
    with torch.no_grad():
        reference = -lce(inp.ref_hidden, inp.weight, inp.targets, reduction="none")
    policy.sum().backward()
    return {"policy": policy.detach().float(), "reference": reference.float()}


def dpo_view(inp: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h = inp.hidden.shape[1]
    return (
        inp.hidden.view(-1, inp.seq_len, h),
        inp.ref_hidden.view(-1, inp.seq_len, h),
        inp.targets.view(-1, inp.seq_len),
    )


def run_naive_dpo(inp: Inputs) -> dict:
    x, ref_x, target = dpo_view(inp)
    tgt = target[..., None]
    policy = torch.log_softmax((x @ inp.weight.T).float(), dim=-1).gather(-1, tgt).squeeze(-1).sum(-1)
    with torch.no_grad():
        reference = torch.log_softmax((ref_x @ inp.weight.T).float(), dim=-1).gather(-1, tgt).squeeze(-1).sum(-1)
    pairs = policy.shape[0] // 2
    margin = BETA * ((policy[:pairs] - reference[:pairs]) - (policy[pairs:] - reference[pairs:]))
    loss = -F.logsigmoid(margin).mean()
    loss.backward()
    return {"loss": loss.detach(), "seq_policy": policy.detach()}


def run_dpo_module(inp: Inputs, loss_fn) -> dict:
    """Ours and Liger share the call: loss_fn(weight, x, target, bias, ref_x, ref_weight) -> (loss, aux)."""
    x, ref_x, target = dpo_view(inp)
    # Liger needs ref_weight spelled out; ours sees the same tensor object and shares the tiles.
    loss, aux = loss_fn(inp.weight, x, target, None, ref_x, inp.weight)
    loss.backward()
    # aux[0], aux[1]: per-sequence policy log-probs of the chosen and rejected halves.
    return {"loss": loss.detach(), "seq_policy": torch.cat([aux[0], aux[1]]).detach().float()}


def run_pair_module(inp: Inputs, loss_fn, averages: bool) -> dict:
    """A reference-free loss: loss_fn(weight, x, target) -> (loss, aux), ours and Liger's alike."""
    x, _, target = dpo_view(inp)
    loss, aux = loss_fn(inp.weight, x, target)
    loss.backward()
    seq_policy = torch.cat([aux[0], aux[1]]).detach().float()
    # Every token counts in these inputs, so an average times the length is the sum.
    return {"loss": loss.detach(), "seq_policy": seq_policy * inp.seq_len if averages else seq_policy}


@dataclass
class Impl:
    name: str
    task: str  # one of TASKS
    fn: Callable[[Inputs], dict] | None
    note: str = ""  # why it cannot run, when fn is None


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_impls(device: torch.device, dpo_ok: bool) -> list[Impl]:
    gpu = device.type == "cuda"
    impls = [
        Impl("naive", "logprobs", run_naive),
        Impl("ours-torch", "logprobs", lambda inp: run_ours(inp, "torch")),
        Impl("ours-triton", "logprobs", (lambda inp: run_ours(inp, "triton")) if gpu else None, "CUDA only"),
        Impl("ours-triton-split", "logprobs", (lambda inp: run_ours_split(inp)) if gpu else None, "CUDA only"),
    ]
    try:
        from cut_cross_entropy import linear_cross_entropy

        # CCE's "cce" implementation is Triton-on-CUDA; its CPU fallback is torch.compile of the naive code.
        impls.append(Impl("cce", "logprobs", (lambda inp: run_cce(inp, linear_cross_entropy)) if gpu else None,
                          "CUDA only"))  # fmt: skip
    except Exception as exc:  # ImportError, or a broken install failing at import
        impls.append(Impl("cce", "logprobs", None, _import_note(exc)))

    if not dpo_ok:
        return impls
    impls.append(Impl("naive-dpo", "dpo", run_naive_dpo))
    ours_torch = sf.FusedLinearDPOLoss(beta=BETA, backend="torch")
    impls.append(Impl("ours-dpo-torch", "dpo", lambda inp: run_dpo_module(inp, ours_torch)))
    ours_triton = sf.FusedLinearDPOLoss(beta=BETA, backend="triton") if gpu else None
    impls.append(Impl("ours-dpo-triton", "dpo", (lambda inp: run_dpo_module(inp, ours_triton)) if gpu else None,
                      "CUDA only"))  # fmt: skip
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        # Liger compiles its per-chunk step by default; Inductor on the CPU needs a C++ toolchain
        # and minutes, so the CPU run measures it eager.
        liger = LigerFusedLinearDPOLoss(beta=BETA, compiled=gpu)
        impls.append(Impl("liger-dpo", "dpo", lambda inp: run_dpo_module(inp, liger)))
    except Exception as exc:
        impls.append(Impl("liger-dpo", "dpo", None, _import_note(exc)))
    for task, (ours_name, liger_name, averages) in PAIR_TASKS.items():
        ours_fn = getattr(sf, ours_name)(backend="torch")
        impls.append(Impl(f"ours-{task}-torch", task, lambda inp, f=ours_fn, a=averages: run_pair_module(inp, f, a)))
        try:
            liger_fn = getattr(importlib.import_module("liger_kernel.chunked_loss"), liger_name)(compiled=gpu)
            impls.append(Impl(f"liger-{task}", task, lambda inp, f=liger_fn, a=averages: run_pair_module(inp, f, a)))
        except Exception as exc:
            impls.append(Impl(f"liger-{task}", task, None, _import_note(exc)))
    return impls


def _import_note(exc: Exception) -> str:
    if isinstance(exc, ModuleNotFoundError):
        return "not installed"
    return f"import failed: {type(exc).__name__}: {str(exc)[:120]}"


# --------------------------------------------------------------------------- one measurement


@dataclass
class Row:
    impl: str
    task: str
    status: str  # "ok", "OOM", "not installed", "CUDA only", "error: ..."
    time_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    vs_best_peer: float | None = None  # time / fastest non-selfee_fast implementation of the task
    vs_floor: float | None = None  # time / (6·M·H·V at the measured matmul rate)
    tflops_6mhv: float | None = None  # 6·M·H·V / time
    peak_extra_mib: float | None = None
    logp_max_abs_err: float | None = None  # per token (logprobs) or per sequence (dpo)
    ref_logp_max_abs_err: float | None = None
    grad_rel_err: float | None = None  # max |g - g64| / max |g64| over the checked rows
    loss: float | None = None


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom_type) or "out of memory" in str(exc).lower()


def free_memory(inp: Inputs, device: torch.device, *, empty_cache: bool = True) -> None:
    """Drop the gradient and garbage; `empty_cache` also hands cached blocks back to the driver
    (for peak-memory readings, not before timed runs: a training loop's allocator is warm)."""
    inp.hidden.grad = None
    gc.collect()
    if empty_cache and device.type == "cuda":
        torch.cuda.empty_cache()


def fail_status(exc: BaseException) -> str:
    return "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def prepare(impl: Impl, inp: Inputs, truth: Truth, device: torch.device, cpu_rss_ok: bool) -> tuple[Row, float]:
    """Warm up, then one run for peak memory and accuracy. Returns the row and the last warm-up's seconds."""
    row = Row(impl.name, impl.task, "ok")
    if impl.fn is None:
        row.status = impl.note
        return row, 0.0
    m, h = inp.hidden.shape
    # What any implementation must hold at the end: the input gradient and two fp32 log-prob vectors.
    unavoidable = m * h * inp.hidden.element_size() + 2 * m * 4
    seconds = 0.0
    try:
        # Warm-up: Triton compiles, Liger's torch.compile traces, cuBLAS picks kernels.
        for _ in range(2 if device.type == "cuda" else 1):
            free_memory(inp, device)
            seconds, outputs = time_call(lambda: impl.fn(inp), device)
            del outputs
        free_memory(inp, device)
        start = memory_start(device, cpu_rss_ok)
        outputs = impl.fn(inp)
        peak = memory_peak(device, start)
        row.peak_extra_mib = None if peak is None else max(0, peak - unavoidable) / 2**20
        check_accuracy(row, outputs, inp, truth)
        del outputs
    except Exception as exc:
        row.status = fail_status(exc)
    finally:
        free_memory(inp, device)
    return row, seconds


def time_round_robin(
    impls: list[Impl], rows: list[Row], warm_seconds: list[float], inp: Inputs, device: torch.device, repeats: int
) -> None:
    """Timed runs, one implementation after the other per round.

    Interleaving spreads any drift of the machine (clocks, other processes on a shared CPU)
    over all implementations instead of charging it to whichever ran during it.
    """
    live = [i for i, r in enumerate(rows) if r.status == "ok"]
    # A slow implementation (e.g. the fp32 chunked path on a GPU) gets at most 3 runs.
    runs = {i: repeats if warm_seconds[i] * repeats < 60 else max(1, min(repeats, 3)) for i in live}
    for round_index in range(repeats):
        for i in live:
            if round_index >= runs[i] or rows[i].status != "ok":
                continue
            try:
                free_memory(inp, device, empty_cache=False)
                seconds, outputs = time_call(lambda i=i: impls[i].fn(inp), device)
                del outputs
                rows[i].times_ms.append(seconds * 1e3)
            except Exception as exc:
                rows[i].status = fail_status(exc)
            finally:
                free_memory(inp, device, empty_cache=False)
    for r in rows:
        r.time_ms = statistics.median(r.times_ms) if r.status == "ok" and r.times_ms else None


def check_accuracy(row: Row, outputs: dict, inp: Inputs, truth: Truth) -> None:
    grad = inp.hidden.grad
    if row.task == "logprobs":
        row.logp_max_abs_err = float((outputs["policy"].double() - truth.policy).abs().max())
        row.ref_logp_max_abs_err = float((outputs["reference"].double() - truth.reference).abs().max())
        want = truth.grad_logprobs
    else:
        row.logp_max_abs_err = float((outputs["seq_policy"].double() - truth.seq_policy).abs().max())
        row.loss = float(outputs["loss"])
        want = truth.grad_dpo if row.task == "dpo" else truth.grad_pair[row.task]
    if grad is not None:
        got = grad[truth.grad_rows].double()
        row.grad_rel_err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


# --------------------------------------------------------------------------- driver and report


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        return found.group(1).strip() if found else platform.machine()
    except OSError:
        return platform.machine()


def environment(device: torch.device, args: argparse.Namespace) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "selfee_fast": sf.__version__,
        "liger_kernel": package_version("liger-kernel") or package_version("liger_kernel"),
        "cut_cross_entropy": package_version("cut-cross-entropy") or package_version("cut_cross_entropy"),
        "device": device.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "argv": sys.argv[1:],
        # Other processes on a shared machine skew timings; the load says whether there were any.
        "loadavg_at_start": os.getloadavg(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
    return env


def bench_shape(shape, args, device, cpu_rss_ok) -> dict:
    m, h, v = shape
    dtype = DTYPES[args.dtype]
    rate = measure_matmul_rate(m, h, v, dtype, device, args.repeats)
    floor_s = 6.0 * m * h * v / rate
    print(f"\n== M={m} H={h} V={v} {args.dtype}: matmul {rate / 1e12:.3g} TFLOP/s, 6MHV floor {floor_s * 1e3:.2f} ms")

    inp = make_inputs(m, h, v, dtype, device, args.seed)
    truth = float64_truth(inp)
    impls = [i for i in collect_impls(device, dpo_ok=inp.seq_len > 0) if not args.impls or i.name in args.impls]
    rows, warm_seconds = [], []
    set_cpu_malloc_mode(device, "measure-memory")
    for impl in impls:
        row, seconds = prepare(impl, inp, truth, device, cpu_rss_ok)
        print(f"  prepared {row.impl:16s} {row.status}", flush=True)
        rows.append(row)
        warm_seconds.append(seconds)
    set_cpu_malloc_mode(device, "time")
    time_round_robin(impls, rows, warm_seconds, inp, device, args.repeats)
    for row in rows:
        if row.time_ms is not None:
            row.vs_floor = row.time_ms / (floor_s * 1e3)
            row.tflops_6mhv = 6.0 * m * h * v / (row.time_ms / 1e3) / 1e12
        print(f"  {row.impl:16s} {row.status:14s} " + (f"{row.time_ms:10.2f} ms" if row.time_ms else ""), flush=True)

    for task in TASKS:
        peer_times = [r.time_ms for r in rows if r.task == task and r.time_ms and r.impl not in OURS]
        for r in rows:
            if r.task == task and r.time_ms and peer_times:
                r.vs_best_peer = r.time_ms / min(peer_times)
    seq_len = inp.seq_len
    del inp, truth
    gc.collect()
    return {
        "M": m,
        "H": h,
        "V": v,
        "dtype": args.dtype,
        "dpo_shape": f"[{m // seq_len}, {seq_len}, {h}]" if seq_len else "none (M odd)",
        "matmul_tflops": rate / 1e12,
        "floor_ms": floor_s * 1e3,
        "rows": [asdict(r) for r in rows],
    }


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown(env: dict, results: list[dict], cpu_rss_ok: bool) -> str:
    where = env.get("gpu") or f"CPU {env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads)"
    mem_kind = (
        "torch.cuda.max_memory_allocated"
        if env["device"] == "cuda"
        else ("peak RSS (VmHWM) delta" if cpu_rss_ok else "n/a")
    )
    lines = [
        f"# bench_kernels.py on {where}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, liger-kernel {env['liger_kernel'] or 'not installed'}, "
        f"cut-cross-entropy {env['cut_cross_entropy'] or 'not installed'}; dtype {env['dtype']}, "
        f"median of {env['repeats']} runs; frozen head, reference shares it.",
        "",
        "time: forward + backward (policy with input gradient, reference without). "
        "vs peer: time / fastest non-selfee_fast implementation of the same task. "
        "vs floor: time / (6·M·H·V at the matmul rate measured in this run). "
        f"extra MiB: peak memory ({mem_kind}) above the inputs, minus the input gradient and log-prob outputs. "
        "logp err: max abs error vs float64 per token (logprobs) or per sequence sum (dpo); "
        f"grad err: max abs error / max abs value of d/dhidden on {GRAD_CHECK_ROWS} rows.",
        "",
    ]
    for res in results:
        lines += [
            f"## M={res['M']} H={res['H']} V={res['V']} {res['dtype']} (DPO view {res['dpo_shape']})",
            "",
            f"matmul rate {res['matmul_tflops']:.3g} TFLOP/s; 6·M·H·V floor {res['floor_ms']:.2f} ms",
            "",
            "| task | impl | status | time ms | vs peer | vs floor | extra MiB | logp err | ref logp err | grad err |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["rows"]:
            lines.append(
                f"| {r['task']} | {r['impl']} | {r['status']} | {_fmt(r['time_ms'], '.2f')} | "
                f"{_fmt(r['vs_best_peer'], '.2f')} | {_fmt(r['vs_floor'], '.2f')} | "
                f"{_fmt(r['peak_extra_mib'], '.1f')} | {_fmt(r['logp_max_abs_err'], '.2e')} | "
                f"{_fmt(r['ref_logp_max_abs_err'], '.2e')} | {_fmt(r['grad_rel_err'], '.2e')} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    # `timeout` stops a step with SIGTERM: as SystemExit, it still runs the finally blocks that save.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    cpu_rss_ok = device.type == "cpu" and rss.peak_can_be_reset()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"kernels-{device.type}.json", out_dir / f"kernels-{device.type}.md"
    env = environment(device, args)
    results = []
    report = "no shape was run"
    started = time.monotonic()
    for shape in args.shapes:
        if results and args.budget_s is not None and time.monotonic() - started > args.budget_s:
            print(f"\n== M,H,V={shape}: skipped, --budget-s {args.budget_s:.0f} s spent", flush=True)
            continue
        results.append(bench_shape(shape, args, device, cpu_rss_ok))
        # Written after every shape, so a run cut short by a timeout still leaves its numbers.
        report = markdown(env, results, cpu_rss_ok)
        json_path.write_text(json.dumps({"env": env, "results": results}, indent=2))
        md_path.write_text(report + "\n")
    print("\n" + report)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
