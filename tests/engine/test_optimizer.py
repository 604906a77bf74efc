"""bitsandbytes is probed with one real step before a run relies on it."""

import pytest
import torch

from selfee_fast.config import ConfigError, load_config
from selfee_fast.preflight import check_libraries
from selfee_fast.runtime import resolve_runtime
from selfee_fast.train import eight_bit_optimizer_problem

bnb = pytest.importorskip("bitsandbytes", reason="the 8-bit optimizers come from bitsandbytes")


def test_a_working_bitsandbytes_has_no_problem():
    assert eight_bit_optimizer_problem(torch.device("cpu")) is None


def test_a_broken_native_library_is_reported(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA Setup failed despite CUDA being available\nmore detail")

    monkeypatch.setattr(bnb.optim, "AdamW8bit", broken)
    assert eight_bit_optimizer_problem(torch.device("cpu")) == (
        "RuntimeError: CUDA Setup failed despite CUDA being available"
    )


def test_config_refuses_an_unusable_8bit_optimizer_on_a_gpu(tmp_path, monkeypatch):
    import selfee_fast.train as train

    monkeypatch.setattr(train, "eight_bit_optimizer_problem", lambda device: "OSError: libbitsandbytes_cuda130.so")
    overrides = ["model.path=/m", "model.device=cuda", "data.seed_pairs=s.jsonl", "data.prompt_pools=[p.jsonl]",
                 "spa.iterations=1"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"bitsandbytes cannot run on cuda \(OSError.*use train\.optimizer=adamw"):
        config = load_config(None, overrides)
        check_libraries(config, resolve_runtime(config))
    config = load_config(None, [*overrides, "train.optimizer=adamw"])
    check_libraries(config, resolve_runtime(config))  # fp32 AdamW needs no probe
