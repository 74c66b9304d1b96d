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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _extension import (  # noqa: E402  (benchmarks/ is on sys.path: this script's directory)
    ROWS, load_row_model, plot_rows, row_perplexities, same_options, summarize, train_row,
)


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

    from longlora.embedded_shipping import embedded_model_path
    from longlora.io import write_json
    from longlora.embedded import write_stdlib_split
    from longlora.quickstart import BASE_LENGTH, FACTOR
    from longlora.checkpoints import SUMMARY

    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    variance_rows = {r for r in args.variance_rows.split(",") if r}
    work = Path(args.work_dir)
    base = embedded_model_path()
    train_dir = write_stdlib_split(work / "data" / "train", "train", args.train_files)
    heldout_dir = write_stdlib_split(work / "data" / "heldout", "heldout")
    target = BASE_LENGTH * FACTOR
    lengths = [BASE_LENGTH, target]

    t0 = time.time()
    results = []
    for row in rows:
        options, paper = ROWS[row]
        for seed in seeds if row in variance_rows else seeds[:1]:
            started = time.time()
            same = next((r for r in results if r["seed"] == seed and same_options(ROWS[r["row"]][0], options)), None)
            if same is not None:  # identical options and seed: the same run, not trained twice
                results.append(dict(same, row=row, paper=paper, same_run_as=same["row"]))
                print(f"{row:<16} seed {seed}: same run as {same['row']}", flush=True)
                continue
            out = work / f"{row}-seed{seed}"
            train_loss = None
            if options is not None:
                done = json.loads((out / SUMMARY).read_text()) if (out / SUMMARY).exists() else {}
                if args.reuse_runs and done.get("steps") == args.steps:
                    train_loss = done["last_loss"]  # trained by an earlier run: evaluate only
                else:
                    shutil.rmtree(out, ignore_errors=True)
                    train_loss = train_row(
                        options, base=base, output_dir=out, data=str(train_dir), target=target, steps=args.steps,
                        seed=seed, learning_rate=args.learning_rate, full_ft_learning_rate=args.full_ft_learning_rate,
                        per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    )["last_loss"]
            model, tok = load_row_model(options, base, out, FACTOR)
            ppl = row_perplexities(model, tok, heldout_dir, options, lengths, windows=args.windows, stride=BASE_LENGTH,
                                   label=row)
            del model
            results.append(dict(row=row, seed=seed, paper=paper, **ppl, train_loss=train_loss,
                                seconds=time.time() - started))
            print(f"{row:<16} seed {seed}: ppl@1024 {ppl['ppl_1024']:.3f} (ppl@256 {ppl['ppl_256']:.3f}, @1024 with "
                  f"its training attention {ppl['ppl_1024_trained_attention']:.3f}) in {time.time() - started:.0f}s",
                  flush=True)

    summary = summarize(results, lengths)
    meta = dict(steps=args.steps, learning_rate=args.learning_rate, full_ft_learning_rate=args.full_ft_learning_rate,
                windows=args.windows, seeds=seeds, variance_rows=sorted(variance_rows), base=str(base),
                threads=torch.get_num_threads(), torch=torch.__version__, minutes=(time.time() - t0) / 60,
                reused_runs=args.reuse_runs)
    out = Path(args.output)
    write_json(out, dict(meta=meta, results=results, summary=summary))
    plot_rows(summary, lengths, out.with_suffix(".png"), title="LongLoRA ablations in miniature (lower is better)",
              xlabel="held-out perplexity (full-attention evaluation), embedded model extended 256 -> 1024")
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
