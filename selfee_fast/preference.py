"""Drop-ins for Liger-Kernel's fused-linear preference losses: change the import, keep the call.

    from selfee_fast import FusedLinearSimPOLoss as LigerFusedLinearSimPOLoss   # also ORPO, CPO

Each class takes the constructor arguments of its Liger namesake, is called as
`loss_fn(lin_weight, _input, target, bias=None, ...)` with the chosen rows of `_input`
([2B, T, H]) stacked above the rejected rows, and returns Liger's `(loss, aux)` tuple.
The per-token log-probs come from one fused sweep of the LM head (no [tokens, vocab]
logits); the reference-free losses (SimPO, ORPO, CPO) have no reference sweep. The loss
itself is `spa_loss`, i.e. the one table of pair losses in `selfee_fast.kernels.spa_loss`.

Differences from Liger, all deliberate:
- `compiled` and `chunk_size` are accepted and ignored (nothing is compiled or chunked by pairs);
- ORPO's `nll_target`, when given, costs a second sweep over the chosen rows (the NLL term
  reads other tokens than the odds ratio);
- a `label_smoothing` outside [0, 0.5) is refused when the module is built, not computed.

No `FusedLinearKTOLoss`: KTO is unpaired. Each row is one sequence with its own label and
its own loss, shifted by a batch-level KL estimate, while the pair kernel's program owns
sequence k and sequence k + P and returns one loss for both. KTO would need a per-sequence
kernel with its own layout, i.e. a second kernel family.
"""

from __future__ import annotations

import re

import torch

from .backend import Backend
from .logprobs import linear_logprobs
from .loss import SPALossOutput, spa_loss


class FusedLinearPairLoss(torch.nn.Module):
    """Shared forward of the drop-ins: fused log-probs, the table's pair loss, Liger's outputs."""

    def __init__(self, *, ignore_index: int, deterministic: bool, backend: Backend):
        super().__init__()
        self.ignore_index = ignore_index
        self.deterministic = deterministic
        self.backend = backend

    def _pair_loss(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        loss_type: str,
        beta: float,
        average_log_prob: bool,
        compute_nll_loss: bool,
        nll_weight: float,
        label_smoothing: float = 0.0,
        gamma: float = 0.0,
        discopop_tau: float = 0.05,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        nll_target: torch.Tensor | None = None,
        spa_alpha: float = 0.0,
        tau: float | None = None,
        extrapolate: float | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], SPALossOutput]:
        """Returns the loss (pair loss + nll_weight * NLL), Liger's seven aux outputs and `spa_loss`'s output."""
        if target.dim() != 2 or target.shape[0] % 2:
            raise ValueError(f"target must be [2B, T] with chosen rows above rejected rows, got {tuple(target.shape)}")
        try:
            logps = linear_logprobs(
                _input, lin_weight, target, bias=bias, ref_hidden=ref_input, ref_weight=ref_weight,
                ref_bias=ref_bias, extrapolate=extrapolate, ignore_index=self.ignore_index,
                deterministic=self.deterministic, backend=self.backend,
            )  # fmt: skip
        except (TypeError, ValueError) as error:
            raise _as_liger_error(error) from None
        mask = target != self.ignore_index
        out = spa_loss(
            logps.policy, logps.reference, mask=mask, extrapolated_logps=logps.extrapolated,
            beta=beta, alpha=spa_alpha, tau=tau, loss_type=loss_type, label_smoothing=label_smoothing,
            average_log_prob=average_log_prob, gamma=gamma, discopop_tau=discopop_tau, backend=self.backend,
        )  # fmt: skip

        num_pairs = target.shape[0] // 2
        loss = out.loss
        if compute_nll_loss:
            if nll_target is None:
                chosen_logps, chosen_mask = logps.policy[:num_pairs], mask[:num_pairs]
            else:
                chosen_nll_target = nll_target[:num_pairs]
                try:
                    chosen_logps = linear_logprobs(
                        _input[:num_pairs], lin_weight, chosen_nll_target, bias=bias, ignore_index=self.ignore_index,
                        deterministic=self.deterministic, backend=self.backend,
                    ).policy  # fmt: skip
                except (TypeError, ValueError) as error:
                    raise _as_liger_error(error) from None
                chosen_mask = chosen_nll_target != self.ignore_index
            nll_loss = -(chosen_logps * chosen_mask).sum() / chosen_mask.sum().clamp(min=1)
            loss = loss + nll_weight * nll_loss
        else:
            nll_loss = torch.zeros((), device=loss.device)
        chosen_logits_mean, rejected_logits_mean = _logits_means(_input.detach(), lin_weight.detach(), bias, num_pairs)
        aux = (
            out.chosen_logps, out.rejected_logps, chosen_logits_mean, rejected_logits_mean,
            nll_loss, out.chosen_rewards, out.rejected_rewards,
        )  # fmt: skip
        return loss, aux, out


class FusedLinearSimPOLoss(FusedLinearPairLoss):
    """Drop-in for `LigerFusedLinearSimPOLoss`: -log s(beta * (avg logp_w - avg logp_l) - gamma), no reference."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        gamma: float = 0.5,
        chunk_size: int = 1,
        *,
        deterministic: bool = False,
        backend: Backend = "auto",
    ):
        """Arguments mean what they mean in Liger; `alpha` weighs the NLL term of the chosen rows."""
        super().__init__(ignore_index=ignore_index, deterministic=deterministic, backend=backend)
        _check_smoothing(label_smoothing, "SimPO")
        self.beta, self.alpha, self.gamma = beta, alpha, gamma
        self.label_smoothing = label_smoothing
        self.compute_nll_loss = compute_nll_loss
        self.compiled, self.chunk_size = compiled, chunk_size

    def forward(
        self, lin_weight: torch.Tensor, _input: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Liger's call: `(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
        nll_loss, chosen_rewards, rejected_rewards))`."""
        loss, aux, _ = self._pair_loss(
            lin_weight, _input, target, bias, loss_type="sigmoid", beta=self.beta, gamma=self.gamma,
            label_smoothing=self.label_smoothing, average_log_prob=True,
            compute_nll_loss=self.compute_nll_loss, nll_weight=self.alpha,
        )  # fmt: skip
        return loss, aux


class FusedLinearCPOLoss(FusedLinearPairLoss):
    """Drop-in for `LigerFusedLinearCPOLoss`: -log s(beta * (logp_w - logp_l)) + alpha * NLL, no reference."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        *,
        deterministic: bool = False,
        backend: Backend = "auto",
    ):
        """Arguments mean what they mean in Liger; `alpha` weighs the NLL term of the chosen rows."""
        super().__init__(ignore_index=ignore_index, deterministic=deterministic, backend=backend)
        _check_smoothing(label_smoothing, "CPO")
        self.beta, self.alpha = beta, alpha
        self.label_smoothing = label_smoothing
        self.compute_nll_loss = compute_nll_loss
        self.average_log_prob = average_log_prob
        self.compiled, self.chunk_size = compiled, chunk_size

    def forward(
        self, lin_weight: torch.Tensor, _input: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Liger's call and outputs (as `FusedLinearSimPOLoss.forward`)."""
        loss, aux, _ = self._pair_loss(
            lin_weight, _input, target, bias, loss_type="sigmoid", beta=self.beta,
            label_smoothing=self.label_smoothing, average_log_prob=self.average_log_prob,
            compute_nll_loss=self.compute_nll_loss, nll_weight=self.alpha,
        )  # fmt: skip
        return loss, aux


class FusedLinearORPOLoss(FusedLinearPairLoss):
    """Drop-in for `LigerFusedLinearORPOLoss`: NLL - beta * log s(log odds ratio), on average log-probs."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        chunk_size: int = 1,
        *,
        deterministic: bool = False,
        backend: Backend = "auto",
    ):
        super().__init__(ignore_index=ignore_index, deterministic=deterministic, backend=backend)
        self.beta = beta
        self.compute_nll_loss = compute_nll_loss
        self.compiled, self.chunk_size = compiled, chunk_size

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        nll_target: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Liger's call: aux is SimPO's seven outputs, then the mean log s(log odds ratio) and the
        mean log odds ratio. `nll_target` ([2B, T]) replaces `target` in the NLL term."""
        if nll_target is not None and nll_target.shape != target.shape:
            raise ValueError(f"nll_target has shape {tuple(nll_target.shape)} but target is {tuple(target.shape)}")
        loss, aux, out = self._pair_loss(
            lin_weight, _input, target, bias, loss_type="orpo", beta=self.beta, average_log_prob=True,
            compute_nll_loss=self.compute_nll_loss, nll_weight=1.0, nll_target=nll_target,
        )  # fmt: skip
        chosen, rejected = out.chosen_logps.double(), out.rejected_logps.double()
        log_odds = (chosen - torch.log1p(-torch.exp(chosen))) - (rejected - torch.log1p(-torch.exp(rejected)))
        log_odds_ratio = torch.nn.functional.logsigmoid(log_odds).mean().float()
        return loss, (*aux, log_odds_ratio, log_odds.mean().float())


def _check_smoothing(label_smoothing: float, name: str) -> None:
    """The sigmoid loss's smoothing: beyond 0.5 it would prefer the rejected response."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0.0, 0.5) for {name}. Got {label_smoothing}.")


_AS_LIGER = {"ref_hidden": "ref_input", "hidden": "_input", "weight": "lin_weight", "targets": "target"}
# Argument names where a message uses them as names (before "has", "is", "must", "[", "(", ")", "," or ";").
_LIGER_NAMES = re.compile(r"(?<![\w.])(ref_hidden|hidden|weight|targets)(?=(?: has| is| must|\[| \(|\)|,|;))")


def _as_liger_error(error: Exception) -> Exception:
    """The same error with `linear_logprobs`' argument names replaced by the ones a Liger user passed."""
    return type(error)(_LIGER_NAMES.sub(lambda m: _AS_LIGER[m.group(0)], str(error)))


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
