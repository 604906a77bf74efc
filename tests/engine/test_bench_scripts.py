"""The GPU scripts' own logic, run on the CPU: a GPU session is too scarce to find a bug in them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SELFEE_FAST_BACKEND")}
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / name), *args], capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=600,
    )  # fmt: skip


def test_engine_check_smoke(tmp_path):
    done = run_script("engine_check.py", "--cpu-smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "engine_check-cpu-smoke.json").read_text())
    assert result["checks"] and all(c["passed"] for c in result["checks"])
    for numbers in (result["dnd"]["stage0"], result["dnd"]["iter1"], result["judge_reuse"]):
        assert numbers["steps"] > 0 and numbers["tokens_per_s_median"] > 0 and numbers["losses_finite"]
    # fp32 on the CPU: the judge's stored reference equals the in-pass one to rounding.
    assert result["judge_reuse"]["first_step_abs_reward_chosen"] < 1e-4
    summary = run_script("summarize.py", str(tmp_path))
    assert summary.returncode == 0, summary.stderr
    assert "**Engine**" in summary.stdout and "| iter 1, DND |" in summary.stdout


def test_gpu_check_smoke(tmp_path):
    done = run_script("gpu_check.py", "--cpu-smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check-cpu-smoke.json").read_text())
    assert result["summary"]["failed"] == 0 and result["summary"]["passed"] > 0


def test_memory_7b_smoke(tmp_path):
    done = run_script("memory_7b.py", "--cpu-smoke", "--out", str(tmp_path), "--micro", "1", "--steps", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "memory_7b-cpu-smoke.json").read_text())
    assert [(r["variant"], r["micro_batch_pairs"]) for r in result["runs"]] == [("lora", 1), ("qlora", 1)]
    assert all(r["steps"] == 2 and r["tokens_per_s_median"] > 0 for r in result["runs"])
