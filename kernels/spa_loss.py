"""Fused preference pair loss: per-token log-probs in, loss, gradient and statistics out.

One program per preference pair k (chosen sequence k, rejected sequence k + P). It sums
the per-token log-probs of both sequences (policy, reference, extrapolated) in float64
and in a fixed order — tokens are visited through a CSR layout (`order`, `offsets`) built
by the caller — then evaluates the pair's loss and writes the gradient w.r.t. every
per-token policy log-prob of the pair. No atomics: the result is deterministic.

With the log-ratios c = pi(y_w) - ref(y_w), r = pi(y_l) - ref(y_l) (c = pi(y_w) without a
reference), z = c - r, x = beta * z and s the sigmoid:

    sigmoid    -(1 - e) log s(x - g) - e log s(g - x)   (DPO; e > 0: cDPO; g > 0, no reference: SimPO)
    robust     [-(1 - e) log s(x) + e log s(-x)] / (1 - 2e)   (rDPO)
    ipo        (z - 1 / (2 beta))^2
    hinge      max(0, 1 - x)
    exo_pair   s(x) [log s(x) - log(1 - e)] + s(-x) [log s(-x) - log e]
    nca_pair   -log s(beta c) - log s(-beta c) / 2 - log s(-beta r) / 2
    bco_pair   -log s(beta c) - log s(-beta r)
    sppo_hard  (c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2
    apo_zero   1 - s(beta c) + s(beta r)
    apo_down   s(beta c) + 1 - s(x)
    discopop   -log s(x) (1 - s(x / t)) + exp(-x) s(x / t)    (t = discopop_tau)
    orpo       -beta log s(w),  w = [c - log(1 - exp c)] - [r - log(1 - exp r)]  (reference-free)

(e = label_smoothing, g = gamma; a [P] tensor gives each pair its own e: soft labels). These
are the formulas of Liger-Kernel's and TRL's preference losses of the same names; ORPO's is its
odds-ratio term (the NLL term is added by the caller).

SPA's self-refinement is the sigmoid (or robust) loss with a per-pair smoothing
e_k = label_smoothing + alpha * (1 - p_k), where p_k = [m_k > tau] flags confident pairs and
m_k = beta * ([ext(y_w) - ext(y_l)] - [ref(y_w) - ref(y_l)]) is the de-coupled noise
margin (m_k = beta * z without extrapolated log-probs).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import triton
import triton.language as tl


class LossType(NamedTuple):
    name: str
    # "optional": e in [0, 0.5) smooths the labels (cDPO), and SPA's per-pair smoothing applies;
    # "required": e in (0, 1) is part of the formula; "none": the formula has no smoothing.
    smoothing: Literal["optional", "required", "none"]
    # False: the loss reads probabilities, not log-ratios, so a reference has no place in it.
    takes_reference: bool


# The one table of loss types, in kernel-code order; the engine's config, loss API and
# drop-ins read it from here. New types go at the end: a code is never renumbered.
LOSS_TABLE = (
    LossType("sigmoid", "optional", True),
    LossType("robust", "optional", True),
    LossType("ipo", "none", True),
    LossType("hinge", "none", True),
    LossType("exo_pair", "required", True),
    LossType("nca_pair", "none", True),
    LossType("bco_pair", "none", True),
    LossType("sppo_hard", "none", True),
    LossType("apo_zero", "none", True),
    LossType("apo_down", "none", True),
    LossType("discopop", "none", True),
    LossType("orpo", "none", False),
)
LOSS_TYPES = tuple(t.name for t in LOSS_TABLE)
LOSS_CODES = {t.name: code for code, t in enumerate(LOSS_TABLE)}
LOSS_TYPE_INFO = {t.name: t for t in LOSS_TABLE}


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
def _sigmoid(x):
    return tl.exp(_log_sigmoid(x))


@triton.jit
def _spa_pair_kernel(
    policy_ptr, ref_ptr, ext_ptr, order_ptr, offsets_ptr,
    losses_ptr, chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, noise_margin_ptr, confident_ptr,
    token_grad_ptr, pair_smoothing_ptr,
    num_pairs, beta, alpha, tau, label_smoothing, gamma, discopop_tau, grad_scale,
    HAS_REF: tl.constexpr, HAS_EXT: tl.constexpr, HAS_TAU: tl.constexpr, AVERAGE: tl.constexpr,
    PER_PAIR_SMOOTHING: tl.constexpr, LOSS: tl.constexpr, BLOCK: tl.constexpr,
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
    c = chosen - ref_chosen
    r = rejected - ref_rejected
    z = c - r
    noise_margin = beta * ((ext_chosen - ext_rejected) - ref_margin)
    confident = noise_margin == noise_margin  # True, as a tensor
    if HAS_TAU:
        # Compared as reported (fp32), so `confident` always agrees with the returned margin.
        confident = noise_margin.to(tl.float32) > tau
    if PER_PAIR_SMOOTHING:
        eps = tl.load(pair_smoothing_ptr + k) + alpha * (1.0 - confident.to(tl.float64))
    else:
        eps = label_smoothing + alpha * (1.0 - confident.to(tl.float64))

    # Each branch gives the pair's loss and its derivatives w.r.t. c and r.
    x = beta * z
    if LOSS == 0:  # sigmoid / cDPO / SPA / SimPO / CPO
        u = x - gamma
        loss = -(1.0 - eps) * _log_sigmoid(u) - eps * _log_sigmoid(-u)
        dloss_dc = beta * (-(1.0 - eps) * _sigmoid(-u) + eps * _sigmoid(u))
        dloss_dr = -dloss_dc
    elif LOSS == 1:  # robust
        loss = (-(1.0 - eps) * _log_sigmoid(x) + eps * _log_sigmoid(-x)) / (1.0 - 2.0 * eps)
        dloss_dc = beta * (-(1.0 - eps) * _sigmoid(-x) - eps * _sigmoid(x)) / (1.0 - 2.0 * eps)
        dloss_dr = -dloss_dc
    elif LOSS == 2:  # ipo
        gap = z - 0.5 / beta
        loss = gap * gap
        dloss_dc = 2.0 * gap
        dloss_dr = -dloss_dc
    elif LOSS == 3:  # hinge
        loss = tl.maximum(1.0 - x, 0.0)
        dloss_dc = tl.where(x < 1.0, -beta, 0.0)
        dloss_dr = -dloss_dc
    elif LOSS == 4:  # exo_pair
        log_target_odds = tl.log(1.0 - eps) - tl.log(eps)
        loss = _sigmoid(x) * (_log_sigmoid(x) - tl.log(1.0 - eps)) + _sigmoid(-x) * (_log_sigmoid(-x) - tl.log(eps))
        # d/dx = s(x) s(-x) (x - log((1 - e) / e)): log s(x) - log s(-x) = x.
        dloss_dc = beta * _sigmoid(x) * _sigmoid(-x) * (x - log_target_odds)
        dloss_dr = -dloss_dc
    elif LOSS == 5:  # nca_pair
        a = beta * c
        b = beta * r
        loss = -_log_sigmoid(a) - 0.5 * _log_sigmoid(-a) - 0.5 * _log_sigmoid(-b)
        dloss_dc = beta * (-_sigmoid(-a) + 0.5 * _sigmoid(a))
        dloss_dr = beta * 0.5 * _sigmoid(b)
    elif LOSS == 6:  # bco_pair
        a = beta * c
        b = beta * r
        loss = -_log_sigmoid(a) - _log_sigmoid(-b)
        dloss_dc = -beta * _sigmoid(-a)
        dloss_dr = beta * _sigmoid(b)
    elif LOSS == 7:  # sppo_hard
        gap_c = c - 0.5 / beta
        gap_r = r + 0.5 / beta
        loss = gap_c * gap_c + gap_r * gap_r
        dloss_dc = 2.0 * gap_c
        dloss_dr = 2.0 * gap_r
    elif LOSS == 8:  # apo_zero
        a = beta * c
        b = beta * r
        loss = 1.0 - _sigmoid(a) + _sigmoid(b)
        dloss_dc = -beta * _sigmoid(a) * _sigmoid(-a)
        dloss_dr = beta * _sigmoid(b) * _sigmoid(-b)
    elif LOSS == 9:  # apo_down
        a = beta * c
        loss = _sigmoid(a) + 1.0 - _sigmoid(x)
        slope_x = beta * _sigmoid(x) * _sigmoid(-x)
        dloss_dc = beta * _sigmoid(a) * _sigmoid(-a) - slope_x
        dloss_dr = slope_x
    elif LOSS == 10:  # discopop
        modulation = _sigmoid(x / discopop_tau)
        modulation_slope = modulation * _sigmoid(-x / discopop_tau) / discopop_tau
        logistic = -_log_sigmoid(x)
        exponential = tl.exp(-x)
        loss = logistic * (1.0 - modulation) + exponential * modulation
        dloss_dx = (
            -_sigmoid(-x) * (1.0 - modulation) - logistic * modulation_slope
            - exponential * modulation + exponential * modulation_slope
        )  # fmt: skip
        dloss_dc = beta * dloss_dx
        dloss_dr = -dloss_dc
    else:  # orpo: c and r are the policy's log-probs (no reference)
        not_chosen = 1.0 - tl.exp(c)
        not_rejected = 1.0 - tl.exp(r)
        log_odds = (c - tl.log(not_chosen)) - (r - tl.log(not_rejected))
        loss = -beta * _log_sigmoid(log_odds)
        slope = -beta * _sigmoid(-log_odds)
        dloss_dc = slope / not_chosen
        dloss_dr = -slope / not_rejected

    grad_chosen = dloss_dc * grad_scale
    grad_rejected = dloss_dr * grad_scale
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
    label_smoothing: float | torch.Tensor,
    loss_type: str,
    average_log_prob: bool,
    gamma: float = 0.0,
    discopop_tau: float = 0.05,
) -> PairLossResult:
    """Launch one program per pair. Per-token inputs are flat fp32; `order` lists token
    positions grouped by sequence and `offsets` ([2P + 1]) delimits the sequences.
    `label_smoothing`: one value, or one per pair ([P]); `gamma` is the target margin of the
    sigmoid loss (SimPO); `discopop_tau` DiscoPOP's temperature."""
    num_pairs = (offsets.numel() - 1) // 2
    device = policy.device
    per_pair_smoothing = isinstance(label_smoothing, torch.Tensor)
    pair_smoothing = label_smoothing.to(device, torch.float64).contiguous() if per_pair_smoothing else policy

    def per_pair(dtype=torch.float32) -> torch.Tensor:
        return torch.empty(num_pairs, dtype=dtype, device=device)

    losses, chosen, rejected, ref_chosen, ref_rejected, noise_margin = (per_pair() for _ in range(6))
    confident = per_pair(torch.int8)
    token_grad = torch.zeros_like(policy, dtype=torch.float32)
    if num_pairs > 0:
        _spa_pair_kernel[(num_pairs,)](
            policy, reference if reference is not None else policy, extrapolated if extrapolated is not None else policy,
            order, offsets,
            losses, chosen, rejected, ref_chosen, ref_rejected, noise_margin, confident, token_grad, pair_smoothing,
            num_pairs, float(beta), float(alpha), float(tau) if tau is not None else 0.0,
            0.0 if per_pair_smoothing else float(label_smoothing), float(gamma), float(discopop_tau), 1.0 / num_pairs,
            HAS_REF=reference is not None, HAS_EXT=extrapolated is not None, HAS_TAU=tau is not None,
            AVERAGE=average_log_prob, PER_PAIR_SMOOTHING=per_pair_smoothing, LOSS=LOSS_CODES[loss_type], BLOCK=128,
            num_warps=4,
        )  # fmt: skip
    return PairLossResult(
        losses, chosen, rejected, ref_chosen, ref_rejected, noise_margin, confident.bool(), token_grad
    )


def _pair_losses(loss_type, c, r, *, beta, eps, gamma, discopop_tau):
    """Per-pair losses from the log-ratios c, r (float64, differentiable): the module docstring's table."""
    logsig, sig = torch.nn.functional.logsigmoid, torch.sigmoid
    x = beta * (c - r)
    if loss_type == "sigmoid":
        return -(1 - eps) * logsig(x - gamma) - eps * logsig(gamma - x)
    if loss_type == "robust":
        return (-(1 - eps) * logsig(x) + eps * logsig(-x)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (c - r - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - x)
    if loss_type == "exo_pair":
        return sig(x) * (logsig(x) - torch.log1p(-eps)) + sig(-x) * (logsig(-x) - torch.log(eps))
    if loss_type == "nca_pair":
        return -logsig(beta * c) - 0.5 * logsig(-beta * c) - 0.5 * logsig(-beta * r)
    if loss_type == "bco_pair":
        return -logsig(beta * c) - logsig(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - sig(beta * c) + sig(beta * r)
    if loss_type == "apo_down":
        return sig(beta * c) + 1 - sig(x)
    if loss_type == "discopop":
        modulation = sig(x / discopop_tau)
        return -logsig(x) * (1 - modulation) + torch.exp(-x) * modulation
    if loss_type == "orpo":
        log_odds = (c - torch.log1p(-torch.exp(c))) - (r - torch.log1p(-torch.exp(r)))
        return -beta * logsig(log_odds)
    raise ValueError(f"unknown loss_type {loss_type!r}")


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
    label_smoothing: float | torch.Tensor,
    loss_type: str,
    average_log_prob: bool,
    gamma: float = 0.0,
    discopop_tau: float = 0.05,
) -> PairLossResult:
    """Plain-PyTorch twin of `spa_pair_loss` (float64 throughout, same layout and outputs)."""
    if isinstance(label_smoothing, torch.Tensor):
        label_smoothing = label_smoothing.to(policy.device, torch.float64)
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
    noise_margin = beta * ((ext[:num_pairs] - ext[num_pairs:]) - ref_margin)
    confident = noise_margin.float() > tau if tau is not None else torch.ones_like(chosen, dtype=torch.bool)
    eps = label_smoothing + alpha * (~confident).double()

    c = (chosen - ref_chosen).detach().requires_grad_(True)
    r = (rejected - ref_rejected).detach().requires_grad_(True)
    with torch.enable_grad():
        losses = _pair_losses(loss_type, c, r, beta=beta, eps=eps, gamma=gamma, discopop_tau=discopop_tau)
        dloss_dc, dloss_dr = torch.autograd.grad(losses.sum(), (c, r))

    scale = lengths.clamp(min=1).double() if average_log_prob else torch.ones_like(lengths, dtype=torch.float64)
    per_sequence_grad = torch.cat([dloss_dc, dloss_dr]) / num_pairs / scale
    token_grad = torch.zeros(policy.numel(), dtype=torch.float64, device=policy.device)
    token_grad[order] = per_sequence_grad[seq_of_token]
    f32 = torch.float32
    return PairLossResult(
        losses.detach().to(f32), chosen.to(f32), rejected.to(f32), ref_chosen.to(f32), ref_rejected.to(f32),
        noise_margin.to(f32), confident, token_grad.reshape(policy.shape).to(f32),
    )  # fmt: skip
