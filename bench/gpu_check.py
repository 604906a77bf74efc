"""GPU check of the log-prob kernels: correctness against float64, determinism, a launch-config sweep.

    python bench/gpu_check.py --out DIR          # on a CUDA machine
    python bench/gpu_check.py --cpu-smoke        # tiny shapes, Triton interpreter on the CPU

Correctness: `selfee_fast.linear_logprobs` (backends "triton" and "torch") and
`FusedLinearDPOLoss` on a few odd shapes, fp32 and bf16, a shared or a separate reference
head, lam in {0, 0.5}, frozen or trainable head, against the same formulas evaluated in
float64 from the very same (rounded) inputs; the pair-loss kernel for every loss type (and
each pair's own label smoothing) against its float64 twin on a packed stream of 257 pairs.
Every case prints a PASS or FAIL line.
Determinism: `deterministic=True` must repeat bit for bit.
Sweep: forward and backward Triton kernels timed with a handful of LaunchConfig candidates
at M=8192, H=4096, V=128256 bf16; configs that fail to compile are skipped.

Exit status 1 when any check fails. Results go to DIR/gpu_check-<cuda|cpu-smoke>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100
LOGIT_SCALE = 3.0

# (batch shape of the targets, H, V, bias, hidden given as a strided view)
GPU_SHAPES = [((3, 37), 96, 1000, False, False), ((130,), 200, 3001, True, True), ((2, 64), 1024, 32003, False, False)]
SMOKE_SHAPES = [((2, 5), 24, 70, False, False), ((19,), 40, 130, True, True)]

# Relative error allowed: max |x - x64| / max(1, max |x64|) for log-probs (fp32 accumulation
# either way), max |g - g64| / max |g64| for gradients (returned in the input dtype, so bf16
# gradients carry bf16 rounding).
LOGP_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2}

SWEEP_SHAPE = (8192, 4096, 128256)
# (block_m, block_v, block_k, num_warps, num_stages); the library default comes first.
SWEEP_CANDIDATES = [
    (64, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (64, 256, 64, 8, 3),
    (64, 128, 128, 4, 3),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
]  # (128, 128, 128, 8, 3) is out: with Triton 3.6 it needs more than sm_90's 227 KiB of shared memory
SMOKE_SWEEP_SHAPE = (48, 32, 300)
SMOKE_SWEEP_CANDIDATES = [(16, 64, 32, 1, 1), (32, 32, 32, 1, 1)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="folder for the JSON")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU through the Triton interpreter")
    p.add_argument("--skip-sweep", action="store_true", help="correctness and determinism only")
    p.add_argument("--sweep-shape", metavar="M,H,V", help=f"default {','.join(map(str, SWEEP_SHAPE))}")
    p.add_argument(
        "--check-budget", type=float, default=150.0, help="seconds for the log-prob cases; later ones skipped"
    )
    p.add_argument("--sweep-budget", type=float, default=150.0, help="seconds; later candidates are skipped")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes; CUDA events on the GPU so that queued work is counted."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rel_err(got: torch.Tensor | None, want: torch.Tensor | None, floor: float = 0.0) -> float:
    """max |got - want| / max(floor, max |want|); 0 when both are absent."""
    if got is None and want is None:
        return 0.0
    if got is None or want is None:
        return math.inf
    scale = max(floor, float(want.abs().max()) if want.numel() else 0.0, 1e-300)
    return float((got.double() - want).abs().max()) / scale if want.numel() else 0.0


def error_text(exc: BaseException) -> str:
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first_line[:200]}"


@dataclass
class Check:
    name: str
    passed: bool
    details: dict

    def line(self) -> str:
        shown = " ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in self.details.items())
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}  {shown}"


def report(check: Check, checks: list[Check]) -> None:
    checks.append(check)
    print(check.line(), flush=True)


# --------------------------------------------------------------------------- one log-prob case


@dataclass
class Case:
    batch: tuple[int, ...]
    hidden_size: int
    vocab: int
    dtype: torch.dtype
    separate_head: bool
    lam: float
    trainable: bool
    bias: bool
    strided: bool

    def label(self) -> str:
        dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}[self.dtype]
        return (
            f"{dt} targets={list(self.batch)} H={self.hidden_size} V={self.vocab} "
            f"head={'separate' if self.separate_head else 'shared'} lam={self.lam} "
            f"{'trainable' if self.trainable else 'frozen'}{' bias' if self.bias else ''}"
            f"{' strided' if self.strided else ''}"
        )


def make_case_tensors(case: Case, device: torch.device, seed: int) -> dict:
    """Inputs in the case's dtype; leaves require grad where the case says so."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h_size, vocab = case.hidden_size, case.vocab

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    weight = randn(vocab, h_size) * (LOGIT_SCALE / math.sqrt(h_size))
    hidden = randn(*case.batch, h_size)
    targets = torch.randint(0, vocab, case.batch, generator=gen)
    # One very confident token (p[target] -> 1): where 1 - p[target] must not cancel.
    flat_h, flat_t = hidden.view(-1, h_size), targets.view(-1)
    flat_h[0] *= 8.0
    flat_t[0] = int((flat_h[0] @ weight.T).argmax())
    # About 15% ignored positions, never the confident one.
    drop = torch.rand(case.batch, generator=gen) < 0.15
    drop.view(-1)[0] = False
    targets[drop] = IGNORE_INDEX
    ref_hidden = hidden + 0.1 * randn(*case.batch, h_size)

    def dev(t: torch.Tensor, grad: bool = False) -> torch.Tensor:
        # A copy: on the CPU in fp32 `to` would hand back the very tensor used to build others.
        return t.to(device=device, dtype=case.dtype, copy=True).requires_grad_(grad)

    t = {"targets": targets.to(device), "upstream": randn(*case.batch).to(device)}
    if case.strided:
        # Hidden rows with a stride wider than H, as a slice of a wider activation would give.
        wide = dev(torch.cat([hidden, randn(*case.batch, 7)], dim=-1), grad=True)
        t["hidden_leaf"], t["hidden"] = wide, wide[..., :h_size]
    else:
        t["hidden_leaf"] = t["hidden"] = dev(hidden, grad=True)
    t["ref_hidden"] = dev(ref_hidden)
    t["weight"] = dev(weight, grad=case.trainable)
    t["bias"] = dev(randn(vocab) * 0.5, grad=case.trainable) if case.bias else None
    if case.separate_head:
        t["ref_weight"] = dev(weight + 0.05 * randn(vocab, h_size) / math.sqrt(h_size))
        t["ref_bias"] = dev(randn(vocab) * 0.5) if case.bias else None
    else:
        # The head is shared by leaving ref_weight out; the bias is passed on explicitly, because
        # linear_logprobs does not share the policy bias when ref_bias is omitted (see
        # check_shared_bias_default).
        t["ref_weight"], t["ref_bias"] = None, t["bias"].detach() if case.bias else None
    return t


def float64_expected(case: Case, t: dict) -> dict:
    """log-probs and gradients of sum(upstream * policy) in float64, by plain autograd."""
    h = t["hidden"].detach().double().requires_grad_(True)
    w = t["weight"].detach().double().requires_grad_(case.trainable)
    b = t["bias"].detach().double().requires_grad_(case.trainable) if case.bias else None
    rh = t["ref_hidden"].double()
    rw = t["ref_weight"].double() if case.separate_head else w.detach()
    rb = (t["ref_bias"].double() if case.separate_head else b.detach()) if case.bias else None
    tgt = t["targets"]
    keep = tgt != IGNORE_INDEX
    safe = torch.where(keep, tgt, 0)[..., None]

    def logits(x, weight, bias):
        z = x @ weight.T
        return z if bias is None else z + bias

    def pick(z):
        return torch.where(keep, torch.log_softmax(z, -1).gather(-1, safe).squeeze(-1), 0.0)

    z, zr = logits(h, w, b), logits(rh, rw, rb)
    policy = pick(z)
    reference = pick(zr)
    extrapolated = pick((1 + case.lam) * z.detach() - case.lam * zr)
    (policy * t["upstream"].double()).sum().backward()
    return {
        "policy": policy.detach(),
        "reference": reference,
        "extrapolated": extrapolated,
        "grad_hidden": h.grad,
        "grad_weight": w.grad if case.trainable else None,
        "grad_bias": b.grad if (case.trainable and case.bias) else None,
    }


def run_case(sf, case: Case, t: dict, backend: str, deterministic: bool = False) -> dict:
    for key in ("hidden_leaf", "weight", "bias"):
        if t[key] is not None:
            t[key].grad = None
    out = sf.linear_logprobs(
        t["hidden"], t["weight"], t["targets"], bias=t["bias"],
        ref_hidden=t["ref_hidden"], ref_weight=t["ref_weight"], ref_bias=t["ref_bias"],
        extrapolate=case.lam, deterministic=deterministic, backend=backend,
    )  # fmt: skip
    (out.policy * t["upstream"]).sum().backward()
    grad_hidden = t["hidden_leaf"].grad
    if case.strided:
        grad_hidden = grad_hidden[..., : case.hidden_size]
    return {
        "policy": out.policy.detach(),
        "reference": out.reference,
        "extrapolated": out.extrapolated,
        "grad_hidden": grad_hidden,
        "grad_weight": t["weight"].grad if case.trainable else None,
        "grad_bias": t["bias"].grad if (case.trainable and case.bias) else None,
    }


def compare(case: Case, got: dict, want: dict, targets: torch.Tensor) -> tuple[bool, dict]:
    details, ok = {}, True
    ignored = targets == IGNORE_INDEX
    for key in ("policy", "reference", "extrapolated"):
        err = rel_err(got[key], want[key], floor=1.0)
        details[key] = err
        ok &= err <= LOGP_TOL[case.dtype]
        # Ignored positions must be exactly 0, not merely small.
        ok &= bool((got[key][ignored] == 0).all())
    for key in ("grad_hidden", "grad_weight", "grad_bias"):
        if want[key] is None and got[key] is None:
            continue
        err = rel_err(got[key], want[key])
        details[key] = err
        ok &= err <= GRAD_TOL[case.dtype]
    return ok, details


def check_logprobs(sf, device: torch.device, smoke: bool, seed: int, budget_s: float, checks: list[Check]) -> int:
    """All cases in order; past budget_s (mostly Triton compile time) the rest are skipped. Returns the skip count."""
    shapes = SMOKE_SHAPES if smoke else GPU_SHAPES
    started, skipped = time.monotonic(), 0
    for (batch, h_size, vocab, bias, strided), dtype, separate, lam, trainable in itertools.product(
        shapes, (torch.float32, torch.bfloat16), (False, True), (0.0, 0.5), (False, True)
    ):
        case = Case(batch, h_size, vocab, dtype, separate, lam, trainable, bias, strided)
        if time.monotonic() - started > budget_s:
            print(f"SKIP logprobs {case.label()} (--check-budget {budget_s:.0f} s spent)", flush=True)
            skipped += 1
            continue
        tensors = make_case_tensors(case, device, seed)
        want = float64_expected(case, tensors)
        for variant in ("triton", "triton-split", "torch"):
            name = f"logprobs[{variant}] {case.label()}"
            # triton-split: the Triton forward with the split backward (dz per row chunk, then cuBLAS).
            backend, backward = (variant, "fused") if variant != "triton-split" else ("triton", "split")
            os.environ["SELFEE_FAST_TRITON_BACKWARD"] = backward
            try:
                got = run_case(sf, case, tensors, backend)
                ok, details = compare(case, got, want, tensors["targets"])
            except Exception as exc:  # a crash is a failed check, not the end of the run
                ok, details = False, {"error": error_text(exc)}
            finally:
                os.environ.pop("SELFEE_FAST_TRITON_BACKWARD")
            report(Check(name, ok, details), checks)
    return skipped


def check_determinism(sf, device: torch.device, smoke: bool, seed: int, checks: list[Check]) -> None:
    """deterministic=True: two runs give identical bits. The default mode is reported, not judged."""
    batch, h_size, vocab, _, _ = (SMOKE_SHAPES if smoke else GPU_SHAPES)[-1]
    for dtype in (torch.float32, torch.bfloat16):
        case = Case(batch, h_size, vocab, dtype, False, 0.5, True, True, False)
        tensors = make_case_tensors(case, device, seed)
        for deterministic in (True, False):
            try:
                first = run_case(sf, case, tensors, "triton", deterministic=deterministic)
                second = run_case(sf, case, tensors, "triton", deterministic=deterministic)
                same = {k: bool(torch.equal(first[k], second[k])) for k in first if first[k] is not None}
                details = {"identical": all(same.values()), "differing": [k for k, v in same.items() if not v] or "-"}
            except Exception as exc:
                same, details = {"run": False}, {"error": error_text(exc)}
            if deterministic:
                report(Check(f"deterministic[triton] {case.label()}", all(same.values()), details), checks)
            else:
                # Atomics in the split backward may reorder fp32 sums: informative only.
                print(f"INFO default mode (atomics) repeats bit for bit: {details}", flush=True)


def check_shared_bias_default(sf, device: torch.device) -> None:
    """Informative: with ref_weight and ref_bias omitted, does the reference use the policy bias?

    The docstring says the policy's head is shared by default; a head includes its bias.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(4, 16, generator=gen).to(device)
    weight = torch.randn(32, 16, generator=gen).to(device)
    bias = (5 * torch.randn(32, generator=gen)).to(device)
    targets = torch.randint(0, 32, (4,), generator=gen).to(device)
    for backend in ("triton", "torch"):
        out = sf.linear_logprobs(hidden, weight, targets, bias=bias, ref_hidden=hidden, backend=backend)
        shared = bool(torch.allclose(out.reference, out.policy, atol=1e-5))
        print(f"INFO [{backend}] ref_bias omitted with a shared head: reference uses the policy bias: {shared}",
              flush=True)  # fmt: skip


def check_dpo(sf, device: torch.device, smoke: bool, seed: int, checks: list[Check]) -> None:
    """FusedLinearDPOLoss (loss, per-sequence log-probs, input gradient) against float64."""
    import torch.nn.functional as F

    pairs, seq_len, h_size, vocab = (2, 6, 24, 70) if smoke else (3, 41, 256, 5003)
    beta = 0.1
    for dtype, backend in itertools.product((torch.float32, torch.bfloat16), ("triton", "torch")):
        case = Case((2 * pairs, seq_len), h_size, vocab, dtype, False, 0.0, False, False, False)
        t = make_case_tensors(case, device, seed)
        x, ref_x, target = t["hidden"], t["ref_hidden"], t["targets"]

        h = x.detach().double().requires_grad_(True)
        w, rh = t["weight"].double(), ref_x.double()
        keep = target != IGNORE_INDEX
        safe = torch.where(keep, target, 0)[..., None]

        def seq_logps(z, keep=keep, safe=safe):
            return torch.where(keep, torch.log_softmax(z, -1).gather(-1, safe).squeeze(-1), 0.0).sum(-1)

        pol, ref = seq_logps(h @ w.T), seq_logps(rh @ w.T)
        margin = beta * ((pol[:pairs] - ref[:pairs]) - (pol[pairs:] - ref[pairs:]))
        want_loss = -F.logsigmoid(margin).mean()
        want_loss.backward()

        name = f"dpo[{backend}] {case.label()}"
        try:
            x.grad = None
            loss, aux = sf.FusedLinearDPOLoss(beta=beta, backend=backend)(t["weight"], x, target, None, ref_x)
            loss.backward()
            details = {
                "loss": rel_err(loss.detach(), want_loss.detach(), floor=1.0),
                "seq_logps": rel_err(torch.cat([aux[0], aux[1]]).detach(), pol.detach(), floor=1.0),
                "grad_hidden": rel_err(x.grad, h.grad),
            }
            ok = (
                details["loss"] <= LOGP_TOL[dtype] * 10
                and details["seq_logps"] <= LOGP_TOL[dtype] * 10
                and details["grad_hidden"] <= GRAD_TOL[dtype]
            )
        except Exception as exc:
            ok, details = False, {"error": error_text(exc)}
        report(Check(name, ok, details), checks)


PAIR_LOSS_TOL = 1e-5  # fp32 outputs of float64 arithmetic on the same fp32 inputs


def check_pair_losses(sf, device: torch.device, smoke: bool, seed: int, checks: list[Check]) -> None:
    """`spa_loss` through the Triton pair-loss kernel against its float64 twin (backend "torch"),
    on the same device and inputs: every loss type of the table, and each pair's own smoothing."""
    from selfee_fast.kernels.spa_loss import LOSS_TYPE_INFO, LOSS_TYPES

    pairs = 4 if smoke else 257  # odd: no power-of-two grid hides a missed program
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9 if smoke else 300, (2 * pairs,), generator=gen)
    # A packed stream: each sequence's tokens, then tokens of no sequence, in a shuffled order.
    seq_ids = torch.cat([torch.arange(2 * pairs).repeat_interleave(lengths), torch.full((7,), -1)])
    seq_ids = seq_ids[torch.randperm(seq_ids.numel(), generator=gen)].to(device)
    policy, reference, extrapolated = (-4 * torch.rand(seq_ids.numel(), generator=gen) for _ in range(3))
    per_pair_smoothing = torch.rand(pairs, generator=gen, dtype=torch.float64) * 0.3
    cases = [(loss_type, False) for loss_type in LOSS_TYPES] + [("sigmoid", True), ("robust", True)]
    for loss_type, per_pair in cases:
        kind = LOSS_TYPE_INFO[loss_type]
        options = dict(
            beta=0.3, loss_type=loss_type, num_pairs=pairs, seq_ids=seq_ids,
            alpha=0.1 if kind.smoothing == "optional" else 0.0, tau=0.0,
            label_smoothing=per_pair_smoothing if per_pair else {"optional": 0.2, "required": 0.1}.get(kind.smoothing, 0.0),
            extrapolated_logps=extrapolated.to(device) if kind.takes_reference else None,
        )  # fmt: skip
        name = f"pair loss[triton] {loss_type}{', per-pair smoothing' if per_pair else ''} P={pairs}"
        try:
            outputs = {}
            for backend in ("triton", "torch"):
                x = policy.to(device, copy=True).requires_grad_(True)  # a leaf of its own per backend
                ref = reference.to(device) if kind.takes_reference else None
                out = sf.spa_loss(x, ref, backend=backend, **options)
                out.loss.backward()
                outputs[backend] = (out, x.grad)
            (got, got_grad), (want, want_grad) = outputs["triton"], outputs["torch"]
            details = {
                field: rel_err(getattr(got, field), getattr(want, field).double(), floor=1.0)
                for field in ("losses", "chosen_logps", "rejected_logps", "noise_margin")
            }
            details["grad"] = rel_err(got_grad, want_grad.double())
            details["flags_equal"] = bool(torch.equal(got.confident, want.confident))
            ok = details["flags_equal"] and all(v <= PAIR_LOSS_TOL for k, v in details.items() if k != "flags_equal")
        except Exception as exc:
            ok, details = False, {"error": error_text(exc)}
        report(Check(name, ok, details), checks)


# --------------------------------------------------------------------------- launch-config sweep


def sweep(
    device: torch.device, smoke: bool, shape: tuple[int, int, int], budget_s: float, checks: list[Check], save=None
) -> dict:
    """Time each launch config; `save(partial)` after each, so a run cut short keeps what it timed."""
    from selfee_fast.kernels.config import LaunchConfig, default_config
    from selfee_fast.kernels.logprobs_backward import logprobs_backward
    from selfee_fast.kernels.logprobs_forward import logprobs_forward

    m, h_size, vocab = shape
    dtype = torch.float32 if smoke else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(m, h_size, generator=gen, device=device).to(dtype)
    ref_hidden = (hidden.float() + 0.1 * torch.randn(m, h_size, generator=gen, device=device)).to(dtype)
    weight = (torch.randn(vocab, h_size, generator=gen, device=device) * (LOGIT_SCALE / math.sqrt(h_size))).to(dtype)
    rows = torch.arange(m, device=device)
    targets = torch.randint(0, vocab, (m,), generator=gen, device=device)
    upstream = torch.ones(m, device=device)
    grad_hidden = torch.zeros(m, h_size, dtype=torch.float32, device=device)
    # Shared reference head: forward 2·2MHV, grad-hidden backward (logits recompute + dz @ W) 4MHV.
    fwd_flop = bwd_flop = 4.0 * m * h_size * vocab
    repeats = 1 if smoke else 3

    candidates = [LaunchConfig(*c) for c in (SMOKE_SWEEP_CANDIDATES if smoke else SWEEP_CANDIDATES)]
    default = default_config(device, dtype)
    if default not in candidates:
        candidates.insert(0, default)
    started = time.monotonic()
    results, baseline = [], None
    for cfg in candidates:
        entry = {"config": asdict(cfg), "is_default": cfg == default}
        if time.monotonic() - started > budget_s:
            entry["status"] = "skipped (time budget)"
            results.append(entry)
            print(f"SWEEP {cfg}: {entry['status']}", flush=True)
            continue
        try:
            compile_start = time.monotonic()
            stats = logprobs_forward(hidden, weight, rows, targets, ref_hidden=ref_hidden, config=cfg)

            def backward(cfg=cfg, stats=stats):
                logprobs_backward(hidden, weight, rows, targets, stats.lse, stats.others_lse, upstream,
                                  grad_hidden=grad_hidden, config=cfg)  # fmt: skip

            grad_hidden.zero_()
            backward()
            sync(device)
            entry["first_call_s"] = time.monotonic() - compile_start  # mostly compilation
            result = (stats.lse.clone(), grad_hidden.clone())

            def forward(cfg=cfg):
                logprobs_forward(hidden, weight, rows, targets, ref_hidden=ref_hidden, config=cfg)

            fwd_times, bwd_times = [], []
            for _ in range(repeats):
                fwd_times.append(time_call(forward, device))
                grad_hidden.zero_()
                bwd_times.append(time_call(backward, device))
            entry["forward_ms"] = statistics.median(fwd_times) * 1e3
            entry["backward_ms"] = statistics.median(bwd_times) * 1e3
            entry["total_ms"] = entry["forward_ms"] + entry["backward_ms"]
            entry["forward_tflops"] = fwd_flop / (entry["forward_ms"] / 1e3) / 1e12
            entry["backward_tflops"] = bwd_flop / (entry["backward_ms"] / 1e3) / 1e12
            entry["status"] = "ok"
            # Every config must compute the same thing as the first one that ran.
            if baseline is None:
                baseline = result
            else:
                entry["lse_diff"] = float((result[0] - baseline[0]).abs().max())
                entry["grad_rel_diff"] = rel_err(result[1], baseline[1].double())
                agree = entry["lse_diff"] <= 1e-3 and entry["grad_rel_diff"] <= 1e-3
                if not agree:
                    report(Check(f"sweep {cfg} agrees with the first config that ran", False,
                                 {"lse_diff": entry["lse_diff"], "grad_rel_diff": entry["grad_rel_diff"]}), checks)  # fmt: skip
            print(
                f"SWEEP {cfg}: fwd {entry['forward_ms']:.2f} ms ({entry['forward_tflops']:.0f} TFLOP/s) "
                f"bwd {entry['backward_ms']:.2f} ms ({entry['backward_tflops']:.0f} TFLOP/s) "
                f"first call {entry['first_call_s']:.1f} s",
                flush=True,
            )
        except Exception as exc:  # compile failures (shared memory, registers) skip the config
            entry["status"] = f"failed: {error_text(exc)}"
            print(f"SWEEP {cfg}: {entry['status']}", flush=True)
        results.append(entry)
        if save is not None:
            save({"shape": {"M": m, "H": h_size, "V": vocab}, "dtype": str(dtype), "results": results, "partial": True})
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ran = [r for r in results if r["status"] == "ok"]
    best = {}
    for key in ("forward_ms", "backward_ms", "total_ms"):
        if ran:
            winner = min(ran, key=lambda r, key=key: r[key])
            best[key] = {"config": winner["config"], "ms": winner[key]}
    if best:
        print(f"SWEEP best forward  {best['forward_ms']}", flush=True)
        print(f"SWEEP best backward {best['backward_ms']}", flush=True)
        print(f"SWEEP best total    {best['total_ms']}", flush=True)
    return {"shape": {"M": m, "H": h_size, "V": vocab}, "dtype": str(dtype), "results": results, "best": best}


# --------------------------------------------------------------------------- driver


def main(argv=None) -> int:
    # `timeout` stops a step with SIGTERM: as SystemExit, it still runs the saving finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args(argv)
    if args.cpu_smoke:
        # Must precede the first import of selfee_fast: Triton reads it when kernels are decorated.
        os.environ["SELFEE_FAST_TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --cpu-smoke to exercise this script", file=sys.stderr)
        return 2
    import selfee_fast as sf

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"gpu_check-{'cpu-smoke' if args.cpu_smoke else 'cuda'}.json"
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "selfee_fast": sf.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
    }
    print(f"env: {env}", flush=True)

    checks: list[Check] = []
    started = time.monotonic()

    def save(sweep_result: dict | None) -> None:
        # Saved after each stage, so a run cut short by a timeout still leaves its results.
        summary = {"passed": sum(c.passed for c in checks), "failed": sum(not c.passed for c in checks),
                   "skipped": skipped}  # fmt: skip
        payload = {"env": env, "summary": summary, "checks": [asdict(c) for c in checks], "sweep": sweep_result}
        out_path.write_text(json.dumps(payload, indent=2, default=str))

    skipped = check_logprobs(sf, device, args.cpu_smoke, args.seed, args.check_budget, checks)
    check_determinism(sf, device, args.cpu_smoke, args.seed, checks)
    check_dpo(sf, device, args.cpu_smoke, args.seed, checks)
    check_pair_losses(sf, device, args.cpu_smoke, args.seed, checks)
    check_shared_bias_default(sf, device)
    print(f"correctness: {time.monotonic() - started:.1f} s", flush=True)
    save(None)

    sweep_result = None
    if not args.skip_sweep:
        if args.sweep_shape:
            shape = tuple(int(x) for x in args.sweep_shape.split(","))
        else:
            shape = SMOKE_SWEEP_SHAPE if args.cpu_smoke else SWEEP_SHAPE
        sweep_result = sweep(device, args.cpu_smoke, shape, args.sweep_budget, checks, save=save)
        save(sweep_result)

    failed = [c for c in checks if not c.passed]
    print(f"results: {out_path}")
    print(f"\n{len(checks) - len(failed)} passed, {len(failed)} failed, {skipped} skipped", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
