"""The same LoRA (or QLoRA) DPO training steps through TRL's DPOTrainer and through selfee_fast, side by side.

    python bench/vs_trl.py --quick          # a small CPU version (a few minutes); last line: the ratios
    python bench/vs_trl.py                  # the CPU run: vocab 32000 and 128256, 512 and 1024 tokens
    python bench/vs_trl.py --out DIR        # results also as DIR/vs_trl-<device>.json (written after each case)
    python bench/vs_trl.py --model mistral-7b --quantization 4bit --memory-cap-gb 24 --throughput
                                            # on a GPU: QLoRA on a Mistral-7B-shaped model within 24 GB

No model can be downloaded here, so the model is a Llama built on this machine with random
weights, saved once and loaded by both engines from the same folder. `--model small` (the
default): hidden 768, 8 layers, GQA 12/4 heads, ~99M parameters at vocab 32000, ~247M at
128256; `quick`: hidden 256, 2 layers; `mistral-7b` and `llama3-8b`: those models' shapes
(hidden 4096, 32 layers, GQA 32/8 heads, MLP 14336; vocab 32000 and 128256), built in bf16 on
the GPU; `--layers N` keeps a preset's widths with fewer layers (a check of the 7B path on a
CPU). Both engines train a LoRA adapter (r=16, alpha=32, every linear layer of the body, no
dropout) with gradient checkpointing, the reference being the base model (adapter disabled),
on the same pairs in the same order (random token ids, prompt a quarter of the sequence,
chosen and rejected the rest; equal lengths, so neither engine pads): one optimizer step per
micro-batch of `--pairs` pairs, constant learning rate. `--quantization 4bit` loads the base
in NF4 in both (QLoRA: bitsandbytes, double quantisation, the same BitsAndBytesConfig; the LM
head stays unquantised in both).

Optimizer (`--optimizer auto`): bitsandbytes' AdamW8bit in both engines (TRL:
`optim="adamw_bnb_8bit"`) wherever one test step of it works on the device (bitsandbytes
0.50 steps it on the CPU too, checked), else torch's AdamW in both. On a GPU both compute under bf16
autocast on bf16 weights; on the CPU in fp32.

Each engine runs in fresh processes, `--rounds` of them, alternating with the other engine's
(the machine may be shared: drift in its load then hits both alike). Reported per engine:
median seconds per step over every round's steps after its first (the first warms up) and
the fastest such step (on a shared machine, the one the others disturbed least), tokens/s, peak memory of the steps (CPU: the process's peak RSS above its RSS after loading and
reading every weight once (the load maps the safetensors file; untouched pages are not yet in RSS),
Linux VmHWM reset through /proc/self/clear_refs, with glibc told to map every block of 1 MiB
or more on its own so that RSS follows the tensors, in both processes alike; GPU:
torch.cuda.max_memory_allocated above the memory allocated after loading, and the whole
process's peak allocated), the highest over the rounds, and the step-1 loss and
chosen/rejected log-probs, which must agree (policy = reference at step 1: loss log 2).

`--memory-cap-gb G` (CUDA only) limits each process to G GiB of the card
(`torch.cuda.set_per_process_memory_fraction`): a consumer card's memory on a larger one. An
engine that runs out of it is reported as OOM. `--throughput` also times selfee_fast's judge
(the policy and reference log-probs of both responses of up to 16 pairs in one batch, the
scoring an SPA iteration does) and its generation (hf backend, `--new-tokens` per response, two responses per
prompt) on the trained model; TRL's DPOTrainer has neither stage.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

from selfee_fast import rss

ROOT = Path(__file__).resolve().parents[1]
# Shapes without a vocab_size take --vocab; rope and window settings change no cost and are left out.
MODELS = {
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                  num_key_value_heads=4),
    "quick": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip
DEFAULT_SEQ_LENS = {"small": [512, 1024], "quick": [128], "mistral-7b": [1024, 2048], "llama3-8b": [1024, 2048]}
GENERATION_PROMPTS = 8  # prompts per timed generation call (`--throughput`), two responses each
JUDGE_PROMPTS = 16  # prompts (pairs) per timed judge batch at most: the engine's judge batch
LORA = dict(r=16, alpha=32)
LR = 1e-4
SEED = 0


# --------------------------------------------------------------------------- memory


def memory_start(device) -> int:
    """Reset the peak counter; the bytes in use now."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return rss.reset_peak()


def make_resident(model) -> None:
    """Read every weight once. The CPU load maps safetensors files without copying, so a
    weight's pages enter RSS only when first touched, which would put the whole model
    (about 940 MiB at vocab 128256) into the first step's peak, for both engines alike."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()


def memory_peak(device) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return rss.peak()


# --------------------------------------------------------------------------- the shared model and pairs


def build_model(folder: Path, shape: dict, max_positions: int, device) -> int:
    """A randomly initialised Llama of `shape` (vocab included), saved with a small tokenizer; its parameter count.

    On a GPU it is built in bf16 on the card (a 7B model has no fp32 copy anywhere); on the CPU in fp32.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfee_fast.demo.tiny import build_tokenizer

    tokenizer = build_tokenizer(["the cat sat on the mat"] * 20, folder, vocab_size=100)
    config = LlamaConfig(**shape, max_position_embeddings=max_positions, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    if device.type == "cuda":
        torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder, safe_serialization=True)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return parameters


def make_pairs(count: int, seq_len: int, vocab: int, eos: int) -> list[dict]:
    """Random token pairs: prompt a quarter of `seq_len`, chosen and rejected the rest, ending in EOS."""
    rng = random.Random(SEED)
    prompt_len = seq_len // 4
    response_len = seq_len - prompt_len

    def ids(n: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(n)]

    return [{"prompt_ids": ids(prompt_len), "chosen_ids": [*ids(response_len - 1), eos],
             "rejected_ids": [*ids(response_len - 1), eos]} for _ in range(count)]  # fmt: skip


def step_order(count: int) -> list[int]:
    """The order selfee_fast's first epoch visits the pairs in; TRL is handed them in this order, unshuffled."""
    from selfee_fast.train import epoch_order

    return epoch_order(count, SEED, 0)


# --------------------------------------------------------------------------- the engines


def compute_dtype(device):
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


def run_selfee(folder: Path, pairs: list[dict], args, device, work: Path) -> dict:
    from selfee_fast import models
    from selfee_fast.train import TrainPair, TrainSettings, train_stage

    on_gpu = device.type == "cuda"
    model, tokenizer = models.load_model(
        folder, dtype=compute_dtype(device), device=device, lora=models.LoraSettings(**LORA),
        gradient_checkpointing=True, quantization=args.quantization,
    )  # fmt: skip
    train_pairs = [TrainPair(f"pair{i}", p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for i, p in
                   enumerate(pairs)]  # fmt: skip
    settings = TrainSettings(
        beta=0.1, lr=LR, warmup_ratio=0.0, batch_size=args.pairs, micro_batch_size=args.pairs,
        optimizer=args.optimizer, save_every=10**9, seed=SEED, autocast_dtype="bfloat16" if on_gpu else None,
    )  # fmt: skip
    make_resident(model)
    baseline = memory_start(device)
    train_stage(model, train_pairs, settings, work / "selfee", pad_id=tokenizer.pad_token_id, reference="init",
                log=lambda message: None)  # fmt: skip
    peak = memory_peak(device)
    metrics = [json.loads(line) for line in (work / "selfee" / "metrics.jsonl").read_text().splitlines()]
    tokens = [2 * args.pairs * args.seq_len] * len(metrics)
    # Each step's own seconds: its tokens over its tokens/s (train_stage times the step, not the checkpoint).
    seconds = [t / m["tokens_per_s"] for t, m in zip(tokens, metrics, strict=True)]
    first = metrics[0]
    result = {"seconds": seconds, "tokens_per_step": tokens[0], "peak_above_loaded": peak - baseline,
              "loaded": baseline, "loss": first["loss"],
              "logps_chosen": first["logps/chosen"], "logps_rejected": first["logps/rejected"],
              "losses": [m["loss"] for m in metrics]}  # fmt: skip
    if args.throughput:
        result["throughput"] = selfee_judge_and_generation(model, tokenizer, pairs, args, device, work)
    return result


def timed(device, work, *args, **kwargs) -> tuple[float, object]:
    """(seconds, result) of `work(*args, **kwargs)`, the device's queue drained before and after."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = work(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, result


def selfee_judge_and_generation(model, tokenizer, pairs: list[dict], args, device, work: Path) -> dict:
    """Tokens/s of the judge's scoring and of hf generation, each timed on its second call (the first warms up)."""
    import torch

    from selfee_fast.data import PromptRecord
    from selfee_fast.generate import GenerationSettings, generate_responses
    from selfee_fast.judge import score_responses

    autocast = torch.bfloat16 if device.type == "cuda" else None
    # The judge scores prompt + response under pi_{i-1} and the reference: here every pair's two responses.
    items = [(p["prompt_ids"], [p["chosen_ids"], p["rejected_ids"]]) for p in pairs]
    judge_batch = items[:JUDGE_PROMPTS]

    def judge() -> None:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            score_responses(model, judge_batch, tokenizer.pad_token_id)

    judge()
    judge_seconds, _ = timed(device, judge)
    judge_tokens = sum(len(prompt) + len(r) for prompt, responses in judge_batch for r in responses)
    prompt_text = " ".join(["the cat sat on the mat"] * max(1, args.seq_len // 24))
    prompts = [PromptRecord(f"prompt{i}", [{"role": "user", "content": prompt_text}]) for i in
               range(GENERATION_PROMPTS)]  # fmt: skip

    def quiet(message: str) -> None:
        pass

    results = {"judge_sequences": 2 * len(judge_batch), "judge_tokens_per_s": judge_tokens / judge_seconds}
    for cache in args.generation_cache:
        settings = GenerationSettings(max_new_tokens=args.new_tokens, batch_size=GENERATION_PROMPTS,
                                      static_cache=cache == "static", seed=SEED)  # fmt: skip
        generate_responses(model, tokenizer, prompts[:1], settings, work / f"warmup-{cache}.jsonl",
                           autocast_dtype=autocast, log=quiet)  # fmt: skip
        seconds, generated = timed(device, generate_responses, model, tokenizer, prompts, settings,
                                   work / f"generate-{cache}.jsonl", autocast_dtype=autocast, log=quiet)  # fmt: skip
        new_tokens = sum(len(r) for g in generated for r in g.responses)
        results[f"generation_{cache}_new_tokens_per_s"] = new_tokens / seconds
        results[f"generation_{cache}_new_tokens"] = new_tokens
        results["generation_prompt_tokens"] = len(generated[0].prompt_ids)
    return results


def run_trl(folder: Path, pairs: list[dict], args, device, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import DPOConfig, DPOTrainer

    on_gpu = device.type == "cuda"

    class InOrder(DPOTrainer):
        """TRL on our pairs as given: already tokenized, in selfee_fast's order."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.started = 0.0
            self.baseline: int | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.baseline is None:
                make_resident(kwargs["model"])
                self.baseline = memory_start(device)  # the model, the adapter and the trainer are built by now
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if on_gpu:
                torch.cuda.synchronize(device)
            self.seconds.append(time.perf_counter() - self.started)

    from selfee_fast.models import nf4_config

    dtype = compute_dtype(device)
    placement = {"device_map": {"": str(device)}} if on_gpu or args.quantization == "4bit" else {}
    quantization = {"quantization_config": nf4_config(dtype)} if args.quantization == "4bit" else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **placement, **quantization)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, beta=0.1,
        loss_type=["sigmoid"], max_length=None, logging_steps=1, save_strategy="no", report_to="none",
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        optim="adamw_bnb_8bit" if args.optimizer == "adamw8bit" else "adamw_torch", bf16=on_gpu, use_cpu=not on_gpu,
        seed=SEED, dataloader_num_workers=0, disable_dropout=True, max_grad_norm=1.0, weight_decay=0.0,
    )  # fmt: skip
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")  # fmt: skip
    clock = StepClock()
    trainer = InOrder(model=model, args=config, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
                      peft_config=peft_config, callbacks=[clock])  # fmt: skip
    for chatty in (PrinterCallback, ProgressCallback):  # each step's log dict and bar, on stdout
        trainer.remove_callback(chatty)
    trainer.train()
    peak = memory_peak(device)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    first = logs[0]
    return {"seconds": clock.seconds, "tokens_per_step": 2 * args.pairs * args.seq_len,
            "peak_above_loaded": peak - clock.baseline, "loaded": clock.baseline, "loss": first["loss"],
            "logps_chosen": first.get("logps/chosen"), "logps_rejected": first.get("logps/rejected"),
            "losses": [entry["loss"] for entry in logs]}  # fmt: skip


ENGINES = {"selfee_fast": run_selfee, "trl": run_trl}


def _worker(engine: str, folder: str, pairs: list[dict], args, results) -> None:
    os.environ["TQDM_DISABLE"] = "1"  # the trainers' progress bars
    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    device = torch.device(args.device)
    if device.type == "cpu":
        rss.map_big_blocks_alone()
        os.environ["SELFEE_FAST_BACKEND"] = "torch"
    elif args.memory_cap_gb:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * 2**30 / total), device)
    work = Path(tempfile.mkdtemp(prefix="vs_trl_"))
    try:
        result = ENGINES[engine](Path(folder), pairs, args, device, work)
        # The whole process: peak RSS on the CPU; on a GPU the peak allocated, the loaded model included.
        result["process_peak"] = rss.peak() if device.type == "cpu" else result["loaded"] + result["peak_above_loaded"]
        results.put({"engine": engine, **result})
    except torch.OutOfMemoryError as error:
        cap = f" under the {args.memory_cap_gb:g} GiB cap" if args.memory_cap_gb else ""
        results.put({"engine": engine, "error": f"OOM{cap}: {str(error).splitlines()[0][:200]}"})
    except Exception as error:  # reported by the parent, which carries on with the other engine
        results.put({"engine": engine, "error": f"{type(error).__name__}: {error}"})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_in_fresh_process(engine: str, folder: Path, pairs: list[dict], args) -> dict:
    from selfee_fast.cli import result_or_none

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    worker = ctx.Process(target=_worker, args=(engine, str(folder), pairs, args, results))
    worker.start()
    try:
        result = result_or_none(worker, results)  # never waits on a worker that died
    except BaseException:  # stopped while waiting (SIGTERM from `timeout`): the worker must not run on
        worker.terminate()
        raise
    worker.join()
    if result is None:
        result = {"engine": engine, "error": f"the process died (exit code {worker.exitcode})"}
    return result


# --------------------------------------------------------------------------- report


def merge_round(runs: dict, result: dict) -> None:
    """Add one round of an engine: its timed steps pooled, its peaks the highest seen, step 1 from round 1."""
    engine = result.pop("engine")
    run = runs.get(engine)
    if run is None or ("error" in result and "error" not in run):
        runs[engine] = result  # the first round, or the first error (any round's error is reported)
        return
    if "error" in run or "error" in result:
        return
    run["seconds"] = run["seconds"] + result["seconds"][1:]  # each round's first step warms up: not timed
    for key in ("peak_above_loaded", "process_peak"):
        if result.get(key) is not None:
            run[key] = max(run[key], result[key])
    run["rounds"] = run.get("rounds", 1) + 1


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def summarize(case: dict) -> dict:
    """Per engine: seconds/step and tokens/s after the first step; then selfee_fast / TRL ratios."""
    for run in case["engines"].values():
        if "error" in run:
            continue
        timed = run["seconds"][1:] or run["seconds"]
        run["seconds_per_step"] = median(timed)
        run["fastest_step_seconds"] = min(timed)  # on a shared machine: the step the others disturbed least
        run["tokens_per_s"] = run["tokens_per_step"] / run["seconds_per_step"]
    ours, theirs = case["engines"].get("selfee_fast", {}), case["engines"].get("trl", {})
    if "tokens_per_s" in ours and "tokens_per_s" in theirs:
        case["throughput_ratio"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
        case["fastest_step_throughput_ratio"] = theirs["fastest_step_seconds"] / ours["fastest_step_seconds"]
        case["step_memory_ratio"] = ours["peak_above_loaded"] / max(theirs["peak_above_loaded"], 1)
        if ours.get("process_peak") and theirs.get("process_peak"):
            case["process_memory_ratio"] = ours["process_peak"] / theirs["process_peak"]
        case["step1_loss_difference"] = abs(ours["loss"] - theirs["loss"])
        if ours.get("logps_chosen") is not None and theirs.get("logps_chosen") is not None:
            case["step1_logps_difference"] = max(abs(ours["logps_chosen"] - theirs["logps_chosen"]),
                                                 abs(ours["logps_rejected"] - theirs["logps_rejected"]))  # fmt: skip
    return case


def print_case(case: dict) -> None:
    print(f"\nvocab {case['vocab']}, {case['seq_len']} tokens/sequence, {case['pairs']} pairs/step, "
          f"{case['parameters'] / 1e6:.0f}M parameters in {case['layers']} layers")  # fmt: skip
    print(f"{'engine':<13}{'s/step':>9}{'fastest':>9}{'tokens/s':>10}{'step peak MiB':>15}{'process MiB':>13}"
          f"{'loss@1':>10}{'logp chosen@1':>15}")  # fmt: skip
    for name, run in case["engines"].items():
        if "error" in run:
            print(f"{name:<13}{run['error']}")
            continue
        process = f"{run['process_peak'] / 2**20:.0f}" if run.get("process_peak") else "-"
        chosen = f"{run['logps_chosen']:.3f}" if run.get("logps_chosen") is not None else "-"
        print(f"{name:<13}{run['seconds_per_step']:>9.2f}{run['fastest_step_seconds']:>9.2f}{run['tokens_per_s']:>10.0f}"
              f"{run['peak_above_loaded'] / 2**20:>15.0f}{process:>13}{run['loss']:>10.5f}{chosen:>15}")  # fmt: skip
    throughput = case["engines"].get("selfee_fast", {}).get("throughput")
    if throughput:
        generation = ", ".join(f"{name.split('_')[1]} cache {value:.0f}" for name, value in throughput.items()
                               if name.endswith("new_tokens_per_s"))  # fmt: skip
        print(f"selfee_fast judge: {throughput['judge_tokens_per_s']:.0f} tokens/s "
              f"({throughput['judge_sequences']} sequences); generation, new tokens/s: {generation} "
              f"({GENERATION_PROMPTS} prompts of {throughput['generation_prompt_tokens']} tokens, 2 responses each)")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small CPU version: --model quick, 128 tokens")
    parser.add_argument("--model", choices=list(MODELS), help="the model's shape (default small; --quick: quick)")
    parser.add_argument("--layers", type=int, help="the shape's widths with this many layers")
    parser.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes of small/quick (default 32000 128256)")
    parser.add_argument(
        "--seq-len",
        type=int,
        nargs="+",
        help="tokens per sequence (default: small 512 1024, quick 128, 7B shapes 1024 2048)",
    )
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs per step (default 2)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per engine; the first is not timed")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per engine, alternating (default 2)")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--quantization", default="none", choices=["none", "4bit"], help="4bit: QLoRA in both")
    parser.add_argument(
        "--optimizer",
        default="auto",
        choices=["auto", "adamw", "adamw8bit"],
        help="auto: bitsandbytes' AdamW8bit where it steps on the device, else torch's AdamW",
    )
    parser.add_argument("--memory-cap-gb", type=float, help="CUDA: each process may use at most this many GiB")
    parser.add_argument("--throughput", action="store_true", help="also time selfee_fast's judge and generation")
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per response with --throughput")
    parser.add_argument(
        "--generation-cache",
        nargs="+",
        default=["dynamic"],
        choices=["dynamic", "static"],
        help="KV caches to time generation with (static: transformers' static cache)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", help="also write the results as JSON to this folder")
    args = parser.parse_args(argv)
    if min(args.pairs, args.steps, args.rounds, args.new_tokens) < 1:
        parser.error("--pairs, --steps, --rounds and --new-tokens must be at least 1")
    args.model = args.model or ("quick" if args.quick else "small")
    if args.vocab and "vocab_size" in MODELS[args.model]:
        parser.error(f"--model {args.model} has its own vocabulary ({MODELS[args.model]['vocab_size']}): drop --vocab")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.memory_cap_gb is not None and (args.device == "cpu" or args.memory_cap_gb <= 0):
        parser.error("--memory-cap-gb takes a positive number of GiB and applies to a CUDA device only")
    return args


def shapes(args) -> list[dict]:
    """The model shapes to run, one per vocabulary."""
    shape = dict(MODELS[args.model])
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    if "vocab_size" in shape:
        return [shape]
    return [{**shape, "vocab_size": vocab} for vocab in args.vocab or [32000, 128256]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["TQDM_DISABLE"] = "1"  # the workers inherit it
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # saving the model
    import importlib.util

    import torch

    from selfee_fast.files import write_json_atomic
    from selfee_fast.train import eight_bit_optimizer_problem

    if "trl" in args.engines and importlib.util.find_spec("trl") is None:
        print("TRL is not installed: pip install 'selfee-fast[bench]' (or pip install trl), or --engines selfee_fast",
              file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device(args.device)
    problem = eight_bit_optimizer_problem(device) if args.optimizer != "adamw" else None
    if args.optimizer == "adamw8bit" and problem:
        print(f"bitsandbytes' AdamW8bit cannot step on {device}: {problem}", file=sys.stderr)
        return 2
    if args.optimizer == "auto":
        args.optimizer = "adamw" if problem else "adamw8bit"
    seq_lens = args.seq_len or DEFAULT_SEQ_LENS[args.model]
    optimizer = {"adamw8bit": "bitsandbytes AdamW8bit", "adamw": "torch AdamW"}[args.optimizer]
    precision = "bf16 weights and autocast" if device.type == "cuda" else "fp32"
    method = "QLoRA (NF4 base)" if args.quantization == "4bit" else "LoRA"
    cap = f", capped at {args.memory_cap_gb:g} GiB" if args.memory_cap_gb else ""
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPUs"
    print(f"selfee_fast vs TRL DPOTrainer: {method} r={LORA['r']}, gradient checkpointing, {optimizer}, {precision}; "
          f"model {args.model}; torch {torch.__version__}, {platform.machine()}, {card}{cap}")  # fmt: skip
    results = {"env": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
                       "cpus": os.cpu_count(), "device": args.device, "card": card, "optimizer": optimizer,
                       "precision": precision, "quantization": args.quantization, "model": args.model,
                       "memory_cap_gib": args.memory_cap_gb}, "cases": []}  # fmt: skip
    out_path = Path(args.out) / f"vs_trl-{args.device}-{args.model}.json" if args.out else None
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vs_trl_models_"))
    try:
        for shape in shapes(args):
            vocab = shape["vocab_size"]
            folder = work / f"llama-{vocab}"
            parameters = build_model(folder, shape, max(seq_lens), device)
            from transformers import AutoTokenizer

            eos = AutoTokenizer.from_pretrained(folder).eos_token_id
            for seq_len in seq_lens:
                args.seq_len = seq_len
                pairs = make_pairs(args.pairs * args.steps, seq_len, vocab, eos)
                ordered = [pairs[i] for i in step_order(len(pairs))]
                case = {"vocab": vocab, "seq_len": seq_len, "pairs": args.pairs, "parameters": parameters,
                        "layers": shape["num_hidden_layers"], "engines": {}}  # fmt: skip
                for round_index in range(args.rounds):
                    # Alternating order: on a shared machine, drift in the load hits both engines alike.
                    engines = args.engines if round_index % 2 == 0 else args.engines[::-1]
                    for engine in engines:
                        # selfee_fast gets the pairs as they are and orders them itself; TRL gets that order.
                        given = pairs if engine == "selfee_fast" else ordered
                        merge_round(case["engines"], run_in_fresh_process(engine, folder, given, args))
                        if out_path is not None:  # after every process: a run cut short keeps what it finished
                            write_json_atomic(out_path, {**results, "cases": [*results["cases"], summarize(case)]})
                results["cases"].append(summarize(case))
                print_case(case)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    compared = [c for c in results["cases"] if "throughput_ratio" in c]
    failed = [c for c in results["cases"] if any("error" in run for run in c["engines"].values())]
    if len(set(args.engines)) < 2:
        return 1 if failed or not results["cases"] else 0
    if not compared:
        print("no case ran both engines", file=sys.stderr)
        return 1
    print()
    for case in compared:
        agree = case["step1_loss_difference"] <= 1e-4 and case.get("step1_logps_difference", 0.0) <= 1e-2 * max(
            1.0, abs(case["engines"]["trl"]["logps_chosen"] or 1.0)
        )
        print(f"vocab {case['vocab']} seq {case['seq_len']}: step-1 loss difference "
              f"{case['step1_loss_difference']:.2e}, log-prob difference {case.get('step1_logps_difference', math.nan):.2e}"
              f" ({'agree' if agree else 'DISAGREE'})")  # fmt: skip
    ratios = "; ".join(
        f"V={c['vocab']} T={c['seq_len']}: throughput x{c['throughput_ratio']:.2f} "
        f"(fastest steps x{c['fastest_step_throughput_ratio']:.2f}), "
        f"step peak memory x{c['step_memory_ratio']:.2f}"
        + (f", process peak x{c['process_memory_ratio']:.2f}" if "process_memory_ratio" in c else "")
        for c in compared
    )
    print(f"selfee_fast / TRL: {ratios}")
    return 1 if failed else 0


if __name__ == "__main__":
    # `timeout` stops the run with SIGTERM: as SystemExit, the finally blocks still stop the
    # worker and remove the saved model (a 7B one is 14 GB of disk).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
