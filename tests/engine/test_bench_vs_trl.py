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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "must be at least 1"),
        (["--rounds", "0"], "must be at least 1"),
        (["--pairs", "-1"], "must be at least 1"),
        (["--new-tokens", "0"], "must be at least 1"),
        (["--layers", "0"], "--layers must be at least 1"),
        (["--engines", "deepspeed"], "invalid choice"),
        (["--model", "mistral-7b", "--vocab", "500"], "has its own vocabulary (32000)"),
        (["--device", "cpu", "--memory-cap-gb", "24"], "applies to a CUDA device only"),
        (["--quantization", "8bit"], "invalid choice"),
    ],
)
def test_vs_trl_refuses_nonsense_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as done:
        vs_trl.main(argv)
    assert done.value.code == 2
    assert message in capsys.readouterr().err


def test_the_7b_shapes_are_those_models_and_layers_only_shorten_them():
    (mistral,) = vs_trl.shapes(vs_trl.parse_args(["--model", "mistral-7b", "--device", "cpu"]))
    (llama3,) = vs_trl.shapes(vs_trl.parse_args(["--model", "llama3-8b", "--layers", "2", "--device", "cpu"]))
    body = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    assert mistral == {**body, "num_hidden_layers": 32, "vocab_size": 32000}
    assert llama3 == {**body, "num_hidden_layers": 2, "vocab_size": 128256}
    small = vs_trl.shapes(vs_trl.parse_args(["--vocab", "500", "700", "--device", "cpu"]))
    assert [s["vocab_size"] for s in small] == [500, 700] and small[0]["hidden_size"] == 768


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
    (case,) = json.loads((tmp_path / "vs_trl-cpu-quick.json").read_text())["cases"]
    assert case["step1_loss_difference"] < 1e-5 and case["step1_logps_difference"] < 1e-2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed (pip install trl)")
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="QLoRA needs bitsandbytes")
def test_a_tiny_qlora_run_with_8bit_adamw_agrees_and_times_judge_and_generation(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SELFEE_FAST_BACKEND")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "vs_trl.py"), "--quick", "--vocab", "500", "--seq-len", "32",
         "--steps", "2", "--rounds", "1", "--quantization", "4bit", "--optimizer", "adamw8bit", "--throughput",
         "--new-tokens", "4", "--generation-cache", "dynamic", "static", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "vs_trl-cpu-quick.json").read_text())
    assert (results["env"]["quantization"], results["env"]["optimizer"]) == ("4bit", "bitsandbytes AdamW8bit")
    (case,) = results["cases"]
    assert case["step1_loss_difference"] < 1e-5 and case["step1_logps_difference"] < 1e-2
    throughput = case["engines"]["selfee_fast"]["throughput"]
    assert throughput["judge_sequences"] == 8 and throughput["judge_tokens_per_s"] > 0  # every pair's two responses
    for cache in ("dynamic", "static"):  # random weights rarely stop: 8 prompts x 2 responses x 4 tokens
        assert 0 < throughput[f"generation_{cache}_new_tokens"] <= 64
        assert throughput[f"generation_{cache}_new_tokens_per_s"] > 0
