"""Forward sweep: per-token log-sum-exp and target logit of `hidden @ weight.T + bias`.

One program owns BLOCK_M token rows and one slice of the vocabulary. It walks the slice in
BLOCK_V tiles; each weight tile is loaded once and used for the policy rows and, when a
reference is given, for the reference rows too (shared head) — the logits never leave
registers. Per tile it updates online log-sum-exps (flash-attention style) for:

- the policy logits z,
- the policy logits without the target class (so the backward can form 1 - p[target]
  from a sum instead of a difference: exact when p[target] -> 1),
- the reference logits z_ref,
- the extrapolated logits (1 + lam) * z - lam * z_ref (SPA's de-coupled noise detection).

Vocabulary slices ("splits") keep the GPU busy when there are few token rows. Each split
writes its partial results to its own row of the output; the launcher merges them with a
fixed-order logsumexp, so the result does not depend on scheduling.

Only rows listed in `rows` are processed: the caller drops ignore_index positions before
the launch, so prompt and padding tokens cost no matmul work.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .config import LaunchConfig, default_config, dot_precision, number_of_splits, tile_dot, upcast_dots


class ForwardStats(NamedTuple):
    """Per active row, fp32. Log-probs follow as target_logit - lse."""

    lse: torch.Tensor
    target_logit: torch.Tensor
    # log sum_{v != target} exp(z_v): 1 - p[target] = exp(others_lse - lse)
    others_lse: torch.Tensor
    ref_lse: torch.Tensor | None
    ref_target_logit: torch.Tensor | None
    ext_lse: torch.Tensor | None


@triton.jit
def _online_lse_update(running_max, running_sum, tile, keep):
    """Fold a [BLOCK_M, BLOCK_V] tile into running (max, sum of exp(x - max)) per row."""
    tile = tl.where(keep, tile, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(tile, axis=1))
    # A row whose every entry so far is -inf keeps new_max = -inf; guard the exp(-inf - -inf).
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(tile - safe_max[:, None]), axis=1)
    return new_max, running_sum


@triton.jit
def _logprobs_forward_kernel(
    hidden_ptr, ref_hidden_ptr, weight_ptr, ref_weight_ptr, bias_ptr, ref_bias_ptr,
    rows_ptr, targets_ptr,
    lse_ptr, target_logit_ptr, others_lse_ptr, ref_lse_ptr, ref_target_logit_ptr, ext_lse_ptr,
    num_rows, vocab, hidden_size,
    stride_hidden, stride_ref_hidden, stride_weight, stride_ref_weight,
    extrapolate, tiles_per_split,
    HAS_REF: tl.constexpr, SEPARATE_REF_HEAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_EXT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    split = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < num_rows
    rows = tl.load(rows_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
    targets = tl.load(targets_ptr + offs_m, mask=row_ok, other=-1)

    neg_inf = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    zero = tl.zeros((BLOCK_M,), tl.float32)
    max_pol, sum_pol, max_oth, sum_oth, tgt_pol = neg_inf, zero, neg_inf, zero, zero
    max_ref, sum_ref, tgt_ref = neg_inf, zero, zero
    max_ext, sum_ext = neg_inf, zero

    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(vocab, v_begin + tiles_per_split * BLOCK_V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
        logits = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
        ref_logits = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
        for k0 in range(0, hidden_size, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < hidden_size
            w = tl.load(weight_ptr + offs_v[:, None] * stride_weight + offs_k[None, :],
                        mask=v_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            h = tl.load(hidden_ptr + rows[:, None] * stride_hidden + offs_k[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            logits = tile_dot(h, tl.trans(w), logits, DOT_PRECISION, UPCAST)
            if HAS_REF:
                if SEPARATE_REF_HEAD:
                    w = tl.load(ref_weight_ptr + offs_v[:, None] * stride_ref_weight + offs_k[None, :],
                                mask=v_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                rh = tl.load(ref_hidden_ptr + rows[:, None] * stride_ref_hidden + offs_k[None, :],
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                ref_logits = tile_dot(rh, tl.trans(w), ref_logits, DOT_PRECISION, UPCAST)
        if HAS_BIAS:
            logits += tl.load(bias_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]

        keep = v_ok[None, :]
        is_target = offs_v[None, :] == targets[:, None]
        max_pol, sum_pol = _online_lse_update(max_pol, sum_pol, logits, keep)
        max_oth, sum_oth = _online_lse_update(max_oth, sum_oth, logits, keep & (~is_target))
        tgt_pol += tl.sum(tl.where(is_target, logits, 0.0), axis=1)
        if HAS_REF:
            if HAS_REF_BIAS:
                ref_logits += tl.load(ref_bias_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
            max_ref, sum_ref = _online_lse_update(max_ref, sum_ref, ref_logits, keep)
            tgt_ref += tl.sum(tl.where(is_target, ref_logits, 0.0), axis=1)
            if HAS_EXT:
                ext_logits = (1.0 + extrapolate) * logits - extrapolate * ref_logits
                max_ext, sum_ext = _online_lse_update(max_ext, sum_ext, ext_logits, keep)

    out = split * num_rows + offs_m
    tl.store(lse_ptr + out, max_pol + tl.log(sum_pol), mask=row_ok)
    tl.store(others_lse_ptr + out, max_oth + tl.log(sum_oth), mask=row_ok)
    tl.store(target_logit_ptr + out, tgt_pol, mask=row_ok)
    if HAS_REF:
        tl.store(ref_lse_ptr + out, max_ref + tl.log(sum_ref), mask=row_ok)
        tl.store(ref_target_logit_ptr + out, tgt_ref, mask=row_ok)
        if HAS_EXT:
            tl.store(ext_lse_ptr + out, max_ext + tl.log(sum_ext), mask=row_ok)


def logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    extrapolate: float | None = None,
    config: LaunchConfig | None = None,
) -> ForwardStats:
    """Launch the forward sweep over `hidden[rows]` ([N, H], last dim contiguous).

    `targets` holds one vocabulary id per entry of `rows`. Arguments are trusted: the public
    entry point `selfee_fast.linear_logprobs` validates them.
    """
    config = config or default_config(hidden.device, hidden.dtype)
    num_rows, vocab, hidden_size = rows.numel(), weight.shape[0], weight.shape[1]
    has_ref = ref_hidden is not None
    has_ext = has_ref and extrapolate is not None

    row_blocks = triton.cdiv(num_rows, config.block_m)
    vocab_tiles = triton.cdiv(vocab, config.block_v)
    splits = number_of_splits(config, hidden.device, row_blocks, vocab_tiles)
    tiles_per_split = triton.cdiv(vocab_tiles, splits)
    splits = triton.cdiv(vocab_tiles, tiles_per_split)

    def partial() -> torch.Tensor:
        return torch.empty((splits, num_rows), dtype=torch.float32, device=hidden.device)

    lse, others, tgt = partial(), partial(), partial()
    ref_lse, ref_tgt, ext_lse = (partial(), partial(), partial()) if has_ref else (lse, lse, lse)
    separate_head = ref_weight is not None and ref_weight is not weight
    ref_weight_arg = ref_weight if separate_head else weight

    if num_rows > 0:
        _logprobs_forward_kernel[(row_blocks, splits)](
            hidden, ref_hidden if has_ref else hidden, weight, ref_weight_arg,
            bias if bias is not None else weight, ref_bias if ref_bias is not None else weight,
            rows, targets,
            lse, tgt, others, ref_lse, ref_tgt, ext_lse,
            num_rows, vocab, hidden_size,
            hidden.stride(0), ref_hidden.stride(0) if has_ref else 0,
            weight.stride(0), ref_weight_arg.stride(0),
            float(extrapolate) if has_ext else 0.0, tiles_per_split,
            HAS_REF=has_ref, SEPARATE_REF_HEAD=separate_head,
            HAS_BIAS=bias is not None, HAS_REF_BIAS=has_ref and ref_bias is not None, HAS_EXT=has_ext,
            BLOCK_M=config.block_m, BLOCK_V=config.block_v, BLOCK_K=config.block_k,
            DOT_PRECISION=dot_precision(weight.dtype), UPCAST=upcast_dots(),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip

    # Merge vocabulary splits in a fixed order: deterministic whatever the schedule.
    return ForwardStats(
        lse=torch.logsumexp(lse, dim=0),
        target_logit=tgt.sum(dim=0),
        others_lse=torch.logsumexp(others, dim=0),
        ref_lse=torch.logsumexp(ref_lse, dim=0) if has_ref else None,
        ref_target_logit=ref_tgt.sum(dim=0) if has_ref else None,
        ext_lse=torch.logsumexp(ext_lse, dim=0) if has_ext else None,
    )


def logprobs_forward_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    extrapolate: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> ForwardStats:
    """Plain-PyTorch twin of `logprobs_forward`: materialises the logits, computes in `dtype`."""

    def logits_of(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        z = h[rows].to(dtype) @ w.to(dtype).T
        return z if b is None else z + b.to(dtype)

    def target_of(z: torch.Tensor) -> torch.Tensor:
        return z.gather(1, targets.long()[:, None]).squeeze(1)

    z = logits_of(hidden, weight, bias)
    others = z.scatter(1, targets.long()[:, None], float("-inf"))
    ref_lse = ref_tgt = ext_lse = None
    if ref_hidden is not None:
        z_ref = logits_of(ref_hidden, weight if ref_weight is None else ref_weight, ref_bias)
        ref_lse, ref_tgt = torch.logsumexp(z_ref, 1), target_of(z_ref)
        if extrapolate is not None:
            ext_lse = torch.logsumexp((1 + extrapolate) * z - extrapolate * z_ref, 1)
    return ForwardStats(torch.logsumexp(z, 1), target_of(z), torch.logsumexp(others, 1), ref_lse, ref_tgt, ext_lse)
