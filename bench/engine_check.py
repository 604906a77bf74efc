"""GPU check of the engine: the SPA loop end to end in bf16, with the numbers a user asks for.

    python bench/engine_check.py --out DIR        # on a CUDA machine (budgeted 100 s in gpu_check.sh; never timed)
    python bench/engine_check.py --cpu-smoke      # tiny model on the CPU, to check this script

Builds a ~47M-parameter Llama and a byte-level BPE tokenizer locally (no hub access),
writes a synthetic seed set and prompt pool, and runs `selfee_fast.pipeline.run_pipeline`
exactly as `selfee-fast run` does: stage 0 (seed DPO) and one SPA iteration (hf
generation, fused-kernel judge, self-refinement training with DND), LoRA, bf16 on the GPU,
the Triton backend, AdamW8bit when bitsandbytes imports.

Reported per stage: seconds, training tokens/s, peak GPU memory, first and last loss; and
the judge-reuse noise: without DND (spa.extrapolate=[]) the training reference is the
judge's stored log pi_{i-1}, computed in the judge's batch shapes, while the policy log-probs
of the first step come from the training micro-batches. Both are pi_{i-1}, so the first
step's |rewards/chosen| and |rewards/rejected| measure nothing but that shape noise
(beta * the sequence log-prob difference). With DND on, the reference is recomputed in the
same fused pass and the same numbers measure the in-pass noise.

Then the DND iteration once more with packed rows (`model.packing`), for the tokens/s of
packing against the padded rows.

Checks (PASS/FAIL lines; exit 1 on a FAIL): every loss finite, a judged pair per prompt,
the seed loss decreasing, no padding in packed rows. Results go to DIR/engine_check-<cuda|cpu-smoke>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

SYLLABLES = "ka ri to mu ne sa lo vi de pa zu fe ho ji ba ny qu ex".split()

GPU_SCALE = dict(hidden=768, layers=8, heads=12, kv_heads=4, vocab=4000, prompts=128, seed_pairs=64,
                 new_tokens=64, batch=16, micro=8, lora_r=16, seed_epochs=2)  # fmt: skip
SMOKE_SCALE = dict(hidden=32, layers=2, heads=4, kv_heads=2, vocab=300, prompts=8, seed_pairs=8,
                   new_tokens=6, batch=4, micro=2, lora_r=4, seed_epochs=2)  # fmt: skip


def word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))


def text(rng: random.Random, n: int) -> str:
    return " ".join(word(rng) for _ in range(n))


def build_workspace(root: Path, scale: dict, log) -> dict:
    """Model, tokenizer, seed pairs and prompt pool, all made here."""
    from selfee_fast.demo.tiny import build_tiny_llama, build_tokenizer

    rng = random.Random(0)
    corpus = [text(rng, rng.randint(3, 30)) for _ in range(4000)]
    tokenizer = build_tokenizer(corpus, root / "model", vocab_size=scale["vocab"])
    model = build_tiny_llama(root / "model", tokenizer, hidden_size=scale["hidden"], layers=scale["layers"],
                             heads=scale["heads"], kv_heads=scale["kv_heads"], max_positions=1024)  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params / 1e6:.1f}M parameters, vocab {len(tokenizer)}, hidden {scale['hidden']}")
    with (root / "seed.jsonl").open("w") as f:
        for _ in range(scale["seed_pairs"]):
            # A learnable preference: short answers beat long ones.
            record = {"prompt": text(rng, 8), "chosen": text(rng, 3), "rejected": text(rng, 12)}
            f.write(json.dumps(record) + "\n")
    with (root / "pool.jsonl").open("w") as f:
        for _ in range(scale["prompts"]):
            f.write(json.dumps({"prompt": text(rng, rng.randint(4, 16))}) + "\n")
    return {"parameters": params, "vocab": len(tokenizer)}


def run_config(root: Path, run_dir: str, scale: dict, optimizer: str, **spa) -> Path:
    import yaml

    config = {
        "run_dir": str(root / run_dir),
        "model": {"path": str(root / "model"), "lora_r": scale["lora_r"], "lora_alpha": 2 * scale["lora_r"]},
        "data": {"seed_pairs": str(root / "seed.jsonl"), "prompt_pools": [str(root / "pool.jsonl")],
                 "max_length": 256, "max_prompt_length": 128},
        "generation": {"max_new_tokens": scale["new_tokens"], "batch_size": 32, "temperature": 1.0},
        "train": {"lr": 5e-4, "batch_size": scale["batch"], "micro_batch_size": scale["micro"],
                  "seed_epochs": scale["seed_epochs"], "optimizer": optimizer, "save_every": 1000},
        "spa": {"iterations": 1, "tau_window": 16, "alpha_warmup": 0.0, **spa},
    }  # fmt: skip
    path = root / f"{run_dir}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_numbers(run_dir: Path, stage: str, summary: dict) -> dict:
    metrics = read_jsonl(run_dir / stage / "train" / "metrics.jsonl")
    first, last = metrics[0], metrics[-1]
    return {
        "seconds": summary["stages"][stage]["seconds"],
        "steps": len(metrics),
        "tokens_per_s_median": sorted(m["tokens_per_s"] for m in metrics)[len(metrics) // 2],
        "padding_mean": sum(m["padding"] for m in metrics) / len(metrics),
        "peak_memory_mib": max(m["peak_memory_mib"] for m in metrics),
        "loss_first": first["loss"],
        "loss_last": last["loss"],
        "losses_finite": all(math.isfinite(m["loss"]) for m in metrics),
        # Step 1 sees pi_theta == pi_{i-1}: these are noise (beta * log-prob difference).
        "first_step_abs_reward_chosen": abs(first["rewards/chosen"]),
        "first_step_abs_reward_rejected": abs(first["rewards/rejected"]),
        "first_step_logps_chosen": first["logps/chosen"],
    }


def main(argv=None) -> int:
    # `timeout` stops a step with SIGTERM: as SystemExit, it still runs the finally blocks that save.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="folder for the JSON")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (torch backend)")
    parser.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("SELFEE_FAST_BACKEND", "torch")  # the interpreter would take minutes
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --cpu-smoke to exercise this script", file=sys.stderr)
        return 2
    import importlib.util

    from selfee_fast.config import load_config
    from selfee_fast.pipeline import run_pipeline

    scale = SMOKE_SCALE if args.cpu_smoke else GPU_SCALE
    from selfee_fast.train import eight_bit_optimizer_problem

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    bnb_problem = "not installed" if importlib.util.find_spec("bitsandbytes") is None else None
    bnb_problem = bnb_problem or eight_bit_optimizer_problem(device)
    optimizer = "adamw" if bnb_problem else "adamw8bit"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"engine_check-{'cpu-smoke' if args.cpu_smoke else 'cuda'}.json"
    work = Path(args.work) if args.work else Path(__import__("tempfile").mkdtemp(prefix="selfee_engine_"))
    work.mkdir(parents=True, exist_ok=True)
    log = print
    env = {
        "python": platform.python_version(), "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if not args.cpu_smoke else "cpu",
        "optimizer": optimizer, "bitsandbytes_problem": bnb_problem,
        "backend": os.environ.get("SELFEE_FAST_BACKEND", "auto"),
    }  # fmt: skip
    log(f"env: {env}")
    result = {"env": env, "scale": scale, "checks": []}

    def check(name: str, passed: bool, **details) -> None:
        result["checks"].append({"name": name, "passed": passed, **details})
        log(f"{'PASS' if passed else 'FAIL'} {name} {details}")

    def save() -> None:
        out_path.write_text(json.dumps(result, indent=2, default=str))

    try:
        started = time.perf_counter()
        result["model"] = build_workspace(work, scale, log)
        if torch.cuda.is_available() and not args.cpu_smoke:
            torch.cuda.reset_peak_memory_stats()

        # 1. The default loop: stage 0 + iteration 1 with DND (lam = 1/2).
        summary = run_pipeline(load_config(run_config(work, "dnd", scale, optimizer)), log=log)
        stage0 = stage_numbers(work / "dnd", "stage0", summary)
        iter1 = stage_numbers(work / "dnd", "iter1", summary)
        result["dnd"] = {"stage0": stage0, "iter1": iter1}
        save()
        pairs = read_jsonl(work / "dnd" / "iter1" / "pairs.jsonl")
        check("a judged pair per prompt", len(pairs) == scale["prompts"], pairs=len(pairs))
        check("losses finite", stage0["losses_finite"] and iter1["losses_finite"])
        check("seed loss decreases", stage0["loss_last"] < stage0["loss_first"],
              first=stage0["loss_first"], last=stage0["loss_last"])  # fmt: skip

        # 2. The same iteration without DND: the judge's stored log-probs are the reference.
        # Stage 0 and iteration 1's generations and pairs are copied, so only training reruns.
        shutil.copytree(work / "dnd" / "stage0", work / "reuse" / "stage0")
        (work / "reuse" / "iter1").mkdir(parents=True)
        for name in ("generations.jsonl", "pairs.jsonl"):
            shutil.copy(work / "dnd" / "iter1" / name, work / "reuse" / "iter1" / name)
        summary = run_pipeline(load_config(run_config(work, "reuse", scale, optimizer, extrapolate=[])), log=log)
        reuse = stage_numbers(work / "reuse", "iter1", summary)
        result["judge_reuse"] = reuse
        check("losses finite without DND", reuse["losses_finite"])
        log(
            "first-step |reward| (noise; 0 in exact arithmetic): "
            f"in-pass reference {iter1['first_step_abs_reward_chosen']:.2e}/{iter1['first_step_abs_reward_rejected']:.2e}, "
            f"judge's stored reference {reuse['first_step_abs_reward_chosen']:.2e}/{reuse['first_step_abs_reward_rejected']:.2e} "
            f"(chosen/rejected, beta-scaled, mean over the first batch)"
        )
        # 3. Iteration 1 with DND again, as packed rows (model.packing; sdpa unless flash-attn is
        # installed): train tokens/s against the padded rows of step 1.
        shutil.copytree(work / "dnd" / "stage0", work / "packed" / "stage0")
        (work / "packed" / "iter1").mkdir(parents=True)
        for name in ("generations.jsonl", "pairs.jsonl"):
            shutil.copy(work / "dnd" / "iter1" / name, work / "packed" / "iter1" / name)
        config = load_config(run_config(work, "packed", scale, optimizer), ["model.packing=true"])
        summary = run_pipeline(config, log=log)
        packed = stage_numbers(work / "packed", "iter1", summary)
        result["packed"] = packed
        check("losses finite with packing", packed["losses_finite"])
        check("packed rows hold no padding", packed["padding_mean"] == 0.0, padding=packed["padding_mean"])
        log(
            f"packing: {packed['tokens_per_s_median']:.0f} train tok/s packed vs {iter1['tokens_per_s_median']:.0f} "
            f"padded (ratio {packed['tokens_per_s_median'] / iter1['tokens_per_s_median']:.2f}; padded rows were "
            f"{iter1['padding_mean']:.0%} padding)"
        )
        for stage, numbers in (
            ("stage0", stage0),
            ("iter1 DND", iter1),
            ("iter1 no DND", reuse),
            ("iter1 packed", packed),
        ):
            log(
                f"{stage}: {numbers['seconds']:.1f} s, {numbers['steps']} steps, "
                f"{numbers['tokens_per_s_median']:.0f} train tok/s (median), peak {numbers['peak_memory_mib']:.0f} MiB, "
                f"loss {numbers['loss_first']:.4f} -> {numbers['loss_last']:.4f}"
            )
        result["seconds"] = time.perf_counter() - started
    except Exception as error:  # the JSON keeps what finished; the error is the finding
        check("engine run", False, error=f"{type(error).__name__}: {error}"[:500])
        raise
    finally:
        save()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [c for c in result["checks"] if not c["passed"]]
    log(f"{len(result['checks']) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
