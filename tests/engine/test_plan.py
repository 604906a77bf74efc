"""The memory plan: estimates from config.json alone, batches that fit, the CLI command and its JSON."""

import argparse
import json

import pytest
import torch

from selfee_fast import cli
from selfee_fast.config import ConfigError, check_values, load_config
from selfee_fast.plan import (
    GIB,
    NF4_BYTES_PER_WEIGHT,
    ModelShape,
    Precision,
    RankLayout,
    frozen_base_layout,
    fsdp2_layout,
    generation_estimate,
    judge_estimate,
    largest_fitting,
    plan_run,
    shard_elements,
    training_estimate,
)
from selfee_fast.stages import stage_fingerprints

SMALL = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)  # fmt: skip
MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)  # fmt: skip


def model_folder(tmp_path, shape: dict):
    """A model folder holding config.json alone: no weights, no tokenizer."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(shape))
    return folder


def config_file(tmp_path, shape: dict, **model):
    folder = model_folder(tmp_path, shape)
    lines = [f"model: {json.dumps({'path': str(folder), **model})}",
             "data: {seed_pairs: seed.jsonl, prompt_pools: [p1.jsonl], max_length: 64, max_prompt_length: 32}",
             "generation: {max_new_tokens: 32}", "spa: {iterations: 1, extrapolate: [0.5]}"]  # fmt: skip
    path = tmp_path / "cfg.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_shape_counts_the_parameters_transformers_builds(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = ModelShape.from_config_json(model_folder(tmp_path, SMALL))
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in SMALL.items() if k != "model_type"}))
    assert shape.params == sum(p.numel() for p in model.parameters()) == 86848
    assert (shape.heads, shape.kv_heads, shape.head_dim, shape.kv_width) == (4, 2, 16, 32)


def test_a_training_estimate_equals_its_hand_computed_components(tmp_path):
    shape = ModelShape.from_config_json(model_folder(tmp_path, SMALL))
    cpu = Precision(weight_bytes=4, activation_bytes=4, lora_r=4, optimizer="adamw", on_gpu=False)
    est = training_estimate(shape, cpu, pairs=1, max_length=10)
    # Per layer: q 64x64, k and v 64x32, o 64x64, gate and up 64x128, down 128x64 = 36864 weights; two
    # layers, plus embedding and head 2x100x64 and five norms of 64: 86848 parameters in fp32.
    assert est.components["weights"] == 4 * (2 * 36864 + 12800 + 320)
    # LoRA r=4: r x (in + out) per linear = 512 + 384 + 384 + 512 + 768 + 768 + 768 = 4096 per layer.
    adapter = 2 * 4096
    assert est.components["adapter"] == 4 * adapter  # fp32; its gradients come with the layers' backward
    assert est.components["frozen reference"] == 4 * adapter  # an iteration's pi_{i-1}
    assert est.components["optimizer"] == 8 * adapter  # fp32 AdamW: two moments
    tokens = 2 * 10  # one pair: chosen and rejected rows of 10 tokens
    checkpoints, mask = 2 * 4 * 64 * tokens, 2 * 10 * 10  # each layer's input; the [2, 1, 10, 10] mask
    assert est.components["activations"] == checkpoints + mask
    # The fused head's phase (final hidden states, norm, gradient, the 32 MiB of vocabulary tiles, the
    # CPU's direction and gathered rows) outweighs a layer's backward (the recomputed layer, its float
    # mask, the gradients in flight).
    head = tokens * (2 * 4 * 64 + (4 * 64 + 4 * 64) + 4 * 64) + 32 * 2**20 + tokens * 3 * 4 * 64
    # Per token and layer: two norms (fp32 input, rsqrt, output), q after RoPE, k and v repeated to the
    # 4 heads, sdpa's output and log-sum-exp, gate, up, silu(gate), their product, LoRA's r=4 outputs.
    per_layer = 2 * (4 * 64 + 4 + 4 * 64) + 4 * 4 * 64 + 4 * 4 + 4 * 4 * 128 + 7 * 4 * 4
    float_mask = 4 * 2 * 10 * 10  # sdpa's fp32 copy of the mask, in every layer
    # Recomputed: all but down_proj's input and the first norm's input (the checkpoint); in flight: the
    # residual stream's gradient and three of down_proj's input's width.
    layer_backward = (per_layer - 4 * 128 - 4 * 64 + 4 * (64 + 3 * 128)) * tokens + float_mask
    assert head > layer_backward and est.components["working: fused head"] == head
    no_checkpoints = training_estimate(shape, Precision(4, 4, lora_r=4, gradient_checkpointing=False,
                                                        optimizer="adamw", on_gpu=False), 1, 10)  # fmt: skip
    # Every layer's saved tensors and float mask, less the first norm's input (a frozen embedding's output).
    assert no_checkpoints.components["activations"] == 2 * (per_layer * tokens + float_mask) + mask - 4 * 64 * tokens
    # The head's phase, one micro-batch a step: the adapter's gradients do not exist yet (the layers'
    # backward makes them, and the last step's were freed); the batch's four int64 index tensors do.
    assert "gradients" not in est.components and est.components["batch"] == 4 * 8 * tokens
    assert est.components["log-probs"] == 3 * 4 * tokens  # fp32: policy, reference, extrapolated
    assert est.peak_bytes == sum(est.components.values())


def test_a_long_checkpointed_batch_peaks_in_the_first_layer_backward(tmp_path):
    shape = ModelShape.from_config_json(model_folder(tmp_path, MISTRAL_7B))
    qlora = Precision(weight_bytes=2, activation_bytes=2, quantization="4bit")
    est = training_estimate(shape, qlora, pairs=1, max_length=1024)
    tokens, h, q, i = 2 * 1024, 4096, 4096, 14336
    # bf16: each norm's fp32 input copy, rsqrt and output; q, repeated k and v, sdpa's output and its
    # log-sum-exp over 32 heads; the MLP's four; LoRA's r=16 outputs and peft's input copies.
    saved = 2 * (4 * h + 4 + 2 * h) + 4 * 2 * q + 4 * 32 + 4 * 2 * i + 7 * 16 * 2 + 2 * (5 * h + q + i)
    recomputed = saved - 2 * i  # down_proj's input is freed before the peak; the first norm's input is a copy
    in_flight = 2 * (h + 3 * i)
    float_mask = 2 * 2 * 1024 * 1024
    assert est.components["working: a layer's backward"] == (recomputed + in_flight) * tokens + float_mask
    assert est.components["activations"] == 32 * 2 * h * tokens + 2 * 1024 * 1024  # checkpoints, the mask


def test_without_checkpointing_the_reference_forward_can_set_the_peak(tmp_path):
    shape = ModelShape.from_config_json(model_folder(tmp_path, MISTRAL_7B))
    no_ckpt = Precision(weight_bytes=2, activation_bytes=2, quantization="4bit", gradient_checkpointing=False)
    est = training_estimate(shape, no_ckpt, pairs=1, max_length=1024)
    tokens, h, q, kv, i = 2 * 1024, 4096, 4096, 1024, 14336
    # The policy's final norm input (fp32) and hidden state, held while one reference layer runs
    # without gradient, and that layer's float copy of the mask.
    one_layer = 4 * h + 2 * (2 * h + 2 * q + 2 * kv + 3 * i)
    expected = (one_layer + 4 * h + 2 * h) * tokens + 2 * 2 * 1024 * 1024
    assert est.components["working: the reference's forward"] == expected
    # What a layer's backward adds without checkpointing: its gradients, less its freed product.
    assert expected > 2 * (h + 2 * i) * tokens


def test_every_trained_layer_keeps_a_float_mask_that_grows_with_the_square_of_the_length(tmp_path):
    shape = ModelShape.from_config_json(model_folder(tmp_path, SMALL))
    no_ckpt = Precision(4, 4, lora_r=4, gradient_checkpointing=False, optimizer="adamw", on_gpu=False)
    kept = {n: training_estimate(shape, no_ckpt, 1, n).components["activations"] for n in (100, 200)}
    # kept(n) = per-token terms x 2n + per-position-pair terms x n^2: the per-token terms cancel in
    # kept(200) - 2 kept(100), leaving 20000 x (2 rows x (1 byte of boolean mask + 2 layers x 4 bytes)).
    assert kept[200] - 2 * kept[100] == 20000 * 2 * (1 + 2 * 4)


def test_a_single_kv_head_is_kept_at_its_own_width(tmp_path):
    """transformers repeats one KV head as a stride-0 view (nothing copied); two or more are copied."""
    no_ckpt = Precision(4, 4, lora_r=4, gradient_checkpointing=False, optimizer="adamw", on_gpu=False)
    kept = {}
    for kv_heads in (1, 2):
        folder = tmp_path / f"kv{kv_heads}"
        folder.mkdir()
        shape = ModelShape.from_config_json(model_folder(folder, {**SMALL, "num_key_value_heads": kv_heads}))
        kept[kv_heads] = training_estimate(shape, no_ckpt, 1, 10).components["activations"]
    # Two rows of 10 tokens, two layers; the k and v projections' LoRA outputs are r wide either way.
    # One head: k and v at head_dim 16 each; two heads: repeated to q's width, 64 each.
    assert kept[2] - kept[1] == 2 * 10 * 2 * (2 * 4 * 64 - 2 * 4 * 16)


def test_forwards_without_gradient_count_the_mask_and_one_layer_float_copy_of_it(tmp_path):
    shape = ModelShape.from_config_json(model_folder(tmp_path, MISTRAL_7B))
    gpu = Precision(weight_bytes=2, activation_bytes=2)  # bf16 LoRA: no dequantised weight in the prefill

    def judge(n):
        return judge_estimate(shape, gpu, 16, 2, n).components["forward working"]

    def prefill(n):
        return generation_estimate(shape, gpu, 16, 2, n, 300).components["prefill working"]

    # Per-token terms cancel in w(2n) - 2 w(n); what is left is 32 rows x (4n^2 - 2n^2) positions x
    # (1 byte of boolean mask + 2 bytes of the bf16 copy one layer's sdpa makes at a time).
    assert judge(1024) - 2 * judge(512) == 32 * 2 * 512**2 * (1 + 2)
    assert prefill(1024) - 2 * prefill(512) == 32 * 2 * 512**2 * (1 + 2)


def test_the_earlier_judge_adds_one_adapter_or_one_frozen_model(tmp_path):
    """spa.judge_consistency holds pi_{i-2} beside the judge: an adapter with LoRA, a model of its own in full."""
    shape = ModelShape.from_config_json(model_folder(tmp_path, SMALL))
    lora, full = Precision(4, 4, lora_r=4, on_gpu=False), Precision(4, 4, lora_r=0, on_gpu=False)
    plain = judge_estimate(shape, lora, 4, 2, 32)
    checked = judge_estimate(shape, lora, 4, 2, 32, earlier_judge=True)
    assert checked.components["adapters"] == 2 * plain.components["adapters"] > 0
    assert checked.peak_bytes - plain.peak_bytes == plain.components["adapters"]
    plain_full = judge_estimate(shape, full, 4, 2, 32)
    checked_full = judge_estimate(shape, full, 4, 2, 32, earlier_judge=True)
    assert checked_full.components["earlier judge"] == plain_full.components["frozen reference"]
    assert checked_full.peak_bytes - plain_full.peak_bytes == plain_full.components["frozen reference"]


def test_qlora_holds_the_body_in_nf4_and_the_rest_in_16_bits(tmp_path):
    shape = ModelShape.from_config_json(model_folder(tmp_path, MISTRAL_7B))
    qlora = Precision(weight_bytes=2, activation_bytes=2, quantization="4bit")
    body = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336)
    other = 2 * 32000 * 4096 + 65 * 4096
    est = training_estimate(shape, qlora, pairs=1, max_length=1024)
    assert est.components["weights"] == int(body * NF4_BYTES_PER_WEIGHT + other * 2)
    assert 3.5 * 2**30 < est.components["weights"] < 4.2 * 2**30  # QLoRA's Mistral-7B: about 4 GB
    lora16 = Precision(weight_bytes=2, activation_bytes=2)
    assert training_estimate(shape, lora16, 1, 1024).components["weights"] == 2 * (body + other)


def test_checkpointing_and_8bit_adam_cost_less_and_estimates_grow_with_the_batch(tmp_path):
    shape = ModelShape.from_config_json(model_folder(tmp_path, MISTRAL_7B))
    gpu = Precision(weight_bytes=2, activation_bytes=2, quantization="4bit")
    no_ckpt = Precision(weight_bytes=2, activation_bytes=2, quantization="4bit", gradient_checkpointing=False)
    fp32_adam = Precision(weight_bytes=2, activation_bytes=2, quantization="4bit", optimizer="adamw")
    assert training_estimate(shape, gpu, 2, 1024).peak_bytes < training_estimate(shape, no_ckpt, 2, 1024).peak_bytes
    assert (training_estimate(shape, gpu, 2, 1024).components["optimizer"]
            < training_estimate(shape, fp32_adam, 2, 1024).components["optimizer"] / 3)  # fmt: skip
    peaks = [training_estimate(shape, gpu, n, 1024).peak_bytes for n in (1, 2, 4, 8)]
    assert peaks == sorted(peaks) and len(set(peaks)) == 4
    kv = [generation_estimate(shape, gpu, n, 2, 512, 300).components["KV cache"] for n in (1, 2)]
    assert kv[1] == 2 * kv[0] == 2 * (2 * 2 * 1024 * 2 * (512 + 300) * 33)


def test_the_batch_that_fits_grows_with_the_memory(tmp_path):
    shape = ModelShape.from_config_json(model_folder(tmp_path, MISTRAL_7B))
    gpu = Precision(weight_bytes=2, activation_bytes=2, quantization="4bit")

    def estimate(n):
        return training_estimate(shape, gpu, n, 2048)

    candidates = [1, 2, 4, 8, 16, 32]
    chosen = [largest_fitting(estimate, candidates, gib * 2**30)[0] for gib in (4, 8, 12, 16, 24, 40, 80)]
    assert chosen[0] is None  # the weights alone are about 4 GiB
    fitted = [c or 0 for c in chosen]
    assert fitted == sorted(fitted) and fitted[-1] > fitted[1] >= 1
    for n, gib in zip(chosen, (4, 8, 12, 16, 24, 40, 80), strict=True):
        if n is not None:
            assert estimate(n).peak_bytes <= gib * 2**30
            if n < 32:
                assert estimate(candidates[candidates.index(n) + 1]).peak_bytes > gib * 2**30


def test_plan_picks_batches_under_max_memory_gb(tmp_path):
    path = config_file(tmp_path, MISTRAL_7B, quantization="4bit", device="cuda")
    longer = ["data.max_length=2048", "data.max_prompt_length=1024"]
    plan = plan_run(load_config(path, [*longer, "model.max_memory_gb=24"]))
    assert plan.budget_bytes < 24 * 2**30 and "model.max_memory_gb=24" in plan.budget_source
    stages = {s.stage: s for s in plan.stages}
    assert set(stages) == {"train", "generation", "judge"}
    for stage in stages.values():
        assert stage.fits is not None and stage.fits_bytes <= plan.budget_bytes
    assert 32 % stages["train"].fits == 0  # a micro-batch divides train.batch_size
    smaller = plan_run(load_config(path, [*longer, "model.max_memory_gb=12"]))
    assert {s.stage: s.fits for s in smaller.stages}["train"] < stages["train"].fits


def test_on_a_cpu_without_max_memory_gb_the_plan_reports_estimates_only(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = plan_run(load_config(config_file(tmp_path, SMALL)))
    assert plan.budget_bytes is None and "estimates only" in plan.budget_source
    assert all(s.fits is None for s in plan.stages) and plan.advice() == []
    assert "estimates only" in plan.table()


def test_the_cli_prints_the_plan_from_config_json_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = config_file(tmp_path, MISTRAL_7B, quantization="4bit", max_memory_gb=24, device="cuda")
    assert cli.main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "memory plan: mistral 7.24B parameters" in out and "train.micro_batch_size" in out
    assert cli.main(["plan", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"model", "processes", "budget_bytes", "budget_source", "stages", "notes"}
    assert result["processes"] == 1
    assert set(result["stages"]) == {"train", "generation", "judge"}
    for stage in result["stages"].values():
        assert {"batch_size", "peak_bytes", "fits_batch_size", "fits_peak_bytes", "components", "setting"} <= set(stage)
        assert stage["peak_bytes"] == sum(stage["components"].values())
    assert result["model"]["kv_heads"] == 8


def test_a_bad_max_memory_gb_is_refused_naming_the_key(tmp_path, capsys):
    path = config_file(tmp_path, SMALL)
    for bad in ("0", "-4", ".inf", "1e9"):
        with pytest.raises(ConfigError, match=r"model\.max_memory_gb"):
            check_values(load_config(path, [f"model.max_memory_gb={bad}"]))
    assert cli.main(["plan", str(path), "model.max_memory_gb=-1"]) == 2
    assert "model.max_memory_gb" in capsys.readouterr().err
    assert cli.main(["plan", str(path), "model.max_memory_gb=lots"]) == 2
    assert "model.max_memory_gb" in capsys.readouterr().err


def test_max_memory_gb_leaves_every_stage_fingerprint_as_it_was(tmp_path):
    path = config_file(tmp_path, SMALL)
    assert stage_fingerprints(load_config(path, ["model.max_memory_gb=24"])) == stage_fingerprints(load_config(path))


def test_an_out_of_memory_error_is_a_message_with_the_plan(tmp_path, capsys):
    path = config_file(tmp_path, MISTRAL_7B, quantization="4bit", max_memory_gb=24, device="cuda")

    def runs_out(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    overrides = ["train.micro_batch_size=32", "data.max_length=2048", "data.max_prompt_length=1024"]
    args = argparse.Namespace(func=runs_out, config=str(path), overrides=overrides)
    assert cli.run_command(args) == 1
    err = capsys.readouterr().err
    assert "out of GPU memory: CUDA out of memory" in err and "memory plan: mistral" in err
    assert "train.micro_batch_size=32 is estimated at" in err and "lower train.micro_batch_size" in err


def test_full_fine_tuning_counts_master_weights_gradients_and_a_frozen_copy(tmp_path):
    path = config_file(tmp_path, SMALL, lora_r=0, device="cuda", max_memory_gb=24)
    (train,) = [s for s in plan_run(load_config(path)).stages if s.stage == "train"]
    params = 86848
    assert train.components["weights"] == train.components["gradients"] == 4 * params  # fp32 master weights
    assert train.components["frozen reference"] == 2 * params  # its linear layers in bf16: the whole copy here
    # adamw8bit: 2 bytes per element plus an absmax per 256 for the q, o, MLP, embedding and head matrices;
    # k and v (2048 elements) and the norms (64) stay in 32 bits, 8 bytes per element.
    eight_bit = 2 * (4096 + 4096 + 3 * 8192) + 2 * 6400
    blocks = 2 * (16 + 16 + 3 * 32) + 2 * 25
    assert train.components["optimizer"] == 2 * eight_bit + 8 * blocks + 8 * (2 * (2 * 2048 + 2 * 64) + 64)
    stages = plan_run(load_config(path, ["generation.backend=vllm"]))
    assert [s.stage for s in stages.stages] == ["train", "judge"] and "vLLM" in " ".join(stages.notes)


def test_a_lora_base_stays_whole_on_each_gpu_unless_the_plan_says_it_cannot(tmp_path):
    """model.shard_frozen_base=auto under torchrun: whole when the training step fits one card, else sharded."""
    path = config_file(tmp_path, MISTRAL_7B, lora_r=16)
    eight = ["train.optimizer=adamw", "train.micro_batch_size=8"]  # what 8 processes run with
    one_card = load_config(path, [*eight, "model.max_memory_gb=80"])
    assert frozen_base_layout(one_card, 8) == "whole"
    assert frozen_base_layout(load_config(path, [*eight, "model.max_memory_gb=8"]), 8) == "sharded"
    assert frozen_base_layout(load_config(path, [*eight, "model.max_memory_gb=8"]), 1) == "whole", "one process"
    assert frozen_base_layout(load_config(path, [*eight, "model.max_memory_gb=80", "model.shard_frozen_base=sharded"]),
                              8) == "sharded"  # fmt: skip
    assert stage_fingerprints(load_config(path, ["model.shard_frozen_base=sharded"])) == stage_fingerprints(
        load_config(path)
    ), "a layout setting: a run may switch it and resume"


def test_qlora_on_two_processes_keeps_the_nf4_base_whole_and_halves_the_adapter(tmp_path):
    path = config_file(tmp_path, MISTRAL_7B, lora_r=16)
    overrides = ["model.quantization=4bit", "train.optimizer=adamw", "train.micro_batch_size=2"]
    one, two = (next(s for s in plan_run(load_config(path, overrides), processes=n).stages if s.stage == "train")
                for n in (1, 2))  # fmt: skip
    assert two.components["weights"] == one.components["weights"]  # NF4, whole on every rank
    assert two.components["adapter"] * 2 == one.components["adapter"]
    assert two.components["optimizer"] * 2 == one.components["optimizer"]


# --------------------------------------------------------------------------- several processes (FSDP2)

# SMALL's tensors as torch holds them: per layer the linears [out, in] (q 64x64, k and v 32x64, o 64x64,
# gate and up 128x64, down 64x128: 36864) and two norms of 64; the embedding 100x64 and the final norm
# (the body's root unit: 6464); the head 100x64, never sharded. Every dim 0 is even: N=2 halves exactly.
LAYER, ROOT, HEAD, PARAMS = 36864 + 128, 6400 + 64, 6400, 86848
ADAPTER_LAYER = 4096  # LoRA r=4: r x (in + out) per linear, per layer
PHASE_TERMS = ("activations", "batch", "working: fused head", "working: a layer's backward",
               "working: the reference's forward")  # fmt: skip


def per_rank(precision, layout="whole", frozen_reference=True) -> RankLayout:
    shape = ModelShape(64, 128, 2, 4, 2, 16, 100)
    two = training_estimate(shape, precision, 4, 10, frozen_reference=frozen_reference, processes=2,
                            base_layout=layout)  # fmt: skip
    one = training_estimate(shape, precision, 2, 10, frozen_reference=frozen_reference)
    # A rank computes 4 / 2 = 2 pairs: its activations and head are one process's at 2 pairs.
    assert {k: v for k, v in two.components.items() if k in PHASE_TERMS} == {
        k: v for k, v in one.components.items() if k in PHASE_TERMS
    }
    assert two.batch_size == 4, "the plan speaks of the configured micro-batch"
    rank = fsdp2_layout(shape, precision, 2, layout, frozen_reference)
    assert {k: v for k, v in two.components.items() if k in rank.held} == rank.held
    return rank


def test_two_processes_lora_with_the_base_whole_shard_only_the_adapter():
    cpu = Precision(weight_bytes=4, activation_bytes=4, lora_r=4, optimizer="adamw", on_gpu=False)
    rank = per_rank(cpu, "whole")
    assert rank.held == {
        "weights": 4 * PARAMS,  # frozen, ignored by FSDP2: whole on every rank
        "adapter": 4 * 2 * ADAPTER_LAYER // 2,  # fp32, halved
        "frozen reference": 4 * 2 * ADAPTER_LAYER,  # pi_{i-1}'s adapter is frozen too: whole
        "optimizer": 8 * 2 * ADAPTER_LAYER // 2,  # AdamW's two fp32 moments of the shards
    }
    assert (rank.head_gradient, rank.body_gradients) == (0, 4 * 2 * ADAPTER_LAYER // 2)
    # Gathered: the first layer's adapter twice at the forward's start (all-gather output, parameters);
    # in a layer's backward two layers' adapters (computed and prefetched) and the computed one's
    # gradients; the root trains nothing and gathers nothing.
    assert (rank.forward_gathers, rank.root, rank.backward_gathers, rank.root_reduce_scatter) == (
        2 * 4 * ADAPTER_LAYER, 0, 3 * 4 * ADAPTER_LAYER, 0)  # fmt: skip


def test_two_processes_lora_with_the_base_sharded():
    cpu = Precision(weight_bytes=4, activation_bytes=4, lora_r=4, optimizer="adamw", on_gpu=False)
    rank = per_rank(cpu, "sharded")
    assert rank.held == {
        "weights": 4 * (HEAD + (2 * LAYER + ROOT) // 2),  # the head whole, the body halved
        "adapter": 4 * ADAPTER_LAYER,
        "frozen reference": 4 * ADAPTER_LAYER,  # sharded with its layers
        "optimizer": 8 * ADAPTER_LAYER,
    }
    unit = 4 * (LAYER + 2 * ADAPTER_LAYER)  # what a layer's all-gather brings: base, adapter, pi_{i-1}'s adapter
    assert rank.forward_gathers == 2 * (4 * ROOT + unit)  # the root's and the first layer's, each twice
    assert rank.root == 4 * ROOT  # unsharded from the forward to the end of the backward
    assert rank.backward_gathers == 2 * unit + 4 * ADAPTER_LAYER  # two layers, one layer's adapter gradients
    assert rank.reference_gathers == 2 * unit and rank.root_reduce_scatter == 0  # a frozen root reduces nothing


def test_two_processes_full_fine_tuning_shard_weights_gradients_state_and_the_reference():
    cpu = Precision(weight_bytes=4, activation_bytes=4, lora_r=0, optimizer="adamw", on_gpu=False)
    sharded = HEAD + (2 * LAYER + ROOT) // 2  # elements per rank: the head whole, the body halved
    rank = per_rank(cpu)
    assert rank.held == {
        "weights": 4 * sharded,
        "frozen reference": 4 * (sharded + ROOT),  # its root gathered by its first forward, never resharded
        "optimizer": 8 * sharded,
    }
    # The head's gradient whole (all-reduced), the body's reduce-scattered into shards.
    assert (rank.head_gradient, rank.body_gradients) == (4 * HEAD, 4 * (2 * LAYER + ROOT) // 2)
    assert (rank.forward_gathers, rank.root, rank.backward_gathers) == (2 * 4 * (ROOT + LAYER), 4 * ROOT, 3 * 4 * LAYER)
    # The reference model's own layer in its forward; the root's gradient and its reduce-scatter copy.
    assert (rank.reference_gathers, rank.root_reduce_scatter) == (2 * 4 * LAYER, 2 * 4 * ROOT)


def test_each_gradient_and_gathered_unit_counts_only_in_the_phases_that_hold_it():
    """Full fine-tuning without checkpointing on 2 processes, plan_check_fsdp's case: traced, the peak is the
    head's backward over every kept activation, with the head's own gradient and the root's embedding
    unsharded; the body's gradient shards do not exist yet and no layer is gathered (bench/NOTES.md)."""
    shape = ModelShape(256, 688, 4, 4, 2, 64, 32000)
    cpu = Precision(4, 4, lora_r=0, gradient_checkpointing=False, optimizer="adamw", on_gpu=False)
    rank = fsdp2_layout(shape, cpu, 2, "whole", False)
    est = training_estimate(shape, cpu, 2, 256, frozen_reference=False, processes=2).components
    assert "working: fused head" in est
    assert est["gradients"] == rank.head_gradient == 4 * 32000 * 256
    assert est["FSDP2: gathered"] == rank.root == 4 * (32000 * 256 + 256)
    # A step accumulating two micro-batches holds every gradient of the first through the second's phases.
    accumulating = training_estimate(shape, cpu, 2, 256, frozen_reference=False, processes=2, micro_batches=2)
    assert accumulating.components["gradients"] == rank.head_gradient + rank.body_gradients
    # With checkpointing the activations are small and the step peaks after the backward: every gradient,
    # with the root's gradient and its reduce-scatter copy (or AdamW's two temporaries of the head).
    ckpt = Precision(4, 4, lora_r=0, gradient_checkpointing=True, optimizer="adamw", on_gpu=False)
    late = training_estimate(shape, ckpt, 2, 256, frozen_reference=False, processes=2).components
    assert "activations" not in late and late["gradients"] == rank.head_gradient + rank.body_gradients
    assert late["working: the root's reduce-scatter"] == rank.root_reduce_scatter == 2 * rank.root


def test_the_optimizer_update_is_a_phase_of_its_own(tmp_path):
    """Full fine-tuning of a 7B on one GPU: AdamW's foreach update makes a temporary of every tensor at once,
    over every gradient; bitsandbytes' 8-bit update makes none, and a layer's backward peaks instead."""
    shape = ModelShape.from_config_json(model_folder(tmp_path, MISTRAL_7B))
    adamw = Precision(weight_bytes=2, activation_bytes=2, lora_r=0, optimizer="adamw")
    est = training_estimate(shape, adamw, 1, 64).components
    assert est["working: the optimizer's update"] == est["gradients"] == 2 * shape.params
    assert "activations" not in est
    eight_bit = training_estimate(shape, Precision(2, 2, lora_r=0), 1, 64).components
    assert "working: the optimizer's update" not in eight_bit and eight_bit["gradients"] == 2 * shape.params
    cpu = Precision(weight_bytes=4, activation_bytes=4, lora_r=0, optimizer="adamw", on_gpu=False)
    # On the CPU torch's single-tensor update: sqrt(v) and its quotient, of the largest tensor (the head).
    assert training_estimate(shape, cpu, 1, 64).components["working: the optimizer's update"] == 2 * 4 * 32000 * 4096


def test_a_shard_is_padded_to_a_multiple_of_the_processes():
    assert shard_elements(5, 3, 2) == 9 and shard_elements(4, 3, 2) == 6 and shard_elements(7, 1, 8) == 1
    shape = ModelShape(64, 128, 2, 4, 2, 16, 99)  # an odd vocabulary: the embedding's 50 rows per rank
    cpu = Precision(weight_bytes=4, activation_bytes=4, lora_r=0, optimizer="adamw", on_gpu=False)
    est = training_estimate(shape, cpu, 2, 10, processes=2)
    # The head whole (99 rows), each layer halved, the embedding's 50 of 99 rows, half the final norm.
    assert est.components["weights"] == 4 * (99 * 64 + LAYER + 50 * 64 + 32)
    with pytest.raises(ValueError, match="do not split over 2"):
        training_estimate(shape, cpu, 3, 10, processes=2)


def test_one_process_is_the_one_process_estimate_exactly(tmp_path):
    shape = ModelShape(64, 128, 2, 4, 2, 16, 100)
    for precision in (Precision(4, 4, lora_r=4, optimizer="adamw", on_gpu=False), Precision(2, 2, lora_r=0)):
        for layout in ("whole", "sharded"):
            assert training_estimate(shape, precision, 2, 10, processes=1, base_layout=layout).components == (
                training_estimate(shape, precision, 2, 10).components
            )
    config = load_config(config_file(tmp_path, MISTRAL_7B, lora_r=16, device="cuda", max_memory_gb=24))
    assert plan_run(config, processes=1) == plan_run(config)


def test_the_plan_of_two_processes_is_one_rank_and_picks_micro_batches_that_split(tmp_path):
    path = config_file(tmp_path, MISTRAL_7B, lora_r=16, device="cuda", max_memory_gb=24)
    config = load_config(path, ["train.optimizer=adamw", "train.micro_batch_size=8"])
    one, two = plan_run(config), plan_run(config, processes=2)
    train_one, train_two = (next(s for s in p.stages if s.stage == "train") for p in (one, two))
    assert train_two.configured == 8 and train_two.configured_bytes < train_one.configured_bytes
    assert train_two.fits % 2 == 0 and train_two.fits >= train_one.fits
    for name in ("generation", "judge"):  # every N-th batch per rank, the same size, whole models
        assert next(s for s in one.stages if s.stage == name) == next(s for s in two.stages if s.stage == name)
    assert "memory plan per process, 2 processes: mistral" in two.table()
    assert two.to_json()["processes"] == 2 and "2 processes: train.micro_batch_size / 2" in " ".join(two.notes)
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=8 must split evenly over the 3 processes"):
        plan_run(config, processes=3)  # preflight's own check


def test_the_cli_plans_for_the_processes_it_is_told_or_torchrun_s_world_size(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = config_file(tmp_path, MISTRAL_7B, lora_r=16, device="cuda", max_memory_gb=24)
    ok = ["train.optimizer=adamw", "train.micro_batch_size=8"]
    assert cli.main(["plan", str(path), *ok, "--processes", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["processes"] == 2
    assert result["stages"]["train"]["components"] == plan_run(load_config(path, ok), processes=2).to_json()[
        "stages"]["train"]["components"]  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun sets it: the default, and plan is not refused
    assert cli.main(["plan", str(path), *ok]) == 0
    assert "memory plan per process, 4 processes" in capsys.readouterr().out
    assert cli.main(["plan", str(path), *ok, "--processes", "1"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: mistral" in out and "per process" not in out
    # overrides after an option are overrides too; anything else after one is still refused
    assert cli.main(["plan", str(path), "--processes", "2", *ok]) == 0
    assert "memory plan per process, 2 processes" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["plan", str(path), "--processes", "2", *ok, "stray"])
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["plan", str(path), *ok]) == 0
    assert capsys.readouterr().out == "", "under torchrun rank 0 prints the plan"
    monkeypatch.delenv("RANK")
    assert cli.main(["plan", str(path), "--processes", "3"]) == 2  # micro_batch_size 4 does not split 3 ways
    assert "must split evenly over the 3 processes" in capsys.readouterr().err
    assert cli.main(["plan", str(path), *ok, "--processes", "0"]) == 2
    assert "--processes 0" in capsys.readouterr().err


def test_run_prints_one_rank_s_plan(tmp_path, capsys):
    path = config_file(tmp_path, MISTRAL_7B, lora_r=16, device="cuda", max_memory_gb=24)
    cli.print_memory_plan(load_config(path, ["train.optimizer=adamw", "train.micro_batch_size=8"]), 2)
    assert "memory plan per process, 2 processes" in capsys.readouterr().out


def test_auto_keeps_the_base_whole_while_one_rank_s_share_fits(tmp_path):
    """The decision flips where two ranks' per-rank estimate with the base whole meets the budget."""
    path = config_file(tmp_path, MISTRAL_7B, lora_r=16, device="cuda")
    ok = ["train.optimizer=adamw", "train.micro_batch_size=8", "data.max_length=1024", "data.max_prompt_length=512"]
    config = load_config(path, [*ok, "model.max_memory_gb=80"])
    rank = next(s for s in plan_run(config, processes=2, base_layout="whole").stages if s.stage == "train")
    whole_process = next(s for s in plan_run(config).stages if s.stage == "train")

    def at(peak: float) -> str:  # the card whose budget, (card - 0.5 GiB) x 0.9, is `peak`
        return f"model.max_memory_gb={(peak / 0.9 + GIB / 2) / GIB:.6f}"

    above, below = rank.configured_bytes * 1.001, rank.configured_bytes * 0.999
    assert frozen_base_layout(load_config(path, [*ok, at(above)]), 2) == "whole"
    assert frozen_base_layout(load_config(path, [*ok, at(below)]), 2) == "sharded"
    # Between the rank's share and one process's whole micro-batch the old upper bound said "sharded".
    assert whole_process.configured_bytes > above
