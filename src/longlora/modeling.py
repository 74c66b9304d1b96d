"""The one checkpoint loader: base model (+ RoPE scaling) + optional LoRA+ adapter, for eval, ask/chat, merge, convert.

    model, tokenizer = load_model_and_tokenizer("runs/llama-32k/adapter")          # base read from the adapter
    model, tokenizer = load_model_and_tokenizer("meta-llama/Llama-2-7b-hf", rope_factor=8)  # 4k -> 32k by PI
    model, tokenizer = load_model_and_tokenizer("smollm2.gguf")                    # GGUF, dequantised

Every command goes through the same three steps, so a checkpoint means the same thing to all of them:
1. `resolve_checkpoint`: which base (given, or the adapter's base_model_name_or_path; a .gguf file), which config
   (the adapter's trained config.json, checked against the base's architecture, plus an optional further
   `rope_factor`), which tokenizer (the adapter's when it saved one) and the trained vocabulary size. Configs only,
   no weights.
2. `load_base_model`: the base weights with that config, the embedding resized to the trained vocabulary, the
   adapter's tensor shapes checked against it.
3. the adapter on top through PEFT (`load_model_and_tokenizer`), or folded in (`longlora.merge`).

The model always uses full attention ("sdpa"): S2-Attn is a training-time approximation only (docs/method.md).
`finalize_saved_files` is the other half: what every checkpoint directory we write gets, so that all consumers read
it (legacy RoPE keys for transformers 4.x, llama.cpp and vLLM; no training-only keys).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .quantization import check_bitsandbytes, first_line

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
TRAINED_CONFIG = "config.json"
"""The config `longlora train` saves in the adapter directory: the base config after position interpolation."""
# Config fields that must agree between the base model and the adapter's trained config (the architecture).
# vocab_size is checked separately: training may have resized the embedding (added tokens).
ARCHITECTURE_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "head_dim",
)
# Attention settings that must not reach a saved config: checkpoints load with plain transformers and full attention.
ATTENTION_KEYS = ("_attn_implementation", "_attn_implementation_internal", "attn_implementation")
# Keys transformers 5 writes into tokenizer_config.json that describe how the files were read, not the tokenizer.
_TOKENIZER_JUNK_KEYS = ("is_local", "local_files_only")
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."
# Files whose presence means a directory carries its own tokenizer (our train command saves it beside the adapter).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
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


def check_model_source(model: str) -> None:
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


def gguf_source(model: str, gguf_file: str | None) -> tuple[str, str | None]:
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


def adapter_vocab_size(adapter: str | os.PathLike) -> int | None:
    """Rows of the input embedding saved in the adapter (modules_to_save), if it saved one."""
    weights = Path(adapter) / _ADAPTER_WEIGHTS[0]
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



def has_tokenizer(directory: str | os.PathLike) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)



@dataclass
class Checkpoint:
    """What `resolve_checkpoint` found: everything needed to load a base (+ adapter), before any weight is read."""

    model: str
    """The base: a local directory or hub id (for a GGUF file: its directory, with `gguf_file` its name)."""
    adapter: str | None
    gguf_file: str | None
    config: Any
    """The config to load the base with: the adapter's trained config (RoPE scaling, context) or the base's, plus
    any further rope_factor; vocab_size is the base checkpoint's (the trained rows are restored after loading)."""
    tokenizer_source: str
    trained_vocab_size: int | None
    """Rows of the embedding the adapter saved, when training resized it (added tokens); else None."""
    quantization_config: Any = None
    """For an adapter trained on a 4-bit (QLoRA) base: the BitsAndBytesConfig it was quantized with. The base is then
    quantized the same way and dequantized (`load_base_model`): the weights the adapter was trained against."""
    quantized_dtype: torch.dtype | None = None
    """The dtype the QLoRA base was loaded in before quantizing (the 4-bit codes depend on it)."""

    @property
    def gguf_kwargs(self) -> dict[str, str]:
        return {"gguf_file": self.gguf_file} if self.gguf_file is not None else {}


def resolve_checkpoint(
    model: str | os.PathLike | None,
    adapter: str | os.PathLike | None = None,
    *,
    rope_factor: float | None = None,
    rope_scaling: str = "linear",
    gguf_file: str | None = None,
) -> Checkpoint:
    """Find the base, config and tokenizer of `model` (+ `adapter`), with every check, reading configs only.

    A model that is itself an adapter directory is taken as `adapter=model`; model None reads the base from the
    adapter's adapter_config.json. Raises FileNotFoundError for a missing model / adapter, ValueError for an
    adapter whose trained config.json describes another architecture or a bad rope_factor.
    """
    from transformers import AutoConfig

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
    check_model_source(model)
    model, gguf_file = gguf_source(model, gguf_file)
    gguf_kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}

    config = AutoConfig.from_pretrained(model, **gguf_kwargs)
    trained_rows = None
    if adapter is not None:
        trained_rows = adapter_vocab_size(adapter)
        config = trained_config(adapter, config, trained_rows)
    if rope_factor is not None:
        config = stretch_rope(config, rope_factor, rope_scaling)
    tokenizer_source = adapter if adapter is not None and has_tokenizer(adapter) else model
    quantization = trained_quantization(adapter) if adapter is not None else None
    return Checkpoint(model, adapter, gguf_file, config, tokenizer_source, trained_rows,
                      *(quantization or (None, None)))


def trained_quantization(adapter: str | os.PathLike) -> tuple[Any, torch.dtype] | None:
    """(BitsAndBytesConfig, dtype loaded in) of the 4-bit base `adapter` was trained on; None for any other adapter.

    The run's options (longlora_config.yaml, which `longlora train` writes beside every adapter) say whether it was
    a QLoRA run (`quantization: 4bit`); the adapter's config.json (the training model's config) records how: its
    quantization_config and dtype, resolved as the run used them (compute dtype, NF4, double quantization).
    """
    import yaml

    from .config import RUN_CONFIG

    run_file = Path(adapter) / RUN_CONFIG
    if not run_file.is_file():
        return None
    try:
        options = yaml.safe_load(run_file.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{run_file} is damaged ({first_line(error)}); restore the file `longlora train` wrote"
                         ) from None
    if not isinstance(options, dict) or options.get("quantization") != "4bit":
        return None
    config_file = Path(adapter) / TRAINED_CONFIG
    values = json.loads(config_file.read_text()) if config_file.is_file() else {}
    quantization = values.get("quantization_config")
    dtype = _DTYPES.get(str(values.get("dtype")))
    if not isinstance(quantization, dict) or not quantization.get("load_in_4bit") or dtype is None:
        raise ValueError(
            f"adapter {str(adapter)!r} was trained on a 4-bit base ({RUN_CONFIG}: quantization 4bit) but its "
            f"{TRAINED_CONFIG} does not record the quantization (quantization_config, dtype); restore the "
            f"{TRAINED_CONFIG} `longlora train` wrote, or remove `quantization: 4bit` from {RUN_CONFIG} to use the "
            "unquantized base weights"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig.from_dict(quantization), dtype


def stretch_rope(config, rope_factor: float, rope_scaling: str = "linear"):
    """`config` with its context stretched `rope_factor` times more by `rope_scaling` (on top of any scaling it
    carries: see `longlora.rope.apply_position_interpolation`, "Composition")."""
    from longlora.rope import apply_position_interpolation, original_context_length

    if isinstance(rope_factor, bool) or not isinstance(rope_factor, (int, float)) or not rope_factor > 0:
        raise ValueError(f"rope_factor must be > 0, got {rope_factor!r}")
    original = original_context_length(config)
    return apply_position_interpolation(
        config, context_length=int(round(original * rope_factor)), scaling=rope_scaling, factor=rope_factor
    )


def trained_config(adapter: str | os.PathLike, base_config, saved_rows: int | None = None):
    """The config the adapter was trained with: its config.json (RoPE scaling, trained context) when it has one,
    checked against `base_config`'s architecture; else a copy of `base_config`.

    vocab_size is set to the base's, so the base weights load; a trained vocabulary of `saved_rows` tokens (the
    embedding the adapter saved) is restored by resizing after loading.
    """
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
    for key in ATTENTION_KEYS:  # never load with a training-time attention (S2 is for training only)
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


def stored_dtype(checkpoint: Checkpoint) -> torch.dtype:
    """The dtype the base checkpoint's weights are stored in (what merge --dtype auto writes).

    Read from the first floating-point tensor of a local safetensors file; else the config's dtype; a GGUF file
    (dequantised on load) and anything unknown count as float32.
    """
    if checkpoint.gguf_file is None and os.path.isdir(checkpoint.model):
        from safetensors import safe_open

        for weights in sorted(Path(checkpoint.model).glob("*.safetensors")):
            with safe_open(str(weights), framework="pt") as f:
                for key in f.keys():
                    dtype = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                    if dtype is not None:
                        return dtype
    if checkpoint.gguf_file is None:
        dtype = getattr(checkpoint.config, "dtype", None)
        if isinstance(dtype, str):
            dtype = _DTYPES.get(dtype)
        if isinstance(dtype, torch.dtype):
            return dtype
    return torch.float32


def load_base_model(checkpoint: Checkpoint, dtype: str | torch.dtype = "auto"):
    """The base weights loaded with `checkpoint.config` (full sdpa attention), the embedding resized to the trained
    vocabulary and, with an adapter, the adapter's tensor shapes checked against the model (ValueError).

    For an adapter trained on a 4-bit base (QLoRA) the base is quantized as in training and dequantized
    (`dequantized_base`): the weights the adapter learnt to correct, not the full-precision originals."""
    from transformers import AutoModelForCausalLM

    if checkpoint.quantization_config is not None:
        lm = dequantized_base(checkpoint, dtype)
    else:
        lm = AutoModelForCausalLM.from_pretrained(
            checkpoint.model, config=checkpoint.config, dtype=resolve_dtype(dtype), attn_implementation="sdpa",
            **checkpoint.gguf_kwargs,
        )
    rows = checkpoint.trained_vocab_size
    if rows is not None and rows != lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(rows)  # training added tokens (e.g. a pad token); the adapter holds those rows
    if checkpoint.adapter is not None:
        check_adapter_shapes(lm, checkpoint.adapter)
    return lm


def dequantized_base(checkpoint: Checkpoint, dtype: str | torch.dtype = "auto"):
    """The QLoRA base of `checkpoint` as plain nn.Linear layers holding its dequantized 4-bit weights, in `dtype`
    ('auto': the dtype training loaded the base in).

    The base is loaded as training loaded it (same BitsAndBytesConfig, same dtype before quantizing, the same
    from_pretrained call, which quantizes on CUDA when there is a GPU), so the NF4 codes and scales are the training
    run's, and each projection is dequantized by bitsandbytes' own dequantize_4bit, which its 4-bit layers also
    compute with in training: the weights are those the training forward used (then cast to `dtype`; float32 holds
    them exactly)."""
    from transformers import AutoModelForCausalLM

    check_bitsandbytes("cuda" if torch.cuda.is_available() else "cpu")
    lm = AutoModelForCausalLM.from_pretrained(
        checkpoint.model, config=checkpoint.config, dtype=checkpoint.quantized_dtype, attn_implementation="sdpa",
        quantization_config=checkpoint.quantization_config, **checkpoint.gguf_kwargs,
    )
    lm.dequantize()  # Linear4bit -> nn.Linear(dequantize_4bit(...)) in the load dtype; the quantizer mark removed
    lm.is_loaded_in_4bit = False  # (transformers leaves the flag set after dequantizing)
    target = resolve_dtype(dtype)
    if target != "auto":
        lm.to(target)
    return lm


def load_tokenizer(checkpoint: Checkpoint):
    from transformers import AutoTokenizer

    kwargs = checkpoint.gguf_kwargs if checkpoint.tokenizer_source == checkpoint.model else {}
    return AutoTokenizer.from_pretrained(checkpoint.tokenizer_source, **kwargs)


def load_adapter(lm, checkpoint: Checkpoint):
    """`lm` (from `load_base_model`) with the checkpoint's adapter on top through PEFT."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(lm, checkpoint.adapter)
    except RuntimeError as error:  # shape mismatches check_adapter_shapes did not catch (exotic adapter layouts)
        raise ValueError(
            f"adapter {checkpoint.adapter!r} does not fit the base model {checkpoint.model!r}: {error}"
        ) from error


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
        our train command saves it), that config is used, so the RoPE scaling need not be repeated; it must
        describe the base's architecture (ValueError otherwise).
    dtype: 'auto' (checkpoint dtype), 'float32'/'bfloat16'/'float16' or a torch.dtype.
    device: where to put the model; None picks CUDA when available, else CPU.
    rope_factor: position interpolation at load time: the context becomes original * rope_factor, with
        `rope_scaling` ('linear' is the paper's PI). Applied to the config before the weights load. For a model
        that is already scaled (a merged LongLoRA model), it stretches on top of that scaling: `original` is then
        the context the model already handles (see `longlora.rope.apply_position_interpolation`).
    gguf_file: name of a GGUF file inside the `model` directory (alternative to passing the .gguf path).
    """
    checkpoint = resolve_checkpoint(
        model, adapter, rope_factor=rope_factor, rope_scaling=rope_scaling, gguf_file=gguf_file
    )
    tokenizer = load_tokenizer(checkpoint)
    lm = load_base_model(checkpoint, dtype)
    if checkpoint.adapter is not None:
        lm = load_adapter(lm, checkpoint)
    lm.to(resolve_device(device))
    lm.eval()
    return lm, tokenizer


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


def unquantized_copy(model):
    """The same model without the quantizer mark a GGUF load leaves (its weights are already dequantised, plain
    nn.Linear), which save_pretrained refuses to save: the tensors are moved into a fresh model of the same class."""
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


def finalize_saved_files(directory: str | os.PathLike) -> None:
    """Make a directory that `save_pretrained` wrote readable by every consumer; each file is rewritten atomically.

    config.json: the legacy RoPE keys next to rope_parameters (`longlora.rope.legacy_rope_fields`: transformers 4.x,
    llama.cpp's converter and vLLM releases pinned to transformers 4 read only those; transformers 5's
    save_pretrained drops them), and no attention-implementation setting (an 's2_sdpa' there would need longlora
    imported to load). tokenizer_config.json: without the keys transformers 5 adds about how it was read
    (is_local, local_files_only), and with the tokenizer class transformers 4 knows for a tokenizer.json
    (PreTrainedTokenizerFast; transformers 5 reads that name too). adapter_config.json: module lists sorted (PEFT
    writes target_modules from a set, in an order that changes from process to process).
    """
    from longlora.io import update_json
    from longlora.rope import legacy_rope_fields

    directory = Path(directory)

    def config_update(values: dict) -> dict:
        for key in ATTENTION_KEYS:
            values.pop(key, None)
        for key, value in legacy_rope_fields(values).items():
            if value is None:
                values.pop(key, None)
            else:
                values[key] = value
        return values

    def tokenizer_update(values: dict) -> dict:
        for key in _TOKENIZER_JUNK_KEYS:
            values.pop(key, None)
        if values.get("tokenizer_class") == "TokenizersBackend" and (directory / "tokenizer.json").is_file():
            values["tokenizer_class"] = "PreTrainedTokenizerFast"
        return values

    def adapter_update(values: dict) -> dict:
        for key in ("target_modules", "modules_to_save"):
            if isinstance(values.get(key), list):
                values[key] = sorted(values[key])
        return values

    if (directory / "config.json").is_file():
        update_json(directory / "config.json", config_update)
    if (directory / ADAPTER_CONFIG).is_file():
        update_json(directory / ADAPTER_CONFIG, adapter_update)
    if (directory / "tokenizer_config.json").is_file():
        update_json(directory / "tokenizer_config.json", tokenizer_update)


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
