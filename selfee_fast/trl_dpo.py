"""`FusedDPOTrainer`: TRL's `DPOTrainer` with its loss computed by `FusedLinearDPOLoss`.

Older TRL releases had a `use_liger_loss` option that built `LigerFusedLinearDPOLoss` from
the trainer's settings and fed it the last hidden states of the policy and the reference
model. The installed TRL line (1.x) has no such option: its `DPOTrainer` patches the
model's forward with a fused LM head of its own and computes every loss type in
`_compute_loss`. The hook that remains supported is `Trainer.compute_loss`, so
`FusedDPOTrainer` overrides it and hands the hidden states to `FusedLinearDPOLoss`:

    from selfee_fast.trl_dpo import FusedDPOTrainer

    trainer = FusedDPOTrainer(model=model, ref_model=ref_model, args=DPOConfig(...),
                              train_dataset=..., processing_class=tokenizer)  # as DPOTrainer

The loss equals TRL's own for the settings it accepts: one loss type of
`selfee_fast.dpo.DPO_LOSS_TYPES` (optionally with "sft", which becomes the NLL term),
`beta`, `label_smoothing` (read, as TRL reads it, by robust and exo_pair only),
`discopop_tau`, and IPO length-normalised as TRL does. Settings TRL has and this loss has
not (f-divergences, `ld_alpha`, WPO weighting, precomputed reference log-probs, MoE
auxiliary losses, PEFT without an explicit `ref_model`, vision inputs) are refused when
the trainer is built. The hidden states come through `model(...)`, not around it, so
wrappers such as DDP see the call. Logged: TRL's `rewards/*` and `logps/*` metrics; its
`entropy`, `logits/*` and `mean_token_accuracy` are not (they read per-token logits).
Requires `trl` (not a dependency of this package).
"""

from __future__ import annotations

import functools

import torch
from trl import DPOTrainer

from .dpo import DPO_LOSS_TYPES, FusedLinearDPOLoss

# Batch entries that are not model inputs.
_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
# TRL reads label_smoothing in these loss types only (its sigmoid ignores it; ours would smooth).
_SMOOTHED_BY_TRL = ("robust", "exo_pair")


class FusedDPOTrainer(DPOTrainer):
    """`DPOTrainer` whose training loss is `FusedLinearDPOLoss` (no [tokens, vocab] logits)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_loss = _fused_loss_for(self)
        for causal_lm in (_causal_lm(self.model), _causal_lm(self.ref_model)):
            _add_hidden_states_forward(causal_lm)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:  # evaluation asking for logits: TRL's own path builds them
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, self.fused_loss.ignore_index)[:, 1:]
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        hidden = model(**model_kwargs, selfee_hidden_states=True)[:, :-1]
        with torch.no_grad():
            ref_hidden = self.ref_model(**model_kwargs, selfee_hidden_states=True)[:, :-1]
        head = _causal_lm(model).get_output_embeddings()
        ref_head = _causal_lm(self.ref_model).get_output_embeddings()
        # Under mixed precision the backbones return bf16/fp16 states for fp32 heads; the fused
        # loss wants one dtype per head, and the head's keeps its log-probs at full precision.
        loss, aux = self.fused_loss(
            head.weight, hidden.to(head.weight.dtype), labels.to(hidden.device), head.bias,
            ref_hidden.to(ref_head.weight.dtype), ref_head.weight.detach(), _detached(ref_head.bias),
        )  # fmt: skip
        self._log_pair_metrics(mode, chosen_logps=aux[0], rejected_logps=aux[1], chosen_rewards=aux[5],
                               rejected_rewards=aux[6])  # fmt: skip
        return loss

    def _log_pair_metrics(self, mode, *, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards) -> None:
        """The reward and log-prob metrics under TRL's names."""
        gather = self.accelerator.gather
        chosen_rewards, rejected_rewards = gather(chosen_rewards.detach()), gather(rejected_rewards.detach())
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(chosen_rewards.mean().item())
        metrics["rewards/rejected"].append(rejected_rewards.mean().item())
        metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())


def _fused_loss_for(trainer: DPOTrainer) -> FusedLinearDPOLoss:
    """The loss module for the trainer's settings; refuses the settings it cannot reproduce."""
    args = trainer.args
    weights = dict(zip(trainer.loss_types, trainer.loss_weights, strict=True))
    sft_weight = weights.pop("sft", None)
    unsupported = {
        "several preference loss types": len(weights) != 1,
        f"f_divergence_type={trainer.f_divergence_type!r}": trainer.f_divergence_type != "reverse_kl",
        "ld_alpha": trainer.ld_alpha is not None,
        "use_weighting": trainer.use_weighting,
        "precompute_ref_log_probs": trainer.precompute_ref_logps,
        "an MoE router auxiliary loss": trainer.aux_loss_enabled,
        "a PEFT model without an explicit ref_model": trainer.ref_model is None,
        "vision inputs": getattr(trainer, "_is_vision_dataset", False),
    }
    refused = [name for name, present in unsupported.items() if present]
    if refused:
        raise ValueError(f"FusedDPOTrainer does not support {', '.join(refused)}; use DPOTrainer")
    ((loss_type, weight),) = weights.items()
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"FusedDPOTrainer supports loss types {DPO_LOSS_TYPES} (and 'sft'), got {loss_type!r}")
    if weight != 1.0:
        # A weight w scales the preference loss; the NLL weight is then relative to it.
        raise ValueError(f"FusedDPOTrainer needs the preference loss weight to be 1.0, got {weight}")
    return FusedLinearDPOLoss(
        beta=trainer.beta,
        alpha=sft_weight or 0.0,
        compute_nll_loss=sft_weight is not None,
        average_log_prob=loss_type == "ipo",  # TRL's IPO length-normalises the log-ratios
        loss_type=loss_type,
        label_smoothing=trainer.label_smoothing if loss_type in _SMOOTHED_BY_TRL else 0.0,
        discopop_tau=args.discopop_tau,
    )


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside wrappers (DDP, PEFT): the module that owns the backbone and the LM head."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _add_hidden_states_forward(causal_lm: torch.nn.Module) -> None:
    """`causal_lm(..., selfee_hidden_states=True)` returns the backbone's last hidden states, nothing else."""
    if getattr(causal_lm, "_selfee_hidden_states_forward", False):
        return
    wrapped = causal_lm.forward

    @functools.wraps(wrapped)
    def forward(*args, selfee_hidden_states: bool = False, **kwargs):
        if not selfee_hidden_states:
            return wrapped(*args, **kwargs)
        kwargs["use_cache"] = False
        return causal_lm.base_model(*args, **kwargs).last_hidden_state

    causal_lm.forward = forward
    causal_lm._selfee_hidden_states_forward = True


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return tensor.detach() if tensor is not None else None
