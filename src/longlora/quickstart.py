"""`longlora quickstart`: the whole LongLoRA workflow on the embedded default model, on a laptop CPU, in minutes.

1. the embedded base (a small Llama pretrained at 256 tokens on the Python standard library; its weights ship with
   the package, `--rebuild-base` makes them again from the recipe);
2. perplexity of the base at its own length and at 4x, as is and with position interpolation only;
3. `train`: extend it to 4x with S2-Attn + LoRA+ + linear PI (the paper's recipe, scaled down);
4. perplexity of the extended model at both lengths;
   passkey retrieval with both templates ('paper': the paper's English prompt; 'code': `PASSKEY = K` hidden in
   held-out Python source, the embedded model's own language) for the base at 256, the base with PI only at 1024
   and the extended model at 1024;
5. `merge` into a standalone model; a before/after table, plots and a JSON summary in the output directory, and
   the command to ask the extended model questions in the browser (`longlora serve`).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE_LENGTH = 256
"""The embedded model's pretraining context."""
FACTOR = 4
"""Extension factor (256 -> 1024)."""


@dataclass(frozen=True)
class QuickstartPlan:
    """Sizes of the run; `fast` is the CI smoke version."""

    train_steps: int
    train_files: int | None
    eval_windows: int
    passkey_trials: int
    learning_rate: float = 2e-3
    gradient_accumulation_steps: int = 2
    per_device_train_batch_size: int = 2


FULL = QuickstartPlan(train_steps=60, train_files=None, eval_windows=32, passkey_trials=2)
FAST = QuickstartPlan(train_steps=16, train_files=60, eval_windows=12, passkey_trials=1)

PASSKEY_TEMPLATES = ("paper", "code")


def _passkeys(model, tokenizer, length: int, trials: int, seed: int, label: str) -> dict[str, dict[str, Any]]:
    """Passkey retrieval at `length` with both templates (the default depths 0 .. 1): {template: result}."""
    from .evaluate.passkey import run_passkey

    print(f"  passkey retrieval of {label} at {length} tokens (paper and code templates)", flush=True)
    return {template: run_passkey(model, tokenizer, [length], trials=trials, seed=seed, template=template,
                                  progress=False) for template in PASSKEY_TEMPLATES}


def _perplexities(model, tokenizer, data: Path, lengths, windows: int, label: str) -> list[dict[str, Any]]:
    from .evaluate.perplexity import evaluate_perplexity

    print(f"  perplexity of {label} at {', '.join(map(str, lengths))} tokens", flush=True)
    return evaluate_perplexity(model, tokenizer, str(data), lengths, stride=BASE_LENGTH, max_windows=windows,
                               batch_size=4)


def run_quickstart(output: str | os.PathLike = "runs/quickstart", *, fast: bool = False,
                   cache_dir: str | os.PathLike | None = None, seed: int = 0, rebuild_base: bool = False,
                   threads: int | None = None) -> dict[str, Any]:
    """Run the five steps; returns (and writes to <output>/summary.json) the before/after numbers.

    rebuild_base: make the embedded base again from its recipe (into `cache_dir`) instead of using the shipped one.
    threads: torch CPU threads for the whole run (default: the cores torch sees).
    """
    import torch

    from .embedded_shipping import check_recipe_supported

    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if rebuild_base:
        check_recipe_supported()  # before anything is written
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(output, fast, cache_dir, seed, rebuild_base)
    finally:
        torch.set_num_threads(before)


def _run(output, fast: bool, cache_dir, seed: int, rebuild_base: bool) -> dict[str, Any]:
    import torch

    from .embedded import write_stdlib_split
    from .embedded_shipping import embedded_model_path
    from .io import write_json
    from .merge import merge_adapter
    from .modeling import load_model_and_tokenizer
    from .plots import plot_passkey_heatmap, plot_perplexity
    from .train import cmd_train

    plan = FAST if fast else FULL
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    target = BASE_LENGTH * FACTOR
    lengths = [BASE_LENGTH, target]

    print("[1/5] embedded base model", flush=True)
    base = embedded_model_path(cache_dir, rebuild=rebuild_base)
    data_dir = out / "data"
    train_dir = write_stdlib_split(data_dir / "train", "train", plan.train_files)
    heldout_dir = write_stdlib_split(data_dir / "heldout", "heldout")

    print("[2/5] the base model before extension", flush=True)
    model, tokenizer = load_model_and_tokenizer(str(base), dtype="float32", device="cpu")
    model.config.max_position_embeddings = target  # no interpolation: positions past 256 were never seen
    base_ppl = _perplexities(model, tokenizer, heldout_dir, lengths, plan.eval_windows, "base")
    model.config.max_position_embeddings = BASE_LENGTH
    passkeys = {"base": _passkeys(model, tokenizer, BASE_LENGTH, plan.passkey_trials, seed, "base")}
    del model
    model, tokenizer = load_model_and_tokenizer(str(base), dtype="float32", device="cpu", rope_factor=FACTOR)
    pi_ppl = _perplexities(model, tokenizer, heldout_dir, lengths, plan.eval_windows, "base + PI (no training)")
    passkeys["base + PI (no training)"] = _passkeys(model, tokenizer, target, plan.passkey_trials, seed, "base + PI")
    del model

    print(f"[3/5] longlora train: {BASE_LENGTH} -> {target} tokens, S2-Attn + LoRA+ + linear PI", flush=True)
    adapter = out / "adapter"
    if adapter.exists():
        shutil.rmtree(adapter)
    trained = cmd_train(
        [], model=str(base), data=str(train_dir), output_dir=str(adapter), context_length=target,
        max_steps=plan.train_steps, learning_rate=plan.learning_rate, warmup_steps=min(10, plan.train_steps // 4),
        per_device_train_batch_size=plan.per_device_train_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps, save_steps=plan.train_steps,
        logging_steps=max(1, plan.train_steps // 20), seed=seed, gradient_checkpointing=False,
    )

    print("[4/5] the extended model", flush=True)
    model, tokenizer = load_model_and_tokenizer(str(base), str(adapter), dtype="float32", device="cpu")
    ext_ppl = _perplexities(model, tokenizer, heldout_dir, lengths, plan.eval_windows, "extended")
    passkeys["extended (LongLoRA)"] = _passkeys(model, tokenizer, target, plan.passkey_trials, seed, "extended")
    del model

    print("[5/5] merge into a standalone model", flush=True)
    merged = merge_adapter(str(base), str(adapter), out / "merged", dtype="float32", overwrite=True)

    results = {"base": base_ppl, "base + PI (no training)": pi_ppl, "extended (LongLoRA)": ext_ppl}
    plot_perplexity(results, out / "perplexity.png")
    extended_passkey = passkeys["extended (LongLoRA)"]
    plot_passkey_heatmap(extended_passkey["paper"], out / "passkey_heatmap.png")
    plot_passkey_heatmap(extended_passkey["code"], out / "passkey_code_heatmap.png")
    write_json(out / "passkey.json", passkeys)  # every record: prompt lengths, keys, answers
    by = {label: {r["length"]: r["perplexity"] for r in rows} for label, rows in results.items()}
    base_own = by["base"][BASE_LENGTH]
    summary = dict(
        base_model=str(base), adapter=str(adapter), merged=str(merged), fast=fast, seed=seed,
        lengths=lengths, perplexity=by, passkey_accuracy=extended_passkey["paper"]["accuracy"],
        passkey={label: {template: result["accuracy"] for template, result in by_template.items()}
                 for label, by_template in passkeys.items()},
        train=dict(steps=trained.summary["steps"], seconds=trained.summary["seconds"],
                   first_loss=trained.summary["first_loss"], last_loss=trained.summary["last_loss"]),
        extended_vs_base_own_length=by["extended (LongLoRA)"][target] / base_own,
        extended_beats_pi_only=by["extended (LongLoRA)"][target] < by["base + PI (no training)"][target],
        seconds=time.time() - started, threads=torch.get_num_threads(),
    )
    write_json(out / "summary.json", summary)
    _print_table(by, lengths, summary)
    return summary


def _print_table(by: dict, lengths: list[int], summary: dict) -> None:
    header = f"{'model':<28}" + "".join(f"{f'ppl@{n}':>12}" for n in lengths)
    print("\n" + header + "\n" + "-" * len(header))
    for label, row in by.items():
        print(f"{label:<28}" + "".join(f"{row[n]:>12.2f}" for n in lengths))
    print(f"\nextended @{lengths[-1]} / base @{lengths[0]}: {summary['extended_vs_base_own_length']:.3f} "
          "(target <= 1.10)")
    header = f"{'passkey accuracy':<28}{'length':>8}" + "".join(f"{t:>10}" for t in PASSKEY_TEMPLATES)
    print("\n" + header + "\n" + "-" * len(header))
    for label, by_template in summary["passkey"].items():
        length = next(iter(by_template[PASSKEY_TEMPLATES[0]]))
        print(f"{label:<28}{length:>8}" + "".join(f"{by_template[t][length]:>10.0%}" for t in PASSKEY_TEMPLATES))
    print(f"\ntotal {summary['seconds']:.0f}s on {summary['threads']} threads")
    print(f"\nAsk the extended model about a long document in your browser:\n"
          f"  pip install 'longlora[serve]'\n  longlora serve --model {summary['merged']}")


def cmd_quickstart(output: str = "runs/quickstart", fast: bool = False, cache_dir: str | None = None,
                   seed: int = 0, rebuild_base: bool = False, threads: int | None = None) -> dict[str, Any]:
    return run_quickstart(output, fast=fast, cache_dir=cache_dir, seed=seed, rebuild_base=rebuild_base,
                          threads=threads)
