"""QLoRA (model.quantization=4bit): an NF4 base under the fused head, through the whole loop."""

import json
import random

import pytest
import torch
import yaml

from selfee_fast import models
from selfee_fast.config import ConfigError, load_config
from selfee_fast.demo.tiny import build_tiny_llama, build_tokenizer
from selfee_fast.pipeline import run_pipeline
from selfee_fast.preflight import preflight

pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
pytestmark = pytest.mark.usefixtures("chunked_backend")

WORDS = "the cat dog sat ran on a mat log big small red".split()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(5)) for _ in range(12)]
    tokenizer = build_tokenizer(prompts * 4, root / "model", vocab_size=150)
    build_tiny_llama(root / "model", tokenizer, hidden_size=64, layers=2)  # NF4 packs blocks of 64
    with (root / "seed.jsonl").open("w") as f:
        for p in prompts[:4]:
            f.write(json.dumps({"prompt": p, "chosen": "the cat sat", "rejected": "a big red log ran on a mat"}) + "\n")
    with (root / "pool.jsonl").open("w") as f:
        for p in prompts[4:]:
            f.write(json.dumps({"prompt": p}) + "\n")
    return root


def test_the_base_is_nf4_and_the_head_is_not(workspace):
    import bitsandbytes as bnb

    model, tokenizer = models.load_model(
        workspace / "model", lora=models.LoraSettings(r=4, alpha=8), quantization="4bit", gradient_checkpointing=False
    )
    base = model.get_base_model()
    assert isinstance(base.model.layers[0].mlp.down_proj.base_layer, bnb.nn.Linear4bit)
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight.dtype == torch.float32
    ids = torch.tensor([tokenizer("the cat sat on a mat").input_ids])
    out = models.sequence_token_logprobs(model, ids, torch.ones_like(ids), ids, reference="init")
    assert torch.isfinite(out.policy).all() and torch.isfinite(out.reference).all()
    out.policy.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_a_reference_pass_leaves_the_nf4_base_differentiable(workspace):
    # bitsandbytes' CPU inference kernel (taken in eval mode without gradients, on CPUs with
    # AVX512-BF16) has no backward: after a reference pass the adapters' gradients would change.
    # On a CPU without AVX512-BF16 the kernel is never taken and this passes either way.
    model, tokenizer = models.load_model(
        workspace / "model", lora=models.LoraSettings(r=4, alpha=8), quantization="4bit", gradient_checkpointing=False
    )
    with torch.no_grad():  # a nonzero adapter, so that the gradient reaches every layer's A
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.tensor([tokenizer("the cat sat on a mat").input_ids])

    def adapter_gradients() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = models.sequence_token_logprobs(model, ids, torch.ones_like(ids), ids)
        out.policy.sum().backward()
        return [p.grad.clone() for n, p in model.named_parameters() if "lora_A" in n]

    before = adapter_gradients()
    with torch.no_grad():
        models.sequence_token_logprobs(model, ids, torch.ones_like(ids), ids, reference="init")
    after = adapter_gradients()
    assert len(after) == len(before) > 0
    for first, second in zip(before, after, strict=True):
        torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_qlora_runs_the_loop_and_its_adapter_loads_on_the_plain_base(workspace):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = {
        "run_dir": str(workspace / "run"),
        "model": {"path": str(workspace / "model"), "lora_r": 4, "lora_alpha": 8, "quantization": "4bit"},
        "data": {"seed_pairs": str(workspace / "seed.jsonl"), "prompt_pools": [str(workspace / "pool.jsonl")],
                 "max_length": 64, "max_prompt_length": 32},
        "generation": {"max_new_tokens": 6, "batch_size": 4},
        "train": {"lr": 0.01, "batch_size": 4, "micro_batch_size": 2, "seed_epochs": 2},
        "spa": {"iterations": 1, "tau_window": 4, "alpha_warmup": 0.0},
    }  # fmt: skip
    (workspace / "run.yaml").write_text(yaml.safe_dump(config))
    messages = []
    summary = run_pipeline(load_config(workspace / "run.yaml"), log=messages.append)
    assert any(m.startswith("QLoRA: 4bit base") for m in messages)
    assert summary["stages"]["iter1"]["pairs"] == 8
    metrics = [json.loads(line) for line in (workspace / "run" / "stage0" / "train" / "metrics.jsonl").open()]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    tuned = PeftModel.from_pretrained(base, workspace / "run" / "iter1" / "model")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in tuned.named_parameters())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.lora_r=0"], "trains LoRA adapters on a frozen base"),
        (["model.quantization=8bit"], r"must be one of \('none', '4bit'\)"),
    ],
)
def test_qlora_config_errors(workspace, overrides, message):
    base = [f"model.path={workspace / 'model'}", "model.quantization=4bit", f"data.seed_pairs={workspace / 'seed.jsonl'}",
            f"data.prompt_pools=[{workspace / 'pool.jsonl'}]", "spa.iterations=1"]  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        preflight(load_config(None, [*base, *overrides]))
