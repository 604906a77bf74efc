"""`FusedLinearDPOLoss` against a float64 transcription of Liger's DPO formulas with materialised logits.

Inputs follow Liger: `x` is [2B, T, H] with the B chosen rows above the B rejected rows,
`target` is [2B, T] with `ignore_index` at prompt and padding positions.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F
from conftest import sequence_logps

from selfee_fast import FusedLinearDPOLoss, SPALossOutput

RTOL, ATOL = 1e-5, 1e-6  # fp32 outputs and gradients
IGNORE = -100


# ----------------------------------------------------------------------------- transcription


def liger_reference(
    weight, x, target, bias=None, ref_x=None, ref_weight=None, ref_bias=None, *, beta=0.1, alpha=1.0,
    compute_nll_loss=False, use_ref_model=True, average_log_prob=False, loss_type="sigmoid", label_smoothing=0.0,
    spa_alpha=0.0, tau=None, extrapolate=None, ignore_index=IGNORE,
):  # fmt: skip
    """float64 transcription; returns (loss, aux 7-tuple, noise margins, confident flags)."""
    num_pairs = target.shape[0] // 2
    policy, token_logps, logits = sequence_logps(x, weight, bias, target, ignore_index, average_log_prob)
    if use_ref_model:
        reference, _, ref_logits = sequence_logps(ref_x, ref_weight, ref_bias, target, ignore_index, average_log_prob)
        reference = reference.detach()
    else:
        reference = torch.zeros_like(policy).detach()
    if extrapolate is not None:
        lam = extrapolate
        ext_logits = ((1 + lam) * logits - lam * ref_logits).detach()
        mask = target != ignore_index
        picked = torch.log_softmax(ext_logits, -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
        ext = torch.where(mask, picked, torch.zeros_like(picked)).sum(-1)
        if average_log_prob:
            ext = ext / mask.sum(-1)
    else:
        ext = policy.detach()

    losses, margins, flags = [], [], []
    for k in range(num_pairs):
        chosen_ratio = policy[k] - reference[k]
        rejected_ratio = policy[k + num_pairs] - reference[k + num_pairs]
        z = chosen_ratio - rejected_ratio
        m = beta * ((ext[k] - ext[k + num_pairs]) - (reference[k] - reference[k + num_pairs]))
        p = 1.0 if tau is None or m.item() > tau else 0.0
        u = beta * z
        if loss_type == "sigmoid" and spa_alpha > 0:  # SPEC.md's self-refinement loss
            loss = -((1 - spa_alpha) + spa_alpha * p) * F.logsigmoid(u) - spa_alpha * (1 - p) * F.logsigmoid(-u)
        elif loss_type == "sigmoid":  # DPO; cDPO with label smoothing
            eps = label_smoothing
            loss = -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)
        elif loss_type == "robust":
            eps = label_smoothing + spa_alpha * (1 - p)
            loss = (-(1 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1 - 2 * eps)
        elif loss_type == "ipo":
            loss = (z - 1 / (2 * beta)) ** 2
        elif loss_type == "hinge":
            loss = torch.relu(1 - u)
        else:
            raise AssertionError(loss_type)
        losses.append(loss)
        margins.append(m.item())
        flags.append(p == 1.0)
    loss = torch.stack(losses).sum() / num_pairs

    chosen_mask = target[:num_pairs] != ignore_index
    nll = -token_logps[:num_pairs].sum() / chosen_mask.sum()
    if compute_nll_loss:
        loss = loss + alpha * nll
    else:
        nll = torch.zeros((), dtype=loss.dtype)
    seq_len, vocab = target.shape[1], weight.shape[0]
    aux = (
        policy[:num_pairs], policy[num_pairs:],
        logits[:num_pairs].sum() / (num_pairs * seq_len * vocab), logits[num_pairs:].sum() / (num_pairs * seq_len * vocab),
        nll,
        beta * (policy[:num_pairs] - reference[:num_pairs]), beta * (policy[num_pairs:] - reference[num_pairs:]),
    )  # fmt: skip
    return loss, aux, torch.tensor(margins, dtype=torch.float64), torch.tensor(flags)


# ----------------------------------------------------------------------------- inputs


def make_batch(pairs=2, seq_len=7, hidden=8, vocab=16, *, seed=0, bias=True, separate_ref=True, ignore_index=IGNORE):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    batch = dict(
        lin_weight=(0.4 * torch.randn(vocab, hidden, generator=g)).requires_grad_(True),
        _input=torch.randn(rows, seq_len, hidden, generator=g).requires_grad_(True),
        target=torch.randint(0, vocab, (rows, seq_len), generator=g),
        bias=(0.5 * torch.randn(vocab, generator=g)).requires_grad_(True) if bias else None,
        ref_input=torch.randn(rows, seq_len, hidden, generator=g),
        ref_weight=0.4 * torch.randn(vocab, hidden, generator=g) if separate_ref else None,
        ref_bias=0.5 * torch.randn(vocab, generator=g) if bias and separate_ref else None,
    )
    for r in range(rows):  # a prompt of 1-2 tokens and 0-2 padding tokens, never all ignored
        prompt = 1 + (r % 2)
        padding = min((r * 5) % 3, seq_len - prompt - 1)
        batch["target"][r, :prompt] = ignore_index
        if padding:
            batch["target"][r, seq_len - padding :] = ignore_index
    return batch


def as_float64(batch):
    out = {}
    for key, value in batch.items():
        if value is None or not value.is_floating_point():
            out[key] = value
        else:
            out[key] = value.detach().double().requires_grad_(value.requires_grad)
    return out


def expected_for(batch, **options):
    ref = as_float64(batch)
    if ref["ref_weight"] is None:  # shared head
        ref["ref_weight"] = ref["lin_weight"].detach()
    loss, aux, margins, flags = liger_reference(
        ref["lin_weight"], ref["_input"], ref["target"], ref["bias"], ref["ref_input"], ref["ref_weight"],
        ref["ref_bias"], **options,
    )  # fmt: skip
    wrt = [ref[k] for k in ("_input", "lin_weight", "bias") if ref[k] is not None and ref[k].requires_grad]
    grads = torch.autograd.grad(loss, wrt)
    return loss.item(), aux, margins, flags, grads


def close(actual, expected, what, rtol=RTOL, atol=ATOL):
    actual = torch.as_tensor(actual)
    assert not torch.isnan(actual).any(), f"NaN in {what}"
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected).detach().double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")  # fmt: skip


def call(module, batch, **kwargs):
    return module(
        batch["lin_weight"], batch["_input"], batch["target"], batch["bias"], batch["ref_input"], batch["ref_weight"],
        batch["ref_bias"], **kwargs,
    )  # fmt: skip


AUX_NAMES = ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean", "nll_loss",
             "chosen_rewards", "rejected_rewards")  # fmt: skip


def check_against_reference(module, batch, module_kwargs=None, **options):
    module_kwargs = module_kwargs or {}
    loss, aux = call(module, batch, **module_kwargs)
    exp_loss, exp_aux, _, _, exp_grads = expected_for(batch, **options, **module_kwargs)
    close(loss, exp_loss, "loss")
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert isinstance(aux, tuple) and len(aux) == 7
    pairs = batch["target"].shape[0] // 2
    for name, got, want in zip(AUX_NAMES, aux, exp_aux, strict=True):
        assert got.shape == ((pairs,) if name.endswith(("logps", "rewards")) else ()), name
        close(got, want, name)
    loss.backward()
    params = [k for k in ("_input", "lin_weight", "bias") if batch[k] is not None and batch[k].requires_grad]
    for key, want in zip(params, exp_grads, strict=True):
        got = batch[key].grad
        assert got is not None and got.shape == batch[key].shape and got.dtype == batch[key].dtype, key
        close(got, want, f"grad {key}")
    return loss, aux


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing", "average_log_prob"),
    [("sigmoid", 0.0, False), ("sigmoid", 0.0, True), ("sigmoid", 0.2, False), ("robust", 0.1, False),
     ("robust", 0.0, True), ("ipo", 0.0, False), ("hinge", 0.0, False)],
)  # fmt: skip
def test_matches_liger_formulas(loss_type, label_smoothing, average_log_prob):
    batch = make_batch(seed=1)
    options = dict(beta=0.5, loss_type=loss_type, label_smoothing=label_smoothing, average_log_prob=average_log_prob)
    module = FusedLinearDPOLoss(backend="torch", **options)
    check_against_reference(module, batch, **options)


def test_cdpo_label_smoothing_changes_the_sigmoid_loss():
    """Liger ignores label_smoothing with loss_type='sigmoid'; here it is cDPO."""
    batch = make_batch(seed=2)
    plain, _ = call(FusedLinearDPOLoss(backend="torch", beta=0.5), batch)
    smoothed, _ = call(FusedLinearDPOLoss(backend="torch", beta=0.5, label_smoothing=0.2), batch)
    assert abs(plain.item() - smoothed.item()) > 1e-3
    close(smoothed, expected_for(batch, beta=0.5, label_smoothing=0.2)[0], "cDPO loss")


@pytest.mark.parametrize("compute_nll_loss", [False, True])
def test_nll_term(compute_nll_loss):
    batch = make_batch(seed=3)
    options = dict(beta=0.1, alpha=0.5, compute_nll_loss=compute_nll_loss)
    _, aux = check_against_reference(FusedLinearDPOLoss(backend="torch", **options), batch, **options)
    if compute_nll_loss:
        assert aux[4].item() > 0
    else:
        assert aux[4].item() == 0


def test_without_reference_model():
    """use_ref_model=False: reference log-probs are 0; ref_input is neither needed nor used."""
    batch = make_batch(seed=4)
    batch["ref_input"] = batch["ref_weight"] = batch["ref_bias"] = None
    options = dict(beta=0.2, use_ref_model=False)
    _, aux = check_against_reference(FusedLinearDPOLoss(backend="torch", **options), batch, **options)
    close(aux[5], 0.2 * aux[0], "chosen_rewards = beta * chosen_logps", rtol=1e-6, atol=1e-7)
    close(aux[6], 0.2 * aux[1], "rejected_rewards = beta * rejected_logps", rtol=1e-6, atol=1e-7)
    # Reference inputs given anyway are ignored.
    with_ref = make_batch(seed=4)
    loss_ignoring_ref, _ = call(FusedLinearDPOLoss(backend="torch", **options), with_ref)
    close(loss_ignoring_ref, expected_for(batch, **options)[0], "loss with unused ref inputs")


def test_shared_head_equals_passing_the_same_head():
    """ref_weight=None shares the policy head (ref_bias is still separate, as given)."""
    batch = make_batch(seed=5, separate_ref=False)
    batch["ref_bias"] = batch["bias"].detach().clone()
    options = dict(beta=0.3)
    module = FusedLinearDPOLoss(backend="torch", **options)
    shared_loss, shared_aux = check_against_reference(module, batch, **options)
    explicit = dict(batch, ref_weight=batch["lin_weight"].detach().clone())
    explicit_loss, explicit_aux = call(module, explicit)
    close(explicit_loss, shared_loss, "loss", rtol=1e-6, atol=1e-7)
    for name, a, b in zip(AUX_NAMES, explicit_aux, shared_aux, strict=True):
        close(a, b, name, rtol=1e-6, atol=1e-7)


def test_separate_head_is_used():
    batch = make_batch(seed=6)
    options = dict(beta=0.3)
    module = FusedLinearDPOLoss(backend="torch", **options)
    check_against_reference(module, batch, **options)
    shared = dict(batch, ref_weight=None)
    assert abs(call(module, shared)[0].item() - call(module, batch)[0].item()) > 1e-4


def test_reference_gets_no_gradient():
    batch = make_batch(seed=7)
    for key in ("ref_input", "ref_weight", "ref_bias"):
        batch[key].requires_grad_(True)
    loss, _ = call(FusedLinearDPOLoss(backend="torch"), batch)
    loss.backward()
    for key in ("ref_input", "ref_weight", "ref_bias"):
        assert batch[key].grad is None or not batch[key].grad.any(), key
    assert batch["_input"].grad.abs().sum() > 0


def test_frozen_head_and_no_bias():
    batch = make_batch(seed=8, bias=False)
    batch["lin_weight"].requires_grad_(False)
    options = dict(beta=0.1, average_log_prob=True)
    check_against_reference(FusedLinearDPOLoss(backend="torch", **options), batch, **options)
    assert batch["lin_weight"].grad is None


def test_custom_ignore_index():
    batch = make_batch(seed=9, ignore_index=-1)
    options = dict(beta=0.1, ignore_index=-1, compute_nll_loss=True)
    check_against_reference(FusedLinearDPOLoss(backend="torch", **options), batch, **options)


def midpoint_tau(batch, **options):
    margins = sorted(expected_for(batch, **options)[2].tolist())
    mid = len(margins) // 2
    assert margins[mid] - margins[mid - 1] > 1e-5
    return 0.5 * (margins[mid - 1] + margins[mid])


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_spa_self_refinement_kwargs(loss_type):
    """spa_alpha / tau / extrapolate: SPEC's loss with DND margins from extrapolated logits."""
    batch = make_batch(pairs=4, seq_len=5, seed=10)
    lam = 0.5
    tau = midpoint_tau(batch, beta=0.5, extrapolate=lam)
    options = dict(beta=0.5, loss_type=loss_type)
    spa = dict(spa_alpha=0.1, tau=tau, extrapolate=lam)
    module = FusedLinearDPOLoss(backend="torch", **options)
    check_against_reference(module, batch, module_kwargs=spa, **options)
    _, _, margins, flags, _ = expected_for(batch, **options, **spa)
    _, aux, out = call(module, batch, **spa, return_output=True)
    assert isinstance(out, SPALossOutput)
    close(out.noise_margin, margins, "noise margin")
    assert torch.equal(out.confident, flags) and flags.any() and not flags.all()
    # DND: the margins of extrapolated logits differ from beta * z; without extrapolate they are beta * z.
    plain = call(module, batch, spa_alpha=0.1, tau=tau, return_output=True)[2]
    close(plain.noise_margin, 0.5 * ((aux[0] - aux[1]) - (out.ref_chosen_logps - out.ref_rejected_logps)),
          "margin without DND", rtol=1e-5, atol=1e-6)  # fmt: skip
    assert (plain.noise_margin - out.noise_margin).abs().max() > 1e-3
    # Smoothing changes exactly the flagged pairs' losses.
    unsmoothed = call(module, batch, tau=tau, extrapolate=lam, return_output=True)[2]
    changed = (out.losses - unsmoothed.losses).abs() > 1e-6
    assert torch.equal(changed, ~flags)


def test_spa_alpha_with_nothing_flagged_is_dpo():
    batch = make_batch(seed=11)
    module = FusedLinearDPOLoss(backend="torch", beta=0.4)
    dpo, _ = call(module, batch)
    nothing_flagged, _ = call(module, batch, spa_alpha=0.1, tau=-1e9, extrapolate=0.25)
    everything_flagged, _ = call(module, batch, spa_alpha=0.1, tau=1e9, extrapolate=0.25)
    cdpo, _ = call(FusedLinearDPOLoss(backend="torch", beta=0.4, label_smoothing=0.1), batch)
    close(nothing_flagged, dpo.item(), "nothing flagged")
    close(everything_flagged, cdpo.item(), "everything flagged")


def test_triton_backend_small_case():
    batch = make_batch(pairs=1, seq_len=4, hidden=8, vocab=16, seed=12)
    lam = 0.5
    options = dict(beta=0.5, compute_nll_loss=True)
    module = FusedLinearDPOLoss(backend="triton", **options)
    check_against_reference(module, batch, module_kwargs=dict(spa_alpha=0.1, tau=0.0, extrapolate=lam), **options)


def test_aux_is_liger_shaped_and_positional_call_works():
    batch = make_batch(pairs=3, seed=13)
    module = FusedLinearDPOLoss(-100, 0.1, 1.0, False, True, True, False, 1, "sigmoid", backend="torch")
    _, aux = module(batch["lin_weight"], batch["_input"], batch["target"], batch["bias"], batch["ref_input"],
                       batch["ref_weight"], batch["ref_bias"])  # fmt: skip
    assert [tuple(a.shape) for a in aux] == [(3,), (3,), (), (), (), (3,), (3,)]
    assert all(not a.requires_grad for i, a in enumerate(aux) if i != 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(loss_type="kto"), "^Unsupported loss_type"),
        (dict(loss_type="orpo"), "^Unsupported loss_type"),  # a loss of its own: FusedLinearORPOLoss
        (dict(label_smoothing=0.5), r"label_smoothing must lie in \[0\.0, 0\.5\) for loss_type='sigmoid'"),
        (dict(loss_type="robust", label_smoothing=-0.1), r"label_smoothing must lie in \[0\.0, 0\.5\)"),
        (dict(loss_type="exo_pair"), "label_smoothing must be > 0 for loss_type='exo_pair'"),
        (dict(loss_type="exo_pair", label_smoothing=1.0), "label_smoothing must be < 1"),
        (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
    ],
)
def test_unsupported_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedLinearDPOLoss(**kwargs)


def test_smoothing_of_a_loss_without_it_is_ignored_with_a_warning_as_liger_does():
    with pytest.warns(UserWarning, match=r"loss_type='hinge' has no label smoothing"):
        module = FusedLinearDPOLoss(loss_type="hinge", label_smoothing=0.1, backend="torch")
    assert module.label_smoothing == 0.0


def test_errors_name_the_drop_in_arguments():
    """A Liger user passed lin_weight, _input, target, ref_input: the messages say so."""
    batch = make_batch(seed=14)
    module = FusedLinearDPOLoss(backend="torch")
    with pytest.raises(TypeError, match=r"^_input is torch\.bfloat16 but lin_weight is torch\.float32"):
        call(module, dict(batch, _input=batch["_input"].bfloat16()))
    with pytest.raises(ValueError, match=r"^target\[0, 0\] = 10000 is outside the vocabulary .* of lin_weight;"):
        call(module, dict(batch, target=torch.full_like(batch["target"], 10_000)))
    with pytest.raises(ValueError, match=r"^ref_input has shape"):
        call(module, dict(batch, ref_input=batch["ref_input"][:1]))


def test_bad_calls_raise():
    batch = make_batch(seed=14)
    module = FusedLinearDPOLoss(backend="torch")
    with pytest.raises(ValueError, match="ref_input"):
        call(module, dict(batch, ref_input=None, ref_weight=None, ref_bias=None))
    with pytest.raises(ValueError, match="target"):
        call(module, dict(batch, _input=batch["_input"][:3], ref_input=batch["ref_input"][:3],
                          target=batch["target"][:3]))  # fmt: skip
    with pytest.raises(ValueError, match="extrapolate"):
        call(FusedLinearDPOLoss(backend="torch", use_ref_model=False), batch, extrapolate=0.5)
    with pytest.raises(ValueError, match="tau"):
        call(module, batch, spa_alpha=0.1)


def test_fully_ignored_last_rejected_row():
    batch = make_batch(seed=15)
    batch["target"][-1] = IGNORE
    options = dict(beta=0.1)
    check_against_reference(FusedLinearDPOLoss(backend="torch", **options), batch, **options)
