"""Evaluation: perplexity at several context lengths and passkey retrieval, each with JSON + PNG outputs.

`cmd_eval_perplexity` and `cmd_eval_passkey` are the plain functions behind `longlora eval perplexity` / `eval passkey`.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any, Sequence

from longlora.evaluate.passkey import (
    build_code_passkey_prompt, build_passkey_prompt, make_generate_fn, run_passkey, score_answer,
)
from longlora.evaluate.perplexity import (
    TokenStream,
    check_not_empty,
    evaluate_perplexity,
    load_token_stream,
    perplexity,
    save_token_bin,
)

__all__ = [
    "TokenStream", "load_token_stream", "save_token_bin", "perplexity", "evaluate_perplexity",
    "build_passkey_prompt", "build_code_passkey_prompt", "score_answer", "make_generate_fn", "run_passkey",
    "parse_model_spec", "cmd_eval_perplexity", "cmd_eval_passkey",
]


def parse_model_spec(spec: str) -> tuple[str, str]:
    """'label=path' -> (label, path); a bare 'path' is labelled by its last path component."""
    if "=" in spec and not os.path.exists(spec):
        label, path = spec.split("=", 1)
        if label and "/" not in label and path:
            return label, path
    return Path(spec.rstrip("/")).name or spec, spec


def _json_output(output: str | os.PathLike, default_name: str) -> Path:
    """A '.json' path as is; anything else is a directory that gets `default_name`."""
    output = Path(output)
    return output if output.suffix == ".json" else output / default_name


def _release_memory() -> None:
    """Return a deleted model's memory before the next one loads."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def cmd_eval_perplexity(
    models: Sequence[str], adapter: str | None = None, data: str | None = None,
    lengths: Sequence[int] = (1024, 2048, 4096), protocol: str = "window", stride: int = 256,
    max_windows: int | None = None, max_tokens: int | None = None, batch_size: int = 1, dtype: str = "auto",
    rope_factor: float | None = None, output: str | os.PathLike = "runs/eval/perplexity.json",
    *, token_dtype: str = "uint16", device: str | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of each model at each length; writes <output>.json and a plot <output>.png beside it.

    models: entries 'path' or 'label=path'; a path may be a model directory, hub id, .gguf file or an adapter
        directory (its base model is read from adapter_config.json). One plot line per entry.
    adapter: an adapter applied to the (single) model; with several models, give adapters as entries instead.
    data: a .bin token file (dtype `token_dtype`) or text / JSONL / directory (tokenised per model).
    dtype: the model's dtype ('auto', 'bfloat16', ...). rope_factor: position interpolation for every model.
    Returns {protocol, stride, data, lengths, models: {label: {model, adapter, rope_factor, results: [...]}}}.
    """
    from longlora.io import write_json
    from longlora.modeling import load_model_and_tokenizer, max_context
    from longlora.plots import plot_perplexity

    if not models:
        raise ValueError("pass at least one model")
    if data is None:
        raise ValueError("pass the evaluation data (a .bin token file, a text/JSONL file or a directory)")
    if not os.path.exists(data):
        raise FileNotFoundError(f"evaluation data {str(data)!r} does not exist")
    check_not_empty(data)  # before any model loads
    specs = [parse_model_spec(spec) for spec in models]
    labels = [label for label, _ in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique, got {labels}; name them with 'label=path'")
    if adapter is not None and len(specs) > 1:
        raise ValueError("--adapter applies to a single model; with several models pass 'label=adapter_dir' entries")

    json_path = _json_output(output, "perplexity.json")
    report: dict[str, Any] = {
        "protocol": protocol, "stride": stride, "data": str(data), "lengths": sorted(set(map(int, lengths))),
        "models": {},
    }
    for label, path in specs:
        model, tokenizer = load_model_and_tokenizer(
            path, adapter, dtype=dtype, device=device, rope_factor=rope_factor
        )
        results = evaluate_perplexity(
            model, tokenizer, data, lengths, protocol=protocol, stride=stride, max_windows=max_windows,
            max_tokens=max_tokens, batch_size=batch_size, token_dtype=token_dtype, progress=progress,
        )
        report["models"][label] = {
            "model": path, "adapter": adapter, "rope_factor": rope_factor, "max_context": max_context(model),
            "results": results,
        }
        del model, tokenizer
        _release_memory()
        write_json(json_path, report)  # after every model, so finished models survive a later failure
    plot_perplexity({label: entry["results"] for label, entry in report["models"].items()},
                    json_path.with_suffix(".png"))
    return report


def cmd_eval_passkey(
    model: str | None,
    adapter: str | None = None,
    lengths: Sequence[int] = (1024, 2048, 4096),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 5,
    seed: int = 0,
    rope_factor: float | None = None,
    output: str | os.PathLike = "runs/eval/passkey.json",
    *,
    dtype: str = "auto",
    device: str | None = None,
    max_new_tokens: int = 8,
    progress: bool = True,
    template: str = "paper",
) -> dict[str, Any]:
    """Passkey retrieval accuracy by length and depth (template 'paper' or 'code', see evaluate.passkey); writes
    <output>.json, <output>_heatmap.png and <output>_accuracy.png. `model` is 'path' or 'label=path'; it may be None
    (or an adapter directory) when `adapter` names its base model."""
    from longlora.io import write_json
    from longlora.modeling import load_model_and_tokenizer
    from longlora.plots import plot_passkey_accuracy, plot_passkey_heatmap

    json_path = _json_output(output, "passkey.json")
    label, model = parse_model_spec(str(model)) if model is not None else (parse_model_spec(str(adapter))[0], None)
    lm, tokenizer = load_model_and_tokenizer(model, adapter, dtype=dtype, device=device, rope_factor=rope_factor)
    result = run_passkey(lm, tokenizer, lengths, depths, trials=trials, seed=seed,
                         max_new_tokens=max_new_tokens, progress=progress, template=template)
    del lm
    _release_memory()
    result = {"label": label, "model": model, "adapter": adapter, "rope_factor": rope_factor, **result}
    write_json(json_path, result)
    stem = json_path.with_suffix("")
    plot_passkey_heatmap(result, f"{stem}_heatmap.png")
    plot_passkey_accuracy(result, f"{stem}_accuracy.png")
    return result
