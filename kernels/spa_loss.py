"""Fused SPA / DPO pair loss: per-token log-probs in, loss, gradient and statistics out.

One program per preference pair k (chosen sequence k, rejected sequence k + P). It sums
the per-token log-probs of both sequences (policy, reference, extrapolated) in float64
and in a fixed order — tokens are visited through a CSR layout (`order`, `offsets`) built
by the caller — then evaluates the pair's loss and writes the gradient w.r.t. every
per-token policy log-prob of the pair. No atomics: the result is deterministic.

With z = [pi(y_w) - pi(y_l)] - [ref(y_w) - ref(y_l)] and x = beta * z:

    sigmoid  -(1 - e) log s(x) - e log s(-x)          (e = 0: DPO; e > 0: cDPO)
    robust   [-(1 - e) log s(x) + e log s(-x)] / (1 - 2e)   (rDPO)
    ipo      (z - 1 / (2 beta))^2
    hinge    max(0, 1 - x)

SPA's self-refinement is the sigmoid (or robust) loss with a per-pair smoothing
e_k = label_smoothing + alpha * (1 - p_k), where p_k = [m_k > tau] flags confident pairs and
m_k = beta * ([ext(y_w) - ext(y_l)] - [ref(y_w) - ref(y_l)]) is the de-coupled noise
margin (m_k = beta * z without extrapolated log-probs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# The one list of loss types; the engine's config, loss API and drop-in read it from here.
LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")
LOSS_CODES = {name: code for code, name in enumerate(LOSS_TYPES)}


class PairLossResult(NamedTuple):
    losses: torch.Tensor  # [P] fp32
    chosen: torch.Tensor  # [P] policy log-prob of y_w (summed, or averaged over its tokens)
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    noise_margin: torch.Tensor  # [P] m_k
    confident: torch.Tensor  # [P] bool, p_k
    token_grad: torch.Tensor  # like the per-token inputs: d(mean loss) / d(policy log-prob)


@triton.jit
def _segment_sum(values_ptr, order_ptr, start, end, BLOCK: tl.constexpr):
    total = tl.zeros((BLOCK,), tl.float64)
    for i in range(start, end, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        ok = idx < end
        pos = tl.load(order_ptr + idx, mask=ok, other=0)
        total += tl.load(values_ptr + pos, mask=ok, other=0.0).to(tl.float64)
    return tl.sum(total, axis=0)


@triton.jit
def _segment_fill(out_ptr, order_ptr, start, end, value, BLOCK: tl.constexpr):
    for i in range(start, end, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        ok = idx < end
        pos = tl.load(order_ptr + idx, mask=ok, other=0)
        tl.store(out_ptr + pos, tl.zeros((BLOCK,), tl.float32) + value, mask=ok)


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _spa_pair_kernel(
    policy_ptr, ref_ptr, ext_ptr, order_ptr, offsets_ptr,
    losses_ptr, chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, noise_margin_ptr, confident_ptr,
    token_grad_ptr,
    num_pairs, beta, alpha, tau, label_smoothing, grad_scale,
    HAS_REF: tl.constexpr, HAS_EXT: tl.constexpr, HAS_TAU: tl.constexpr, AVERAGE: tl.constexpr,
    LOSS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    k = tl.program_id(0)
    c0 = tl.load(offsets_ptr + k)
    c1 = tl.load(offsets_ptr + k + 1)
    r0 = tl.load(offsets_ptr + num_pairs + k)
    r1 = tl.load(offsets_ptr + num_pairs + k + 1)
    len_c = tl.maximum(c1 - c0, 1).to(tl.float64)
    len_r = tl.maximum(r1 - r0, 1).to(tl.float64)

    chosen = _segment_sum(policy_ptr, order_ptr, c0, c1, BLOCK)
    rejected = _segment_sum(policy_ptr, order_ptr, r0, r1, BLOCK)
    ref_chosen = chosen * 0.0
    ref_rejected = rejected * 0.0
    if HAS_REF:
        ref_chosen = _segment_sum(ref_ptr, order_ptr, c0, c1, BLOCK)
        ref_rejected = _segment_sum(ref_ptr, order_ptr, r0, r1, BLOCK)
    ext_chosen = chosen
    ext_rejected = rejected
    if HAS_EXT:
        ext_chosen = _segment_sum(ext_ptr, order_ptr, c0, c1, BLOCK)
        ext_rejected = _segment_sum(ext_ptr, order_ptr, r0, r1, BLOCK)
    if AVERAGE:
        chosen, ref_chosen, ext_chosen = chosen / len_c, ref_chosen / len_c, ext_chosen / len_c
        rejected, ref_rejected, ext_rejected = rejected / len_r, ref_rejected / len_r, ext_rejected / len_r

    ref_margin = ref_chosen - ref_rejected
    z = (chosen - rejected) - ref_margin
    noise_margin = beta * ((ext_chosen - ext_rejected) - ref_margin)
    confident = noise_margin == noise_margin  # True, as a tensor
    if HAS_TAU:
        # Compared as reported (fp32), so `confident` always agrees with the returned margin.
        confident = noise_margin.to(tl.float32) > tau
    eps = label_smoothing + alpha * (1.0 - confident.to(tl.float64))

    x = beta * z
    if LOSS == 0:  # sigmoid / cDPO / SPA
        loss = -(1.0 - eps) * _log_sigmoid(x) - eps * _log_sigmoid(-x)
        dloss_dz = beta * (-(1.0 - eps) * tl.exp(_log_sigmoid(-x)) + eps * tl.exp(_log_sigmoid(x)))
    elif LOSS == 1:  # robust
        loss = (-(1.0 - eps) * _log_sigmoid(x) + eps * _log_sigmoid(-x)) / (1.0 - 2.0 * eps)
        dloss_dz = beta * (-(1.0 - eps) * tl.exp(_log_sigmoid(-x)) - eps * tl.exp(_log_sigmoid(x))) / (1.0 - 2.0 * eps)
    elif LOSS == 2:  # ipo
        gap = z - 0.5 / beta
        loss = gap * gap
        dloss_dz = 2.0 * gap
    else:  # hinge
        loss = tl.maximum(1.0 - x, 0.0)
        dloss_dz = tl.where(x < 1.0, -beta, 0.0)

    grad_chosen = dloss_dz * grad_scale
    grad_rejected = -dloss_dz * grad_scale
    if AVERAGE:
        grad_chosen = grad_chosen / len_c
        grad_rejected = grad_rejected / len_r
    _segment_fill(token_grad_ptr, order_ptr, c0, c1, grad_chosen.to(tl.float32), BLOCK)
    _segment_fill(token_grad_ptr, order_ptr, r0, r1, grad_rejected.to(tl.float32), BLOCK)

    tl.store(losses_ptr + k, loss.to(tl.float32))
    tl.store(chosen_ptr + k, chosen.to(tl.float32))
    tl.store(rejected_ptr + k, rejected.to(tl.float32))
    tl.store(ref_chosen_ptr + k, ref_chosen.to(tl.float32))
    tl.store(ref_rejected_ptr + k, ref_rejected.to(tl.float32))
    tl.store(noise_margin_ptr + k, noise_margin.to(tl.float32))
    tl.store(confident_ptr + k, confident.to(tl.int8))


def spa_pair_loss(
    policy: torch.Tensor,
    reference: torch.Tensor | None,
    extrapolated: torch.Tensor | None,
    order: torch.Tensor,
    offsets: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    tau: float | None,
    label_smoothing: float,
    loss_type: str,
    average_log_prob: bool,
) -> PairLossResult:
    """Launch one program per pair. Per-token inputs are flat fp32; `order` lists token
    positions grouped by sequence and `offsets` ([2P + 1]) delimits the sequences."""
    num_pairs = (offsets.numel() - 1) // 2
    device = policy.device

    def per_pair(dtype=torch.float32) -> torch.Tensor:
        return torch.empty(num_pairs, dtype=dtype, device=device)

    losses, chosen, rejected, ref_chosen, ref_rejected, noise_margin = (per_pair() for _ in range(6))
    confident = per_pair(torch.int8)
    token_grad = torch.zeros_like(policy, dtype=torch.float32)
    if num_pairs > 0:
        _spa_pair_kernel[(num_pairs,)](
            policy, reference if reference is not None else policy, extrapolated if extrapolated is not None else policy,
            order, offsets,
            losses, chosen, rejected, ref_chosen, ref_rejected, noise_margin, confident, token_grad,
            num_pairs, float(beta), float(alpha), float(tau) if tau is not None else 0.0, float(label_smoothing),
            1.0 / num_pairs,
            HAS_REF=reference is not None, HAS_EXT=extrapolated is not None, HAS_TAU=tau is not None,
            AVERAGE=average_log_prob, LOSS=LOSS_CODES[loss_type], BLOCK=128, num_warps=4,
        )  # fmt: skip
    return PairLossResult(
        losses, chosen, rejected, ref_chosen, ref_rejected, noise_margin, confident.bool(), token_grad
    )


def spa_pair_loss_reference(
    policy: torch.Tensor,
    reference: torch.Tensor | None,
    extrapolated: torch.Tensor | None,
    order: torch.Tensor,
    offsets: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    tau: float | None,
    label_smoothing: float,
    loss_type: str,
    average_log_prob: bool,
) -> PairLossResult:
    """Plain-PyTorch twin of `spa_pair_loss` (float64 throughout, same layout and outputs)."""
    num_pairs = (offsets.numel() - 1) // 2
    lengths = offsets[1:] - offsets[:-1]
    seq_of_token = torch.repeat_interleave(torch.arange(2 * num_pairs, device=policy.device), lengths)

    def sequence_sums(values: torch.Tensor | None) -> torch.Tensor:
        sums = torch.zeros(2 * num_pairs, dtype=torch.float64, device=policy.device)
        if values is not None:
            sums.index_add_(0, seq_of_token, values.reshape(-1)[order].double())
        return sums / lengths.clamp(min=1) if average_log_prob else sums

    pol, ref = sequence_sums(policy), sequence_sums(reference)
    ext = sequence_sums(extrapolated) if extrapolated is not None else pol
    chosen, rejected = pol[:num_pairs], pol[num_pairs:]
    ref_chosen, ref_rejected = ref[:num_pairs], ref[num_pairs:]
    ref_margin = ref_chosen - ref_rejected
    z = (chosen - rejected) - ref_margin
    noise_margin = beta * ((ext[:num_pairs] - ext[num_pairs:]) - ref_margin)
    confident = noise_margin.float() > tau if tau is not None else torch.ones_like(z, dtype=torch.bool)
    eps = label_smoothing + alpha * (~confident).double()

    z_leaf = z.detach().requires_grad_(True)
    with torch.enable_grad():
        x = beta * z_leaf
        logsig = torch.nn.functional.logsigmoid
        if loss_type == "sigmoid":
            losses = -(1 - eps) * logsig(x) - eps * logsig(-x)
        elif loss_type == "robust":
            losses = (-(1 - eps) * logsig(x) + eps * logsig(-x)) / (1 - 2 * eps)
        elif loss_type == "ipo":
            losses = (z_leaf - 1 / (2 * beta)) ** 2
        elif loss_type == "hinge":
            losses = torch.relu(1 - x)
        else:
            raise ValueError(f"unknown loss_type {loss_type!r}")
        (dloss_dz,) = torch.autograd.grad(losses.sum(), z_leaf)

    scale = lengths.clamp(min=1).double() if average_log_prob else torch.ones_like(lengths, dtype=torch.float64)
    per_sequence_grad = torch.cat([dloss_dz, -dloss_dz]) / num_pairs / scale
    token_grad = torch.zeros(policy.numel(), dtype=torch.float64, device=policy.device)
    token_grad[order] = per_sequence_grad[seq_of_token]
    f32 = torch.float32
    return PairLossResult(
        losses.detach().to(f32), chosen.to(f32), rejected.to(f32), ref_chosen.to(f32), ref_rejected.to(f32),
        noise_margin.to(f32), confident, token_grad.reshape(policy.shape).to(f32),
    )  # fmt: skip
