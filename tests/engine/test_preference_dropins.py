"""The Liger drop-ins (DPO with every loss type, SimPO, CPO, ORPO) against a float64 transcription
of Liger-Kernel's formulas with materialised logits.

Inputs follow Liger: `_input` is [2B, T, H] with the B chosen rows above the B rejected
rows, `target` is [2B, T] with `ignore_index` at prompt and padding positions. Shapes are
odd on purpose (3 pairs, T=5, H=6, V=11).
"""

import inspect
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, sequence_logps

from selfee_fast import FusedLinearCPOLoss, FusedLinearDPOLoss, FusedLinearORPOLoss, FusedLinearSimPOLoss
from selfee_fast.dpo import DPO_LOSS_TYPES

F32 = torch.float32
AUX_NAMES = ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean", "nll_loss",
             "chosen_rewards", "rejected_rewards")  # fmt: skip
CLASSES = {"dpo": FusedLinearDPOLoss, "simpo": FusedLinearSimPOLoss, "cpo": FusedLinearCPOLoss,
           "orpo": FusedLinearORPOLoss}  # fmt: skip


# ----------------------------------------------------------------------------- transcription


def liger_pair_losses(loss_type, chosen_ratio, rejected_ratio, *, beta, label_smoothing, gamma, discopop_tau):
    """Liger-Kernel 0.8.5's per-pair formulas (sigmoid with smoothing is cDPO / SimPO / CPO; ipo is TRL's)."""
    c, r, eps = chosen_ratio, rejected_ratio, label_smoothing
    x = beta * (c - r)
    logsig, sig = F.logsigmoid, torch.sigmoid
    if loss_type == "sigmoid":
        return -logsig(x - gamma) * (1 - eps) - logsig(gamma - x) * eps
    if loss_type == "robust":
        return (-(1 - eps) * logsig(x) + eps * logsig(-x)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (c - r - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - x)
    if loss_type == "exo_pair":
        return sig(x) * (logsig(x) - math.log1p(-eps)) + sig(-x) * (logsig(-x) - math.log(eps))
    if loss_type == "nca_pair":
        return -logsig(beta * c) - 0.5 * logsig(-beta * c) - 0.5 * logsig(-beta * r)
    if loss_type == "bco_pair":
        return -logsig(beta * c) - logsig(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - sig(beta * c) + sig(beta * r)
    if loss_type == "apo_down":
        return sig(beta * c) + 1 - sig(x)
    if loss_type == "discopop":
        modulation = sig(x / discopop_tau)
        return -logsig(x) * (1 - modulation) + torch.exp(-x) * modulation
    if loss_type == "orpo":
        log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
        return -beta * logsig(log_odds)
    raise AssertionError(loss_type)


def expected(kind, batch, options, nll_target=None):
    """float64 (loss, aux, gradients of the trainable inputs) of Liger's class `kind` built with `options`."""
    b = {k: (v.detach().double().requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point()
             else v) for k, v in batch.items()}  # fmt: skip
    target, ignore_index = b["target"], options.get("ignore_index", -100)
    beta = options.get("beta", 0.1)
    loss_type = {"dpo": options.get("loss_type", "sigmoid"), "orpo": "orpo"}.get(kind, "sigmoid")
    average = {"simpo": True, "orpo": True}.get(kind, options.get("average_log_prob", False))
    compute_nll = options.get("compute_nll_loss", kind != "dpo")
    nll_weight = 1.0 if kind == "orpo" else options.get("alpha", 1.0)
    smoothing = options.get("label_smoothing", 0.0) if loss_type not in ("hinge", "ipo") else 0.0
    num_pairs = target.shape[0] // 2

    policy, _, logits = sequence_logps(b["_input"], b["lin_weight"], b["bias"], target, ignore_index, average)
    reference = torch.zeros_like(policy)
    if kind == "dpo" and options.get("use_ref_model", True):
        ref_weight = b["ref_weight"] if b["ref_weight"] is not None else b["lin_weight"].detach()
        reference = sequence_logps(b["ref_input"], ref_weight, b["ref_bias"], target, ignore_index, average)[0].detach()
    ratios = policy - reference
    losses = liger_pair_losses(
        loss_type, ratios[:num_pairs], ratios[num_pairs:], beta=beta, label_smoothing=smoothing,
        gamma=options.get("gamma", 0.5) if kind == "simpo" else 0.0, discopop_tau=options.get("discopop_tau", 0.05),
    )  # fmt: skip
    loss = losses.sum() / num_pairs

    nll = torch.zeros((), dtype=torch.float64)
    if compute_nll:
        nll_labels = nll_target if nll_target is not None else target
        chosen_labels = nll_labels[:num_pairs]
        picked = torch.log_softmax(logits[:num_pairs], -1).gather(-1, chosen_labels.clamp(min=0)[..., None])
        nll_mask = chosen_labels != ignore_index
        nll = -(picked.squeeze(-1) * nll_mask).sum() / nll_mask.sum()
        loss = loss + nll_weight * nll
    seq_len, vocab = target.shape[1], b["lin_weight"].shape[0]
    aux = [
        policy[:num_pairs], policy[num_pairs:],
        logits[:num_pairs].sum() / (num_pairs * seq_len * vocab), logits[num_pairs:].sum() / (num_pairs * seq_len * vocab),
        nll, beta * ratios[:num_pairs], beta * ratios[num_pairs:],
    ]  # fmt: skip
    if kind == "orpo":
        chosen, rejected = policy[:num_pairs], policy[num_pairs:]
        log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
        aux += [F.logsigmoid(log_odds).mean(), log_odds.mean()]
    trainable = [k for k in ("_input", "lin_weight", "bias") if b[k] is not None and b[k].requires_grad]
    grads = dict(zip(trainable, torch.autograd.grad(loss, [b[k] for k in trainable]), strict=True))
    return loss.detach(), [a.detach() for a in aux], grads


# ----------------------------------------------------------------------------- inputs


def make_batch(pairs=3, seq_len=5, hidden=6, vocab=11, *, seed=0, bias=True, ref_bias=True, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    batch = dict(
        lin_weight=(0.4 * torch.randn(vocab, hidden, generator=g)).requires_grad_(True),
        _input=torch.randn(rows, seq_len, hidden, generator=g).requires_grad_(True),
        target=torch.randint(0, vocab, (rows, seq_len), generator=g),
        bias=(0.5 * torch.randn(vocab, generator=g)).requires_grad_(True) if bias else None,
        ref_input=torch.randn(rows, seq_len, hidden, generator=g),
        ref_weight=0.4 * torch.randn(vocab, hidden, generator=g),
        ref_bias=0.5 * torch.randn(vocab, generator=g) if ref_bias else None,
    )
    for r in range(rows):  # a prompt of 1-2 tokens and 0-2 padding tokens, never all ignored
        prompt = 1 + (r % 2)
        padding = min((r * 5) % 3, seq_len - prompt - 1)
        batch["target"][r, :prompt] = ignore_index
        if batch["target"][r, prompt] == ignore_index:  # an ignore_index inside the vocabulary
            batch["target"][r, prompt] = (ignore_index + 1) % vocab
        if padding:
            batch["target"][r, seq_len - padding :] = ignore_index
    return batch


def call(kind, module, batch, nll_target=None):
    args = (batch["lin_weight"], batch["_input"], batch["target"], batch["bias"])
    if kind == "dpo":
        return module(*args, batch["ref_input"], batch["ref_weight"], batch["ref_bias"])
    if kind == "orpo":
        return module(*args, nll_target=nll_target)
    return module(*args)


def check(kind, batch, options, *, backend="torch", nll_target=None):
    module = CLASSES[kind](**options, backend=backend)
    loss, aux = call(kind, module, batch, nll_target)
    want_loss, want_aux, want_grads = expected(kind, batch, options, nll_target)
    assert loss.dim() == 0 and loss.dtype == F32
    assert_close(loss, want_loss, F32, scale=want_loss.abs().item())
    assert isinstance(aux, tuple) and len(aux) == (9 if kind == "orpo" else 7)
    pairs = batch["target"].shape[0] // 2
    for i, (got, want) in enumerate(zip(aux, want_aux, strict=True)):
        assert got.shape == want.shape == ((pairs,) if i in (0, 1, 5, 6) else ()), i
        assert i == 4 or not got.requires_grad, i  # the NLL term is part of the loss
        assert_close(got, want, F32, scale=want.abs().max().item())
    loss.backward()
    for key, want in want_grads.items():
        got = batch[key].grad
        assert got is not None and got.shape == batch[key].shape and got.dtype == batch[key].dtype, key
        assert_close(got, want, F32, scale=want.abs().max().item())
    return loss, aux


# ----------------------------------------------------------------------------- tests

SMOOTHING = {"sigmoid": 0.1, "robust": 0.2, "exo_pair": 1e-3}


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize(
    ("average_log_prob", "compute_nll_loss", "bias", "ref_bias", "ignore_index"),
    [(False, False, True, True, -100), (True, True, False, True, 7), (False, True, True, False, -1)],
)
def test_dpo_every_loss_type(poison_empty, loss_type, average_log_prob, compute_nll_loss, bias, ref_bias, ignore_index):
    batch = make_batch(seed=DPO_LOSS_TYPES.index(loss_type), bias=bias, ref_bias=ref_bias, ignore_index=ignore_index)
    options = dict(
        beta=0.3, alpha=0.7, compute_nll_loss=compute_nll_loss, average_log_prob=average_log_prob,
        loss_type=loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0), ignore_index=ignore_index,
    )  # fmt: skip
    if loss_type == "discopop":
        options["discopop_tau"] = 0.4  # the modulation is not saturated at |beta z| ~ 1
    check("dpo", batch, options)


@pytest.mark.parametrize("loss_type", ["exo_pair", "nca_pair", "apo_down"])
def test_dpo_without_reference_model(loss_type):
    batch = make_batch(seed=3)
    options = dict(beta=0.2, use_ref_model=False, loss_type=loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0))
    check("dpo", batch, options)


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("simpo", dict()),
        ("simpo", dict(beta=2.0, gamma=0.3, label_smoothing=0.1, alpha=0.5, ignore_index=4)),
        ("simpo", dict(compute_nll_loss=False)),
        ("cpo", dict()),
        ("cpo", dict(beta=0.5, alpha=0.3, label_smoothing=0.2, average_log_prob=True)),
        ("cpo", dict(compute_nll_loss=False, ignore_index=2)),
        ("orpo", dict()),
        ("orpo", dict(beta=0.4, ignore_index=3)),
        ("orpo", dict(compute_nll_loss=False)),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_reference_free_losses(poison_empty, kind, options, bias):
    batch = make_batch(seed=len(options) + 10 * bias, bias=bias, ignore_index=options.get("ignore_index", -100))
    check(kind, batch, options)


def test_orpo_nll_target():
    """`nll_target` replaces `target` in the NLL term only."""
    batch = make_batch(seed=21)
    nll_target = torch.randint(0, 11, batch["target"].shape, generator=torch.Generator().manual_seed(1))
    nll_target[:, 0] = -100
    loss, _ = check("orpo", batch, dict(beta=0.2), nll_target=nll_target)
    plain, _ = call("orpo", FusedLinearORPOLoss(beta=0.2, backend="torch"), make_batch(seed=21))
    assert abs(loss.item() - plain.item()) > 1e-3


@pytest.mark.parametrize("kind", CLASSES)
def test_triton_backend_small_case(kind):
    batch = make_batch(pairs=1, seq_len=4, hidden=8, vocab=16, seed=12)
    options = dict(loss_type="bco_pair", compute_nll_loss=True) if kind == "dpo" else {}
    check(kind, batch, options, backend="triton")


def test_frozen_head_gets_no_gradient():
    """LoRA: the head does not require grad, the hidden states do (Liger's frozen-weight test)."""
    batch = make_batch(seed=5)
    batch["lin_weight"].requires_grad_(False)
    batch["bias"].requires_grad_(False)
    check("simpo", batch, dict(beta=2.0))
    assert batch["lin_weight"].grad is None and batch["bias"].grad is None


def test_label_smoothing_of_a_loss_without_it_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match=r"loss_type='apo_zero' has no label smoothing"):
        module = FusedLinearDPOLoss(loss_type="apo_zero", label_smoothing=0.1, backend="torch")
    assert module.label_smoothing == 0.0


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: FusedLinearDPOLoss(loss_type="robust", label_smoothing=0.5), r"\[0\.0, 0\.5\) for loss_type='robust'"),
        (lambda: FusedLinearDPOLoss(loss_type="exo_pair", label_smoothing=0.0), "must be > 0 for loss_type='exo_pair'"),
        (lambda: FusedLinearSimPOLoss(label_smoothing=0.5), r"\[0\.0, 0\.5\) for SimPO"),
        (lambda: FusedLinearCPOLoss(label_smoothing=-0.1), r"\[0\.0, 0\.5\) for CPO"),
    ],
)
def test_bad_settings_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_calls_raise():
    batch = make_batch(seed=6)
    with pytest.raises(ValueError, match="nll_target"):
        call("orpo", FusedLinearORPOLoss(backend="torch"), batch, nll_target=batch["target"][:2])
    with pytest.raises(ValueError, match="target"):
        call("simpo", FusedLinearSimPOLoss(backend="torch"), dict(batch, target=batch["target"][:3]))
    with pytest.raises(TypeError, match=r"^_input is torch\.bfloat16 but lin_weight is torch\.float32"):
        call("cpo", FusedLinearCPOLoss(backend="torch"), dict(batch, _input=batch["_input"].bfloat16()))


@pytest.mark.parametrize("kind", CLASSES)
def test_constructor_and_call_match_liger(kind):
    """Liger's arguments, in Liger's order, with Liger's defaults; ours only add keyword-only ones."""
    chunked_loss = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is a bench extra")
    name = {"dpo": "DPO", "simpo": "SimPO", "cpo": "CPO", "orpo": "ORPO"}[kind]
    liger_class = getattr(chunked_loss, f"LigerFusedLinear{name}Loss")
    for method in ("__init__", "forward"):
        theirs = list(inspect.signature(getattr(liger_class, method)).parameters.values())
        ours = list(inspect.signature(getattr(CLASSES[kind], method)).parameters.values())
        assert [(p.name, p.default) for p in ours[: len(theirs)]] == [(p.name, p.default) for p in theirs], method
        assert all(p.kind == p.KEYWORD_ONLY for p in ours[len(theirs) :]), method
