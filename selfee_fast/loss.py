"""`spa_loss`: the SPA / DPO preference loss from per-token log-probs, in one fused call.

Sequences are identified per token (`seq_ids`), so padded [2P, T] batches and packed
token streams are handled alike: sequence k < P is the chosen response of pair k,
sequence k + P its rejected response (chosen rows stacked above rejected rows, as in TRL
and Liger). Tokens with a negative id (prompt, padding) belong to no sequence.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

from .backend import Backend, use_triton
from .kernels.spa_loss import LOSS_TYPE_INFO, LOSS_TYPES, PairLossResult


@dataclass
class SPALossOutput:
    """Everything one loss call knows. Only `loss` carries a gradient."""

    loss: torch.Tensor  # scalar: mean over pairs
    losses: torch.Tensor  # [P]
    chosen_logps: torch.Tensor  # [P] policy log pi(y_w|x) (summed, or averaged)
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor  # [P] beta * (policy - reference) log-prob of y_w
    rejected_rewards: torch.Tensor
    noise_margin: torch.Tensor  # [P] SPA's m~ (beta * z without extrapolation)
    confident: torch.Tensor  # [P] bool: m~ > tau (all True when tau is None)

    METRIC_NAMES = (
        "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected", "spa/flagged_fraction", "spa/noise_margin",
    )  # fmt: skip

    def metric_values(self) -> torch.Tensor:
        """`METRIC_NAMES`' values as one tensor on the loss's device: no host sync."""
        margins = self.chosen_rewards - self.rejected_rewards
        return torch.stack([
            self.loss.detach().float(),
            self.chosen_rewards.mean(), self.rejected_rewards.mean(), margins.mean(),
            (margins > 0).float().mean(),
            self.chosen_logps.mean(), self.rejected_logps.mean(),
            (~self.confident).float().mean(), self.noise_margin.mean(),
        ])  # fmt: skip

    def metrics(self) -> dict[str, float]:
        """The statistics TRL and Liger log, plus SPA's flagged fraction (one device sync)."""
        return dict(zip(self.METRIC_NAMES, self.metric_values().tolist(), strict=True))


def spa_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    extrapolated_logps: torch.Tensor | None = None,
    num_pairs: int | None = None,
    beta: float = 0.1,
    alpha: float = 0.0,
    tau: float | None = None,
    loss_type: str = "sigmoid",
    label_smoothing: float | torch.Tensor = 0.0,
    average_log_prob: bool = False,
    gamma: float = 0.0,
    discopop_tau: float = 0.05,
    backend: Backend = "auto",
) -> SPALossOutput:
    """SPA's self-refinement loss (plain DPO when alpha = 0) from per-token log-probs.

    Args:
        policy_logps: per-token policy log-probs (e.g. `linear_logprobs(...).policy`).
        reference_logps: same shape, the DPO reference; None means reference-free.
        seq_ids: same shape, int: the sequence each token belongs to (negative: none).
            When None, `policy_logps` must be [2P, T] with one sequence per row, and `mask`
            (bool, [2P, T], optional) marks the tokens that count.
        extrapolated_logps: DND's log-probs of the extrapolated logits; the noise margin
            uses them in place of the policy's.
        num_pairs: P; inferred from the largest sequence id when None.
        beta: DPO temperature.
        alpha: SPA's smoothing weight alpha_t for pairs flagged as noisy (needs `tau`).
        tau: noise threshold; pairs with margin <= tau are flagged. None: flag nothing.
        loss_type: one of `LOSS_TYPES`: "sigmoid" (DPO/cDPO), "robust" (rDPO), "ipo", "hinge",
            Liger's and TRL's other pair losses, and "orpo" (reference-free); formulas in
            `selfee_fast.kernels.spa_loss`.
        label_smoothing: uniform label smoothing for sigmoid (cDPO) and robust; EXO's
            target probability (required, in (0, 1)) for exo_pair. A [P] tensor gives each
            pair its own (soft labels: 1 - the probability that the chosen response is better);
            its range is checked where it lies, so pass it on the CPU to keep the GPU unsynced.
        average_log_prob: length-normalise each sequence's log-prob.
        gamma: target margin subtracted from beta * z in the sigmoid loss (SimPO's gamma).
        discopop_tau: DiscoPOP's modulation temperature.
    """
    _check_loss_arguments(beta, alpha, tau, loss_type, smoothing_range(label_smoothing), gamma, discopop_tau)
    if reference_logps is not None and not LOSS_TYPE_INFO[loss_type].takes_reference:
        raise ValueError(f"loss_type={loss_type!r} is reference-free: pass reference_logps=None")
    tensors = {"reference_logps": reference_logps, "extrapolated_logps": extrapolated_logps}
    if not isinstance(policy_logps, torch.Tensor) or not policy_logps.dtype.is_floating_point:
        raise TypeError("policy_logps must be a floating-point tensor of per-token log-probs")
    for name, t in tensors.items():
        if t is not None and t.shape != policy_logps.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but policy_logps is {tuple(policy_logps.shape)}")
    if seq_ids is None:
        if policy_logps.dim() != 2 or policy_logps.shape[0] % 2:
            raise ValueError(
                f"without seq_ids, policy_logps must be [2P, T] (one sequence per row), got {tuple(policy_logps.shape)}"
            )
        # Every row is a sequence, even one whose tokens are all masked.
        if num_pairs not in (None, policy_logps.shape[0] // 2):
            raise ValueError(
                f"num_pairs={num_pairs} but policy_logps has {policy_logps.shape[0]} rows, i.e. "
                f"{policy_logps.shape[0] // 2} pairs (one sequence per row without seq_ids)"
            )
        num_pairs = policy_logps.shape[0] // 2
    seq_ids = _sequence_ids(policy_logps, seq_ids, mask)
    order, offsets = _sequence_layout(seq_ids, num_pairs)
    pairs = (offsets.numel() - 1) // 2
    if isinstance(label_smoothing, torch.Tensor) and label_smoothing.shape != (pairs,):
        raise ValueError(f"label_smoothing holds {tuple(label_smoothing.shape)} values for {pairs} pairs: pass [P]")

    flat = {k: (v.detach().reshape(-1).float().contiguous() if v is not None else None) for k, v in tensors.items()}
    options = dict(
        beta=beta, alpha=alpha, tau=tau, label_smoothing=label_smoothing,
        loss_type=loss_type, average_log_prob=average_log_prob, gamma=gamma, discopop_tau=discopop_tau,
    )  # fmt: skip
    loss, *fields = _SPALossFunction.apply(
        policy_logps, flat["reference_logps"], flat["extrapolated_logps"], order, offsets,
        use_triton(policy_logps.device, backend), options,
    )  # fmt: skip
    result = PairLossResult(*fields)
    return SPALossOutput(
        loss=loss,
        losses=result.losses,
        chosen_logps=result.chosen,
        rejected_logps=result.rejected,
        ref_chosen_logps=result.ref_chosen,
        ref_rejected_logps=result.ref_rejected,
        chosen_rewards=beta * (result.chosen - result.ref_chosen),
        rejected_rewards=beta * (result.rejected - result.ref_rejected),
        noise_margin=result.noise_margin,
        confident=result.confident,
    )


class _SPALossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, policy_logps, reference, extrapolated, order, offsets, triton, options):
        if triton:
            from .kernels.spa_loss import spa_pair_loss as pair_loss
        else:
            from .kernels.spa_loss import spa_pair_loss_reference as pair_loss
        policy = policy_logps.detach().reshape(-1).float().contiguous()
        result = pair_loss(policy, reference, extrapolated, order, offsets, **options)
        num_pairs = result.losses.numel()
        loss = result.losses.double().sum() / max(num_pairs, 1)
        ctx.save_for_backward(result.token_grad)
        ctx.shape, ctx.dtype = policy_logps.shape, policy_logps.dtype
        ctx.mark_non_differentiable(*result)
        return (loss.float(), *result)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_result):
        (token_grad,) = ctx.saved_tensors
        return (token_grad * grad_loss).reshape(ctx.shape).to(ctx.dtype), None, None, None, None, None, None


def smoothing_range(label_smoothing: float | torch.Tensor) -> tuple[float, float]:
    """The smallest and largest label smoothing a pair gets (a tensor: one host read of where it lies)."""
    if not isinstance(label_smoothing, torch.Tensor):
        return float(label_smoothing), float(label_smoothing)
    if label_smoothing.dim() != 1 or not label_smoothing.dtype.is_floating_point:
        raise ValueError(f"label_smoothing as a tensor must be 1-D floating point, one value per pair; "
                         f"got {label_smoothing.dtype} of shape {tuple(label_smoothing.shape)}")  # fmt: skip
    if label_smoothing.numel() == 0:
        return 0.0, 0.0
    low, high = torch.aminmax(label_smoothing.detach())
    return float(low), float(high)


def _check_loss_arguments(beta, alpha, tau, loss_type, smoothing_bounds, gamma, discopop_tau) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    low, high = smoothing_bounds
    # One value, or the range of the per-pair values; a NaN fails every comparison below.
    label_smoothing = low if low == high or (math.isnan(low) and math.isnan(high)) else f"from {low} to {high}"
    smoothing = LOSS_TYPE_INFO[loss_type].smoothing
    if smoothing == "required" and not (0.0 < low and high < 1.0):
        raise ValueError(f"label_smoothing must lie in (0, 1) for loss_type={loss_type!r}, got {label_smoothing}")
    if smoothing != "required" and not (0.0 <= low and high < 0.5):
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if not 0.0 <= alpha < 0.5:
        raise ValueError(f"alpha must lie in [0, 0.5), got {alpha}")
    if tau is not None and math.isnan(tau):
        raise ValueError("tau is NaN (a NaN margin in the window?): pass a number, +-inf, or None")
    if alpha > 0 and tau is None:
        raise ValueError("alpha > 0 smooths the pairs flagged as noisy, which needs a threshold: pass tau")
    if smoothing == "required" and alpha > 0:
        raise ValueError(
            f"loss_type={loss_type!r} has a fixed target probability; SPA's alpha needs 'sigmoid' or 'robust'"
        )
    if alpha > 0 and high + alpha >= 0.5:
        # A flagged pair's smoothing is their sum; at 0.5 it would carry no preference (robust: divide by 0).
        raise ValueError(f"label_smoothing + alpha must be < 0.5, got {label_smoothing} + {alpha}")
    if smoothing == "none" and (alpha > 0 or high > 0):
        raise ValueError(f"loss_type={loss_type!r} has no label smoothing; use 'sigmoid' or 'robust'")
    if gamma != 0 and loss_type != "sigmoid":
        raise ValueError(f"gamma is the sigmoid loss's target margin; loss_type={loss_type!r} has none")
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma}")
    if not discopop_tau > 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")


def _sequence_ids(policy_logps: torch.Tensor, seq_ids: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    if seq_ids is not None:
        if mask is not None:
            raise ValueError("pass seq_ids or mask, not both (mark excluded tokens with seq_ids = -1)")
        if seq_ids.shape != policy_logps.shape:
            raise ValueError(
                f"seq_ids has shape {tuple(seq_ids.shape)} but policy_logps is {tuple(policy_logps.shape)}"
            )
        if seq_ids.dtype.is_floating_point or seq_ids.dtype == torch.bool:
            raise TypeError(f"seq_ids must be an integer tensor, got {seq_ids.dtype}")
        return seq_ids.reshape(-1).long()
    rows = torch.arange(policy_logps.shape[0], device=policy_logps.device)[:, None].expand(policy_logps.shape)
    if mask is None:
        return rows.reshape(-1)
    if mask.shape != policy_logps.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(policy_logps.shape)}, got {mask.dtype} {tuple(mask.shape)}"
        )
    return torch.where(mask, rows, -1).reshape(-1)


def _sequence_layout(seq_ids: torch.Tensor, num_pairs: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token positions grouped by sequence (stable) and the [2P + 1] offsets between groups."""
    member = seq_ids >= 0
    positions = member.nonzero().squeeze(1)
    ids = seq_ids[positions]
    largest = int(ids.max()) if ids.numel() else -1
    if num_pairs is None:
        if largest % 2 == 0:
            raise ValueError(
                f"the largest sequence id is {largest}, so the number of sequences ({largest + 1}) is odd; "
                "chosen and rejected need one each (pass num_pairs if trailing sequences are empty)"
            )
        num_pairs = (largest + 1) // 2
    elif largest >= 2 * num_pairs:
        raise ValueError(f"seq_ids contains {largest}, but num_pairs={num_pairs} allows ids below {2 * num_pairs}")
    if num_pairs == 0:
        raise ValueError("no preference pairs: every token has a negative sequence id")
    ids_sorted, perm = torch.sort(ids, stable=True)
    counts = torch.bincount(ids_sorted, minlength=2 * num_pairs)
    offsets = torch.zeros(2 * num_pairs + 1, dtype=torch.int64, device=seq_ids.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return positions[perm].contiguous(), offsets


class NoiseThreshold:
    """SPA's noise threshold tau over the most recent noise margins.

    The paper sets tau to the K-th percentile (K = 10%) of recent margins; the reference
    code keeps a window of the last 50 per-sample margins and takes the mean of the 6th and
    7th smallest. This class generalises that rule to any window and K: the position
    q = K * window, tau = mean of the floor(q)+1-th and floor(q)+2-th smallest (1-based), so
    window=50, K=0.1 reproduces the reference code exactly. Margins must be gathered over
    all processes before `update` (the reference code's per-GPU window was a bug).
    """

    def __init__(self, window: int = 50, percentile: float = 0.10):
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        if not 0.0 < percentile < 1.0:
            raise ValueError(f"percentile must lie in (0, 1), got {percentile}")
        self.window, self.percentile = window, percentile
        self._margins: deque[float] = deque(maxlen=window)

    def update(self, margins: torch.Tensor | list[float]) -> None:
        if isinstance(margins, torch.Tensor):
            margins = margins.detach().float().reshape(-1).tolist()
        self._margins.extend(margins)

    @property
    def tau(self) -> float | None:
        """None until the window is full: nothing is flagged before then."""
        if len(self._margins) < self.window:
            return None
        ordered = sorted(self._margins)
        # The epsilon keeps 0.29 * 100 = 28.999... at position 29, as the rule means.
        lower = min(math.floor(self.percentile * self.window + 1e-9), self.window - 2)
        return 0.5 * (ordered[lower] + ordered[lower + 1])

    def state_dict(self) -> dict:
        return {"window": self.window, "percentile": self.percentile, "margins": list(self._margins)}

    def load_state_dict(self, state: dict) -> None:
        self.__init__(state["window"], state["percentile"])
        self._margins.extend(state["margins"])
