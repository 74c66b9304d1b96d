"""Speed and memory of S2-Attn: the attention op alone and a whole training step, side by side, over lengths.

    python benchmarks/speed.py                                   # CPU: L = 1k..16k, op + training step
    python benchmarks/speed.py --device cuda --dtype bf16 --heads 32 --kv-heads 32 --head-dim 128 \
        --lengths 4096,8192,16384,32768,65536 --parts op          # Llama-2-7B-shaped attention on a GPU

Variants: full (causal SDPA), s2 (shifted sparse attention), short (S2 groups without the shift) and naive
(S2 as a dense (L, L) boolean mask handed to SDPA: what an implementation without grouping costs).
The training step: a small Llama (LoRA+, gradient checkpointing, batch 1) forward + backward at each length.
Prints a table; writes JSON and a PNG (docs/benchmarks/speed.{json,png} by default).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
from _measure import (DTYPES, add_shape_arguments, full_attention, group_size_for, make_inputs, measure, save_figure,
                      time_and_peak)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from longlora.attention import s2_attention, s2_dense_mask  # noqa: E402

VARIANTS = ("full", "s2", "short", "naive", "s2_plain")
"""s2_plain (step part only): S2 without longlora.memory's default settings (the step before they existed)."""


def op_fn(variant: str, group: int, mask_cache: dict):
    if variant == "full":
        return full_attention
    if variant in ("s2", "short"):
        return lambda q, k, v: s2_attention(q, k, v, group, shift=variant == "s2")

    def naive(q, k, v):
        key = (q.shape[2], q.shape[1], group)
        if key not in mask_cache:  # built once, outside the timed region's repeats (a fair, optimistic baseline)
            mask_cache.clear()
            mask_cache[key] = s2_dense_mask(q.shape[2], q.shape[1], group).to(q.device)  # (1, H, L, L)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask_cache[key],
                                                                enable_gqa=q.shape[1] != k.shape[1])

    return naive


def small_llama(device, dtype, length):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=4096, max_position_embeddings=length, use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device, dtype)


def train_step_measure(variant: str, length: int, device, dtype, repeats: int):
    """Median seconds and peak bytes of one LoRA+ training step (fwd + bwd) of the small Llama."""
    import longlora
    from longlora.adapters import apply_lora_plus

    model = small_llama(device, dtype, length)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora_plus(model)
    if variant in ("s2", "short", "s2_plain"):
        longlora.enable_s2_attention(model, shift=variant != "short")
    if variant != "s2_plain":  # what `longlora train` does by default: the chunked loss, the MLP tiled from 16k
        from longlora.memory import apply_memory_plan

        apply_memory_plan(model)
    model.train()
    ids = torch.randint(0, 4096, (1, length), generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    return time_and_peak(step, device, repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p, lengths="1024,2048,4096,8192,16384")
    p.add_argument("--parts", default="op,step", help="op (attention alone), step (whole training step)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--naive-max-length", type=int, default=16384, help="skip the dense-mask baseline beyond this")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--output", default="docs/benchmarks/speed.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    lengths = [int(x) for x in args.lengths.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    parts = [x for x in args.parts.split(",") if x]

    rows = []
    for part in parts:
        print(f"\n== {part}: {'attention fwd+bwd' if part == 'op' else 'small Llama LoRA+ training step'} "
              f"({args.dtype}, {device}, {torch.get_num_threads()} threads)")
        print(f"{'L':>7} {'variant':>7} {'seconds':>9} {'peak MB':>9} {'full/this':>10} {'mem/full':>9} {'limit':>6}")
        for length in lengths:
            group = group_size_for(length, args.group_ratio)
            found = {}
            mask_cache: dict = {}
            for variant in variants:
                if variant == "naive" and (length > args.naive_max_length or part == "step"):
                    continue
                if variant == "s2_plain" and part == "op":
                    continue
                if part == "op":
                    q, k, v = make_inputs(length, args.heads, args.kv_heads, args.head_dim, device, dtype)
                    seconds, peak = measure(op_fn(variant, group, mask_cache), q, k, v, args.repeats)
                    del q, k, v
                else:
                    seconds, peak = train_step_measure(variant, length, device, dtype, args.repeats)
                found[variant] = (seconds, peak)
                full = found.get("full", (seconds, peak))
                row = dict(part=part, length=length, group_size=group, variant=variant, seconds=seconds,
                           peak_mb=peak / 2**20, speedup_vs_full=full[0] / seconds,
                           memory_vs_full=peak / max(full[1], 1), attention_flops_limit=length / group)
                rows.append(row)
                print(f"{length:>7} {variant:>7} {seconds:>9.3f} {row['peak_mb']:>9.1f} {row['speedup_vs_full']:>9.2f}x "
                      f"{row['memory_vs_full']:>9.2f} {row['attention_flops_limit']:>5.1f}x", flush=True)
                gc.collect()

    from longlora.io import write_json

    out = Path(args.output)
    meta = dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype,
                device=str(device), threads=torch.get_num_threads(), torch=torch.__version__)
    write_json(out, dict(meta=meta, rows=rows))
    plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = sorted({r["part"] for r in rows})
    fig, axes = plt.subplots(len(parts), 2, figsize=(11, 3.8 * len(parts)), squeeze=False)
    for i, part in enumerate(parts):
        for variant in VARIANTS:
            rs = [r for r in rows if r["part"] == part and r["variant"] == variant]
            if not rs:
                continue
            ls = [r["length"] for r in rs]
            axes[i][0].plot(ls, [r["seconds"] for r in rs], "o-", label=variant)
            axes[i][1].plot(ls, [r["peak_mb"] for r in rs], "o-", label=variant)
        for ax, ylabel in zip(axes[i], ("seconds (fwd+bwd)", "peak MiB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length")
            ax.set_ylabel(ylabel)
            ax.set_title("attention op" if part == "op" else "training step (small Llama, LoRA+)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
