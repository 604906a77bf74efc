"""The Triton forward sweep (interpreted on the CPU) against its float64 PyTorch twin."""

import pytest
import torch
from conftest import assert_close

from selfee_fast.kernels.config import INTERPRETER_CONFIG
from selfee_fast.kernels.logprobs_forward import logprobs_forward, logprobs_forward_reference


def make_inputs(n, h, v, dtype, *, seed=0, scale=1.0, bias=True, separate_head=False):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g)
    inputs = dict(
        hidden=rand(n, h).to(dtype),
        weight=(rand(v, h) * scale / h**0.5).to(dtype),
        ref_hidden=rand(n, h).to(dtype),
        bias=rand(v).to(dtype) if bias else None,
        ref_bias=rand(v).to(dtype) if bias else None,
        ref_weight=(rand(v, h) * scale / h**0.5).to(dtype) if separate_head else None,
    )
    rows = torch.randperm(n, generator=g)[: max(1, (3 * n) // 4)].sort().values
    targets = torch.randint(0, v, (rows.numel(),), generator=g)
    return inputs, rows, targets


def compare(stats, expected, dtype, scale):
    for name in stats._fields:
        got, want = getattr(stats, name), getattr(expected, name)
        assert (got is None) == (want is None), name
        if got is not None:
            assert got.dtype == torch.float32
            assert_close(got, want, dtype, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("separate_head", [False, True])
@pytest.mark.parametrize("splits", [1, 3])
def test_matches_reference(poison_empty, dtype, separate_head, splits):
    inputs, rows, targets = make_inputs(37, 45, 203, dtype, separate_head=separate_head)
    config = INTERPRETER_CONFIG.with_overrides(splits=splits)
    stats = logprobs_forward(**inputs, rows=rows, targets=targets, extrapolate=0.5, config=config)
    compare(stats, logprobs_forward_reference(**inputs, rows=rows, targets=targets, extrapolate=0.5), dtype, 10.0)


@pytest.mark.parametrize("n,h,v", [(1, 16, 17), (5, 33, 64), (17, 7, 131), (40, 64, 1)])
def test_odd_shapes_policy_only(poison_empty, n, h, v):
    inputs, rows, targets = make_inputs(n, h, v, torch.float32, bias=False)
    del inputs["ref_hidden"], inputs["ref_bias"], inputs["ref_weight"]
    stats = logprobs_forward(**inputs, rows=rows, targets=targets)
    assert stats.ref_lse is None and stats.ext_lse is None
    compare(stats, logprobs_forward_reference(**inputs, rows=rows, targets=targets), torch.float32, 10.0)


def test_vocabulary_of_one_has_no_other_classes():
    inputs, rows, targets = make_inputs(4, 16, 1, torch.float32, bias=False)
    stats = logprobs_forward(inputs["hidden"], inputs["weight"], rows, targets)
    assert torch.equal(stats.lse, stats.target_logit)
    assert torch.isneginf(stats.others_lse).all()


@pytest.mark.parametrize("lam", [0.0, 0.125, 0.5, 1.0])
def test_extrapolation(lam):
    inputs, rows, targets = make_inputs(9, 24, 70, torch.float32)
    stats = logprobs_forward(**inputs, rows=rows, targets=targets, extrapolate=lam)
    compare(stats, logprobs_forward_reference(**inputs, rows=rows, targets=targets, extrapolate=lam), torch.float32, 10)
    if lam == 0.0:
        assert torch.equal(stats.ext_lse, stats.lse)


def test_extreme_logits():
    inputs, rows, targets = make_inputs(11, 32, 90, torch.float32, scale=3e3)
    expected = logprobs_forward_reference(**inputs, rows=rows, targets=targets, extrapolate=0.5)
    largest = float(expected.lse.abs().max())
    assert largest > 1e3, "the test needs logits of order 1e3-1e4"
    stats = logprobs_forward(**inputs, rows=rows, targets=targets, extrapolate=0.5)
    compare(stats, expected, torch.float32, largest)


def test_no_rows_launches_nothing():
    inputs, _, _ = make_inputs(3, 16, 20, torch.float32)
    empty = torch.zeros(0, dtype=torch.int64)
    stats = logprobs_forward(**inputs, rows=empty, targets=empty, extrapolate=0.5)
    assert all(t.numel() == 0 for t in stats)


def test_strided_rows():
    """Rows with a stride larger than H (a slice of a wider buffer) are read correctly."""
    inputs, rows, targets = make_inputs(12, 20, 50, torch.float32)
    wide = torch.randn(12, 48)
    wide[:, :20] = inputs["hidden"]
    inputs["hidden"] = wide[:, :20]
    assert inputs["hidden"].stride(0) == 48
    stats = logprobs_forward(**inputs, rows=rows, targets=targets, extrapolate=0.25)
    compare(
        stats, logprobs_forward_reference(**inputs, rows=rows, targets=targets, extrapolate=0.25), torch.float32, 10
    )
