"""S2-aware sequence parallelism: bytes exchanged per layer vs ring attention and Ulysses; CPU gloo time and memory.

    python benchmarks/sequence_parallel.py            # full: 7B dry run 64k-1M on 8-64 ranks + gloo runs at 1/2/4 ranks
    python benchmarks/sequence_parallel.py --smoke    # seconds: one dry-run shape, a short gloo run at 1/2 ranks

1. Bytes. A dry run of the real exchange at Llama-2-7B shapes (32 query = 32 key/value heads, head_dim 128, bf16,
   G = L/4): every rank's `_HaloExchange` forward and backward run on meta tensors with the transport switched off
   (`count_traffic(dry_run=True)`), so the bytes are those the implementation's send calls would post. Beside them,
   ring attention and DeepSpeed-Ulysses from their communication patterns:
   - ring: each rank passes its K/V block (all key/value heads) N-1 times around the ring in the forward; the
     backward passes K/V again plus the dK/dV accumulators (2x the forward);
   - Ulysses: all-to-all of q, k, v before attention and of the output after, each rank keeping 1/N of what it
     holds; the backward moves the same amount of gradients.
2. Time and memory. torchrun launches (gloo, CPU, one thread per rank) of a training step (forward + backward,
   LoRA+) of a small Llama at N = 1 (single-process S2), 2 and 4 ranks, on a regular batch (one document) and a
   packed one (three documents crossing the chunk boundaries; one process then takes S2's padded-bucket path, a
   rank the CPU kernels' per-segment prefix path): median step time and the per-rank peak of
   bytes held by tensors allocated in the step (parameters and the batch are not; the gradient buffers exist
   before it), beside the goal (the single-process peak / N plus the halo the rank holds: received keys and
   values, kept for the backward), plus the bytes counted from the real gloo calls.
Writes docs/benchmarks/sequence_parallel.{json,png} (or --output).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

LLAMA2_7B = dict(heads=32, kv_heads=32, head_dim=128, layers=32, bytes_per_value=2)  # bf16


# ----------------------------------------------------------------------------------------------------------------
# 1. bytes per layer per rank


def dry_run_bytes(length: int, world: int, group_size: int, heads: int, kv_heads: int, head_dim: int,
                  bytes_per_value: int, position_ids=None) -> list[tuple[int, int]]:
    """(forward, backward) bytes each rank's exchange sends in one layer, from the real autograd Function
    (position_ids (1, L) restarting per document: a packed row)."""
    import torch

    from longlora.sequence_parallel.halo import _halves, _HaloExchange, count_traffic, plan_chunks

    dtype = {2: torch.bfloat16, 4: torch.float32}[bytes_per_value]
    chunk = length // world
    halves = _halves(heads, kv_heads, True)
    sent = []
    # the halo table is global (the same in every rank's plan); the exchange reads only it and the rank
    plan0 = plan_chunks(None, position_ids, 1, length, group_size, world, 0)
    for rank in range(world):
        plan = dataclasses.replace(plan0, rank=rank)
        k = torch.empty(1, kv_heads, chunk, head_dim, device="meta", dtype=dtype, requires_grad=True)
        v = torch.empty_like(k, requires_grad=True)
        with count_traffic(dry_run=True) as log:
            outs = _HaloExchange.apply(k, v, plan, halves)
            torch.autograd.grad(outs, (k, v), grad_outputs=[torch.empty_like(o) for o in outs], allow_unused=True)
        sent.append((sum(n for d, _, n in log if d == "fwd"), sum(n for d, _, n in log if d == "bwd")))
    return sent


def ring_bytes(length: int, world: int, kv_heads: int, head_dim: int, bytes_per_value: int) -> tuple[int, int]:
    chunk = length // world
    fwd = (world - 1) * chunk * 2 * kv_heads * head_dim * bytes_per_value
    return fwd, 2 * fwd


def ulysses_bytes(length: int, world: int, heads: int, kv_heads: int, head_dim: int,
                  bytes_per_value: int) -> tuple[int, int]:
    chunk = length // world
    fwd = (world - 1) * chunk * (2 * heads + 2 * kv_heads) * head_dim * bytes_per_value // world
    return fwd, fwd


def bytes_table(lengths, worlds, shape) -> list[dict]:
    rows = []
    for length in lengths:
        g = length // 4  # the paper's group size ratio
        for world in worlds:
            t0 = time.perf_counter()
            ours = dry_run_bytes(length, world, g, shape["heads"], shape["kv_heads"], shape["head_dim"],
                                 shape["bytes_per_value"])
            ring = ring_bytes(length, world, shape["kv_heads"], shape["head_dim"], shape["bytes_per_value"])
            uly = ulysses_bytes(length, world, shape["heads"], shape["kv_heads"], shape["head_dim"],
                                shape["bytes_per_value"])
            ours_max = max(f for f, _ in ours)
            rows.append(dict(
                length=length, ranks=world, group_size=g, chunk=length // world,
                regime="halo" if (length // world) >= g else f"group spans {g // (length // world)} ranks",
                s2_fwd_max=ours_max, s2_fwd_mean=sum(f for f, _ in ours) / world,
                s2_bwd_max=max(b for _, b in ours), ring_fwd=ring[0], ring_bwd=ring[1], ulysses_fwd=uly[0],
                ulysses_bwd=uly[1], s2_over_ring=ours_max / ring[0], group_over_length=g / length,
                dry_run_seconds=time.perf_counter() - t0))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 2. gloo runs: time and per-rank memory of a training step


def _worker(args) -> None:
    """One rank (or the single process) of a timed training step; rank 0 writes the JSON line to args.worker_out."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, LlamaConfig

    from _measure import PeakTensorMemory
    from longlora.adapters import apply_lora_plus
    from longlora.integration import enable_s2_attention
    from longlora.sequence_parallel import PLAN_KEY, count_traffic, enable_sequence_parallel, sequence_parallel_loss, \
        shard_batch
    from longlora.sequence_parallel.halo import _halves

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=512,
                         max_position_embeddings=args.length, use_cache=False)
    model = apply_lora_plus(AutoModelForCausalLM.from_config(config)).train()
    ids = torch.randint(0, 512, (1, args.length), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone()}
    if args.layout == "packed":
        batch["position_ids"] = packed_positions(args.length)
    halo_bytes = 0
    if world > 1:
        enable_sequence_parallel(model, group_size=args.group)
        shard = shard_batch(batch, model)
        plan = shard[PLAN_KEY]
        head_dim = args.hidden // config.num_attention_heads
        # the halo a rank holds per layer (received keys and values, kept for the backward), all layers
        halo_bytes = args.layers * sum(
            2 * (kv1 - kv0) * plan.halo[plan.rank][h] * ids.shape[0] * head_dim * 4
            for _, _, kv0, kv1, h in _halves(config.num_attention_heads, config.num_key_value_heads, True))

        def step():
            sequence_parallel_loss(model, shard).backward()
    else:
        enable_s2_attention(model, group_size=args.group)

        def step():
            model(**batch, use_cache=False).loss.backward()

    step()  # warm-up
    times = []
    for _ in range(args.repeats):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        step()
        if world > 1:
            dist.barrier()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=False)  # gradient buffers exist: the peak below is the step's own tensors
    with PeakTensorMemory() as tracker, count_traffic() as log:
        step()
    peak = torch.tensor([tracker.peak, halo_bytes])
    sent = torch.tensor([sum(n for d, _, n in log if d == "fwd"), sum(n for d, _, n in log if d == "bwd")])
    if world > 1:
        peaks = [torch.zeros_like(peak) for _ in range(world)]
        sents = [torch.zeros_like(sent) for _ in range(world)]
        dist.all_gather(peaks, peak)
        dist.all_gather(sents, sent)
    else:
        peaks, sents = [peak], [sent]
    if world == 1 or dist.get_rank() == 0:
        row = dict(ranks=world, length=args.length, group_size=args.group, hidden=args.hidden, layers=args.layers,
                   step_seconds=sorted(times)[len(times) // 2], peak_mb_per_rank=[int(p[0]) / 2**20 for p in peaks],
                   peak_bytes_per_rank=[int(p[0]) for p in peaks], halo_bytes_per_rank=[int(p[1]) for p in peaks],
                   sent_fwd_per_rank=[int(s[0]) for s in sents], sent_bwd_per_rank=[int(s[1]) for s in sents])
        Path(args.worker_out).write_text(json.dumps(row))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def packed_positions(length: int):
    """(1, L) position ids of three packed documents, the middle one crossing every chunk boundary at N = 2, 4."""
    import torch

    sizes = [length // 4 - 3, length // 2 + 5]
    sizes.append(length - sum(sizes))
    return torch.cat([torch.arange(n) for n in sizes])[None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_runs(worlds, length, group, hidden, layers, repeats, tmp: Path, layout: str = "regular") -> list[dict]:
    from _measure import src_env

    rows = []
    env = src_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for world in worlds:
        out = tmp / f"gloo_{layout}_{world}.json"
        out.unlink(missing_ok=True)  # a row left by an interrupted run must not stand in for this one
        worker = [__file__, "--worker", "--worker-out", str(out), "--length", str(length), "--group", str(group),
                  "--hidden", str(hidden), "--layers", str(layers), "--repeats", str(repeats), "--layout", layout]
        if world == 1:
            cmd = [sys.executable] + worker
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
                   str(_free_port())] + worker
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        # torch 2.13's gloo can abort a rank at interpreter exit, after rank 0 wrote the row: that run counts
        exit_abort = "terminate called without an active exception" in proc.stderr and out.is_file()
        if proc.returncode != 0 and not exit_abort:
            raise RuntimeError(f"gloo run at {world} ranks failed:\n{proc.stderr[-3000:]}")
        rows.append(dict(json.loads(out.read_text()), layout=layout))
    single = rows[0]
    for r in rows:
        r["peak_ratio_max_rank"] = max(r["peak_mb_per_rank"]) / max(single["peak_mb_per_rank"])
        r["speedup_vs_1"] = single["step_seconds"] / r["step_seconds"]
        # the goal: every rank at most the single-process peak / N plus the halo it holds
        goal = [single["peak_bytes_per_rank"][0] / r["ranks"] + h for h in r["halo_bytes_per_rank"]]
        r["goal_bytes_per_rank"] = goal
        r["excess_bytes_max_rank"] = max(p - g for p, g in zip(r["peak_bytes_per_rank"], goal))
    return rows


def expected_gloo_bytes(row: dict) -> list[int]:
    """The dry run's per-rank forward bytes at the gloo run's shapes (8/4 heads of hidden/8, fp32, all layers)."""
    positions = packed_positions(row["length"]) if row["layout"] == "packed" else None
    sent = dry_run_bytes(row["length"], row["ranks"], row["group_size"], 8, 4, row["hidden"] // 8, 4, positions)
    return [f * row["layers"] for f, _ in sent]


# ----------------------------------------------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 2**20:10.2f}"


def print_tables(bytes_rows, gloo_rows) -> None:
    print("Bytes sent per layer per rank (forward), Llama-2-7B shapes, bf16, G = L/4 "
          "(S2: the busiest rank; backward sends the same amount back)")
    print(f"{'L':>8} {'N':>3} {'regime':>20} {'S2 MiB':>10} {'ring MiB':>10} {'Ulysses MiB':>11} "
          f"{'S2/ring':>8} {'G/L':>6}")
    for r in bytes_rows:
        print(f"{r['length']:>8} {r['ranks']:>3} {r['regime']:>20} {_mb(r['s2_fwd_max'])} {_mb(r['ring_fwd'])} "
              f"{_mb(r['ulysses_fwd']):>11} {r['s2_over_ring']:>8.4f} {r['group_over_length']:>6.3f}")
    if gloo_rows:
        g = gloo_rows[0]
        print(f"\nCPU gloo training step (LoRA+, Llama hidden {g['hidden']}, {g['layers']} layers, L={g['length']}, "
              f"G={g['group_size']}, one thread per rank on a {os.cpu_count()}-core machine)")
        print(f"{'layout':>8} {'N':>3} {'step s':>8} {'speedup':>8} {'peak MiB/rank (max)':>20} {'peak ratio':>11} "
              f"{'goal MiB (1/N + halo)':>22} {'over goal, bytes':>17} {'fwd bytes/rank (gloo)':>22} {'dry run':>10}")
        for r in gloo_rows:
            print(f"{r['layout']:>8} {r['ranks']:>3} {r['step_seconds']:>8.3f} {r['speedup_vs_1']:>8.2f} "
                  f"{max(r['peak_mb_per_rank']):>20.3f} {r['peak_ratio_max_rank']:>11.4f} "
                  f"{max(r['goal_bytes_per_rank']) / 2**20:>22.3f} {r['excess_bytes_max_rank']:>17.0f} "
                  f"{max(r['sent_fwd_per_rank']):>22} {max(r['dry_run_fwd_per_rank']):>10}")


def plot(bytes_rows, gloo_rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from longlora.io import atomic_path

    fig, (ax_b, ax_m) = plt.subplots(1, 2, figsize=(12, 5.6))
    worlds = sorted({r["ranks"] for r in bytes_rows})
    for i, world in enumerate(worlds):
        rs = [r for r in bytes_rows if r["ranks"] == world]
        ls = [r["length"] for r in rs]
        color = f"C{i}"
        ax_b.plot(ls, [r["s2_fwd_max"] / 2**20 for r in rs], "o-", color=color, label=f"S2 halo, N={world}")
        ax_b.plot(ls, [r["ring_fwd"] / 2**20 for r in rs], "s--", color=color, alpha=0.6, label=f"ring, N={world}")
        ax_b.plot(ls, [r["ulysses_fwd"] / 2**20 for r in rs], "x:", color=color, alpha=0.6,
                  label=f"Ulysses, N={world}")
    ax_b.set_xscale("log", base=2)
    ax_b.set_yscale("log")
    ax_b.set_xlabel("sequence length L (G = L/4)")
    ax_b.set_ylabel("MiB sent per layer per rank (forward)")
    ax_b.set_title("Llama-2-7B shapes, bf16")
    ax_b.grid(True, which="both", alpha=0.3)
    ax_b.legend(fontsize=6, ncol=len(worlds), loc="upper center", bbox_to_anchor=(0.5, -0.16))
    if gloo_rows:
        for i, layout in enumerate(dict.fromkeys(r["layout"] for r in gloo_rows)):
            rows = [r for r in gloo_rows if r["layout"] == layout]
            ns = [r["ranks"] for r in rows]
            ax_m.plot(ns, [max(r["peak_mb_per_rank"]) for r in rows], "o-", color=f"C{i}",
                      label=f"{layout}: measured (busiest rank)")
            ax_m.plot(ns, [max(r["goal_bytes_per_rank"]) / 2**20 for r in rows], "--", color=f"C{i}", alpha=0.6,
                      label=f"{layout}: goal, single / N + halo")
            for r in rows:
                ax_m.annotate(f"{r['step_seconds']:.2f}s/step", (r["ranks"], max(r["peak_mb_per_rank"])),
                              textcoords="offset points", xytext=(0, 6 if i == 0 else -12), ha="center",
                              fontsize=7, color=f"C{i}")
        ax_m.set_xscale("log", base=2)
        ax_m.set_xticks(ns, [str(n) for n in ns])
        ax_m.set_xlabel("ranks N (gloo, CPU)")
        ax_m.set_ylabel("tensor peak per rank, MiB")
        g = gloo_rows[0]
        ax_m.set_title(f"CPU training step, L={g['length']}, hidden {g['hidden']}, {g['layers']} layers")
        ax_m.grid(True, which="both", alpha=0.3)
        ax_m.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="one dry-run shape and a short gloo run at 1/2 ranks")
    p.add_argument("--output", default=str(ROOT / "docs" / "benchmarks" / "sequence_parallel.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=8192, help="gloo run: sequence length")
    p.add_argument("--group", type=int, default=None, help="gloo run: group size (default L/4)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layout", choices=("regular", "packed"), default="regular", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.group = args.group or args.length // 4
    if args.worker:
        _worker(args)
        return 0
    if args.smoke:
        lengths, worlds, gloo_worlds = [65536], [8], [1, 2]
        args.length, args.group, args.hidden, args.layers, args.repeats = 512, 128, 64, 2, 1
    else:
        lengths, worlds, gloo_worlds = [65536, 131072, 262144, 524288, 1048576], [2, 4, 8, 16, 32, 64], [1, 2, 4]
    bytes_rows = bytes_table(lengths, worlds, LLAMA2_7B)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.stem}_work"
    tmp.mkdir(exist_ok=True)
    gloo_rows = [row for layout in ("regular", "packed")
                 for row in gloo_runs(gloo_worlds, args.length, args.group, args.hidden, args.layers, args.repeats,
                                      tmp, layout)]
    for r in gloo_rows:
        r["dry_run_fwd_per_rank"] = expected_gloo_bytes(r) if r["ranks"] > 1 else [0]
    print_tables(bytes_rows, gloo_rows)
    from longlora.io import write_json

    write_json(out, dict(shape=LLAMA2_7B, bytes=bytes_rows, gloo=gloo_rows))
    plot(bytes_rows, gloo_rows, out.with_suffix(".png"))
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
