"""`linear_logprobs` through both backends against a float64 PyTorch reference."""

import pytest
import torch
from conftest import assert_close, naive_extrapolated, naive_logprobs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfee_fast import chunked, linear_logprobs, spa_loss

BACKENDS = ["torch", "triton"]


def make_batch(b, t, h, v, dtype, *, seed=0, scale=1.0, ignore_fraction=0.3, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g).to(dtype).requires_grad_(requires_grad)
    ref_hidden = torch.randn(b, t, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * scale / h**0.5).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[torch.rand(b, t, generator=g) < ignore_fraction] = -100
    return hidden, ref_hidden, weight, targets


def grads_of(values, upstream, inputs):
    return torch.autograd.grad((values * upstream).sum(), inputs, allow_unused=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trainable_head", [False, True])
def test_policy_values_and_gradients(poison_empty, backend, dtype, trainable_head):
    hidden, _, weight, targets = make_batch(3, 9, 40, 131, dtype)
    weight.requires_grad_(trainable_head)
    bias = torch.randn(131).to(dtype).requires_grad_(trainable_head)
    out = linear_logprobs(hidden, weight, targets, bias=bias, backend=backend)
    assert out.reference is None and out.extrapolated is None
    assert out.policy.shape == targets.shape and out.policy.dtype == torch.float32

    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    want, logits = naive_logprobs(h64, w64, targets, b64)
    assert_close(out.policy, want, dtype, float(logits.detach().abs().max()))
    assert torch.equal(out.policy[targets == -100], torch.zeros_like(out.policy[targets == -100]))

    upstream = torch.randn(targets.shape)
    wrt = [hidden, weight, bias] if trainable_head else [hidden]
    got = grads_of(out.policy, upstream, wrt)
    expected = grads_of(want, upstream.double(), [h64, w64, b64][: len(wrt)])
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == dtype
        assert_close(g, e, dtype, float(e.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_allocates_no_vocabulary_sized_gradient(backend, monkeypatch):
    hidden, ref_hidden, weight, targets = make_batch(2, 5, 24, 97, torch.float32)
    largest = []
    for name in ("zeros", "empty", "zeros_like", "empty_like"):
        real = getattr(torch, name)

        def recording(*args, _real=real, **kwargs):
            t = _real(*args, **kwargs)
            largest.append(t.numel())
            return t

        monkeypatch.setattr(torch, name, recording)
    out = linear_logprobs(hidden, weight, targets, ref_hidden=ref_hidden, extrapolate=0.5, backend=backend)
    out.policy.sum().backward()
    monkeypatch.undo()
    assert weight.grad is None and hidden.grad is not None
    assert largest and max(largest) < weight.numel(), "a [V, H]-sized buffer was allocated for a frozen head"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("separate_head", [False, True])
@pytest.mark.parametrize("lam", [0.0, 0.125, 0.5, 1.0])
def test_reference_and_extrapolated(backend, separate_head, lam):
    hidden, ref_hidden, weight, targets = make_batch(2, 7, 32, 97, torch.float32, seed=int(lam * 8))
    ref_weight = weight + 0.1 * torch.randn_like(weight) if separate_head else None
    bias, ref_bias = torch.randn(97), torch.randn(97)
    out = linear_logprobs(
        hidden, weight, targets, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
        extrapolate=lam, backend=backend,
    )  # fmt: skip
    head = ref_weight if separate_head else weight
    want_ref, logits = naive_logprobs(ref_hidden, head, targets, ref_bias)
    want_ext = naive_extrapolated(hidden, weight, ref_hidden, head, targets, lam, bias, ref_bias)
    scale = float(logits.abs().max())
    assert_close(out.reference, want_ref, torch.float32, scale)
    assert_close(out.extrapolated, want_ext, torch.float32, scale)
    assert not out.reference.requires_grad and not out.extrapolated.requires_grad
    if lam == 0.0:
        assert torch.equal(out.extrapolated, out.policy.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequences_all_ignored_and_single_token(backend):
    hidden, ref_hidden, weight, targets = make_batch(3, 4, 16, 33, torch.float32, ignore_fraction=0.0)
    targets[1] = -100  # a whole sequence of prompt / padding
    out = linear_logprobs(hidden, weight, targets, ref_hidden=ref_hidden, extrapolate=0.5, backend=backend)
    for values in out:
        assert torch.equal(values[1], torch.zeros(4))
    single = linear_logprobs(hidden[:1, :1], weight, targets[:1, :1], backend=backend)
    assert_close(single.policy, naive_logprobs(hidden[:1, :1], weight, targets[:1, :1])[0], torch.float32, 10)
    nothing = linear_logprobs(hidden, weight, torch.full_like(targets, -100), backend=backend)
    nothing.policy.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    hidden, ref_hidden, weight, targets = make_batch(2, 6, 32, 80, torch.float32, scale=4e3)
    out = linear_logprobs(hidden, weight, targets, ref_hidden=ref_hidden, extrapolate=0.5, backend=backend)
    want, logits = naive_logprobs(hidden, weight, targets)
    scale = float(logits.abs().max())
    assert scale > 1e3
    assert_close(out.policy, want, torch.float32, scale)
    assert torch.isfinite(out.extrapolated).all()
    (grad,) = grads_of(out.policy, torch.ones(targets.shape), [hidden])
    h64 = hidden.detach().double().requires_grad_()
    (want_grad,) = grads_of(naive_logprobs(h64, weight, targets)[0], torch.ones(targets.shape).double(), [h64])
    assert_close(grad, want_grad, torch.float32, float(want_grad.abs().max()))


def test_fp64_cpu_path_passes_gradcheck():
    hidden, _, weight, targets = make_batch(2, 3, 6, 11, torch.float64)
    weight.requires_grad_()
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    fn = lambda h, w, b: linear_logprobs(h, w, targets, bias=b, backend="torch").policy
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_repeat_is_bit_for_bit(backend):
    hidden, _, weight, targets = make_batch(2, 20, 24, 70, torch.float32)
    weight.requires_grad_()

    def run():
        out = linear_logprobs(hidden, weight, targets, deterministic=True, backend=backend)
        return (out.policy, *torch.autograd.grad(out.policy.sum(), [hidden, weight]))

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_chunked_path_independent_of_chunk_size():
    hidden, ref_hidden, weight, targets = make_batch(2, 11, 16, 40, torch.float32)
    kwargs = dict(ref_hidden=ref_hidden, extrapolate=0.25, backend="torch")
    one_row = linear_logprobs(hidden, weight, targets, chunk_bytes=1, **kwargs)
    whole = linear_logprobs(hidden, weight, targets, **kwargs)
    for a, b in zip(one_row, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# budgets: one column and one row per tile; a few columns (the targets fall in many tiles)
# and rows; everything in one tile
@pytest.mark.parametrize("chunk_bytes", [1, 3 * 5 * 4 + 3, 10**9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_path_tiles_the_vocabulary_exactly(poison_empty, chunk_bytes, dtype):
    hidden, ref_hidden, weight, targets = make_batch(2, 11, 24, 97, dtype, seed=3, scale=3.0)
    weight.requires_grad_()
    ref_weight = (weight.detach().float() + 0.1 * torch.randn(97, 24)).to(dtype)
    bias = torch.randn(97).to(dtype).requires_grad_()
    ref_bias = torch.randn(97).to(dtype)
    out = linear_logprobs(
        hidden, weight, targets, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
        extrapolate=0.5, chunk_bytes=chunk_bytes, backend="torch",
    )  # fmt: skip
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    want, logits = naive_logprobs(h64, w64, targets, b64)
    scale = float(logits.detach().abs().max())
    assert_close(out.policy, want, dtype, scale)
    assert_close(out.reference, naive_logprobs(ref_hidden, ref_weight, targets, ref_bias)[0], dtype, scale)
    want_ext = naive_extrapolated(
        hidden, weight.detach(), ref_hidden, ref_weight, targets, 0.5, bias.detach(), ref_bias
    )
    assert_close(out.extrapolated, want_ext, dtype, scale)

    upstream = torch.randn(targets.shape)
    got = grads_of(out.policy, upstream, [hidden, weight, bias])
    expected = grads_of(want, upstream.double(), [h64, w64, b64])
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, dtype, float(e.abs().max()))


def test_tile_shape_keeps_the_budget_and_reads_the_head_once_when_it_can():
    for rows, vocab, hidden, buffers, chunk_bytes, upcast in [
        (1024, 128256, 512, 2, 32 * 2**20, False), (8192, 128256, 4096, 3, 32 * 2**20, True),
        (7, 97, 24, 3, 63, False), (1, 5, 3, 1, 1, True), (300, 32000, 64, 2, 2**20, False),
    ]:  # fmt: skip
        row_step, columns = chunked.tile_shape(rows, vocab, hidden, buffers, 4, chunk_bytes, upcast)
        assert 1 <= row_step <= rows and 1 <= columns <= vocab
        if columns > 1 or row_step > 1:
            assert row_step * columns * buffers * 4 <= chunk_bytes
        if upcast and columns > 1:
            assert columns * hidden * 4 <= chunked._WEIGHT_SLICE_BYTES
    # Llama-3's vocabulary, 1024 rows: all rows in one chunk, the head read once
    assert chunked.tile_shape(1024, 128256, 512, 2, 4, 32 * 2**20, False) == (1024, 4096)
    # a budget too small for one row of a wide tile: narrower tiles, not fewer bytes per column
    assert chunked.tile_shape(300, 32000, 64, 2, 4, 2**20, False) == (128, 1024)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_are_handled(backend):
    hidden, _, weight, targets = make_batch(2, 5, 16, 30, torch.float32)
    transposed_hidden = hidden.detach().transpose(0, 1).contiguous().transpose(0, 1)  # [b, t, h] view, odd strides
    column_major_weight = weight.T.contiguous().T
    assert not column_major_weight.is_contiguous()
    out = linear_logprobs(transposed_hidden, column_major_weight, targets, backend=backend)
    assert_close(out.policy, naive_logprobs(hidden, weight, targets)[0], torch.float32, 10)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 3), t=st.integers(1, 6), h=st.integers(1, 40), v=st.integers(1, 90),
    ignore=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), backend=st.sampled_from(BACKENDS),
)  # fmt: skip
def test_property_any_shape_and_mask(b, t, h, v, ignore, seed, backend):
    hidden, ref_hidden, weight, targets = make_batch(b, t, h, v, torch.float32, seed=seed, ignore_fraction=ignore)
    out = linear_logprobs(hidden, weight, targets, ref_hidden=ref_hidden, extrapolate=0.5, backend=backend)
    want, logits = naive_logprobs(hidden, weight, targets)
    assert_close(out.policy, want, torch.float32, float(logits.abs().max()) if logits.numel() else 1.0)
    assert_close(out.reference, naive_logprobs(ref_hidden, weight, targets)[0], torch.float32, 10.0)
    assert (out.policy <= 1e-6).all()


class TestBadInput:
    def setup_method(self):
        self.hidden, self.ref_hidden, self.weight, self.targets = make_batch(2, 3, 8, 10, torch.float32)

    def test_hidden_size_mismatch(self):
        with pytest.raises(ValueError, match="hidden has size 7 in its last dimension"):
            linear_logprobs(self.hidden[..., :7], self.weight, self.targets)

    def test_targets_shape(self):
        with pytest.raises(ValueError, match=r"targets has shape \(2, 2\)"):
            linear_logprobs(self.hidden, self.weight, self.targets[:, :2])

    def test_targets_dtype(self):
        with pytest.raises(TypeError, match="targets must be an integer tensor"):
            linear_logprobs(self.hidden, self.weight, self.targets.float())

    def test_target_out_of_range_names_position(self):
        targets = self.targets.clone()
        targets[1, 2] = 10
        with pytest.raises(ValueError, match=r"targets\[1, 2\] = 10 is outside the vocabulary \[0, 10\)"):
            linear_logprobs(self.hidden, self.weight, targets)
        targets[1, 2] = -5
        with pytest.raises(ValueError, match=r"targets\[1, 2\] = -5"):
            linear_logprobs(self.hidden, self.weight, targets)

    def test_weight_dtype_and_rank(self):
        with pytest.raises(TypeError, match="weight must be float16"):
            linear_logprobs(self.hidden, self.weight.int(), self.targets)
        with pytest.raises(ValueError, match="weight must be a 2-D"):
            linear_logprobs(self.hidden, self.weight[None], self.targets)

    def test_hidden_and_head_dtypes_must_match(self):
        with pytest.raises(TypeError, match=r"hidden is torch\.bfloat16 but weight is torch\.float32"):
            linear_logprobs(self.hidden.bfloat16(), self.weight, self.targets)
        with pytest.raises(
            TypeError, match=r"ref_hidden is torch\.bfloat16 but its head \(ref_weight\) is torch\.float32"
        ):
            linear_logprobs(
                self.hidden, self.weight, self.targets, ref_hidden=self.ref_hidden.bfloat16(), ref_weight=self.weight
            )

    def test_reference_shapes(self):
        with pytest.raises(ValueError, match="ref_hidden has shape"):
            linear_logprobs(self.hidden, self.weight, self.targets, ref_hidden=self.ref_hidden[:1])
        with pytest.raises(ValueError, match="ref_weight has shape"):
            linear_logprobs(
                self.hidden, self.weight, self.targets, ref_hidden=self.ref_hidden, ref_weight=self.weight[:5]
            )
        with pytest.raises(ValueError, match="without ref_hidden"):
            linear_logprobs(self.hidden, self.weight, self.targets, ref_weight=self.weight)

    def test_bias_shape(self):
        with pytest.raises(ValueError, match=r"bias must have shape \(10,\)"):
            linear_logprobs(self.hidden, self.weight, self.targets, bias=torch.zeros(9))

    def test_extrapolate_needs_reference(self):
        with pytest.raises(ValueError, match="extrapolate needs the reference"):
            linear_logprobs(self.hidden, self.weight, self.targets, extrapolate=0.5)
        for bad in (-1.0, float("inf"), float("nan"), True):
            with pytest.raises(ValueError, match="extrapolate must be a finite number"):
                linear_logprobs(self.hidden, self.weight, self.targets, ref_hidden=self.ref_hidden, extrapolate=bad)

    def test_unknown_backend(self, monkeypatch):
        with pytest.raises(ValueError, match="backend must be one of"):
            linear_logprobs(self.hidden, self.weight, self.targets, backend="cuda")
        monkeypatch.setenv("SELFEE_FAST_BACKEND", "gpu")
        with pytest.raises(ValueError, match="SELFEE_FAST_BACKEND must be one of"):
            linear_logprobs(self.hidden, self.weight, self.targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trainable_head", [False, True])
def test_split_backward_matches_the_fused_one(monkeypatch, dtype, trainable_head):
    """SELFEE_FAST_TRITON_BACKWARD=split: dz per chunk of rows, then dz @ W; same gradients."""
    import selfee_fast.triton_logprobs as triton_logprobs

    hidden, _, weight, targets = make_batch(3, 11, 40, 131, dtype)
    weight.requires_grad_(trainable_head)
    upstream = torch.randn(targets.shape)
    wrt = [hidden, weight] if trainable_head else [hidden]
    fused = grads_of(linear_logprobs(hidden, weight, targets, backend="triton").policy, upstream, wrt)
    monkeypatch.setenv("SELFEE_FAST_TRITON_BACKWARD", "split")
    monkeypatch.setattr(triton_logprobs, "SPLIT_CHUNK_BYTES", 131 * weight.element_size() * 7)  # 7-row chunks
    split = grads_of(linear_logprobs(hidden, weight, targets, backend="triton").policy, upstream, wrt)
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    want, _ = naive_logprobs(h64, w64, targets)
    expected = grads_of(want, upstream.double(), [h64, w64][: len(wrt)])
    for s, f, e in zip(split, fused, expected, strict=True):
        assert s.dtype == dtype
        assert_close(s, e, dtype, float(e.abs().max()))
        assert_close(f, e, dtype, float(e.abs().max()))
    assert torch.equal(split[0][targets == -100], torch.zeros_like(split[0][targets == -100]))
    monkeypatch.setenv("SELFEE_FAST_TRITON_BACKWARD", "fuse")
    with pytest.raises(ValueError, match="SELFEE_FAST_TRITON_BACKWARD must be one of"):
        grads_of(linear_logprobs(hidden, weight, targets, backend="triton").policy, upstream, wrt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_backward_accumulates_a_chunk_of_rows_at_a_time(monkeypatch, dtype):
    """The fp32 accumulator holds ACCUMULATOR_BYTES of active rows; chunking changes nothing."""
    import selfee_fast.triton_logprobs as triton_logprobs

    hidden, _, weight, targets = make_batch(3, 11, 40, 131, dtype)
    upstream = torch.randn(targets.shape)

    real_backward, launches = triton_logprobs.logprobs_backward, []
    monkeypatch.setattr(
        triton_logprobs, "logprobs_backward", lambda *a, **k: launches.append(a[2].numel()) or real_backward(*a, **k)
    )
    monkeypatch.setattr(triton_logprobs, "ACCUMULATOR_BYTES", 40 * 4 * 5)  # 5-row chunks
    (chunked,) = grads_of(linear_logprobs(hidden, weight, targets, backend="triton").policy, upstream, [hidden])
    assert len(launches) > 1 and max(launches) == 5 and sum(launches) == int((targets != -100).sum())
    h64 = hidden.detach().double().requires_grad_()
    want, _ = naive_logprobs(h64, weight.double(), targets)
    (expected,) = grads_of(want, upstream.double(), [h64])
    assert chunked.dtype == dtype
    assert_close(chunked, expected, dtype, float(expected.abs().max()))
    assert torch.equal(chunked[targets == -100], torch.zeros_like(chunked[targets == -100]))


@pytest.mark.parametrize(("backend", "vocab"), [("torch", 1000), ("triton", 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_long_sequences_with_extreme_logits_stay_finite(dtype, backend, vocab):
    """4096 tokens whose logits reach tens of thousands (near fp16's limit): no NaN or inf anywhere.

    The Triton kernels run under the interpreter here, so with a small vocabulary.
    """
    torch.manual_seed(0)
    tokens, hidden_size = 4096, 64
    hidden = (torch.randn(2, tokens // 2, hidden_size) * 30).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size) * 30).to(dtype)
    labels = torch.randint(0, vocab, (2, tokens // 2))
    out = linear_logprobs(hidden, weight, labels, ref_hidden=hidden.detach() * 0.9, extrapolate=0.5, backend=backend)
    assert float((hidden.float() @ weight.float().T).abs().max()) > 2e4, "the logits are extreme"
    for values in (out.policy, out.reference, out.extrapolated):
        assert torch.isfinite(values).all()
    result = spa_loss(out.policy, out.reference, mask=labels >= 0, extrapolated_logps=out.extrapolated, beta=0.1)
    result.loss.backward()
    assert torch.isfinite(result.loss) and torch.isfinite(hidden.grad).all()
