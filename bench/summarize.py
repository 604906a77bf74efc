"""Turn a GPU session's result folder into the Markdown that goes into bench/NOTES.md.

    python bench/summarize.py OUTDIR            # prints Markdown; nothing is written

Reads whatever of gpu_check-*.json, engine_check-*.json, kernels-*.md and memory_7b-*.json
the folder holds (a run cut short leaves some out) and prints one section headed by the
card's name, with every number traceable to its file. Failed checks are listed by name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(folder: Path, stem: str) -> dict | None:
    for kind in ("cuda", "cpu-smoke"):
        path = folder / f"{stem}-{kind}.json"
        if path.exists():
            return json.loads(path.read_text())
    return None


def config_label(config: dict) -> str:
    return "{block_m}×{block_v}×{block_k} w{num_warps} s{num_stages}".format(**config)


def gpu_check_section(result: dict) -> list[str]:
    summary = result["summary"]
    lines = [
        f"**Correctness** (`gpu_check.py`, float64 references): {summary['passed']} passed, "
        f"{summary['failed']} failed, {summary['skipped']} skipped."
    ]
    lines += [f"- FAIL {c['name']}: {c['details']}" for c in result["checks"] if not c["passed"]]
    sweep = result.get("sweep")
    if sweep and sweep.get("results"):
        shape = sweep["shape"]
        lines += [
            "",
            f"**Launch-config sweep** (M={shape['M']}, H={shape['H']}, V={shape['V']}, {sweep['dtype']}):",
            "",
            "| config | forward ms | backward ms | forward TFLOP/s | backward TFLOP/s | status |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in sweep["results"]:
            default = " (default)" if r.get("is_default") else ""
            if r.get("status") == "ok":
                lines.append(
                    f"| {config_label(r['config'])}{default} | {r['forward_ms']:.2f} | {r['backward_ms']:.2f} | "
                    f"{r['forward_tflops']:.3g} | {r['backward_tflops']:.3g} | ok |"
                )
            else:
                lines.append(f"| {config_label(r['config'])}{default} | — | — | — | — | {r.get('status')} |")
    return lines


def engine_section(result: dict) -> list[str]:
    lines = ["**Engine** (`engine_check.py`: stage 0 + one SPA iteration, LoRA, bf16):", ""]
    for c in result["checks"]:
        details = {k: v for k, v in c.items() if k not in ("name", "passed")}
        lines.append(f"- {'PASS' if c['passed'] else 'FAIL'} {c['name']}" + ("" if c["passed"] else f": {details}"))
    rows = []
    for label, numbers in (
        ("stage 0", result.get("dnd", {}).get("stage0")),
        ("iter 1, DND", result.get("dnd", {}).get("iter1")),
        ("iter 1, judge's reference", result.get("judge_reuse")),
        ("iter 1, DND, packed", result.get("packed")),
    ):
        if numbers:
            rows.append(
                f"| {label} | {numbers['seconds']:.1f} | {numbers['tokens_per_s_median']:.0f} | "
                f"{numbers['peak_memory_mib']:.0f} | {numbers.get('padding_mean', float('nan')):.2f} | "
                f"{numbers['first_step_abs_reward_chosen']:.2e} |"
            )
    if rows:
        lines += [
            "",
            "| stage | s | train tok/s | peak MiB | padding | first-step \\|reward\\| |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    env = result.get("env", {})
    lines.append(f"\noptimizer {env.get('optimizer')}; bitsandbytes problem: {env.get('bitsandbytes_problem')}")
    return lines


def memory_section(result: dict) -> list[str]:
    lines = [
        f"**7B step** (`memory_7b.py`: {result.get('parameters', 0) / 1e9:.2f}B parameters, random weights):",
        "",
        "| variant | pairs/micro-batch | tokens/step | peak allocated GiB | peak reserved GiB | context + other GiB "
        "| weights GiB | tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def gib(value) -> str:
        return "—" if value is None else f"{value:.2f}"

    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['micro_batch_pairs']} | — | {r['error'][:60]} | — | — | — | — |")
        else:
            lines.append(
                f"| {r['variant']} | {r['micro_batch_pairs']} | {r['tokens_per_step']} | {r['peak_memory_gib']:.2f} | "
                f"{gib(r.get('peak_reserved_gib'))} | {gib(r.get('context_and_other_gib'))} | "
                f"{r['weights_gib']:.2f} | {r['tokens_per_s_median']:.0f} |"
            )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    gpu, engine, memory = (load(args.folder, s) for s in ("gpu_check", "engine_check", "memory_7b"))
    kernels_md = next(iter(sorted(args.folder.glob("kernels-*.md"))), None)
    if not any([gpu, engine, memory, kernels_md]):
        print(f"{args.folder}: no gpu_check/engine_check/memory_7b JSON and no kernels Markdown", file=sys.stderr)
        return 2
    env = (gpu or engine or memory or {}).get("env", {})
    out = [f"### {env.get('device', 'unknown device')} (torch {env.get('torch')}, triton {env.get('triton', '?')})", ""]
    for section, data in ((gpu_check_section, gpu), (engine_section, engine), (memory_section, memory)):
        if data:
            out += [*section(data), ""]
    if kernels_md:
        out += [f"**Benchmarks** (`{kernels_md.name}`):", "", kernels_md.read_text().strip(), ""]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
