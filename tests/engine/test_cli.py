"""The command line: every subcommand answers --help; bad input exits 2 with a message."""

import subprocess
import sys

import pytest

from selfee_fast.cli import main


@pytest.mark.parametrize("command", ["run", "generate", "judge", "train", "demo", "kernel-demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: selfee-fast" in capsys.readouterr().out


def test_bench_hands_its_arguments_to_the_benchmark_script(capfd):
    assert main(["bench", "--help"]) == 0
    assert "usage: kernels.py" in capfd.readouterr().out


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "selfee_fast", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "generate" in result.stdout


def test_bad_config_exits_2_with_the_reason(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "config file" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("model: {path: nowhere}\ntrain: {lr: 1e-6, warmup: 0.1}\n")
    assert main(["run", str(config)]) == 2
    assert "unknown config key train.warmup; did you mean train.warmup_ratio?" in capsys.readouterr().err


def test_step_needs_the_previous_stage(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"run_dir: {tmp_path / 'run'}\nmodel: {{path: {tmp_path}}}\n"
        f"data: {{seed_pairs: s.jsonl, prompt_pools: [a.jsonl, b.jsonl, c.jsonl]}}\n"
    )
    assert main(["generate", str(config), "--stage", "iter1"]) == 2
    assert "run stage0 first" in capsys.readouterr().err
    assert main(["generate", str(config), "--stage", "stage0"]) == 2
    assert "works on an iteration stage" in capsys.readouterr().err
