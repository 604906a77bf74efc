"""The Triton backward kernels (interpreted on the CPU) against their float64 PyTorch twin."""

import pytest
import torch
from conftest import assert_close
from test_logprobs_forward import make_inputs

import selfee_fast.kernels.logprobs_backward as backward_module
from selfee_fast.kernels.config import INTERPRETER_CONFIG
from selfee_fast.kernels.logprobs_backward import (
    gradient_scale,
    logit_gradients,
    logprobs_backward,
    logprobs_backward_reference,
)
from selfee_fast.kernels.logprobs_forward import logprobs_forward


def run_backward(inputs, rows, targets, upstream, *, splits=1, deterministic=False, want_weight=True, want_bias=None):
    hidden, weight, bias = inputs["hidden"], inputs["weight"], inputs["bias"]
    stats = logprobs_forward(hidden, weight, rows, targets, bias=bias)
    want_bias = want_weight if want_bias is None else want_bias
    compact = torch.zeros(rows.numel(), hidden.shape[1])  # row j: the gradient of hidden[rows[j]]
    grad_weight = torch.zeros(weight.shape) if want_weight else None
    grad_bias = torch.zeros(weight.shape[0]) if want_bias and bias is not None else None
    logprobs_backward(
        hidden, weight, rows, targets, stats.lse, stats.others_lse, upstream,
        bias=bias, grad_hidden=compact, grad_weight=grad_weight, grad_bias=grad_bias,
        deterministic=deterministic, config=INTERPRETER_CONFIG.with_overrides(splits=splits),
    )  # fmt: skip
    grad_hidden = torch.zeros(hidden.shape).index_copy(0, rows, compact)
    return grad_hidden, grad_weight, grad_bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3])
def test_matches_reference(dtype, splits):
    inputs, rows, targets = make_inputs(29, 45, 203, dtype)
    upstream = torch.randn(rows.numel())
    got = run_backward(inputs, rows, targets, upstream, splits=splits)
    want = logprobs_backward_reference(inputs["hidden"], inputs["weight"], rows, targets, upstream, bias=inputs["bias"])
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, dtype, float(w.abs().max()))


def test_deterministic_is_bit_for_bit(monkeypatch):
    """The interpreter runs programs one by one, so atomics repeat bit for bit there too: the
    test also checks that deterministic mode launches one split (no atomics)."""
    real_splits, chosen = backward_module.number_of_splits, []
    monkeypatch.setattr(backward_module, "number_of_splits", lambda *a: chosen.append(real_splits(*a)) or chosen[-1])
    inputs, rows, targets = make_inputs(33, 40, 150, torch.float32)
    upstream = torch.randn(rows.numel())
    first = run_backward(inputs, rows, targets, upstream, splits=4, deterministic=True)
    second = run_backward(inputs, rows, targets, upstream, splits=4, deterministic=True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert chosen and set(chosen) == {1}
    run_backward(inputs, rows, targets, upstream, splits=4)
    assert chosen[-1] > 1, "without deterministic the splits (and atomics) are used: the check can fail"


def test_fp16_gradients_survive_a_small_upstream():
    """g * p_v is below fp16's smallest subnormal for g ~ 1e-5: the 16-bit tiles must not carry g."""
    inputs, rows, targets = make_inputs(9, 16, 257, torch.float16)
    small = 1e-5
    upstream = torch.randn(rows.numel()) * small
    got = run_backward(inputs, rows, targets, upstream)
    want = logprobs_backward_reference(inputs["hidden"], inputs["weight"], rows, targets, upstream, bias=inputs["bias"])
    for g, w in zip(got, want, strict=True):  # gradients are linear in g: compare them per unit of g
        assert_close(g / small, w / small, torch.float16, float(w.abs().max() / small))


def test_a_trainable_bias_on_a_frozen_head_needs_no_weight_gradient():
    inputs, rows, targets = make_inputs(20, 24, 70, torch.float32)
    upstream = torch.randn(rows.numel())
    _, grad_weight, grad_bias = run_backward(inputs, rows, targets, upstream, want_weight=False, want_bias=True)
    assert grad_weight is None
    want = logprobs_backward_reference(inputs["hidden"], inputs["weight"], rows, targets, upstream, bias=inputs["bias"])
    assert_close(grad_bias, want[2], torch.float32, float(want[2].abs().max()))


def test_confident_target_keeps_precision():
    """p[target] -> 1: the target's logit gradient is 1 - p, formed without cancellation."""
    hidden = torch.zeros(2, 16)
    hidden[:, 0] = 1.0
    weight = torch.zeros(8, 16)
    weight[3, 0] = 16.0  # p[3] = 1 - 7 e^-16 ~ 1 - 8e-7: in fp32, 1 - p would keep ~1 digit
    rows, targets = torch.arange(2), torch.tensor([3, 3])
    upstream = torch.ones(2)
    _, grad_weight, _ = run_backward(dict(hidden=hidden, weight=weight, bias=None), rows, targets, upstream)
    _, want, _ = logprobs_backward_reference(hidden, weight, rows, targets, upstream)
    torch.testing.assert_close(grad_weight[3, 0].double(), want[3, 0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [(0, 21), (5, 13)])
def test_logit_gradients_match_reference(poison_empty, dtype, chunk):
    """The split backward's dz per unit upstream (times GRAD_SCALE) for a chunk of active rows;
    unwritten entries would stay NaN."""
    inputs, rows, targets = make_inputs(29, 45, 203, dtype)
    hidden, weight, bias = inputs["hidden"], inputs["weight"], inputs["bias"]
    stats = logprobs_forward(hidden, weight, rows, targets, bias=bias)
    begin, end = chunk
    dz = logit_gradients(hidden, weight, rows, targets, stats.lse, stats.others_lse, begin, end, bias=bias,
                         config=INTERPRETER_CONFIG)  # fmt: skip
    assert dz.shape == (end - begin, 203) and dz.dtype == dtype
    z = hidden[rows[begin:end]].double() @ weight.double().T + bias.double()
    want = -torch.softmax(z, dim=1)
    want[torch.arange(end - begin), targets[begin:end]] += 1
    want *= gradient_scale(dtype)
    assert_close(dz, want, dtype, float(want.abs().max()))
