"""The Triton pair-loss kernel (interpreted on the CPU) against its PyTorch twin and a float64 transcription.

Both implementations take per-token log-probs and a CSR layout (`order`, `offsets`) that
groups token positions by sequence: sequence k < P is the chosen response of pair k,
sequence k + P its rejected response. The layout is built here, independently of
`selfee_fast.loss`, and the expected values come from a per-pair plain-Python
transcription of the loss formulas in float64.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math
import random

import pytest
import torch
import torch.nn.functional as F

from selfee_fast.kernels.spa_loss import (
    LOSS_TYPE_INFO,
    LOSS_TYPES,
    PairLossResult,
    spa_pair_loss,
    spa_pair_loss_reference,
)

# fp32 outputs of float64 arithmetic: one rounding apart at most.
RTOL, ATOL = 1e-6, 1e-7
FLOAT_FIELDS = ("losses", "chosen", "rejected", "ref_chosen", "ref_rejected", "noise_margin", "token_grad")
IMPLEMENTATIONS = {"triton": spa_pair_loss, "twin": spa_pair_loss_reference}


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty returns NaN (floats) or a sentinel (ints): an output the kernel forgets to write shows."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype == torch.int8:
            t.fill_(-7)
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).max)
        return t

    monkeypatch.setattr(torch, "empty", poisoned)


# ----------------------------------------------------------------------------- inputs


def make_layout(seq_ids: list[int], num_pairs: int, *, shuffle_within: random.Random | None = None):
    """CSR layout: positions of sequence 0, then of sequence 1, ...; offsets delimit them."""
    order, offsets = [], [0]
    for s in range(2 * num_pairs):
        members = [i for i, sid in enumerate(seq_ids) if sid == s]
        if shuffle_within is not None:
            shuffle_within.shuffle(members)
        order += members
        offsets.append(len(order))
    return torch.tensor(order, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)


def make_stream(lengths: list[int], num_outside: int, rng: random.Random, *, interleave: bool):
    """Sequence ids of a packed token stream: `lengths[s]` tokens of sequence s, `num_outside` of none (-1)."""
    ids = [s for s, n in enumerate(lengths) for _ in range(n)] + [-1] * num_outside
    if interleave:
        rng.shuffle(ids)
    return ids


def random_logps(n: int, gen: torch.Generator, low: float = -4.0) -> torch.Tensor:
    return (torch.rand(n, generator=gen, dtype=torch.float64) * low).float()


# ----------------------------------------------------------------------------- transcription


def transcribe(
    policy, reference, extrapolated, seq_ids, num_pairs, *, beta, alpha, tau, label_smoothing, loss_type, average,
    gamma=0.0, discopop_tau=0.05,
):  # fmt: skip
    """Per pair, in float64 Python: the loss, the statistics and d(mean loss)/d(policy token).

    `label_smoothing`: one number, or a list with each pair's own.
    """
    policy = policy.double().detach().requires_grad_(True)
    per_pair_smoothing = label_smoothing if isinstance(label_smoothing, list) else [label_smoothing] * num_pairs
    ids = torch.tensor(seq_ids)

    def seq_logp(values, s):
        if values is None:
            return torch.zeros((), dtype=torch.float64)
        member = ids == s
        total = values.double()[member].sum()
        return total / max(int(member.sum()), 1) if average else total

    rows, total = [], torch.zeros((), dtype=torch.float64)
    for k in range(num_pairs):
        label_smoothing = per_pair_smoothing[k]
        pw, pl = seq_logp(policy, k), seq_logp(policy, k + num_pairs)
        rw, rl = seq_logp(reference, k), seq_logp(reference, k + num_pairs)
        z = (pw - pl) - (rw - rl)
        if extrapolated is not None:
            margin = beta * ((seq_logp(extrapolated, k) - seq_logp(extrapolated, k + num_pairs)) - (rw - rl))
        else:
            margin = beta * z
        confident = True if tau is None else bool(margin.item() > tau)
        p = 1.0 if confident else 0.0
        x = beta * z
        if loss_type == "sigmoid" and label_smoothing == 0:  # SPEC's self-refinement loss (plain DPO at alpha 0)
            loss = -((1 - alpha) + alpha * p) * F.logsigmoid(x) - alpha * (1 - p) * F.logsigmoid(-x)
        elif loss_type == "sigmoid":  # cDPO, with SPA's per-pair smoothing on top
            eps = label_smoothing + alpha * (1 - p)
            loss = -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)
        elif loss_type == "robust":  # rDPO, with SPA's per-pair smoothing
            eps = label_smoothing + alpha * (1 - p)
            loss = (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)
        elif loss_type == "ipo":
            loss = (z - 1 / (2 * beta)) ** 2
        elif loss_type == "hinge":
            loss = torch.relu(1 - x)
        else:
            loss = other_pair_loss(loss_type, pw - rw, pl - rl, beta, label_smoothing, gamma, discopop_tau)
        if loss_type == "sigmoid" and gamma:  # SimPO: the margin moves into the sigmoid
            loss = -(1 - label_smoothing) * F.logsigmoid(x - gamma) - label_smoothing * F.logsigmoid(gamma - x)
        total = total + loss
        rows.append((loss.item(), pw.item(), pl.item(), rw.item(), rl.item(), margin.item(), confident))
    (grad,) = torch.autograd.grad(total / num_pairs, policy) if num_pairs else (torch.zeros_like(policy),)
    cols = list(zip(*rows, strict=True)) if rows else [()] * 7
    as64 = lambda c: torch.tensor(c, dtype=torch.float64)
    return PairLossResult(*(as64(c) for c in cols[:6]), torch.tensor(cols[6], dtype=torch.bool), grad)


def other_pair_loss(loss_type, chosen_ratio, rejected_ratio, beta, eps, gamma, discopop_tau):
    """Liger's and TRL's pair losses beyond DPO's four, from the two log-ratios (ORPO: the two log-probs)."""
    a, b = beta * chosen_ratio, beta * rejected_ratio
    x = a - b
    sig, logsig = torch.sigmoid, F.logsigmoid
    if loss_type == "exo_pair":
        return sig(x) * (logsig(x) - math.log(1 - eps)) + sig(-x) * (logsig(-x) - math.log(eps))
    if loss_type == "nca_pair":
        return -logsig(a) - 0.5 * logsig(-a) - 0.5 * logsig(-b)
    if loss_type == "bco_pair":
        return -logsig(a) - logsig(-b)
    if loss_type == "sppo_hard":
        return (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return (1 - sig(a)) + sig(b)
    if loss_type == "apo_down":
        return sig(a) + (1 - sig(x))
    if loss_type == "discopop":
        weight = sig(x / discopop_tau)
        return -logsig(x) * (1 - weight) + torch.exp(-x) * weight
    if loss_type == "orpo":
        odds_chosen = chosen_ratio - torch.log(1 - torch.exp(chosen_ratio))
        odds_rejected = rejected_ratio - torch.log(1 - torch.exp(rejected_ratio))
        return -beta * logsig(odds_chosen - odds_rejected)
    raise AssertionError(loss_type)


def check_result(got: PairLossResult, want: PairLossResult, rtol=RTOL, atol=ATOL):
    for name in FLOAT_FIELDS:
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == torch.float32, name
        assert not torch.isnan(g).any(), f"NaN in {name}"
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    assert got.confident.dtype == torch.bool
    assert torch.equal(got.confident, want.confident)


def run_case(impl, case, **options):
    return impl(case["policy"], case["reference"], case["extrapolated"], case["order"], case["offsets"], **options)


def make_case(seed, lengths, num_outside=5, *, reference=True, extrapolated=True, interleave=True, shuffle=False):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_pairs = len(lengths) // 2
    ids = make_stream(lengths, num_outside, rng, interleave=interleave)
    order, offsets = make_layout(ids, num_pairs, shuffle_within=rng if shuffle else None)
    n = len(ids)
    return dict(
        seq_ids=ids,
        num_pairs=num_pairs,
        policy=random_logps(n, gen),
        reference=random_logps(n, gen) if reference else None,
        extrapolated=random_logps(n, gen) if extrapolated else None,
        order=order,
        offsets=offsets,
    )


def split_tau(case, beta, average):
    """A tau halfway between two of the case's noise margins: some pairs flagged, some not, none on the edge."""
    margins = sorted(
        transcribe(
            case["policy"], case["reference"], case["extrapolated"], case["seq_ids"], case["num_pairs"],
            beta=beta, alpha=0.0, tau=None, label_smoothing=0.0, loss_type="sigmoid", average=average,
        ).noise_margin.tolist()
    )  # fmt: skip
    mid = len(margins) // 2
    assert margins[mid] - margins[mid - 1] > 1e-6, "margins too close to split"
    return 0.5 * (margins[mid - 1] + margins[mid])


# ----------------------------------------------------------------------------- tests

LENGTHS = [7, 0, 12, 5, 9, 3, 16, 1]  # P = 4; sequence 1 (a chosen response) and none else is empty


def smoothing_settings(loss_type):
    """(alpha, use tau, label_smoothing) combinations the public API allows for this loss."""
    smoothing = LOSS_TYPE_INFO[loss_type].smoothing
    if smoothing == "optional":
        return [(0.0, False, 0.0), (0.1, True, 0.0), (0.0, False, 0.2), (0.1, True, 0.2)]
    if smoothing == "required":
        return [(0.0, True, 0.1), (0.0, False, 1e-3)]
    return [(0.0, True, 0.0)]  # no smoothing: tau only sets the flags


REFERENCE_CASES = [(True, True, False), (True, True, True), (True, False, False), (False, True, True),
                   (False, False, False), (False, False, True)]  # fmt: skip


@pytest.mark.parametrize(
    ("loss_type", "has_ref", "has_ext", "average"),
    [
        (loss_type, *case)
        for loss_type in LOSS_TYPES
        for case in REFERENCE_CASES
        # ORPO reads probabilities: its log-probs are the policy's own (spa_loss refuses a reference).
        if LOSS_TYPE_INFO[loss_type].takes_reference or not case[0]
    ],
)
def test_kernel_matches_twin_and_transcription(nan_empty, loss_type, has_ref, has_ext, average):
    # An empty sequence has log-prob 0, i.e. probability 1: ORPO's odds are infinite there.
    lengths = [max(n, 2) for n in LENGTHS] if loss_type == "orpo" else LENGTHS
    case = make_case(11, lengths, reference=has_ref, extrapolated=has_ext)
    beta = 0.5
    for alpha, use_tau, label_smoothing in smoothing_settings(loss_type):
        tau = split_tau(case, beta, average) if use_tau else None
        options = dict(
            beta=beta, alpha=alpha, tau=tau, label_smoothing=label_smoothing,
            loss_type=loss_type, average_log_prob=average,
        )  # fmt: skip
        want = transcribe(
            case["policy"], case["reference"], case["extrapolated"], case["seq_ids"], case["num_pairs"],
            beta=beta, alpha=alpha, tau=tau, label_smoothing=label_smoothing, loss_type=loss_type, average=average,
        )  # fmt: skip
        if use_tau:
            assert 0 < int(want.confident.sum()) < case["num_pairs"]  # the threshold splits the pairs
        for name, impl in IMPLEMENTATIONS.items():
            got = run_case(impl, case, **options)
            assert got.losses.shape == (case["num_pairs"],), name
            assert got.token_grad.shape == case["policy"].shape, name
            check_result(got, want)


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "exo_pair"])
def test_each_pair_may_have_its_own_label_smoothing(nan_empty, loss_type, average):
    case = make_case(23, LENGTHS, shuffle=True)
    beta = 0.5
    if loss_type == "exo_pair":  # EXO's target probability, in (0, 1)
        per_pair, alpha, tau = [1e-3, 0.3, 0.05, 0.9], 0.0, None
    else:  # SPA's alpha adds on flagged pairs: the sum stays below 0.5
        per_pair, alpha, tau = [0.0, 0.3, 0.05, 0.2], 0.1, split_tau(case, beta, average)
    options = dict(beta=beta, alpha=alpha, tau=tau, loss_type=loss_type, average_log_prob=average)
    want = transcribe(
        case["policy"], case["reference"], case["extrapolated"], case["seq_ids"], case["num_pairs"],
        beta=beta, alpha=alpha, tau=tau, label_smoothing=per_pair, loss_type=loss_type, average=average,
    )  # fmt: skip
    for impl in IMPLEMENTATIONS.values():
        check_result(run_case(impl, case, label_smoothing=torch.tensor(per_pair, dtype=torch.float64), **options), want)
        # The same value for every pair is the uniform smoothing.
        uniform = run_case(impl, case, label_smoothing=torch.full((4,), per_pair[2], dtype=torch.float32), **options)
        check_result(uniform, run_case(impl, case, label_smoothing=per_pair[2], **options))


@pytest.mark.parametrize(
    ("loss_type", "extra"),
    [("sigmoid", dict(gamma=0.3)), ("sigmoid", dict(gamma=-0.4, label_smoothing=0.1)),
     ("discopop", dict(discopop_tau=0.7))],
)  # fmt: skip
def test_gamma_and_discopop_tau(nan_empty, loss_type, extra):
    """SimPO's target margin and DiscoPOP's temperature reach the kernel (defaults: 0 and 0.05)."""
    case = make_case(12, LENGTHS, reference=loss_type != "sigmoid", extrapolated=False)
    options = dict(beta=0.7, alpha=0.0, tau=None, label_smoothing=0.0, loss_type=loss_type, average_log_prob=True)
    options.update(extra)
    want = transcribe(
        case["policy"], case["reference"], None, case["seq_ids"], case["num_pairs"],
        **{k: v for k, v in options.items() if k != "average_log_prob"}, average=True,
    )  # fmt: skip
    default = transcribe(
        case["policy"], case["reference"], None, case["seq_ids"], case["num_pairs"],
        beta=0.7, alpha=0.0, tau=None, label_smoothing=options["label_smoothing"], loss_type=loss_type, average=True,
    )  # fmt: skip
    assert (want.losses - default.losses).abs().max() > 1e-3
    for impl in IMPLEMENTATIONS.values():
        check_result(run_case(impl, case, **options), want)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
def test_alpha_smooths_only_flagged_pairs(impl):
    """SPA: flagged pairs (margin <= tau) get -(1-a) log s(x) - a log s(-x); confident pairs plain DPO."""
    case = make_case(3, LENGTHS)
    beta = 0.5
    tau = split_tau(case, beta, False)
    common = dict(beta=beta, tau=tau, loss_type="sigmoid", average_log_prob=False)
    spa = run_case(impl, case, alpha=0.1, label_smoothing=0.0, **common)
    dpo = run_case(impl, case, alpha=0.0, label_smoothing=0.0, **common)
    cdpo = run_case(impl, case, alpha=0.0, label_smoothing=0.1, **common)
    flagged = ~spa.confident
    assert flagged.any() and (~flagged).any()
    torch.testing.assert_close(spa.losses[~flagged], dpo.losses[~flagged], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(spa.losses[flagged], cdpo.losses[flagged], rtol=RTOL, atol=ATOL)
    assert not torch.allclose(spa.losses[flagged], dpo.losses[flagged], rtol=1e-3)


def test_token_order_within_sequences_does_not_matter():
    """Tokens listed in any order within their sequence: same sums, same gradient (up to summation order)."""
    options = dict(beta=0.3, alpha=0.1, tau=0.0, label_smoothing=0.0, loss_type="robust", average_log_prob=True)
    listed = make_case(5, LENGTHS, interleave=True, shuffle=False)
    shuffled = make_case(5, LENGTHS, interleave=True, shuffle=True)  # same stream, same values
    assert listed["seq_ids"] == shuffled["seq_ids"] and torch.equal(listed["policy"], shuffled["policy"])
    assert torch.equal(listed["offsets"], shuffled["offsets"]) and not torch.equal(listed["order"], shuffled["order"])
    want = transcribe(
        listed["policy"], listed["reference"], listed["extrapolated"], listed["seq_ids"], listed["num_pairs"],
        beta=0.3, alpha=0.1, tau=0.0, label_smoothing=0.0, loss_type="robust", average=True,
    )  # fmt: skip
    assert 0 < int(want.confident.sum()) < listed["num_pairs"]
    for impl in IMPLEMENTATIONS.values():
        check_result(run_case(impl, listed, **options), want)
        check_result(run_case(impl, shuffled, **options), want)


def test_interleaved_stream_equals_contiguous_stream():
    """Permuting the packed stream (values and ids together) permutes token_grad and changes nothing else."""
    case = make_case(8, LENGTHS, interleave=False)
    n = len(case["seq_ids"])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    ids_perm = [case["seq_ids"][i] for i in perm.tolist()]
    order, offsets = make_layout(ids_perm, case["num_pairs"])
    permuted = dict(
        case, seq_ids=ids_perm, order=order, offsets=offsets,
        policy=case["policy"][perm], reference=case["reference"][perm], extrapolated=case["extrapolated"][perm],
    )  # fmt: skip
    options = dict(beta=0.2, alpha=0.1, tau=-0.05, label_smoothing=0.0, loss_type="sigmoid", average_log_prob=False)
    for impl in IMPLEMENTATIONS.values():
        base, other = run_case(impl, case, **options), run_case(impl, permuted, **options)
        for name in FLOAT_FIELDS[:-1]:
            torch.testing.assert_close(getattr(other, name), getattr(base, name), rtol=RTOL, atol=ATOL)
        assert torch.equal(other.confident, base.confident)
        torch.testing.assert_close(other.token_grad, base.token_grad[perm], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_empty_sequences(average, loss_type):
    """Zero-token sequences contribute log-prob 0 (no division by zero when averaging)."""
    lengths = [0, 4, 0, 0, 3, 0]  # pair 0: empty vs empty; pair 1: 4 tokens vs empty; pair 2: empty vs 3 tokens
    case = make_case(2, lengths)
    options = dict(beta=0.1, alpha=0.0, tau=None, label_smoothing=0.0, loss_type=loss_type, average_log_prob=average)
    want = transcribe(
        case["policy"], case["reference"], case["extrapolated"], case["seq_ids"], case["num_pairs"],
        beta=0.1, alpha=0.0, tau=None, label_smoothing=0.0, loss_type=loss_type, average=average,
    )  # fmt: skip
    for impl in IMPLEMENTATIONS.values():
        got = run_case(impl, case, **options)
        check_result(got, want)
        assert got.chosen[0] == 0 and got.rejected[0] == 0 and got.noise_margin[0] == 0
    if loss_type == "sigmoid":
        assert want.losses[0] == pytest.approx(math.log(2), rel=1e-12)


def test_all_sequences_empty_and_no_pairs():
    """Only tokens outside every sequence: the gradient is all zero; no pairs: empty outputs."""
    n = 6
    policy = torch.full((n,), float("nan"))
    order, offsets = make_layout([-1] * n, 2)
    for impl in IMPLEMENTATIONS.values():
        got = impl(policy, None, None, order, offsets, beta=0.1, alpha=0.0, tau=None, label_smoothing=0.0,
                   loss_type="sigmoid", average_log_prob=True)  # fmt: skip
        torch.testing.assert_close(got.losses, torch.full((2,), math.log(2)), rtol=RTOL, atol=ATOL)
        assert torch.equal(got.token_grad, torch.zeros(n))
    order, offsets = make_layout([-1] * n, 0)
    got = spa_pair_loss(policy, None, None, order, offsets, beta=0.1, alpha=0.0, tau=None, label_smoothing=0.0,
                        loss_type="sigmoid", average_log_prob=False)  # fmt: skip
    assert got.losses.shape == (0,) and torch.equal(got.token_grad, torch.zeros(n))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_tokens_outside_sequences_are_never_read_nor_written(nan_empty, impl, loss_type):
    """Poison: NaN / huge values at positions of no sequence change nothing, and their gradient is exactly 0."""
    smoothing = LOSS_TYPE_INFO[loss_type].smoothing
    lengths = [max(n, 2) for n in LENGTHS] if loss_type == "orpo" else LENGTHS
    case = make_case(21, lengths, num_outside=9, reference=LOSS_TYPE_INFO[loss_type].takes_reference)
    outside = torch.tensor([sid < 0 for sid in case["seq_ids"]])
    options = dict(
        beta=0.5, alpha=0.1 if smoothing == "optional" else 0.0, tau=-0.1,
        label_smoothing=0.1 if smoothing == "required" else 0.0, loss_type=loss_type, average_log_prob=True,
    )  # fmt: skip
    clean = run_case(impl, case, **options)
    poisoned = dict(case)
    for key, value in (("policy", float("nan")), ("reference", float("inf")), ("extrapolated", -1e30)):
        if case[key] is not None:
            poisoned[key] = case[key].masked_fill(outside, value)
    dirty = run_case(impl, poisoned, **options)
    for name in FLOAT_FIELDS:
        assert torch.equal(getattr(dirty, name), getattr(clean, name)), name
    assert torch.equal(dirty.confident, clean.confident)
    assert torch.equal(dirty.token_grad[outside], torch.zeros(int(outside.sum())))  # exactly 0, not -0.0 or tiny
    assert (dirty.token_grad[~outside] != 0).any()


def test_long_sequences_span_several_blocks():
    """Sequences longer than the kernel's 128-token block."""
    case = make_case(4, [300, 131, 129, 260], num_outside=20)
    options = dict(beta=0.05, alpha=0.1, tau=0.2, label_smoothing=0.0, loss_type="sigmoid", average_log_prob=False)
    want = transcribe(
        case["policy"], case["reference"], case["extrapolated"], case["seq_ids"], case["num_pairs"],
        beta=0.05, alpha=0.1, tau=0.2, label_smoothing=0.0, loss_type="sigmoid", average=False,
    )  # fmt: skip
    for impl in IMPLEMENTATIONS.values():
        check_result(run_case(impl, case, **options), want)


# DiscoPOP's exp(-beta z) overflows by definition (in Liger and TRL too); ORPO's log-probs
# of -2700 have odds of exactly 0 in any float.
@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t not in ("discopop", "orpo")])
def test_extreme_margins_stay_finite(loss_type):
    """|beta z| in the hundreds: log-sigmoid must not overflow, the gradient must saturate, not NaN."""
    ids = [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    policy = torch.tensor([-900.0] * 3 + [-0.5] * 3 + [-0.5] * 3 + [-900.0] * 3)
    order, offsets = make_layout(ids, 2)
    smoothing = 0.0 if LOSS_TYPE_INFO[loss_type].smoothing == "none" else 0.2
    options = dict(
        beta=0.1, alpha=0.0, tau=None, label_smoothing=smoothing, loss_type=loss_type, average_log_prob=False
    )
    want = transcribe(
        policy, None, None, ids, 2,
        beta=0.1, alpha=0.0, tau=None, label_smoothing=smoothing, loss_type=loss_type, average=False,
    )  # fmt: skip
    assert torch.isfinite(want.losses).all()
    for impl in IMPLEMENTATIONS.values():
        got = impl(policy, None, None, order, offsets, **options)
        assert torch.isfinite(got.losses).all() and torch.isfinite(got.token_grad).all()
        check_result(got, want)
