"""Run by tests/engine/test_distributed.py, once alone and once under torchrun: one training stage.

argv: model folder, output folder, mode (lora | lora-sharded | qlora | full), micro_batch_size[, optimizer].
"lora" keeps the frozen base whole on every rank, "lora-sharded" lets FSDP2 shard it, "qlora" loads
the base in NF4 (whole on every rank).
"""

import faulthandler
import json
import sys
from pathlib import Path

import torch

from selfee_fast import models
from selfee_fast.distributed import start_world, stop_world, world
from selfee_fast.train import TrainPair, TrainSettings, train_stage


def main() -> None:
    model_dir, out_dir, mode, micro = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    optimizer = sys.argv[5] if len(sys.argv) > 5 else "adamw"
    faulthandler.dump_traceback_later(120, exit=True)  # a hang (a collective one rank skipped) shows where
    start_world()
    torch.manual_seed(0)
    lora = models.LoraSettings(r=4, alpha=8) if mode != "full" else None
    quantization = "4bit" if mode == "qlora" else "none"
    model, _ = models.load_model(model_dir, lora=lora, gradient_checkpointing=True, quantization=quantization)
    reference_model = None
    if lora is None:
        reference_model, _ = models.load_model(model_dir, gradient_checkpointing=False)
        reference_model.requires_grad_(False)
    else:
        with torch.no_grad():  # a policy that already differs from the reference: margins are not all 0
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    pairs = [TrainPair(**p) for p in json.loads((model_dir / "pairs.json").read_text())]
    settings = TrainSettings(
        lr=1e-3, batch_size=8, micro_batch_size=micro, epochs=2, optimizer=optimizer, save_every=2,
        refine=True, alpha=0.1, alpha_warmup=0.0, tau_window=4, noise_percentile=0.3,
        extrapolate=0.5 if lora else None, shard_frozen_base="sharded" if mode == "lora-sharded" else "whole",
    )  # fmt: skip
    train_stage(model, pairs, settings, out_dir, pad_id=0, reference="init" if lora else None,
                reference_model=reference_model, log=lambda *_: None)  # fmt: skip
    from selfee_fast.distributed import full_tensor

    trained = {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}
    if world().is_main:
        torch.save(trained, out_dir / "final.pt")
        from torch.distributed.fsdp import FSDPModule

        units = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
        (out_dir / "fsdp_units.json").write_text(json.dumps(units))
    stop_world()


if __name__ == "__main__":
    main()
