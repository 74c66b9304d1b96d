"""One loader for evaluation, merge and generation: base model (+ RoPE scaling) + optional LoRA+ adapter.

    model, tokenizer = load_model_and_tokenizer("runs/llama-32k/adapter")          # base read from the adapter
    model, tokenizer = load_model_and_tokenizer("meta-llama/Llama-2-7b-hf", rope_factor=8)  # 4k -> 32k by PI
    model, tokenizer = load_model_and_tokenizer("smollm2.gguf")                    # GGUF, dequantised

The model always uses full attention ("sdpa"): S2-Attn is a training-time approximation only (LONGLORA.md, part 2).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

ADAPTER_CONFIG = "adapter_config.json"
# Files whose presence means a directory carries its own tokenizer (our train command saves it beside the adapter).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
# A hub id is "name" or "org/name"; anything else that does not exist locally is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """'auto' (the checkpoint's dtype), a torch.dtype, or one of float32/fp32, bfloat16/bf16, float16/fp16."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use 'auto' or one of {sorted(_DTYPES)}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None means the first CUDA device when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def read_adapter_config(adapter: str | os.PathLike) -> dict:
    """The adapter directory's adapter_config.json, with a clear error when it is not an adapter directory."""
    path = Path(adapter)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a PEFT adapter directory (no {ADAPTER_CONFIG}); pass the directory that "
            "`longlora train` wrote the adapter to"
        )
    return json.loads(config_file.read_text())


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).is_file()


def _check_model_source(model: str) -> None:
    """Local paths must exist; a string that is not a local path must at least look like a hub id."""
    if os.path.exists(model):
        return
    if model.endswith(".gguf"):
        raise FileNotFoundError(f"GGUF file {model!r} does not exist")
    if not _HUB_ID.match(model) or model.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"model {model!r} not found: not an existing local directory or file, and not a hub id of the form "
            "'org/name'"
        )


def _gguf_source(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Split a .gguf path into (directory, file name) as transformers' `gguf_file=` wants it."""
    if gguf_file is None and model.endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {model!r} does not exist")
        model, gguf_file = str(path.parent), path.name
    if gguf_file is not None:
        if os.path.isdir(model) and not (Path(model) / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {model!r}")
        if importlib.util.find_spec("gguf") is None:
            raise ImportError(
                "loading a .gguf model needs the `gguf` package: pip install gguf  (or pip install 'longlora[gguf]')"
            )
    return model, gguf_file


def _adapter_vocab_size(adapter: str) -> int | None:
    """Rows of the input embedding saved in the adapter (modules_to_save), if it saved one."""
    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if "embed_tokens" in key and key.endswith("weight"):
                shape = f.get_slice(key).get_shape()
                if len(shape) == 2:
                    return int(shape[0])
    return None


def load_model_and_tokenizer(
    model: str | os.PathLike | None,
    adapter: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    rope_factor: float | None = None,
    rope_scaling: str = "linear",
    gguf_file: str | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, in eval mode with full (sdpa) attention.

    model: a local directory, a hub id, or a `.gguf` file (needs the `gguf` package). May be None when `adapter`
        is given: the base is then read from the adapter's adapter_config.json (base_model_name_or_path).
        A model that is itself an adapter directory is treated as `adapter=model`.
    adapter: a PEFT adapter directory (LoRA, plus embed/norm weights saved as modules_to_save), loaded on top with
        PeftModel.from_pretrained. If the directory holds a tokenizer (our train command saves one), that tokenizer
        is used; if it holds a config.json (the base config with the position interpolation used in training, as
        our train command saves it), that config is used, so the RoPE scaling need not be repeated.
    dtype: 'auto' (checkpoint dtype), 'float32'/'bfloat16'/'float16' or a torch.dtype.
    device: where to put the model; None picks CUDA when available, else CPU.
    rope_factor: position interpolation at load time: the context becomes original * rope_factor, with
        `rope_scaling` ('linear' is the paper's PI). Applied to the config before the weights load. For a model
        that is already scaled (a merged LongLoRA model), it stretches on top of that scaling: `original` is then
        the context the model already handles (see `longlora.rope.apply_position_interpolation`).
    gguf_file: name of a GGUF file inside the `model` directory (alternative to passing the .gguf path).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if model is not None and adapter is None and is_adapter_dir(model):
        model, adapter = None, model
    if adapter is not None:
        adapter = str(adapter)
        adapter_config = read_adapter_config(adapter)
        if model is None:
            model = adapter_config.get("base_model_name_or_path")
            if not model:
                raise ValueError(
                    f"adapter {adapter!r} does not name its base model (base_model_name_or_path); pass the model too"
                )
    if model is None:
        raise ValueError("pass a model (directory, hub id or .gguf file) or an adapter directory")
    model = str(model)
    _check_model_source(model)
    model, gguf_file = _gguf_source(model, gguf_file)
    gguf_kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}

    config = AutoConfig.from_pretrained(model, **gguf_kwargs)
    if adapter is not None and (Path(adapter) / "config.json").is_file():
        # Our train command saves the base config *with* its position interpolation beside the adapter: the
        # adapter's weights were trained for that RoPE, so it replaces the base's. The vocabulary stays the base
        # checkpoint's until the weights are in (a resized embedding is restored from the adapter below).
        base_vocab = config.vocab_size
        config = AutoConfig.from_pretrained(adapter)
        config.vocab_size = base_vocab
    if rope_factor is not None:
        if rope_factor <= 0:
            raise ValueError(f"rope_factor must be > 0, got {rope_factor}")
        from longlora.rope import apply_position_interpolation, original_context_length

        original = original_context_length(config)
        config = apply_position_interpolation(
            config, context_length=int(round(original * rope_factor)), scaling=rope_scaling, factor=rope_factor
        )

    tokenizer_source = adapter if adapter is not None and _has_tokenizer(adapter) else model
    tokenizer_kwargs = gguf_kwargs if tokenizer_source == model else {}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, **tokenizer_kwargs)

    lm = AutoModelForCausalLM.from_pretrained(
        model, config=config, dtype=resolve_dtype(dtype), attn_implementation="sdpa", **gguf_kwargs
    )
    if adapter is not None:
        from peft import PeftModel

        # Training may have added tokens (e.g. a pad token) and resized the embedding the adapter saved.
        saved_rows = _adapter_vocab_size(adapter)
        if saved_rows is not None and saved_rows != lm.get_input_embeddings().weight.shape[0]:
            lm.resize_token_embeddings(saved_rows)
        lm = PeftModel.from_pretrained(lm, adapter)
    lm.to(resolve_device(device))
    lm.eval()
    return lm, tokenizer


def _has_tokenizer(directory: str) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def model_config(model) -> Any:
    """The transformers config of a model, also through a PEFT wrapper."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.config


def max_context(model) -> int:
    """Positions the model was configured for (config.max_position_embeddings; PI raises it)."""
    config = model_config(model)
    value = getattr(config, "max_position_embeddings", None)
    if value is None:
        raise ValueError(f"{type(config).__name__} has no max_position_embeddings; cannot tell the model's context")
    return int(value)
