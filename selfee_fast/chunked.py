"""The chunked PyTorch path for CPU tensors: the same semantics as the Triton kernels.

Rows are processed in chunks whose logits fit in `chunk_bytes`; at most one chunk of
policy logits (and one of reference logits) is alive at a time. Unlike the GPU kernels it
reaches the 6·N·H·V FLOP floor of a frozen head: with a whole vocabulary row in memory the
softmax is exact at once, so the forward also forms each token's input-gradient direction

    d_i = (1 - p_i[y_i]) · W[y_i] - sum_{v != y_i} p_i[v] · W[v]

and the backward only scales it by the upstream gradient — no logits recompute. A
trainable head recomputes the logits in the backward for dW (its direction depends on
the upstream gradient of every token).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_BYTES = 32 * 2**20
_WEIGHT_SLICE_BYTES = 16 * 2**20  # a 16-bit head is upcast slice by slice, never whole


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _weight_slices(weight: torch.Tensor, dtype: torch.dtype):
    """Yield (start, stop, weight[start:stop] in dtype) without copying a head already in dtype."""
    vocab, hidden_size = weight.shape
    if weight.dtype == dtype:
        yield 0, vocab, weight
        return
    step = max(1, _WEIGHT_SLICE_BYTES // (hidden_size * torch.finfo(dtype).bits // 8))
    for start in range(0, vocab, step):
        stop = min(vocab, start + step)
        yield start, stop, weight[start:stop].to(dtype)


def chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[C, V] logits of the chunk `h` (already in the compute dtype)."""
    logits = h.new_empty(h.shape[0], weight.shape[0])
    for start, stop, w in _weight_slices(weight, h.dtype):
        torch.matmul(h, w.T, out=logits[:, start:stop])
    if bias is not None:
        logits += bias.to(h.dtype)
    return logits


def _probs_times_weight(probs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = probs.new_zeros(probs.shape[0], weight.shape[1])
    for start, stop, w in _weight_slices(weight, probs.dtype):
        out.addmm_(probs[:, start:stop], w)
    return out


def _logsumexp_(x: torch.Tensor) -> torch.Tensor:
    """Row-wise logsumexp that overwrites `x` instead of allocating a temporary of its size."""
    row_max = x.amax(dim=1, keepdim=True)
    return row_max.squeeze(1) + x.sub_(row_max).exp_().sum(dim=1).log()


def chunk_rows(vocab: int, buffers: int, itemsize: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (vocab * buffers * itemsize))


class ChunkedLinearLogprobs(torch.autograd.Function):
    """Active rows in, per-row (policy, reference, extrapolated) log-probs out (see triton_logprobs)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows, targets, extrapolate,
        want_hidden_grad, chunk_bytes,
    ):  # fmt: skip
        dtype = compute_dtype(hidden)
        num_rows, vocab = rows.numel(), weight.shape[0]
        has_ref = ref_hidden is not None
        ref_weight = weight if ref_weight is None else ref_weight
        step = chunk_rows(vocab, 2 if has_ref else 1, torch.finfo(dtype).bits // 8, chunk_bytes)

        policy = hidden.new_empty(num_rows, dtype=dtype)
        lse_all = hidden.new_empty(num_rows, dtype=dtype)
        others_all = hidden.new_empty(num_rows, dtype=dtype)
        reference = hidden.new_empty(num_rows if has_ref else 0, dtype=dtype)
        extrapolated = hidden.new_empty(num_rows if extrapolate is not None else 0, dtype=dtype)
        direction = hidden.new_empty(num_rows, hidden.shape[1], dtype=dtype) if want_hidden_grad else None

        for start in range(0, num_rows, step):
            chunk = slice(start, min(num_rows, start + step))
            idx, tgt = rows[chunk], targets[chunk].long()[:, None]
            logits = chunk_logits(hidden[idx].to(dtype), weight, bias)
            target_logit = logits.gather(1, tgt).squeeze(1)
            if has_ref:
                ref_logits = chunk_logits(ref_hidden[idx].to(dtype), ref_weight, ref_bias)
                ref_target = ref_logits.gather(1, tgt).squeeze(1)
                reference[chunk] = ref_target - torch.logsumexp(ref_logits, dim=1)
                if extrapolate is not None:
                    lam = float(extrapolate)
                    ext_logits = ref_logits.mul_(-lam).add_(logits, alpha=1 + lam)  # reuses the reference buffer
                    ext_target = (1 + lam) * target_logit - lam * ref_target
                    extrapolated[chunk] = ext_target - _logsumexp_(ext_logits)
                del ref_logits
            # exp(z - max) in place of the logits; the target's own mass is kept apart so
            # that 1 - p[target] is a sum of small terms, exact even when p[target] -> 1.
            # (Same operations as _logsumexp_, so lam = 0 reproduces the policy bit for bit.)
            row_max = logits.amax(dim=1, keepdim=True)
            unnormalised = logits.sub_(row_max).exp_()
            total_mass = unnormalised.sum(dim=1)
            lse = row_max.squeeze(1) + total_mass.log()
            policy[chunk] = target_logit - lse
            lse_all[chunk] = lse
            others_mass = unnormalised.scatter_(1, tgt, 0.0).sum(dim=1)
            others_all[chunk] = row_max.squeeze(1) + others_mass.log()
            if want_hidden_grad:
                probs = unnormalised.div_(total_mass[:, None])
                others_share = others_mass / total_mass
                target_rows = weight[targets[chunk]].to(dtype)
                direction[chunk] = others_share[:, None] * target_rows - _probs_times_weight(probs, weight)
            del logits, unnormalised

        ctx.mark_non_differentiable(reference, extrapolated)
        ctx.save_for_backward(hidden, weight, bias, rows, targets, lse_all, others_all, direction)
        ctx.chunk_step = chunk_rows(vocab, 1, torch.finfo(dtype).bits // 8, chunk_bytes)
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return policy.to(out_dtype), reference.to(out_dtype), extrapolated.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_policy, _grad_reference, _grad_extrapolated):
        hidden, weight, bias, rows, targets, lse, others_lse, direction = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype = compute_dtype(hidden)
        upstream = grad_policy.to(dtype)

        grad_hidden = None
        if need_hidden:
            grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
            grad_hidden.index_copy_(0, rows, direction * upstream[:, None])
            grad_hidden = grad_hidden.to(hidden.dtype)

        grad_weight = grad_bias = None
        if need_weight or need_bias:
            grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
            grad_bias = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_bias else None
            for start in range(0, rows.numel(), ctx.chunk_step):
                chunk = slice(start, min(rows.numel(), start + ctx.chunk_step))
                h = hidden[rows[chunk]].to(dtype)
                tgt = targets[chunk].long()[:, None]
                logits = chunk_logits(h, weight, bias)
                grad_logits = logits.sub_(lse[chunk, None]).exp_().neg_()
                grad_logits.scatter_(1, tgt, (others_lse[chunk] - lse[chunk]).exp()[:, None])
                grad_logits *= upstream[chunk, None]
                if need_weight:
                    grad_weight.addmm_(grad_logits.T, h)
                if need_bias:
                    grad_bias += grad_logits.sum(dim=0)
                del logits, grad_logits
            grad_weight = grad_weight.to(weight.dtype) if need_weight else None
            grad_bias = grad_bias.to(bias.dtype) if need_bias else None

        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None
