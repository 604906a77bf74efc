"""Autograd glue around the Triton log-prob kernels (forward sweep + recomputing backward)."""

from __future__ import annotations

import os

import torch

from .kernels.logprobs_backward import gradient_scale, logit_gradients, logprobs_backward
from .kernels.logprobs_forward import logprobs_forward

# The split backward's dz buffer: chunks of rows are sized to stay under this.
SPLIT_CHUNK_BYTES = 256 * 2**20
# The fused backward's fp32 hidden-gradient accumulator: chunks of rows are sized to stay
# under this (at H = 4096: 4096 rows, 64 row blocks of 64 per launch).
ACCUMULATOR_BYTES = 64 * 2**20
BACKWARDS = ("fused", "split")


def triton_backward() -> str:
    """How the hidden-state gradient is formed: "fused" (default) or "split" (SELFEE_FAST_TRITON_BACKWARD).

    fused: one kernel recomputes the logits and accumulates dz @ W into an fp32 slab per
    vocabulary tile. split: a kernel writes dz for a chunk of rows, cuBLAS multiplies it by
    W. Which is faster depends on whether the fused kernel's slab traffic stays in L2; the
    GPU benchmark times both (bench/NOTES.md).
    """
    mode = os.environ.get("SELFEE_FAST_TRITON_BACKWARD", "fused")
    if mode not in BACKWARDS:
        raise ValueError(f"SELFEE_FAST_TRITON_BACKWARD must be one of {BACKWARDS}, got {mode!r}")
    return mode


def split_grad_hidden(hidden, weight, bias, rows, targets, lse, others_lse, upstream) -> torch.Tensor:
    """grad_hidden in hidden's dtype: per chunk of rows, dz (Triton) then dz @ W (one cuBLAS GEMM).

    cuBLAS accumulates the whole vocabulary in fp32 and rounds once, as the fused path's
    final cast does. Rows not in `rows` stay zero.
    """
    grad_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    num_rows, vocab = rows.numel(), weight.shape[0]
    chunk = max(1, min(num_rows, SPLIT_CHUNK_BYTES // (vocab * weight.element_size())))
    buffer = torch.empty((chunk, vocab), dtype=weight.dtype, device=weight.device) if num_rows else None
    for begin in range(0, num_rows, chunk):
        end = min(begin + chunk, num_rows)
        dz = logit_gradients(hidden, weight, rows, targets, lse, others_lse, begin, end, bias=bias, out=buffer)
        row_scale = (upstream[begin:end] / gradient_scale(weight.dtype))[:, None]
        grad_hidden.index_copy_(0, rows[begin:end], ((dz @ weight).float() * row_scale).to(hidden.dtype))
    return grad_hidden


def fused_grad_hidden(hidden, weight, bias, rows, targets, lse, others_lse, upstream, *, deterministic) -> torch.Tensor:
    """grad_hidden in hidden's dtype from the fused kernel, a chunk of rows at a time.

    The kernel accumulates in fp32; the fp32 buffer holds one chunk of active rows (at most
    ACCUMULATOR_BYTES; all of them in deterministic mode), not all of hidden, and each chunk
    is rounded into the result once. Rows not in `rows` stay zero.
    """
    grad_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    num_rows, hidden_size = rows.numel(), hidden.shape[1]
    if num_rows == 0:
        return grad_hidden
    chunk = max(1, min(num_rows, ACCUMULATOR_BYTES // (hidden_size * 4)))
    if deterministic:
        # One split per row block: the grid is the row blocks alone, and a chunk of 64 of
        # them would leave half an H100 idle. All rows at once, as before the chunking.
        chunk = num_rows
    buffer = torch.empty((chunk, hidden_size), dtype=torch.float32, device=hidden.device)
    for begin in range(0, num_rows, chunk):
        end = min(begin + chunk, num_rows)
        accumulator = buffer[: end - begin].zero_()
        part = slice(begin, end)
        logprobs_backward(
            hidden, weight, rows[part], targets[part], lse[part], others_lse[part], upstream[part],
            bias=bias, grad_hidden=accumulator, deterministic=deterministic,
        )  # fmt: skip
        grad_hidden.index_copy_(0, rows[part], accumulator.to(hidden.dtype))
    return grad_hidden


class TritonLinearLogprobs(torch.autograd.Function):
    """Active rows in, per-row (policy, reference, extrapolated) log-probs out.

    Absent outputs are returned as empty tensors. Reference and extrapolated values are
    constants for autograd: SPA never differentiates through them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows, targets, extrapolate, deterministic):
        stats = logprobs_forward(
            hidden, weight, rows, targets,
            bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, extrapolate=extrapolate,
        )  # fmt: skip
        policy = stats.target_logit - stats.lse
        empty = policy.new_empty(0)
        reference = stats.ref_target_logit - stats.ref_lse if ref_hidden is not None else empty
        if extrapolate is not None:
            lam = float(extrapolate)
            extrapolated = (1 + lam) * stats.target_logit - lam * stats.ref_target_logit - stats.ext_lse
        else:
            extrapolated = empty
        ctx.mark_non_differentiable(reference, extrapolated)
        ctx.save_for_backward(hidden, weight, bias, rows, targets, stats.lse, stats.others_lse)
        ctx.deterministic = deterministic
        return policy, reference, extrapolated

    @staticmethod
    def backward(ctx, grad_policy, _grad_reference, _grad_extrapolated):
        hidden, weight, bias, rows, targets, lse, others_lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        upstream = grad_policy.float().contiguous()
        grad_hidden = None
        if need_hidden and triton_backward() == "split":
            grad_hidden = split_grad_hidden(hidden, weight, bias, rows, targets, lse, others_lse, upstream)
        elif need_hidden:
            grad_hidden = fused_grad_hidden(hidden, weight, bias, rows, targets, lse, others_lse, upstream,
                                            deterministic=ctx.deterministic)  # fmt: skip
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        if need_weight or need_bias:
            logprobs_backward(
                hidden, weight, rows, targets, lse, others_lse, upstream,
                bias=bias, grad_weight=grad_weight, grad_bias=grad_bias, deterministic=ctx.deterministic,
            )  # fmt: skip
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None,
            None, None, None, None, None, None, None,
        )  # fmt: skip
