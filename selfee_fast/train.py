"""Training: the lean SPA / DPO loop, top to bottom, no trainer classes.

One optimizer step = `batch_size` pairs, as micro-batches of `micro_batch_size` pairs whose
gradients accumulate. Each micro-batch runs the body once as the policy (with gradient)
and, when needed, once as the reference (without); the LM head runs through the fused
kernel for both together. Stage 0 is plain DPO; iterations add SPA's self-refinement:
the smoothing weight alpha_t (0 for the first `alpha_warmup` of the steps), the noise
threshold tau over the most recent margins, and DND's extrapolation lam.

Checkpoints (every `save_every` steps and at the end) hold the trainable weights, the
optimizer, the scheduler, the RNG states, the noise-threshold window and the step; the
step fixes the data position, since each epoch's order is a function of (seed, epoch).
A killed run restarts from its latest checkpoint and continues bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import CHOICES, LAYOUT_SETTINGS, RunConfig, effective_lr
from .data import TokenizedPair, collate_pairs, next_token_targets
from .distributed import (
    any_rank,
    average_whole_gradients,
    barrier,
    clip_grad_norm,
    full_tensor,
    gather_lists,
    is_sharded,
    shard_model,
    sum_across_ranks,
    world,
)
from .files import sha256_of, write_text_atomic, writing
from .loss import NoiseThreshold, SPALossOutput, spa_loss
from .models import sequence_token_logprobs
from .plan import frozen_base_layout
from .stopping import stop_here, stop_requested

OPTIMIZERS = CHOICES["train.optimizer"]
# Settings a resumed run may change: they decide how the work is laid out, not what it computes.
RESUMABLE_CHANGES = tuple(name for names in LAYOUT_SETTINGS.values() for name in names)


@dataclass
class TrainSettings:
    beta: float = 0.1
    lr: float = 5e-7
    warmup_ratio: float = 0.1
    batch_size: int = 32  # pairs per optimizer step
    micro_batch_size: int = 4  # pairs per forward / backward
    epochs: int = 1
    max_grad_norm: float = 1.0
    optimizer: str = "adamw8bit"
    weight_decay: float = 0.0
    save_every: int = 100
    seed: int = 0
    loss_type: str = "sigmoid"
    nll_alpha: float = 0.0  # + nll_alpha * per-token NLL of the chosen responses (iterative RPO)
    max_nonfinite_steps: int = 3  # this many non-finite steps in a row stop the run; fewer are skipped
    # SPA self-refinement; refine=False is plain DPO
    refine: bool = False
    alpha: float = 0.1
    alpha_warmup: float = 0.2
    noise_percentile: float = 0.10
    tau_window: int = 50
    extrapolate: float | None = None
    # The forward's compute dtype under torch.autocast ("bfloat16" on a GPU); None: the weights' dtype.
    autocast_dtype: str | None = None
    # One packed row per micro-batch instead of padded rows (`data.pack`): no padding tokens.
    packing: bool = False
    # Several processes, LoRA: "whole" keeps the frozen base on every rank, "sharded" lets FSDP2 split it.
    shard_frozen_base: str = "whole"

    @classmethod
    def for_stage(
        cls, config: RunConfig, *, epochs: int, refine: bool, extrapolate: float | None, autocast_dtype: str | None
    ) -> TrainSettings:
        """A stage's training: train.* and spa.* by name, then what the stage decides."""
        named = {}
        for section in (config.train, config.spa):
            named.update({f.name: getattr(section, f.name) for f in fields(cls) if hasattr(section, f.name)})
        return cls(
            **{**named, "lr": effective_lr(config), "epochs": epochs, "refine": refine, "extrapolate": extrapolate},
            seed=config.seed, autocast_dtype=autocast_dtype, packing=config.model.packing,
            shard_frozen_base=frozen_base_layout(config, world().size),
        )  # fmt: skip


@dataclass
class TrainPair(TokenizedPair):
    """A tokenized pair, optionally with the reference's sequence log-probs already known."""

    ref_chosen: float | None = None
    ref_rejected: float | None = None
    # This pair's label smoothing (spa.judge_consistency=smooth: the self-labelled pairs'); SPA's
    # alpha adds to it when the pair is flagged.
    label_smoothing: float = 0.0


def without_identical(judged: list, iteration: int, *, keep: bool, report, log) -> list:
    """The judged pairs an iteration can learn from: those of two identical responses carry no
    preference and are counted and dropped, unless `keep` (the official code trains on them)."""
    kept = [p for p in judged if keep or not p.identical]
    if len(kept) < len(judged):
        report.skipped["pairs of two identical responses"] += len(judged) - len(kept)
        log(f"iter{iteration}: {len(judged) - len(kept)} of {len(judged)} pairs are two identical responses: "
            "not trained on (spa.keep_identical_pairs keeps them)")  # fmt: skip
    return kept


def iteration_pairs(
    self_labelled, iteration: int, *, seed: list[TrainPair], replay: float, report, log,
    drop_disagreeing: bool = False, label_smoothing: float = 0.0,
) -> list[TrainPair]:  # fmt: skip
    """What an iteration trains on: its self-labelled pairs (`without_identical`'s; with
    `drop_disagreeing`, less those the previous iteration's judge orders the other way, counted),
    each smoothed by `label_smoothing`, plus `replay` seed pairs per self-labelled pair, each
    iteration the next ones (gold labels: never smoothed)."""
    kept = self_labelled
    if drop_disagreeing:
        agreed = [p for p in kept if not p.judges_disagree]
        if len(agreed) < len(kept):
            report.skipped["pairs the previous iteration's judge orders the other way"] += len(kept) - len(agreed)
            log(f"iter{iteration}: {len(kept) - len(agreed)} of {len(kept)} pairs are ordered the other way by the "
                "previous iteration's judge: not trained on (spa.judge_consistency=filter)")  # fmt: skip
        kept = agreed
    pairs = [
        TrainPair(p.location, p.prompt_ids, p.chosen_ids, p.rejected_ids, p.chosen_logp_policy, p.rejected_logp_policy,
                  label_smoothing=label_smoothing)
        for p in kept
    ]  # fmt: skip
    if replay and seed:
        count = round(replay * len(pairs))
        pairs += [seed[(iteration * count + k) % len(seed)] for k in range(count)]
        log(f"iter{iteration}: {count} seed pairs replayed beside {len(kept)} self-labelled ones")
    return pairs


def make_optimizer(params: list[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    import bitsandbytes as bnb

    if settings.optimizer == "adamw8bit":
        if any(is_sharded(p) for p in params):
            return ShardedAdamW8bit(params, lr=settings.lr, weight_decay=settings.weight_decay)
        return bnb.optim.AdamW8bit(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "paged_adamw8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=settings.lr, weight_decay=settings.weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {settings.optimizer!r}")


BNB_BLOCK = 256  # bitsandbytes' 8-bit optimizer states: one absmax per block of this many elements
BNB_MIN_8BIT = 4096  # bitsandbytes keeps a tensor's states in 32 bits below this many elements


def _bnb_adamw8bit():
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit


class ShardedAdamW8bit(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit on FSDP2's parameters: each rank steps its own shards.

    bitsandbytes' kernels take plain tensors; a sharded parameter's local shard is one (a view of
    the DTensor's storage), and AdamW is elementwise but for its states' per-block scales. So the
    inner optimizer holds views of the local shards, and each step hands it the local shards of the
    gradients. Its `state_dict` is the one-process layout, as a checkpoint keeps it: where every
    shard starts on a block of the whole tensor (every dim-0 split of a 7B model's matrices on 2-8
    ranks), the shards' blocks are the whole tensor's and their bytes and scales are concatenated
    as they are; elsewhere each moment is dequantised, gathered whole and quantised again, a round
    trip that moves levels (bitsandbytes' signed map ends at -0.993, so a block whose largest
    magnitude is negative comes back with a smaller scale).
    """

    def __init__(self, params: list[torch.nn.Parameter], **options):
        self.params = list(params)
        with torch.no_grad():  # views without autograd: the inner optimizer's leaves
            self.shards = [p.to_local() if is_sharded(p) else p for p in self.params]
        if not all(shard.is_contiguous() for shard in self.shards):
            # bitsandbytes makes a non-contiguous parameter contiguous: a copy, which the update would go to.
            raise RuntimeError("8-bit AdamW on FSDP2: a local shard is not contiguous; use train.optimizer=adamw")
        self.inner = _bnb_adamw8bit()(self.shards, **options)
        # The scheduler and the training loop read and set `param_groups` (the learning rate): the inner one's.
        self.defaults, self.param_groups, self.state = self.inner.defaults, self.inner.param_groups, self.inner.state

    def step(self, closure=None):
        for param, shard in zip(self.params, self.shards, strict=True):
            if shard is not param:
                if shard.data_ptr() != param.to_local().data_ptr():  # FSDP2 moved the shard: the view is stale
                    raise RuntimeError("8-bit AdamW on FSDP2: a parameter's local shard moved since the optimizer "
                                       "was built; use train.optimizer=adamw")  # fmt: skip
                shard.grad = None if param.grad is None else param.grad.to_local()
        try:
            return self.inner.step(closure)
        finally:
            for param, shard in zip(self.params, self.shards, strict=True):
                if shard is not param:
                    shard.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    def state_dict(self) -> dict:
        """The state one process would hold for the whole tensors, keyed by position (every rank calls it):
        what a checkpoint keeps, so that it resumes on any number of processes."""
        whole = {}
        for index, (param, shard) in enumerate(zip(self.params, self.shards, strict=True)):
            state = self.inner.state.get(shard)
            if not state:
                continue
            if shard is param:  # a whole parameter (the LM head): its state is already the one-process one
                whole[index] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in state.items()}
            elif state["state1"].dtype == torch.uint8 and _blocks_align(param):
                # The shards' 8-bit blocks are the whole tensor's: their bytes and scales, concatenated.
                whole[index] = {"step": state["step"]}
                for which in (1, 2):
                    whole[index].update({
                        f"state{which}": _gathered(state[f"state{which}"], param).cpu(),
                        f"qmap{which}": state[f"qmap{which}"].cpu(),
                        f"absmax{which}": torch.cat(gather_lists([state[f"absmax{which}"].cpu()])),
                    })  # fmt: skip
            else:  # blocks that straddle two shards: the moments, quantised again over the whole tensor
                moments = [_gathered(_dequantised(state, which), param) for which in (1, 2)]
                whole[index] = _bnb_state(*moments, step=state["step"], device=torch.device("cpu"))
        groups, first = [], 0
        for group in self.inner.param_groups:
            count = len(group["params"])
            groups.append({**group, "params": list(range(first, first + count))})
            first += count
        return {"state": whole, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Take a one-process state (this class's or bitsandbytes' own), each rank its shards."""
        for group, saved in zip(self.inner.param_groups, state_dict["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.inner.state.clear()
        for index, saved in state_dict["state"].items():
            param, shard = self.params[int(index)], self.shards[int(index)]
            saved = dict(saved)  # bitsandbytes' own state_dict nests the 8-bit tensors under one key
            saved.update(saved.pop(_bnb_adamw8bit()._FSDP_WRAPPED_QUANT_STATE_KEY, {}))
            if shard is param:
                state = {k: v.to(shard.device) if torch.is_tensor(v) else v for k, v in saved.items()}
            elif saved["state1"].dtype == torch.uint8 and _blocks_align(param):
                first, rows = _shard_rows(param)
                per_row = param.numel() // param.shape[0]
                block, blocks = first * per_row // BNB_BLOCK, -(-rows * per_row // BNB_BLOCK)
                state = {"step": saved["step"]}
                for which in (1, 2):
                    state.update({
                        f"state{which}": _local_shard(saved[f"state{which}"].to(shard.device), param),
                        f"qmap{which}": saved[f"qmap{which}"].to(shard.device),
                        f"absmax{which}": saved[f"absmax{which}"][block : block + blocks].to(shard.device),
                    })  # fmt: skip
            else:
                moments = [_local_shard(_dequantised(saved, which).to(shard.device), param) for which in (1, 2)]
                state = _bnb_state(*moments, step=saved["step"], device=shard.device)
            self.inner.state[shard] = state


def _shard_rows(param) -> tuple[int, int]:
    """(first row, rows) of this rank's dim-0 shard of a sharded parameter: torch.chunk's split, as FSDP2's."""
    rows, ranks = param.shape[0], param.device_mesh.size()
    chunk = -(-rows // ranks)
    first = min(param.device_mesh.get_local_rank() * chunk, rows)
    return first, min(chunk, rows - first)


def _blocks_align(param) -> bool:
    """Whether every rank's shard keeps 8-bit states (4096 elements or more) starting on a block of the whole
    tensor: then the shards' blocks are the whole tensor's (true of a 7B model's matrices on 2-8 GPUs)."""
    rows, ranks = param.shape[0], param.device_mesh.size()
    per_row, chunk = param.numel() // rows, -(-rows // ranks)
    smallest = min(max(0, min(chunk, rows - rank * chunk)) for rank in range(ranks))
    return (chunk * per_row) % BNB_BLOCK == 0 and smallest * per_row >= BNB_MIN_8BIT


def _dequantised(state: dict, which: int) -> torch.Tensor:
    """A bitsandbytes state's moment (1: exp_avg, 2: exp_avg_sq) in fp32."""
    values = state[f"state{which}"]
    if values.dtype != torch.uint8:
        return values.float()
    from bitsandbytes import functional as bnb_functional

    code, absmax = state[f"qmap{which}"].to(values.device), state[f"absmax{which}"].to(values.device)
    return bnb_functional.dequantize_blockwise(values, absmax=absmax, code=code, blocksize=BNB_BLOCK)


def _bnb_state(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, step: int, device: torch.device) -> dict:
    """The state bitsandbytes' AdamW8bit keeps for a tensor of these moments: 8-bit blocks, or 32 bits if small."""
    exp_avg, exp_avg_sq = exp_avg.float().contiguous().to(device), exp_avg_sq.float().contiguous().to(device)
    if exp_avg.numel() < BNB_MIN_8BIT:
        return {"step": step, "state1": exp_avg, "state2": exp_avg_sq}
    from bitsandbytes import functional as bnb_functional

    state = {"step": step}
    for which, values, signed in ((1, exp_avg, True), (2, exp_avg_sq, False)):
        code = bnb_functional.create_dynamic_map(signed=signed).to(device)
        quantised, quant_state = bnb_functional.quantize_blockwise(values, code=code, blocksize=BNB_BLOCK)
        state.update({f"state{which}": quantised, f"qmap{which}": code, f"absmax{which}": quant_state.absmax})
    return state


def _gathered(local: torch.Tensor, param) -> torch.Tensor:
    """The whole tensor of a sharded parameter's local values (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local.view(param.to_local().shape), param.device_mesh, param.placements,
                              shape=param.shape, stride=param.stride()).full_tensor()  # fmt: skip


def _local_shard(whole: torch.Tensor, param) -> torch.Tensor:
    """This rank's part of a whole tensor every rank holds, laid out as `param`'s shard (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        whole.view(param.shape), param.device_mesh, param.placements, src_data_rank=None
    ).to_local()


def eight_bit_optimizer_problem(device: torch.device) -> str | None:
    """Why bitsandbytes' 8-bit AdamW cannot step on `device` (None: it can).

    Importing bitsandbytes succeeds even when its native library does not match the
    machine's CUDA; the first optimizer step would fail mid-run. One step on a tiny
    parameter (4096 elements: the smallest bitsandbytes keeps in 8 bits) finds out up front.
    """
    try:
        import bitsandbytes as bnb

        param = torch.nn.Parameter(torch.zeros(4096, device=device))
        param.grad = torch.ones_like(param)
        bnb.optim.AdamW8bit([param], lr=1e-3).step()
        if not torch.isfinite(param).all():
            return "a test step of AdamW8bit gave non-finite weights"
    except Exception as error:  # any failure here is the answer
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def epoch_order(num_pairs: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(num_pairs, generator=generator).tolist()


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """Which per-token log-probs are scored: position t scores labels[t + 1]."""
    return next_token_targets(labels) != -100


def report_or_stop_nonfinite(step: int, pairs, loss: float, grad_norm: float, in_a_row: int, settings, log) -> None:
    """Name a skipped step; stop the run, with the likely causes, once too many come in a row."""
    where = f"step {step + 1}: loss {loss}, gradient norm {grad_norm} for pairs {[p.location for p in pairs][:8]}"
    if in_a_row >= settings.max_nonfinite_steps:
        raise FloatingPointError(
            f"{where}: {in_a_row} steps in a row were not finite, stopping. Likely causes: a learning rate too "
            f"high for this model (train.lr={settings.lr:g}), half-precision weights without loss scaling "
            "(model.dtype), or a response the reference model finds impossible (a token it never emits)"
        )
    log(f"train: {where}: not finite, step skipped ({in_a_row} in a row; {settings.max_nonfinite_steps} stop the run)")


def chosen_nll(token_logps: torch.Tensor, seq_ids: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """Mean over the chosen responses (sequences 0..P-1) of their per-token negative log-likelihood."""
    flat, ids = token_logps.reshape(-1), seq_ids.reshape(-1)
    chosen = (ids >= 0) & (ids < num_pairs)
    index = torch.where(chosen, ids, num_pairs)  # everything else lands in a discarded slot
    sums = torch.zeros(num_pairs + 1, dtype=flat.dtype, device=flat.device).index_add(0, index, flat * chosen)
    counts = torch.zeros(num_pairs + 1, dtype=flat.dtype, device=flat.device).index_add(0, index, chosen.to(flat.dtype))
    return -(sums[:num_pairs] / counts[:num_pairs].clamp(min=1)).mean()


def precomputed_reference(seq_ids: torch.Tensor, values: list[float]) -> torch.Tensor:
    """Per-token tensor whose sequence sums are `values`: each value on its sequence's first scored token."""
    flat = seq_ids.reshape(-1)
    count = len(values)
    # First position of each sequence, without a host sync; unscored tokens go to a spare slot.
    first = torch.full((count + 1,), flat.numel(), dtype=torch.long, device=flat.device)
    positions = torch.arange(flat.numel(), device=flat.device)
    first.scatter_reduce_(0, torch.where(flat >= 0, flat, count), positions, reduce="amin")
    tokens = torch.zeros(flat.numel() + 1, dtype=torch.float32, device=flat.device)
    tokens[first[:count]] = torch.tensor(values, dtype=torch.float32).to(flat.device, non_blocking=True)
    return tokens[:-1].reshape(seq_ids.shape)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_stage(
    model,
    pairs: list[TrainPair],
    settings: TrainSettings,
    out_dir: str | Path,
    *,
    pad_id: int,
    reference: str | None,
    reference_model=None,
    log=print,
) -> dict:
    """Train the model's trainable parameters on `pairs`; resume from `out_dir` if it holds a checkpoint.

    `reference`: the role the DPO reference plays on the shared model ("reference" = the
    frozen previous adapter, "init" = adapters disabled); or a separate frozen
    `reference_model` (full fine-tuning); or neither, to use the pairs' precomputed
    reference log-probs (only without extrapolation).
    """
    if settings.batch_size % settings.micro_batch_size:
        raise ValueError(
            f"batch_size {settings.batch_size} is not a multiple of micro_batch_size {settings.micro_batch_size}"
        )
    ranks = world().size
    if settings.micro_batch_size % ranks:
        raise ValueError(f"micro_batch_size {settings.micro_batch_size} does not split over {ranks} processes")
    if not pairs:
        raise ValueError("no pairs to train on")
    extrapolate = settings.extrapolate if settings.refine else None
    if (
        reference is None
        and reference_model is None
        and (extrapolate is not None or any(p.ref_chosen is None for p in pairs))
    ):
        raise ValueError(
            "without a reference model, every pair needs precomputed reference log-probs and no extrapolation"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device

    # ---- setup
    compute_dtype = getattr(torch, settings.autocast_dtype) if settings.autocast_dtype else None
    # Several processes: FSDP2 shards the bodies (parameters become DTensors, so before the optimizer sees them).
    if world().distributed:
        what = "the frozen base whole on every rank" if settings.shard_frozen_base == "whole" else "the base sharded"
        log(f"train: FSDP2 over {world().size} processes, {what}, the LM head whole")
    shard_model(model, frozen_whole=settings.shard_frozen_base == "whole")
    if reference_model is not None:
        shard_model(reference_model)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(params, settings)
    steps_per_epoch = math.ceil(len(pairs) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, settings.warmup_ratio))
    threshold = NoiseThreshold(window=settings.tau_window, percentile=settings.noise_percentile)
    torch.manual_seed(settings.seed * 7919 + 1)  # a fresh start does not depend on what ran before
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_step = restore_checkpoint(out_dir, model, names, optimizer, scheduler, threshold, settings, log)
    if first_step:
        log(f"train: resuming at step {first_step}/{total_steps}")
    metrics_path, flags_path = out_dir / "metrics.jsonl", out_dir / "flags.jsonl"
    if world().is_main:
        truncate_metrics(metrics_path, first_step, log)
        truncate_metrics(flags_path, first_step, log)

    writer = tensorboard_writer(out_dir) if world().is_main else None
    main = world().is_main  # only rank 0 writes the stage's metrics and shows progress
    progress = tqdm(
        total=total_steps, initial=first_step, desc=f"train {out_dir.parent.name}", unit="step",
        disable=None if main else True,
    )  # fmt: skip

    # ---- loop
    model.train()
    # Steps whose loss or gradient was not finite: skipped and counted, the count carried over a resume.
    skipped_steps, bad_in_a_row = last_metrics(metrics_path).get("nonfinite_steps_skipped", 0), 0
    for step in range(first_step, total_steps):
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        order = epoch_order(len(pairs), settings.seed, epoch)
        step_pairs = [
            pairs[i] for i in order[step_in_epoch * settings.batch_size : (step_in_epoch + 1) * settings.batch_size]
        ]
        if settings.micro_batch_size < len(step_pairs):
            # Micro-batches of similar length pad less; the step's gradient sums the same pairs.
            step_pairs.sort(key=lambda p: len(p.prompt) + max(len(p.chosen), len(p.rejected)))
        alpha_t = settings.alpha if settings.refine and step >= settings.alpha_warmup * total_steps else 0.0
        # Statistics stay on the device until the step ends: one host sync per step (plus one
        # per round with refinement, whose tau window lives on the host).
        started, tokens, positions, step_metrics, step_flags = time.perf_counter(), 0, 0, 0.0, []
        tau, finite_margins = None, True
        window_before = threshold.state_dict()  # a skipped step leaves tau's window as it found it
        # A micro-batch is split over the ranks, each taking micro_batch_size / N of its pairs, so
        # any number of processes computes what one does: the same pairs, tau and flags.
        per_rank = settings.micro_batch_size // ranks
        for start in range(0, len(step_pairs), settings.micro_batch_size):
            round_pairs = step_pairs[start : start + settings.micro_batch_size]
            micro = round_pairs[world().rank * per_rank : (world().rank + 1) * per_rank]
            # The share of the step's loss this micro-batch carries (FSDP averages gradients over ranks).
            share = len(micro) / len(step_pairs)
            if not micro:  # a short last round: this rank still runs the collectives, on a pair weighted 0
                micro = round_pairs[:1]
            cpu_batch = collate_pairs(micro, pad_id, packed=settings.packing)
            if share:
                tokens += int(cpu_batch["attention_mask"].sum())
                positions += cpu_batch["attention_mask"].numel()
            cu_seq_lens = cpu_batch.pop("cu_seq_lens", None)  # stays on the CPU: see models.final_hidden_states
            batch = {k: v.to(device) for k, v in cpu_batch.items()}
            with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype is not None):
                logps = sequence_token_logprobs(
                    model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                    reference=reference, reference_model=reference_model, extrapolate=extrapolate,
                    position_ids=batch.get("position_ids"), cu_seq_lens=cu_seq_lens,
                )  # fmt: skip
            layout = {"seq_ids": batch["seq_ids"], "num_pairs": len(micro)}
            ref_tokens = logps.reference
            if reference is None and reference_model is None:
                values = [p.ref_chosen for p in micro] + [p.ref_rejected for p in micro]
                ref_tokens = precomputed_reference(batch["seq_ids"], values)
            # tau comes from the window before this micro-batch's margins enter it (the official
            # order): a pair is never judged against a threshold its own margin moved.
            tau = threshold.tau if settings.refine else None
            smoothing = [p.label_smoothing for p in micro]  # a host list: the loss checks it without a sync
            result = spa_loss(
                logps.policy, ref_tokens, **layout, extrapolated_logps=logps.extrapolated, beta=settings.beta,
                alpha=alpha_t if tau is not None else 0.0, tau=tau, loss_type=settings.loss_type,
                label_smoothing=torch.tensor(smoothing, dtype=torch.float64) if any(smoothing) else 0.0,
            )  # fmt: skip
            if settings.refine:
                # Every rank's margins, in rank order, enter the window before the next round's tau.
                margins, confident = torch.stack(
                    [result.noise_margin, result.confident.to(result.noise_margin)]
                ).tolist()
                mine = [(p.location, m, bool(c)) for p, m, c in zip(micro, margins, confident, strict=True)]
                round_flags = gather_lists(mine if share else [])  # one host sync per micro-batch, as before
                margins = [m for _, m, _ in round_flags]
                if all(math.isfinite(m) for m in margins):
                    threshold.update(margins)
                else:
                    finite_margins = False  # tau's window never takes a NaN; the step is skipped below
                step_flags += [(tau, *flag) for flag in round_flags]
            loss = result.loss
            if settings.nll_alpha:
                loss = loss + settings.nll_alpha * chosen_nll(logps.policy, batch["seq_ids"], len(micro))
            (loss * (share * ranks)).backward()
            step_metrics = step_metrics + result.metric_values() * share
            # The graph's nodes outlive the backward while its outputs are referenced: dropped here, or
            # the embedding output that checkpointing makes a leaf stays, with its gradient, through
            # the next micro-batch's forward.
            del loss, result, logps, ref_tokens
        step_metrics = sum_across_ranks(torch.cat([step_metrics, step_metrics.new_tensor([tokens, positions])]))
        *metric_values, tokens, positions = step_metrics.tolist()  # one host sync
        totals = dict(zip(SPALossOutput.METRIC_NAMES, metric_values, strict=True))
        average_whole_gradients(params)
        grad_norm = float(clip_grad_norm(params, settings.max_grad_norm))
        lr = optimizer.param_groups[0]["lr"]
        # Checked before the optimizer step, so the weights never see a non-finite gradient.
        if math.isfinite(totals["loss"]) and math.isfinite(grad_norm) and finite_margins:
            optimizer.step()
            bad_in_a_row = 0
            flag_records = [
                {"step": step + 1, "pair": location, "noise_margin": m, "tau": t, "confident": c}
                for t, location, m, c in step_flags
            ]
        else:
            skipped_steps, bad_in_a_row, flag_records = skipped_steps + 1, bad_in_a_row + 1, []
            threshold.load_state_dict(window_before)
            report_or_stop_nonfinite(step, step_pairs, totals["loss"], grad_norm, bad_in_a_row, settings, log)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        elapsed = time.perf_counter() - started
        record = {
            "step": step + 1, "epoch": epoch, "lr": lr, "grad_norm": grad_norm,
            **totals, "spa/alpha": alpha_t if tau is not None else 0.0, "spa/tau": tau,
            "label_smoothing": sum(p.label_smoothing for p in step_pairs) / len(step_pairs),
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "padding": 1 - tokens / positions, "nonfinite_steps_skipped": skipped_steps,
            "peak_memory_mib": peak_memory_bytes(device) / 2**20,
        }  # fmt: skip
        if main:
            append_step_records(metrics_path, flags_path, record, flag_records)
        if writer is not None:
            for name, value in record.items():
                if isinstance(value, (int, float)) and name not in ("step", "epoch"):
                    writer.add_scalar(name, value, step + 1)
        progress.update(1)
        progress.set_postfix(
            loss=f"{record['loss']:.4f}",
            acc=f"{record['rewards/accuracies']:.2f}",
            tok_s=f"{record['tokens_per_s']:.0f}",
        )
        # Every rank saves, and stops, together: at this step if a signal had reached any of them by
        # now; one that arrives while the checkpoint is written counts at the next step.
        stopping = any_rank(stop_requested())
        if (step + 1) % settings.save_every == 0 or step + 1 == total_steps or stopping:
            save_checkpoint(out_dir, step + 1, model, names, optimizer, scheduler, threshold, settings)
        where = f"after training step {step + 1}/{total_steps} of {out_dir.parent.name} (checkpoint written)"
        stop_here(where, agreed=stopping)
    progress.close()
    if writer is not None:
        writer.close()
    if total_steps > first_step:
        log(f"train: {total_steps} steps done, last loss {record['loss']:.4f}; metrics in {metrics_path}")
    return {"steps": total_steps, "pairs": len(pairs), "metrics": str(metrics_path)}


def append_step_records(metrics_path: Path, flags_path: Path, record: dict, flag_records: list[dict]) -> None:
    with writing(metrics_path), metrics_path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if flag_records:  # per pair: SPA's noise margin and flag, for analysis against gold labels
        with writing(flags_path), flags_path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in flag_records))


def tensorboard_writer(out_dir: Path):
    """A SummaryWriter when TensorBoard is installed (optional extra), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


# --------------------------------------------------------------------------- checkpoints


# Settings only self-refinement reads: a stage without it (stage 0) does not depend on them.
REFINEMENT_ONLY = ("alpha", "alpha_warmup", "noise_percentile", "tau_window", "extrapolate")


class CheckpointMismatch(ValueError):
    """A checkpoint written by another training configuration than the one resuming it."""


CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "rng.pt")
KEEP_CHECKPOINTS = 2  # the latest and the one before: a damaged latest falls back to it


def whole_training_state(model, names: list[str], optimizer) -> tuple[dict, dict]:
    """(trainable weights by name, optimizer state) as one process holds them, whatever the number of ranks.

    Under FSDP2 both are gathered from the shards (torch.distributed.checkpoint's full state
    dict) and the optimizer's state is keyed by position, as `optimizer.state_dict()` keys it,
    so a checkpoint resumes on any number of processes, one included.
    """
    state = dict(model.named_parameters())
    weights = {n: full_tensor(state[n].detach()).contiguous().cpu() for n in names}
    if not world().distributed or isinstance(optimizer, ShardedAdamW8bit):  # the latter gathers its own shards
        return weights, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    position = {name: i for i, name in enumerate(names)}
    groups = [{**g, "params": [position[n] for n in g["params"]]} for g in full.get("param_groups", [])]
    return weights, {"state": {position[n]: v for n, v in full.get("state", {}).items()}, "param_groups": groups}


def load_training_state(model, names: list[str], optimizer, weights: dict, optimizer_state: dict) -> None:
    """Put a checkpoint's whole state back, into shards under FSDP2."""
    if not world().distributed:
        state = dict(model.named_parameters())
        with torch.no_grad():
            for name in names:
                state[name].copy_(weights[name])
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, {n: weights[n] for n in names}, options=options)
    if isinstance(optimizer, ShardedAdamW8bit):  # it takes the one-process state itself
        optimizer.load_state_dict(optimizer_state)
        return
    by_name = {
        "state": {names[i]: v for i, v in optimizer_state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optimizer_state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, optim_state_dict=by_name, options=options)


def save_checkpoint(out_dir: Path, step: int, model, names, optimizer, scheduler, threshold, settings) -> Path:
    """Write checkpoint-<step>/ under a temporary name with a checksum manifest, rename it, repoint `latest`.

    Every rank takes part in gathering the state; rank 0 writes it.
    """
    final = out_dir / f"checkpoint-{step:07d}"
    weights, optimizer_state = whole_training_state(model, names, optimizer)
    if not world().is_main:
        barrier()
        return final
    tmp = out_dir / f".checkpoint-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(final):
        tmp.mkdir()
        save_file(weights, tmp / "trainable.safetensors")
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        torch.save({"cpu": torch.get_rng_state(), "cuda": cuda_rng}, tmp / "rng.pt")
        manifest = {name: sha256_of(tmp / name) for name in CHECKPOINT_FILES}
        meta = {"step": step, "threshold": threshold.state_dict(), "settings": asdict(settings), "sha256": manifest}
        (tmp / "state.json").write_text(json.dumps(meta))
        for f in tmp.iterdir():
            with f.open("rb") as handle:
                os.fsync(handle.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text_atomic(out_dir / "latest", final.name)
    kept = sorted(out_dir.glob("checkpoint-*"))[-KEEP_CHECKPOINTS:]
    for old in [*out_dir.glob("checkpoint-*"), *out_dir.glob(".checkpoint-*.tmp")]:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)
    barrier()  # the other ranks go on once the checkpoint is whole on disk
    return final


def checkpoint_problem(path: Path) -> tuple[str | None, dict | None]:
    """(what is wrong with a checkpoint folder, or None; its state.json when readable)."""
    try:
        meta = json.loads((path / "state.json").read_text())
        step, manifest = int(meta["step"]), meta.get("sha256")  # no manifest: written by an earlier release
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{path / 'state.json'} is unreadable ({type(error).__name__})", None
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            return f"{path / name} is missing", meta
        if manifest is not None and sha256_of(path / name) != manifest.get(name):
            return f"{path / name} does not match its checksum (truncated or damaged)", meta
    return (None, meta) if step > 0 else (f"{path / 'state.json'} holds no step", meta)


def restore_checkpoint(out_dir: Path, model, names, optimizer, scheduler, threshold, settings, log=print) -> int:
    """Load the newest good checkpoint; return the step to continue from (0 if there is none).

    Every checkpoint is verified against its checksum manifest first: a damaged one is named
    in the log and the one before it is used (or, with none left, the stage's training
    starts over).
    """
    candidates = sorted(out_dir.glob("checkpoint-*"), reverse=True)
    for path in candidates:
        problem, meta = checkpoint_problem(path)
        if problem is None:
            break
        log(f"train: checkpoint {path.name} is damaged: {problem}; falling back to the one before")
    else:
        if candidates:
            log(f"train: no usable checkpoint in {out_dir}; training this stage from its first step")
        return 0
    # A setting added after the checkpoint was written counts as its default, and one removed since
    # is not compared (label_smoothing now travels with each pair): an upgrade that leaves a run's
    # behaviour as it was does not orphan its checkpoints.
    known = asdict(TrainSettings())
    saved = {**known, **{name: value for name, value in meta["settings"].items() if name in known}}
    current = asdict(settings)
    for name in RESUMABLE_CHANGES:  # they change how the math is laid out, not its result
        saved.pop(name, None), current.pop(name, None)
    if not current["refine"] and not saved["refine"]:
        for name in REFINEMENT_ONLY:  # unused without self-refinement (stage 0), and not in its fingerprint
            saved.pop(name, None), current.pop(name, None)
    if saved != current:
        changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        raise CheckpointMismatch(
            f"{path}: the checkpoint was written with other training settings: "
            + ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        )
    weights = load_file(path / "trainable.safetensors")
    missing = set(names) - set(weights)
    if missing:
        raise CheckpointMismatch(f"{path}: the checkpoint lacks {sorted(missing)[:3]}")
    saved_state = torch.load(path / "optimizer.pt", weights_only=False)
    load_training_state(model, names, optimizer, weights, saved_state["optimizer"])
    scheduler.load_state_dict(saved_state["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    threshold.load_state_dict(meta["threshold"])
    return int(meta["step"])


def truncate_metrics(path: Path, last_step: int, log=print) -> None:
    """Drop metric (or flag) lines written after the checkpoint we resume from (they will be redone).

    A garbled line (a torn write, a damaged disk) is dropped and named in the log; the lines
    after it are kept.
    """
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept, garbled = [], []
    for number, line in enumerate(lines, start=1):
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            garbled.append(number)
    if [n for n in garbled if n < len(lines)]:  # a torn last line is a kill's ordinary trace; others are named
        log(f"train: {path}: {len(garbled)} garbled line(s) dropped (line {', '.join(map(str, garbled[:5]))})")
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def last_metrics(metrics_path: Path) -> dict:
    """The last step's metrics of a stage (empty before its first step)."""
    lines = [line for line in metrics_path.read_text().splitlines() if line.strip()] if metrics_path.exists() else []
    return json.loads(lines[-1]) if lines else {}
