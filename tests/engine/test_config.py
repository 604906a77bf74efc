"""The config's values are checked before anything runs: each bad value is refused naming its key."""

import pytest

from selfee_fast.config import CHOICES, RANGES, ConfigError, check_values, load_config

BASE = ["model.path=/m", "data.seed_pairs=s.jsonl", "data.prompt_pools=[a.jsonl, b.jsonl, c.jsonl]"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # the values a new user tried that used to fail only inside training
        ("train.beta=-0.1", r"train\.beta must be > 0"),
        ("spa.alpha=0.7", r"spa\.alpha must be in \[0, 0\.5\)"),
        ("spa.extrapolate=[-1]", r"spa\.extrapolate\[0\] must be a finite number >= 0"),
        ("spa.extrapolate=[0.5, .inf]", r"spa\.extrapolate\[1\] must be a finite number >= 0"),
        ("spa.tau_window=1", r"spa\.tau_window must be >= 2"),
        ("spa.noise_percentile=1.5", r"spa\.noise_percentile must be in \(0, 1\)"),
        ("spa.noise_percentile=0", r"spa\.noise_percentile must be in \(0, 1\)"),
        ("generation.temperature=0", r"generation\.temperature must be in \(0, 2\]"),
        ("generation.top_p=1.5", r"generation\.top_p must be in \(0, 1\]"),
        ("generation.max_new_tokens=0", r"generation\.max_new_tokens must be >= 1"),
        ("generation.responses_per_prompt=1", r"generation\.responses_per_prompt must be >= 2"),
        (
            "train.micro_batch_size=3",
            r"train\.batch_size \(32\) must be a positive multiple of train\.micro_batch_size \(3\)",
        ),
        ("train.lr=nan", r"train\.lr must be a positive number or null \(the mode's default\), got nan"),
        ("train.warmup_ratio=2", r"train\.warmup_ratio must be in \[0, 1\]"),
        ("train.optimizer=sgd", r"train\.optimizer must be one of \('adamw8bit'"),
        ("train.loss_type=exo_pair", r"train\.loss_type must be one of \('sigmoid'"),
        ("model.lora_dropout=1", r"model\.lora_dropout must be in \[0, 1\)"),
        ("spa.judge_reference=base", r"spa\.judge_reference must be one of"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        check_values(load_config(None, [*BASE, override]))


def test_the_defaults_and_the_paper_settings_pass():
    check_values(load_config(None, BASE))
    check_values(load_config(None, [*BASE, "spa.extrapolate=[]", "spa.alpha=0", "train.loss_type=robust"]))


def test_every_range_and_choice_names_a_real_setting():
    config = load_config(None, BASE)
    for key in [*RANGES, *CHOICES]:
        section, name = key.split(".")
        assert hasattr(getattr(config, section), name), key


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="one disjoint prompt pool per iteration"):
        check_values(load_config(None, [*BASE, "spa.iterations=4"]))
    with pytest.raises(ConfigError, match=r"exceeds data\.max_length"):
        check_values(load_config(None, [*BASE, "data.max_length=100"]))
    with pytest.raises(ConfigError, match="nothing to do"):
        check_values(load_config(None, [*BASE, "data.seed_pairs=null", "model.judge_base=/b", "spa.iterations=0"]))
    with pytest.raises(ConfigError, match=r"which train\.loss_type='hinge' has not"):
        check_values(load_config(None, [*BASE, "train.loss_type=hinge"]))


def test_the_learning_rate_default_follows_the_mode():
    from selfee_fast.config import LORA_LR, PAPER_LR, effective_lr, lr_note

    lora, full = load_config(None, BASE), load_config(None, [*BASE, "model.lora_r=0"])
    assert (effective_lr(lora), effective_lr(full)) == (LORA_LR, PAPER_LR) == (5e-6, 5e-7)
    assert "default for LoRA" in lr_note(lora) and "full fine-tuning (the paper's)" in lr_note(full)
    assert lr_note(load_config(None, [*BASE, "train.lr=5e-7"])).startswith("warning: train.lr=5e-07 with LoRA")
    assert lr_note(load_config(None, [*BASE, "train.lr=1e-5"])) is None
    assert effective_lr(load_config(None, [*BASE, "train.lr=3e-4"])) == 3e-4


def test_new_options_are_checked():
    with pytest.raises(ConfigError, match=r"spa\.judge_reward must be one of \('sum', 'mean'\)"):
        check_values(load_config(None, [*BASE, "spa.judge_reward=max"]))
    with pytest.raises(ConfigError, match=r"train\.nll_alpha must be >= 0"):
        check_values(load_config(None, [*BASE, "train.nll_alpha=-1"]))
    with pytest.raises(ConfigError, match=r"spa\.seed_replay mixes seed pairs"):
        check_values(load_config(None, [*BASE, "spa.seed_replay=0.5", "data.seed_pairs=null", "model.judge_base=/b"]))
    with pytest.raises(ConfigError, match="lora_dropout > 0 has no effect"):
        check_values(load_config(None, [*BASE, "model.lora_dropout=0.1"]))
    check_values(load_config(None, [*BASE, "model.lora_dropout=0.1", "model.disable_dropout=false"]))


def test_the_loss_types_a_training_run_can_use():
    """Every loss type of the table that needs no smoothing value and reads the reference; only
    sigmoid and robust carry self-refinement."""
    offered = CHOICES["train.loss_type"]
    assert offered[:4] == ("sigmoid", "robust", "ipo", "hinge")
    assert "exo_pair" not in offered and "orpo" not in offered  # a smoothing value; no reference
    for name in offered:
        check_values(load_config(None, [*BASE, f"train.loss_type={name}", "spa.refine=false"]))
    with pytest.raises(ConfigError, match=r"which train\.loss_type='apo_zero' has not"):
        check_values(load_config(None, [*BASE, "train.loss_type=apo_zero"]))
