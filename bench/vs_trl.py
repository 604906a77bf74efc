"""The same LoRA DPO training steps through TRL's DPOTrainer and through selfee_fast, side by side.

    python bench/vs_trl.py --quick          # a small CPU version (a few minutes); last line: the ratios
    python bench/vs_trl.py                  # the CPU run: vocab 32000 and 128256, 512 and 1024 tokens
    python bench/vs_trl.py --out DIR        # results also as DIR/vs_trl-<device>.json

No model can be downloaded here, so the model is a Llama built on this machine with random
weights (by default hidden 768, 8 layers, GQA 12/4 heads: ~99M parameters at vocab 32000,
~247M at 128256), saved once and loaded by both engines from the same folder. Both train a
LoRA adapter (r=16, alpha=32, every linear layer of the body, no dropout) with gradient
checkpointing, the reference being the base model (adapter disabled), on the same pairs in
the same order (random token ids, prompt a quarter of the sequence, chosen and rejected the
rest; equal lengths, so neither engine pads): one optimizer step per micro-batch of
`--pairs` pairs, constant learning rate.

Optimizer: on the CPU both use torch's AdamW (bitsandbytes' 8-bit AdamW needs a GPU); on a
GPU both use bitsandbytes' AdamW8bit (TRL: `optim="adamw_bnb_8bit"`) under bf16 autocast.

Each engine runs in fresh processes, `--rounds` of them, alternating with the other engine's
(the machine may be shared: drift in its load then hits both alike). Reported per engine:
median seconds per step over every round's steps after its first (the first warms up) and
the fastest such step (on a shared machine, the one the others disturbed least), tokens/s, peak memory of the steps (CPU: the process's peak RSS above its RSS after loading and
reading every weight once (the load maps the safetensors file; untouched pages are not yet in RSS),
Linux VmHWM reset through /proc/self/clear_refs, with glibc told to map every block of 1 MiB
or more on its own so that RSS follows the tensors, in both processes alike; GPU:
torch.cuda.max_memory_allocated above the memory allocated after loading), the highest over
the rounds, the process's whole peak, and the step-1 loss and chosen/rejected log-probs,
which must agree (policy = reference at step 1: loss log 2).
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
import sys
import tempfile
import time
import warnings
from pathlib import Path

from selfee_fast import rss

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(
    hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4
)
QUICK_SHAPE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)  # fmt: skip
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


def build_model(folder: Path, shape: dict, vocab: int, max_positions: int) -> int:
    """A randomly initialised fp32 Llama of `shape` and `vocab`, saved with a small tokenizer; its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfee_fast.demo.tiny import build_tokenizer

    tokenizer = build_tokenizer(["the cat sat on the mat"] * 20, folder, vocab_size=100)
    config = LlamaConfig(**shape, vocab_size=vocab, max_position_embeddings=max_positions, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


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


def run_selfee(folder: Path, pairs: list[dict], args, device, work: Path) -> dict:
    import torch

    from selfee_fast import models
    from selfee_fast.train import TrainPair, TrainSettings, train_stage

    on_gpu = device.type == "cuda"
    model, tokenizer = models.load_model(
        folder, dtype=torch.bfloat16 if on_gpu else torch.float32, device=device,
        lora=models.LoraSettings(**LORA), gradient_checkpointing=True,
    )  # fmt: skip
    train_pairs = [TrainPair(f"pair{i}", p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for i, p in
                   enumerate(pairs)]  # fmt: skip
    settings = TrainSettings(
        beta=0.1, lr=LR, warmup_ratio=0.0, batch_size=args.pairs, micro_batch_size=args.pairs,
        optimizer="adamw8bit" if on_gpu else "adamw", save_every=10**9, seed=SEED,
        autocast_dtype="bfloat16" if on_gpu else None,
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
    return {"seconds": seconds, "tokens_per_step": tokens[0], "peak_above_loaded": peak - baseline,
            "loaded": baseline, "loss": first["loss"], "logps_chosen": first["logps/chosen"],
            "logps_rejected": first["logps/rejected"], "losses": [m["loss"] for m in metrics]}  # fmt: skip


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

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if on_gpu else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, beta=0.1,
        loss_type=["sigmoid"], max_length=None, logging_steps=1, save_strategy="no", report_to="none",
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        optim="adamw_bnb_8bit" if on_gpu else "adamw_torch", bf16=on_gpu, use_cpu=not on_gpu,
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
    work = Path(tempfile.mkdtemp(prefix="vs_trl_"))
    try:
        result = ENGINES[engine](Path(folder), pairs, args, device, work)
        result["process_peak"] = rss.peak() if device.type == "cpu" else None
        results.put({"engine": engine, **result})
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
    result = result_or_none(worker, results)  # never waits on a worker that died
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
          f"{case['parameters'] / 1e6:.0f}M parameters")  # fmt: skip
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small CPU version: hidden 256, 2 layers, 128 tokens")
    parser.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes (default 32000 128256)")
    parser.add_argument("--seq-len", type=int, nargs="+", help="tokens per sequence (default 512 1024; quick: 128)")
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs per step (default 2)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per engine; the first is not timed")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per engine, alternating (default 2)")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", help="also write the results as JSON to this folder")
    args = parser.parse_args(argv)
    if min(args.pairs, args.steps, args.rounds) < 1:
        parser.error("--pairs, --steps and --rounds must be at least 1")
    import importlib.util

    import torch

    if "trl" in args.engines and importlib.util.find_spec("trl") is None:
        print("TRL is not installed: pip install 'selfee-fast[bench]' (or pip install trl)", file=sys.stderr)
        return 2
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = QUICK_SHAPE if args.quick else SHAPE
    vocabs = args.vocab or [32000, 128256]
    seq_lens = args.seq_len or ([128] if args.quick else [512, 1024])
    optimizer = "bitsandbytes AdamW8bit, bf16 autocast" if args.device == "cuda" else "torch AdamW (fp32) for both"
    print(f"selfee_fast vs TRL DPOTrainer: LoRA r={LORA['r']}, gradient checkpointing, {optimizer}; "
          f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, device {args.device}")  # fmt: skip
    results = {"env": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
                       "cpus": os.cpu_count(), "device": args.device, "optimizer": optimizer}, "cases": []}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="vs_trl_models_"))
    try:
        for vocab in vocabs:
            folder = work / f"llama-{vocab}"
            parameters = build_model(folder, shape, vocab, max_positions=max(seq_lens))
            from transformers import AutoTokenizer

            eos = AutoTokenizer.from_pretrained(folder).eos_token_id
            for seq_len in seq_lens:
                args.seq_len = seq_len
                pairs = make_pairs(args.pairs * args.steps, seq_len, vocab, eos)
                ordered = [pairs[i] for i in step_order(len(pairs))]
                case = {"vocab": vocab, "seq_len": seq_len, "pairs": args.pairs, "parameters": parameters,
                        "engines": {}}  # fmt: skip
                for round_index in range(args.rounds):
                    # Alternating order: on a shared machine, drift in the load hits both engines alike.
                    engines = args.engines if round_index % 2 == 0 else args.engines[::-1]
                    for engine in engines:
                        # selfee_fast gets the pairs as they are and orders them itself; TRL gets that order.
                        given = pairs if engine == "selfee_fast" else ordered
                        merge_round(case["engines"], run_in_fresh_process(engine, folder, given, args))
                results["cases"].append(summarize(case))
                print_case(case)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"vs_trl-{args.device}.json").write_text(json.dumps(results, indent=2))
    compared = [c for c in results["cases"] if "throughput_ratio" in c]
    failed = [c for c in results["cases"] if any("error" in run for run in c["engines"].values())]
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
    sys.exit(main())
