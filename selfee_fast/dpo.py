"""`FusedLinearDPOLoss`: a drop-in for `liger_kernel.chunked_loss.LigerFusedLinearDPOLoss`.

Change the import and keep the call:

    loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
           nll_loss, chosen_rewards, rejected_rewards) = loss_fn(lm_head.weight, x, target, ref_x=..., ...)

with chosen rows stacked above rejected rows (`x` is [2B, T, H], `target` is [2B, T]).
Every loss type of Liger's DPO loss is here (sigmoid, hinge, exo_pair, nca_pair, robust,
bco_pair, sppo_hard, apo_zero, apo_down, discopop), with its constructor arguments,
outputs and refusals (the same exception for the same bad setting). Differences, all deliberate:
- policy and reference log-probs come from one fused sweep; no [chunk, T, V] logits;
- `label_smoothing` works with `loss_type="sigmoid"` (cDPO); Liger ignores it there;
- `loss_type="ipo"` works (Liger refuses it); its log-probs are sequence sums unless
  `average_log_prob=True` (TRL's IPO always length-normalises; here the flag decides);
- `label_smoothing` given to a loss without smoothing (hinge, ipo, nca_pair, bco_pair,
  sppo_hard, apo_zero, apo_down, discopop) is ignored with a warning; Liger ignores it silently;
- `ref_weight=None` shares the policy's head (Liger needs it spelled out);
- `forward` takes SPA's extras: `spa_alpha` and `tau` (self-refinement smoothing of pairs
  flagged as noisy) and `extrapolate` (lam of de-coupled noise detection);
- `compiled` and `chunk_size` are accepted and ignored (nothing is compiled or chunked by pairs).
"""

from __future__ import annotations

import warnings

import torch

from .backend import Backend
from .kernels.spa_loss import LOSS_TYPE_INFO, LOSS_TYPES
from .preference import FusedLinearPairLoss

# Liger's DPO loss types, and ipo; orpo is a loss of its own (FusedLinearORPOLoss).
DPO_LOSS_TYPES = tuple(name for name in LOSS_TYPES if LOSS_TYPE_INFO[name].takes_reference)


class FusedLinearDPOLoss(FusedLinearPairLoss):
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
        super().__init__(ignore_index=ignore_index, deterministic=deterministic, backend=backend)
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"Unsupported loss_type: {loss_type}. Supported types are: {', '.join(DPO_LOSS_TYPES)}")
        smoothing = LOSS_TYPE_INFO[loss_type].smoothing
        if smoothing == "required" and not label_smoothing > 0.0:
            raise ValueError(f"label_smoothing must be > 0 for loss_type={loss_type!r}. The EXO paper recommends 1e-3.")
        if smoothing == "required" and not label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be < 1 for loss_type={loss_type!r}. Got {label_smoothing}.")
        if smoothing == "optional" and not 0.0 <= label_smoothing < 0.5:
            raise ValueError(
                f"label_smoothing must lie in [0.0, 0.5) for loss_type={loss_type!r}. Got {label_smoothing}."
            )
        if smoothing == "none" and label_smoothing != 0:
            # Liger takes the value and ignores it; a config that ran there keeps running here.
            warnings.warn(
                f"loss_type={loss_type!r} has no label smoothing: label_smoothing={label_smoothing} is ignored",
                stacklevel=2,
            )
            label_smoothing = 0.0
        if not discopop_tau > 0:
            raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
        self.beta = beta
        self.alpha = alpha
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.discopop_tau = discopop_tau

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
        if self.use_ref_model and ref_input is None:
            raise ValueError("use_ref_model=True needs ref_input (the reference model's hidden states)")
        if extrapolate is not None and not self.use_ref_model:
            raise ValueError("extrapolate needs the reference model (use_ref_model=True)")
        use_ref = self.use_ref_model
        loss, aux, out = self._pair_loss(
            lin_weight, _input, target, bias, loss_type=self.loss_type, beta=self.beta,
            label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau,
            average_log_prob=self.average_log_prob, compute_nll_loss=self.compute_nll_loss, nll_weight=self.alpha,
            ref_input=ref_input if use_ref else None, ref_weight=ref_weight if use_ref else None,
            ref_bias=ref_bias if use_ref else None, extrapolate=extrapolate if use_ref else None,
            spa_alpha=spa_alpha, tau=tau,
        )  # fmt: skip
        return (loss, aux, out) if return_output else (loss, aux)
