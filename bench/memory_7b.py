"""Peak memory and tokens/s of one SPA/DPO training step on a 7B model: does it fit a 24 GB card?

    python bench/memory_7b.py --out DIR                 # on a CUDA machine (budgeted 290 s in gpu_check.sh; never timed)
    python bench/memory_7b.py --cpu-smoke --out DIR     # a tiny model on the CPU, to check this script

No model can be downloaded here, so the model is a Llama-2-7B-shaped Llama (hidden 4096,
32 layers, vocab 32000) with random weights: memory and FLOPs are those of the real one.
It is built in bf16 on the GPU, saved, and loaded back through `selfee_fast.models.load_model`
(the engine's own loading path, QLoRA's NF4 quantisation included). Each variant then runs
`selfee_fast.train.train_stage` on random token pairs (prompt 256 + response 768 tokens by
default): LoRA r=16 on every linear layer, gradient checkpointing, 8-bit AdamW when
bitsandbytes imports, the fused head, and the reference pass SPA's iterations need
(DND: the frozen previous adapter plus the extrapolated logits).

Variants: `lora` (bf16 base) and `qlora` (NF4 base), each at micro-batch 1 and 2 pairs.
Reported per variant: peak allocated memory (`torch.cuda.max_memory_allocated`), median
training tokens/s over the timed steps, weight memory. Results: DIR/memory_7b-<cuda|cpu-smoke>.json.
The card here is an H100/H200; the peak memory, not the speed, carries over to a 24 GB card.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=500)  # fmt: skip


def build_model(folder: Path, shape: dict, device: torch.device) -> int:
    """A randomly initialised Llama of `shape`, saved with a small tokenizer; returns its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfee_fast.demo.tiny import build_tokenizer

    tokenizer = build_tokenizer(["the cat sat on the mat"] * 20, folder, vocab_size=100)
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no fp32 copy of 7B weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return params


def random_pairs(count: int, prompt_len: int, response_len: int, vocab: int, eos: int):
    from selfee_fast.train import TrainPair

    rng = random.Random(0)

    def ids(n: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(n)]

    return [TrainPair(f"pair{i}", ids(prompt_len), [*ids(response_len - 1), eos], [*ids(response_len - 1), eos])
            for i in range(count)]  # fmt: skip


def load_variant(folder: Path, quantization: str, device):
    """(model, tokenizer, seconds): the engine's own loading path, LoRA r=16 on every linear layer."""
    from selfee_fast import models

    # A peft model sits in reference cycles: after an OOM (whose traceback held the previous
    # variant's model while main's except block ran gc) only a collection frees it.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    model, tokenizer = models.load_model(
        folder, dtype=dtype, device=device, lora=models.LoraSettings(r=16, alpha=32), quantization=quantization,
    )  # fmt: skip
    return model, tokenizer, time.perf_counter() - started


def run_variant(model, tokenizer, load_seconds: float, quantization: str, micro: int, steps: int, args, device,
                work: Path, log) -> dict:  # fmt: skip
    """One training stage of `steps` steps at `micro` pairs per micro-batch, on a loaded model."""
    from selfee_fast import models
    from selfee_fast.train import TrainSettings, train_stage

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the previous micro-batch size's cached blocks do not count here
    weights_gib = model.get_memory_footprint() / 2**30
    models.freeze_reference_adapter(model)  # SPA iteration: pi_{i-1} as a frozen adapter copy
    vocab = model.get_output_embeddings().weight.shape[0]
    pairs = random_pairs(micro * steps, args.prompt_len, args.response_len, vocab, tokenizer.eos_token_id)
    optimizer = "adamw" if args.bnb_problem else "adamw8bit"
    settings = TrainSettings(
        lr=1e-5, warmup_ratio=0.0, batch_size=micro, micro_batch_size=micro, optimizer=optimizer, save_every=10**6,
        refine=True, extrapolate=0.5, tau_window=4,
        autocast_dtype="bfloat16" if device.type == "cuda" else None,
    )  # fmt: skip
    out_dir = work / f"train-{quantization}-{micro}"
    train_stage(model, pairs, settings, out_dir, pad_id=tokenizer.pad_token_id, reference="reference", log=log)
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    timed = sorted(m["tokens_per_s"] for m in metrics[1:]) or [metrics[0]["tokens_per_s"]]  # step 1 compiles
    # Allocated memory leaves out the allocator's cache and fragmentation and the CUDA context:
    # what a 24 GB card must hold is the peak reserved plus what the process holds beyond it.
    reserved = held_outside = None
    if device.type == "cuda":
        reserved = torch.cuda.max_memory_reserved(device) / 2**30
        free, total = torch.cuda.mem_get_info(device)
        held_outside = max(0.0, (total - free) / 2**30 - torch.cuda.memory_reserved(device) / 2**30)
    result = {
        "variant": "qlora" if quantization == "4bit" else "lora", "micro_batch_pairs": micro,
        "tokens_per_step": 2 * micro * (args.prompt_len + args.response_len),
        "peak_memory_gib": max(m["peak_memory_mib"] for m in metrics) / 1024,
        "peak_reserved_gib": reserved, "context_and_other_gib": held_outside,
        "weights_gib": weights_gib, "tokens_per_s_median": timed[len(timed) // 2], "load_seconds": load_seconds,
        "steps": len(metrics), "optimizer": optimizer, "losses": [m["loss"] for m in metrics],
    }  # fmt: skip
    return result


def main(argv=None) -> int:
    # `timeout` stops a step with SIGTERM: as SystemExit, it still runs the finally blocks that save.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU (chunked torch head)")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=768)
    parser.add_argument("--steps", type=int, default=3, help="training steps per variant (the first compiles)")
    parser.add_argument("--micro", type=int, nargs="+", default=[1, 2], help="pairs per micro-batch")
    parser.add_argument("--variants", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("SELFEE_FAST_BACKEND", "torch")
        torch.set_num_threads(1)
        args.prompt_len, args.response_len = min(args.prompt_len, 8), min(args.response_len, 8)
    elif not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --cpu-smoke", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"memory_7b-{'cpu-smoke' if args.cpu_smoke else 'cuda'}.json"
    from selfee_fast.train import eight_bit_optimizer_problem

    args.bnb_problem = "not installed" if importlib.util.find_spec("bitsandbytes") is None else None
    args.bnb_problem = args.bnb_problem or eight_bit_optimizer_problem(device)
    if args.bnb_problem and "qlora" in args.variants:
        print(f"bitsandbytes unusable ({args.bnb_problem}): qlora skipped, AdamW in fp32", flush=True)
        args.variants = [v for v in args.variants if v != "qlora"]
    work = Path(tempfile.mkdtemp(prefix="selfee_7b_"))
    result = {
        "env": {"python": platform.python_version(), "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "bitsandbytes_problem": args.bnb_problem},
        "shape": TINY if args.cpu_smoke else LLAMA_7B, "runs": [],
    }  # fmt: skip

    def log(message: str) -> None:
        print(message, flush=True)

    try:
        started = time.perf_counter()
        result["parameters"] = build_model(work / "model", result["shape"], device)
        log(f"built and saved {result['parameters'] / 1e9:.2f}B parameters in {time.perf_counter() - started:.0f} s")
        for variant in args.variants:
            quantization = "4bit" if variant == "qlora" else "none"
            # Loaded once per variant: a 7B load is seconds the one GPU window cannot spare.
            model, tokenizer, load_seconds = load_variant(work / "model", quantization, device)
            for micro in args.micro:
                try:
                    run = run_variant(model, tokenizer, load_seconds, quantization, micro, args.steps, args, device,
                                      work, log)  # fmt: skip
                except torch.OutOfMemoryError as error:
                    run = {"variant": variant, "micro_batch_pairs": micro, "error": f"OOM: {str(error)[:200]}"}
                    gc.collect()
                result["runs"].append(run)
                out_path.write_text(json.dumps(result, indent=2))
                if "error" in run:
                    log(f"{variant} micro {micro}: {run['error']}")
                else:
                    log(
                        f"{variant} micro {micro} ({run['tokens_per_step']} tokens/step): peak "
                        f"{run['peak_memory_gib']:.2f} GiB, weights {run['weights_gib']:.2f} GiB, "
                        f"{run['tokens_per_s_median']:.0f} tokens/s, load {run['load_seconds']:.0f} s"
                    )
            del model, tokenizer  # the next variant loads its own
            gc.collect()
    finally:
        out_path.write_text(json.dumps(result, indent=2))
        shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in result["runs"] if "error" in r]
    return 1 if failed or not result["runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
