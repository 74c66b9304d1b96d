"""What the context-extension ablations share (benchmarks/ablation.py, benchmarks/fidelity_gpu.py).

The rows (the paper's Table 2 / Table 6 settings), one row trained through `longlora train`'s own path
(`run_training`: position interpolation, LoRA+ / LoRA / full fine-tuning, S2 / short / full attention), the trained
model loaded back, its held-out perplexity with full attention and with the attention it was trained with, the
summary over seeds and the plot. Both scripts import this module by name: running a script puts benchmarks/ on
sys.path.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

# row -> (train options, the paper's number to compare with: Table 2 (PPL at 32k) or Table 6 (full-attention eval
# column); None where the paper has no such row)
ROWS: dict[str, tuple[dict | None, str]] = {
    "pi_only": (None, "no fine-tuning: position interpolation only"),
    "full_ft_full": (dict(finetune="full", attention="full"), "Table 2 full fine-tune: 8.08"),
    "lora_full": (dict(finetune="lora", attention="full"), "Table 2 LoRA (q,k,v,o): 11.44"),
    "lora_norm_full": (dict(finetune="lora_plus", trainable=["norm"], attention="full"), "Table 2 LoRA + norm: 10.49"),
    "lora_embed_full": (dict(finetune="lora_plus", trainable=["embed"], attention="full"),
                        "Table 2 LoRA + embed: 8.29"),
    "lora_plus_full": (dict(finetune="lora_plus", attention="full"), "Table 2 LoRA+ (embed + norm): 8.12"),
    "lora_plus_s2": (dict(finetune="lora_plus", attention="s2"), "Table 6 S2-Attn (the method): 8.12"),
    "lora_plus_short": (dict(finetune="lora_plus", attention="short"), "Table 6 plain groups, no shift: 8.39"),
    "full_ft_s2": (dict(finetune="full", attention="s2"), "full fine-tune + S2 (paper: close to 8.08)"),
    "ratio_1_2": (dict(finetune="lora_plus", attention="s2", group_size_ratio=0.5), "group 1/2 (paper: best with 1/4)"),
    "ratio_1_4": (dict(finetune="lora_plus", attention="s2", group_size_ratio=0.25), "group 1/4 (paper default)"),
    "ratio_1_8": (dict(finetune="lora_plus", attention="s2", group_size_ratio=0.125), "group 1/8 (paper: worse)"),
}

GROUP_SIZE_RATIO = 0.25
"""The paper's default group: 1/4 of the training length (section 3.2); a row without the option uses it."""


def same_options(a: dict | None, b: dict | None) -> bool:
    """Whether two rows' train options are the same run (group_size_ratio defaults to 1/4)."""
    if a is None or b is None:
        return a is b
    return {"group_size_ratio": GROUP_SIZE_RATIO, **a} == {"group_size_ratio": GROUP_SIZE_RATIO, **b}


def train_row(options: dict, *, base: str | Path, output_dir: str | Path, data: str, target: int, steps: int,
              seed: int, learning_rate: float, full_ft_learning_rate: float, build_data=None, callbacks=None,
              **train_options) -> dict[str, Any]:
    """Train one row with `longlora train`'s path; returns its train summary (steps, seconds, losses, ...).

    build_data: `run_training`'s hook, `(config, tokenizer) -> (train_dataset, collator)`, for tokens already in
    memory; None reads `data` as `longlora train --data` does. callbacks: transformers TrainerCallbacks.
    train_options: other TrainConfig (or TrainingArguments) fields.
    """
    from longlora.config import TrainConfig, load_config
    from longlora.train import run_training

    rate = full_ft_learning_rate if options.get("finetune") == "full" else learning_rate
    settings = dict(model=str(base), data=str(data), output_dir=str(output_dir), context_length=target,
                    max_steps=steps, learning_rate=rate, warmup_steps=min(10, steps // 4), save_steps=10**6,
                    logging_steps=max(1, steps // 10), seed=seed, gradient_checkpointing=False)
    config = load_config(TrainConfig, [], **{**settings, **train_options, **options})
    return run_training(config, build_data, callbacks).summary


def load_row_model(options: dict | None, base: str | Path, output_dir: str | Path | None, factor: int, *,
                   device: str = "cpu"):
    """(model, tokenizer) of a row in fp32 with full attention: the base with PI only, a full fine-tune, or the base
    with the row's adapter (whose saved config carries the interpolation)."""
    from longlora.modeling import load_model_and_tokenizer

    if options is None:
        return load_model_and_tokenizer(str(base), dtype="float32", device=device, rope_factor=factor)
    if options.get("finetune") == "full":
        return load_model_and_tokenizer(str(output_dir), dtype="float32", device=device)
    return load_model_and_tokenizer(str(base), str(output_dir), dtype="float32", device=device)


def row_perplexities(model, tokenizer, data, options: dict | None, lengths: list[int], *, windows: int,
                     stride: int | None = None, batch_size: int = 4, label: str = "") -> dict[str, float]:
    """Held-out perplexity of a row: {'ppl_<L>': ... for each length (full attention),
    'ppl_<target>_trained_attention': ... at the last length with the attention it was trained with}.

    data: a directory of text files or tokens already loaded (`evaluate_perplexity`'s `data`). stride: window
    stride, None = each length's own (non-overlapping windows). The S2 / short rows are measured a second time with
    S2 switched on in eval (Table 6's "test w/o full attn" column); the model is left with full attention.
    """
    from longlora import disable_s2_attention, enable_s2_attention
    from longlora.evaluate.perplexity import evaluate_perplexity, load_token_stream

    if isinstance(data, (str, Path)):
        data = load_token_stream(data, tokenizer)  # tokenised once for every length and both attentions

    def measure(length: int) -> float:
        result = evaluate_perplexity(model, tokenizer, data, [length], stride=stride or length, max_windows=windows,
                                     batch_size=batch_size, progress=False)
        return result[0]["perplexity"]

    target = lengths[-1]
    print(f"  perplexity of {label} at {', '.join(map(str, lengths))} tokens", flush=True)
    ppl = {f"ppl_{length}": measure(length) for length in lengths}
    ppl[f"ppl_{target}_trained_attention"] = ppl[f"ppl_{target}"]
    if options is not None and options.get("attention") in ("s2", "short"):
        enable_s2_attention(model, group_size_ratio=options.get("group_size_ratio", GROUP_SIZE_RATIO),
                            shift=options["attention"] == "s2", in_eval=True)
        ppl[f"ppl_{target}_trained_attention"] = measure(target)
        disable_s2_attention(model)
    return ppl


def summarize(results: list[dict], lengths: list[int], extra: tuple[str, ...] = ()) -> list[dict]:
    """Mean over seeds of every row (in first-seen order), stdev at the target length; prints the table.

    extra: further numeric result keys to average and show (None values are left out of a mean).
    """
    base, target = lengths[0], lengths[-1]
    main, short, own = f"ppl_{target}", f"ppl_{base}", f"ppl_{target}_trained_attention"
    by_row: dict[str, list[dict]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    heads = [f"ppl@{target}", "+-", f"ppl@{base}", "own attn", *extra]
    print(f"\n{'row':<16} " + " ".join(f"{h:>9}" for h in heads) + "  paper")
    summary = []
    for row, rs in by_row.items():
        vals = [r[main] for r in rs]
        entry = {"row": row, main: statistics.fmean(vals),
                 "stdev": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                 short: statistics.fmean(r[short] for r in rs), own: statistics.fmean(r[own] for r in rs)}
        for key in extra:
            present = [r[key] for r in rs if r.get(key) is not None]
            entry[key] = statistics.fmean(present) if present else None
        entry.update(seeds=len(rs), paper=rs[0]["paper"])
        summary.append(entry)
        cells = [entry[main], entry["stdev"], entry[short], entry[own], *(entry[k] for k in extra)]
        print(f"{row:<16} " + " ".join(f"{'-':>9}" if c is None else f"{c:>9.3f}" for c in cells)
              + f"  {entry['paper']}")
    return summary


def plot_rows(summary: list[dict], lengths: list[int], path: str | Path, *, title: str, xlabel: str) -> None:
    """Each row's perplexity at the target (mean, stdev bar), at the base length, and with its own attention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from longlora.io import atomic_path

    base, target = lengths[0], lengths[-1]
    main, own = f"ppl_{target}", f"ppl_{target}_trained_attention"
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(summary) + 1.8))
    ys = range(len(summary))[::-1]  # first row on top
    ax.errorbar([s[main] for s in summary], ys, xerr=[s["stdev"] for s in summary], fmt="o",
                color="tab:blue", capsize=3, label=f"ppl@{target} (mean; bar: stdev over seeds)")
    ax.plot([s[f"ppl_{base}"] for s in summary], ys, "x", color="tab:gray", label=f"ppl@{base}")
    others = [(s.get(own), y) for s, y in zip(summary, ys) if s.get(own) not in (None, s[main])]
    if others:
        ax.plot(*zip(*others), "s", mfc="none", color="tab:orange",
                label=f"ppl@{target} with its training attention (S2/short)")
    for y, s in zip(ys, summary):
        ax.annotate(f"{s[main]:.2f}", (s[main], y), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=8)
    ax.set_yticks(list(ys), [s["row"] for s in summary])
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
