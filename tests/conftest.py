"""Shared test set-up: run the Triton kernels under the interpreter, poison fresh buffers.

Triton decides at decoration time whether a kernel is interpreted, so the switch is set
here, before any test module imports selfee_fast.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def _backport_interpreter_index_fix() -> None:
    """Triton <= 3.6's interpreter turns a scalar into an int with int(array of shape (1,)),
    which NumPy >= 2.4 refuses, so every `range()` over a runtime bound fails. Triton 3.9
    squeezes the array first; do the same on older versions (harmless on 3.9)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


_backport_interpreter_index_fix()

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point:
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(torch.iinfo(t.dtype).max)
    return t


@pytest.fixture
def poison_empty(monkeypatch):
    """Make torch.empty and Tensor.new_empty return NaN (floats) or a huge sentinel (ints):
    unwritten outputs show, on the Triton path and on the chunked one alike."""
    real_empty, real_new_empty = torch.empty, torch.Tensor.new_empty

    def poisoned(*args, **kwargs):
        return _poison(real_empty(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", poisoned)
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _poison(real_new_empty(self, *a, **k)))
    return poisoned


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Compare against a float64 reference with the input dtype's tolerance; NaN never passes.

    `scale` is the magnitude the error is relative to (e.g. the largest logit: an fp32
    logit of 1e4 is itself only known to ~1e-3).
    """
    tol = TOLERANCE[dtype]
    assert not torch.isnan(actual).any(), "NaN in result"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * max(scale, 1.0))


def naive_logprobs(hidden, weight, targets, bias=None, ignore_index=-100):
    """float64 log_softmax(hidden @ weight.T + bias)[targets]; 0 at ignored positions. Differentiable."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    active = targets != ignore_index
    picked = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).long()[..., None]).squeeze(-1)
    return torch.where(active, picked, torch.zeros_like(picked)), logits


def naive_extrapolated(hidden, weight, ref_hidden, ref_weight, targets, lam, bias=None, ref_bias=None):
    z = hidden.double() @ weight.double().T + (bias.double() if bias is not None else 0)
    z_ref = ref_hidden.double() @ ref_weight.double().T + (ref_bias.double() if ref_bias is not None else 0)
    active = targets != -100
    picked = torch.log_softmax((1 + lam) * z - lam * z_ref, -1).gather(-1, targets.clamp(min=0).long()[..., None])
    return torch.where(active, picked.squeeze(-1), torch.zeros(()).double())


@pytest.fixture
def reference():
    """The float64 references, as a namespace for test modules."""

    class Reference:
        logprobs = staticmethod(naive_logprobs)
        extrapolated = staticmethod(naive_extrapolated)
        close = staticmethod(assert_close)

    return Reference


@pytest.fixture(scope="module")
def chunked_backend():
    """Engine tests exercise the engine, not kernel numerics: keep "auto" off the slow interpreter.

    Set in os.environ (not monkeypatch) so subprocesses started by a test inherit it.
    """
    previous = os.environ.get("SELFEE_FAST_BACKEND")
    os.environ["SELFEE_FAST_BACKEND"] = "torch"
    yield
    if previous is None:
        os.environ.pop("SELFEE_FAST_BACKEND")
    else:
        os.environ["SELFEE_FAST_BACKEND"] = previous


def sequence_logps(x, weight, bias, target, ignore_index, average):
    """float64 transcription for the drop-in tests. Per row: the sum (or mean) over non-ignored tokens
    of log_softmax(x @ W.T + b)[target]; also the per-token log-probs and the logits."""
    logits = x @ weight.T
    if bias is not None:
        logits = logits + bias
    mask = target != ignore_index
    picked = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    token_logps = torch.where(mask, picked, torch.zeros_like(picked))
    total = token_logps.sum(-1)
    return (total / mask.sum(-1) if average else total), token_logps, logits
