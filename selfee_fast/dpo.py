"""`FusedLinearDPOLoss`: a drop-in for `liger_kernel.chunked_loss.LigerFusedLinearDPOLoss`.

Change the import and keep the call:

    loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
           nll_loss, chosen_rewards, rejected_rewards) = loss_fn(lm_head.weight, x, target, ref_x=..., ...)

with chosen rows stacked above rejected rows (`x` is [2B, T, H], `target` is [2B, T]).
Differences, all deliberate:
- policy and reference log-probs come from one fused sweep; no [chunk, T, V] logits;
- `label_smoothing` works with `loss_type="sigmoid"` (cDPO); Liger ignores it there;
- `forward` takes SPA's extras: `spa_alpha` and `tau` (self-refinement smoothing of pairs
  flagged as noisy) and `extrapolate` (lam of de-coupled noise detection);
- `compiled` and `chunk_size` are accepted and ignored (nothing is compiled or chunked by pairs);
- loss types: sigmoid, robust, ipo, hinge (Liger's others raise a clear error); ipo and
  hinge ignore `label_smoothing` with a warning, as Liger ignores it. IPO's log-probs are
  sequence sums unless `average_log_prob=True` (TRL's IPO always length-normalises; here
  the flag decides).
"""

from __future__ import annotations

import re
import warnings

import torch

from .backend import Backend
from .logprobs import linear_logprobs
from .loss import LOSS_TYPES, SPALossOutput, spa_loss


class FusedLinearDPOLoss(torch.nn.Module):
    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        *,
        deterministic: bool = False,
        backend: Backend = "auto",
    ):
        """Arguments mean what they mean in Liger; `alpha` weighs the NLL term of the chosen rows."""
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type must be one of {LOSS_TYPES} (Liger's others are not implemented), got {loss_type!r}"
            )
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
        if label_smoothing > 0 and loss_type in ("ipo", "hinge"):
            # Liger takes the value and ignores it; a config that ran there keeps running here.
            warnings.warn(
                f"loss_type={loss_type!r} has no label smoothing: label_smoothing={label_smoothing} is ignored",
                stacklevel=2,
            )
            label_smoothing = 0.0
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.compute_nll_loss = compute_nll_loss
        self.use_ref_model = use_ref_model
        self.average_log_prob = average_log_prob
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.deterministic = deterministic
        self.backend = backend

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        *,
        spa_alpha: float = 0.0,
        tau: float | None = None,
        extrapolate: float | None = None,
        return_output: bool = False,
    ):
        """Liger's call. With `return_output=True`, returns `(loss, aux, SPALossOutput)` for SPA's margins."""
        if target.dim() != 2 or target.shape[0] % 2:
            raise ValueError(f"target must be [2B, T] with chosen rows above rejected rows, got {tuple(target.shape)}")
        if self.use_ref_model and ref_input is None:
            raise ValueError("use_ref_model=True needs ref_input (the reference model's hidden states)")
        if extrapolate is not None and not self.use_ref_model:
            raise ValueError("extrapolate needs the reference model (use_ref_model=True)")
        use_ref = self.use_ref_model
        try:
            logps = linear_logprobs(
                _input, lin_weight, target, bias=bias,
                ref_hidden=ref_input if use_ref else None,
                ref_weight=ref_weight if use_ref else None,
                ref_bias=ref_bias if use_ref else None,
                extrapolate=extrapolate if use_ref else None,
                ignore_index=self.ignore_index, deterministic=self.deterministic, backend=self.backend,
            )  # fmt: skip
        except (TypeError, ValueError) as error:
            # linear_logprobs names its own arguments; a Liger user passed these.
            raise type(error)(_LIGER_NAMES.sub(lambda m: _AS_LIGER[m.group(0)], str(error))) from None
        mask = target != self.ignore_index
        out: SPALossOutput = spa_loss(
            logps.policy, logps.reference, mask=mask, extrapolated_logps=logps.extrapolated,
            beta=self.beta, alpha=spa_alpha, tau=tau, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, average_log_prob=self.average_log_prob, backend=self.backend,
        )  # fmt: skip

        num_pairs = target.shape[0] // 2
        loss = out.loss
        chosen_mask = mask[:num_pairs]
        nll_loss = -(logps.policy[:num_pairs] * chosen_mask).sum() / chosen_mask.sum().clamp(min=1)
        if self.compute_nll_loss:
            loss = loss + self.alpha * nll_loss
        else:
            nll_loss = torch.zeros((), device=loss.device)
        chosen_logits_mean, rejected_logits_mean = _logits_means(_input.detach(), lin_weight.detach(), bias, num_pairs)
        aux = (
            out.chosen_logps, out.rejected_logps, chosen_logits_mean, rejected_logits_mean,
            nll_loss, out.chosen_rewards, out.rejected_rewards,
        )  # fmt: skip
        return (loss, aux, out) if return_output else (loss, aux)


_AS_LIGER = {"ref_hidden": "ref_input", "hidden": "_input", "weight": "lin_weight", "targets": "target"}
# Argument names where a message uses them as names (before "has", "is", "must", "[", "(", ")", "," or ";").
_LIGER_NAMES = re.compile(r"(?<![\w.])(ref_hidden|hidden|weight|targets)(?=(?: has| is| must|\[| \(|\)|,|;))")


def _logits_means(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_pairs: int):
    """Mean logit over all positions and vocabulary of the chosen and rejected halves.

    sum_v z_v = h . sum_v W[v] + sum_v b_v, so the mean needs one [H] vector, not the logits.
    """
    weight_sum = weight.sum(dim=0, dtype=torch.float32)
    # In the input dtype (fp32 accumulation inside the matmul): an fp32 copy of hidden would
    # cost more memory than the whole fused loss.
    row_sums = (hidden @ weight_sum.to(hidden.dtype)).float()
    if bias is not None:
        row_sums = row_sums + bias.detach().float().sum()
    per_half = row_sums.reshape(2, num_pairs, -1).sum(dim=(1, 2)) / (row_sums[0].numel() * num_pairs * weight.shape[0])
    return per_half[0], per_half[1]
