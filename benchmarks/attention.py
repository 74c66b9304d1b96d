"""S2-Attn op vs full causal SDPA: forward+backward time and peak memory, side by side, over sequence lengths.

    python benchmarks/attention.py                       # CPU, L = 2k..16k, Hq=8, Hkv=2, D=64, G = L/4
    python benchmarks/attention.py --device cuda --dtype bf16 --heads 32 --kv-heads 32 --head-dim 128 \
        --lengths 4096,8192,16384,32768,65536 --backends sdpa,flash

Prints a table, writes JSON and a PNG plot (docs/benchmarks/attention.{json,png} by default).
Peak memory: see benchmarks/_measure.py (CUDA's allocator peak; on CPU, bytes held by tensors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _measure import (DTYPES, add_shape_arguments, full_attention, group_size_for, make_inputs, measure, peak_only,
                      save_figure)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from longlora.attention import s2_attention  # noqa: E402
from longlora.io import write_json  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p, lengths="2048,4096,8192,16384")
    p.add_argument("--backends", default="auto",
                   help="S2 backends to time: auto, sdpa, cpu, varlen, flash (see longlora.attention)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--output", default="docs/benchmarks/attention.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    device = torch.device(args.device)
    lengths = [int(x) for x in args.lengths.split(",")]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    rows = []
    header = f"{'L':>7} {'G':>6} {'full s':>8} {'s2 s':>8} {'speedup':>8} {'limit':>6} {'full MB':>9} {'s2 MB':>9} {'mem ratio':>9} {'out kept':>9}"
    print(f"S2-Attn vs full causal SDPA, fwd+bwd, Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} "
          f"{args.dtype} on {device} ({torch.get_num_threads()} threads)")
    for backend in backends:
        print(f"\nS2 backend: {backend}\n{header}")
        for length in lengths:
            group = group_size_for(length, args.group_ratio)
            q, k, v = make_inputs(length, args.heads, args.kv_heads, args.head_dim, device, dtype)
            t_full, m_full = measure(full_attention, q, k, v, args.repeats)
            s2 = lambda a, b, c: s2_attention(a, b, c, group, backend=backend)  # noqa: E731
            t_s2, m_s2 = measure(s2, q, k, v, args.repeats)
            m_s2_kept = peak_only(s2, q, k, v, keep_output=True)
            # attention FLOPs: causal full ~ L^2/2 per head, S2 ~ L*G/2 -> limit L/G
            limit = length / group
            row = dict(backend=backend, length=length, group_size=group, full_s=t_full, s2_s=t_s2,
                       speedup=t_full / t_s2, flops_limit=limit, full_peak_mb=m_full / 2**20,
                       s2_peak_mb=m_s2 / 2**20, memory_ratio=m_s2 / max(m_full, 1),
                       s2_output_kept_peak_mb=m_s2_kept / 2**20, memory_ratio_output_kept=m_s2_kept / max(m_full, 1))
            rows.append(row)
            print(f"{length:>7} {group:>6} {t_full:>8.3f} {t_s2:>8.3f} {row['speedup']:>7.2f}x {limit:>5.1f}x "
                  f"{row['full_peak_mb']:>9.1f} {row['s2_peak_mb']:>9.1f} {row['memory_ratio']:>9.3f} "
                  f"{row['memory_ratio_output_kept']:>9.3f}")
            del q, k, v

    out = Path(args.output)
    meta = dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype,
                device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
                group_ratio=args.group_ratio)
    write_json(out, dict(meta=meta, rows=rows))
    plot(rows, meta, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


def plot(rows, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    for backend in backends:
        rs = [r for r in rows if r["backend"] == backend]
        ls = [r["length"] for r in rs]
        first = backend == backends[0]  # full SDPA is measured beside every backend: drawn once
        ax_t.plot(ls, [r["full_s"] for r in rs], "o-", label="full causal SDPA" if first else None)
        ax_t.plot(ls, [r["s2_s"] for r in rs], "s-", label=f"S2-Attn ({backend})")
        ax_m.plot(ls, [r["full_peak_mb"] for r in rs], "o-", label="full causal SDPA" if first else None)
        ax_m.plot(ls, [r["s2_peak_mb"] for r in rs], "s-", label=f"S2-Attn ({backend})")
        if "s2_output_kept_peak_mb" in rs[0]:
            ax_m.plot(ls, [r["s2_output_kept_peak_mb"] for r in rs], "x:",
                      label=f"S2-Attn ({backend}), caller keeps the output")
        for r in rs:
            ax_t.annotate(f"{r['speedup']:.2f}x", (r["length"], r["s2_s"]), textcoords="offset points",
                          xytext=(0, -12), ha="center", fontsize=8)
    for ax, title, ylabel in ((ax_t, "forward+backward time", "seconds"), (ax_m, "peak memory", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (G = L/4)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"S2-Attn vs full attention: Hq={meta['heads']} Hkv={meta['kv_heads']} D={meta['head_dim']} "
                 f"{meta['dtype']} {meta['device']}")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
