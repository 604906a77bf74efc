"""Generation: sample responses to a prompt pool, resumably, as token ids.

Prompts are sorted by length into batches (less padding); each batch is sampled with its
own seed, so the output does not depend on where a run was interrupted. Each batch's
records are appended to a JSONL file and flushed to disk together; on restart, complete
batches are kept, a torn trailing batch is dropped and regenerated.

Two backends write the same records: `generate_responses` samples with a loaded
transformers model (`model.generate`, KV cache); `generate_responses_vllm` hands the same
prompt token ids to a vLLM engine built from the model folder, with the policy's LoRA
adapter as a `LoRARequest`. vLLM seeds each prompt on its own, so its random draws do not
depend on how prompts are grouped into calls; its logits may still differ in the last bits
with the batch (vLLM is batch-invariant only with VLLM_BATCH_INVARIANT=1), so a resumed
run can differ from an uninterrupted one in an occasional token.

A record: {"index", "location", "prompt", "prompt_ids", "responses": [ids...],
"texts": [...], "finished": [bool...], "prompt_truncated", "batch", "batch_limit"}. `finished`
is False when a response hit max_new_tokens before EOS; `prompt_truncated` when the prompt
kept only its last max_prompt_length tokens; `batch_limit` is the out-of-memory batch limit
after the record's batch (hf only; None: no split so far).
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .batching import BatchLimit, split_on_oom
from .config import RunConfig
from .data import PromptRecord, padding_id, record_prompt_ids, with_system_prompt
from .distributed import barrier, broadcast_value, my_batches, world
from .files import append_batch, merge_shards, rank_shard
from .records import Generation, read_generations
from .stopping import stop_here, stop_here_together


@dataclass
class GenerationSettings:
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 300
    responses_per_prompt: int = 2
    batch_size: int = 16
    static_cache: bool = False  # transformers' static KV cache (compiled on a GPU)
    seed: int = 0
    max_prompt_length: int | None = None  # longer prompts keep their last tokens (counted)
    system_prompt: str | None = None  # a system turn for templates that take one (data.with_system_prompt)

    @classmethod
    def for_iteration(cls, config: RunConfig, iteration: int) -> GenerationSettings:
        """The sampling of iteration `iteration`: generation.* by name, a seed per run and iteration."""
        section = {
            f.name: getattr(config.generation, f.name) for f in fields(cls) if hasattr(config.generation, f.name)
        }
        return cls(**section, seed=config.seed * 1000 + iteration, max_prompt_length=config.data.max_prompt_length,
                   system_prompt=config.data.system_prompt)  # fmt: skip


# Fields of a model's generation_config.json that change what `model.generate` samples
# (transformers' logits processors). The samples follow `GenerationSettings` alone, as the
# paper's vLLM sampling does: e.g. Qwen2.5-Instruct's repetition_penalty 1.05 would
# otherwise reach hf samples but not vLLM ones. Values are transformers' own no-op defaults.
MODEL_SAMPLING_FIELDS = (
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "sequence_bias", "min_length", "min_new_tokens", "forced_bos_token_id",
    "forced_eos_token_id", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff", "guidance_scale", "watermarking_config",
    "stop_strings", "max_time",
)  # fmt: skip


# Values that switch an option off (transformers 5 writes None for "off", older versions these).
NO_OP_VALUES = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "guidance_scale": 1.0,
}  # fmt: skip


def ignored_model_sampling(generation_config) -> dict:
    """The model's own sampling options that selfee_fast overrides: {field: the model's value}."""
    if generation_config is None:
        return {}
    from transformers import GenerationConfig

    neutral = GenerationConfig()
    ignored = {}
    for field in MODEL_SAMPLING_FIELDS:
        value = getattr(generation_config, field, None)
        if hasattr(neutral, field) and value != getattr(neutral, field) and value != NO_OP_VALUES.get(field):
            ignored[field] = value
    return ignored


def neutral_model_sampling() -> dict:
    """Keyword arguments for `model.generate` that switch every MODEL_SAMPLING_FIELDS option off."""
    from transformers import GenerationConfig

    neutral = GenerationConfig()
    return {field: getattr(neutral, field) for field in MODEL_SAMPLING_FIELDS if hasattr(neutral, field)}


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
    autocast_dtype: torch.dtype | None = None,
    log=print,
) -> list[Generation]:
    """Sample `responses_per_prompt` responses per prompt into `out_path`; resume if it exists.

    `autocast_dtype`: sample under torch.autocast, as training and the judge compute (fp32
    master weights of full fine-tuning would otherwise generate in fp32).
    """
    out_path = Path(out_path)
    prompts = with_system_prompt(prompts, settings.system_prompt, tokenizer)
    all_prompt_ids, truncated, plan, done = prepare(tokenizer, prompts, settings, out_path, log)
    stop_ids = stop_token_ids(getattr(model, "generation_config", None), tokenizer)
    report_ignored_model_sampling(getattr(model, "generation_config", None), log)
    pad_id = padding_id(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    new_tokens, start = 0, time.perf_counter()
    # What fitted for one batch is where the next one starts; a resumed run starts where the
    # last finished batch left it, so its pieces (and their seeds) are the uninterrupted run's.
    limit = BatchLimit()
    limit.items = resumed_batch_limit(out_path, done)
    # Several processes: rank r takes every N-th batch into a shard of its own; rank 0 merges.
    ranks = world()
    write_path = rank_shard(out_path, ranks.rank) if ranks.distributed else out_path
    with write_path.open("a", encoding="utf-8") as out:
        progress = tqdm(total=len(plan), initial=len(done), desc="generate", unit="batch",
                        disable=None if ranks.is_main else True)  # fmt: skip
        for batch_index in my_batches(len(plan)):
            if batch_index is None or batch_index in done:  # nothing to do this round, but the others may stop
                stop_here_together(f"between generation batches ({write_path})")
                continue
            indices = plan[batch_index]
            batch_ids = [all_prompt_ids[i] for i in indices]
            batch_seed = settings.seed * 1_000_003 + batch_index

            def sample(part: list[list[int]], offset: int, batch_seed: int = batch_seed) -> list[list[list[int]]]:
                # A half retried after running out of memory gets a seed of its own.
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    return sample_batch(
                        model, part, settings, stop_ids, pad_id, device, seed=batch_seed + 7919 * offset
                    )

            samples_per_prompt = split_on_oom(
                sample, batch_ids, what=f"generation batch {batch_index}", log=log, limit=limit
            )
            records = []
            for row, index in enumerate(indices):
                samples = samples_per_prompt[row]
                # batch_limit: the out-of-memory limit after this batch, where a resumed run restarts.
                record = make_record(prompts[index], index, batch_ids[row], samples, stop_ids, batch_index, tokenizer,
                                     prompt_truncated=index in truncated, batch_limit=limit.items)  # fmt: skip
                new_tokens += sum(len(r) for r in record.responses)
                records.append(record)
            append_batch(out, [r.to_json() for r in records])
            stop_here_together(f"after generation batch {batch_index + 1}/{len(plan)} ({write_path})")
            elapsed = time.perf_counter() - start
            progress.update(1)
            progress.set_postfix_str(f"{new_tokens / max(elapsed, 1e-9):.0f} new tok/s")
        progress.close()
    if ranks.distributed:
        barrier()  # every shard complete
        if ranks.is_main:
            merge_shards(out_path, plan, log)
        barrier()
    seconds, where = time.perf_counter() - start, f" on rank {ranks.rank}" if ranks.distributed else ""
    log(f"generation: {len(plan)} batches in {out_path}, {new_tokens} new tokens in {seconds:.1f} s "
        f"({new_tokens / max(seconds, 1e-9):.0f} new tokens/s{where})")  # fmt: skip
    model.train(was_training)
    return read_generations(out_path)


def sample_batch(
    model, batch_ids: list[list[int]], settings: GenerationSettings, stop_ids: set[int], pad_id: int, device, *, seed
) -> list[list[list[int]]]:
    """One `model.generate` call: per prompt, `responses_per_prompt` samples (the new token ids)."""
    width = max(len(ids) for ids in batch_ids)
    # Left padding: every prompt ends where generation starts.
    input_ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for row, ids in enumerate(batch_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    torch.manual_seed(seed)
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
        **({"cache_implementation": "static"} if settings.static_cache else {}),
        **neutral_model_sampling(),
    ).cpu()
    n = settings.responses_per_prompt
    return [[sequences[row * n + k, width:].tolist() for k in range(n)] for row in range(len(batch_ids))]


def prepare(tokenizer, prompts: list[PromptRecord], settings: GenerationSettings, out_path: Path, log):
    """(prompt ids, indices of truncated prompts, batch plan, batches already complete on disk).

    The part both backends share.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    all_prompt_ids = [record_prompt_ids(tokenizer, p) for p in prompts]
    limit = settings.max_prompt_length
    truncated = {i for i, ids in enumerate(all_prompt_ids) if limit is not None and len(ids) > limit}
    if truncated:
        all_prompt_ids = [ids[-limit:] for ids in all_prompt_ids]
        log(f"generation: {len(truncated)} prompts longer than {limit} tokens keep their last {limit}")
    plan = plan_batches(all_prompt_ids, settings.batch_size)
    # Rank 0 tidies the file (and merges shards an earlier run on several processes left); all see its answer.
    done = broadcast_value(merge_shards(out_path, plan, log) if world().is_main else None)
    if done:
        log(f"generation: resuming, {len(done)}/{len(plan)} batches already on disk")
    return all_prompt_ids, truncated, plan, done


def make_record(
    prompt: PromptRecord,
    index: int,
    ids: list[int],
    samples: list[list[int]],
    stop_ids: set[int],
    batch: int,
    tokenizer,
    *,
    prompt_truncated: bool = False,
    batch_limit: int | None = None,
) -> Generation:
    """One prompt's record; each sample is cut after its first stop token (kept: training appends none)."""
    responses, finished = [], []
    for generated in samples:
        end = next((t for t, token in enumerate(generated) if token in stop_ids), None)
        finished.append(end is not None)
        responses.append(generated if end is None else generated[: end + 1])
    return Generation(
        index=index,
        location=prompt.location,
        prompt=prompt.prompt,
        prompt_ids=ids,
        responses=responses,
        texts=[tokenizer.decode(r, skip_special_tokens=True) for r in responses],
        finished=finished,
        prompt_truncated=prompt_truncated,
        batch=batch,
        batch_limit=batch_limit,
    )


def resumed_batch_limit(path: Path, done: set[int]) -> int | None:
    """The out-of-memory batch limit the last finished batch left (None: none, or nothing done)."""
    if not done:
        return None
    last = max(done)
    with path.open(encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["batch"] == last:
                return record.get("batch_limit")
    return None


def stop_token_ids(generation_config, tokenizer) -> set[int]:
    """The tokenizer's EOS and every end-of-turn id of the model's generation config (e.g. Phi-3's <|end|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if not ids:
        raise ValueError("neither the tokenizer nor the generation config names an end-of-sequence token")
    return ids


def report_ignored_model_sampling(generation_config, log) -> None:
    ignored = ignored_model_sampling(generation_config)
    if ignored:
        settings = ", ".join(f"{field}={value!r}" for field, value in sorted(ignored.items()))
        log(f"generation: the model's generation_config sets {settings}; ignored, samples follow generation.*")


# vLLM's allowed max_lora_rank values (vllm/config/lora.py MaxLoRARanks); an adapter's rank
# is rounded up to one of them.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def generate_responses_vllm(
    model_path: str | Path,
    tokenizer,
    prompts: list[PromptRecord],
    settings: GenerationSettings,
    out_path: str | Path,
    *,
    adapter_path: str | Path | None = None,
    dtype: str = "auto",
    gpu_memory_utilization: float = 0.9,
    prompts_per_call: int = 512,
    quantization: str = "none",
    log=print,
) -> list[Generation]:
    """`generate_responses` with a vLLM engine: same records, same resume, same stop tokens.

    `model_path` is a full model folder; `adapter_path` a peft adapter on top of it (the
    policy pi_{i-1}), sent with every request. The engine lives for this call only and is
    deleted before returning, so that training gets its GPU memory back. `quantization="4bit"`
    (QLoRA) has vLLM quantize the base in flight with bitsandbytes, as training holds it.
    """
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError as error:
        raise ImportError("generation.backend='vllm' needs vLLM: pip install 'selfee-fast[vllm]'") from error
    out_path, model_path = Path(out_path), Path(model_path)
    prompts = with_system_prompt(prompts, settings.system_prompt, tokenizer)
    all_prompt_ids, truncated, plan, done = prepare(tokenizer, prompts, settings, out_path, log)
    generation_config = saved_generation_config(model_path)
    stop_ids = stop_token_ids(generation_config, tokenizer)
    report_ignored_model_sampling(generation_config, log)
    todo = [b for b in range(len(plan)) if b not in done]
    if not todo:
        return read_generations(out_path)

    engine_options, dtype = vllm_engine_options(adapter_path, dtype, quantization, log)
    lora_request = None
    if adapter_path is not None:
        lora_request = LoRARequest(lora_name="policy", lora_int_id=1, lora_path=str(adapter_path))
    longest_prompt = max(len(all_prompt_ids[i]) for b in todo for i in plan[b])
    # vLLM (its own process) starts only if 0.9 of the card is free: hand back what this
    # process's caching allocator still holds from an earlier stage's training.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    llm = LLM(
        model=str(model_path), tokenizer=str(model_path), dtype=dtype, seed=settings.seed,
        gpu_memory_utilization=gpu_memory_utilization, max_model_len=longest_prompt + settings.max_new_tokens,
        **engine_options,
    )  # fmt: skip

    def sampling(index: int):
        return vllm_sampling(SamplingParams, settings, stop_ids, index)

    new_tokens, start = 0, time.perf_counter()
    try:
        with out_path.open("a", encoding="utf-8") as out:
            progress = tqdm(total=len(plan), initial=len(done), desc="generate (vllm)", unit="batch", disable=None)
            for call in group_batches(plan, todo, prompts_per_call):
                indices = [i for b in call for i in plan[b]]
                requests = [{"prompt_token_ids": all_prompt_ids[i]} for i in indices]
                outputs = llm.generate(
                    requests, [sampling(i) for i in indices], use_tqdm=False, lora_request=lora_request
                )
                by_index = dict(zip(indices, outputs, strict=True))
                for b in call:
                    records = [
                        make_record(prompts[i], i, all_prompt_ids[i], [list(c.token_ids) for c in by_index[i].outputs],
                                    stop_ids, b, tokenizer, prompt_truncated=i in truncated)
                        for i in plan[b]
                    ]  # fmt: skip
                    new_tokens += sum(len(r) for record in records for r in record.responses)
                    append_batch(out, [r.to_json() for r in records])
                    stop_here(f"after generation batch {b + 1}/{len(plan)} ({out_path})")
                    progress.update(1)
                progress.set_postfix_str(f"{new_tokens / max(time.perf_counter() - start, 1e-9):.0f} new tok/s")
            progress.close()
    finally:
        shut_down(llm)
        del llm
    log(
        f"generation (vllm): {len(plan)} batches in {out_path}, {new_tokens} new tokens in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return read_generations(out_path)


def vllm_engine_options(adapter_path, dtype: str, quantization: str, log) -> tuple[dict, str]:
    """(engine options, dtype) for a vLLM engine serving the base with an optional LoRA adapter."""
    engine_options = {}
    if quantization == "4bit":
        # In-flight NF4 (vllm docs: features/quantization/bnb); LoRA requests work on top of it.
        engine_options["quantization"] = "bitsandbytes"
    if adapter_path is None:
        return engine_options, dtype
    if dtype in ("float32", "float"):
        # vLLM's LoRA kernels take fp16/bf16 only (vllm/lora/ops/triton_ops/lora_shrink_op.py);
        # "auto" makes vLLM cast an fp32 checkpoint to the card's half type.
        log("generation (vllm): LoRA runs in 16 bits in vLLM; sampling with dtype='auto', not float32")
        dtype = "auto"
    adapter_path = Path(adapter_path)
    adapter_config = json.loads((adapter_path / "adapter_config.json").read_text())
    rank = max([adapter_config["r"], *(adapter_config.get("rank_pattern") or {}).values()])
    if rank > VLLM_LORA_RANKS[-1]:
        raise ValueError(f"{adapter_path}: LoRA rank {rank} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}")
    engine_options["enable_lora"] = True
    engine_options["max_lora_rank"] = next(r for r in VLLM_LORA_RANKS if r >= rank)
    return engine_options, dtype


def group_batches(plan: list[list[int]], todo: list[int], prompts_per_call: int) -> list[list[int]]:
    """Plan batches grouped into engine calls of about `prompts_per_call` prompts.

    Several plan batches per call keep vLLM's scheduler full; records are still appended one
    plan batch at a time, so resume works exactly as with hf.
    """
    calls, call = [], []
    for b in todo:
        call.append(b)
        if sum(len(plan[c]) for c in call) >= prompts_per_call:
            calls.append(call)
            call = []
    return calls + ([call] if call else [])


def shut_down(llm) -> None:
    """Stop the engine now rather than whenever its last reference goes.

    With vLLM's default multiprocess engine this terminates and joins the EngineCore process
    (its GPU memory is gone when it returns); in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    it undoes the engine's gc.freeze(), without which `del` frees nothing.
    """
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()
    del engine_core
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def vllm_sampling(sampling_params_class, settings: GenerationSettings, stop_ids: set[int], index: int):
    """Prompt `index`'s sampling parameters.

    One seed per prompt: the samples do not depend on which prompts share a call. vLLM gives
    sample k of a request the seed `seed + k` (vllm/v1/engine/parallel_sampling.py), so the
    prompts' seeds are n apart: no two samples of the call share a random stream.
    """
    n = settings.responses_per_prompt
    return sampling_params_class(
        n=n, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
        max_tokens=settings.max_new_tokens, seed=(settings.seed * 1_000_003 + index) * n,
        stop_token_ids=sorted(stop_ids), detokenize=False,
    )  # fmt: skip


def saved_generation_config(model_path: Path):
    """The model folder's generation config; None without one (the tokenizer's EOS is then the only stop token)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path, local_files_only=True)
    except OSError:
        return None


def generate_stage_vllm(config: RunConfig, runtime, prompts, iteration: int, previous: Path | None, out_path, log):
    """Sample an iteration's prompts from pi_{i-1} with vLLM: the base plus the previous adapter, or its full model."""
    from transformers import AutoTokenizer

    from .models import check_model_dir

    if runtime.full_finetuning:
        model_path, adapter_path = previous or Path(config.model.path), None
    else:
        model_path, adapter_path = Path(config.model.path), previous
    tokenizer = AutoTokenizer.from_pretrained(check_model_dir(model_path), local_files_only=True)
    return generate_responses_vllm(
        model_path, tokenizer, prompts, GenerationSettings.for_iteration(config, iteration), out_path,
        adapter_path=adapter_path,
        dtype=str(runtime.compute_dtype).removeprefix("torch."),  # fp32 master weights sample in bf16, as they compute
        gpu_memory_utilization=config.generation.vllm_gpu_memory_utilization,
        quantization=config.model.quantization, log=log,
    )  # fmt: skip
