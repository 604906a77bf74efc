"""Backward of per-token policy log-probs: gradients for hidden, weight and bias.

For a token with upstream gradient g, target y and softmax p over z = h @ W.T + b:

    d logp / d z_v = g * ([v == y] - p_v)

The target entry is formed as g * exp(others_lse - lse) = g * sum_{v != y} p_v, never as
g * (1 - p_y): the subtraction loses every digit when p_y -> 1 (a known precision bug of
peers that build it in the input dtype). Everything up to the dot products is fp32.

The dot products take 16-bit operands, and fp16 cannot hold g * p_v: with g ~ 1e-5 and
p_v ~ 1e-3 the product is below fp16's smallest subnormal and would vanish. So the tile
that meets the tensor core is ([v == y] - p_v) * GRAD_SCALE (2^10 for fp16: p_v down to 6e-8
stays a normal number, and the split path's fp16 product dz @ W stays below fp16's largest
value while |W| < 32), and g and 1/GRAD_SCALE are applied to the fp32 products: per row for
dz @ W, and per row block (g / max|g| inside, max|g| outside) for dz.T @ h, whose sum runs
over rows.

Both kernels recompute the logits tile from hidden and weight (no [N, V] buffer exists).
`_grad_hidden_kernel` walks the vocabulary for a block of rows and accumulates
dz @ W into the fp32 hidden gradient; `_grad_weight_kernel` walks the rows for a block of
the vocabulary and accumulates dz.T @ h into the fp32 weight gradient. With one split the
accumulation order is fixed (deterministic); with more, splits add with fp32 atomics.

The split backward is the alternative for when read-modify-writing the [BLOCK_M, H] fp32
slab once per vocabulary tile is what limits `_grad_hidden_kernel` (bench/NOTES.md):
`_logit_gradient_kernel` writes dz for a chunk of rows (one tile per program, no loop over
the vocabulary, no atomics) and the products with W and h are left to cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import LaunchConfig, default_config, dot_precision, number_of_splits, tile_dot, upcast_dots


@triton.jit
def _logit_gradient_tile(
    hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, offs_v, v_ok,
    targets, lse, others_lse,
    hidden_size, stride_hidden, stride_weight,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Recompute a [BLOCK_M, BLOCK_V] logits tile; return d logp / d z for it per unit upstream, fp32."""
    logits = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < hidden_size
        h = tl.load(hidden_ptr + rows[:, None] * stride_hidden + offs_k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        w = tl.load(weight_ptr + offs_v[:, None] * stride_weight + offs_k[None, :],
                    mask=v_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        logits = tile_dot(h, tl.trans(w), logits, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        logits += tl.load(bias_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    prob = tl.exp(logits - lse[:, None])
    is_target = offs_v[None, :] == targets[:, None]
    target_weight = tl.exp(others_lse - lse)  # = 1 - p[target], without cancellation
    grad = tl.where(is_target, target_weight[:, None], -prob)
    return tl.where(row_ok[:, None] & v_ok[None, :], grad, 0.0)


@triton.jit
def _load_row_block(rows_ptr, targets_ptr, lse_ptr, others_lse_ptr, offs_m, row_ok):
    """Per-row inputs of a block of active rows: (row index, target, lse, others' lse)."""
    rows = tl.load(rows_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
    targets = tl.load(targets_ptr + offs_m, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
    others_lse = tl.load(others_lse_ptr + offs_m, mask=row_ok, other=0.0)
    return rows, targets, lse, others_lse


@triton.jit
def _grad_hidden_kernel(
    hidden_ptr, weight_ptr, bias_ptr, rows_ptr, targets_ptr, lse_ptr, others_lse_ptr, upstream_ptr,
    grad_hidden_ptr,
    num_rows, vocab, hidden_size, stride_hidden, stride_weight, stride_grad, tiles_per_split,
    HAS_BIAS: tl.constexpr, USE_ATOMICS: tl.constexpr, GRAD_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < num_rows
    rows, targets, lse, others_lse = _load_row_block(rows_ptr, targets_ptr, lse_ptr, others_lse_ptr, offs_m, row_ok)
    upstream = tl.load(upstream_ptr + offs_m, mask=row_ok, other=0.0)

    row_scale = upstream / GRAD_SCALE
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(vocab, v_begin + tiles_per_split * BLOCK_V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
        dz = _logit_gradient_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, offs_v, v_ok, targets, lse, others_lse,
            hidden_size, stride_hidden, stride_weight,
            HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST,
        )  # fmt: skip
        dz = (dz * GRAD_SCALE).to(weight_ptr.dtype.element_ty)
        for k0 in range(0, hidden_size, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < hidden_size
            w = tl.load(weight_ptr + offs_v[:, None] * stride_weight + offs_k[None, :],
                        mask=v_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            contribution = tile_dot(dz, w, tl.zeros((BLOCK_M, BLOCK_K), tl.float32), DOT_PRECISION, UPCAST)
            contribution = contribution * row_scale[:, None]
            out = grad_hidden_ptr + offs_m.to(tl.int64)[:, None] * stride_grad + offs_k[None, :]
            out_ok = row_ok[:, None] & k_ok[None, :]
            if USE_ATOMICS:
                tl.atomic_add(out, contribution, mask=out_ok)
            else:
                tl.store(out, tl.load(out, mask=out_ok, other=0.0) + contribution, mask=out_ok)


@triton.jit
def _grad_weight_kernel(
    hidden_ptr, weight_ptr, bias_ptr, rows_ptr, targets_ptr, lse_ptr, others_lse_ptr, upstream_ptr,
    grad_weight_ptr, grad_bias_ptr,
    num_rows, vocab, hidden_size, stride_hidden, stride_weight, stride_grad, blocks_per_split,
    HAS_BIAS: tl.constexpr, WANT_WEIGHT_GRAD: tl.constexpr, WANT_BIAS_GRAD: tl.constexpr,
    USE_ATOMICS: tl.constexpr, GRAD_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_v = tl.program_id(0)
    split = tl.program_id(1)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < vocab
    bias_grad = tl.zeros((BLOCK_V,), tl.float32)

    m_begin = split * blocks_per_split * BLOCK_M
    m_end = tl.minimum(num_rows, m_begin + blocks_per_split * BLOCK_M)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < m_end
        rows, targets, lse, others_lse = _load_row_block(rows_ptr, targets_ptr, lse_ptr, others_lse_ptr, offs_m, row_ok)
        upstream = tl.load(upstream_ptr + offs_m, mask=row_ok, other=0.0)
        dz = _logit_gradient_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, offs_v, v_ok, targets, lse, others_lse,
            hidden_size, stride_hidden, stride_weight,
            HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST,
        )  # fmt: skip
        if WANT_BIAS_GRAD:
            bias_grad += tl.sum(dz * upstream[:, None], axis=0)
        if WANT_WEIGHT_GRAD:
            # The rows' upstream gradients enter the 16-bit tile relative to the block's largest.
            block_scale = tl.max(tl.abs(upstream), axis=0)
            block_scale = tl.where(block_scale > 0, block_scale, 1.0)
            dz_t = tl.trans((dz * (upstream * (GRAD_SCALE / block_scale))[:, None]).to(hidden_ptr.dtype.element_ty))
            for k0 in range(0, hidden_size, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < hidden_size
                h = tl.load(hidden_ptr + rows[:, None] * stride_hidden + offs_k[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                contribution = tile_dot(dz_t, h, tl.zeros((BLOCK_V, BLOCK_K), tl.float32), DOT_PRECISION, UPCAST)
                contribution = contribution * (block_scale / GRAD_SCALE)
                out = grad_weight_ptr + offs_v[:, None] * stride_grad + offs_k[None, :]
                out_ok = v_ok[:, None] & k_ok[None, :]
                if USE_ATOMICS:
                    tl.atomic_add(out, contribution, mask=out_ok)
                else:
                    tl.store(out, tl.load(out, mask=out_ok, other=0.0) + contribution, mask=out_ok)
    if WANT_BIAS_GRAD:
        if USE_ATOMICS:
            tl.atomic_add(grad_bias_ptr + offs_v, bias_grad, mask=v_ok)
        else:
            tl.store(grad_bias_ptr + offs_v, tl.load(grad_bias_ptr + offs_v, mask=v_ok, other=0.0) + bias_grad,
                     mask=v_ok)  # fmt: skip


@triton.jit
def _logit_gradient_kernel(
    hidden_ptr, weight_ptr, bias_ptr, rows_ptr, targets_ptr, lse_ptr, others_lse_ptr, dz_ptr,
    row_begin, row_end, vocab, hidden_size, stride_hidden, stride_weight, stride_dz,
    HAS_BIAS: tl.constexpr, GRAD_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_V] tile of GRAD_SCALE * d logp / d z per unit upstream, rows [row_begin, row_end)."""
    offs_m = row_begin + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < row_end
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < vocab
    rows, targets, lse, others_lse = _load_row_block(rows_ptr, targets_ptr, lse_ptr, others_lse_ptr, offs_m, row_ok)
    dz = _logit_gradient_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, offs_v, v_ok, targets, lse, others_lse,
        hidden_size, stride_hidden, stride_weight,
        HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST,
    )  # fmt: skip
    out = dz_ptr + (offs_m - row_begin).to(tl.int64)[:, None] * stride_dz + offs_v[None, :]
    tl.store(out, (dz * GRAD_SCALE).to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & v_ok[None, :])


def gradient_scale(dtype: torch.dtype) -> float:
    """GRAD_SCALE: what the per-unit logit gradient is multiplied by before it is cast to `dtype`."""
    return 2.0**10 if dtype == torch.float16 else 1.0


def logit_gradients(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    others_lse: torch.Tensor,
    row_begin: int,
    row_end: int,
    *,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """GRAD_SCALE * d logp / d z per unit upstream gradient, for active rows [row_begin, row_end).

    A [rows, V] tensor in weight's dtype; `gradient_scale(weight.dtype)` is GRAD_SCALE. The
    first half of the split backward: the logits are recomputed tile by tile and only their
    gradient leaves the chip; the caller multiplies it by W with cuBLAS and the result's rows
    by their upstream gradient / GRAD_SCALE. `out` (at least [row_end - row_begin, V]) is
    reused across chunks when given.
    """
    config = config or default_config(hidden.device, hidden.dtype)
    count, vocab = row_end - row_begin, weight.shape[0]
    dz = out[:count] if out is not None else torch.empty((count, vocab), dtype=weight.dtype, device=weight.device)
    if count > 0:
        _logit_gradient_kernel[(triton.cdiv(count, config.block_m), triton.cdiv(vocab, config.block_v))](
            hidden, weight, bias if bias is not None else weight, rows, targets, lse, others_lse, dz,
            row_begin, row_end, vocab, weight.shape[1], hidden.stride(0), weight.stride(0), dz.stride(0),
            HAS_BIAS=bias is not None, GRAD_SCALE=gradient_scale(weight.dtype), BLOCK_M=config.block_m,
            BLOCK_V=config.block_v, BLOCK_K=config.block_k, DOT_PRECISION=dot_precision(weight.dtype),
            UPCAST=upcast_dots(),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
    return dz


def logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    others_lse: torch.Tensor,
    upstream: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    grad_hidden: torch.Tensor | None = None,
    grad_weight: torch.Tensor | None = None,
    grad_bias: torch.Tensor | None = None,
    deterministic: bool = False,
    config: LaunchConfig | None = None,
) -> None:
    """Accumulate into the given fp32 gradient buffers (any of them may be None).

    `grad_hidden` is [len(rows), H], compact: its row j is the gradient of hidden[rows[j]]
    (so a caller can work through the rows in chunks with a small buffer). `grad_weight` is
    [V, H], `grad_bias` is [V]. All three must be zero-initialised or hold a value to add to.
    """
    config = config or default_config(hidden.device, hidden.dtype)
    if deterministic:
        config = config.with_overrides(splits=1)
    num_rows, vocab, hidden_size = rows.numel(), weight.shape[0], weight.shape[1]
    if num_rows == 0:
        return
    row_blocks = triton.cdiv(num_rows, config.block_m)
    vocab_tiles = triton.cdiv(vocab, config.block_v)
    common = dict(
        BLOCK_M=config.block_m, BLOCK_V=config.block_v, BLOCK_K=config.block_k,
        GRAD_SCALE=gradient_scale(weight.dtype), DOT_PRECISION=dot_precision(weight.dtype), UPCAST=upcast_dots(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    bias_arg = bias if bias is not None else weight

    if grad_hidden is not None:
        splits = number_of_splits(config, hidden.device, row_blocks, vocab_tiles)
        tiles_per_split = triton.cdiv(vocab_tiles, splits)
        splits = triton.cdiv(vocab_tiles, tiles_per_split)
        _grad_hidden_kernel[(row_blocks, splits)](
            hidden, weight, bias_arg, rows, targets, lse, others_lse, upstream, grad_hidden,
            num_rows, vocab, hidden_size, hidden.stride(0), weight.stride(0), grad_hidden.stride(0),
            tiles_per_split, HAS_BIAS=bias is not None, USE_ATOMICS=splits > 1, **common,
        )  # fmt: skip

    if grad_weight is not None or grad_bias is not None:
        splits = number_of_splits(config, hidden.device, vocab_tiles, row_blocks)
        blocks_per_split = triton.cdiv(row_blocks, splits)
        splits = triton.cdiv(row_blocks, blocks_per_split)
        # A frozen weight with a trainable bias: only the bias gradient is accumulated.
        weight_out = grad_weight if grad_weight is not None else grad_bias
        _grad_weight_kernel[(vocab_tiles, splits)](
            hidden, weight, bias_arg, rows, targets, lse, others_lse, upstream,
            weight_out, grad_bias if grad_bias is not None else weight_out,
            num_rows, vocab, hidden_size, hidden.stride(0), weight.stride(0),
            grad_weight.stride(0) if grad_weight is not None else 0, blocks_per_split,
            HAS_BIAS=bias is not None, WANT_WEIGHT_GRAD=grad_weight is not None, WANT_BIAS_GRAD=grad_bias is not None,
            USE_ATOMICS=splits > 1, **common,
        )  # fmt: skip


def logprobs_backward_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    upstream: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch twin: (grad_hidden [like hidden], grad_weight [V, H], grad_bias [V]) in `dtype`."""
    h = hidden[rows].to(dtype)
    z = h @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    dz = -torch.softmax(z, dim=1)
    dz[torch.arange(len(rows)), targets.long()] += 1
    dz *= upstream.to(dtype)[:, None]
    grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
    grad_hidden[rows] = dz @ weight.to(dtype)
    return grad_hidden, dz.T @ h, dz.sum(0)
