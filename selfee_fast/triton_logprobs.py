"""Autograd glue around the Triton log-prob kernels (forward sweep + recomputing backward)."""

from __future__ import annotations

import torch

from .kernels.logprobs_backward import logprobs_backward
from .kernels.logprobs_forward import logprobs_forward


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
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        # A trainable bias on a frozen head still needs somewhere to accumulate dz.T @ h.
        want_weight = need_weight or need_bias
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        logprobs_backward(
            hidden, weight, rows, targets, lse, others_lse, grad_policy.float().contiguous(),
            bias=bias, grad_hidden=grad_hidden, grad_weight=grad_weight, grad_bias=grad_bias,
            deterministic=ctx.deterministic,
        )  # fmt: skip
        return (
            grad_hidden.to(hidden.dtype) if need_hidden else None,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None,
            None, None, None, None, None, None, None,
        )  # fmt: skip
