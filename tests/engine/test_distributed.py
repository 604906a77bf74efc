"""Several processes (torchrun, gloo on the CPU) compute what one process computes.

The same settings on two ranks and on one: the same pairs per micro-batch (split over the
ranks), the same tau window, so losses, flags and final weights agree to fp32 rounding, and a
checkpoint resumes on either.
"""

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfee_fast.demo.tiny import build_tiny_llama, build_tokenizer

WORKER = Path(__file__).with_name("distributed_worker.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def worker_env() -> dict:
    env = {**os.environ, "SELFEE_FAST_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return env


def run_worker(args: list[str], processes: int) -> None:
    if processes == 1:
        command = [sys.executable, str(WORKER), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                   "--standalone", str(WORKER), *args]  # fmt: skip
    done = subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    rng = random.Random(0)
    words = "the cat dog sat ran on a mat log".split()
    tokenizer = build_tokenizer([" ".join(rng.choice(words) for _ in range(8)) for _ in range(50)], root / "m",
                                vocab_size=120)  # fmt: skip
    build_tiny_llama(root / "m", tokenizer, hidden_size=32, layers=2)
    eos = tokenizer.eos_token_id
    pairs = []
    for i in range(14):  # 14 pairs, batch 8: the second step of each epoch has a short last round
        prompt = [rng.randrange(3, 120) for _ in range(rng.randint(2, 5))]
        pairs.append({"location": f"p{i}", "prompt": prompt,
                      "chosen": [rng.randrange(3, 120) for _ in range(rng.randint(1, 6))] + [eos],
                      "rejected": [rng.randrange(3, 120) for _ in range(rng.randint(1, 6))] + [eos]})  # fmt: skip
    (root / "m" / "pairs.json").write_text(json.dumps(pairs))
    # The same pairs on a model wide enough that bitsandbytes keeps its 8-bit states in 8 bits: every
    # matrix and every half of one (FSDP2's shard on 2 ranks) has 4096 elements or more.
    build_tiny_llama(root / "wide", tokenizer, hidden_size=128, layers=2)
    (root / "wide" / "pairs.json").write_text(json.dumps(pairs))
    return root / "m"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "mode", ["lora", "lora-sharded", "full", pytest.param("qlora", marks=pytest.mark.skipif(
        importlib.util.find_spec("bitsandbytes") is None, reason="QLoRA needs bitsandbytes"))],
)  # fmt: skip
def test_two_processes_train_as_one_with_the_same_settings(model_dir, tmp_path, mode):
    run_worker([str(model_dir), str(tmp_path / "one"), mode, "4"], processes=1)
    run_worker([str(model_dir), str(tmp_path / "two"), mode, "4"], processes=2)
    one, two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "spa/tau"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    flags_one, flags_two = read_jsonl(tmp_path / "one" / "flags.jsonl"), read_jsonl(tmp_path / "two" / "flags.jsonl")
    assert [(f["step"], f["pair"], f["confident"]) for f in flags_one] == [
        (f["step"], f["pair"], f["confident"]) for f in flags_two
    ]
    final_one, final_two = torch.load(tmp_path / "one" / "final.pt"), torch.load(tmp_path / "two" / "final.pt")
    assert final_one.keys() == final_two.keys()
    for name in final_one:
        torch.testing.assert_close(final_two[name], final_one[name], rtol=1e-4, atol=1e-5, msg=name)
    # What FSDP2 shards: nothing in one process; on two, each layer, and the body as the root unit, which
    # holds the input embedding (as a unit of its own it cost more than it saved: bench/NOTES.md).
    assert json.loads((tmp_path / "one" / "fsdp_units.json").read_text()) == []
    body, *layers = sorted(json.loads((tmp_path / "two" / "fsdp_units.json").read_text()), key=len)
    assert body.endswith("model") and layers == [f"{body}.layers.0", f"{body}.layers.1"]


def assert_equal_up_to_8bit_rounding(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Weights trained the same way with 8-bit AdamW states. fp32 rounding (the order of a reduce-scatter's
    sum) moves an element's moment across an 8-bit level now and then; that element's update then differs by
    a fraction of one (lr 1e-3). Measured on 2 CPU processes: mean difference 2e-9, one element in 10^4
    above 1e-5, none above 6e-5. A shard stepped wrongly, or not at all, moves every element by ~1e-3."""
    difference = (got - expected).abs()
    assert difference.mean() < 1e-7, (name, float(difference.mean()))
    assert (difference > 1e-5).float().mean() < 1e-3 and difference.max() < 5e-4, (name, float(difference.max()))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="8-bit AdamW needs bitsandbytes")
def test_8bit_adamw_on_two_processes_steps_each_shard_as_one_process_steps_the_whole(model_dir, tmp_path):
    """bitsandbytes' AdamW8bit on FSDP2's shards, full fine-tuning: where each shard is whole blocks of 256 elements
    (every matrix here, as at 7B), the 8-bit states quantise the same blocks as one process's, so training is the
    same. (LoRA's adapters, with 32-bit states, run it in the QLoRA torchrun test.)"""
    mode = "full"
    wide = model_dir.parent / "wide"
    run_worker([str(wide), str(tmp_path / "one"), mode, "4", "adamw8bit"], processes=1)
    run_worker([str(wide), str(tmp_path / "two"), mode, "4", "adamw8bit"], processes=2)
    one, two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    final_one, final_two = torch.load(tmp_path / "one" / "final.pt"), torch.load(tmp_path / "two" / "final.pt")
    for name in final_one:
        assert_equal_up_to_8bit_rounding(final_two[name], final_one[name], name)
    # The checkpoint holds the one-process layout: bitsandbytes' own 8-bit states of the whole tensors.
    state_one = torch.load(tmp_path / "one" / "checkpoint-0000004" / "optimizer.pt", weights_only=False)
    state_two = torch.load(tmp_path / "two" / "checkpoint-0000004" / "optimizer.pt", weights_only=False)
    quantised = 0
    for index, saved in state_one["optimizer"]["state"].items():
        saved = {**saved, **saved.get("__bnb_optimizer_quant_state__", {})}
        gathered = state_two["optimizer"]["state"][index]
        assert gathered["state1"].dtype == saved["state1"].dtype and gathered["state1"].shape == saved["state1"].shape
        quantised += saved["state1"].dtype == torch.uint8
    assert quantised > 0


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="8-bit AdamW needs bitsandbytes")
@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)])
def test_an_8bit_adamw_checkpoint_resumes_on_another_number_of_processes(model_dir, tmp_path, first, then):
    wide, run = model_dir.parent / "wide", tmp_path / "run"
    run_worker([str(wide), str(run), "full", "4", "adamw8bit"], processes=first)
    expected = torch.load(run / "final.pt")
    back_to_step_2(run)
    run_worker([str(wide), str(run), "full", "4", "adamw8bit"], processes=then)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]
    resumed = torch.load(run / "final.pt")
    for name in expected:
        assert_equal_up_to_8bit_rounding(resumed[name], expected[name], name)


def back_to_step_2(run: Path) -> None:
    """The run folder as a kill after step 2 leaves it: the step-4 checkpoint and later records gone."""
    import shutil

    shutil.rmtree(run / "checkpoint-0000004")
    (run / "latest").write_text("checkpoint-0000002")
    (run / "final.pt").unlink()


@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_number_of_processes(model_dir, tmp_path, first, then):
    """Checkpoints hold whole tensors in the one-process layout: 2 ranks resume 1's, 1 resumes 2's."""
    run_worker([str(model_dir), str(tmp_path / "whole"), "lora", "4"], processes=first)
    expected = torch.load(tmp_path / "whole" / "final.pt")
    back_to_step_2(tmp_path / "whole")
    run_worker([str(model_dir), str(tmp_path / "whole"), "lora", "4"], processes=then)
    assert [r["step"] for r in read_jsonl(tmp_path / "whole" / "metrics.jsonl")] == [1, 2, 3, 4]
    resumed = torch.load(tmp_path / "whole" / "final.pt")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


# --------------------------------------------------------------------------- the whole run under torchrun


def selfee_fast(args: list[str], processes: int, cwd: Path) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    command = [sys.executable, *(launcher if processes > 1 else []), "-m", "selfee_fast", *args]
    return subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=300, cwd=cwd)


def one_process_then_two(root: Path, name: str, stage: str, overrides: list[str]):
    """Run `<name>1` to its end on one process, copy it to `<name>2` without `stage`, redo that on two processes:
    (the stage's folder in each, the two-process run)."""
    import shutil

    done = selfee_fast(["run", "run.yaml", f"run_dir={name}1", *overrides], 1, root)
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(root / f"{name}1", root / f"{name}2")
    shutil.rmtree(root / f"{name}2" / stage)
    done = selfee_fast(["run", "run.yaml", f"run_dir={name}2", *overrides], 2, root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / f"{name}1" / stage, root / f"{name}2" / stage, done


@pytest.fixture(scope="module")
def finished_run(model_dir, tmp_path_factory) -> Path:
    """A one-process run of stage 0 and one iteration, with prompts enough for several batches."""
    root = tmp_path_factory.mktemp("pipeline")
    rng = random.Random(1)
    words = "the cat dog sat ran on a mat log".split()

    def sentence(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    seed = [{"prompt": sentence(3), "chosen": sentence(2), "rejected": sentence(4)} for _ in range(8)]
    (root / "seed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seed))
    (root / "pool1.jsonl").write_text("".join(json.dumps({"prompt": sentence(rng.randint(2, 5))}) + "\n"
                                              for _ in range(10)))  # fmt: skip
    (root / "run.yaml").write_text(
        f"model: {{path: {model_dir}, lora_r: 4, lora_alpha: 8, gradient_checkpointing: false}}\n"
        "data: {seed_pairs: seed.jsonl, prompt_pools: [pool1.jsonl], max_length: 48, max_prompt_length: 24}\n"
        "generation: {max_new_tokens: 8, batch_size: 2}\n"
        "train: {lr: 1e-3, batch_size: 4, micro_batch_size: 2, seed_epochs: 1, optimizer: adamw, save_every: 1}\n"
        "spa: {iterations: 1, tau_window: 4}\nrun_dir: one\n"
    )
    done = selfee_fast(["run", "run.yaml"], 1, root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="QLoRA needs bitsandbytes")
def test_a_qlora_iteration_on_two_processes_writes_the_files_one_process_writes(finished_run):
    """QLoRA under torchrun is data-parallel (the NF4 base whole on every rank, the adapters sharded, stepped by
    8-bit AdamW): iter1 redone on 2 processes from one process's pi_0, generations and pairs byte-identical,
    training equal."""
    # With 8-bit AdamW, QLoRA's usual optimizer (on the adapters' shards; small tensors keep 32-bit states).
    qlora = ["model.quantization=4bit", "train.optimizer=adamw8bit"]
    one, two, done = one_process_then_two(finished_run, "qlora", "iter1", qlora)
    assert "stage0: finished earlier, skipped" in done.stdout
    for name in ("generations.jsonl", "pairs.jsonl"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    metrics_one, metrics_two = read_jsonl(one / "train" / "metrics.jsonl"), read_jsonl(two / "train" / "metrics.jsonl")
    assert [r["loss"] for r in metrics_two] == pytest.approx([r["loss"] for r in metrics_one], rel=1e-4, abs=1e-6)


def test_a_torchrun_iteration_writes_the_files_one_process_writes(finished_run):
    """iter1 redone on 2 processes from the same pi_0: generations and pairs byte-identical, training equal."""
    import shutil

    shutil.copytree(finished_run / "one", finished_run / "two")
    shutil.rmtree(finished_run / "two" / "iter1")
    done = selfee_fast(["run", "run.yaml", "run_dir=two"], 2, finished_run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stage0: finished earlier, skipped" in done.stdout
    assert done.stdout.count("stage0: finished earlier, skipped") == 1, "only rank 0 reports"
    assert done.stdout.count("memory plan per process, 2 processes") == 1, "rank 0 prints one rank's plan"
    one, two = finished_run / "one" / "iter1", finished_run / "two" / "iter1"
    for name in ("generations.jsonl", "pairs.jsonl"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert not list(two.glob("*.rank*")), "shards are merged and removed"
    metrics_one, metrics_two = read_jsonl(one / "train" / "metrics.jsonl"), read_jsonl(two / "train" / "metrics.jsonl")
    for a, b in zip(metrics_one, metrics_two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
    from safetensors.torch import load_file

    adapter_one = load_file(one / "model" / "adapter_model.safetensors")
    adapter_two = load_file(two / "model" / "adapter_model.safetensors")
    assert adapter_one.keys() == adapter_two.keys()
    for name in adapter_one:
        torch.testing.assert_close(adapter_two[name], adapter_one[name], rtol=1e-4, atol=1e-5, msg=name)


def rank_process(launcher_pid: int, rank: int) -> int | None:
    """The pid of the worker torchrun started as `rank` (read from /proc: its parent and LOCAL_RANK)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher_pid and f"LOCAL_RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def copies_before_iter1(root: Path, *names: str) -> None:
    """Copies of the finished one-process run without its iter1, to redo it."""
    import shutil

    for name in names:
        shutil.copytree(root / "one", root / name)
        shutil.rmtree(root / name / "iter1")


def assert_same_iter1_adapters(expected_run: Path, got_run: Path) -> None:
    from safetensors.torch import load_file

    expected = load_file(expected_run / "iter1" / "model" / "adapter_model.safetensors")
    got = load_file(got_run / "iter1" / "model" / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def signal_rank_1(
    root: Path, run: str, signum: int, overrides: list[str], stderr=subprocess.DEVNULL, when: str | None = None
):
    """Run `run` on 2 processes under torchrun; once `when` (a path in the run folder; default: its iter1
    training's checkpoint 3) exists, send `signum` to rank 1. (the launcher's exit code, whether the signal was
    sent)."""
    import time

    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [sys.executable, *launcher, "-m", "selfee_fast", "run", "run.yaml", f"run_dir={run}", *overrides]
    process = subprocess.Popen(command, env=worker_env(), cwd=root, stdout=subprocess.DEVNULL, stderr=stderr)
    ready, sent = root / run / (when or "iter1/train/checkpoint-0000003"), False
    deadline = time.time() + 240
    while process.poll() is None and time.time() < deadline and not sent:
        if ready.exists() and (pid := rank_process(process.pid, 1)) is not None:
            os.kill(pid, signum)
            sent = True
        time.sleep(0.005)
    return process.wait(timeout=240), sent


# Training steps enough to signal one rank in the middle of them (12).
LONGER = ["train.iteration_epochs=4"]


@pytest.fixture(scope="module")
def uninterrupted2(finished_run) -> Path:
    """iter1 with LONGER training, redone on 2 processes without interruption: what a stopped run must reach."""
    copies_before_iter1(finished_run, "uninterrupted2")
    done = selfee_fast(["run", "run.yaml", "run_dir=uninterrupted2", *LONGER], 2, finished_run)
    assert done.returncode == 0, done.stderr[-3000:]
    return finished_run / "uninterrupted2"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank's process through /proc (Linux)")
def test_a_rank_killed_mid_training_resumes_on_one_process_to_the_same_end(finished_run):
    import signal

    copies_before_iter1(finished_run, *("uninterrupted", "killed"))
    done = selfee_fast(["run", "run.yaml", "run_dir=uninterrupted", *LONGER], 1, finished_run)
    assert done.returncode == 0, done.stderr[-3000:]

    returncode, killed = signal_rank_1(finished_run, "killed", signal.SIGKILL, LONGER)
    assert killed and returncode != 0, "rank 1 was killed mid-training and the run stopped"

    resumed = selfee_fast(["run", "run.yaml", "run_dir=killed", *LONGER], 1, finished_run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "train: resuming at step" in resumed.stdout
    steps = [r["step"] for r in read_jsonl(finished_run / "killed" / "iter1" / "train" / "metrics.jsonl")]
    assert steps == list(range(1, 13)), "no step lost or doubled"
    assert_same_iter1_adapters(finished_run / "uninterrupted", finished_run / "killed")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank's process through /proc (Linux)")
def test_a_stop_signal_to_one_rank_stops_every_rank_at_the_same_step_and_the_run_resumes(finished_run, uninterrupted2):
    """SIGTERM to rank 1 alone mid-training: the ranks agree at the end of that step, both write the checkpoint and
    stop there (exit 130, saying so), and the same command on two processes finishes to the uninterrupted end."""
    import re
    import signal

    copies_before_iter1(finished_run, "stopped")
    with (finished_run / "stopped.err").open("w") as err:
        returncode, signalled = signal_rank_1(finished_run, "stopped", signal.SIGTERM, LONGER, err)
    stderr = (finished_run / "stopped.err").read_text()
    assert signalled and returncode != 0, stderr[-3000:]
    asked = re.search(r"rank 1 of 2\): stopped on SIGTERM after training step (\d+)/12", stderr)
    agreed = re.search(r"stopped with the run's other processes after training step (\d+)/12", stderr)
    assert asked and agreed and asked.group(1) == agreed.group(1), stderr[-3000:]
    step = int(asked.group(1))
    train = finished_run / "stopped" / "iter1" / "train"
    assert 3 <= step < 12 and (train / "latest").read_text().strip() == f"checkpoint-{step:07d}"
    assert [r["step"] for r in read_jsonl(train / "metrics.jsonl")] == list(range(1, step + 1))

    resumed = selfee_fast(["run", "run.yaml", "run_dir=stopped", *LONGER], 2, finished_run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"train: resuming at step {step}" in resumed.stdout
    assert [r["step"] for r in read_jsonl(train / "metrics.jsonl")] == list(range(1, 13))
    assert_same_iter1_adapters(uninterrupted2, finished_run / "stopped")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank's process through /proc (Linux)")
def test_a_stop_signal_to_one_rank_while_generating_stops_every_rank_and_the_run_resumes(finished_run, uninterrupted2):
    """SIGTERM to rank 1 alone once its first generation batch is written: rank 0 stops too (generation and
    judging compare stop requests after every round of batches, as training does after every step), neither
    crashes in a collective, and the rerun's files equal the uninterrupted run's."""
    import re
    import signal

    copies_before_iter1(finished_run, "stopped_generating")
    with (finished_run / "stopped_generating.err").open("w") as err:
        returncode, signalled = signal_rank_1(
            finished_run, "stopped_generating", signal.SIGTERM, LONGER, err, when="iter1/generations.jsonl.rank1"
        )
    stderr = (finished_run / "stopped_generating.err").read_text()
    assert signalled and returncode != 0, stderr[-3000:]
    asked = re.search(
        r"rank 1 of 2\): stopped on SIGTERM (after generation batch (\d+)/5|between generation batches)", stderr
    )
    agreed = re.search(r"rank 0 of 2\): stopped with the run's other processes after generation batch (\d+)/5", stderr)
    assert asked and agreed, stderr[-3000:]
    # The same round: rank 0 writes batches 1, 3, 5 and rank 1 batches 2, 4 (and none in the third round).
    rank_1_batch = int(asked.group(2)) if asked.group(2) else 6
    assert rank_1_batch == int(agreed.group(1)) + 1, stderr[-3000:]
    assert not re.search(r"\[rank\d\]: Traceback", stderr), "no process failed in a collective: " + stderr[-3000:]

    resumed = selfee_fast(["run", "run.yaml", "run_dir=stopped_generating", *LONGER], 2, finished_run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("generations.jsonl", "pairs.jsonl"):
        got = (finished_run / "stopped_generating" / "iter1" / name).read_bytes()
        assert got == (uninterrupted2 / "iter1" / name).read_bytes(), name
    assert_same_iter1_adapters(uninterrupted2, finished_run / "stopped_generating")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.micro_batch_size=3", r"train\.micro_batch_size=3 must split evenly over the 2 processes"),
        ("generation.backend=vllm", r"generation\.backend=vllm runs on one process"),
        (
            "model.quantization=4bit model.shard_frozen_base=sharded",
            r"FSDP2 cannot shard bitsandbytes' NF4 weights; use model\.shard_frozen_base=whole",
        ),
        ("train.optimizer=paged_adamw8bit", r"train\.optimizer=paged_adamw8bit does not run on FSDP2's sharded"),
    ],
)
def test_what_several_processes_cannot_do_yet_is_refused_up_front(monkeypatch, override, message):
    import selfee_fast.distributed as distributed
    from selfee_fast.config import ConfigError, load_config
    from selfee_fast.preflight import check_processes

    monkeypatch.setattr(distributed, "_world", distributed.World(rank=0, size=2))
    base = ["model.path=m", "train.optimizer=adamw", "train.batch_size=6", "train.micro_batch_size=2"]
    check_processes(load_config(None, base))
    with pytest.raises(ConfigError, match=message):
        check_processes(load_config(None, [*base, *override.split()]))


def test_qlora_on_several_processes_keeps_the_nf4_base_whole(monkeypatch):
    import selfee_fast.distributed as distributed
    from selfee_fast.config import load_config
    from selfee_fast.plan import frozen_base_layout
    from selfee_fast.preflight import check_processes

    monkeypatch.setattr(distributed, "_world", distributed.World(rank=0, size=2))
    config = load_config(None, ["model.path=m", "model.quantization=4bit", "train.optimizer=adamw"])
    check_processes(config)  # accepted: data-parallel QLoRA
    assert frozen_base_layout(config, 2) == "whole"  # auto, whatever the plan would say


def test_the_earlier_judge_on_two_processes_judges_as_one_process_does(finished_run):
    """spa.judge_consistency=filter: iter2, redone on 2 processes from the same pi_1, loads pi_0 as the
    earlier judge on every rank; its pairs (their agreements included) are byte-identical to one process's."""
    import shutil

    rng = random.Random(2)
    words = "the cat dog sat ran on a mat log".split()
    (finished_run / "pool2.jsonl").write_text(
        "".join(json.dumps({"prompt": " ".join(rng.choice(words) for _ in range(3))}) + "\n" for _ in range(10))
    )
    overrides = ["spa.iterations=2", "data.prompt_pools=[pool1.jsonl, pool2.jsonl]", "spa.judge_consistency=filter"]
    shutil.copytree(finished_run / "one" / "stage0", finished_run / "agree1" / "stage0")
    first, second, done = one_process_then_two(finished_run, "agree", "iter2", overrides)
    assert "iter1: finished earlier, skipped" in done.stdout
    one = (first / "pairs.jsonl").read_bytes()
    assert one == (second / "pairs.jsonl").read_bytes()
    assert all(json.loads(line)["agreement"] is not None for line in one.splitlines())


def test_the_stop_agreement_reduces_a_tensor_where_the_backend_can(monkeypatch):
    """NCCL reduces CUDA tensors only: the flag the ranks compare after every training step and every round of
    generation or judging lives on this rank's card there, on the CPU under gloo (the tests' backend)."""
    import torch.distributed as dist

    from selfee_fast.distributed import collective_device

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collective_device() == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device() == torch.device("cuda", 3)
