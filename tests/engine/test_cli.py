"""The command line: every subcommand answers --help; bad input exits 2 with a message."""

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest

import selfee_fast.demo
from selfee_fast.cli import build_parser, kernel_demo, main, result_or_none

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", ["run", "generate", "judge", "train", "demo", "kernel-demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: selfee-fast" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["demo", "kernel-demo"])
def test_every_demo_option_has_help(command):
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = [a for a in subcommands.choices[command]._actions if not isinstance(a, argparse._HelpAction)]
    assert options and all(a.help for a in options), [a.dest for a in options if not a.help]


def test_bench_hands_its_arguments_to_the_benchmark_script(capfd):
    assert main(["bench", "--help"]) == 0
    assert "usage: selfee-fast bench" in capfd.readouterr().out


def test_bench_script_run_directly_names_itself():
    env = {k: v for k, v in os.environ.items() if k != "SELFEE_FAST_PROG"}
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_kernels.py"), "--help"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0 and "usage: bench_kernels.py" in result.stdout


@pytest.mark.parametrize(
    "bad", [["--vocab", "0"], ["--vocab", "1"], ["--pairs", "0"], ["--seq-len", "-3"], ["--hidden-size", "x"]]
)
def test_kernel_demo_refuses_bad_sizes_before_starting_a_worker(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["kernel-demo", *bad])
    assert exit_info.value.code == 2
    assert f"argument {bad[0]}" in capsys.readouterr().err


def test_a_worker_that_dies_is_noticed_not_waited_for():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    worker = ctx.Process(target=os._exit, args=(3,))
    worker.start()
    assert result_or_none(worker, results, poll_seconds=0.1) is None
    worker.join()
    assert worker.exitcode == 3


def test_kernel_demo_reports_a_crashed_worker_in_one_line(capfd):
    # Past argparse (called directly), vocab 0 makes the worker raise: it used to hang the parent.
    args = argparse.Namespace(pairs=1, seq_len=4, hidden_size=4, vocab=0, seed=0)
    assert kernel_demo(args) == 1
    last_line = capfd.readouterr().err.strip().splitlines()[-1]
    assert last_line == "selfee-fast kernel-demo: the naive run died before reporting (exit code 1)"


def test_kernel_demo_says_what_it_ran_and_where(capfd):
    assert main(["kernel-demo", "--pairs", "1", "--seq-len", "8", "--hidden-size", "8", "--vocab", "16"]) == 0
    lines = capfd.readouterr().out.strip().splitlines()
    assert lines[0].startswith("selfee-fast kernel-demo: 1 preference pairs x 8 tokens")
    assert lines[-1].startswith("results agree (measured on this machine, device cpu; no GPU numbers exist yet")


def test_demo_default_folder_is_per_task_and_scale(tmp_path, monkeypatch):
    used = []

    def record_folder(out, **_):
        used.append(Path(out))
        return {"task": "t", "table": "", "seconds": 0.0, "plot": None}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(selfee_fast.demo, "run_demo", record_folder)
    for argv in (["demo"], ["demo", "--quick"], ["demo", "--task", "upper"], ["demo", "--task", "my.tasks:Task"]):
        assert main(argv) == 0
    assert used == [
        Path("selfee_fast_demo/maxof"),
        Path("selfee_fast_demo/maxof-quick"),
        Path("selfee_fast_demo/upper"),
        Path("selfee_fast_demo/my.tasks_Task"),
    ]


def test_demo_in_a_folder_of_other_settings_is_one_line_with_the_fix(tmp_path, capsys):
    (tmp_path / "demo_settings.json").write_text(json.dumps({"task": "maxof", "seed": 0, "scale": {}}))
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfee-fast: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "holds a demo made with other settings" in err and "use another --out" in err


def test_default_demo_output_is_git_ignored():
    assert "selfee_fast_demo/" in (REPO / ".gitignore").read_text().splitlines()


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


@pytest.mark.parametrize(
    ("error", "code"),
    [
        ("RunFolderBusy", 2), ("ConfigError", 2), ("DataError", 2), ("TaskError", 2), ("WriteFailed", 1),
        ("FloatingPointError", 1), ("CheckpointMismatch", 1), ("Interrupted", 130), ("KeyboardInterrupt", 130),
    ],
)  # fmt: skip
def test_every_failure_of_every_command_is_one_line_and_an_exit_code(error, code, capsys):
    import argparse

    import selfee_fast.config
    import selfee_fast.data
    import selfee_fast.demo.tasks
    import selfee_fast.files
    import selfee_fast.stopping
    import selfee_fast.train
    from selfee_fast.cli import run_command

    modules = (selfee_fast.config, selfee_fast.data, selfee_fast.demo.tasks, selfee_fast.files, selfee_fast.stopping,
               selfee_fast.train)  # fmt: skip
    kind = next((getattr(m, error) for m in modules if hasattr(m, error)), None) or __builtins__[error]

    def fail(args):
        raise kind("what went wrong")

    assert run_command(argparse.Namespace(func=fail)) == code
    err = capsys.readouterr().err
    assert err.startswith("selfee-fast: ") and err.count("\n") == 1 and "Traceback" not in err


def test_a_command_that_runs_on_one_process_is_refused_under_torchrun(monkeypatch, capsys):
    import argparse

    from selfee_fast.cli import run_command

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_command(argparse.Namespace(command="demo", func=lambda args: 0)) == 2
    assert "demo runs on one process; torchrun runs run, generate, judge, train" in capsys.readouterr().err
