"""The whole SPA loop on a tiny local Llama: stage 0 + 2 iterations, reload, resume, kill."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from selfee_fast.config import ConfigError, check_values, load_config
from selfee_fast.demo.tiny import build_tiny_llama, build_tokenizer
from selfee_fast.pipeline import run_pipeline

WORDS = "the cat dog sat ran on a mat log big small red blue one two three".split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


pytestmark = pytest.mark.usefixtures("chunked_backend")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("spa")
    rng = random.Random(0)
    prompts = [sentence(rng, 5) for _ in range(40)]
    tokenizer = build_tokenizer(prompts + [sentence(rng, 8) for _ in range(100)], root / "model", vocab_size=200)
    build_tiny_llama(root / "model", tokenizer, hidden_size=32, layers=2)
    with (root / "seed.jsonl").open("w") as f:
        for p in prompts[:8]:
            # A learnable preference: short answers about cats beat long ones about logs.
            f.write(json.dumps({"prompt": p, "chosen": "the cat sat", "rejected": "a big red log ran on a mat"}) + "\n")
    for k in (1, 2, 3):
        with (root / f"pool{k}.jsonl").open("w") as f:
            for p in prompts[8 * k : 8 * k + 8]:
                f.write(json.dumps({"prompt": p}) + "\n")
    return root


def write_config(root: Path, run_dir: str, **changes) -> Path:
    config = {
        "run_dir": str(root / run_dir),
        "model": {"path": str(root / "model"), "lora_r": 4, "lora_alpha": 8},
        "data": {
            "seed_pairs": str(root / "seed.jsonl"),
            "prompt_pools": [str(root / "pool1.jsonl"), str(root / "pool2.jsonl")],
            "max_length": 64,
            "max_prompt_length": 32,
        },
        "generation": {"max_new_tokens": 8, "batch_size": 4},
        "train": {"lr": 0.01, "batch_size": 4, "micro_batch_size": 2, "seed_epochs": 3, "save_every": 1},
        "spa": {"iterations": 2, "tau_window": 4, "alpha_warmup": 0.0},
    }
    for key, value in changes.items():
        section, name = key.split("__")
        config[section][name] = value
    path = root / f"{run_dir}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def finished_run(workspace):
    config = load_config(write_config(workspace, "run"))
    summary = run_pipeline(config, log=lambda *_: None)
    return workspace / "run", summary


def test_every_stage_writes_its_outputs(finished_run):
    run_dir, summary = finished_run
    assert list(summary["stages"]) == ["stage0", "iter1", "iter2"]
    for i in (1, 2):
        pairs = read_jsonl(run_dir / f"iter{i}" / "pairs.jsonl")
        assert len(pairs) == 8, "a pair for every prompt"
        for p in pairs:
            assert p["chosen_score"] >= p["rejected_score"]
            assert 0.5 <= p["confidence"] <= 1.0
            assert set(p) >= {"prompt", "chosen", "rejected"}  # TRL's columns
        flags = read_jsonl(run_dir / f"iter{i}" / "train" / "flags.jsonl")
        assert sorted(f["pair"] for f in flags) == sorted(p["location"] for p in pairs), "one flag per pair and epoch"
    assert json.loads((run_dir / "summary.json").read_text())["stages"]["iter2"]["lambda"] == 0.25
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["beta"] == 0.1


def test_seed_loss_is_finite_and_decreases(finished_run):
    run_dir, _ = finished_run
    losses = [r["loss"] for r in read_jsonl(run_dir / "stage0" / "train" / "metrics.jsonl")]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert losses[-1] < losses[0] - 0.05
    iteration = read_jsonl(run_dir / "iter1" / "train" / "metrics.jsonl")
    # tau comes from the margins of earlier micro-batches: none at the first step, then alpha applies.
    assert iteration[0]["spa/tau"] is None and iteration[0]["spa/alpha"] == 0.0
    assert all(r["spa/alpha"] == 0.1 for r in iteration if r["spa/tau"] is not None)
    assert any(r["spa/tau"] is not None for r in iteration)


def test_outputs_reload_with_plain_transformers_and_peft(finished_run, workspace):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = finished_run
    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "iter2" / "model")
    ids = tokenizer("the cat sat", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, run_dir / "iter2" / "model")
        after = tuned(ids).logits
    assert not torch.allclose(before, after), "training changed the model"


def test_rerun_skips_finished_stages_and_refuses_changed_config(finished_run, workspace):
    run_dir, _ = finished_run
    stamp = (run_dir / "iter2" / "done.json").stat().st_mtime_ns
    messages = []
    run_pipeline(load_config(write_config(workspace, "run")), log=messages.append)
    assert messages == [
        "stage0: finished earlier, skipped",
        "iter1: finished earlier, skipped",
        "iter2: finished earlier, skipped",
    ]
    assert (run_dir / "iter2" / "done.json").stat().st_mtime_ns == stamp
    effective = (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="started with another configuration"):
        run_pipeline(load_config(write_config(workspace, "run", train__lr=0.02)), log=lambda *_: None)
    assert (run_dir / "config.yaml").read_text() == effective, "a refused run leaves the saved config alone"
    # An unfinished stage is held to the configuration it started with, too.
    done = run_dir / "iter1" / "done.json"
    saved = done.read_text()
    done.unlink()
    try:
        with pytest.raises(ConfigError, match=r"iter1 was started with another configuration"):
            changed = write_config(workspace, "run", generation__temperature=1.5)
            run_pipeline(load_config(changed), log=lambda *_: None)
    finally:
        done.write_text(saved)


def test_no_seed_mode_starts_from_the_model_and_judges_against_a_base(workspace, tmp_path):
    """data.seed_pairs null: no stage 0; the judge's reference is model.judge_base, another model."""
    import shutil

    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(workspace / "model", base)
    other = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other.save_pretrained(base)
    config = load_config(
        write_config(workspace, "noseed", data__seed_pairs=None), ["spa.iterations=1", f"model.judge_base={base}"]
    )
    summary = run_pipeline(config, log=lambda *_: None)
    assert list(summary["stages"]) == ["iter1"] and not (workspace / "noseed" / "stage0").exists()
    pairs = read_jsonl(workspace / "noseed" / "iter1" / "pairs.jsonl")
    assert len(pairs) == 8 and any(p["chosen_score"] != 0 for p in pairs), "scored against a different model"
    for reference in ("init", "previous"):
        with pytest.raises(ConfigError, match=r"set model\.judge_base"):
            overrides = ["spa.iterations=1", f"spa.judge_reference={reference}"]
            run_pipeline(load_config(write_config(workspace, "noseed2", data__seed_pairs=None), overrides))


@pytest.mark.usefixtures("finished_run")
def test_a_single_step_is_held_to_the_stage_configuration(workspace):
    """`selfee-fast generate/judge/train --stage` refuse a stage begun with another configuration."""
    from selfee_fast.cli import main
    from selfee_fast.stages import claim_stage, parse_stage

    config = load_config(write_config(workspace, "run"))
    claim_stage(config, parse_stage(config, "iter1"), "")  # the configuration it ran with: accepted
    changed = write_config(workspace, "run", generation__temperature=1.5)
    with pytest.raises(ConfigError, match=r"iter1 was started with another configuration .*generation\.temperature"):
        claim_stage(load_config(changed), parse_stage(config, "iter1"), "")
    assert main(["generate", str(changed), "--stage", "iter1"]) == 2
    fresh = load_config(write_config(workspace, "steps"), ["spa.iterations=1"])
    claim_stage(fresh, parse_stage(fresh, "stage0"), "")
    assert (workspace / "steps" / "stage0" / "started.json").exists(), "recorded for a later `run`"


def test_unknown_config_key_suggests_the_nearest(workspace):
    with pytest.raises(ConfigError, match=r"unknown config key train\.learning_rat; did you mean train\.lr"):
        load_config(write_config(workspace, "bad"), ["train.learning_rat=1"])
    with pytest.raises(ConfigError, match=r"train\.batch_size must be int"):
        load_config(write_config(workspace, "bad"), ["train.batch_size=big"])
    with pytest.raises(ConfigError, match="one disjoint prompt pool per iteration"):
        run_pipeline(load_config(write_config(workspace, "bad"), ["spa.iterations=3"]))
    with pytest.raises(
        ConfigError, match=r"train\.lr must be a positive number or null \(the mode's default\), got nan"
    ):
        run_pipeline(load_config(write_config(workspace, "bad"), ["train.lr=nan"]))
    with pytest.raises(ConfigError, match=r"train\.batch_size must be >= 1, got 0"):
        run_pipeline(load_config(write_config(workspace, "bad"), ["train.batch_size=0"]))
    with pytest.raises(ConfigError, match=r"model\.attention must be one of \('auto', 'sdpa'"):
        run_pipeline(load_config(write_config(workspace, "bad"), ["model.attention=flash"]))


def test_full_finetuning_mode(workspace):
    """lora_r = 0: the policy trains every weight; pi_init and pi_{i-1} are frozen copies."""
    from transformers import AutoModelForCausalLM

    messages = []
    config = load_config(write_config(workspace, "full", model__lora_r=0, train__seed_epochs=1), ["spa.iterations=1"])
    run_pipeline(config, log=messages.append)
    assert any(m.startswith("full fine-tuning of") and "GiB" in m for m in messages), "memory is stated up front"
    run_dir = workspace / "full"
    assert len(read_jsonl(run_dir / "iter1" / "pairs.jsonl")) == 8
    assert all(math.isfinite(r["loss"]) for r in read_jsonl(run_dir / "iter1" / "train" / "metrics.jsonl"))
    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    tuned = AutoModelForCausalLM.from_pretrained(run_dir / "iter1" / "model")  # a whole model, no adapter
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, tuned(ids).logits)


def test_reward_model_judge_baseline(workspace):
    """spa.judge=reward_model: iterative DPO labelled by a reward model fit to the seed (the paper's baseline)."""
    config = load_config(
        write_config(workspace, "rm", train__seed_epochs=1),
        ["spa.iterations=1", "spa.judge=reward_model", "spa.refine=false", "spa.reward_model_epochs=2"],
    )
    run_pipeline(config, log=lambda *_: None)
    run_dir = workspace / "rm"
    meta = json.loads((run_dir / "reward_model" / "reward_model.json").read_text())
    assert meta["pairs"] == 8 and 0.0 <= meta["last_epoch_accuracy"] <= 1.0
    pairs = read_jsonl(run_dir / "iter1" / "pairs.jsonl")
    assert len(pairs) == 8
    assert all(p["chosen_score"] >= p["rejected_score"] and p["chosen_logp_policy"] is None for p in pairs)
    losses = [r["loss"] for r in read_jsonl(run_dir / "iter1" / "train" / "metrics.jsonl")]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # the reference forward is pi_{i-1} itself
    # The fitted model is reused while its settings hold, and fit again when they change.
    from transformers import AutoTokenizer

    from selfee_fast.reward_model import fit_to_seed

    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    messages = []
    fit_to_seed(config, tokenizer, messages.append)
    assert messages[-1].startswith("reward model: found in")
    changed = load_config(write_config(workspace, "rm", train__seed_epochs=1),
                          ["spa.iterations=1", "spa.judge=reward_model", "spa.refine=false",
                           "spa.reward_model_epochs=1"])  # fmt: skip
    fit_to_seed(changed, tokenizer, messages.append)
    assert any("fitting it again" in m for m in messages)
    assert json.loads((run_dir / "reward_model" / "reward_model.json").read_text())["settings"]["epochs"] == 1
    with pytest.raises(ConfigError, match=r"spa\.judge must be"):
        run_pipeline(load_config(write_config(workspace, "rm2"), ["spa.judge=oracle"]))


def test_previous_iterate_judge_reference(workspace):
    """spa.judge_reference=previous (the paper's ablation): iteration i judges pi_{i-1} against
    pi_{i-2}; at iteration 1 that is pi_init. Rewards are not all zero."""
    config = load_config(write_config(workspace, "previous", train__seed_epochs=1), ["spa.judge_reference=previous"])
    messages = []
    run_pipeline(config, log=messages.append)
    run_dir = workspace / "previous"
    assert f"iter1: judging against the iterate before pi_0: {workspace / 'model'}" in messages
    assert f"iter2: judging against the iterate before pi_1: {run_dir / 'stage0' / 'model'}" in messages
    for stage in ("iter1", "iter2"):
        pairs = read_jsonl(run_dir / stage / "pairs.jsonl")
        assert len(pairs) == 8 and any(p["chosen_score"] != 0.0 for p in pairs), stage


def test_a_packed_run_trains_without_padding(workspace):
    config = load_config(
        write_config(workspace, "packed", train__seed_epochs=1), ["spa.iterations=1", "model.packing=true"]
    )
    run_pipeline(config, log=lambda *_: None)
    for stage in ("stage0", "iter1"):
        metrics = read_jsonl(workspace / "packed" / stage / "train" / "metrics.jsonl")
        assert metrics and all(m["padding"] == 0.0 and math.isfinite(m["loss"]) for m in metrics), stage
    assert len(read_jsonl(workspace / "packed" / "iter1" / "pairs.jsonl")) == 8


def test_stage_fingerprints_are_stable():
    """Run folders remember these; a change makes every existing run refuse to resume.

    Settings at their default do not enter the hash, so adding a setting keeps them. Change
    the expected values only together with a note that old runs need --force.
    """
    from selfee_fast.stages import stage_fingerprints

    overrides = ["model.path=/models/m", "data.seed_pairs=seed.jsonl", "data.prompt_pools=[a.jsonl,b.jsonl]",
                 "spa.iterations=2", "train.lr=1e-6"]  # fmt: skip
    # Changed on 2026-11-27 (iterations no longer hashed): iteration prints of runs that set
    # spa.iterations changed once; such runs need --force.
    assert stage_fingerprints(load_config(None, overrides)) == {
        "stage0": "a5c9ee44af5fab5e", "iter1": "c3276031967a473f", "iter2": "0d3ce91dd564903e",
    }  # fmt: skip
    # Writing a default out explicitly is the same configuration.
    explicit = load_config(None, [*overrides, "train.beta=0.1", "generation.backend=hf"])
    assert stage_fingerprints(explicit) == stage_fingerprints(load_config(None, overrides))
    # How the work is laid out is not part of it: a run may switch packing or attention and resume.
    layout = load_config(None, [*overrides, "model.packing=true", "model.attention=eager", "train.save_every=7",
                                "generation.vllm_gpu_memory_utilization=0.5"])  # fmt: skip
    assert stage_fingerprints(layout) == stage_fingerprints(load_config(None, overrides))
    # A finished run can be extended: a third iteration leaves the first two as they were.
    base = stage_fingerprints(load_config(None, overrides))
    longer = load_config(None, [*overrides, "spa.iterations=3", "data.prompt_pools=[a.jsonl,b.jsonl,c.jsonl]"])
    assert stage_fingerprints(longer) == {**base, "iter3": stage_fingerprints(longer)["iter3"]}
    # Each iteration hashes its own lambda: changing the second changes iter2, not iter1.
    other_lam = stage_fingerprints(load_config(None, [*overrides, "spa.extrapolate=[0.5,0.3]"]))
    assert other_lam["iter1"] == base["iter1"] and other_lam["iter2"] != base["iter2"]


def test_a_run_on_a_folder_in_use_is_refused_at_once(workspace, capsys):
    """`run` and the single-step commands take the run folder's lock; a held folder is refused, naming the holder."""
    from selfee_fast.cli import main
    from selfee_fast.files import run_folder_lock

    config = write_config(workspace, "busy", data__prompt_pools=["missing1.jsonl", "missing2.jsonl"])
    with run_folder_lock(workspace / "busy", "selfee-fast run"):  # refused before the data is even read
        started = time.perf_counter()
        assert main(["run", str(config)]) == 2
        assert main(["train", str(config), "--stage", "stage0"]) == 2
        assert time.perf_counter() - started < 10
    err = capsys.readouterr().err
    assert err.count(f"is in use by process {os.getpid()} (selfee-fast run") == 2
    assert sorted(p.name for p in (workspace / "busy").iterdir()) == [".lock"], "nothing else written"


@pytest.mark.parametrize(("sig", "where"), [(signal.SIGINT, "training"), (signal.SIGTERM, "generation")])
def test_ctrl_c_and_sigterm_stop_at_a_boundary_and_the_rerun_resumes(workspace, sig, where):
    """The first signal finishes the step (or batch), saves, exits 130 naming the resume; the rerun finishes."""
    run = f"stopped_{sig.name.lower()}"
    # Enough seed steps that the signal, sent once two are logged, cannot arrive after the stage ends.
    config = write_config(workspace, run, train__save_every=1000, train__seed_epochs=20, generation__batch_size=2)
    metrics = workspace / run / "stage0" / "train" / "metrics.jsonl"
    generations = workspace / run / "iter1" / "generations.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "selfee_fast", "run", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        ready = metrics.exists() and metrics.read_text().count("\n") >= 2
        if where == "generation":
            ready = generations.exists() and generations.read_text().count("\n") >= 2
        if ready:
            process.send_signal(sig)
            break
        time.sleep(0.01)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert f"stopped on {sig.name} after {where}" in err and "to resume" in err
    if where == "training":
        latest = (workspace / run / "stage0" / "train" / "latest").read_text().strip()
        step = int(latest.removeprefix("checkpoint-"))
        assert step == len(read_jsonl(metrics)) >= 2, "the checkpoint holds the last finished step"
    else:
        done = len(read_jsonl(generations))
        assert done % 2 == 0 and 0 < done < 8, "stopped at a batch boundary of 2 prompts"
    messages = []
    run_pipeline(load_config(config), log=messages.append)
    if where == "training":
        assert any(m.startswith(f"train: resuming at step {step}/") for m in messages)
    else:
        assert any("generation: resuming" in m for m in messages)
    assert (workspace / run / "iter2" / "done.json").exists()


def test_damaged_state_files_are_named_and_a_short_pairs_file_is_rebuilt(finished_run, workspace):
    import shutil

    run_dir, _ = finished_run
    copy = workspace / "damaged"
    shutil.copytree(run_dir, copy)
    config = load_config(write_config(workspace, "damaged"))
    # A pairs file cut at a line boundary: still valid JSONL, but short.
    pairs_path = copy / "iter2" / "pairs.jsonl"
    lines = pairs_path.read_text().splitlines(keepends=True)
    pairs_path.write_text("".join(lines[:3]))
    (copy / "iter2" / "done.json").unlink()
    messages = []
    run_pipeline(config, log=messages.append)
    assert any(f"{pairs_path} holds 3 pairs for 8 judged prompts: judging again" in m for m in messages)
    assert len(read_jsonl(pairs_path)) == 8
    # A pairs file of the right prompts but other responses: judged again too.
    pairs = read_jsonl(pairs_path)
    pairs[0]["chosen_ids"] = [1, 2, 3]
    pairs_path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (copy / "iter2" / "done.json").unlink()
    run_pipeline(config, log=messages.append)
    assert any("is not made of that prompt's generations: judging again" in m for m in messages)
    assert read_jsonl(pairs_path)[0]["chosen_ids"] != [1, 2, 3]
    # A garbled done.json: a clear message naming the file and the fix.
    (copy / "stage0" / "done.json").write_text('{"fingerprint": "ab')
    with pytest.raises(ConfigError, match=r"stage0/done\.json is damaged .*delete it and rerun"):
        run_pipeline(config, log=messages.append)
    (copy / "stage0" / "done.json").unlink()
    run_pipeline(config, log=messages.append)  # the fix works: stage 0 is found finished and recorded again
    assert json.loads((copy / "stage0" / "done.json").read_text())["fingerprint"]


def assert_same_results(run_dir: Path, reference_dir: Path) -> None:
    from safetensors.torch import load_file

    for stage in ("iter1", "iter2"):
        resumed, reference = (
            read_jsonl(run_dir / stage / "pairs.jsonl"),
            read_jsonl(reference_dir / stage / "pairs.jsonl"),
        )
        assert [p["index"] for p in resumed] == [p["index"] for p in reference], "no record lost or duplicated"
        assert [p["chosen_ids"] for p in resumed] == [p["chosen_ids"] for p in reference]
        metrics = [read_jsonl(d / stage / "train" / "metrics.jsonl") for d in (run_dir, reference_dir)]
        assert [m["step"] for m in metrics[0]] == [m["step"] for m in metrics[1]], "no step lost or duplicated"
        assert [m["loss"] for m in metrics[0]] == pytest.approx([m["loss"] for m in metrics[1]], rel=1e-6)
    resumed = load_file(run_dir / "iter2" / "model" / "adapter_model.safetensors")
    reference = load_file(reference_dir / "iter2" / "model" / "adapter_model.safetensors")
    for name, weight in resumed.items():
        torch.testing.assert_close(weight, reference[name], rtol=1e-6, atol=1e-7)


def kill_moments(run_dir: Path) -> dict:
    """Moments to SIGKILL a run at, each a condition on what it has written so far."""

    def written(stage: str, pattern: str):
        return lambda: any((run_dir / stage).glob(pattern))

    moments = {}
    for stage in ("stage0", "iter1", "iter2"):
        moments[f"{stage} training"] = written(stage, "train/metrics.jsonl")
        moments[f"{stage} checkpoint write"] = written(stage, "train/.checkpoint-*.tmp")
        moments[f"{stage} model save"] = written(stage, "model.tmp")
        moments[f"{stage} finished"] = written(stage, "done.json")
    for stage in ("iter1", "iter2"):
        moments[f"{stage} generation"] = written(stage, "generations.jsonl")
        moments[f"{stage} judging"] = written(stage, "pairs.jsonl.partial")
    return moments


@pytest.mark.slow
def test_twenty_random_kills_change_nothing(finished_run, workspace):
    """SIGKILL at 20 or more random moments over generation, judging, training, checkpoint writes and model
    saves, each followed by a rerun: every finished run equals the uninterrupted one, no record lost or doubled."""
    import random
    import shutil

    reference_dir, _ = finished_run
    config, run_dir = write_config(workspace, "fault"), workspace / "fault"
    command = [sys.executable, "-m", "selfee_fast", "run", str(config)]
    moments = kill_moments(run_dir)
    rng, kills, finished = random.Random(1234), {}, 0
    for _ in range(120):
        if sum(kills.values()) >= 20:
            break
        if (run_dir / "iter2" / "done.json").exists():
            assert_same_results(run_dir, reference_dir)
            finished += 1
            shutil.rmtree(run_dir)  # start another run, to kill it in other places
        name = rng.choice(sorted(moments))
        if moments[name]():
            continue  # that moment has passed in this run
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while process.poll() is None and time.time() < deadline:
            if moments[name]():
                process.send_signal(signal.SIGKILL)
                kills[name] = kills.get(name, 0) + 1
                break
            time.sleep(0.001)
        process.wait(timeout=120)
        assert process.returncode in (0, -signal.SIGKILL)
    assert sum(kills.values()) >= 20, kills
    assert subprocess.run(command, capture_output=True).returncode == 0
    assert_same_results(run_dir, reference_dir)
    kinds = {name.split(" ", 1)[1] for name in kills}
    assert {"generation", "judging", "training"} <= kinds, f"kills spread over the run: {kills}"
    print(f"{sum(kills.values())} kills survived, {finished + 1} runs compared: {kills}")


def test_a_damaged_stage_model_is_found_and_saved_again(finished_run, workspace):
    import shutil

    run_dir, _ = finished_run
    copy = workspace / "damaged_model"
    shutil.copytree(run_dir, copy)
    weights = copy / "iter2" / "model" / "adapter_model.safetensors"  # the newest: what a rerun verifies
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 3])
    messages = []
    run_pipeline(load_config(write_config(workspace, "damaged_model")), log=messages.append)
    assert any(m.startswith("iter2: its saved model is damaged") and "adapter_model.safetensors" in m for m in messages)
    assert weights.read_bytes() == original, "saved again from the stage's last checkpoint, bit for bit"
    assert json.loads((copy / "iter2" / "model" / "checksums.json").read_text())["adapter_model.safetensors"]


def test_a_single_step_on_a_finished_stage_does_nothing_and_summary_matches_config(finished_run, workspace, capsys):
    import shutil

    from selfee_fast.cli import main

    run_dir, _ = finished_run
    copy = workspace / "finished_copy"
    shutil.copytree(run_dir, copy)
    config = write_config(workspace, "finished_copy")
    model = copy / "stage0" / "model" / "adapter_model.safetensors"
    before = model.stat().st_mtime_ns
    assert main(["train", str(config), "--stage", "stage0"]) == 0
    assert "stage0 is finished" in capsys.readouterr().out and model.stat().st_mtime_ns == before
    # Rerun with fewer iterations than the folder holds: summary.json and config.yaml describe the same run.
    run_pipeline(load_config(config, ["spa.iterations=1"]), log=lambda *_: None)
    assert list(json.loads((copy / "summary.json").read_text())["stages"]) == ["stage0", "iter1"]
    assert yaml.safe_load((copy / "config.yaml").read_text())["spa"]["iterations"] == 1


def test_consistency_smoothing_smooths_each_iteration_by_its_judges_disagreement(workspace):
    """spa.judge_consistency=smooth (CREAM): iteration 1's earlier judge is pi_init by its per-token
    likelihood, iteration 2's is pi_0 against pi_init; the labels are smoothed by 1 - agreement."""
    config = load_config(write_config(workspace, "consistency", train__seed_epochs=1),
                         ["spa.judge_consistency=smooth"])  # fmt: skip
    messages = []
    run_pipeline(config, log=messages.append)
    run_dir = workspace / "consistency"
    for stage in ("iter1", "iter2"):
        pairs = read_jsonl(run_dir / stage / "pairs.jsonl")
        trained = [p for p in pairs if p["chosen_ids"] != p["rejected_ids"]]
        agreement = sum(p["agreement"] for p in trained) / len(trained)
        assert all(0.0 <= p["agreement"] <= 1.0 for p in pairs), stage
        assert f"{stage}: the previous iteration's judge ranks the responses alike on {agreement:.3f}" in " ".join(
            messages
        )
        metrics = read_jsonl(run_dir / stage / "train" / "metrics.jsonl")
        assert metrics and all(m["label_smoothing"] == pytest.approx(1 - agreement) for m in metrics), stage
        done = json.loads((run_dir / stage / "done.json").read_text())
        assert done["trained_pairs"] == len(trained), "smoothing drops no pair"
    assert all(m["label_smoothing"] == 0.0 for m in read_jsonl(run_dir / "stage0" / "train" / "metrics.jsonl"))
    refused = load_config(
        write_config(workspace, "consistency2"), ["spa.judge_consistency=smooth", "spa.judge_reference=none"]
    )
    with pytest.raises(
        ConfigError, match=r"judge_consistency .* needs spa\.judge=implicit and spa\.judge_reference=init"
    ):
        run_pipeline(refused)


def test_consistency_smoothing_never_reaches_a_label_without_preference():
    from selfee_fast.pipeline import consistency_label_smoothing

    assert consistency_label_smoothing(0.8, 0.1) == pytest.approx(0.2)
    assert consistency_label_smoothing(0.55, 0.0) == pytest.approx(0.45)
    assert consistency_label_smoothing(0.55, 0.1) is None  # a flagged pair would be smoothed by 0.55
    assert consistency_label_smoothing(0.5, 0.0) is None
    assert consistency_label_smoothing(1.0, 0.1) == 0.0


def test_consistency_filter_drops_the_pairs_the_judges_order_oppositely(workspace):
    config = load_config(write_config(workspace, "consistency_filter", train__seed_epochs=1),
                         ["spa.judge_consistency=filter"])  # fmt: skip
    messages = []
    run_pipeline(config, log=messages.append)
    reversed_somewhere = False
    for stage in ("iter1", "iter2"):
        pairs = read_jsonl(workspace / "consistency_filter" / stage / "pairs.jsonl")
        different = [p for p in pairs if p["chosen_ids"] != p["rejected_ids"]]
        agreed = [p for p in different if p["agreement"] >= 0.5]
        metrics = read_jsonl(workspace / "consistency_filter" / stage / "train" / "metrics.jsonl")
        done = json.loads((workspace / "consistency_filter" / stage / "done.json").read_text())
        assert done["trained_pairs"] == len(agreed), stage
        assert all(m["label_smoothing"] == 0.0 for m in metrics), stage
        if len(agreed) < len(different):
            reversed_somewhere = True
            dropped = f"{stage}: {len(different) - len(agreed)} of {len(different)} pairs are ordered the other way"
            assert any(m.startswith(dropped) for m in messages), stage
    assert reversed_somewhere, "the test needs a pair the two judges order oppositely"


def test_the_stage0_consistency_judge_is_pi_0_from_iteration_3_and_changes_nothing_before(workspace, monkeypatch):
    """spa.consistency_judge=stage0: iteration 3 is checked by pi_0, not pi_1; switching back to
    CREAM's pi_{i-2} changes iteration 3's fingerprint alone, so --force redoes only it."""
    from selfee_fast import roles

    checkers = []
    original = roles.earlier_judge

    def recording(config, runtime, model, earlier):
        checkers.append(None if earlier is None else Path(earlier).relative_to(config.run_dir).parts[0])
        return original(config, runtime, model, earlier)

    monkeypatch.setattr(roles, "earlier_judge", recording)
    pools = f"data.prompt_pools=[{', '.join(str(workspace / f'pool{k}.jsonl') for k in (1, 2, 3))}]"
    three = ["spa.iterations=3", pools, "spa.judge_consistency=filter"]
    anchored = load_config(
        write_config(workspace, "anchored", train__seed_epochs=1), [*three, "spa.consistency_judge=stage0"]
    )
    messages = []
    run_pipeline(anchored, log=messages.append)
    assert checkers == [None, "stage0", "stage0"]  # iteration 1: pi_init's likelihood, nothing to load
    assert any(m.startswith("iter3: pi_0 (") for m in messages) and not any(
        m.startswith("iter2: pi_0 (") for m in messages
    )
    pairs = read_jsonl(workspace / "anchored" / "iter3" / "pairs.jsonl")
    assert all(0.0 <= p["agreement"] <= 1.0 for p in pairs)

    checkers.clear()
    messages.clear()
    previous = load_config(write_config(workspace, "anchored", train__seed_epochs=1), three)
    run_pipeline(previous, force=True, log=messages.append)
    assert checkers == ["iter1"]
    assert [m.split(":")[0] for m in messages if m.endswith("finished earlier, skipped")] == [
        "stage0",
        "iter1",
        "iter2",
    ]

    for refused, rule in (
        (["spa.consistency_judge=stage0"], "has no effect while spa.judge_consistency is none"),
        (["spa.consistency_judge=stage0", "spa.judge_consistency=filter", "data.seed_pairs=null",
          f"model.judge_base={workspace / 'model'}"], "trained on data.seed_pairs: set them"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=rule):
            check_values(load_config(write_config(workspace, "refused"), refused))


def test_full_finetuning_judges_with_the_earlier_iterate_as_a_model_of_its_own(workspace):
    """lora_r = 0: iteration 2's earlier judge is pi_0 loaded as a frozen model, not an adapter."""
    config = load_config(write_config(workspace, "full_filter", model__lora_r=0, train__seed_epochs=1),
                         ["spa.judge_consistency=filter"])  # fmt: skip
    messages = []
    run_pipeline(config, log=messages.append)
    for stage in ("iter1", "iter2"):
        pairs = read_jsonl(workspace / "full_filter" / stage / "pairs.jsonl")
        assert len(pairs) == 8 and all(0.0 <= p["agreement"] <= 1.0 for p in pairs), stage
        assert any(m.startswith(f"{stage}: the previous iteration's judge ranks") for m in messages), stage
