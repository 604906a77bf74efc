"""bench/vs_trl.py and bench/plan_check.py: their arguments here, a tiny side-by-side run where TRL is installed."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str):
    """A bench script as a module, without putting bench/ on the test process's sys.path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # plan_check imports vs_trl by name
    spec.loader.exec_module(module)
    return module


vs_trl = load_script("vs_trl")
plan_check = load_script("plan_check")


@pytest.mark.parametrize("script", [vs_trl, plan_check])
def test_help_describes_the_script(script, capsys):
    with pytest.raises(SystemExit) as done:
        script.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--out" in out


def test_vs_trl_refuses_nonsense_arguments(capsys):
    for argv in (["--steps", "0"], ["--rounds", "0"], ["--pairs", "-1"], ["--engines", "deepspeed"]):
        with pytest.raises(SystemExit) as done:
            vs_trl.main(argv)
        assert done.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_rounds_pool_the_timed_steps_and_keep_the_highest_peak():
    runs = {}
    vs_trl.merge_round(runs, {"engine": "trl", "seconds": [9.0, 1.0, 2.0], "peak_above_loaded": 5, "process_peak": 7})
    vs_trl.merge_round(runs, {"engine": "trl", "seconds": [8.0, 3.0], "peak_above_loaded": 6, "process_peak": 4})
    assert runs["trl"]["seconds"] == [9.0, 1.0, 2.0, 3.0]  # each round's first step is a warm-up
    assert (runs["trl"]["peak_above_loaded"], runs["trl"]["process_peak"], runs["trl"]["rounds"]) == (6, 7, 2)
    vs_trl.merge_round(runs, {"engine": "trl", "error": "OOM"})
    assert runs["trl"] == {"error": "OOM"}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed (pip install trl)")
def test_a_tiny_side_by_side_run_agrees_at_step_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SELFEE_FAST_BACKEND")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "vs_trl.py"), "--quick", "--vocab", "500", "--seq-len", "16",
         "--steps", "2", "--rounds", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("selfee_fast / TRL: V=500 T=16: throughput x")
    (case,) = json.loads((tmp_path / "vs_trl-cpu.json").read_text())["cases"]
    assert case["step1_loss_difference"] < 1e-5 and case["step1_logps_difference"] < 1e-2
