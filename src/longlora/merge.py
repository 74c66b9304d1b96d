"""Merge a LongLoRA adapter into its base model: one standalone Hugging Face checkpoint with its RoPE scaling recorded.

    merge_adapter(adapter="runs/llama-32k/adapter", output="models/llama-32k")           # base from the adapter
    merge_adapter("meta-llama/Llama-2-7b-hf", "runs/llama-32k/adapter", "models/llama-32k", dtype="float16")

What goes in:
- the base weights (through `longlora.modeling`, the loader every command uses), in float32, with the *trained* config: `longlora train` saves the base config after position
  interpolation as config.json in the adapter directory, so rope_parameters (rope_type, factor, rope_theta) and
  max_position_embeddings (the trained context) come from there; it must describe the base's architecture;
- the adapter: LoRA on the attention projections, folded into the weights by PEFT's `merge_and_unload`, and the
  trained embedding and norm weights (PEFT `modules_to_save`), which replace the base's;
- the tokenizer: the adapter directory's when it has one (training may have added a pad token), else the base's.

An adapter trained on a 4-bit base (QLoRA: its longlora_config.yaml says `quantization: 4bit`) learnt to correct the
*dequantized* weights, not the full-precision ones: the base is quantized as in training and dequantized
(`longlora.modeling.dequantized_base`), and the adapter is merged onto that, so the merged model computes what the
4-bit model + adapter computed in training.

What comes out: safetensors shards (+ index when sharded), config.json, generation_config.json and the tokenizer, in a
directory that plain transformers loads with `AutoModelForCausalLM.from_pretrained(out)`: no longlora import, no
PEFT, full attention, the RoPE scaling applied by transformers from config.json (the original LongLoRA releases left
it out, so every consumer had to repeat it). Tied word embeddings stay tied (one tensor in the file).

The merge arithmetic runs in float32 whatever the output dtype; `dtype='auto'` (the default) writes the base
checkpoint's stored dtype. Where that dtype rounds trained changes away (norm weights move by ~1e-4 in a short run,
below bfloat16's resolution near 1), a warning names the share lost and suggests --dtype float32. After writing, the
directory is loaded again with plain transformers and its logits on a short probe are compared with base + adapter
(the max difference is logged and returned by `merge_and_check`).

config.json also carries the legacy RoPE keys (`rope_scaling`, top-level `rope_theta`) that transformers 4.x,
llama.cpp's converter and vLLM releases on transformers 4 read (see `longlora.modeling.finalize_saved_files`).

The directory appears whole or not at all: everything is written into a temporary directory beside it, which is
renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longlora.io import atomic_directory, check_output_dir
from longlora.modeling import (  # noqa: F401  (ARCHITECTURE_KEYS, TRAINED_CONFIG, ... are this module's API too)
    ARCHITECTURE_KEYS,
    TRAINED_CONFIG,
    check_adapter_shapes,
    finalize_saved_files,
    load_adapter,
    load_base_model,
    load_tokenizer,
    read_adapter_config,
    resolve_checkpoint,
    resolve_dtype,
    stored_dtype,
    trained_config,
    unquantized_copy,
)

logger = logging.getLogger(__name__)

_check_output = check_output_dir  # former names, kept importable
_unquantized_copy = unquantized_copy

PROBE_TOKENS = 32
"""Length of the probe on which the merged model's logits are compared with base + adapter."""
LOST_WARNING_SHARE = 0.5
"""Warn when at least this share of a group's trained changes rounds away in the output dtype."""


@dataclass
class MergeReport:
    """What `merge_and_check` measured."""

    dtype: torch.dtype
    max_logit_diff: float | None
    """max |merged - (base + adapter)| over the probe's logits, both in float32; None when not checked."""
    lost: dict[str, float] = field(default_factory=dict)
    """Group ("norm weights", "embeddings", "LoRA projections") -> share of its trained changes that the output
    dtype rounds away (the stored weight equals the base's); only groups with trained changes."""


def merge_adapter(
    model: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    **options: Any,
) -> Path:
    """Write base + adapter as one standalone model directory `output`; returns its path.

    The keyword options (dtype='auto', max_shard_size, overwrite, rope_factor, rope_scaling, device, check) and the
    errors are `merge_and_check`'s, which also returns what the check measured.
    """
    return merge_and_check(model, adapter, output, **options)[0]


def merge_and_check(
    model: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
    rope_factor: float | None = None,
    rope_scaling: str = "linear",
    device: str | torch.device = "cpu",
    check: bool = True,
) -> tuple[Path, MergeReport]:
    """Write base + adapter as one standalone model directory `output`; returns its path and a MergeReport.

    model: the base (local directory, hub id or .gguf file); None reads it from the adapter's adapter_config.json
        (base_model_name_or_path).
    adapter: the PEFT adapter directory `longlora train` wrote (LoRA + embed/norm modules_to_save, config.json with
        the position interpolation, tokenizer).
    output: the directory to create. An existing non-empty one is refused unless `overwrite`; it may not contain
        the base or the adapter.
    dtype: dtype of the merged weights: 'auto' (the base checkpoint's stored dtype), 'float32', 'bfloat16' or
        'float16'. The merge itself is computed in float32.
    max_shard_size: largest safetensors file ("2GB", "500MB", or bytes); bigger models are sharded with an index.
    rope_factor, rope_scaling: a further position interpolation on top of the trained config (or on the base
        config, for an adapter saved without config.json), as `load_model_and_tokenizer` applies it.
    device: where the merge runs ('cpu' works for any model whose float32 copy fits in memory).
    check: reload the written model and compare its logits with base + adapter on a short probe (logged).

    Raises ValueError when the adapter's config.json or its tensors do not fit the base (another model's adapter),
    FileExistsError for an existing output; nothing is written then.
    """
    if adapter is None:
        raise ValueError("pass the adapter directory to merge (the one `longlora train` wrote)")
    if output is None:
        raise ValueError("pass the output directory for the merged model")
    adapter, output = str(adapter), Path(output)
    read_adapter_config(adapter)  # a clear error for a directory that is not an adapter, before anything loads
    checkpoint = resolve_checkpoint(model, adapter, rope_factor=rope_factor, rope_scaling=rope_scaling)
    check_output_dir(output, overwrite, inputs=[adapter, checkpoint.model])
    target = stored_dtype(checkpoint) if resolve_dtype(dtype) == "auto" else resolve_dtype(dtype)

    if checkpoint.quantization_config is not None:
        logger.info("%s was trained on a 4-bit base: merging onto its dequantized weights", adapter)
    lm = load_base_model(checkpoint, torch.float32)  # merge arithmetic in float32, whatever the output dtype
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    lm.to(device)
    peft_model = load_adapter(lm, checkpoint).eval()
    probe = _probe_ids(lm.config.vocab_size)
    reference = _logits(peft_model, probe) if check else None
    lost = _lost_changes(peft_model, target)
    for group, share in lost.items():
        if share >= LOST_WARNING_SHARE:
            logger.warning(
                "%s: %.0f %% of trained changes are below %s resolution; --dtype float32 keeps them",
                group, 100 * share, str(target).removeprefix("torch."),
            )
    merged = peft_model.merge_and_unload()  # LoRA folded in, modules_to_save copies swapped in: a plain model
    del peft_model, lm
    if getattr(merged, "hf_quantizer", None) is not None:
        merged = unquantized_copy(merged)
    if tied:
        _keep_tied(merged)
    merged.to(device="cpu", dtype=target)
    _prepare_config(merged)
    tokenizer = load_tokenizer(checkpoint)

    with atomic_directory(output, overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        finalize_saved_files(tmp)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)  # some writers create 0600 files; the model is meant to be shared
    del merged
    logger.info("merged %s + %s into %s (%s)", checkpoint.model, adapter, output, target)

    diff = None
    if check:
        diff = float((_reloaded_logits(output, probe) - reference).abs().max())
        logger.info(
            "merged vs base + adapter: max |logit difference| %.3g on a %d-token probe (%s weights)",
            diff, probe.shape[1], str(target).removeprefix("torch."),
        )
    return output, MergeReport(target, diff, lost)


def _probe_ids(vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (1, PROBE_TOKENS), generator=generator)  # (1, T)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits.float().cpu()  # (1, T, V)


def _reloaded_logits(output: Path, ids: torch.Tensor) -> torch.Tensor:
    """The written model as plain transformers loads it, run in float32 (the stored values, upcast exactly)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    return _logits(model, ids)


@torch.no_grad()
def _lost_changes(peft_model, dtype: torch.dtype) -> dict[str, float]:
    """Group -> share of the trained changes (merged weight != base weight, in float32) that are gone once both are
    rounded to `dtype` (the stored merged weight equals the stored base weight). Computed one layer at a time."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    if dtype == torch.float32:
        return {}
    changed: dict[str, int] = {}
    gone: dict[str, int] = {}

    def count(group: str, base: torch.Tensor, trained: torch.Tensor) -> None:
        moved = trained != base
        kept = trained.to(dtype) != base.to(dtype)
        changed[group] = changed.get(group, 0) + int(moved.sum())
        gone[group] = gone.get(group, 0) + int((moved & ~kept).sum())

    for name, module in peft_model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            group = "norm weights" if "norm" in name.rsplit(".", 1)[-1] else "embeddings"
            trained = dict(module.modules_to_save[peft_model.active_adapter].named_parameters())
            for key, base in module.original_module.named_parameters():
                count(group, base.float(), trained[key].float())
        elif isinstance(module, LoraLayer) and peft_model.active_adapter in getattr(module, "lora_A", {}):
            base = module.get_base_layer().weight.float()
            delta = module.get_delta_weight(peft_model.active_adapter).float()
            count("LoRA projections", base, base + delta)
    return {group: gone[group] / changed[group] for group in changed if changed[group]}


def _keep_tied(model) -> None:
    """A tied-embedding base must come out tied: lm_head and the (trained) input embedding one tensor.

    PEFT keeps them tied through merge_and_unload when the adapter was made with ensure_weight_tying (our
    apply_lora_plus does). An adapter that trained the embedding without it leaves lm_head on the old weight;
    transformers would tie them on load anyway, so tie them here (lm_head takes the trained embedding) and say so.
    """
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is embedding.weight:
        return
    if not torch.equal(head.weight, embedding.weight):
        logger.warning(
            "the adapter trained the input embedding of a tied-embedding model without keeping lm_head tied; the "
            "merged model ties lm_head to the trained embedding (as transformers does on load), so its outputs "
            "differ from base + adapter"
        )
    head.weight = embedding.weight


def _prepare_config(model) -> None:
    """Inference settings for the merged model's config (it was trained with use_cache=False, maybe S2 attention)."""
    config = model.config
    config.use_cache = True
    config.dtype = next(model.parameters()).dtype
    if getattr(config, "_attn_implementation", None) not in (None, "sdpa", "eager"):
        model.set_attn_implementation("sdpa")


def cmd_merge(
    model: str | None,
    adapter: str,
    output: str,
    dtype: str = "auto",
    overwrite: bool = False,
    *,
    max_shard_size: str = "2GB",
    rope_factor: float | None = None,
    rope_scaling: str = "linear",
) -> dict[str, Any]:
    """`longlora merge`: merge_and_check, then print and return a summary of what was written and measured."""
    path, report = merge_and_check(
        model, adapter, output, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
        rope_factor=rope_factor, rope_scaling=rope_scaling,
    )
    config = json.loads((path / "config.json").read_text())
    files = sorted(p.name for p in path.iterdir())
    summary = {
        "output": str(path),
        "max_position_embeddings": config.get("max_position_embeddings"),
        "rope_parameters": config.get("rope_parameters"),
        "dtype": config.get("dtype"),
        "tie_word_embeddings": config.get("tie_word_embeddings"),
        "files": files,
        "max_logit_diff": report.max_logit_diff,
        "lost_changes": report.lost,
    }
    print(
        f"merged model written to {path} ({config.get('dtype')}, context {config.get('max_position_embeddings')}, "
        f"rope {config.get('rope_parameters')})\n"
        f"check: max |logit difference| vs base + adapter {report.max_logit_diff:.3g} on a {PROBE_TOKENS}-token probe"
    )
    return summary
