"""The paper's ablations in miniature (Tables 2 and 6, group-size ablation) on the embedded base model.

Every row extends the embedded model (pretrained at 256 tokens) to 1024 with linear PI x4, with the same data, steps
and seed, and is evaluated with full attention on the held-out stdlib modules at 1024 (and 256).

    python benchmarks/ablation.py                      # all rows (run by hand; ~20 min on 2 CPU cores)
    python benchmarks/ablation.py --rows pi_only,lora_plus_s2 --steps 8 --windows 8   # the CI smoke version

Every row runs with the first of --seeds; the --variance-rows (the comparisons the paper's claims rest on) run with
every seed, and the table gives their standard deviation. Rows with the same options as an earlier row (ratio_1_4 is
the method's default, lora_plus_s2) reuse that row's run instead of training again.

Prints a table beside the paper's numbers, writes docs/benchmarks/ablation.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# row -> (train options, the paper's number to compare with: Table 2 (PPL at 32k with full-attention eval) or
# Table 6 (full-attention eval column); None where the paper has no such row)
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--seeds", default="0,1", help="all of them for --variance-rows, the first for the other rows")
    p.add_argument("--variance-rows", default="lora_plus_full,lora_plus_s2,lora_plus_short",
                   help="rows run with every seed of --seeds")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--full-ft-learning-rate", type=float, default=3e-4,
                   help="full fine-tuning moves every weight: a smaller rate (the paper uses one rate, 2e-5, at 7B)")
    p.add_argument("--windows", type=int, default=48, help="held-out windows per length")
    p.add_argument("--train-files", type=int, default=None, help="use an even sample of N training files")
    p.add_argument("--work-dir", default="runs/ablation")
    p.add_argument("--output", default="docs/benchmarks/ablation.json")
    p.add_argument("--reuse-runs", action="store_true",
                   help="evaluate runs already trained in --work-dir with the same steps instead of training again")
    args = p.parse_args(argv)

    import torch

    from longlora import enable_s2_attention
    from longlora.embedded import embedded_model_path
    from longlora.io import write_json
    from longlora.modeling import load_model_and_tokenizer
    from longlora.quickstart import BASE_LENGTH, FACTOR, _perplexities, _write_split
    from longlora.train import SUMMARY, cmd_train

    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    variance_rows = {r for r in args.variance_rows.split(",") if r}
    work = Path(args.work_dir)
    base = embedded_model_path()
    train_dir = _write_split(work / "data" / "train", "train", args.train_files)
    heldout_dir = _write_split(work / "data" / "heldout", "heldout", None)
    target = BASE_LENGTH * FACTOR
    lengths = [BASE_LENGTH, target]

    t0 = time.time()
    results = []
    for row in rows:
        options, paper = ROWS[row]
        for seed in seeds if row in variance_rows else seeds[:1]:
            started = time.time()
            same = next((r for r in results if r["seed"] == seed and _same(ROWS[r["row"]][0], options)), None)
            if same is not None:  # identical options and seed: the same run, not trained twice
                results.append(dict(same, row=row, paper=paper, same_run_as=same["row"]))
                print(f"{row:<16} seed {seed}: same run as {same['row']}", flush=True)
                continue
            if options is None:
                model, tok = load_model_and_tokenizer(str(base), dtype="float32", device="cpu", rope_factor=FACTOR)
                train_loss = None
            else:
                out = work / f"{row}-seed{seed}"
                done = json.loads((out / SUMMARY).read_text()) if (out / SUMMARY).exists() else {}
                if args.reuse_runs and done.get("steps") == args.steps:
                    train_loss = done["last_loss"]  # trained by an earlier run: evaluate only
                else:
                    shutil.rmtree(out, ignore_errors=True)
                    lr = args.full_ft_learning_rate if options.get("finetune") == "full" else args.learning_rate
                    trained = cmd_train(
                        [], model=str(base), data=str(train_dir), output_dir=str(out), context_length=target,
                        max_steps=args.steps, learning_rate=lr, warmup_steps=min(10, args.steps // 4),
                        per_device_train_batch_size=2, gradient_accumulation_steps=2, save_steps=10**6,
                        logging_steps=max(1, args.steps // 10), seed=seed, gradient_checkpointing=False, **options,
                    )
                    train_loss = trained.summary["last_loss"]
                if options.get("finetune") == "full":
                    model, tok = load_model_and_tokenizer(str(out), dtype="float32", device="cpu")
                else:
                    model, tok = load_model_and_tokenizer(str(base), str(out), dtype="float32", device="cpu")
            ppl = {r["length"]: r["perplexity"]
                   for r in _perplexities(model, tok, heldout_dir, lengths, args.windows, row)}
            # Table 6's other column: evaluated with the attention it was trained with (S2 / short stay on in eval)
            ppl_trained_attention = ppl[target]
            if options is not None and options.get("attention") in ("s2", "short"):
                enable_s2_attention(model, group_size_ratio=options.get("group_size_ratio", 0.25),
                                    shift=options["attention"] == "s2", in_eval=True)
                ppl_trained_attention = _perplexities(model, tok, heldout_dir, [target], args.windows,
                                                      f"{row} with its training attention")[0]["perplexity"]
            del model
            results.append(dict(row=row, seed=seed, paper=paper, ppl_256=ppl[BASE_LENGTH], ppl_1024=ppl[target],
                                ppl_1024_trained_attention=ppl_trained_attention, train_loss=train_loss,
                                seconds=time.time() - started))
            print(f"{row:<16} seed {seed}: ppl@1024 {ppl[target]:.3f} (ppl@256 {ppl[BASE_LENGTH]:.3f}, @1024 with "
                  f"its training attention {ppl_trained_attention:.3f}) in {time.time() - started:.0f}s", flush=True)

    summary = _table(results)
    meta = dict(steps=args.steps, learning_rate=args.learning_rate, full_ft_learning_rate=args.full_ft_learning_rate,
                windows=args.windows, seeds=seeds, variance_rows=sorted(variance_rows), base=str(base),
                threads=torch.get_num_threads(), torch=torch.__version__, minutes=(time.time() - t0) / 60,
                reused_runs=args.reuse_runs)
    out = Path(args.output)
    write_json(out, dict(meta=meta, results=results, summary=summary))
    _plot(summary, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


def _same(a: dict | None, b: dict | None) -> bool:
    """Whether two rows' train options are the same run (group_size_ratio defaults to 0.25)."""
    if a is None or b is None:
        return a is b
    return {"group_size_ratio": 0.25, **a} == {"group_size_ratio": 0.25, **b}


def _table(results):
    by_row: dict[str, list[dict]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    print(f"\n{'row':<16} {'ppl@1024':>9} {'+-':>6} {'ppl@256':>8} {'own attn':>9}  paper")
    summary = []
    for row, rs in by_row.items():
        vals = [r["ppl_1024"] for r in rs]
        mean = statistics.fmean(vals)
        spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
        short = statistics.fmean(r["ppl_256"] for r in rs)
        own = statistics.fmean(r["ppl_1024_trained_attention"] for r in rs)
        summary.append(dict(row=row, ppl_1024=mean, stdev=spread, ppl_256=short, ppl_1024_trained_attention=own,
                            seeds=len(rs), paper=rs[0]["paper"]))
        print(f"{row:<16} {mean:>9.3f} {spread:>6.3f} {short:>8.3f} {own:>9.3f}  {rs[0]['paper']}")
    return summary


def _plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from longlora.io import atomic_path

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(summary) + 1.8))
    ys = range(len(summary))[::-1]  # first row on top
    ax.errorbar([s["ppl_1024"] for s in summary], ys, xerr=[s["stdev"] for s in summary], fmt="o",
                color="tab:blue", capsize=3, label="ppl@1024 (mean; bar: stdev over seeds)")
    ax.plot([s["ppl_256"] for s in summary], ys, "x", color="tab:gray", label="ppl@256")
    own = [(s.get("ppl_1024_trained_attention"), y) for s, y in zip(summary, ys)
           if s.get("ppl_1024_trained_attention") not in (None, s["ppl_1024"])]
    if own:
        ax.plot(*zip(*own), "s", mfc="none", color="tab:orange", label="ppl@1024 with its training attention (S2/short)")
    for y, s in zip(ys, summary):
        ax.annotate(f"{s['ppl_1024']:.2f}", (s["ppl_1024"], y), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)
    ax.set_yticks(list(ys), [s["row"] for s in summary])
    ax.set_xlabel("held-out perplexity (full-attention evaluation), embedded model extended 256 -> 1024")
    ax.set_title("LongLoRA ablations in miniature (lower is better)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
