"""Merge a LongLoRA adapter into its base model: one standalone Hugging Face checkpoint with its RoPE scaling recorded.

    merge_adapter(adapter="runs/llama-32k/adapter", output="models/llama-32k")           # base from the adapter
    merge_adapter("meta-llama/Llama-2-7b-hf", "runs/llama-32k/adapter", "models/llama-32k", dtype="float16")

What goes in:
- the base weights, loaded with the *trained* config: `longlora train` saves the base config after position
  interpolation as config.json in the adapter directory, so rope_parameters (rope_type, factor, rope_theta) and
  max_position_embeddings (the trained context) come from there; it must describe the base's architecture;
- the adapter: LoRA on the attention projections, folded into the weights by PEFT's `merge_and_unload`, and the
  trained embedding and norm weights (PEFT `modules_to_save`), which replace the base's;
- the tokenizer: the adapter directory's when it has one (training may have added a pad token), else the base's.

What comes out: safetensors shards (+ index when sharded), config.json, generation_config.json and the tokenizer, in a
directory that plain transformers loads with `AutoModelForCausalLM.from_pretrained(out)`: no longlora import, no
PEFT, full attention, the RoPE scaling applied by transformers from config.json (the original LongLoRA releases left
it out, so every consumer had to repeat it). Tied word embeddings stay tied (one tensor in the file).

The directory appears whole or not at all: everything is written into a temporary directory beside it, which is
renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longlora.modeling import (
    _adapter_vocab_size,
    _check_model_source,
    _gguf_source,
    _has_tokenizer,
    read_adapter_config,
    resolve_dtype,
)

logger = logging.getLogger(__name__)

TRAINED_CONFIG = "config.json"
"""The config `longlora train` saves in the adapter directory: the base config after position interpolation."""

# Config fields that must agree between the base model and the adapter's trained config (the architecture).
# vocab_size is checked separately: training may have resized the embedding (added tokens).
ARCHITECTURE_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "head_dim",
)

# Attention settings that must not reach the merged config: the output loads with plain transformers, full attention.
_ATTENTION_KEYS = ("_attn_implementation", "_attn_implementation_internal", "attn_implementation")

_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."


def merge_adapter(
    model: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "bfloat16",
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
    rope_factor: float | None = None,
    rope_scaling: str = "linear",
    device: str | torch.device = "cpu",
) -> Path:
    """Write base + adapter as one standalone model directory `output`; returns its path.

    model: the base (local directory, hub id or .gguf file); None reads it from the adapter's adapter_config.json
        (base_model_name_or_path).
    adapter: the PEFT adapter directory `longlora train` wrote (LoRA + embed/norm modules_to_save, config.json with
        the position interpolation, tokenizer).
    output: the directory to create. An existing non-empty one is refused unless `overwrite`; it may not contain
        the base or the adapter.
    dtype: dtype of the merged weights ('bfloat16', 'float16', 'float32' or 'auto' = the base checkpoint's).
    max_shard_size: largest safetensors file ("2GB", "500MB", or bytes); bigger models are sharded with an index.
    rope_factor, rope_scaling: a further position interpolation on top of the trained config (or on the base
        config, for an adapter saved without config.json), as `load_model_and_tokenizer` applies it.
    device: where the merge runs ('cpu' works for any model that fits in memory).

    Raises ValueError when the adapter's config.json or its tensors do not fit the base (another model's adapter),
    FileExistsError for an existing output; nothing is written then.
    """
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if adapter is None:
        raise ValueError("pass the adapter directory to merge (the one `longlora train` wrote)")
    if output is None:
        raise ValueError("pass the output directory for the merged model")
    adapter, output = str(adapter), Path(output)
    adapter_config = read_adapter_config(adapter)
    if model is None:
        model = adapter_config.get("base_model_name_or_path")
        if not model:
            raise ValueError(
                f"adapter {adapter!r} does not name its base model (base_model_name_or_path); pass the model too"
            )
    model = str(model)
    _check_model_source(model)
    model, gguf_file = _gguf_source(model, None)
    gguf_kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
    _check_output(output, overwrite, inputs=[adapter, model])
    torch_dtype = resolve_dtype(dtype)

    base_config = AutoConfig.from_pretrained(model, **gguf_kwargs)
    saved_rows = _adapter_vocab_size(adapter)
    config = trained_config(adapter, base_config, saved_rows)
    if rope_factor is not None:
        config = _stretch(config, rope_factor, rope_scaling)

    lm = AutoModelForCausalLM.from_pretrained(
        model, config=config, dtype=torch_dtype, attn_implementation="sdpa", **gguf_kwargs
    )
    if saved_rows is not None and saved_rows != lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(saved_rows)  # training added tokens; the adapter holds the trained rows
    check_adapter_shapes(lm, adapter)
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))

    lm.to(device)
    try:
        peft_model = PeftModel.from_pretrained(lm, adapter)
    except RuntimeError as error:  # shape mismatches our own check did not catch (exotic adapter layouts)
        raise ValueError(f"adapter {adapter!r} does not fit the base model {model!r}: {error}") from error
    merged = peft_model.merge_and_unload()  # LoRA folded in, modules_to_save copies swapped in: a plain model
    if getattr(merged, "hf_quantizer", None) is not None:
        merged = _unquantized_copy(merged)
    if tied:
        _keep_tied(merged)
    if torch_dtype != "auto":
        merged.to(torch_dtype)
    merged.to("cpu")
    _prepare_config(merged)

    tokenizer_source = adapter if _has_tokenizer(adapter) else model
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_source, **(gguf_kwargs if tokenizer_source == model else {})
    )

    with atomic_directory(output, overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        _clean_config_file(tmp / "config.json")
        for path in tmp.iterdir():
            os.chmod(path, 0o644)  # some writers create 0600 files; the model is meant to be shared
    logger.info("merged %s + %s into %s", model, adapter, output)
    return output


def trained_config(adapter: str | os.PathLike, base_config, saved_rows: int | None = None):
    """The config the adapter was trained with: its config.json (RoPE scaling, trained context) when it has one,
    checked against `base_config`'s architecture; else a copy of `base_config`.

    vocab_size is set to the base's, so the base weights load; a trained vocabulary of `saved_rows` tokens (the
    embedding the adapter saved) is restored by resizing after loading.
    """
    import copy

    from transformers import CONFIG_MAPPING

    path = Path(adapter) / TRAINED_CONFIG
    if not path.is_file():
        logger.info("%s has no %s: the base model's RoPE and context are kept", adapter, TRAINED_CONFIG)
        return copy.deepcopy(base_config)
    values = json.loads(path.read_text())
    model_type = values.get("model_type")
    if model_type != base_config.model_type:
        raise ValueError(
            f"the adapter's {path} is for model_type {model_type!r} but the base model is "
            f"{base_config.model_type!r}: this adapter was trained on another model; pass the base it was trained on"
        )
    for key in _ATTENTION_KEYS:  # never load with a training-time attention (S2 is for training only)
        values.pop(key, None)
    # How the base was stored at training time (a GGUF file's mark) is not an architecture: how the base loads now
    # is decided by the base itself.
    values.pop("quantization_config", None)
    config = CONFIG_MAPPING[model_type].from_dict(values)
    mismatches = [
        f"{key} {getattr(config, key, None)} (adapter) vs {getattr(base_config, key, None)} (base)"
        for key in ARCHITECTURE_KEYS
        if getattr(config, key, None) != getattr(base_config, key, None)
    ]
    vocab_ok = {base_config.vocab_size} | ({saved_rows} if saved_rows is not None else set())
    if config.vocab_size not in vocab_ok:
        mismatches.append(f"vocab_size {config.vocab_size} (adapter) vs {base_config.vocab_size} (base)")
    if mismatches:
        raise ValueError(
            f"the adapter's {path} does not describe the base model's architecture: {'; '.join(mismatches)}. "
            "The adapter was trained on another model; pass the base it was trained on"
        )
    config.vocab_size = base_config.vocab_size
    return config


def _stretch(config, rope_factor: float, rope_scaling: str):
    from longlora.rope import apply_position_interpolation, original_context_length

    if not rope_factor > 0:
        raise ValueError(f"rope_factor must be > 0, got {rope_factor}")
    original = original_context_length(config)
    return apply_position_interpolation(
        config, context_length=int(round(original * rope_factor)), scaling=rope_scaling, factor=rope_factor
    )


def _adapter_shapes(adapter: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the adapter's weights file (read lazily, no tensor is loaded)."""
    directory = Path(adapter)
    safetensors_file = directory / _ADAPTER_WEIGHTS[0]
    if safetensors_file.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors_file), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    bin_file = directory / _ADAPTER_WEIGHTS[1]
    if bin_file.is_file():
        state = torch.load(bin_file, map_location="meta", weights_only=True)
        return {key: tuple(value.shape) for key, value in state.items()}
    raise FileNotFoundError(f"adapter {str(adapter)!r} has no weights ({' or '.join(_ADAPTER_WEIGHTS)})")


def check_adapter_shapes(model: nn.Module, adapter: str | os.PathLike) -> None:
    """Raise ValueError naming the adapter tensors that do not fit `model` (the plain base model).

    LoRA A of a linear layer is (r, in_features) and B is (out_features, r); a module trained in full
    (modules_to_save) must have the base parameter's exact shape. A LoRA trained on a model of another hidden size,
    or an adapter for layers the base does not have, is refused here, before anything is merged or written.
    """
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters(remove_duplicate=False))
    problems = []
    for key, shape in _adapter_shapes(adapter).items():
        name = key.removeprefix(_PEFT_PREFIX)
        lora = next((part for part in (".lora_A.", ".lora_B.") if part in name), None)
        if lora is None:
            # A module trained in full; keys of other PEFT layouts (no matching parameter) are left to PEFT.
            parameter = parameters.get(name)
            if parameter is not None and tuple(parameter.shape) != shape:
                problems.append(f"{name}: adapter {list(shape)} vs base {list(parameter.shape)}")
            continue
        module_name = name.split(lora)[0]
        module = modules.get(module_name)
        if module is None:
            problems.append(f"{key}: the base model has no module {module_name!r}")
            continue
        if not isinstance(module, nn.Linear) or len(shape) != 2:
            continue  # LoRA on other layer types (Conv1D, embeddings) is checked by PEFT on load
        if lora == ".lora_A." and shape[1] != module.in_features:
            problems.append(
                f"{key}: LoRA A {list(shape)} expects in_features {shape[1]}, base has {module.in_features}"
            )
        if lora == ".lora_B." and shape[0] != module.out_features:
            problems.append(
                f"{key}: LoRA B {list(shape)} expects out_features {shape[0]}, base has {module.out_features}"
            )
    if problems:
        listed = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise ValueError(
            f"adapter {str(adapter)!r} does not fit the base model ({type(model).__name__}): {listed}. "
            "It was trained on another model; pass the base it was trained on"
        )


def _unquantized_copy(model):
    """The same model without the quantizer mark a GGUF load leaves (its weights are already dequantised, plain
    nn.Linear), which save_pretrained refuses to save: the tensors are moved into a fresh model of the same class."""
    import copy

    from accelerate import init_empty_weights

    if any(type(p) is not nn.Parameter for p in model.parameters()):
        raise ValueError(
            f"the base model is quantized ({model.hf_quantizer.quantization_config.quant_method}); merge into an "
            "unquantized base (load it in bfloat16/float16) instead"
        )
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):  # parameters on the meta device, buffers (RoPE) real
        fresh = type(model)(config)
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    fresh.load_state_dict(model.state_dict(), assign=True)  # tied tensors arrive as one object under both names
    if tied:
        fresh.get_output_embeddings().weight = fresh.get_input_embeddings().weight
    fresh.generation_config = model.generation_config
    return fresh.eval()


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


def _clean_config_file(path: Path) -> None:
    """Drop any attention-implementation setting from the saved config.json: the output must load with plain
    transformers, which chooses its own attention (an 's2_sdpa' there would need longlora imported)."""
    values = json.loads(path.read_text())
    if not any(key in values for key in _ATTENTION_KEYS):
        return
    for key in _ATTENTION_KEYS:
        values.pop(key, None)
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def _is_within(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def _check_output(output: Path, overwrite: bool, inputs: list[str] = ()) -> None:
    """Refuse an output that is a file, a non-empty directory (unless overwrite), or holds one of the inputs."""
    for source in inputs:
        if os.path.exists(source) and _is_within(Path(source), output):
            raise ValueError(
                f"output {str(output)!r} contains the input {source!r}; writing there would destroy it: "
                "choose another output directory"
            )
    if output.is_file():
        raise FileExistsError(f"output {str(output)!r} is a file; pass a directory path for the merged model")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output directory {str(output)!r} exists and is not empty; choose another one or pass overwrite "
            "(--overwrite) to replace it"
        )


@contextmanager
def atomic_directory(output: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `output`; on success it becomes `output`, on error it is removed.

    With overwrite, an existing `output` is replaced only once the new directory is complete (moved aside, the new
    one renamed into place, then the old one deleted), so a failure at any point leaves the old one as it was.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        yield tmp
        _check_output(output, overwrite)  # again: something may have appeared there meanwhile
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        old = None
        if output.is_dir() and any(output.iterdir()):
            old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(output, old)
        try:
            os.replace(tmp, output)  # also replaces an empty directory
        except BaseException:
            if old is not None:
                os.replace(old, output)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cmd_merge(
    model: str | None,
    adapter: str,
    output: str,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    *,
    max_shard_size: str = "2GB",
    rope_factor: float | None = None,
) -> dict[str, Any]:
    """`longlora merge`: merge_adapter, then print and return a summary of what was written."""
    path = merge_adapter(
        model, adapter, output, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
        rope_factor=rope_factor,
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
    }
    print(
        f"merged model written to {path} ({config.get('dtype')}, context {config.get('max_position_embeddings')}, "
        f"rope {config.get('rope_parameters')})"
    )
    return summary
