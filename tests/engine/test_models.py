"""Loading local models and running body + fused head, against transformers' own logits."""

import types

import pytest
import torch

from selfee_fast import models
from selfee_fast.demo.tiny import build_tiny_llama, build_tokenizer

CORPUS = ["the cat sat on the mat", "add 2 and 3 to get 5", "hello world", "a list: 1, 2, 3"] * 10


pytestmark = pytest.mark.usefixtures("chunked_backend")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(CORPUS, path, vocab_size=160)
    build_tiny_llama(path, tokenizer, hidden_size=32, layers=2)
    return path


def batch(tokenizer):
    enc = tokenizer(["hello world the cat", "add 2"], return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    labels[:, :1] = -100  # a one-token "prompt"
    return enc.input_ids, enc.attention_mask, labels


def hf_logprobs(model, input_ids, attention_mask, labels):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()
    picked = torch.log_softmax(logits, -1)[:, :-1].gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(labels[:, 1:] != -100, picked, 0.0)


def test_missing_files_are_named(tmp_path, model_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.check_model_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        models.check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights in"):
        models.check_model_dir(tmp_path)
    assert models.check_model_dir(model_dir) == model_dir


def test_full_model_matches_transformers_logits(model_dir):
    model, tokenizer = models.load_model(model_dir, gradient_checkpointing=False)
    input_ids, attention_mask, labels = batch(tokenizer)
    out = models.sequence_token_logprobs(model, input_ids, attention_mask, labels)
    with torch.no_grad():
        want = hf_logprobs(model, input_ids, attention_mask, labels)
    torch.testing.assert_close(out.policy[:, :-1].double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.policy[:, -1], torch.zeros(2))


def test_lora_roles_share_one_base(model_dir):
    model, tokenizer = models.load_model(model_dir, lora=models.LoraSettings(r=4, alpha=8))
    input_ids, attention_mask, labels = batch(tokenizer)
    # A fresh LoRA adapter is the identity (B = 0): policy == init.
    out = models.sequence_token_logprobs(model, input_ids, attention_mask, labels, reference="init")
    torch.testing.assert_close(out.policy, out.reference)

    # Move the policy away from the base: the roles must now differ.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.normal_(0, 0.5)
    models.freeze_reference_adapter(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.mul_(-1)
    out = models.sequence_token_logprobs(model, input_ids, attention_mask, labels, reference="reference")
    init = models.sequence_token_logprobs(model, input_ids, attention_mask, labels, reference="init").reference
    assert not torch.allclose(out.policy, out.reference)
    assert not torch.allclose(out.reference, init)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(init[:, :-1].double(), hf_logprobs(model, input_ids, attention_mask, labels))

    # Only the policy adapter trains; the gradient reaches it through checkpointed blocks.
    out.policy.sum().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for n, p in model.named_parameters() if ".reference." in n)


def test_role_without_adapters_is_refused(model_dir):
    model, tokenizer = models.load_model(model_dir, gradient_checkpointing=False)
    input_ids, attention_mask, labels = batch(tokenizer)
    with pytest.raises(ValueError, match="can only act as the policy"):
        models.sequence_token_logprobs(model, input_ids, attention_mask, labels, reference="init")


FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2, "sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),  # its LM head has a bias
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
}


def build_family(family, path):
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    tokenizer = build_tokenizer(CORPUS, path, vocab_size=160)
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    getattr(transformers, model_name)(config).save_pretrained(path)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_families_match_transformers(family, tmp_path):
    build_family(family, tmp_path)
    model, tokenizer = models.load_model(tmp_path, lora=models.LoraSettings(r=4, alpha=8), gradient_checkpointing=False)
    input_ids, attention_mask, labels = batch(tokenizer)
    out = models.sequence_token_logprobs(model, input_ids, attention_mask, labels, reference="init")
    with torch.no_grad(), model.disable_adapter():
        want = hf_logprobs(model, input_ids, attention_mask, labels)
    torch.testing.assert_close(out.reference[:, :-1].double(), want, rtol=1e-5, atol=1e-5)
    out.policy.sum().backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_row_matches_padded_rows(family, attention, tmp_path):
    """Sequences packed end to end (positions restarting at 0) give each sequence's own
    log-probs and gradients: transformers keeps the attention inside each sequence."""
    from selfee_fast.data import pack, padded_seq_ids, right_pad

    build_family(family, tmp_path)
    model, _ = models.load_model(
        tmp_path, lora=models.LoraSettings(r=4, alpha=8), gradient_checkpointing=False, attention=attention
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    sequences = [[3, 4, 5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [5, 5]]
    prompt_lengths = [3, 1, 4, 1]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])

    def per_sequence(batch, position_ids=None):
        model.zero_grad()
        out = models.sequence_token_logprobs(
            model, batch["input_ids"], batch["attention_mask"], batch["labels"], reference="init",
            extrapolate=0.5, position_ids=position_ids,
        )  # fmt: skip
        ids = batch["seq_ids"].reshape(-1)
        sums = [
            torch.zeros(5, dtype=torch.float64).index_add(0, torch.where(ids >= 0, ids, 4), v.reshape(-1).double())[:4]
            for v in (out.policy, out.reference, out.extrapolated)
        ]
        (sums[0].float() * weights).sum().backward()
        grads = [p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
        return sums, grads

    padded = right_pad(sequences, prompt_lengths, 0)
    padded["seq_ids"] = padded_seq_ids(padded["labels"])
    packed = pack(sequences, prompt_lengths)
    want, want_grads = per_sequence(padded)
    got, got_grads = per_sequence(packed, packed["position_ids"])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(got_grads) == len(want_grads) > 0
    for a, b in zip(got_grads, want_grads, strict=True):
        # fp32 sums in another order: errors scale with the tensor's largest entries.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    # Without its position restarts the row is one long sequence: the check can fail.
    (leaky, *_), _ = per_sequence(packed)
    assert not torch.allclose(leaky, want[0], rtol=1e-3, atol=1e-3)


def test_attention_choice(tmp_path, monkeypatch):
    # auto leaves the choice to transformers (sdpa where the architecture has it) unless flash can run.
    assert models.attention_implementation("auto", "cpu", half_precision=True) is None
    assert models.attention_implementation("eager", "cuda", half_precision=False) == "eager"
    with pytest.raises(ValueError, match="attention must be one of"):
        models.attention_implementation("flash", "cpu", half_precision=True)
    monkeypatch.setattr(models, "_flash_attention_available", lambda: True)
    assert models.attention_implementation("auto", "cuda", half_precision=True) == "flash_attention_2"
    assert models.attention_implementation("auto", "cuda", half_precision=False) is None  # fp32 activations
    assert models.attention_implementation("auto", "cpu", half_precision=True) is None
    build_family("llama", tmp_path / "llama")
    assert models.attention_implementation("auto", "cuda", half_precision=True, model_path=tmp_path / "llama") == (
        "flash_attention_2"
    )
    import transformers

    # Bloom has no flash-attention 2 (nor sdpa) in transformers: auto leaves the choice to it.
    bloom = transformers.BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2)
    transformers.BloomForCausalLM(bloom).save_pretrained(tmp_path / "bloom")
    assert models.attention_implementation("auto", "cuda", half_precision=True, model_path=tmp_path / "bloom") is None
    assert models.attention_implementation("auto", "cuda", half_precision=True, model_path=tmp_path / "none") is None


def test_packing_probe_refuses_architectures_that_attend_across_sequences(tmp_path):
    """OPT builds its mask without position_ids: packed sequences would see each other."""
    import transformers

    build_family("llama", tmp_path / "llama")
    llama, _ = models.load_model(tmp_path / "llama", gradient_checkpointing=False)
    assert models.packing_problem(llama) is None
    opt = transformers.OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                 word_embed_proj_dim=16)  # fmt: skip
    torch.manual_seed(0)
    transformers.OPTForCausalLM(opt).save_pretrained(tmp_path / "opt")
    opt_model = transformers.OPTForCausalLM.from_pretrained(tmp_path / "opt")
    problem = models.packing_problem(opt_model)
    assert problem is not None and problem.startswith("opt (") and "does not keep packed sequences apart" in problem
    from selfee_fast.config import ConfigError, load_config
    from selfee_fast.roles import check_packing

    with pytest.raises(ConfigError, match=r"model\.packing: opt .* set model\.packing=false"):
        check_packing(load_config(None, ["model.packing=true"]), opt_model)
    check_packing(load_config(None, []), opt_model)  # packing off: nothing to check


def test_flash_attention_gets_the_packed_boundaries_directly(model_dir, monkeypatch):
    """Under flash-attention the body receives cu_seq_lens / max_length: no per-layer search on the device."""
    from selfee_fast.data import pack

    model, _ = models.load_model(model_dir, gradient_checkpointing=False)
    seen = {}

    def spy(*args, **kwargs):  # records what the body is given; nothing is computed
        seen.update(kwargs)
        return types.SimpleNamespace(last_hidden_state=torch.zeros(1, kwargs["input_ids"].shape[1], 32))

    monkeypatch.setattr(model.get_decoder(), "forward", spy)
    batch = pack([[3, 4, 5, 6], [7, 8, 9]], [1, 1])
    args = (batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["cu_seq_lens"])
    models.final_hidden_states(model, *args)
    assert "cu_seq_lens_q" not in seen, "sdpa: transformers finds the boundaries itself"
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    models.final_hidden_states(model, *args)
    assert seen["cu_seq_lens_q"].tolist() == [0, 4, 7] and seen["max_length_q"] == 4 == seen["max_length_k"]


def test_pickled_weights_are_refused_with_the_conversion(tmp_path):
    from selfee_fast.models import check_model_dir

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FileNotFoundError, match=r"pickled weights .*safe_serialization=True"):
        check_model_dir(tmp_path)
