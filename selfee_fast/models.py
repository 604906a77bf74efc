"""Models: load a local Hugging Face causal LM, and run its body + our fused head.

selfee_fast never asks a model for logits. It runs the transformer body to the final
hidden states and sends them, with the LM head's weight, through `linear_logprobs`.

LoRA mode keeps ONE copy of the base weights and names the models SPA needs by adapter:
- the policy being trained: peft's "default" adapter (trainable);
- the DPO reference pi_{i-1}: adapter "reference", a frozen copy of the previous policy
  adapter (at stage 0 there is none: the reference is the base model);
- pi_init, the judge's reference: the base model, adapters disabled.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import CHOICES
from .data import next_token_targets, pack
from .logprobs import LogProbs, linear_logprobs

POLICY_ADAPTER = "default"  # peft's own name: saved adapters load with no subfolder
REFERENCE_ADAPTER = "reference"
# Weights load from safetensors only: a pickled checkpoint (pytorch_model.bin) can run code when loaded.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
QUANTIZATIONS = CHOICES["model.quantization"]
ATTENTIONS = CHOICES["model.attention"]
UNSUPPORTED_HEAD_OPTIONS = ("final_logit_softcapping", "logit_scale")


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = "all-linear"


def check_model_dir(path: str | Path) -> Path:
    """A clear error naming the missing file, before transformers gives a less clear one."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (models load from local folders only)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} is missing: {path} is not a Hugging Face model folder")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        if any((path / name).is_file() for name in PICKLED_WEIGHTS):
            raise FileNotFoundError(
                f"{path} holds pickled weights (pytorch_model.bin), which selfee_fast does not load (unpickling can "
                "run code): convert them once with transformers, model.save_pretrained(path, safe_serialization=True)"
            )
        raise FileNotFoundError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)}")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.json or tokenizer_config.json")
    return path


def nf4_config(compute_dtype: torch.dtype):
    """QLoRA's quantisation: NF4 with double quantisation, computing in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )  # fmt: skip


def keep_nf4_gradients_on_cpu(model) -> None:
    """Keep bitsandbytes' NF4 layers differentiable on a CPU.

    On a CPU with AVX512-BF16, bitsandbytes (0.50, checked) repacks a Linear4bit's weights for
    an inference kernel the first time the layer runs in eval mode without gradients, and
    keeps them so; that kernel has no backward, so every later training step would lose the
    gradient through the frozen base (the adapters of earlier layers then train on a wrong
    gradient, with only a warning from autograd). The reference and the judge run exactly
    so. Their cost is one dequantising matmul per layer instead of the fused kernel.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    lora: LoraSettings | None = None,
    adapter_path: str | Path | None = None,
    gradient_checkpointing: bool = True,
    quantization: str = "none",
    attention: str | None = "auto",
    disable_dropout: bool = True,
):
    """Load (model, tokenizer) from a local folder; with `lora`, add a trainable policy adapter.

    `disable_dropout` (TRL's default, and the official SPA code's through TRL): every dropout
    of the model and its adapters off, so that policy and reference compute the same
    function at the first step (DPO's loss is then exactly log 2) and the judge is deterministic.

    `attention`: transformers' attention implementation; "auto" is flash-attention 2 on a GPU
    where the flash-attn package is installed (packed batches then cost no extra attention
    work), else PyTorch's sdpa.

    `adapter_path` loads an existing peft adapter as the trainable policy instead of a fresh one.
    `quantization="4bit"` stores the linear layers of the body in NF4 (QLoRA: bitsandbytes,
    double quantisation, computing in `dtype`); the LM head is left unquantised, so the
    fused head sees ordinary weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_dir(path)
    dtype = dtype or torch.float32
    if attention is not None:  # None: transformers' own choice
        attention = attention_implementation(
            attention, device, half_precision=dtype in (torch.float16, torch.bfloat16), model_path=path
        )
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "4bit":
        # Quantised weights are placed as they load: no full-precision copy on the device first.
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=dtype, quantization_config=nf4_config(dtype), device_map={"": str(device)},
            attn_implementation=attention, use_safetensors=True, trust_remote_code=False,
        )  # fmt: skip
        if torch.device(device).type == "cpu":
            keep_nf4_gradients_on_cpu(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            local_files_only=True,
            dtype=dtype,
            attn_implementation=attention,
            use_safetensors=True,
            trust_remote_code=False,
        )
        model.to(device)
    for option in UNSUPPORTED_HEAD_OPTIONS:
        if getattr(model.config, option, None) not in (None, 1.0):
            raise ValueError(f"{path}: config sets {option}; the fused head computes plain logits and would be wrong")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora is not None or adapter_path is not None:
        from peft import LoraConfig, PeftModel, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        if adapter_path is not None:
            model = PeftModel.from_pretrained(model, adapter_path, adapter_name=POLICY_ADAPTER, is_trainable=True)
        else:
            config = LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules) if not isinstance(lora.target_modules, str) else lora.target_modules,
                task_type="CAUSAL_LM",
            )  # fmt: skip
            model = get_peft_model(model, config, adapter_name=POLICY_ADAPTER)
        if gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
    if disable_dropout:
        turn_off_dropout(model)
    return model, tokenizer


# Float attributes through which transformers' attention classes apply dropout in training
# (e.g. Llama's `attention_dropout`, OPT's `dropout`): not nn.Dropout modules.
DROPOUT_ATTRIBUTES = ("attention_dropout", "attn_dropout", "dropout", "dropout_p", "attn_pdrop", "resid_pdrop")


def turn_off_dropout(model) -> None:
    """Every dropout off: nn.Dropout modules (peft's LoRA dropout included), functional attention dropout, the config's rates."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in DROPOUT_ATTRIBUTES:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for name, value in (config.to_dict() if config is not None else {}).items():
        if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
            setattr(config, name, 0.0)


def attention_implementation(
    requested: str, device: str | torch.device, *, half_precision: bool, model_path: str | Path | None = None
) -> str | None:
    """transformers' `attn_implementation` for `requested` (one of ATTENTIONS).

    "auto" takes flash-attention 2 where it can run: a CUDA device, the flash-attn package,
    16-bit activations (`half_precision`: 16-bit weights or bf16 autocast) and an
    architecture that supports it (checked from `model_path`'s config when given); else None,
    transformers' own choice (sdpa where the architecture has it, eager otherwise).
    """
    if requested not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {requested!r}")
    has_flash = _flash_attention_available()
    if requested == "flash_attention_2" and not has_flash:
        raise ValueError("attention='flash_attention_2' needs the flash-attn package: pip install 'selfee-fast[flash]'")
    if requested != "auto":
        return requested
    usable = has_flash and half_precision and torch.device(device).type == "cuda"
    if usable and model_path is not None:
        usable = _supports_flash_attention(model_path)
    return "flash_attention_2" if usable else None


def _flash_attention_available() -> bool:
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:  # an older transformers: the package being there is what it checks too
        return True
    return is_flash_attn_2_available()


def _supports_flash_attention(path: str | Path) -> bool:
    """Whether the causal-LM class of the model in `path` implements flash-attention 2."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):  # no readable config: loading the model will say what is missing
        return False
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return bool(
        getattr(model_class, "_supports_flash_attn", False) or getattr(model_class, "_supports_flash_attn_2", False)
    )


def freeze_reference_adapter(model) -> None:
    """Copy the current policy adapter into a frozen "reference" adapter (pi_{i-1})."""
    if REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(REFERENCE_ADAPTER)
    model.add_adapter(REFERENCE_ADAPTER, model.peft_config[POLICY_ADAPTER])
    policy_state = {
        name.replace(f".{POLICY_ADAPTER}.", f".{REFERENCE_ADAPTER}."): p.detach().clone()
        for name, p in model.named_parameters()
        if f".{POLICY_ADAPTER}." in name
    }
    missing = model.load_state_dict(policy_state, strict=False)
    if any(f".{REFERENCE_ADAPTER}." in k for k in missing.missing_keys):
        raise RuntimeError("could not copy the policy adapter into the reference adapter")
    for name, p in model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name:
            p.requires_grad_(False)
    model.set_adapter(POLICY_ADAPTER)


def load_reference_adapter(model, path: str | Path) -> None:
    """Load a saved policy adapter (an earlier iterate) as the frozen "reference" adapter."""
    if REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(REFERENCE_ADAPTER)
    model.load_adapter(str(path), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    model.set_adapter(POLICY_ADAPTER)
    for name, p in model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name:
            p.requires_grad_(False)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


@contextlib.contextmanager
def acting_as(model, role: str):
    """Run the shared weights as one of SPA's models: "policy", "reference" or "init".

    "reference" without a reference adapter (stage 0) is the base model, like "init".
    Full fine-tuning has one model only: the caller keeps the reference elsewhere.
    """
    if role not in ("policy", "reference", "init"):
        raise ValueError(f"role must be policy, reference or init, got {role!r}")
    if not is_peft(model):
        if role != "policy":
            raise ValueError("a model without adapters can only act as the policy; load a separate reference model")
        yield model
        return
    if role == "policy":
        model.set_adapter(POLICY_ADAPTER)
        yield model
        return
    # The reference models are fixed functions: no dropout, whatever mode training left on.
    was_training = model.training
    model.eval()
    try:
        if role == "reference" and REFERENCE_ADAPTER in model.peft_config:
            model.set_adapter(REFERENCE_ADAPTER)
            try:
                yield model
            finally:
                model.set_adapter(POLICY_ADAPTER)
                # set_adapter marks the active adapter trainable; the reference must stay frozen
                for name, p in model.named_parameters():
                    if f".{REFERENCE_ADAPTER}." in name:
                        p.requires_grad_(False)
        else:
            with model.disable_adapter():
                yield model
    finally:
        model.train(was_training)


def final_hidden_states(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The transformer body's last hidden states [B, T, H] (no LM head, no logits).

    `position_ids` marks a packed batch (`data.pack`): the body then gets no attention mask
    and finds the sequences from the position restarts. Under flash-attention its
    `cu_seq_lens` (on the CPU) go to the variable-length kernel as they are: transformers
    would otherwise search position_ids for the boundaries on the device in every layer.
    """
    body = model.get_base_model().get_decoder() if is_peft(model) else model.get_decoder()
    if position_ids is None:
        return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    boundaries = {}
    if cu_seq_lens is not None and getattr(model.config, "_attn_implementation", None) == "flash_attention_2":
        longest = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
        cu = cu_seq_lens.to(input_ids.device, non_blocking=True)
        boundaries = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    return body(input_ids=input_ids, position_ids=position_ids, use_cache=False, **boundaries).last_hidden_state


def packing_problem(model) -> str | None:
    """Why `model` would score packed rows wrongly, or None when it keeps packed sequences apart.

    Packing relies on the architecture reading sequence boundaries from position_ids; some
    do not (OPT, Bloom, MPT under any attention; GPTBigCode under flash-attention) and would
    attend across sequences. The probe: a short sequence's hidden states packed behind
    another one against the same sequence alone.
    """
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (n,), generator=generator).tolist() for n in (7, 5))
    packed = pack([first, second], [1, 1])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            together = final_hidden_states(
                model, packed["input_ids"].to(device), packed["attention_mask"].to(device),
                packed["position_ids"].to(device), packed["cu_seq_lens"],
            )[0, len(first) :].float()  # fmt: skip
            ids = torch.tensor([second], device=device)
            alone = final_hidden_states(model, ids, torch.ones_like(ids))[0].float()
    finally:
        model.train(was_training)
    difference = float((together - alone).norm() / alone.norm().clamp(min=1e-12))
    # The same kernels either way: a leak moves the states far more than 16-bit rounding does.
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if difference <= tolerance:
        return None
    kind = getattr(model.config, "model_type", type(model).__name__)
    implementation = getattr(model.config, "_attn_implementation", None)
    return (
        f"{kind} ({implementation} attention) does not keep packed sequences apart: a packed sequence's hidden "
        f"states differ from the same sequence alone by {difference:.2g} (relative)"
    )


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def sequence_token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    reference: str | None = None,
    extrapolate: float | None = None,
    policy_role: str = "policy",
    reference_model=None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
) -> LogProbs:
    """Per-token log-probs of `labels` (-100: not scored) under the policy and a reference.

    `reference` is a role ("reference" or "init") of the same shared model, or None; a full
    fine-tuning run passes its separate `reference_model` instead. The reference runs
    without gradient. Labels are shifted here: position t scores token t + 1. A packed batch
    (`data.pack`) passes its `position_ids` and `cu_seq_lens`.
    """
    targets = next_token_targets(labels)
    with acting_as(model, policy_role):
        hidden = final_hidden_states(model, input_ids, attention_mask, position_ids, cu_seq_lens)
    ref_hidden = None
    if reference_model is not None:
        with torch.no_grad():
            ref_hidden = final_hidden_states(reference_model, input_ids, attention_mask, position_ids, cu_seq_lens)
    elif reference is not None:
        with torch.no_grad(), acting_as(model, reference):
            ref_hidden = final_hidden_states(model, input_ids, attention_mask, position_ids, cu_seq_lens)
    weight, bias = lm_head(model)
    ref_weight, ref_bias = lm_head(reference_model) if reference_model is not None else (None, None)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # What autocast does to a plain linear layer: the head computes in the autocast dtype
        # (fp32 master weights included; the gradient flows back through the cast).
        dtype = torch.get_autocast_dtype(device_type)
        weight, bias = weight.to(dtype), bias.to(dtype) if bias is not None else None
        if ref_weight is not None:
            ref_weight, ref_bias = ref_weight.to(dtype), ref_bias.to(dtype) if ref_bias is not None else None
    # The body may hand back another dtype than the head's; the kernel needs one.
    hidden = hidden.to(weight.dtype)
    if ref_hidden is not None:
        ref_hidden = ref_hidden.to(weight.dtype if ref_weight is None else ref_weight.dtype)
    return linear_logprobs(
        hidden, weight, targets, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
        ref_bias=ref_bias if reference_model is not None else (bias if ref_hidden is not None else None),
        extrapolate=extrapolate if ref_hidden is not None else None,
    )  # fmt: skip
