"""Generation backends: hf and vLLM write the same records, resume alike, and vLLM gets the adapter.

vLLM needs a CUDA GPU and is not installed in CI, so most tests here run the vLLM backend
against a stand-in `vllm` module with the same call surface (LLM, SamplingParams,
LoRARequest; prompts as {"prompt_token_ids": ...}) that samples with transformers and
loads the LoRA adapter from the path it is handed. What they check is our side: which
model, adapter, prompt ids, seeds and stop tokens reach the engine, and what we write back.
`test_real_vllm_adapter_changes_samples` runs the real engine where one exists.
"""

import importlib.machinery
import importlib.util
import json
import random
import sys
import types
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml

from selfee_fast import generate
from selfee_fast.config import ConfigError, load_config
from selfee_fast.data import PromptRecord
from selfee_fast.demo.tiny import build_tiny_llama, build_tokenizer
from selfee_fast.generate import GenerationSettings, generate_responses, generate_responses_vllm
from selfee_fast.records import read_generations

WORDS = "the cat dog sat ran on a mat log big small red blue one two three".split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("generate")
    rng = random.Random(0)
    texts = [sentence(rng, rng.randint(2, 9)) for _ in range(60)]
    tokenizer = build_tokenizer(texts, root / "model", vocab_size=200)
    model = build_tiny_llama(root / "model", tokenizer, hidden_size=32, layers=2)
    # An adapter that really changes the model (peft initialises B to zero: a no-op adapter).
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    peft_model.save_pretrained(root / "adapter")
    prompts = [PromptRecord(f"pool.jsonl:{i + 1}", [{"role": "user", "content": t}]) for i, t in enumerate(texts[:10])]
    return root, tokenizer, prompts


SETTINGS = GenerationSettings(max_new_tokens=6, responses_per_prompt=2, batch_size=3, seed=7, temperature=1.0)


def test_hf_samples_ignore_the_models_own_sampling_options(workspace, tmp_path, monkeypatch):
    """A generation_config.json's repetition penalty (Qwen2.5-Instruct ships 1.05) must not
    reach hf samples: vLLM ignores it, and the paper samples with T and top_p alone."""
    from transformers import AutoModelForCausalLM

    root, tokenizer, prompts = workspace
    model = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    plain = generate_responses(model, tokenizer, prompts, SETTINGS, tmp_path / "plain.jsonl", log=lambda m: None)
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    messages = []
    opinionated = generate_responses(
        model, tokenizer, prompts, SETTINGS, tmp_path / "opinionated.jsonl", log=messages.append
    )
    assert [r.responses for r in opinionated] == [r.responses for r in plain]
    assert any("no_repeat_ngram_size=1" in m and "repetition_penalty=50.0" in m for m in messages), messages
    # Without the override the options do change the samples: the test can fail.
    monkeypatch.setattr(generate, "neutral_model_sampling", dict)
    penalised = generate_responses(
        model, tokenizer, prompts, SETTINGS, tmp_path / "penalised.jsonl", log=lambda m: None
    )
    assert [r.responses for r in penalised] != [r.responses for r in plain]


def test_hf_samples_are_seeded_stop_at_eos_and_resume_a_torn_batch(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    root, tokenizer, prompts = workspace
    model = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    quiet = {"log": lambda *_: None}
    # A stop token the tiny model emits often: some samples end before max_new_tokens.
    eos = tokenizer.eos_token_id
    model.generation_config.eos_token_id = [eos, *range(5, 60)]
    first = generate_responses(model, tokenizer, prompts, SETTINGS, tmp_path / "a.jsonl", **quiet)
    again = generate_responses(model, tokenizer, prompts, SETTINGS, tmp_path / "b.jsonl", **quiet)
    other = generate_responses(model, tokenizer, prompts, replace(SETTINGS, seed=8), tmp_path / "c.jsonl", **quiet)
    assert [r.responses for r in first] == [r.responses for r in again], "same seed, same samples"
    assert [r.responses for r in first] != [r.responses for r in other], "the seed matters"
    assert [r.index for r in first] == list(range(len(prompts)))
    stops = {eos, *range(5, 60)}
    for record in first:
        assert len(record.responses) == SETTINGS.responses_per_prompt
        for response, finished in zip(record.responses, record.finished, strict=True):
            assert finished == (response[-1] in stops), "finished: ended on a stop token"
            assert not any(t in stops for t in response[:-1]), "nothing after the first stop token"
            assert finished or len(response) == SETTINGS.max_new_tokens
    assert any(f for r in first for f in r.finished) and not all(f for r in first for f in r.finished)
    # A run killed inside batch 2: whole batches are kept, the torn one is regenerated.
    path = tmp_path / "a.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:7]) + lines[7][: len(lines[7]) // 2])
    resumed = generate_responses(model, tokenizer, prompts, SETTINGS, path, **quiet)
    assert [r.responses for r in resumed] == [r.responses for r in first]
    assert len(path.read_text().splitlines()) == len(prompts), "no record lost or duplicated"


def test_a_static_kv_cache_samples_what_the_dynamic_one_does(workspace, tmp_path):
    """generation.static_cache changes where the cache lives, not the samples (fp32 on the CPU)."""
    from transformers import AutoModelForCausalLM

    root, tokenizer, prompts = workspace
    model = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    caches = []  # the cache each forward of generation is handed
    model.register_forward_pre_hook(
        # transformers 5 hands it over as `cache`, earlier versions as `past_key_values`
        lambda module, args, kwargs: caches.append(type(kwargs.get("cache", kwargs.get("past_key_values"))).__name__),
        with_kwargs=True,
    )
    quiet = {"log": lambda *_: None}
    dynamic = generate_responses(model, tokenizer, prompts, SETTINGS, tmp_path / "dynamic.jsonl", **quiet)
    assert "StaticCache" not in caches
    caches.clear()
    static = generate_responses(model, tokenizer, prompts, replace(SETTINGS, static_cache=True),
                                tmp_path / "static.jsonl", **quiet)  # fmt: skip
    assert set(caches) == {"StaticCache"}, "the option reaches generate"
    assert [r.responses for r in static] == [r.responses for r in dynamic]


def test_long_prompts_keep_their_end_and_are_counted(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    from selfee_fast.data import prompt_ids

    root, tokenizer, prompts = workspace
    model = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    full = [prompt_ids(tokenizer, p.prompt) for p in prompts]
    limit = sorted(len(ids) for ids in full)[len(full) // 2]  # about half the prompts are longer
    settings = replace(SETTINGS, max_prompt_length=limit)
    records = generate_responses(model, tokenizer, prompts, settings, tmp_path / "g.jsonl", log=lambda *_: None)
    assert [r.prompt_truncated for r in records] == [len(ids) > limit for ids in full]
    assert 0 < sum(r.prompt_truncated for r in records) < len(records)
    assert all(r.prompt_ids == ids[-limit:] for r, ids in zip(records, full, strict=True))


# --------------------------------------------------------------------------- stand-in vLLM


@dataclass
class FakeSamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    seed: int | None = None
    stop_token_ids: list | None = None
    detokenize: bool = True


@dataclass
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self):
        assert self.lora_int_id >= 1 and self.lora_path  # vLLM's own checks


class FakeLLM:
    """Samples like vLLM would be asked to: per-request seed, stop tokens kept in token_ids."""

    events: ClassVar[list] = []

    def __init__(self, model, tokenizer, dtype, seed, gpu_memory_utilization, max_model_len, **options):
        from transformers import AutoModelForCausalLM

        self.base = AutoModelForCausalLM.from_pretrained(model).eval()
        self.options = dict(model=model, tokenizer=tokenizer, dtype=dtype, seed=seed, max_model_len=max_model_len,
                            gpu_memory_utilization=gpu_memory_utilization, **options)  # fmt: skip
        self.adapters = {}
        # vLLM's teardown: llm.llm_engine.engine_core.shutdown() stops the EngineCore process.
        core = types.SimpleNamespace(shutdown=lambda: FakeLLM.events.append(("shutdown",)))
        self.llm_engine = types.SimpleNamespace(engine_core=core)
        FakeLLM.events.append(("engine", self.options))

    def generate(self, prompts, sampling_params, *, use_tqdm=True, lora_request=None):
        from peft import PeftModel

        model = self.base
        if lora_request is not None:
            assert self.options.get("enable_lora"), "a LoRA request to an engine built without enable_lora"
            rank = json.loads((Path(lora_request.lora_path) / "adapter_config.json").read_text())["r"]
            assert rank <= self.options["max_lora_rank"]
            if lora_request.lora_int_id not in self.adapters:
                self.adapters[lora_request.lora_int_id] = PeftModel.from_pretrained(
                    self.base, lora_request.lora_path, adapter_name=lora_request.lora_name
                ).eval()
            model = self.adapters[lora_request.lora_int_id]
        FakeLLM.events.append(("generate", [p["prompt_token_ids"] for p in prompts], sampling_params, lora_request))
        outputs = []
        for prompt, params in zip(prompts, sampling_params, strict=True):
            ids = torch.tensor([prompt["prompt_token_ids"]])
            assert ids.shape[1] + params.max_tokens <= self.options["max_model_len"]
            rows = []
            for k in range(params.n):  # vLLM samples child k of a request with seed + k
                torch.manual_seed(params.seed + k)
                with torch.no_grad():
                    sequence = model.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                        max_new_tokens=params.max_tokens, eos_token_id=params.stop_token_ids, pad_token_id=0,
                    )  # fmt: skip
                rows.append(sequence[0, ids.shape[1] :].tolist())
            completions = []
            for row in rows:
                end = next((t for t, token in enumerate(row) if token in params.stop_token_ids), None)
                completions.append(types.SimpleNamespace(token_ids=row if end is None else row[: end + 1]))
            outputs.append(types.SimpleNamespace(outputs=completions))
        return outputs

    def __del__(self):
        FakeLLM.events.append(("deleted",))


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, FakeSamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = FakeLoRARequest
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)
    real_find_spec = importlib.util.find_spec
    spec = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: spec if name == "vllm" else real_find_spec(name, *a)
    )
    FakeLLM.events = []
    return FakeLLM.events


# --------------------------------------------------------------------------- tests


def test_vllm_records_have_the_hf_layout_and_the_prompt_ids_reach_the_engine(workspace, fake_vllm, tmp_path):
    root, tokenizer, prompts = workspace
    records = generate_responses_vllm(root / "model", tokenizer, prompts, SETTINGS, tmp_path / "vllm.jsonl",
                                      prompts_per_call=4, log=lambda *_: None)  # fmt: skip
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "model")
    hf_records = generate_responses(model, tokenizer, prompts, SETTINGS, tmp_path / "hf.jsonl", log=lambda *_: None)
    assert [r.index for r in records] == list(range(len(prompts)))
    for ours, hf in zip(records, hf_records, strict=True):
        assert set(ours.to_json()) == set(hf.to_json())
        assert ours.prompt_ids == hf.prompt_ids and ours.location == hf.location
        assert len(ours.responses) == SETTINGS.responses_per_prompt
        for response, finished in zip(ours.responses, ours.finished, strict=True):
            assert 1 <= len(response) <= SETTINGS.max_new_tokens
            assert finished == (response[-1] == tokenizer.eos_token_id)
    engine, *calls, shutdown, deleted = fake_vllm
    assert engine[1]["model"] == str(root / "model") and "enable_lora" not in engine[1]
    assert (shutdown, deleted) == (("shutdown",), ("deleted",)), "the engine is stopped and freed before returning"
    # 10 prompts in batches of 3; calls of >= 4 prompts: batches {0,1}, {2,3}.
    assert [len(c[1]) for c in calls] == [6, 4]
    sent = {tuple(ids) for c in calls for ids in c[1]}
    assert sent == {tuple(r.prompt_ids) for r in records}
    params = [p for c in calls for p in c[2]]
    assert len({p.seed for p in params}) == len(prompts), "one seed per prompt"
    child_seeds = [p.seed + k for p in params for k in range(p.n)]  # vLLM's seeds for the n samples
    assert len(set(child_seeds)) == len(child_seeds), "no two samples share a random stream"
    assert all(p.stop_token_ids == [tokenizer.eos_token_id] and p.max_tokens == 6 and p.n == 2 for p in params)


def test_vllm_resume_regenerates_only_the_torn_batch(workspace, fake_vllm, tmp_path):
    root, tokenizer, prompts = workspace
    path = tmp_path / "gen.jsonl"
    full = generate_responses_vllm(root / "model", tokenizer, prompts, SETTINGS, path, log=lambda *_: None)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:7]) + lines[7][: len(lines[7]) // 2])  # batches 0, 1 whole; batch 2 torn
    fake_vllm.clear()
    resumed = generate_responses_vllm(root / "model", tokenizer, prompts, SETTINGS, path, log=lambda *_: None)
    assert resumed == full, "per-prompt seeds: the regenerated batches equal the first run's"
    assert len(read_generations(path)) == len(prompts), "nothing lost, nothing duplicated"
    calls = [e for e in fake_vllm if e[0] == "generate"]
    assert sum(len(c[1]) for c in calls) == len(prompts) - 6, "batches 0 and 1 were not generated again"
    fake_vllm.clear()
    generate_responses_vllm(root / "model", tokenizer, prompts, SETTINGS, path, log=lambda *_: None)
    assert fake_vllm == [], "a complete file builds no engine"


def test_the_adapter_reaches_the_vllm_engine(workspace, fake_vllm, tmp_path):
    root, tokenizer, prompts = workspace
    with_adapter = generate_responses_vllm(
        root / "model", tokenizer, prompts, SETTINGS, tmp_path / "a.jsonl", adapter_path=root / "adapter",
        log=lambda *_: None,
    )  # fmt: skip
    engine = fake_vllm[0][1]
    assert engine["enable_lora"] is True and engine["max_lora_rank"] == 8, "rank 4 rounds up to vLLM's 8"
    requests = {e[3].lora_path for e in fake_vllm if e[0] == "generate"}
    assert requests == {str(root / "adapter")}
    without = generate_responses_vllm(root / "model", tokenizer, prompts, SETTINGS, tmp_path / "b.jsonl",
                                      log=lambda *_: None)  # fmt: skip
    assert [r.responses for r in with_adapter] != [r.responses for r in without]


def test_a_qlora_policy_samples_from_an_nf4_base_in_vllm(workspace, fake_vllm, tmp_path):
    """model.quantization=4bit: vLLM quantizes the base in flight (bitsandbytes) under the adapter."""
    root, tokenizer, prompts = workspace
    generate_responses_vllm(root / "model", tokenizer, prompts, SETTINGS, tmp_path / "q.jsonl",
                            adapter_path=root / "adapter", quantization="4bit", log=lambda *_: None)  # fmt: skip
    engine = fake_vllm[0][1]
    assert engine["quantization"] == "bitsandbytes" and engine["enable_lora"] is True
    generate_responses_vllm(root / "model", tokenizer, prompts, SETTINGS, tmp_path / "p.jsonl", log=lambda *_: None)
    assert "quantization" not in [e for e in fake_vllm if e[0] == "engine"][-1][1]


def test_pipeline_generates_with_vllm_before_loading_the_policy(workspace, fake_vllm, tmp_path, monkeypatch):
    from selfee_fast import pipeline

    root, _, prompts = workspace
    texts = [p.prompt[0]["content"] for p in prompts]
    seed = [{"prompt": t, "chosen": "the cat sat", "rejected": "a big red log"} for t in texts[:4]]
    (tmp_path / "seed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seed))
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    config = {
        "run_dir": str(tmp_path / "run"),
        "model": {"path": str(root / "model"), "lora_r": 4, "lora_alpha": 8},
        "data": {"seed_pairs": str(tmp_path / "seed.jsonl"), "prompt_pools": [str(tmp_path / "pool.jsonl")],
                 "max_length": 64, "max_prompt_length": 32},
        "generation": {"backend": "vllm", "max_new_tokens": 6, "batch_size": 4, "vllm_gpu_memory_utilization": 0.5},
        "train": {"lr": 0.01, "batch_size": 4, "micro_batch_size": 2, "seed_epochs": 1},
        "spa": {"iterations": 1, "tau_window": 4, "alpha_warmup": 0.0},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    from selfee_fast import roles

    real_load_policy = roles.load_policy
    monkeypatch.setattr(
        roles, "load_policy", lambda *a, **k: (fake_vllm.append(("load_policy",)), real_load_policy(*a, **k))[1]
    )
    monkeypatch.setenv("SELFEE_FAST_BACKEND", "torch")
    pipeline.run_pipeline(load_config(tmp_path / "run.yaml"), log=lambda *_: None)

    order = [e[0] for e in fake_vllm]
    assert order[:2] == ["load_policy", "engine"], "stage 0 trains; iteration 1 starts with the engine"
    assert order.index("deleted") < order.index("load_policy", 1), "the engine is gone before the policy loads"
    engine = fake_vllm[1][1]
    assert engine["model"] == str(root / "model") and engine["gpu_memory_utilization"] == 0.5
    assert {e[3].lora_path for e in fake_vllm if e[0] == "generate"} == {str(tmp_path / "run" / "stage0" / "model")}
    pairs = (tmp_path / "run" / "iter1" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) == len(prompts)

    # `selfee-fast generate --stage iter1` alone: the same engine set-up, no policy loaded.
    from selfee_fast.cli import main

    first = (tmp_path / "run" / "iter1" / "generations.jsonl").read_text()
    (tmp_path / "run" / "iter1" / "generations.jsonl").unlink()
    fake_vllm.clear()
    assert main(["generate", str(tmp_path / "run.yaml"), "--stage", "iter1"]) == 0
    assert [e[0] for e in fake_vllm] == ["engine", "generate", "shutdown", "deleted"]
    assert (tmp_path / "run" / "iter1" / "generations.jsonl").read_text() == first


def test_vllm_backend_without_vllm_is_refused_up_front(workspace, tmp_path, monkeypatch):
    from selfee_fast.preflight import preflight

    root, _, _ = workspace
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))  # fmt: skip
    config = {
        "run_dir": str(tmp_path / "run"), "model": {"path": str(root / "model")},
        "data": {"seed_pairs": str(tmp_path / "seed.jsonl"), "prompt_pools": [str(tmp_path / "pool.jsonl")]},
        "generation": {"backend": "vllm"}, "spa": {"iterations": 1},
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"pip install 'selfee-fast\[vllm\]'"):
        preflight(load_config(tmp_path / "c.yaml"))
    config["generation"]["backend"] = "sglang"
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"generation\.backend must be one of \('hf', 'vllm'\)"):
        preflight(load_config(tmp_path / "d.yaml"))


@pytest.mark.gpu
def test_real_vllm_adapter_changes_samples(workspace, tmp_path):
    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        pytest.skip("needs vLLM and a CUDA GPU")
    root, tokenizer, prompts = workspace
    settings = GenerationSettings(max_new_tokens=8, responses_per_prompt=2, batch_size=4, seed=3, temperature=1.0)
    kwargs = dict(gpu_memory_utilization=0.3, log=lambda *_: None)
    base = generate_responses_vllm(root / "model", tokenizer, prompts, settings, tmp_path / "b.jsonl", **kwargs)
    again = generate_responses_vllm(root / "model", tokenizer, prompts, settings, tmp_path / "b2.jsonl", **kwargs)
    tuned = generate_responses_vllm(root / "model", tokenizer, prompts, settings, tmp_path / "t.jsonl",
                                    adapter_path=root / "adapter", **kwargs)  # fmt: skip
    assert [r.responses for r in base] == [r.responses for r in again], "seeded per prompt: reproducible"
    assert [r.responses for r in tuned] != [r.responses for r in base], "the adapter changed the samples"
