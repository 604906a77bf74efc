"""`spa_loss` (both backends) against a float64 per-pair transcription of SPEC.md, plus its
metrics, input forms, argument checks and `NoiseThreshold`."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfee_fast import NoiseThreshold, SPALossOutput, spa_loss

BACKENDS = ["torch", "triton"]
RTOL, ATOL = 1e-5, 1e-6  # fp32 outputs
PER_PAIR = (
    "losses", "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
    "chosen_rewards", "rejected_rewards", "noise_margin",
)  # fmt: skip


# ----------------------------------------------------------------------------- transcription of SPEC.md


def spec_loss(policy, reference, extrapolated, seq_ids, num_pairs, *, beta=0.1, alpha=0.0, tau=None,
              loss_type="sigmoid", label_smoothing=0.0, average=False):  # fmt: skip
    """Per pair, in float64: returns (mean loss, d mean loss / d policy, dict of per-pair values).

    z = [pi(y_w) - pi(y_l)] - [ref(y_w) - ref(y_l)];  m = beta ([ext(y_w) - ext(y_l)] - [ref(y_w) - ref(y_l)])
    (beta z without extrapolated);  p = 1[m > tau];
    L = -[(1 - a) + a p] log s(beta z) - a (1 - p) log s(-beta z), mean over pairs.
    """
    policy64 = policy.detach().double().requires_grad_(True)
    ids = seq_ids.reshape(-1).tolist()
    values = {
        "pol": policy64.reshape(-1),
        "ref": reference.detach().double().reshape(-1) if reference is not None else None,
        "ext": extrapolated.detach().double().reshape(-1) if extrapolated is not None else None,
    }

    def logp(name, s):
        v = values[name]
        terms = [v[i] for i, sid in enumerate(ids) if sid == s] if v is not None else []
        total = sum(terms, torch.zeros((), dtype=torch.float64))
        return total / max(len([sid for sid in ids if sid == s]), 1) if average else total

    per_pair = {k: [] for k in ("losses", "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                                "chosen_rewards", "rejected_rewards", "noise_margin", "confident")}  # fmt: skip
    total = 0 * policy64.sum()  # keeps the graph when no token belongs to a sequence
    smoothing_of = label_smoothing if isinstance(label_smoothing, list) else [label_smoothing] * num_pairs
    for k in range(num_pairs):
        label_smoothing = smoothing_of[k]  # a list: each pair its own
        pw, pl, rw, rl = logp("pol", k), logp("pol", k + num_pairs), logp("ref", k), logp("ref", k + num_pairs)
        z = (pw - pl) - (rw - rl)
        if values["ext"] is not None:
            m = beta * ((logp("ext", k) - logp("ext", k + num_pairs)) - (rw - rl))
        else:
            m = beta * z
        p = 1.0 if tau is None or m.item() > tau else 0.0
        x = beta * z
        if loss_type == "sigmoid" and label_smoothing == 0:
            loss = -((1 - alpha) + alpha * p) * F.logsigmoid(x) - alpha * (1 - p) * F.logsigmoid(-x)
        elif loss_type == "sigmoid":  # cDPO; with alpha, SPA's smoothing adds on flagged pairs
            e = label_smoothing + alpha * (1 - p)
            loss = -(1 - e) * F.logsigmoid(x) - e * F.logsigmoid(-x)
        elif loss_type == "robust":
            e = label_smoothing + alpha * (1 - p)
            loss = (-(1 - e) * F.logsigmoid(x) + e * F.logsigmoid(-x)) / (1 - 2 * e)
        elif loss_type == "ipo":
            loss = (z - 1 / (2 * beta)) ** 2
        else:
            loss = torch.relu(1 - x)
        total = total + loss
        for key, val in (("losses", loss), ("chosen_logps", pw), ("rejected_logps", pl), ("ref_chosen_logps", rw),
                         ("ref_rejected_logps", rl), ("chosen_rewards", beta * (pw - rw)),
                         ("rejected_rewards", beta * (pl - rl)), ("noise_margin", m), ("confident", p)):  # fmt: skip
            per_pair[key].append(float(val.detach()) if isinstance(val, torch.Tensor) else float(val))
    mean = total / num_pairs
    (grad,) = torch.autograd.grad(mean, policy64)
    per_pair = {k: torch.tensor(v, dtype=torch.float64) for k, v in per_pair.items()}
    per_pair["confident"] = per_pair["confident"].bool()
    return mean.item(), grad, per_pair


def close(actual, expected, rtol=RTOL, atol=ATOL, what=""):
    actual = torch.as_tensor(actual)
    assert not torch.isnan(actual).any(), f"NaN in {what}"
    torch.testing.assert_close(
        actual.double(), torch.as_tensor(expected).double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def check_output(out: SPALossOutput, expected, num_pairs):
    loss, _, per_pair = expected
    assert out.loss.dim() == 0 and out.loss.requires_grad
    close(out.loss, loss, what="loss")
    for name in PER_PAIR:
        value = getattr(out, name)
        assert value.shape == (num_pairs,) and not value.requires_grad, name
        close(value, per_pair[name], what=name)
    assert torch.equal(out.confident, per_pair["confident"])


def make_stream(seed, lengths, num_outside=4, *, extrapolated=True):
    """A packed stream with interleaved sequence ids (-1 for tokens of no sequence)."""
    rng = random.Random(seed)
    ids = [s for s, n in enumerate(lengths) for _ in range(n)] + [-1] * num_outside
    rng.shuffle(ids)
    g = torch.Generator().manual_seed(seed)
    n = len(ids)
    rand = lambda: -4 * torch.rand(n, generator=g)
    return (rand().requires_grad_(True), rand(), rand() if extrapolated else None, torch.tensor(ids, dtype=torch.int64))


def midpoint_tau(policy, reference, extrapolated, seq_ids, num_pairs, beta, average=False):
    margins = sorted(spec_loss(policy, reference, extrapolated, seq_ids, num_pairs, beta=beta, average=average)[2]
                     ["noise_margin"].tolist())  # fmt: skip
    mid = len(margins) // 2
    assert margins[mid] - margins[mid - 1] > 1e-5
    return 0.5 * (margins[mid - 1] + margins[mid])


LENGTHS = [6, 9, 0, 4, 11, 5, 7, 2]  # P = 4


# ----------------------------------------------------------------------------- against the transcription


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("loss_type", "alpha", "use_tau", "label_smoothing", "average", "extrapolated"),
    [
        ("sigmoid", 0.1, True, 0.0, False, True),  # SPA with DND
        ("sigmoid", 0.1, True, 0.0, True, False),  # SPA without DND, length-normalised
        ("sigmoid", 0.0, False, 0.0, False, False),  # DPO
        ("sigmoid", 0.0, False, 0.25, False, True),  # cDPO
        ("sigmoid", 0.1, True, 0.25, False, True),  # SPA with DND, all labels smoothed (consistency)
        ("robust", 0.1, True, 0.2, True, False),
        ("robust", 0.1, True, 0.0, False, True),
        ("robust", 0.0, False, 0.1, True, False),
        ("ipo", 0.0, True, 0.0, False, True),
        ("hinge", 0.0, False, 0.0, True, True),
    ],
)
def test_matches_spec_transcription(backend, loss_type, alpha, use_tau, label_smoothing, average, extrapolated):
    policy, reference, ext, seq_ids = make_stream(7, LENGTHS, extrapolated=extrapolated)
    beta = 0.4
    tau = midpoint_tau(policy, reference, ext, seq_ids, 4, beta, average) if use_tau else None
    kwargs = dict(beta=beta, alpha=alpha, tau=tau, loss_type=loss_type, label_smoothing=label_smoothing)
    expected = spec_loss(policy, reference, ext, seq_ids, 4, average=average, **kwargs)
    if use_tau:
        assert 0 < int(expected[2]["confident"].sum()) < 4
    out = spa_loss(policy, reference, seq_ids, extrapolated_logps=ext, average_log_prob=average, backend=backend,
                   **kwargs)  # fmt: skip
    check_output(out, expected, 4)
    out.loss.backward()
    assert policy.grad.dtype == policy.dtype and policy.grad.shape == policy.shape
    close(policy.grad, expected[1], what="gradient")
    assert torch.equal(policy.grad[seq_ids < 0], torch.zeros(int((seq_ids < 0).sum())))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("loss_type", "average"), [("sigmoid", False), ("robust", True)])
def test_each_pair_may_have_its_own_label_smoothing(backend, loss_type, average):
    policy, reference, ext, seq_ids = make_stream(7, LENGTHS)
    beta, per_pair = 0.4, [0.0, 0.3, 0.05, 0.2]
    tau = midpoint_tau(policy, reference, ext, seq_ids, 4, beta, average)
    kwargs = dict(beta=beta, alpha=0.1, tau=tau, loss_type=loss_type)
    expected = spec_loss(policy, reference, ext, seq_ids, 4, average=average, label_smoothing=per_pair, **kwargs)
    out = spa_loss(policy, reference, seq_ids, extrapolated_logps=ext, average_log_prob=average, backend=backend,
                   label_smoothing=torch.tensor(per_pair), **kwargs)  # fmt: skip
    check_output(out, expected, 4)
    out.loss.backward()
    close(policy.grad, expected[1], what="gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_zero_is_plain_dpo(backend):
    """alpha = 0: -mean log s(beta z) whatever tau flags; alpha > 0 with nothing flagged: the same."""
    policy, reference, ext, seq_ids = make_stream(3, LENGTHS)
    beta = 0.2
    z = []
    for k in range(4):
        s = lambda v, i: float(v.detach().double()[seq_ids == i].sum())
        z.append((s(policy, k) - s(policy, k + 4)) - (s(reference, k) - s(reference, k + 4)))
    dpo = -F.logsigmoid(beta * torch.tensor(z, dtype=torch.float64)).mean().item()
    tau = midpoint_tau(policy, reference, ext, seq_ids, 4, beta)
    flagged_some = spa_loss(policy, reference, seq_ids, extrapolated_logps=ext, beta=beta, alpha=0.0, tau=tau,
                            backend=backend)  # fmt: skip
    assert (~flagged_some.confident).any()
    close(flagged_some.loss, dpo, what="alpha=0")
    none_flagged = spa_loss(policy, reference, seq_ids, extrapolated_logps=ext, beta=beta, alpha=0.1,
                            tau=-math.inf, backend=backend)  # fmt: skip
    assert none_flagged.confident.all()
    close(none_flagged.loss, dpo, what="nothing flagged")
    all_flagged = spa_loss(policy, reference, seq_ids, extrapolated_logps=ext, beta=beta, alpha=0.1,
                           tau=math.inf, backend=backend)  # fmt: skip
    cdpo = spa_loss(policy, reference, seq_ids, beta=beta, label_smoothing=0.1, backend=backend)
    assert not all_flagged.confident.any()
    close(all_flagged.loss, cdpo.loss.item(), what="everything flagged = cDPO")
    assert abs(all_flagged.loss.item() - dpo) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics(backend):
    policy, reference, ext, seq_ids = make_stream(5, LENGTHS)
    beta = 0.3
    tau = midpoint_tau(policy, reference, ext, seq_ids, 4, beta)
    out = spa_loss(policy, reference, seq_ids, extrapolated_logps=ext, beta=beta, alpha=0.1, tau=tau, backend=backend)
    loss, _, pp = spec_loss(policy, reference, ext, seq_ids, 4, beta=beta, alpha=0.1, tau=tau)
    metrics = out.metrics()
    margins = pp["chosen_rewards"] - pp["rejected_rewards"]
    assert (margins.abs() > 1e-4).all()  # accuracies are not decided by rounding
    expected = {
        "loss": loss,
        "rewards/chosen": pp["chosen_rewards"].mean().item(),
        "rewards/rejected": pp["rejected_rewards"].mean().item(),
        "rewards/margins": margins.mean().item(),
        "rewards/accuracies": (margins > 0).double().mean().item(),
        "logps/chosen": pp["chosen_logps"].mean().item(),
        "logps/rejected": pp["rejected_logps"].mean().item(),
        "spa/flagged_fraction": (~pp["confident"]).double().mean().item(),
        "spa/noise_margin": pp["noise_margin"].mean().item(),
    }
    assert set(metrics) == set(expected)
    assert all(isinstance(v, float) for v in metrics.values())
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=RTOL, abs=ATOL), key
    assert 0 < metrics["spa/flagged_fraction"] < 1
    assert 0 < metrics["rewards/accuracies"] < 1


def test_metrics_accuracy_counts_ties_as_wrong():
    """rewards/accuracies = mean of [chosen reward > rejected reward] (strict, as in TRL and Liger)."""
    policy = torch.tensor([[-1.0, -2.0], [-3.0, -0.5], [-4.0, -2.0], [-3.0, -0.5]])  # pair 1: y_w == y_l
    reference = torch.tensor([[-1.5, -2.0], [-1.0, -1.0], [-3.0, -2.0], [-1.0, -1.0]])
    out = spa_loss(policy, reference, backend="torch")
    assert out.chosen_rewards[1] == out.rejected_rewards[1]
    assert out.chosen_rewards[0] > out.rejected_rewards[0]
    assert out.metrics()["rewards/accuracies"] == 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_batch_with_mask_equals_seq_ids(backend):
    """[2P, T] + mask, the same tokens as seq_ids, and the same tokens packed and shuffled: one answer."""
    g = torch.Generator().manual_seed(0)
    rows, width = 6, 9
    values = -3 * torch.rand(3, rows, width, generator=g)
    mask = torch.rand(rows, width, generator=g) < 0.7
    mask[4] = False  # an all-masked (rejected) sequence
    options = dict(beta=0.25, alpha=0.1, tau=0.01, average_log_prob=True, backend=backend)

    policy_2d = values[0].clone().requires_grad_(True)
    out_2d = spa_loss(policy_2d, values[1], mask=mask, extrapolated_logps=values[2], **options)
    out_2d.loss.backward()

    ids = torch.where(mask, torch.arange(rows)[:, None], -1)
    policy_ids = values[0].clone().requires_grad_(True)
    out_ids = spa_loss(policy_ids, values[1], ids, extrapolated_logps=values[2], **options)
    out_ids.loss.backward()

    perm = torch.randperm(rows * width, generator=g)
    policy_flat = values[0].reshape(-1)[perm].clone().requires_grad_(True)
    out_flat = spa_loss(policy_flat, values[1].reshape(-1)[perm], ids.reshape(-1)[perm],
                        extrapolated_logps=values[2].reshape(-1)[perm], **options)  # fmt: skip
    out_flat.loss.backward()

    expected = spec_loss(values[0], values[1], values[2], ids, 3, beta=0.25, alpha=0.1, tau=0.01, average=True)
    for out in (out_2d, out_ids, out_flat):
        check_output(out, expected, 3)
    close(policy_2d.grad, expected[1], what="2-D gradient")
    assert torch.equal(policy_2d.grad[~mask], torch.zeros(int((~mask).sum())))
    close(policy_ids.grad, policy_2d.grad, rtol=1e-6, atol=1e-7, what="seq_ids gradient")
    close(policy_flat.grad, policy_2d.grad.reshape(-1)[perm], rtol=1e-6, atol=1e-7, what="packed gradient")


def test_mask_form_with_fully_masked_last_row():
    values = -torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[3] = False  # the rejected response of pair 1 is empty (e.g. truncated away)
    out = spa_loss(values[0].requires_grad_(True), values[1], mask=mask, backend="torch")
    ids = torch.where(mask, torch.arange(4)[:, None], -1)
    check_output(out, spec_loss(values[0], values[1], None, ids, 2), 2)


def test_mask_form_with_two_fully_masked_last_rows():
    values = -torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2:] = False  # both rejected responses empty
    out = spa_loss(values[0].requires_grad_(True), values[1], mask=mask, backend="torch")
    ids = torch.where(mask, torch.arange(4)[:, None], -1)
    check_output(out, spec_loss(values[0], values[1], None, ids, 2), 2)


def test_without_mask_every_token_counts():
    values = -torch.rand(4, 5, generator=torch.Generator().manual_seed(2))
    out = spa_loss(values, backend="torch")
    ids = torch.arange(4)[:, None].expand(4, 5)
    close(out.loss, spec_loss(values, None, None, ids, 2)[0], what="loss")


def test_num_pairs_with_trailing_empty_sequences():
    """num_pairs larger than the ids imply: sequences without tokens have log-prob 0 (an empty pair: log 2)."""
    policy, reference, _, seq_ids = make_stream(9, [3, 2], extrapolated=False)  # P = 1 by the ids
    out = spa_loss(policy, reference, seq_ids, num_pairs=3, backend="torch")
    expected = spec_loss(policy, reference, None, seq_ids, 3)
    check_output(out, expected, 3)
    assert out.losses[2].item() == pytest.approx(math.log(2), rel=1e-6)
    # Ids 0, 1 now mean "chosen of pairs 0 and 1", not chosen/rejected of pair 0.
    assert out.rejected_logps[0] == 0


def test_gradient_follows_upstream_and_dtype():
    policy, reference, _, seq_ids = make_stream(4, [5, 3, 2, 6], extrapolated=False)
    out = spa_loss(policy, reference, seq_ids, backend="torch")
    (3.5 * out.loss).backward()
    _, grad, _ = spec_loss(policy, reference, None, seq_ids, 2)
    close(policy.grad, 3.5 * grad, what="scaled gradient")

    policy64 = policy.detach().double().requires_grad_(True)
    out64 = spa_loss(policy64, reference.double(), seq_ids, backend="torch")
    out64.loss.backward()
    assert policy64.grad.dtype == torch.float64
    close(policy64.grad, grad, what="fp64 input gradient")


# ----------------------------------------------------------------------------- properties


@st.composite
def padded_batches(draw):
    num_pairs = draw(st.integers(1, 3))
    width = draw(st.integers(1, 8))
    mask = draw(
        st.lists(st.lists(st.booleans(), min_size=width, max_size=width), min_size=2 * num_pairs,
                 max_size=2 * num_pairs)
    )  # fmt: skip
    seed = draw(st.integers(0, 2**16))
    return num_pairs, torch.tensor(mask, dtype=torch.bool), seed


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=padded_batches(), loss_type=st.sampled_from(["sigmoid", "robust", "ipo", "hinge"]),
       average=st.booleans(), with_tau=st.booleans())  # fmt: skip
def test_property_padded_backends_agree(batch, loss_type, average, with_tau):
    num_pairs, mask, seed = batch
    g = torch.Generator().manual_seed(seed)
    values = -6 * torch.rand(3, *mask.shape, generator=g)
    smoothing = loss_type in ("sigmoid", "robust") and with_tau
    options = dict(beta=0.3, alpha=0.1 if smoothing else 0.0, tau=0.0 if with_tau else None, loss_type=loss_type,
                   average_log_prob=average)  # fmt: skip
    outs, grads = [], []
    for backend in BACKENDS:
        policy = values[0].clone().requires_grad_(True)
        out = spa_loss(policy, values[1], mask=mask, extrapolated_logps=values[2], num_pairs=num_pairs,
                       backend=backend, **options)  # fmt: skip
        out.loss.backward()
        assert math.isfinite(out.loss.item())
        assert torch.isfinite(policy.grad).all()
        assert torch.equal(policy.grad[~mask], torch.zeros(int((~mask).sum())))
        outs.append(out)
        grads.append(policy.grad)
    for name in PER_PAIR:
        close(getattr(outs[1], name), getattr(outs[0], name), rtol=1e-6, atol=1e-7, what=name)
    close(outs[1].loss, outs[0].loss, rtol=1e-6, atol=1e-7, what="loss")
    assert torch.equal(outs[1].confident, outs[0].confident)
    close(grads[1], grads[0], rtol=1e-6, atol=1e-7, what="gradient")
    ids = torch.where(mask, torch.arange(mask.shape[0])[:, None], -1)
    expected = spec_loss(values[0], values[1], values[2], ids, num_pairs, beta=0.3, alpha=options["alpha"],
                         tau=options["tau"], loss_type=loss_type, average=average)  # fmt: skip
    check_output(outs[0], expected, num_pairs)
    close(grads[0], expected[1], what="gradient")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_pairs=st.integers(1, 3),
    ids=st.lists(st.integers(-2, 5), min_size=0, max_size=30),
    seed=st.integers(0, 2**16),
    average=st.booleans(),
)
def test_property_packed_layouts_backends_agree(num_pairs, ids, seed, average):
    ids = torch.tensor([i if i < 2 * num_pairs else -1 for i in ids] + [0], dtype=torch.int64)  # >= 1 member
    g = torch.Generator().manual_seed(seed)
    values = -6 * torch.rand(3, ids.numel(), generator=g)
    options = dict(beta=0.1, alpha=0.1, tau=0.0, num_pairs=num_pairs, average_log_prob=average)
    expected = spec_loss(values[0], values[1], values[2], ids, num_pairs, beta=0.1, alpha=0.1, tau=0.0,
                         average=average)  # fmt: skip
    for backend in BACKENDS:
        policy = values[0].clone().requires_grad_(True)
        out = spa_loss(policy, values[1], ids, extrapolated_logps=values[2], backend=backend, **options)
        out.loss.backward()
        assert math.isfinite(out.loss.item())
        check_output(out, expected, num_pairs)
        close(policy.grad, expected[1], what=f"{backend} gradient")
        assert torch.equal(policy.grad[ids < 0], torch.zeros(int((ids < 0).sum())))


# ----------------------------------------------------------------------------- NoiseThreshold


def test_noise_threshold_reference_rule():
    """window 50, K = 10%: tau = mean of the 6th and 7th smallest of the last 50 margins."""
    rng = random.Random(0)
    margins = [rng.uniform(-1, 1) for _ in range(50)]
    threshold = NoiseThreshold()
    assert threshold.window == 50 and threshold.percentile == pytest.approx(0.10)
    threshold.update(torch.tensor(margins[:20]))
    assert threshold.tau is None
    threshold.update(torch.tensor(margins[20:49]))
    assert threshold.tau is None  # 49 margins: the window is not full
    threshold.update(torch.tensor(margins[49:]))
    stored = sorted(torch.tensor(margins).tolist())  # the fp32 values it was given
    assert threshold.tau == pytest.approx(0.5 * (stored[5] + stored[6]), rel=1e-12)

    # Only the last 50 count: 10 new very small margins push the old ones out.
    new = [-10.0 - i for i in range(10)]
    threshold.update(torch.tensor(new))
    window = sorted(torch.tensor(margins[10:] + new).tolist())
    assert threshold.tau == pytest.approx(0.5 * (window[5] + window[6]), rel=1e-12)
    assert threshold.tau == pytest.approx(0.5 * (-14.0 + -13.0))


def test_noise_threshold_state_dict_round_trip():
    threshold = NoiseThreshold(window=50, percentile=0.1)
    g = torch.Generator().manual_seed(1)
    threshold.update(torch.randn(70, generator=g))
    state = threshold.state_dict()
    restored = NoiseThreshold(window=7, percentile=0.5)
    restored.load_state_dict(state)
    assert restored.window == 50 and restored.percentile == 0.1
    assert restored.tau == threshold.tau and restored.tau is not None
    more = torch.randn(13, generator=g)
    threshold.update(more)
    restored.update(more)
    assert restored.tau == threshold.tau
    assert restored.state_dict() == threshold.state_dict()
    # The state is plain data, and a copy: updating the original does not change a saved state.
    assert len(state["margins"]) == 50
    threshold.update(torch.tensor([123.0]))
    assert 123.0 not in state["margins"]


def test_noise_threshold_other_windows_and_checks():
    threshold = NoiseThreshold(window=20, percentile=0.25)  # q = 5: the 6th and 7th smallest
    threshold.update(torch.arange(20, 0, -1, dtype=torch.float32))
    assert threshold.tau == pytest.approx(6.5)
    with pytest.raises(ValueError, match="window"):
        NoiseThreshold(window=1)
    with pytest.raises(ValueError, match="percentile"):
        NoiseThreshold(percentile=0.0)
    with pytest.raises(ValueError, match="percentile"):
        NoiseThreshold(percentile=1.0)


def test_noise_threshold_floor_is_exact():
    """Docstring rule: q = K * window, tau = mean of the floor(q)+1-th and floor(q)+2-th smallest.

    K = 0.29, window = 100: q = 29, so the 30th and 31st smallest (values 29 and 30 of 0..99).
    """
    threshold = NoiseThreshold(window=100, percentile=0.29)
    threshold.update(torch.arange(100, dtype=torch.float32))
    assert threshold.tau == pytest.approx(29.5)


def test_threshold_feeds_the_loss():
    """The engine's loop: margins of a step feed tau, tau flags the next step's pairs."""
    threshold = NoiseThreshold(window=4, percentile=0.25)  # q = 1: the 2nd and 3rd smallest
    policy, reference, ext, seq_ids = make_stream(12, LENGTHS)
    out = spa_loss(policy, reference, seq_ids, extrapolated_logps=ext, tau=threshold.tau, backend="torch")
    assert out.confident.all()
    threshold.update(out.noise_margin[:2])
    assert threshold.tau is None  # 2 of 4
    threshold.update(out.noise_margin[2:])
    margins = sorted(out.noise_margin.tolist())
    assert threshold.tau == pytest.approx(0.5 * (margins[1] + margins[2]))
    assert margins[1] < threshold.tau < margins[2]
    flagged = spa_loss(policy, reference, seq_ids, extrapolated_logps=ext, alpha=0.1, tau=threshold.tau,
                       backend="torch")  # fmt: skip
    assert torch.equal(flagged.confident, out.noise_margin > threshold.tau)
    assert 0 < int((~flagged.confident).sum()) < 4


# ----------------------------------------------------------------------------- argument checks


def simple_inputs(rows=4, width=3):
    return -torch.rand(rows, width, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(loss_type="kto"), ValueError, "loss_type"),
        (dict(beta=0.0), ValueError, "beta"),
        (dict(beta=-0.1), ValueError, "beta"),
        (dict(beta=float("nan")), ValueError, "beta"),
        (dict(alpha=0.1), ValueError, "tau"),
        (dict(alpha=0.1, tau=0.0, label_smoothing=0.4), ValueError, r"label_smoothing \+ alpha must be < 0.5"),
        (dict(loss_type="ipo", label_smoothing=0.1), ValueError, "loss_type='ipo'"),
        (dict(loss_type="hinge", label_smoothing=0.1), ValueError, "loss_type='hinge'"),
        (dict(loss_type="hinge", alpha=0.1, tau=0.0), ValueError, "loss_type='hinge'"),
        (dict(label_smoothing=0.5), ValueError, "label_smoothing"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(alpha=0.5, tau=0.0), ValueError, "alpha"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(loss_type="exo_pair"), ValueError, r"label_smoothing must lie in \(0, 1\) for loss_type='exo_pair'"),
        (dict(loss_type="exo_pair", label_smoothing=0.1, alpha=0.1, tau=0.0), ValueError, "fixed target probability"),
        (dict(loss_type="nca_pair", label_smoothing=0.1), ValueError, "loss_type='nca_pair' has no label smoothing"),
        (dict(loss_type="hinge", gamma=0.5), ValueError, "gamma"),
        (dict(gamma=float("inf")), ValueError, "gamma"),
        (dict(loss_type="discopop", discopop_tau=0.0), ValueError, "discopop_tau"),
        (dict(loss_type="orpo", reference_logps=simple_inputs()), ValueError, "reference-free"),
        (dict(label_smoothing=torch.tensor([0.1, 0.5])), ValueError, r"\[0, 0.5\), got from 0.1"),
        (dict(label_smoothing=torch.tensor([0.1, float("nan")])), ValueError, r"label_smoothing must lie in"),
        (dict(label_smoothing=torch.tensor([0.1, 0.35]), alpha=0.2, tau=0.0), ValueError, r"\+ alpha must be < 0.5"),
        (dict(label_smoothing=torch.tensor([0.1, 0.2, 0.3])), ValueError, r"holds \(3,\) values for 2 pairs"),
        (dict(label_smoothing=torch.zeros(2, 1)), ValueError, "1-D floating point"),
        (dict(label_smoothing=torch.zeros(2, dtype=torch.long)), ValueError, "1-D floating point"),
        (dict(loss_type="exo_pair", label_smoothing=torch.tensor([0.1, 0.0])), ValueError, r"\(0, 1\)"),
        (dict(loss_type="ipo", label_smoothing=torch.tensor([0.0, 0.1])), ValueError, "loss_type='ipo'"),
    ],
)
def test_bad_options_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        spa_loss(simple_inputs(), **kwargs)


def test_bad_shapes_and_ids_raise():
    logps = simple_inputs()
    with pytest.raises(ValueError, match=r"must be \[2P, T\] \(one sequence per row\), got \(3, 3\)"):
        spa_loss(simple_inputs(rows=3))
    with pytest.raises(ValueError, match="odd"):
        spa_loss(logps, seq_ids=torch.tensor([[0, 1, 2]] * 4))
    with pytest.raises(ValueError, match="num_pairs=1"):
        spa_loss(logps, seq_ids=torch.tensor([[0, 1, 2]] * 4), num_pairs=1)
    with pytest.raises(ValueError, match=r"num_pairs=3 but policy_logps has 4 rows"):
        spa_loss(logps, num_pairs=3)  # rows would be paired wrongly
    with pytest.raises(ValueError, match="reference_logps"):
        spa_loss(logps, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="extrapolated_logps"):
        spa_loss(logps, extrapolated_logps=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="seq_ids"):
        spa_loss(logps, seq_ids=torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="seq_ids"):
        spa_loss(logps, seq_ids=torch.zeros(4, 3))
    with pytest.raises(TypeError, match="seq_ids"):
        spa_loss(logps, seq_ids=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        spa_loss(logps, mask=torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        spa_loss(logps, mask=torch.ones(4, 3))
    with pytest.raises(ValueError, match="seq_ids or mask"):
        spa_loss(logps, seq_ids=torch.zeros(4, 3, dtype=torch.long), mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="policy_logps must be"):
        spa_loss(logps.reshape(-1))  # 1-D without seq_ids
    with pytest.raises(TypeError, match="policy_logps"):
        spa_loss(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="no preference pairs"):
        spa_loss(logps, seq_ids=torch.full((4, 3), -1))
