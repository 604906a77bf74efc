"""The memory plan's per-rank training estimate against each rank's measured peak, on 2 CPU processes.

    python bench/plan_check_fsdp.py                  # plan_check's first case, three layouts
    python bench/plan_check_fsdp.py --no-checkpointing

For each layout (LoRA with the frozen base whole on every rank, LoRA with the base sharded,
full fine-tuning with a frozen reference model) the case's model is built once (plan_check's
`build_case`) and `python -m torch.distributed.run --standalone --nproc-per-node 2` runs this
script as a rank worker on gloo: each rank loads the model through the engine's path (fp32,
LoRA r=16 on every linear or full fine-tuning), runs a warm-up step on one token a response (it
also shards the model: `train_stage` calls `distributed.shard_model`), then two training steps
of the case's micro-batch, split over the two ranks, under torch.profiler's memory timeline
(plan_check's `tensor_peak_of`); the checkpoint after the last step is left out. Measured: the
peak of the bytes held in tensors above those held when the two steps start, as `allocator_peak`
replays it from the profile's allocation and free events ("allocated"). Shown beside it: the
allocator total the events carry ("raw total") and the memory timeline ("timeline", where its
data-flow graph accepts the trace), which both miss the frees made on gloo's worker threads
(bench/NOTES.md). Predicted: `selfee_fast.plan.training_estimate(..., processes=2,
base_layout=...)` less what is held before the steps start (the weights, the adapter, the frozen
reference model with its gathered root).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from plan_check import CASES, LORA_R, build_case, profiled, quiet_libraries, timeline_peak

PROCESSES = 2
LAYOUTS = ("lora-whole", "lora-sharded", "full")


def rank_worker(folder: Path, layout: str, checkpointing: bool, out: Path) -> None:
    import torch

    from selfee_fast import models
    from selfee_fast import train as train_module
    from selfee_fast.distributed import start_world, stop_world, world
    from selfee_fast.train import TrainPair, TrainSettings, train_stage

    quiet_libraries()
    # The checkpoint written after a stage's last step gathers every trained tensor and the optimizer's
    # state whole (to the host on a GPU): not part of a step, and on the CPU it would be counted as
    # tensors. Left out here.
    train_module.save_checkpoint = lambda *args, **kwargs: None
    ranks = start_world()
    pad = json.loads((folder / "case.json").read_text())["pad"]
    pairs = [TrainPair(**p) for p in json.loads((folder / "case.json").read_text())["pairs"]]
    lora = models.LoraSettings(r=LORA_R, alpha=2 * LORA_R) if layout.startswith("lora") else None
    model, _ = models.load_model(folder, dtype=torch.float32, device="cpu", gradient_checkpointing=checkpointing,
                                 lora=lora)  # fmt: skip
    reference_model = None
    if lora is None:
        reference_model, _ = models.load_model(folder, dtype=torch.float32, device="cpu", gradient_checkpointing=False)
        reference_model.requires_grad_(False)

    def run(train_pairs, micro: int, epochs: int, where: str) -> None:
        settings = TrainSettings(lr=1e-4, warmup_ratio=0.0, batch_size=micro, micro_batch_size=micro, epochs=epochs,
                                 optimizer="adamw", save_every=10**9,
                                 shard_frozen_base="sharded" if layout == "lora-sharded" else "whole")  # fmt: skip
        train_stage(model, train_pairs, settings, out / f"{where}-rank{ranks.rank}", pad_id=pad,
                    reference="init" if lora else None, reference_model=reference_model, log=lambda message: None)  # fmt: skip

    # The warm-up: one token a response, one pair per rank; it loads what a step loads once and shards
    # the models, so the profiled steps start from the layout a run holds.
    warm = [TrainPair(f"warm{i}", p.prompt[:1], p.chosen[:1], p.rejected[:1]) for i, p in enumerate(pairs[:1] * 2)]
    run(warm, PROCESSES, 1, "warm")
    for p in model.parameters():
        p.grad = None
    work = out / f"timeline-rank{ranks.rank}"
    work.mkdir(parents=True, exist_ok=True)
    prof = profiled(lambda: run(pairs, len(pairs), 2, "profiled"))
    result = {"rank": ranks.rank, "allocated": allocator_peak(prof), "allocator total": allocator_total_peak(prof)}
    try:
        result["measured"] = timeline_peak(prof, work)
    except AssertionError as error:  # the timeline's data-flow graph refuses some traces (full fine-tuning's)
        result["timeline_error"] = str(error)[:200]
    (out / f"rank{ranks.rank}.json").write_text(json.dumps(result))
    assert world().size == PROCESSES
    stop_world()


def allocator_peak(prof) -> int:
    """The peak of the bytes held in CPU tensors during the profile, above those held at its start, replayed from
    the profile's allocation and free events.

    Not the allocator total that each event carries: the profiler counts a free only on a thread it profiles, so
    a tensor whose last reference gloo's worker thread drops (a collective's own copy of its input, freed there
    after the collective returns) stays in that total for the rest of the profile. The replay ends such a block
    at the first of: its recorded free; the return of the synchronous c10d collective that allocated it (nothing
    outside the collective holds it); the allocator handing its address out again (the block was freed).
    """
    from torch._C._profiler import _EventType

    events = []  # (time, order, kind, ptr, size, allocation id)

    def name_of(node) -> str:
        try:
            return node.name
        except UnicodeDecodeError:  # a few Python frames' names do not decode; none of them is c10d's
            return ""

    def walk(nodes, collective_end) -> None:
        for node in nodes:
            end = collective_end
            if end is None and node.tag == _EventType.PyCall and "c10d_logger.py" in name_of(node):
                end = node.end_time_ns  # the outermost c10d call: a synchronous collective's whole extent
            if node.tag == _EventType.Allocation:
                size, ptr = node.extra_fields.alloc_size, node.extra_fields.ptr
                if size > 0:
                    events.append((node.start_time_ns, 1, "alloc", ptr, size, id(node)))
                    if end is not None:
                        events.append((end, 2, "collective returned", ptr, size, id(node)))
                else:
                    events.append((node.start_time_ns, 0, "free", ptr, -size, None))
            walk(node.children, end)

    walk(prof.profiler.kineto_results.experimental_event_tree(), None)
    events.sort(key=lambda e: (e[0], e[1]))
    live: dict[int, tuple[int, int]] = {}  # ptr -> (size, allocation id)
    held = peak = 0
    for _, _, kind, ptr, size, ident in events:
        if kind == "alloc":
            if ptr in live:  # its address again: the earlier block was freed where the profiler did not see it
                held -= live.pop(ptr)[0]
            live[ptr] = (size, ident)
            held += size
        elif kind == "free":
            held -= live.pop(ptr)[0] if ptr in live else size  # a tensor from before the profile, if not live
        elif live.get(ptr, (0, None))[1] == ident:
            held -= live.pop(ptr)[0]
        peak = max(peak, held)
    return peak


def allocator_total_peak(prof) -> int:
    """The peak of the allocator total the profile's events carry, above its level at the start: what this
    script reported before the replay; it counts blocks freed on gloo's threads until the profile ends
    (kept in the JSON for comparison)."""
    from torch._C._profiler import _EventType

    events = []

    def walk(nodes) -> None:
        for node in nodes:
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    events.sort()
    return max(total for _, _, total in events) - (events[0][2] - events[0][1])


def predict(case: tuple, layout: str, checkpointing: bool) -> tuple[int, dict]:
    """(the predicted rise above what is held before the steps, the per-rank components)."""
    from selfee_fast.plan import ModelShape, Precision, training_estimate

    hidden, intermediate, layers, heads, kv_heads, vocab, seq_len, pairs = case
    shape = ModelShape(hidden, intermediate, layers, heads, kv_heads, hidden // heads, vocab)
    cpu = Precision(weight_bytes=4, activation_bytes=4, lora_r=LORA_R if layout.startswith("lora") else 0,
                    gradient_checkpointing=checkpointing, optimizer="adamw", on_gpu=False)  # fmt: skip
    est = training_estimate(shape, cpu, pairs, seq_len, frozen_reference=False, processes=PROCESSES,
                            base_layout="sharded" if layout == "lora-sharded" else "whole")  # fmt: skip
    c = est.components
    # Held before the steps: the weights, the adapter, and the frozen reference model (full fine-tuning),
    # its root already gathered.
    loaded = c["weights"] + c.get("adapter", 0) + c.get("frozen reference", 0)
    return est.peak_bytes - loaded, c


def measure(case: tuple, layout: str, checkpointing: bool) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="plan_check_fsdp_"))
    try:
        tokenizer, pairs = build_case(case, work / "m")
        (work / "m" / "case.json").write_text(json.dumps({"pad": tokenizer.pad_token_id,
                                                          "pairs": [asdict(p) for p in pairs]}))  # fmt: skip
        env = {**os.environ, "SELFEE_FAST_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(PROCESSES),
                   __file__, "--rank-worker", str(work / "m"), layout, "on" if checkpointing else "off",
                   str(work / "out")]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode:
            first = done.stderr.find("Traceback")  # a rank's own traceback, before the launcher's
            return [{"error": done.stderr[first : first + 3000] if first >= 0 else done.stderr[-3000:]}]
        return [json.loads((work / "out" / f"rank{r}.json").read_text()) for r in range(PROCESSES)]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank-worker"]:
        folder, layout, checkpointing, out = argv[1:5]
        rank_worker(Path(folder), layout, checkpointing == "on", Path(out))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    parser.add_argument("--out", help="also write the results as JSON to this folder")
    args = parser.parse_args(argv)
    case, checkpointing = CASES[0], not args.no_checkpointing
    print(f"case {case} (H, I, layers, heads, KV heads, V, tokens, pairs per micro-batch), {PROCESSES} processes, "
          f"checkpointing {'on' if checkpointing else 'off'}")  # fmt: skip
    # Measured: the replayed peak ("allocated"). Beside it, for comparison, the allocator total the events
    # carry and the memory timeline: both keep blocks freed on gloo's threads (the timeline equals the
    # total wherever it comes out), so either can read above the replayed peak.
    print(f"{'layout':<14}{'rank':>5}{'predicted MiB':>15}{'allocated MiB':>15}{'pred/allocated':>16}"
          f"{'raw total MiB':>15}{'timeline MiB':>14}")  # fmt: skip
    rows, ok = [], True
    for layout in args.layouts.split(","):
        predicted, components = predict(case, layout, checkpointing)
        print(f"{layout:<14} plan per rank: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in components.items()))
        for result in measure(case, layout, checkpointing):
            if "error" in result:
                print(f"{layout:<14} error: {result['error']}")
                ok = False
                continue
            rows.append({"layout": layout, "checkpointing": checkpointing, "predicted": predicted,
                         "components": components, **result})  # fmt: skip
            tensors = result.get("measured")
            timeline = f"{tensors / 2**20:>14.1f}" if tensors else f"{'-':>14}"
            allocated, raw = result["allocated"], result["allocator total"]
            print(f"{layout:<14}{result['rank']:>5}{predicted / 2**20:>15.1f}{allocated / 2**20:>15.1f}"
                  f"{predicted / allocated:>16.3f}{raw / 2**20:>15.1f}{timeline}")  # fmt: skip
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "plan_check_fsdp-cpu.json").write_text(json.dumps(rows, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
