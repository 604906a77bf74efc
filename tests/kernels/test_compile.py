"""Every kernel compiles for real GPUs and fits their shared memory (no GPU needed).

The interpreter tests check numerics; this compiles the very launches the library makes,
with its GPU launch configuration, down to a cubin for Hopper (sm_90) and for the
consumer Ampere/Ada cards (sm_86, whose 99 KiB of shared memory is the tightest).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfee_fast.kernels.spa_loss import LOSS_TYPES

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_every_kernel_compiles_and_fits_shared_memory(tmp_path):
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton without its CUDA backend cannot compile")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    report_path = tmp_path / "compile.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compile_check.py"), "--arch", "90", "--arch", "86",
         "--json", str(report_path)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(report_path.read_text())
    results = report["results"]
    kernels = {r["kernel"] for r in results}
    assert kernels == {
        "_logprobs_forward_kernel", "_grad_hidden_kernel", "_grad_weight_kernel", "_logit_gradient_kernel",
        "_spa_pair_kernel",
    }  # fmt: skip
    # 8 launches per input dtype (bf16, fp32) plus one per loss type and one with per-pair smoothing,
    # on each of the two architectures.
    assert len(results) == 2 * (2 * 8 + len(LOSS_TYPES) + 1)
    for r in results:
        assert r["ok"] and r["fits"], r
        assert 0 < r["shared_bytes"] <= r["shared_limit"] or r["kernel"] == "_spa_pair_kernel", r
