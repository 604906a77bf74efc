"""Loading local models and running body + fused head, against transformers' own logits."""

import pytest
import torch

from selfee_fast import models
from selfee_fast.tiny import build_tiny_llama, build_tokenizer

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
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2, "sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),  # its LM head has a bias
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_families_match_transformers(family, tmp_path):
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    tokenizer = build_tokenizer(CORPUS, tmp_path, vocab_size=160)
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    getattr(transformers, model_name)(config).save_pretrained(tmp_path)
    model, tokenizer = models.load_model(tmp_path, lora=models.LoraSettings(r=4, alpha=8), gradient_checkpointing=False)
    input_ids, attention_mask, labels = batch(tokenizer)
    out = models.sequence_token_logprobs(model, input_ids, attention_mask, labels, reference="init")
    with torch.no_grad(), model.disable_adapter():
        want = hf_logprobs(model, input_ids, attention_mask, labels)
    torch.testing.assert_close(out.reference[:, :-1].double(), want, rtol=1e-5, atol=1e-5)
    out.policy.sum().backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
