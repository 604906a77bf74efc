"""Generation: sample responses to a prompt pool, resumably, as token ids.

Prompts are sorted by length into batches (less padding); each batch is sampled with its
own seed, so the output does not depend on where a run was interrupted. Each batch's
records are appended to a JSONL file and flushed to disk together; on restart, complete
batches are kept, a torn trailing batch is dropped and regenerated.

A record: {"index", "location", "prompt", "prompt_ids", "responses": [ids...],
"texts": [...], "finished": [bool...], "batch"}. `finished` is False when a response hit
max_new_tokens before EOS.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import PromptRecord, padding_id, prompt_ids
from .files import append_batch, complete_batches


@dataclass
class GenerationSettings:
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 300
    responses_per_prompt: int = 2
    batch_size: int = 16
    seed: int = 0
    max_prompt_length: int | None = None  # longer prompts keep their last tokens (counted)


def plan_batches(prompt_id_lists: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped into batches of similar length (stable, so identical on every run)."""
    order = sorted(range(len(prompt_id_lists)), key=lambda i: (len(prompt_id_lists[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: list[PromptRecord],
    settings: GenerationSettings,
    out_path: str | Path,
    *,
    log=print,
) -> list[dict]:
    """Sample `responses_per_prompt` responses per prompt into `out_path`; resume if it exists."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    all_prompt_ids = [prompt_ids(tokenizer, p.prompt) for p in prompts]
    limit = settings.max_prompt_length
    truncated = sum(limit is not None and len(ids) > limit for ids in all_prompt_ids)
    if truncated:
        all_prompt_ids = [ids[-limit:] for ids in all_prompt_ids]
        log(f"generation: {truncated} prompts longer than {limit} tokens keep their last {limit}")
    stop_ids = stop_token_ids(model, tokenizer)
    plan = plan_batches(all_prompt_ids, settings.batch_size)
    done = complete_batches(out_path, [len(b) for b in plan])
    if done:
        log(f"generation: resuming, {len(done)}/{len(plan)} batches already on disk")
    pad_id = padding_id(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    new_tokens, start = 0, time.perf_counter()
    with out_path.open("a", encoding="utf-8") as out:
        progress = tqdm(total=len(plan), initial=len(done), desc="generate", unit="batch", disable=None)
        for batch_index, indices in enumerate(plan):
            if batch_index in done:
                continue
            batch_ids = [all_prompt_ids[i] for i in indices]
            width = max(len(ids) for ids in batch_ids)
            # Left padding: every prompt ends where generation starts.
            input_ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
            for row, ids in enumerate(batch_ids):
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            torch.manual_seed(settings.seed * 1_000_003 + batch_index)
            sequences = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=True,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
                max_new_tokens=settings.max_new_tokens,
                num_return_sequences=settings.responses_per_prompt,
                eos_token_id=sorted(stop_ids),
                pad_token_id=pad_id,
                use_cache=True,
            ).cpu()
            records = []
            for row, index in enumerate(indices):
                responses, finished = [], []
                for k in range(settings.responses_per_prompt):
                    generated = sequences[row * settings.responses_per_prompt + k, width:].tolist()
                    end = next((t for t, token in enumerate(generated) if token in stop_ids), None)
                    finished.append(end is not None)
                    if end is not None:
                        generated = generated[: end + 1]
                    responses.append(generated)
                    new_tokens += len(generated)
                record = {
                    "index": index,
                    "location": prompts[index].location,
                    "prompt": prompts[index].prompt,
                    "prompt_ids": batch_ids[row],
                    "responses": responses,
                    "texts": [tokenizer.decode(r, skip_special_tokens=True) for r in responses],
                    "finished": finished,
                    "batch": batch_index,
                }
                records.append(record)
            append_batch(out, records)
            elapsed = time.perf_counter() - start
            progress.update(1)
            progress.set_postfix_str(f"{new_tokens / max(elapsed, 1e-9):.0f} new tok/s")
        progress.close()
    log(
        f"generation: {len(plan)} batches in {out_path}, {new_tokens} new tokens in {time.perf_counter() - start:.1f} s"
    )
    model.train(was_training)
    return load_generations(out_path)


def stop_token_ids(model, tokenizer) -> set[int]:
    """The tokenizer's EOS and every end-of-turn id of the model's generation config (e.g. Phi-3's <|end|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if not ids:
        raise ValueError("neither the tokenizer nor the generation config names an end-of-sequence token")
    return ids


def load_generations(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return sorted(records, key=lambda r: r["index"])
