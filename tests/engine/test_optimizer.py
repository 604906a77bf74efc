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


@pytest.mark.parametrize("numel", [8192, 1000])
def test_the_one_process_8bit_state_is_the_one_bitsandbytes_keeps(numel):
    """train._bnb_state writes a checkpoint's 8-bit state for the whole tensor (ShardedAdamW8bit, when shards
    straddle blocks): the keys, dtypes and shapes bitsandbytes' AdamW8bit keeps itself (32 bits below 4096
    elements), whose moments read back within 8-bit rounding, and which bitsandbytes loads and steps on."""
    from selfee_fast.train import _bnb_state, _dequantised

    param = torch.nn.Parameter(torch.zeros(numel))
    param.grad = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    reference = bnb.optim.AdamW8bit([param], lr=1e-3)
    reference.step()
    kept = reference.state[param]
    exp_avg, exp_avg_sq = _dequantised(kept, 1), _dequantised(kept, 2)
    written = _bnb_state(exp_avg, exp_avg_sq, step=kept["step"], device=torch.device("cpu"))
    assert written.keys() == {k for k in kept if k != "unorm_vec"}
    for key, value in written.items():
        if torch.is_tensor(value):
            assert (value.dtype, value.shape) == (kept[key].dtype, kept[key].shape), key
    for which, moment in ((1, exp_avg), (2, exp_avg_sq)):  # 8-bit levels: a few percent of a block's largest
        assert (_dequantised(written, which) - moment).abs().max() <= 0.05 * moment.abs().max()
    resumed = torch.nn.Parameter(param.detach().clone())
    resumed.grad = param.grad.clone()
    optimizer = bnb.optim.AdamW8bit([resumed], lr=1e-3)
    optimizer.load_state_dict({"state": {0: written}, "param_groups": reference.state_dict()["param_groups"]})
    optimizer.step()
    assert optimizer.state[resumed]["step"] == 2 and torch.isfinite(resumed).all()
