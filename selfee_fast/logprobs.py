"""`linear_logprobs`: per-token log-probabilities through an LM head, never materialising logits.

This is the only place that checks arguments and picks an implementation; the Triton
kernels (`selfee_fast.kernels`) and the chunked PyTorch path (`selfee_fast.chunked`) trust
what they are given.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .backend import Backend, use_triton
from .chunked import DEFAULT_CHUNK_BYTES, ChunkedLinearLogprobs

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class LogProbs(NamedTuple):
    """Per-token log-probabilities, shaped like `targets`; 0 where the target is ignored.

    fp32 (fp64 when the inputs are fp64). Only `policy` carries a gradient.
    """

    policy: torch.Tensor
    reference: torch.Tensor | None
    extrapolated: torch.Tensor | None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    extrapolate: float | None = None,
    ignore_index: int = -100,
    deterministic: bool = False,
    backend: Backend = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> LogProbs:
    """`log_softmax(hidden @ weight.T + bias)[targets]` per token, for policy and reference in one sweep.

    Args:
        hidden: [..., H] final hidden states of the policy.
        weight: [V, H] LM head. Its gradient is computed only if it requires grad.
        targets: [...] next-token ids; positions equal to `ignore_index` get 0 and cost no work.
        bias: optional [V] head bias.
        ref_hidden: [..., H] hidden states of the reference model, same shape as `hidden`.
        ref_weight, ref_bias: the reference head; by default the policy's head, bias
            included, is shared (each weight tile is then loaded once for both).
        extrapolate: lam of SPA's de-coupled noise detection: also return log-probs of the
            logits (1 + lam) * z_policy - lam * z_reference. Needs `ref_hidden`.
        deterministic: bit-for-bit identical results on repeat (no atomics in the backward).
        backend: "auto" (Triton on CUDA or under the interpreter, else chunked PyTorch),
            "triton" or "torch".
        chunk_bytes: memory budget of the logits tiles on the PyTorch path (all kinds together).

    Returns:
        LogProbs(policy, reference, extrapolated), the last two None when not requested.
    """
    _check_inputs(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, extrapolate, chunk_bytes)
    if ref_hidden is not None and ref_weight is None and ref_bias is None:
        ref_bias = bias  # a shared head shares its bias too
    hidden_size, vocab = weight.shape[1], weight.shape[0]
    out_shape = targets.shape
    hidden2d = _rows_contiguous(hidden.reshape(-1, hidden_size))
    ref_hidden2d = _rows_contiguous(ref_hidden.reshape(-1, hidden_size)) if ref_hidden is not None else None
    weight = _rows_contiguous(weight)
    ref_weight = _rows_contiguous(ref_weight) if ref_weight is not None else None
    targets1d = targets.reshape(-1)

    active = targets1d != ignore_index
    rows = active.nonzero().squeeze(1)
    active_targets = targets1d[rows]
    _check_target_range(active_targets, rows, vocab, targets.shape, ignore_index)

    if use_triton(hidden.device, backend):
        from .triton_logprobs import TritonLinearLogprobs

        policy, reference, extrapolated = TritonLinearLogprobs.apply(
            hidden2d, weight, bias, ref_hidden2d, ref_weight, ref_bias,
            rows, active_targets, extrapolate, deterministic,
        )  # fmt: skip
    else:
        want_hidden_grad = torch.is_grad_enabled() and hidden.requires_grad
        policy, reference, extrapolated = ChunkedLinearLogprobs.apply(
            hidden2d, weight, bias, ref_hidden2d, ref_weight, ref_bias,
            rows, active_targets, extrapolate, want_hidden_grad, chunk_bytes,
        )  # fmt: skip

    def scatter(values: torch.Tensor) -> torch.Tensor:
        full = values.new_zeros(targets1d.shape[0])
        return full.index_copy(0, rows, values).reshape(out_shape)

    return LogProbs(
        policy=scatter(policy),
        reference=scatter(reference) if ref_hidden is not None else None,
        extrapolated=scatter(extrapolated) if extrapolate is not None else None,
    )


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels take any row stride but need unit stride along the hidden dimension.
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_inputs(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, extrapolate, chunk_bytes) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise TypeError("hidden must be a tensor of shape [..., H]")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [V, H] tensor, got shape {tuple(getattr(weight, 'shape', ()))}")
    vocab, hidden_size = weight.shape
    if hidden.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden has size {hidden.shape[-1]} in its last dimension but weight is [V={vocab}, H={hidden_size}]"
        )
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(
            f"targets must be an integer tensor of token ids, got {getattr(targets, 'dtype', type(targets))}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)} but hidden is {tuple(hidden.shape)}: expected targets {tuple(hidden.shape[:-1])}"
        )
    if vocab == 0 or hidden_size == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    for name, t in (("hidden", hidden), ("weight", weight), ("ref_hidden", ref_hidden), ("ref_weight", ref_weight),
                    ("bias", bias), ("ref_bias", ref_bias)):  # fmt: skip
        if t is None:
            continue
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden is {hidden.dtype} but weight is {weight.dtype}: cast the hidden states to the head's dtype"
        )
    if ref_hidden is not None:
        ref_head, ref_head_name = (ref_weight, "ref_weight") if ref_weight is not None else (weight, "weight")
        if ref_hidden.dtype != ref_head.dtype:
            raise TypeError(
                f"ref_hidden is {ref_hidden.dtype} but its head ({ref_head_name}) is {ref_head.dtype}: "
                "cast the reference hidden states to that head's dtype"
            )
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if hidden.dtype == torch.float64 and hidden.device.type == "cuda":
        raise TypeError("float64 is supported on the CPU path only; use float32 or bfloat16 on CUDA")
    for name, b in (("bias", bias), ("ref_bias", ref_bias)):
        if b is not None and b.shape != (vocab,):
            raise ValueError(f"{name} must have shape ({vocab},) to match weight, got {tuple(b.shape)}")
    if ref_hidden is not None and ref_hidden.shape != hidden.shape:
        raise ValueError(f"ref_hidden has shape {tuple(ref_hidden.shape)} but hidden is {tuple(hidden.shape)}")
    if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
        raise ValueError("ref_weight / ref_bias given without ref_hidden: pass the reference hidden states too")
    if ref_weight is not None and ref_weight.shape != weight.shape:
        raise ValueError(f"ref_weight has shape {tuple(ref_weight.shape)} but weight is {tuple(weight.shape)}")
    if extrapolate is not None:
        if ref_hidden is None:
            raise ValueError("extrapolate needs the reference: pass ref_hidden")
        if isinstance(extrapolate, bool) or not isinstance(extrapolate, (int, float)):
            raise ValueError(f"extrapolate must be a finite number >= 0, got {extrapolate!r}")
        if not math.isfinite(extrapolate) or extrapolate < 0:
            raise ValueError(f"extrapolate must be a finite number >= 0, got {extrapolate!r}")
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")


def _check_target_range(active_targets, rows, vocab, shape, ignore_index) -> None:
    if active_targets.numel() == 0:
        return
    bad = (active_targets < 0) | (active_targets >= vocab)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        position = tuple(int(i) for i in torch.unravel_index(rows[first], shape))
        raise ValueError(
            f"targets{list(position)} = {int(active_targets[first])} is outside the vocabulary [0, {vocab}) "
            f"of weight; mask positions with ignore_index={ignore_index}"
        )
