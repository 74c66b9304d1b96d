"""The embedded base as users get it: the copy shipped in the package, the cache a rebuild goes to, and how a build
becomes the shipped form.

`embedded_model_path()` returns the shipped copy (`longlora/embedded_base/`: float16 safetensors and the
tokenizer), or, for a package installed without it, builds the recipe (`longlora.embedded`) into the cache on first
use; `rebuild=True` (`longlora quickstart --rebuild-base`) makes it again from the recipe. `ship_model` writes a
build in the shipped form (`python -m longlora.embedded_shipping` runs the recipe and refreshes the shipped copy).
Every write is atomic: an interrupted build or shipping leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .embedded import (
    METADATA_FILE, EmbeddedConfig, build_base_model, cache_path, stdlib_texts, window_perplexity,
)
from .io import replace_directory


# ---------------------------------------------------------------------------------------------------------- cache


def is_built(path: str | os.PathLike) -> bool:
    """Whether `path` holds a complete embedded build (its metadata file is written last)."""
    return (Path(path) / METADATA_FILE).is_file()


def cached_model_path(cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """The embedded model built from the recipe into the cache, built on first use (~15 minutes at 1 thread;
    the shipped build took 892 s).

    cache_dir: the cache root; default `$LONGLORA_CACHE`, else ~/.cache/longlora. The model lives in
    `<cache_dir>/embedded-<version>`. Concurrent first uses may both build; the first to finish wins.
    """
    path = cache_path(cache_dir)
    if is_built(path):
        return path
    if progress:
        print(f"Building the embedded base model into {path} (first use only, a few minutes on CPU) ...")
    try:
        # a directory there without the metadata was not written by a build (builds appear whole): replace it
        build_base_model(path, progress=progress, overwrite=path.exists())
    except OSError:
        if not is_built(path):  # not a lost race with another process that finished first: a real error
            raise
    return path


def embedded_model_path(
    cache_dir: str | os.PathLike | None = None, *, progress: bool = True, rebuild: bool = False
) -> Path:
    """The embedded base model's directory: the copy shipped with the package.

    rebuild: make it again from the recipe into `<cache_dir>/embedded-<version>` (replacing an earlier rebuild) and
    return that; needs torch >= 2.9 (Muon). A package installed without the shipped copy builds it there on first
    use (`cached_model_path`).
    """
    if rebuild:
        check_recipe_supported()
        path = cache_path(cache_dir)
        if progress:
            print(f"Rebuilding the embedded base model from its recipe into {path} (minutes on CPU) ...")
        return build_base_model(path, progress=progress, overwrite=True)
    if is_built(SHIPPED_DIR):
        return SHIPPED_DIR
    return cached_model_path(cache_dir, progress=progress)


# -------------------------------------------------------------------------------------------------------- shipped


SHIPPED_DIR = Path(__file__).resolve().parent / "embedded_base"
"""The recipe's result as shipped in the package (package data)."""
SHIPPED_DTYPE = "float16"
"""Storage dtype of the shipped weights (held-out perplexity at 256: 43.269, against 43.268 in float32); they load
as float32."""


def check_recipe_supported() -> None:
    """Raise a one-line ValueError when this torch cannot run the recipe (Muon needs torch >= 2.9)."""
    import torch

    if EmbeddedConfig().optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        raise ValueError(
            f"rebuilding the embedded base needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}. "
            "The shipped weights need no rebuild: run without --rebuild-base, or upgrade torch"
        )


def ship_model(build_dir: str | os.PathLike, output_dir: str | os.PathLike = SHIPPED_DIR) -> Path:
    """Write a build in the shipped form: float16 weights, the tokenizer and the metadata (atomically).

    The config keeps dtype float32, so `dtype='auto'` loads the float16 tensors as float32, the dtype they were
    trained and evaluated in.
    """
    import torch
    from safetensors.torch import load_file, save_file

    build_dir, output_dir = Path(build_dir), Path(output_dir)
    if not is_built(build_dir):
        raise FileNotFoundError(f"{build_dir} holds no complete embedded build (no {METADATA_FILE})")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.shipping-", dir=output_dir.parent))
    try:
        for path in build_dir.iterdir():
            if path.name not in ("model.safetensors", METADATA_FILE):
                shutil.copy2(path, tmp / path.name)
        tensors = load_file(build_dir / "model.safetensors")
        half = {name: t.to(getattr(torch, SHIPPED_DTYPE)).contiguous() for name, t in tensors.items()}
        save_file(half, tmp / "model.safetensors", metadata={"format": "pt"})
        metadata = json.loads((build_dir / METADATA_FILE).read_text())
        metadata["shipped_dtype"] = SHIPPED_DTYPE
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        for path in [tmp, *tmp.iterdir()]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        replace_directory(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def shipped_weights_match(build_dir: str | os.PathLike, shipped_dir: str | os.PathLike = SHIPPED_DIR) -> bool:
    """Whether a build, stored in the shipped dtype, is bitwise the shipped weights."""
    import torch
    from safetensors.torch import load_file

    built = load_file(Path(build_dir) / "model.safetensors")
    shipped = load_file(Path(shipped_dir) / "model.safetensors")
    dtype = getattr(torch, SHIPPED_DTYPE)
    return built.keys() == shipped.keys() and all(torch.equal(built[k].to(dtype), shipped[k]) for k in built)


def heldout_perplexity(model_dir: str | os.PathLike, length: int | None = None, max_windows: int = 512) -> float:
    """Held-out perplexity (window protocol, stride = length; default the pretraining context) of a build, in
    float32: the figure a rebuild is compared on when it is not bitwise the shipped weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    length = length or model.config.max_position_embeddings
    docs = [torch.tensor(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(stdlib_texts("heldout"))]
    return window_perplexity(model.eval(), docs, length, max_windows)


if __name__ == "__main__":  # python -m longlora.embedded_shipping [BUILD_DIR]: run the recipe and refresh the shipped copy
    build = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="longlora-embedded-")) / "model"
    ship_model(build_base_model(build, overwrite=True))
    print(f"shipped {SHIPPED_DIR} (built in {build})")
