"""An external judge: a small reward model trained on the seed pairs, standing in for the paper's PairRM.

The paper's baseline is iterative DPO labelled by PairRM, an external pairwise reward model.
Without model hubs this release fits its own: iterative DPO with such a judge is what SPA is compared against: the same loop, but the
preference labels come from a Bradley-Terry reward model fitted to the gold seed instead of
the policy's own implicit reward. The reward model is the base model with a scalar head
(`AutoModelForSequenceClassification`, scored at the last real token), fully fine-tuned —
fine for the demo's small models; a 7B reward model would want LoRA.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import TokenizedPair, collate_pairs, padding_id, right_pad
from .distributed import barrier, world
from .files import folder_written_atomically, write_json_atomic
from .models import check_model_dir


@dataclass
class RewardModelSettings:
    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0


def _scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()


def train_reward_model(
    base_path: str | Path, pairs: list[TokenizedPair], out_dir: str | Path, settings: RewardModelSettings, *, log=print
) -> Path:
    """Fit r(x, y) with -log sigmoid(r(chosen) - r(rejected)) on `pairs`; save it to `out_dir`.

    Skipped when `out_dir` holds one fit with the same settings to the same number of pairs;
    one fit otherwise is replaced (the folder is swapped in whole).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out_dir = Path(out_dir)
    found = out_dir / "reward_model.json"
    if found.exists():
        meta = json.loads(found.read_text())
        if meta.get("settings") == asdict(settings) and meta.get("pairs") == len(pairs):
            log(f"reward model: found in {out_dir}")
            return out_dir
        log(f"reward model: the one in {out_dir} was fit with other settings or pairs; fitting it again")
    if not pairs:
        raise ValueError("no pairs to train the reward model on")
    base_path = check_model_dir(base_path)
    tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
    torch.manual_seed(settings.seed)
    model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, local_files_only=True)
    model.config.pad_token_id = padding_id(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    for epoch in range(settings.epochs):
        order = torch.randperm(len(pairs), generator=generator).tolist()
        correct = 0
        for start in range(0, len(order), settings.batch_size):
            batch_pairs = [pairs[i] for i in order[start : start + settings.batch_size]]
            batch = collate_pairs(batch_pairs, model.config.pad_token_id)
            scores = _scores(model, batch["input_ids"], batch["attention_mask"])
            margin = scores[: len(batch_pairs)] - scores[len(batch_pairs) :]
            loss = -F.logsigmoid(margin).mean()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"reward model: the loss is {loss.item()} at epoch {epoch}")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            correct += int((margin > 0).sum())
        log(f"reward model: epoch {epoch + 1}/{settings.epochs}, training accuracy {correct / len(pairs):.3f}")
    with folder_written_atomically(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        write_json_atomic(
            staging / "reward_model.json",
            {"settings": asdict(settings), "pairs": len(pairs), "last_epoch_accuracy": correct / len(pairs)},
        )
    return out_dir


class RewardModel:
    """A trained reward model as a judge: scores (prompt ids, responses) items in batches."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from transformers import AutoModelForSequenceClassification

        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).to(device).eval()
        self.pad_id = self.model.config.pad_token_id

    @torch.no_grad()
    def score(self, items: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
        sequences = [prompt + response for prompt, responses in items for response in responses]
        batch = right_pad(sequences, [0] * len(sequences), self.pad_id)
        device = next(self.model.parameters()).device
        flat = _scores(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).tolist()
        out, start = [], 0
        for _, responses in items:
            out.append(flat[start : start + len(responses)])
            start += len(responses)
        return out


def fit_to_seed(config, tokenizer, log=print) -> Path:
    """The baseline's judge for a run: a reward model fit to its seed pairs, trained once per run."""
    from .data import load_preferences, tokenize_pairs

    records, report = load_preferences(config.data.seed_pairs, skip_invalid=config.data.skip_invalid)
    pairs, report = tokenize_pairs(
        tokenizer, records, max_length=config.data.max_length, max_prompt_length=config.data.max_prompt_length,
        report=report,
    )  # fmt: skip
    settings = RewardModelSettings(
        epochs=config.spa.reward_model_epochs, lr=config.spa.reward_model_lr, seed=config.seed
    )
    out_dir = Path(config.run_dir) / "reward_model"
    if world().is_main:  # under torchrun rank 0 fits it, the others load what it saved
        train_reward_model(config.model.path, pairs, out_dir, settings, log=log)
    barrier()
    return out_dir
