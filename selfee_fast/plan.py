"""A memory plan before anything loads: each stage's peak GPU memory, from the model's config.json alone.

`plan_run(config)` reads the model folder's `config.json` (no weights) and estimates the peak
memory of generation, the judge and training for a Llama/Mistral-shaped decoder (attention
with grouped KV heads, a gated MLP, RMSNorm, an untied or tied head), as the engine runs
them: the frozen base in its precision (16-bit, 8-bit or NF4 with its quantisation
constants), LoRA adapters and their gradients, the optimizer's state, the frozen reference
copies the stage needs, activations with or without gradient checkpointing, the fused head's
working buffer (it never holds [tokens, vocab] logits), the KV cache of generation. It then
picks the largest training micro-batch, generation batch and judge batch that fit
`model.max_memory_gb` (by default the card's memory; on a CPU estimates only).

A training step's peak is the largest of its phases (the reference's forward, the fused head, a
layer's backward, the optimizer's update; under FSDP2 also the forward's first all-gathers and the
root's reduce-scatter), each counting only what is alive in it: gradients from the backward that
makes them, gathered parameters while FSDP2 holds them (bench/NOTES.md has the traces).

The activation terms count, per token and layer, the tensors autograd saves in transformers'
Llama forward (bench/NOTES.md lists them and compares the total with peaks measured on the
CPU). Every batch is taken at its longest: all rows `data.max_length` tokens, padded (the
attention mask held), so the plan errs on the high side.

Under torchrun every estimate is one rank's (`processes`): training splits each micro-batch over
the ranks and holds the weights as FSDP2 shards them (`fsdp2_layout`); generation and judging
run whole models at one process's batch.

`selfee-fast plan cfg.yaml [--json] [--processes N]` prints it; `selfee-fast run` prints it first
(one rank's plan under torchrun).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .chunked import DEFAULT_CHUNK_BYTES
from .config import ConfigError, RunConfig

GIB = 2**30
# Model types whose decoder layer is the one the activation terms describe.
LLAMA_SHAPED = ("llama", "mistral", "qwen2", "qwen3")
# A CUDA context, cuBLAS workspaces and the caching allocator's fragmentation take card memory that
# torch.cuda.max_memory_allocated never counts: the plan fits its estimates under what is left.
CUDA_CONTEXT_BYTES = GIB // 2
FRAGMENTATION_FACTOR = 0.9
# NF4 with double quantisation (QLoRA, bitsandbytes): 4 bits per weight, an 8-bit absmax per block
# of 64 weights, and an fp32 absmax (plus offset) per 256 of those blocks.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 8 / (64 * 256)
# bitsandbytes keeps tensors under this many elements in 32-bit state even in its 8-bit optimizers.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256  # 8-bit optimizer state: one fp32 absmax per block of this many elements
# The fused head's working memory. GPU: the fp32 hidden-gradient accumulator of the fused backward
# (triton_logprobs.ACCUMULATOR_BYTES). CPU: the vocabulary tiles of policy, reference and
# extrapolated logits, chunked.DEFAULT_CHUNK_BYTES together (the gathered rows are counted per token).
TRITON_HEAD_BUFFER_BYTES = 64 * 2**20
CPU_HEAD_BUFFER_BYTES = DEFAULT_CHUNK_BYTES
JUDGE_BATCH_PROMPTS = 16  # judge.judge_generations' batch: fixed, its batches are part of a resumed judgment
BATCH_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a decoder: read from config.json, nothing else."""

    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool = False
    model_type: str = "llama"

    @classmethod
    def from_config_json(cls, folder: str | Path) -> ModelShape:
        path = Path(folder) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"model.path: {path} does not exist (the plan reads the model's config.json)") from None
        except (OSError, ValueError) as error:
            raise ConfigError(f"model.path: {path} is not readable JSON ({error})") from None
        raw = raw.get("text_config", raw)  # a multimodal wrapper: its language model
        try:
            hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
            return cls(
                hidden_size=hidden, intermediate_size=int(raw["intermediate_size"]),
                layers=int(raw["num_hidden_layers"]), heads=heads,
                kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads), vocab_size=int(raw["vocab_size"]),
                tied_embeddings=bool(raw.get("tie_word_embeddings", False)),
                model_type=str(raw.get("model_type", "unknown")),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"model.path: {path} lacks a decoder's shape ({error!r})") from None

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of one layer's linear layers: q, k, v, o, gate, up, down."""
        h, i = self.hidden_size, self.intermediate_size
        return [(h, self.q_width), (h, self.kv_width), (h, self.kv_width), (self.q_width, h), (h, i), (h, i), (i, h)]

    @property
    def body_linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes())

    @property
    def other_params(self) -> int:
        """Embedding, head (untied) and RMSNorm weights: never quantised."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return embeddings + (2 * self.layers + 1) * self.hidden_size

    @property
    def params(self) -> int:
        return self.body_linear_params + self.other_params

    def tensor_sizes(self) -> list[int]:
        """The element count of every weight tensor (an 8-bit optimizer keeps the small ones in 32 bits)."""
        per_layer = [a * b for a, b in self.linear_shapes()] + [self.hidden_size] * 2
        embeddings = [self.vocab_size * self.hidden_size] * (1 if self.tied_embeddings else 2)
        return per_layer * self.layers + embeddings + [self.hidden_size]


@dataclass(frozen=True)
class Precision:
    """How a run holds and computes: what the plan needs of model.* and the device."""

    weight_bytes: int  # the base weights' dtype (2: bf16/fp16, 4: fp32)
    activation_bytes: int  # what the forward computes in (the autocast dtype, else the weights')
    quantization: str = "none"  # none | 8bit | 4bit
    lora_r: int = 16  # 0: full fine-tuning
    gradient_checkpointing: bool = True
    optimizer: str = "adamw8bit"
    on_gpu: bool = True


@dataclass
class Estimate:
    """One stage's peak at one batch size, by component (bytes)."""

    stage: str
    batch_size: int  # pairs per micro-batch (train) or prompts per batch (generation, judge)
    components: dict[str, int] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        return sum(self.components.values())


# --------------------------------------------------------------------------- the components


def weight_bytes(shape: ModelShape, precision: Precision) -> int:
    """The base model's weights: body linears by quantisation; embeddings, head and norms in the weights' dtype."""
    linear = shape.body_linear_params
    if precision.quantization == "4bit":
        body = linear * NF4_BYTES_PER_WEIGHT
    elif precision.quantization == "8bit":
        # LLM.int8: one byte per weight and an fp32 scale per output row.
        body = linear + 4 * shape.layers * sum(out for _, out in shape.linear_shapes())
    else:
        body = linear * precision.weight_bytes
    return int(body + shape.other_params * precision.weight_bytes)


def lora_params(shape: ModelShape, r: int) -> list[int]:
    """The element count of every LoRA matrix (A: r x in, B: out x r) on every linear of the body."""
    return [n for _ in range(shape.layers) for a, b in shape.linear_shapes() for n in (r * a, r * b)]


def optimizer_bytes(tensor_sizes: list[int], optimizer: str) -> int:
    """AdamW's two moments: fp32 (8 bytes per element) or bitsandbytes' 8-bit (2 bytes plus block absmaxes)."""
    if optimizer == "adamw":
        return 8 * sum(tensor_sizes)
    total = 0
    for n in tensor_sizes:
        total += 8 * n if n < BNB_MIN_8BIT_SIZE else 2 * n + 2 * 4 * -(-n // BNB_BLOCK)
    return total


def layer_saved_bytes_per_token(shape: ModelShape, precision: Precision) -> float:
    """What autograd keeps of one decoder layer, per token, for its backward (transformers' Llama, sdpa).

    Read off torch.profiler's memory timeline of a training step (bench/NOTES.md); what a tensor is
    kept for is said beside each term. A padded batch's float attention mask is per row, not per
    token: `sdpa_mask_bytes` adds it.
    """
    a, h, q, i = precision.activation_bytes, shape.hidden_size, shape.q_width, shape.intermediate_size
    # Each RMSNorm (two) keeps its input in fp32 for the backward of its pow and its scaling (the
    # residual stream itself in fp32, an fp32 copy of it under 16 bits) with its [tokens, 1] fp32
    # rsqrt, and hands its output to the projections, whose adapters (LoRA A) or weights keep it.
    # The scaling by a frozen norm weight keeps only the weight; a trained one (full fine-tuning)
    # also keeps the normalised input it multiplies.
    norms = 2 * (4 * h + 4 + a * h + (0 if precision.lora_r else a * h))
    # sdpa keeps q after RoPE, k and v repeated to every head (transformers repeats them rather than
    # asking sdpa for GQA when the batch carries a mask; with one KV head per head they are k and v
    # themselves: q_width either way, except that a single KV head is repeated as a stride-0 view,
    # which keeps k and v at their own width), its output (o_proj reads it as is: sdpa lays it out
    # token-major, so the transpose back is a view of the same storage) and its fp32 log-sum-exp per
    # head. RoPE's products keep only cos and sin (per position), so q and k before RoPE, and their
    # rotated halves, are not kept.
    repeated_kv = shape.kv_width if shape.kv_heads == 1 else q
    attention = 2 * a * q + 2 * a * repeated_kv + 4 * shape.heads
    # The gated MLP: gate's and up's outputs, silu(gate) (the product's backward reads silu(gate) and
    # up, silu's reads gate) and their product, which down_proj's adapter (or weight) keeps.
    mlp = 4 * a * i
    lora = 0
    if precision.lora_r:
        lora = 7 * precision.lora_r * a  # each LoRA B keeps the r outputs of its A
        if a < 4:
            # peft casts each adapted linear's input to the adapter's fp32 dtype and autocast casts it
            # back: a copy of the input per adapted linear is what lora_A keeps (q, k, v, gate, up
            # read the normalised hidden state, o and down their own inputs).
            lora += a * (5 * h + q + i)
    return norms + attention + mlp + lora


def sdpa_mask_bytes(precision: Precision, rows: int, max_length: int) -> int:
    """The float copy of a padded batch's boolean [rows, 1, T, T] mask that torch's sdpa makes in every
    layer's attention (in the compute dtype), and keeps for its backward when the layer trains."""
    return precision.activation_bytes * attention_mask_bytes(rows, max_length)


def backward_working_bytes_per_token(shape: ModelShape, precision: Precision) -> float:
    """The gradients in flight at the peak of one layer's backward, per token.

    The peak comes in the MLP's backward, where the widest tensors are (the attention's, q_width
    wide, come later, once the MLP's saved tensors are freed): down_proj hands back two gradients of
    its input, one through the frozen weight and one through the adapter, and autograd adds them
    into a third (full fine-tuning: the product's gradient and the two the product's backward makes
    of it). Beside them, the gradient of the layer's output (the residual stream's), which the
    layer's backward reads.
    """
    return precision.activation_bytes * (shape.hidden_size + 3 * shape.intermediate_size)


def layer_backward_bytes_per_token(shape: ModelShape, precision: Precision) -> float:
    """What one layer's backward adds, at its peak, to what is kept through the backward, per token.

    With gradient checkpointing the layer is recomputed first: everything it saves, except down_proj's
    input (freed once down_proj's backward has run, before the peak) and, in fp32, the first norm's
    input (the checkpointed layer input itself, already kept). Without it, the saved tensors are
    already kept: the layer's backward adds its gradients and has freed down_proj's input.
    """
    a, h = precision.activation_bytes, shape.hidden_size
    added = backward_working_bytes_per_token(shape, precision) - a * shape.intermediate_size
    if precision.gradient_checkpointing:
        added += layer_saved_bytes_per_token(shape, precision) - (4 * h if a == 4 else 0)
    return added


def forward_working_bytes_per_token(shape: ModelShape, precision: Precision) -> float:
    """One layer's transient tensors in a forward without gradient (nothing is kept past the layer)."""
    a, h = precision.activation_bytes, shape.hidden_size
    return 4 * h + a * (2 * h + 2 * shape.q_width + 2 * shape.kv_width + 3 * shape.intermediate_size)


def attention_mask_bytes(rows: int, tokens: int) -> int:
    """transformers' 4D boolean mask of a padded batch: [rows, 1, T, T], one per forward."""
    return rows * tokens * tokens


def head_buffer_bytes(precision: Precision) -> int:
    return TRITON_HEAD_BUFFER_BYTES if precision.on_gpu else CPU_HEAD_BUFFER_BYTES


# --------------------------------------------------------------------------- the stages


@dataclass(frozen=True)
class RankLayout:
    """What one rank holds of the model through a training step, and what lives only in some phases (bytes).

    `held` is there in every phase: the weights, the adapter, the frozen reference, the optimizer's state
    (from the second step on). The rest exists only from the moment the step makes it: gradients from the
    backward that produces them (`zero_grad(set_to_none=True)` frees them after every step), what FSDP2
    gathers only while it holds it. One process gathers nothing.
    """

    held: dict[str, int]
    head_gradient: int  # the LM head's (full fine-tuning), made by the head's backward
    body_gradients: int  # the rest (the adapter's with LoRA), made by the layers' backward
    trained: int  # every tensor the optimizer updates on this rank
    largest_trained: int  # the largest of them
    forward_gathers: int = 0  # the forward's start: two units' all-gather outputs with the parameters they fill
    root: int = 0  # the root unit's parameters, unsharded from the policy's forward to the end of its backward
    reference_gathers: int = 0  # the reference's forward: a layer's all-gather output with its parameters
    backward_gathers: int = 0  # a layer's backward: two layers unsharded and the computed one's gradients
    root_reduce_scatter: int = 0  # the end of the backward: the root's gradient and its reduce-scatter copy


def one_process_layout(shape: ModelShape, precision: Precision, frozen_reference: bool) -> RankLayout:
    """A single process: every tensor whole, nothing gathered."""
    a, w = precision.activation_bytes, precision.weight_bytes
    if precision.lora_r:
        sizes = lora_params(shape, precision.lora_r)
        held = {"weights": weight_bytes(shape, precision), "adapter": 4 * sum(sizes)}  # the adapter in fp32
        if frozen_reference:
            held["frozen reference"] = 4 * sum(sizes)  # pi_{i-1}: a frozen copy of the adapter
        held["optimizer"] = optimizer_bytes(sizes, precision.optimizer)
        return RankLayout(held, head_gradient=0, body_gradients=4 * sum(sizes), trained=4 * sum(sizes),
                          largest_trained=4 * max(sizes))  # fmt: skip
    sizes = shape.tensor_sizes()
    # Every weight trains (fp32 master weights under model.dtype=auto), its gradient in the same dtype. The
    # reference is a model of its own: pi_init in stage 0, pi_{i-1} in an iteration.
    reference = weight_bytes(shape, Precision(a, a, on_gpu=precision.on_gpu))
    held = {"weights": w * shape.params, "frozen reference": reference,
            "optimizer": optimizer_bytes(sizes, precision.optimizer)}  # fmt: skip
    # Tied, the head is the embedding, whose gradient the head's backward starts.
    head = w * shape.vocab_size * shape.hidden_size
    return RankLayout(held, head_gradient=head, body_gradients=w * shape.params - head, trained=w * shape.params,
                      largest_trained=w * max(sizes))  # fmt: skip


def optimizer_update_bytes(layout: RankLayout, precision: Precision) -> int:
    """The temporaries of the optimizer's update, beside every gradient and the state.

    torch's AdamW computes the denominator out of place, sqrt(v) and then its quotient: on the CPU (the
    single-tensor path, traced) two of one tensor's size at a time, the largest's at worst; on a GPU its
    default is the foreach path (read in torch.optim.adam, not measured here), whose sqrt is one temporary
    per tensor at once. bitsandbytes' 8-bit AdamW updates in place in its kernel.
    """
    if precision.optimizer != "adamw":
        return 0
    return layout.trained if precision.on_gpu else 2 * layout.largest_trained


def training_estimate(shape: ModelShape, precision: Precision, pairs: int, max_length: int, *,
                      frozen_reference: bool = True, processes: int = 1, base_layout: str = "whole",
                      micro_batches: int = 1) -> Estimate:  # fmt: skip
    """One training step of `pairs` pairs per micro-batch, all rows `max_length` tokens: the peak of its phases.

    `frozen_reference`: an SPA iteration's reference pi_{i-1} (a frozen adapter copy with LoRA,
    a frozen model copy with full fine-tuning); stage 0's reference is the base (adapters off).
    `processes` > 1: one rank's peak under torchrun with FSDP2 (`fsdp2_layout`): each rank takes
    pairs / processes of the micro-batch; `base_layout` is where a LoRA run's frozen base lives
    ("whole" on every rank, or "sharded"; model.shard_frozen_base). `micro_batches`: how many
    micro-batches a step accumulates (train.batch_size / train.micro_batch_size); from the second on,
    every gradient already exists in every phase.

    The components are what every phase holds (weights, adapter, frozen reference, optimizer state) and
    the parts of the phase that sets the peak, named by its "working: ..." part.
    """
    if pairs % processes:
        raise ValueError(f"{pairs} pairs per micro-batch do not split over {processes} processes")
    est = Estimate("train", pairs)
    pairs //= processes  # the activations and the head below are one rank's
    a, h = precision.activation_bytes, shape.hidden_size
    rows = 2 * pairs
    tokens = rows * max_length
    if processes > 1:
        layout = fsdp2_layout(shape, precision, processes, base_layout, frozen_reference)
    else:
        layout = one_process_layout(shape, precision, frozen_reference)
    est.components.update(layout.held)

    saved = layer_saved_bytes_per_token(shape, precision) * tokens
    mask = sdpa_mask_bytes(precision, rows, max_length)
    # Kept through the backward: each layer's input alone with checkpointing (a layer is recomputed
    # when its backward comes), everything every layer saved without it; the batch's attention mask.
    if precision.gradient_checkpointing:
        kept = shape.layers * a * h * tokens
    else:
        kept = shape.layers * (saved + mask)
        if precision.lora_r:
            # The embedding is frozen, so the first layer's input needs no gradient and its first norm
            # keeps neither that input nor an fp32 copy of it (with checkpointing, the engine makes the
            # input require a gradient, and the checkpoint keeps it).
            kept -= 4 * h * tokens
    activations = int(kept + attention_mask_bytes(rows, max_length))
    # The batch's input ids, attention mask, labels and sequence ids, int64 [rows, T]: the whole step.
    batch = 4 * 8 * tokens
    # The per-token log-probs in fp32, from the head's forward until the micro-batch's backward returns:
    # the policy's and the reference's, and in an SPA iteration DND's extrapolated ones (counted always).
    logprobs = 3 * 4 * tokens
    everything = layout.head_gradient + layout.body_gradients
    # Gradients of the micro-batches before this one, when a step accumulates several: there from the start.
    accumulated = everything if micro_batches > 1 else 0

    # The phases of a step, each with what is alive in it beside `held`:
    # - the reference's forward without gradient, after the policy's (its final hidden state and the
    #   final norm's saved input held): one layer's transient tensors, the float mask its sdpa makes;
    # - the fused head, forward and backward (the policy's and the reference's final hidden states, the
    #   final norm's saved input, the gradient it hands back, one working buffer, never [tokens, vocab]
    #   logits; the CPU path also keeps each token's fp32 input-gradient direction and gathers the rows
    #   it works on); a trained head's gradient is made here, the body's do not exist yet;
    # - then, once the head's buffers are freed, one layer's backward: the first one to run, while every
    #   layer's checkpoint (or saved tensors) is still kept. The body's gradients are all counted: the
    #   last layer's backward holds nearly all of them (over little else), the first one all activations;
    # - the optimizer's update: every gradient and the update's temporaries, the activations freed.
    # The gathered parameters are counted only in the phases where FSDP2 holds them (`fsdp2_layout`).
    reference = tokens * (forward_working_bytes_per_token(shape, precision) + 4 * h + a * h) + mask
    head = tokens * (2 * a * h + (4 * h + a * h) + a * h) + head_buffer_bytes(precision)
    if not precision.on_gpu:
        head += tokens * 3 * 4 * h  # the fp32 direction, and the chunk's gathered policy and reference rows
    layer = layer_backward_bytes_per_token(shape, precision) * tokens
    if precision.gradient_checkpointing:
        layer += mask  # the recomputed layer's sdpa makes its float mask again
    phases: list[dict[str, int]] = [
        {"working: the reference's forward": int(reference), "activations": activations,
         "gradients": accumulated, "FSDP2: gathered": layout.root + layout.reference_gathers},
        {"working: fused head": int(head), "activations": activations,
         "gradients": layout.head_gradient + (layout.body_gradients if micro_batches > 1 else 0),
         "FSDP2: gathered": layout.root, "log-probs": logprobs},
        {"working: a layer's backward": int(layer), "activations": activations, "gradients": everything,
         "FSDP2: gathered": layout.root + layout.backward_gathers, "log-probs": logprobs},
        {"working: the optimizer's update": optimizer_update_bytes(layout, precision), "gradients": everything},
    ]  # fmt: skip
    if layout.forward_gathers:
        # FSDP2's first all-gathers of the policy's forward (the root's and the first layer's): each
        # unit's all-gather output and the unsharded parameters it is copied into exist together, over
        # the embedding's output and the attention mask.
        phases.append({"working: the forward's first all-gathers": layout.forward_gathers,
                       "activations": int(a * h * tokens + attention_mask_bytes(rows, max_length)),
                       "gradients": accumulated})  # fmt: skip
    if layout.root_reduce_scatter:
        # The end of the backward: the root's unsharded gradient, then the reduce-scatter input it is
        # copied into and the copy c10d makes of that, over every other gradient (the activations freed).
        phases.append({"working: the root's reduce-scatter": layout.root_reduce_scatter, "gradients": everything,
                       "log-probs": logprobs})  # fmt: skip
    for phase in phases:
        phase["batch"] = batch
    peak = max(phases, key=lambda phase: sum(phase.values()))
    est.components.update({name: value for name, value in peak.items() if value})
    return est


def shard_elements(rows: int, cols: int, processes: int) -> int:
    """What one rank holds of a [rows, cols] parameter under FSDP2: dim 0 split `processes` ways, padded
    to a multiple of it (FSDP2 keeps the padded shard; rank 0's is never the short one)."""
    return -(-rows // processes) * cols


def fsdp2_layout(shape: ModelShape, precision: Precision, processes: int, base_layout: str,
                 frozen_reference: bool) -> RankLayout:  # fmt: skip
    """One rank's weights, gradients and optimizer state under distributed.shard_model, and what FSDP2
    gathers when.

    shard_model makes each decoder layer an FSDP2 unit and the body the root unit over what is left
    of it (the embedding, unless tied to the head, and the final norm); the LM head is passed as
    ignored and stays whole on every rank, and so does every frozen parameter of a LoRA run with
    the base "whole". A sharded parameter is a dim-0 shard per rank; its gradient and AdamW's
    moments are shards of the same shape. What is gathered, with fully_shard's defaults (traced on
    2 CPU processes, bench/NOTES.md):
    - an all-gather fills a unit's unsharded parameters from an output buffer, and both exist until
      the copy ends: at the policy's forward start, the root's and the first layer's together;
    - a layer unit reshards after its forward (reshard_after_forward=None is True for non-root
      units), so a forward holds one layer's unsharded parameters at a time, and the head's phase
      none; in the backward the unit being computed is gathered again and the one before it is
      prefetched (FSDP2's default backward prefetch of the previous unit in forward order): two
      layers in flight, and the computed layer's unsharded gradients until its post-backward
      reduce-scatters them into the sharded ones;
    - the root unit does not reshard after its forward (None is False for the root): its
      embedding and final norm stay unsharded from the body's forward until its backward ends, where
      its gradient is copied into a reduce-scatter input; a frozen reference model's root, whose
      forwards have no backward, keeps them unsharded from its first forward on (seen on a 1-rank
      gloo mesh: the root's parameters stay plain tensors after a forward without gradient).
    A quantised (QLoRA) base is never sharded (preflight refuses "sharded" for it): it stays whole on
    every rank in its 4-bit layout, like any frozen base kept whole.
    """
    n = processes
    w, a, h = precision.weight_bytes, precision.activation_bytes, shape.hidden_size
    linears = [(out, inp) for inp, out in shape.linear_shapes()]  # torch's [out, in] weights
    layer = [*linears, (h, 1), (h, 1)]  # and the two RMSNorms
    root = ([] if shape.tied_embeddings else [(shape.vocab_size, h)]) + [(h, 1)]  # embedding, final norm
    head = shape.vocab_size * h  # whole on every rank (tied: it is the embedding, whole with it)
    body = layer * shape.layers + root

    def sharded(tensors) -> int:
        return sum(shard_elements(rows, cols, n) for rows, cols in tensors)

    def whole(tensors) -> int:
        return sum(rows * cols for rows, cols in tensors)

    if precision.lora_r:
        r = precision.lora_r
        adapter_layer = [t for out_, inp in linears for t in ((r, inp), (out_, r))]  # A [r, in], B [out, r]
        adapter = adapter_layer * shape.layers
        shards = [shard_elements(rows, cols, n) for rows, cols in adapter]
        layer_unit = 4 * whole(adapter_layer)  # what a layer's all-gather brings: its adapter
        root_unit = 0  # the root trains nothing: with the base whole it has nothing to gather
        if base_layout == "whole":
            # Every frozen parameter is ignored by FSDP2: the base, and pi_{i-1}'s adapter, whole per rank.
            held = {"weights": weight_bytes(shape, precision)}
            reference = 4 * whole(adapter)
        else:
            held = {"weights": w * (head + sharded(body))}
            layer_unit += w * whole(layer)
            root_unit = w * whole(root)
            reference = 4 * sharded(adapter)
            if frozen_reference:
                layer_unit += 4 * whole(adapter_layer)  # gathered with its layer
        # The adapter trains: sharded N ways, its fp32 gradients and AdamW's moments with it.
        held["adapter"] = 4 * sum(shards)
        if frozen_reference:
            held["frozen reference"] = reference
        held["optimizer"] = optimizer_bytes(shards, precision.optimizer)
        return RankLayout(
            held, head_gradient=0, body_gradients=4 * sum(shards), trained=4 * sum(shards),
            largest_trained=4 * max(shards), forward_gathers=2 * (root_unit + layer_unit), root=root_unit,
            # The reference is the same model with its adapter off: its forward gathers the policy's layers.
            reference_gathers=2 * layer_unit, backward_gathers=2 * layer_unit + 4 * whole(adapter_layer),
        )  # fmt: skip
    # Full fine-tuning: the body trains, sharded with its gradients and optimizer state; the head trains
    # whole on every rank (its gradient all-reduced like DDP's), its state whole too.
    shards = [shard_elements(rows, cols, n) for rows, cols in body]
    held = {"weights": w * (head + sum(shards)),
            # The frozen reference model is sharded the same way, in the compute dtype; its root's embedding
            # and final norm, gathered by its first forward, are never resharded (no backward runs).
            "frozen reference": a * (head + sum(shards) + whole(root)),
            "optimizer": optimizer_bytes([head, *shards], precision.optimizer)}  # fmt: skip
    layer_unit, root_unit = w * whole(layer), w * whole(root)
    return RankLayout(
        held, head_gradient=w * head, body_gradients=w * sum(shards), trained=w * (head + sum(shards)),
        largest_trained=w * max(head, *shards), forward_gathers=2 * (root_unit + layer_unit), root=root_unit,
        reference_gathers=2 * a * whole(layer),  # the reference model's own layers, in its dtype
        backward_gathers=3 * layer_unit,  # two layers' parameters, the computed one's gradients
        root_reduce_scatter=2 * root_unit,
    )  # fmt: skip


def generation_estimate(shape: ModelShape, precision: Precision, prompts: int, responses: int, prompt_length: int,
                        new_tokens: int) -> Estimate:  # fmt: skip
    """transformers' generate: `prompts` x `responses` sequences, KV cache for every token, last-token logits."""
    a = precision.activation_bytes
    sequences = prompts * responses
    est = Estimate("generation", prompts)
    est.components["weights"] = weight_bytes(shape, precision)
    if precision.lora_r:
        est.components["adapter"] = 4 * sum(lora_params(shape, precision.lora_r))
    cache_tokens = sequences * (prompt_length + new_tokens)
    # K and V per layer; growing the cache concatenates, so one layer's cache exists twice for a moment.
    est.components["KV cache"] = int(2 * a * shape.kv_width * cache_tokens * (shape.layers + 1))
    prefill = sequences * prompt_length
    # The boolean mask of the padded prompts, and the float copy one layer's sdpa makes of it at a time.
    masks = attention_mask_bytes(sequences, prompt_length) + sdpa_mask_bytes(precision, sequences, prompt_length)
    working = forward_working_bytes_per_token(shape, precision) * prefill + masks
    if precision.quantization != "none":
        working += a * max(x * y for x, y in shape.linear_shapes())  # one dequantised weight at a time
    est.components["prefill working"] = int(working)
    # Each step's logits of the last token, in fp32: the logits, the processed scores, the probabilities.
    est.components["logits"] = 3 * 4 * sequences * shape.vocab_size
    return est


def judge_estimate(shape: ModelShape, precision: Precision, prompts: int, responses: int, max_length: int, *,
                   frozen_reference: bool = False, earlier_judge: bool = False) -> Estimate:  # fmt: skip
    """The implicit-reward judge: policy and reference forwards without gradient over every response.

    `earlier_judge`: spa.judge_consistency's previous judge, pi_{i-2}, held beside them from iteration 2
    on (LoRA: one more adapter; full fine-tuning: one more frozen model).
    """
    a, h = precision.activation_bytes, shape.hidden_size
    rows = prompts * responses
    tokens = rows * max_length
    est = Estimate("judge", prompts)
    est.components["weights"] = weight_bytes(shape, precision)
    if precision.lora_r:
        # The policy adapter, and pi_{i-2}'s for judge_reference=previous or for the earlier judge.
        copies = 1 + int(frozen_reference or earlier_judge)
        est.components["adapters"] = 4 * copies * sum(lora_params(shape, precision.lora_r))
    else:
        frozen = Precision(a, a, on_gpu=precision.on_gpu)
        est.components["frozen reference"] = weight_bytes(shape, frozen)
        if earlier_judge:
            est.components["earlier judge"] = weight_bytes(shape, frozen)
    # The boolean mask, and the float copy one layer's sdpa makes of it at a time (nothing is kept).
    masks = attention_mask_bytes(rows, max_length) + sdpa_mask_bytes(precision, rows, max_length)
    working = forward_working_bytes_per_token(shape, precision) * tokens + masks
    est.components["forward working"] = int(working)
    est.components["fused head"] = int(tokens * 2 * a * h + head_buffer_bytes(precision))
    return est


# --------------------------------------------------------------------------- the plan


def readable(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB / 10 else f"{num_bytes / 2**20:.1f} MiB"


@dataclass
class StagePlan:
    stage: str
    configured: int  # the config's batch (the judge's is the engine's fixed one)
    configured_bytes: int
    fits: int | None  # the largest batch whose estimate fits the budget; None: not even 1, or no budget
    fits_bytes: int | None  # its estimate; when nothing fits, the smallest batch's
    components: dict[str, int]  # at the configured batch
    setting: str  # the config key that sets this batch


@dataclass
class Plan:
    shape: ModelShape
    budget_bytes: int | None  # what the estimates must fit under (None: no budget, estimates only)
    budget_source: str  # where the budget came from
    stages: list[StagePlan]
    notes: list[str]
    processes: int = 1  # under torchrun every estimate is one process's (one rank's)

    def to_json(self) -> dict:
        return {
            "model": asdict(self.shape), "processes": self.processes, "budget_bytes": self.budget_bytes,
            "budget_source": self.budget_source,
            "stages": {s.stage: {"setting": s.setting, "batch_size": s.configured, "peak_bytes": s.configured_bytes,
                                 "fits_batch_size": s.fits, "fits_peak_bytes": s.fits_bytes,
                                 "components": s.components} for s in self.stages},
            "notes": self.notes,
        }  # fmt: skip

    def table(self) -> str:
        budget = f"{readable(self.budget_bytes)} ({self.budget_source})" if self.budget_bytes else self.budget_source
        s = self.shape
        size = f"{s.params / 1e9:.2f}B" if s.params >= 1e9 else f"{s.params / 1e6:.1f}M"
        per = f" per process, {self.processes} processes" if self.processes > 1 else ""
        lines = [
            f"memory plan{per}: {s.model_type} {size} parameters (H={s.hidden_size}, {s.layers} layers, "
            f"vocab {s.vocab_size}); budget {budget}",
            f"{'stage':<12}{'setting':<28}{'batch':>6}{'est. peak':>12}{'fits':>6}{'est. peak':>12}",
        ]
        for st in self.stages:
            fits = "-" if st.fits is None else str(st.fits)
            fits_bytes = "-" if st.fits_bytes is None else readable(st.fits_bytes)
            lines.append(f"{st.stage:<12}{st.setting:<28}{st.configured:>6}{readable(st.configured_bytes):>12}"
                         f"{fits:>6}{fits_bytes:>12}")  # fmt: skip
        train = next(st for st in self.stages if st.stage == "train")
        parts = ", ".join(f"{name} {readable(value)}" for name, value in train.components.items())
        lines.append(f"train at {train.configured} pairs/micro-batch: {parts}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def advice(self) -> list[str]:
        """What to change where the config's batch is estimated not to fit (nothing when it does, or no budget)."""
        if self.budget_bytes is None:
            return []
        out = []
        for st in self.stages:
            if st.configured_bytes <= self.budget_bytes:
                continue
            if st.fits is None:
                out.append(f"{st.stage}: even a batch of 1 is estimated at {readable(st.fits_bytes)}, over the "
                           "budget: lower data.max_length, or use model.quantization=4bit and gradient checkpointing")  # fmt: skip
            elif st.stage == "judge":
                out.append(f"judge: {st.configured} prompts per batch are estimated at {readable(st.configured_bytes)}; "
                           "batches that run out of memory are finished in halves")  # fmt: skip
            else:
                out.append(f"{st.stage}: {st.setting}={st.configured} is estimated at {readable(st.configured_bytes)}, "
                           f"over the budget; {st.setting}={st.fits} fits ({readable(st.fits_bytes)})")  # fmt: skip
        return out


def precision_of(config: RunConfig, on_gpu: bool) -> Precision:
    """The run's precision as runtime.resolve_runtime settles it, without touching a device."""
    full = config.model.lora_r == 0
    dtype = config.model.dtype
    if dtype == "auto":
        weight = 2 if on_gpu and not full else 4
        activation = 2 if on_gpu else 4
    else:
        weight = 4 if dtype == "float32" else 2
        activation = 2 if on_gpu and dtype == "bfloat16" else weight
    return Precision(
        weight_bytes=weight, activation_bytes=activation, quantization=config.model.quantization,
        lora_r=config.model.lora_r, gradient_checkpointing=config.model.gradient_checkpointing,
        optimizer=config.train.optimizer, on_gpu=on_gpu,
    )  # fmt: skip


def device_budget(config: RunConfig) -> tuple[int | None, str, bool]:
    """(budget bytes or None, where it came from, whether the run is on a GPU)."""
    import torch

    device = config.model.device
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if config.model.max_memory_gb is not None:
        total = int(config.model.max_memory_gb * GIB)
        source = f"model.max_memory_gb={config.model.max_memory_gb:g}"
    elif on_gpu and torch.cuda.is_available():
        index = torch.device(device if device.startswith("cuda") else "cuda").index or 0
        total = torch.cuda.get_device_properties(index).total_memory
        source = f"the card's {total / GIB:.1f} GiB"
    else:
        return None, "none: no GPU and model.max_memory_gb is not set, estimates only", on_gpu
    usable = int((total - (CUDA_CONTEXT_BYTES if on_gpu else 0)) * FRAGMENTATION_FACTOR)
    return usable, f"{source}, less {'the CUDA context and ' if on_gpu else ''}10% for fragmentation", on_gpu


def largest_fitting(estimate, candidates, budget: int | None) -> tuple[int | None, int | None]:
    """The largest candidate whose estimate fits; (None, estimate at the smallest) when none does."""
    if budget is None:
        return None, None
    best = None
    for n in sorted(candidates):
        peak = estimate(n).peak_bytes
        if peak > budget:
            break  # estimates grow with the batch
        best = (n, peak)
    return best if best else (None, estimate(min(candidates)).peak_bytes)


def plan_run(config: RunConfig, shape: ModelShape | None = None, *, on_gpu: bool | None = None, processes: int = 1,
             base_layout: str | None = None) -> Plan:  # fmt: skip
    """The memory plan of `config` (its values already checked): each stage's estimate and the batches that fit.

    `processes` > 1: one rank's estimates under torchrun (the budget is one GPU's). Training splits each
    micro-batch over the ranks and shards with FSDP2 (`fsdp2_layout`); a LoRA base is laid out as
    `base_layout`, by default as the run would (`frozen_base_layout`). Generation and the judge: each
    rank takes every N-th batch at the configured size on a whole model, so one rank's peak is one
    process's.
    """
    if processes > 1:
        from .preflight import check_processes

        check_processes(config, processes)  # a micro-batch that does not split, or what FSDP2 cannot shard
        if base_layout is None:
            base_layout = frozen_base_layout(config, processes) if config.model.lora_r else "sharded"
    shape = shape or ModelShape.from_config_json(config.model.path)
    budget, source, gpu = device_budget(config)
    on_gpu = gpu if on_gpu is None else on_gpu
    precision = precision_of(config, on_gpu)
    d, g, t = config.data, config.generation, config.train
    iterations = config.spa.iterations > 0
    notes = []
    if shape.model_type not in LLAMA_SHAPED:
        notes.append(f"model_type {shape.model_type!r} is estimated as a Llama-shaped decoder")
    if not on_gpu:
        notes.append("CPU run: no autocast, the chunked head; the plan advises, no batch is changed")
    if processes > 1:
        where = {"whole": "the frozen base whole on every rank, the adapter sharded",
                 "sharded": "the body sharded"}[base_layout if config.model.lora_r else "sharded"]  # fmt: skip
        notes.append(f"{processes} processes: train.micro_batch_size / {processes} pairs per rank, FSDP2 with "
                     f"{where}, the LM head whole; generation and judge batches whole per rank")  # fmt: skip

    def train(n: int) -> Estimate:
        # A step of train.batch_size pairs accumulates train.batch_size / n micro-batches of n.
        return training_estimate(shape, precision, n, d.max_length, frozen_reference=iterations,
                                 processes=processes, base_layout=base_layout or "whole",
                                 micro_batches=t.batch_size // n)  # fmt: skip

    def generate(n: int) -> Estimate:
        return generation_estimate(shape, precision, n, g.responses_per_prompt, d.max_prompt_length, g.max_new_tokens)

    def judge(n: int) -> Estimate:
        return judge_estimate(shape, precision, n, g.responses_per_prompt, d.max_length,
                              frozen_reference=config.spa.judge_reference == "previous",
                              earlier_judge=config.spa.judge_consistency != "none")  # fmt: skip

    # A micro-batch divides the step's batch, and under torchrun splits over the processes.
    micro_candidates = [n for n in range(1, t.batch_size + 1) if t.batch_size % n == 0 and n % processes == 0]
    stages = []
    rows = [("train", train, t.micro_batch_size, micro_candidates, "train.micro_batch_size")]
    if iterations:
        if g.backend == "hf":
            rows.append(("generation", generate, g.batch_size, sorted({*BATCH_CANDIDATES, g.batch_size}),
                         "generation.batch_size"))  # fmt: skip
        else:
            notes.append("generation.backend=vllm: vLLM sizes its own batches (generation.vllm_gpu_memory_utilization)")
        if config.spa.judge == "implicit":
            rows.append(("judge", judge, JUDGE_BATCH_PROMPTS, BATCH_CANDIDATES, "(fixed: 16 prompts)"))
    for name, estimate, configured, candidates, setting in rows:
        at_config = estimate(configured)
        fits, fits_bytes = largest_fitting(estimate, candidates, budget)
        stages.append(StagePlan(name, configured, at_config.peak_bytes, fits, fits_bytes, at_config.components,
                                setting))  # fmt: skip
    return Plan(shape, budget, source, stages, notes, processes)


def frozen_base_layout(config: RunConfig, processes: int) -> str:
    """Where a LoRA run's frozen base lives under torchrun: "whole" on every rank unless the plan says
    one rank cannot hold its training step that way, then "sharded" (model.shard_frozen_base=auto)."""
    if config.model.shard_frozen_base != "auto":
        return config.model.shard_frozen_base
    if processes == 1 or config.model.lora_r == 0 or config.model.quantization != "none":
        # Nothing to share out; full fine-tuning shards every weight it trains anyway; FSDP2 cannot shard NF4.
        return "whole"
    plan = plan_run(config, processes=processes, base_layout="whole")
    train = next(s for s in plan.stages if s.stage == "train")
    # One rank's estimate with the base whole: its share of the micro-batch, the sharded adapter.
    return "whole" if plan.budget_bytes is None or train.configured_bytes <= plan.budget_bytes else "sharded"


def out_of_memory_message(config: RunConfig, error: BaseException, processes: int = 1) -> str:
    """What the CLI says when a stage ran out of GPU memory anyway: the error, the plan (one rank's of
    `processes`), and what to change."""
    lines = [f"out of GPU memory: {str(error).splitlines()[0] if str(error) else type(error).__name__}"]
    try:
        plan = plan_run(config, processes=processes)
    except (ConfigError, OSError) as plan_error:
        lines.append(f"(no memory plan: {plan_error})")
        plan = None
    if plan is not None:
        lines.append(plan.table())
        lines += plan.advice()
    lines.append(
        "to use less: lower train.micro_batch_size (train.batch_size stays: the gradient accumulates), "
        "generation.batch_size or data.max_length; model.gradient_checkpointing=true; model.quantization=4bit; "
        "train.optimizer=adamw8bit; set model.max_memory_gb to what the card really has free"
    )
    return "\n".join(lines)
