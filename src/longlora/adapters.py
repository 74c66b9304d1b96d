"""LoRA+ (LongLoRA part 3) through PEFT: LoRA on the attention projections plus trainable embeddings and norms.

LoRA alone (r=8 on q/k/v/o) does not close the gap to full fine-tuning when the context is extended; training the
input embedding and every normalisation layer as well does (paper, Table 2: PG19 perplexity at 32k 11.44 -> 8.12,
full fine-tuning 8.08). The embedding is ~2% of a 7B model's parameters, the norms ~0.004%.

LoRA itself is PEFT's. This module only decides *what* is trained, by exact module names found by walking the
model (never loose substrings), so the trainable set can be asserted in tests:
- LoRA targets: the linear projections of the attention modules (`default_lora_targets`);
- `modules_to_save`: the input embedding and every normalisation layer (`trainable_module_names`). PEFT trains a
  copy of each and stores it in the adapter file next to the LoRA weights, so a checkpoint is self-contained.
lm_head is not trained (the paper's recipe), except where it *is* the input embedding (tied word embeddings):
then PEFT's `ensure_weight_tying` keeps the trained embedding and lm_head one tensor.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Sequence
from importlib.metadata import version

import torch
from packaging.version import Version
from torch import nn

FINETUNES = ("lora_plus", "lora", "full")
"""lora_plus: LoRA + trainable embed/norm (LongLoRA); lora: LoRA only; full: every parameter trainable."""

TRAINABLE_KINDS = ("embed", "norm")
"""What `lora_plus` trains besides LoRA: the input embedding and the normalisation layers."""

# The attention projection layouts we know, as the exact set of linear layers inside an attention module.
ATTENTION_LAYOUTS: dict[frozenset[str], list[str]] = {
    # Llama, Mistral, Qwen2/3, Gemma 1-3
    frozenset({"q_proj", "k_proj", "v_proj", "o_proj"}): ["q_proj", "k_proj", "v_proj", "o_proj"],
    frozenset({"qkv_proj", "o_proj"}): ["qkv_proj", "o_proj"],  # Phi-3: fused q/k/v
    frozenset({"query_key_value", "dense"}): ["query_key_value", "dense"],  # GPT-NeoX / Pythia: fused q/k/v
}

_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)
_PEFT_FORWARD_SKIPS_HOOKS = Version(version("peft")) < Version("0.21")  # see route_forward_through_hooks
_NORM_SUFFIXES = ("RMSNorm", "LayerNorm")  # LlamaRMSNorm, Qwen3RMSNorm, Gemma3RMSNorm, T5LayerNorm, ...


def base_model(model) -> nn.Module:
    """The transformers model, also through a PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _tuner_calls_its_model(self, *args, **kwargs):
    return self.model(*args, **kwargs)


def route_forward_through_hooks(model):
    """Make a PEFT model's forward reach the transformers model through `__call__`; returns `model`.

    S2-Attn, the memory plan and sequence parallelism act through forward hooks on the transformers model. PEFT
    before 0.21 has its tuner (LoraModel) call `self.model.forward(...)`, which skips those hooks: the training step
    then silently ran with transformers' (L, L) mask and the full (L, V) logits. PEFT 0.21 calls `self.model(...)`;
    for older releases this instance gets that forward (per instance, no class patched; a no-op from 0.21 on).
    """
    from peft.tuners.tuners_utils import BaseTuner

    tuner = getattr(model, "base_model", None)
    if (hasattr(model, "get_base_model") and isinstance(tuner, BaseTuner) and "forward" not in tuner.__dict__
            and type(tuner).forward is BaseTuner.forward and _PEFT_FORWARD_SKIPS_HOOKS):
        tuner.forward = types.MethodType(_tuner_calls_its_model, tuner)
    return model


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer with its own trainable parameters (a scale-free RMSNorm has nothing to train)."""
    is_norm = isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(_NORM_SUFFIXES)
    return is_norm and any(True for _ in module.parameters(recurse=False))


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules of the decoder layers (class names ending in 'Attention')."""
    return [(name, m) for name, m in model.named_modules() if type(m).__name__.endswith("Attention")]


def default_lora_targets(model) -> list[str]:
    """The attention projections LoRA is put on, as PEFT `target_modules` (leaf module names).

    q_proj, k_proj, v_proj, o_proj for Llama / Mistral / Qwen / Gemma; qkv_proj, o_proj for Phi-3; query_key_value,
    dense for GPT-NeoX. Found by reading the linear layers of the model's attention modules, so an architecture
    with one of these layouts works whatever its name; any other layout raises ValueError (pass `targets`).
    """
    model = base_model(model)
    attention = _attention_modules(model)
    if not attention:
        raise ValueError(
            f"unknown architecture {type(model).__name__}: no attention module found (no module class ending in "
            "'Attention'); pass the LoRA target module names explicitly (targets=[...])"
        )
    layouts = set()
    for _, module in attention:
        linears = frozenset(name for name, child in module.named_children() if isinstance(child, nn.Linear))
        layouts.add(linears)
    if len(layouts) != 1 or next(iter(layouts)) not in ATTENTION_LAYOUTS:
        found = " / ".join(sorted(", ".join(sorted(layout)) or "no nn.Linear" for layout in layouts))
        known = "; ".join(", ".join(v) for v in ATTENTION_LAYOUTS.values())
        raise ValueError(
            f"unknown architecture {type(model).__name__}: its attention modules hold [{found}], not one of the "
            f"known projection layouts ({known}); pass the LoRA target module names explicitly (targets=[...])"
        )
    targets = ATTENTION_LAYOUTS[next(iter(layouts))]
    # PEFT matches target names as module-name suffixes: make sure none also hits a layer outside attention.
    attention_names = {name for name, _ in attention}
    for name, _ in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets and name.rsplit(".", 1)[0] not in attention_names:
            raise ValueError(
                f"LoRA target {leaf!r} of {type(model).__name__} also names {name}, outside attention; "
                "pass the LoRA target module names explicitly (targets=[...])"
            )
    return list(targets)


def trainable_module_names(model, trainable: Sequence[str] = TRAINABLE_KINDS) -> list[str]:
    """The exact module names LoRA+ trains fully (PEFT `modules_to_save`), in model order.

    trainable: any of 'embed' (the input embedding, whatever the architecture calls it: embed_tokens, embed_in, ...,
        found through `model.get_input_embeddings()`) and 'norm' (every normalisation layer with parameters:
        input/post-attention layernorms, the final norm, Qwen-3 / Gemma-3 q_norm and k_norm, Gemma-3's pre/post
        feed-forward norms, GPT-NeoX's LayerNorms, ...; recognised by module type, LayerNorm / RMSNorm classes).
    lm_head is never listed (the paper trains the input embedding only); with tied word embeddings it is the same
    tensor as the embedding, so it is trained through it (see `apply_lora_plus`).
    """
    unknown = [kind for kind in trainable if kind not in TRAINABLE_KINDS]
    if isinstance(trainable, str) or unknown:
        raise ValueError(f"trainable must be a list drawn from {TRAINABLE_KINDS}, got {trainable!r}")
    model = base_model(model)
    names: list[str] = []
    if "embed" in trainable:
        embedding = model.get_input_embeddings()
        embed_names = [name for name, m in model.named_modules() if m is embedding]
        if not embed_names:
            raise ValueError(f"{type(model).__name__}: the input embedding is not a submodule of the model")
        names.append(embed_names[0])
    if "norm" in trainable:
        norms = [name for name, m in model.named_modules() if _is_norm(m)]
        if not norms:
            raise ValueError(f"{type(model).__name__}: no normalisation layer (LayerNorm / RMSNorm) found to train")
        names.extend(norms)
    return names


def has_tied_embeddings(model) -> bool:
    """True when lm_head and the input embedding share one weight tensor."""
    model = base_model(model)
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def apply_lora_plus(
    model,
    finetune: str = "lora_plus",
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    targets: Iterable[str] | None = None,
    trainable: Sequence[str] = TRAINABLE_KINDS,
):
    """Make `model` trainable the LongLoRA way; returns the PEFT model (or `model` itself for 'full').

    finetune: 'lora_plus' (LoRA on `targets` + `trainable` modules fully trained, the paper's recipe), 'lora'
        (LoRA only: the paper's weaker baseline) or 'full' (every parameter trainable, no PEFT).
    rank, alpha, dropout: LoRA r, lora_alpha and lora_dropout (paper: 8, 16, 0).
    targets: LoRA target module names; default `default_lora_targets(model)` (the attention projections).
    trainable: for 'lora_plus', what is trained besides LoRA: 'embed' and/or 'norm'.

    The embed/norm weights are PEFT `modules_to_save`: trained copies that `save_pretrained` writes into
    adapter_model.safetensors with the LoRA weights and `PeftModel.from_pretrained` restores. For a model with tied
    word embeddings `ensure_weight_tying=True` keeps lm_head tied to the trained embedding copy, through training,
    saving and loading.
    """
    if finetune not in FINETUNES:
        raise ValueError(f"unknown finetune {finetune!r}; choose one of {', '.join(FINETUNES)}")
    if finetune == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if hasattr(model, "peft_config"):
        raise ValueError("the model already carries PEFT adapters; pass the plain transformers model")

    from peft import LoraConfig, get_peft_model

    target_modules = list(targets) if targets is not None else default_lora_targets(model)
    if not target_modules:
        raise ValueError("targets is empty: name at least one module to put LoRA on")
    modules_to_save = trainable_module_names(model, trainable) if finetune == "lora_plus" else []
    embedding_trained = finetune == "lora_plus" and "embed" in trainable
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save or None,
        ensure_weight_tying=embedding_trained and has_tied_embeddings(model),
    )
    return route_forward_through_hooks(get_peft_model(model, config))


def trainable_parameter_counts(model) -> dict[str, int]:
    """Trainable parameters by kind: lora, embed, norm, other; plus total (trainable) and all.

    'all' counts each tensor once (tied weights once) and leaves out the frozen originals PEFT keeps beside each
    `modules_to_save` copy, so it is the size of the model being trained (base + LoRA).
    """
    counts = {"lora": 0, "embed": 0, "norm": 0, "other": 0, "total": 0, "all": 0}
    for name, parameter in model.named_parameters():  # tied parameters appear once
        if ".original_module." in name:
            continue  # PEFT's frozen copy of a module trained as modules_to_save
        n = parameter.numel()
        counts["all"] += n
        if not parameter.requires_grad:
            continue
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if ".lora_" in name:
            kind = "lora"
        elif isinstance(owner, nn.Embedding):
            kind = "embed"
        elif _is_norm(owner):
            kind = "norm"
        else:
            kind = "other"
        counts[kind] += n
        counts["total"] += n
    return counts


def _human(n: int) -> str:
    """1234 -> '1.2K', 134_515_008 -> '135M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value >= 100 else f"{value:.1f}{unit}"
    return str(n)


def format_trainable_counts(counts: dict[str, int]) -> str:
    """One line: 'trainable: lora 1.2M | embed 0.5M | norm 3.1K | total 1.7M of 135M (1.3%)'."""
    parts = [f"{kind} {_human(counts[kind])}" for kind in ("lora", "embed", "norm", "other") if counts.get(kind)]
    share = 100.0 * counts["total"] / counts["all"] if counts["all"] else 0.0
    parts.append(f"total {_human(counts['total'])} of {_human(counts['all'])} ({share:.3g}%)")
    return "trainable: " + " | ".join(parts)


def trainable_parameter_names(model) -> list[str]:
    """Names of the parameters that require grad (as `model.named_parameters()` gives them)."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


_CAST_HOOK = "_longlora_output_cast_hook"
"""Attribute of a module holding the handle of the output-cast hook `keep_trainables_in_float32` registered on it."""


def keep_trainables_in_float32(model, compute_dtype) -> list[str]:
    """Trainable parameters in float32 over a frozen base in `compute_dtype` (mixed-precision training); returns the
    names of the parameters it cast.

    Why float32: AdamW's updates of a bfloat16 weight round away (a norm weight near 1 moves by ~1e-4 per step,
    below bfloat16's resolution there), and fp16's GradScaler refuses fp16 gradients. PEFT already creates LoRA
    A/B in float32; the embedding and norm copies it trains (modules_to_save) are copies of the base modules, in the
    base's dtype: those are cast here, in place (`param.data`), so tied weights stay one Parameter.

    Why the hooks: a float32 embedding returns float32 hidden states, and a float32 RMSNorm float32 normalised
    ones, so the residual stream, every checkpointed layer input and bitsandbytes' 4-bit layers (which return their
    input's dtype, autocast or not) would run at 4 bytes a value, twice the frozen model's. Each trained embedding
    and norm gets a forward hook, registered on that module instance, that casts its output to `compute_dtype`: the
    model's activations keep the dtype they had before the cast (autograd carries the gradient back to float32).
    With `compute_dtype` float32 nothing is hooked. Calling it again replaces the hooks.
    """
    cast = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != torch.float32:
            parameter.data = parameter.data.to(torch.float32)
            cast.append(name)
    owners = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or "." not in name:
            continue
        owner_name = name.rsplit(".", 1)[0]
        owner = model.get_submodule(owner_name)
        if isinstance(owner, nn.Embedding) or _is_norm(owner):
            owners[owner_name] = owner
    for owner in owners.values():
        previous = getattr(owner, _CAST_HOOK, None)
        if previous is not None:
            previous.remove()
            delattr(owner, _CAST_HOOK)
        if compute_dtype != torch.float32:
            setattr(owner, _CAST_HOOK, owner.register_forward_hook(_output_caster(compute_dtype)))
    return cast


def _output_caster(dtype):
    def cast_output(module, args, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point() and output.dtype != dtype:
            return output.to(dtype)
        return None  # keep the output

    return cast_output
