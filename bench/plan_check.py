"""The memory plan's training estimate against the peak a training step really reaches, on the CPU.

    python bench/plan_check.py            # every shape, gradient checkpointing on and off
    python bench/plan_check.py --quick    # one shape (about a minute)
    python bench/plan_check.py --validation   # only the validation shapes
    python bench/plan_check.py --quantization 4bit   # QLoRA: the base's linear layers in NF4

The CASES are the shapes the plan's activation terms were checked against while they were
written; the VALIDATION cases (more layers, other head counts and GQA ratios, a longer
sequence, three pairs) were added before the layer backward's model was revised and are never
tuned on: they say whether the model holds beyond the shapes it was read from.

Each case builds a Llama of the shape with random weights, loads it through the engine's own
path (fp32 on the CPU, LoRA r=16 on every linear layer) in a fresh process, and runs
`selfee_fast.train.train_stage` (stage 0: the reference is the base with the adapter off).
Measured, what the plan predicts for a GPU: the peak of the bytes held in tensors during two
training steps on the same pairs above those held when they start (torch.profiler's memory
timeline). Two steps, because the plan describes a step of a run: from the second step on,
the optimizer's state (created by the first step's update) is held through the forward and
backward; a lone first step never holds it together with its activations.
Shown beside it: the process's peak RSS during one step above its RSS before it (Linux VmHWM
reset through /proc/self/clear_refs; glibc maps every block of 1 MiB or more on its own), after
a first step on two tokens has loaded what a step loads once (lazy imports, thread pools); RSS
also holds what the CPU libraries and glibc keep beside the tensors, which a GPU's
allocator does not. Predicted: `selfee_fast.plan.training_estimate` less what is loaded before
the step (the weights and the adapter). The rejected responses are a few tokens shorter than
the chosen, so the batch is padded and carries its attention mask, as the plan assumes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from vs_trl import memory_peak, memory_start

from selfee_fast.rss import map_big_blocks_alone

CASES = [
    # (hidden, intermediate, layers, heads, kv heads, vocab, tokens per sequence, pairs per micro-batch)
    (256, 688, 4, 4, 2, 32000, 256, 2),
    (512, 1376, 4, 8, 8, 32000, 512, 1),
    (384, 1024, 6, 6, 2, 8000, 512, 2),
]
VALIDATION = [
    (320, 864, 8, 10, 2, 16000, 384, 1),  # eight layers, five query heads per KV head
    (256, 704, 2, 8, 1, 32000, 1024, 1),  # one KV head, 1024 tokens a sequence
    (384, 1024, 3, 12, 4, 8000, 256, 3),  # three pairs, twelve heads of 32
]
LORA_R = 16


def tensor_peak_of(step, work: Path) -> int:
    """The peak of the bytes held in CPU tensors while `step` (one or more steps) runs, above those held when it starts.

    torch.profiler's memory timeline follows every tensor the step creates or touches (the weights
    it reads count from the start); allocator slack and libraries' own buffers are not tensors.
    """
    return timeline_peak(profiled(step), work)


def profiled(step):
    """torch.profiler's record of `step`, every allocation with its stack."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    return prof


def timeline_peak(prof, work: Path) -> int:
    """The peak of the memory timeline's bytes (CPU tensors) above those at its start."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of a CUDA-only snapshot API
        prof.export_memory_timeline(str(work / "timeline.json"), device="cpu")
    _, sizes = json.loads((work / "timeline.json").read_text())
    totals = [sum(row) for row in sizes]
    return max(totals) - totals[0]


def quiet_libraries() -> None:
    from transformers.utils import logging as transformers_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def build_case(case: tuple, folder: Path):
    """A Llama of the case's shape with random weights saved in `folder`, its tokenizer, and the case's pairs
    (the rejected responses 8 tokens shorter than the chosen: a padded batch with its mask)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfee_fast.demo.tiny import build_tokenizer
    from selfee_fast.train import TrainPair

    hidden, intermediate, layers, heads, kv_heads, vocab, seq_len, pairs = case
    tokenizer = build_tokenizer(["the cat sat on the mat"] * 20, folder, vocab_size=100)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=seq_len, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    rng = random.Random(0)
    prompt = seq_len // 4
    train_pairs = [
        TrainPair(f"p{i}", [rng.randrange(10, vocab) for _ in range(prompt)],
                  [rng.randrange(10, vocab) for _ in range(seq_len - prompt)],
                  [rng.randrange(10, vocab) for _ in range(seq_len - prompt - 8)])
        for i in range(pairs)
    ]  # fmt: skip
    return tokenizer, train_pairs


def _measure(case: tuple, checkpointing: bool, quantization: str, results) -> None:
    import torch

    os.environ["SELFEE_FAST_BACKEND"] = "torch"
    map_big_blocks_alone()
    from selfee_fast import models
    from selfee_fast.train import TrainPair, TrainSettings, train_stage

    quiet_libraries()
    pairs = case[-1]
    work = Path(tempfile.mkdtemp(prefix="plan_check_"))
    try:
        tokenizer, train_pairs = build_case(case, work / "m")
        model, _ = models.load_model(work / "m", dtype=torch.float32, device="cpu", gradient_checkpointing=checkpointing,
                                     lora=models.LoraSettings(r=LORA_R, alpha=2 * LORA_R),
                                     quantization=quantization)  # fmt: skip
        settings = TrainSettings(lr=1e-4, warmup_ratio=0.0, batch_size=pairs, micro_batch_size=pairs,
                                 optimizer="adamw", save_every=10**9)  # fmt: skip
        # A first step on two tokens loads what a step loads once (lazy imports, TensorBoard's writer,
        # thread pools, kernel caches): process overheads, not the tensors a GPU would hold.
        warm = [TrainPair("warm", train_pairs[0].prompt[:1], train_pairs[0].chosen[:1], train_pairs[0].rejected[:1])]
        warm_settings = TrainSettings(lr=1e-4, warmup_ratio=0.0, batch_size=1, micro_batch_size=1, optimizer="adamw",
                                      save_every=10**9)  # fmt: skip
        train_stage(model, warm, warm_settings, work / "warm", pad_id=tokenizer.pad_token_id, reference="init",
                    log=lambda message: None)  # fmt: skip
        for p in model.parameters():
            p.grad = None
        baseline = memory_start(torch.device("cpu"))
        train_stage(model, train_pairs, settings, work / "t", pad_id=tokenizer.pad_token_id, reference="init",
                    log=lambda message: None)  # fmt: skip
        rss = memory_peak(torch.device("cpu")) - baseline
        for p in model.parameters():
            p.grad = None
        two_steps = TrainSettings(lr=1e-4, warmup_ratio=0.0, batch_size=pairs, micro_batch_size=pairs, epochs=2,
                                  optimizer="adamw", save_every=10**9)  # fmt: skip
        tensors = tensor_peak_of(lambda: train_stage(model, train_pairs, two_steps, work / "profiled",
                                                     pad_id=tokenizer.pad_token_id, reference="init",
                                                     log=lambda message: None), work)  # fmt: skip
        results.put({"measured": tensors, "rss": rss})
    except Exception as error:
        results.put({"error": f"{type(error).__name__}: {error}"})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(case: tuple, checkpointing: bool, quantization: str = "none") -> dict:
    from selfee_fast.cli import result_or_none

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    worker = ctx.Process(target=_measure, args=(case, checkpointing, quantization, results))
    worker.start()
    result = result_or_none(worker, results)  # never waits on a worker that died
    worker.join()
    if result is None:
        result = {"error": f"the process died (exit code {worker.exitcode})"}
    return result


def predict(case: tuple, checkpointing: bool, quantization: str = "none") -> int:
    from selfee_fast.plan import ModelShape, Precision, lora_params, training_estimate, weight_bytes

    hidden, intermediate, layers, heads, kv_heads, vocab, seq_len, pairs = case
    shape = ModelShape(hidden, intermediate, layers, heads, kv_heads, hidden // heads, vocab)
    cpu = Precision(weight_bytes=4, activation_bytes=4, quantization=quantization, lora_r=LORA_R,
                    gradient_checkpointing=checkpointing, optimizer="adamw", on_gpu=False)  # fmt: skip
    estimate = training_estimate(shape, cpu, pairs, seq_len, frozen_reference=False)
    loaded = weight_bytes(shape, cpu) + 4 * sum(lora_params(shape, LORA_R))
    return estimate.peak_bytes - loaded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the first shape only")
    parser.add_argument("--validation", action="store_true", help="the validation shapes only")
    parser.add_argument(
        "--quantization",
        default="none",
        choices=["none", "4bit"],
        help="4bit: the base's linear layers in NF4 (QLoRA), as model.quantization=4bit loads them",
    )
    parser.add_argument("--out", help="also write the results as JSON to this folder")
    args = parser.parse_args(argv)
    if args.quick:
        cases = CASES[:1]
    elif args.validation:
        cases = VALIDATION
    else:
        cases = CASES + VALIDATION
    rows = []
    print(f"{'set':>5}{'H':>5}{'I':>6}{'L':>3}{'heads':>7}{'V':>7}{'T':>6}{'pairs':>6}{'ckpt':>6}"
          f"{'predicted MiB':>15}{'tensors MiB':>13}{'pred/tensors':>14}{'RSS MiB':>9}")  # fmt: skip
    for case in cases:
        for checkpointing in (True, False):
            result = measure(case, checkpointing, args.quantization)
            row = {"case": case, "validation": case in VALIDATION, "checkpointing": checkpointing,
                   "quantization": args.quantization, "predicted": predict(case, checkpointing, args.quantization),
                   **result}  # fmt: skip
            rows.append(row)
            h, i, layers, heads, kv, v, t, pairs = case
            head = f"{'val' if row['validation'] else 'case':>5}{h:>5}{i:>6}{layers:>3}{f'{heads}/{kv}':>7}{v:>7}{t:>6}{pairs:>6}{'on' if checkpointing else 'off':>6}"
            if "error" in row:
                print(f"{head}  {row['error']}")
                continue
            ratio = row["predicted"] / row["measured"]
            print(f"{head}{row['predicted'] / 2**20:>15.1f}{row['measured'] / 2**20:>13.1f}{ratio:>14.2f}"
                  f"{row['rss'] / 2**20:>9.1f}")  # fmt: skip
    measured = [r for r in rows if "measured" in r]
    for name, validation in (("cases", False), ("validation cases", True)):
        ratios = [r["predicted"] / r["measured"] for r in measured if r["validation"] == validation]
        if ratios:
            print(f"predicted / measured tensor peak: {min(ratios):.2f} to {max(ratios):.2f} "
                  f"over {len(ratios)} {name}")  # fmt: skip
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = "plan_check-cpu.json" if args.quantization == "none" else f"plan_check-cpu-{args.quantization}.json"
        (Path(args.out) / name).write_text(json.dumps(rows, indent=2))
    return 0 if len(measured) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
