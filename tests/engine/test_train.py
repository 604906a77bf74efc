"""The training loop: length-grouped or packed micro-batches; checkpoints refused by name when settings change."""

import dataclasses
import json
import random
import weakref

import pytest
import torch

import selfee_fast.train as train_module
from selfee_fast import models
from selfee_fast.demo.tiny import build_tiny_llama, build_tokenizer
from selfee_fast.train import TrainPair, TrainSettings, train_stage

pytestmark = pytest.mark.usefixtures("chunked_backend")


def tiny_lora_model(tmp_path, *, layers: int = 1, gradient_checkpointing: bool = False):
    """A one-or-more-layer Llama with a LoRA adapter, four pairs, its pad id and eos id."""
    rng = random.Random(0)
    words = "the cat dog sat ran on a mat log".split()
    tokenizer = build_tokenizer([" ".join(rng.choice(words) for _ in range(8)) for _ in range(50)], tmp_path / "m",
                                vocab_size=120)  # fmt: skip
    build_tiny_llama(tmp_path / "m", tokenizer, hidden_size=32, layers=layers)
    model, _ = models.load_model(tmp_path / "m", lora=models.LoraSettings(r=4, alpha=8),
                                 gradient_checkpointing=gradient_checkpointing)  # fmt: skip
    ids, eos = tokenizer("the cat sat on a mat").input_ids, tokenizer.eos_token_id
    pairs = [TrainPair(f"p{i}", ids[:3], [*ids[3:], eos], [*ids[:2], eos]) for i in range(4)]
    return model, pairs, tokenizer.pad_token_id, eos


@pytest.fixture
def setup(tmp_path):
    return tiny_lora_model(tmp_path)


def train(model, pairs, pad_id, out_dir, **changes):
    settings = TrainSettings(lr=1e-3, batch_size=2, micro_batch_size=2, optimizer="adamw", save_every=1, **changes)
    return train_stage(model, pairs, settings, out_dir, pad_id=pad_id, reference="init", log=lambda *_: None)


def test_changed_settings_are_refused_by_name(setup, tmp_path):
    model, pairs, pad_id, _ = setup
    train(model, pairs, pad_id, tmp_path / "train")
    with pytest.raises(ValueError, match=r"other training settings: beta 0\.1 -> 0\.2"):
        train(model, pairs, pad_id, tmp_path / "train", beta=0.2)


def test_a_setting_added_or_removed_since_a_checkpoint_does_not_orphan_it(setup, tmp_path):
    model, pairs, pad_id, _ = setup
    train(model, pairs, pad_id, tmp_path / "train")
    latest = tmp_path / "train" / (tmp_path / "train" / "latest").read_text().strip() / "state.json"
    state = json.loads(latest.read_text())
    del state["settings"]["autocast_dtype"]  # as written before the field existed
    state["settings"]["label_smoothing"] = 0.0  # a setting since removed (it travels with each pair now)
    latest.write_text(json.dumps(state))
    train(model, pairs, pad_id, tmp_path / "train")  # resumes: the default is what the run used
    with pytest.raises(ValueError, match=r"autocast_dtype None -> 'bfloat16'"):
        train(model, pairs, pad_id, tmp_path / "train", autocast_dtype="bfloat16")


def test_micro_batches_are_grouped_by_length(setup, tmp_path, monkeypatch):
    model, _, pad_id, eos = setup
    rng = random.Random(0)
    # Lengths 3..26 in a shuffled order: random micro-batches of 2 would pad a lot.
    pairs = [TrainPair(f"p{n}", [5] * 2, [7] * n + [eos], [8] * n + [eos]) for n in range(2, 26)]
    rng.shuffle(pairs)
    seen = []
    real_collate = train_module.collate_pairs

    def spy(micro, pad_id, **options):
        seen.append(sorted(len(p.chosen) for p in micro))
        return real_collate(micro, pad_id, **options)

    monkeypatch.setattr(train_module, "collate_pairs", spy)
    settings = TrainSettings(lr=1e-3, batch_size=8, micro_batch_size=2, optimizer="adamw", save_every=100)
    train_stage(model, pairs, settings, tmp_path / "train", pad_id=pad_id, reference="init",
                log=lambda *_: None)  # fmt: skip
    assert sorted(n for micro in seen for n in micro) == sorted(len(p.chosen) for p in pairs), "every pair, once"
    for step in range(3):
        micros = seen[4 * step : 4 * step + 4]
        assert [m[0] for m in micros] == sorted(m[0] for m in micros), "ascending length within the step"
        flat = [n for m in micros for n in m]
        assert flat == sorted(flat)
    metrics = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").open()]
    assert all(0 <= m["padding"] < 0.2 for m in metrics), [m["padding"] for m in metrics]


def test_packed_micro_batches_train_like_padded_ones(setup, tmp_path):
    """One packed row per micro-batch: the same losses, SPA margins and weights as padded rows."""
    model, _, pad_id, eos = setup
    pairs = [TrainPair(f"p{n}", [5] * (1 + n % 3), [7] * n + [eos], [8] * (9 - n) + [eos]) for n in range(1, 9)]
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    runs = {}
    for packing in (False, True):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in start:
                    p.copy_(start[name])
        out = tmp_path / f"packing-{packing}"
        settings = TrainSettings(lr=1e-3, batch_size=4, micro_batch_size=2, optimizer="adamw", refine=True,
                                 tau_window=2, alpha_warmup=0.0, extrapolate=0.5, packing=packing)  # fmt: skip
        train_stage(model, pairs, settings, out, pad_id=pad_id, reference="init", log=lambda *_: None)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
        flags = [json.loads(line) for line in (out / "flags.jsonl").open()]
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if n in start}
        runs[packing] = metrics, flags, weights
    (padded_metrics, padded_flags, padded_weights), (packed_metrics, packed_flags, packed_weights) = runs.values()
    assert [m["padding"] for m in packed_metrics] == [0.0, 0.0] and padded_metrics[0]["padding"] > 0.1
    for a, b in zip(packed_metrics, padded_metrics, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "spa/flagged_fraction"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert [f["confident"] for f in packed_flags] == [f["confident"] for f in padded_flags]
    assert any(not f["confident"] for f in packed_flags), "SPA flagged something: its path ran"
    for name, weight in packed_weights.items():
        torch.testing.assert_close(weight, padded_weights[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(w, start[n]) for n, w in packed_weights.items()), "training moved the adapter"


def test_precomputed_reference_puts_each_value_on_its_sequences_first_scored_token():
    seq_ids = torch.tensor([[-1, 0, 0, -1, 1, -1, 2, 2, 2, -1, 3, -1]])
    tokens = train_module.precomputed_reference(seq_ids, [1.5, -2.0, 3.0, 4.0])
    assert tokens.tolist() == [[0, 1.5, 0, 0, -2.0, 0, 3.0, 0, 0, 0, 4.0, 0]]
    padded = torch.tensor([[-1, 0, 0, -1], [1, 1, 1, 1]])
    assert train_module.precomputed_reference(padded, [1.0, 2.0]).tolist() == [[0, 1.0, 0, 0], [2.0, 0, 0, 0]]


def test_a_resumed_run_may_switch_packing(setup, tmp_path):
    model, pairs, pad_id, _ = setup
    train(model, pairs, pad_id, tmp_path / "train")
    train(model, pairs, pad_id, tmp_path / "train", packing=True)  # layout only: it resumes


def test_schedule_warmup_of_alpha_and_checkpoint_contents(setup, tmp_path):
    """lr: linear warm-up then cosine; alpha_t: 0 for the first alpha_warmup of the steps, then
    alpha (once tau exists); a checkpoint holds weights, optimizer, scheduler, RNG, tau's window, step."""
    model, _, pad_id, eos = setup
    pairs = [TrainPair(f"p{n}", [5, 6], [7] * (1 + n % 4) + [eos], [8] * (1 + n % 3) + [eos]) for n in range(20)]
    settings = TrainSettings(lr=1e-3, batch_size=2, micro_batch_size=1, optimizer="adamw", warmup_ratio=0.2,
                             refine=True, alpha=0.1, alpha_warmup=0.3, tau_window=2, save_every=4)  # fmt: skip
    out = tmp_path / "train"
    train_stage(model, pairs, settings, out, pad_id=pad_id, reference="init", log=lambda *_: None)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert len(metrics) == 10
    factor = train_module.cosine_with_warmup(10, 0.2)
    assert [m["lr"] for m in metrics] == pytest.approx([1e-3 * factor(s) for s in range(10)])
    assert [m["lr"] for m in metrics[:2]] == pytest.approx([5e-4, 1e-3]) and metrics[-1]["lr"] < 1e-4
    assert [m["spa/alpha"] for m in metrics] == [0.0] * 3 + [0.1] * 7  # 30% of 10 steps
    # The last two checkpoints (steps 8 and 10, saving every 4 and at the end), each with its checksum manifest.
    older, checkpoint = sorted(out.glob("checkpoint-*"))
    assert older.name == "checkpoint-0000008"
    assert (out / "latest").read_text().strip() == checkpoint.name == "checkpoint-0000010"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == 10 and len(state["threshold"]["margins"]) == 2
    assert state["sha256"]["optimizer.pt"] == train_module.sha256_of(checkpoint / "optimizer.pt")
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    assert saved["scheduler"]["last_epoch"] == 10 and saved["optimizer"]["state"]
    assert torch.equal(torch.load(checkpoint / "rng.pt", weights_only=False)["cpu"], torch.get_rng_state())
    from safetensors.torch import load_file

    weights = load_file(checkpoint / "trainable.safetensors")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert weights.keys() == trainable.keys()
    assert all(torch.equal(weights[n], p.detach()) for n, p in trainable.items())


def test_micro_batches_sum_to_the_batch_gradient_and_clipping_bounds_the_step(setup, tmp_path):
    model, _, pad_id, eos = setup
    pairs = [TrainPair(f"p{n}", [5, 6], [7] * (1 + n % 4) + [eos], [8] * (1 + n % 3) + [eos]) for n in range(4)]
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    final = {}
    for micro, clip in ((4, 1e9), (1, 1e9), (1, 1e-3)):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in start:
                    p.copy_(start[name])
        out = tmp_path / f"m{micro}-c{clip}"
        settings = TrainSettings(lr=1e-2, batch_size=4, micro_batch_size=micro, optimizer="adamw",
                                 max_grad_norm=clip, warmup_ratio=0.0, save_every=1)  # fmt: skip
        train_stage(model, pairs, settings, out, pad_id=pad_id, reference="init", log=lambda *_: None)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
        # Adam's first moment after one step is (1 - beta1) * the gradient it was given.
        state = torch.load(out / "checkpoint-0000001" / "optimizer.pt", weights_only=False)["optimizer"]["state"]
        given = 10 * torch.cat([s["exp_avg"].reshape(-1) for s in state.values()]).norm()
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if n in start}
        final[(micro, clip)] = (weights, metrics, float(given))
    (whole, whole_metrics, whole_given), (accumulated, accumulated_metrics, _), (_, clipped_metrics, clipped_given) = (
        final.values()
    )
    assert accumulated_metrics[0]["loss"] == pytest.approx(whole_metrics[0]["loss"], rel=1e-6)
    assert accumulated_metrics[0]["grad_norm"] == pytest.approx(whole_metrics[0]["grad_norm"], rel=1e-5)
    for name, weight in accumulated.items():
        torch.testing.assert_close(weight, whole[name], rtol=1e-5, atol=1e-7)
    # The logged norm is the one before clipping; the optimizer got the clipped gradient.
    assert clipped_metrics[0]["grad_norm"] == pytest.approx(whole_metrics[0]["grad_norm"], rel=1e-5)
    assert whole_given == pytest.approx(whole_metrics[0]["grad_norm"], rel=1e-4)
    assert clipped_given == pytest.approx(1e-3, rel=1e-3) and whole_given > 1e-2


def test_every_metric_goes_to_tensorboard_when_it_is_installed(setup, tmp_path, monkeypatch):
    """TensorBoard is an optional extra (not in CI): a stand-in writer receives what it would."""
    model, pairs, pad_id, _ = setup

    class Writer:
        def __init__(self):
            self.scalars, self.closed = [], False

        def add_scalar(self, name, value, step):
            self.scalars.append((name, value, step))

        def close(self):
            self.closed = True

    writer = Writer()
    monkeypatch.setattr(train_module, "tensorboard_writer", lambda out_dir: writer)
    train(model, pairs, pad_id, tmp_path / "train")
    metrics = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").open()]
    logged = {(name, step) for name, _, step in writer.scalars}
    for record in metrics:
        for name in (
            "loss",
            "lr",
            "grad_norm",
            "rewards/margins",
            "rewards/accuracies",
            "tokens_per_s",
            "peak_memory_mib",
        ):
            assert (name, record["step"]) in logged, (name, record["step"])
    assert writer.closed


def test_chosen_nll_is_the_per_token_mean_over_chosen_responses():
    from selfee_fast.train import chosen_nll

    logps = torch.tensor(
        [[0.0, -1.0, -3.0], [0.0, -2.0, 0.0], [-5.0, -5.0, -5.0], [0.0, 0.0, -7.0]], dtype=torch.float64
    )
    seq_ids = torch.tensor([[-1, 0, 0], [-1, 1, -1], [2, 2, 2], [-1, -1, 3]])  # rows 0-1 chosen, 2-3 rejected
    assert float(chosen_nll(logps, seq_ids, num_pairs=2)) == pytest.approx(((1 + 3) / 2 + 2) / 2)


def test_nll_term_changes_the_update(setup, tmp_path):
    model, pairs, pad_id, _ = setup
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(model, pairs, pad_id, tmp_path / "plain")
    plain = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(before[n])
    train(model, pairs, pad_id, tmp_path / "rpo", nll_alpha=1.0)
    moved = max(float((p - plain[n]).abs().max()) for n, p in model.named_parameters() if p.requires_grad)
    assert moved > 1e-6


@pytest.mark.parametrize("damage", ["truncate", "garble_state", "delete_rng"])
def test_a_damaged_checkpoint_is_named_and_the_one_before_is_used(setup, tmp_path, damage):
    model, pairs, pad_id, _ = setup
    out = tmp_path / "train"
    logs = []
    settings = TrainSettings(lr=1e-3, batch_size=2, micro_batch_size=2, optimizer="adamw", save_every=1)
    train_stage(model, pairs, settings, out, pad_id=pad_id, reference="init", log=logs.append)
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-0000001", "checkpoint-0000002"], "the last two are kept"
    latest = checkpoints[-1]
    if damage == "truncate":
        data = (latest / "trainable.safetensors").read_bytes()
        (latest / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "garble_state":
        (latest / "state.json").write_text('{"step": 2, "thresh')
    else:
        (latest / "rng.pt").unlink()
    logs.clear()
    step = train_module.restore_checkpoint(out, model, [n for n, p in model.named_parameters() if p.requires_grad],
                                           train_module.make_optimizer([p for p in model.parameters() if p.requires_grad], settings),
                                           torch.optim.lr_scheduler.LambdaLR(train_module.make_optimizer(
                                               [p for p in model.parameters() if p.requires_grad], settings), lambda s: 1.0),
                                           train_module.NoiseThreshold(window=50, percentile=0.1), settings, log=logs.append)  # fmt: skip
    assert step == 1
    assert len(logs) == 1 and f"checkpoint {latest.name} is damaged" in logs[0] and str(latest) in logs[0]


def test_with_every_checkpoint_damaged_the_stage_trains_from_its_first_step(setup, tmp_path):
    model, pairs, pad_id, _ = setup
    out = tmp_path / "train"
    settings = TrainSettings(lr=1e-3, batch_size=2, micro_batch_size=2, optimizer="adamw", save_every=1)
    train_stage(model, pairs, settings, out, pad_id=pad_id, reference="init", log=lambda *_: None)
    for checkpoint in out.glob("checkpoint-*"):
        (checkpoint / "optimizer.pt").write_bytes(b"")
    logs = []
    train_stage(model, pairs, settings, out, pad_id=pad_id, reference="init", log=logs.append)
    assert any("training this stage from its first step" in m for m in logs)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_disk_that_fills_during_a_checkpoint_leaves_the_previous_one_and_the_rerun_resumes(
    setup, tmp_path, monkeypatch
):
    from selfee_fast.files import WriteFailed

    model, pairs, pad_id, _ = setup
    out = tmp_path / "train"
    settings = TrainSettings(lr=1e-3, batch_size=2, micro_batch_size=2, optimizer="adamw", save_every=1)
    real_save, saves = torch.save, []

    def save_until_full(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) > 2:  # the second checkpoint's first torch.save: the disk is full
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 69120 vs 69008")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train_module.torch, "save", save_until_full)
    with pytest.raises(WriteFailed, match=r"cannot write .*checkpoint-0000002: the disk is full"):
        train_stage(model, pairs, settings, out, pad_id=pad_id, reference="init", log=lambda *_: None)
    monkeypatch.setattr(train_module.torch, "save", real_save)
    assert [c.name for c in out.glob("checkpoint-*")] == ["checkpoint-0000001"]
    logs = []
    train_stage(model, pairs, settings, out, pad_id=pad_id, reference="init", log=logs.append)
    assert "train: resuming at step 1/2" in logs


def test_a_garbled_metrics_line_is_dropped_and_named_not_the_lines_after_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n{"step": 4}\n{"step": 5')
    logs = []
    train_module.truncate_metrics(path, 4, log=logs.append)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 3, 4]
    assert logs == [f"train: {path}: 2 garbled line(s) dropped (line 2, 5)"]


@pytest.mark.parametrize("bad_steps", [1, 3])
def test_non_finite_steps_are_skipped_and_counted_until_too_many_in_a_row(setup, tmp_path, monkeypatch, bad_steps):
    model, pairs, pad_id, _ = setup
    real_loss, calls = train_module.spa_loss, []

    def poisoned(*args, **kwargs):
        result = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) <= bad_steps:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(train_module, "spa_loss", poisoned)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    logs = []
    settings = TrainSettings(lr=1e-3, batch_size=1, micro_batch_size=1, optimizer="adamw", save_every=100, epochs=1)
    if bad_steps >= settings.max_nonfinite_steps:
        with pytest.raises(FloatingPointError, match=r"3 steps in a row were not finite, stopping\. Likely causes"):
            train_stage(model, pairs, settings, tmp_path / "t", pad_id=pad_id, reference="init", log=logs.append)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
        return
    train_stage(model, pairs, settings, tmp_path / "t", pad_id=pad_id, reference="init", log=logs.append)
    metrics = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [m["nonfinite_steps_skipped"] for m in metrics] == [1, 1, 1, 1]
    assert any("step 1: loss nan" in m and "step skipped (1 in a row" in m for m in logs)


def test_a_stage_without_refinement_resumes_whatever_the_refinement_settings(setup, tmp_path):
    """Stage 0's fingerprint leaves spa.* out, so its checkpoint must not refuse a changed tau window."""
    model, pairs, pad_id, _ = setup
    train(model, pairs, pad_id, tmp_path / "train", tau_window=50)
    train(model, pairs, pad_id, tmp_path / "train", tau_window=8)  # resumes
    train(model, pairs, pad_id, tmp_path / "refined", tau_window=50, refine=True)
    with pytest.raises(ValueError, match=r"tau_window 50 -> 8"):  # with refinement it matters
        train(model, pairs, pad_id, tmp_path / "refined", tau_window=8, refine=True)


def test_the_count_of_skipped_steps_survives_a_resume(setup, tmp_path, monkeypatch):
    import shutil

    model, pairs, pad_id, _ = setup
    real_loss, calls = train_module.spa_loss, []

    def poisoned(*args, **kwargs):
        result = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(train_module, "spa_loss", poisoned)
    settings = TrainSettings(lr=1e-3, batch_size=1, micro_batch_size=1, optimizer="adamw", save_every=1)
    out = tmp_path / "t"
    train_stage(model, pairs, settings, out, pad_id=pad_id, reference="init", log=lambda *_: None)
    shutil.rmtree(out / "checkpoint-0000004")  # as if killed before step 4 was saved: resume at step 3
    train_stage(model, pairs, settings, out, pad_id=pad_id, reference="init", log=lambda *_: None)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["nonfinite_steps_skipped"] for m in metrics] == [1, 1, 1, 1]


def test_a_micro_batch_holds_nothing_of_the_one_before_it(tmp_path):
    """With checkpointing the embedding's output is a leaf that gets a gradient; the previous
    micro-batch's graph must not keep it (and the gradient) alive through the next forward."""
    model, pairs, pad_id, _ = tiny_lora_model(tmp_path, layers=2, gradient_checkpointing=True)
    previous, alive_at_next_forward = [], []

    def watch(_module, _inputs, output):
        if torch.is_grad_enabled():  # the policy's forward, not the reference's
            if previous:
                alive_at_next_forward.append(previous[-1]() is not None)
            previous.append(weakref.ref(output))

    model.get_input_embeddings().register_forward_hook(watch)
    settings = TrainSettings(lr=1e-3, batch_size=2, micro_batch_size=1, optimizer="adamw", save_every=10)
    train_stage(model, pairs, settings, tmp_path / "out", pad_id=pad_id, reference="init", log=lambda *_: None)
    assert len(alive_at_next_forward) == 3 and not any(alive_at_next_forward)


def test_each_pairs_label_smoothing_reaches_the_loss(setup, tmp_path):
    """At step 1 the policy is its reference (LoRA's B starts at zero), so a pair's loss gradient is
    beta (2e - 1) / 2: labels smoothed by 0.2 scale the first gradient by 1 - 2 * 0.2."""
    model, pairs, pad_id, _ = setup
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(model, pairs, pad_id, tmp_path / "plain")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(initial[n])
    train(model, [dataclasses.replace(p, label_smoothing=0.2) for p in pairs], pad_id, tmp_path / "smoothed")
    plain, smoothed = (json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0])
                       for run in ("plain", "smoothed"))  # fmt: skip
    assert (plain["label_smoothing"], smoothed["label_smoothing"]) == (0.0, 0.2)
    assert plain["grad_norm"] > 0 and smoothed["grad_norm"] == pytest.approx(0.6 * plain["grad_norm"], rel=1e-5)


def test_consistency_smoothing_reaches_the_self_labelled_pairs_only():
    from selfee_fast.data import DataReport
    from selfee_fast.records import JudgedPair
    from selfee_fast.train import iteration_pairs, without_identical

    def judged(index, chosen, rejected):
        return JudgedPair(index, f"pool1.jsonl:{index + 1}", [{"role": "user", "content": "q"}], [1, 2], chosen,
                          rejected, "a", "b", 0.3, 0.1, 0.55, -4.0, -5.0, agreement=1.0)  # fmt: skip

    seed = [TrainPair(f"seed.jsonl:{k + 1}", [1], [2, 3], [4]) for k in range(4)]
    report = DataReport()
    three = [judged(0, [5], [6]), judged(1, [7], [7]), judged(2, [8, 9], [6])]
    self_labelled = without_identical(three, 1, keep=False, report=report, log=lambda *_: None)
    assert report.skipped["pairs of two identical responses"] == 1
    assert without_identical(three, 1, keep=True, report=report, log=lambda *_: None) == three
    pairs = iteration_pairs(
        self_labelled, 1, seed=seed, replay=1.0, report=report, log=lambda *_: None, label_smoothing=0.25
    )  # fmt: skip
    self_labelled, replayed = pairs[:2], pairs[2:]
    assert [p.location for p in self_labelled] == ["pool1.jsonl:1", "pool1.jsonl:3"]  # the identical pair dropped
    assert [p.label_smoothing for p in self_labelled] == [0.25, 0.25]
    assert len(replayed) == 2 and all(p.location.startswith("seed.jsonl") and p.label_smoothing == 0.0
                                      for p in replayed)  # fmt: skip
