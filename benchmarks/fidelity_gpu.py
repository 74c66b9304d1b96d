"""The paper's central claim at a scale where it can hold: a ~30M Llama extended 512 -> 2048 tokens on one GPU.

benchmarks/ablation.py reproduced Tables 2 and 6 on the 2.4M embedded model except the claim the method rests on:
there a model trained with S2-Attn is 6-10 % worse under full attention than one trained with full attention, while
the paper finds them equal (8.12 vs 8.08 at 7B). This script asks the same question of a base 12x larger, in one
GPU call of at most --budget-minutes (9) that it splits between its stages by measuring as it goes:

  1. corpus  the Python sources of the installed site-packages and standard library, split into train and held-out
             by file with the embedded model's rule (sha256 of the relative path, 1 in 20 held out), capped at
             --set corpus_mb; a byte-level BPE tokenizer (longlora.embedded.train_tokenizer) trained on the train
             split's first tokenizer_mb; both splits tokenised.
  2. base    a Llama (hidden 512, 8 layers, GQA 8/4 heads, vocab 8192: ~29M parameters) pretrained from scratch at
             512 tokens in bf16 with the embedded model's optimisers (Muon on the matrices, AdamW on embedding and
             norms, warm-up + cosine) for base_seconds of wall time; held-out perplexity at 512.
  3. rows    every row extends the base to 2048 tokens with linear PI x4 through `longlora train`'s own path
             (`run_training`; the blocks come from the tokens in memory, so no `datasets`), with the same data and
             steps; seeds 0 and 1 for the key rows. The steps are what the time left allows: a short probe run of
             the slowest row (full fine-tuning, full attention) measures one step and a run's fixed cost, the
             PI-only row's evaluation measures an evaluation, and the rest of the budget is divided.
             Each row is evaluated on the held-out files: perplexity at 512 and 2048 with full attention, at 2048
             with its own attention (S2 / short rows), and passkey retrieval at 2048 (PASSKEY_TEMPLATE).
  4. report  a table beside the paper's Table 2/6 numbers and the 2.4M miniature's (docs/benchmarks/ablation*.json),
             the claims as gaps in %, docs/benchmarks/fidelity_gpu.{json,png}. (Rows are also written to
             <output>.partial.json as they end, so a run stopped by a timeout keeps them; removed at the end.)

    python benchmarks/fidelity_gpu.py                       # the GPU run (one H100/H200, <= 9 minutes)
    python benchmarks/fidelity_gpu.py --smoke --output /tmp/f.json   # the CI version: tiny, CPU, about a minute
    python benchmarks/fidelity_gpu.py --device cpu --seeds 0 --set base_optimizer=adamw ...  # scaled down, as in
                                                                             # docs/benchmarks/RESULTS.md

Needs only torch, transformers, peft, accelerate, tokenizers, pyyaml and matplotlib (no `datasets`, no internet).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

STARTED = time.time()  # the budget counts from here: imports and CUDA start-up are part of the 9 minutes
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _extension import ROWS, load_row_model, summarize, train_row  # noqa: E402
from _measure import output_path  # noqa: E402
from _fidelity_recipe import (  # noqa: E402,F401  (the recipe's names, as the tests and device.py read them)
    GPU, SMOKE, Plan, TokenBlocks, calibrate, evaluate, flops_per_token, pretrain_base, runs_of, source_roots,
    split_corpus, tokenize_corpus,
)
from _fidelity_report import _line, claims, load_miniatures, paper_claims, plot, print_claims, readings  # noqa: E402

FIDELITY_ROWS = ("pi_only", "full_ft_full", "lora_plus_full", "lora_plus_s2", "lora_plus_short", "lora_full")
KEY_ROWS = ("lora_plus_full", "lora_plus_s2", "lora_plus_short")
"""Rows run with every seed: the three the claims (S2 vs full attention, shift vs no shift) rest on."""

PASSKEY_TEMPLATE = "paper"
"""Passkey prompt: 'paper' is the paper's natural-language filler (longlora.evaluate.passkey). A base pretrained on
Python has never read English; where `run_passkey` offers a code-shaped template (`template=`), name it here or with
--passkey-template."""


# ------------------------------------------------------------------------------------------------------- stages


class Stages:
    """Elapsed time of each stage, printed as it ends and kept for the JSON."""

    def __init__(self, started: float = STARTED):
        self.seconds: dict[str, float] = {}
        self.started = started

    def run(self, name: str):
        stages = self

        class _Stage:
            def __enter__(self):
                self.started = time.time()
                print(f"\n== stage {name} (at {self.started - stages.started:.0f}s)", flush=True)

            def __exit__(self, *exc):
                stages.seconds[name] = time.time() - self.started
                print(f"== stage {name}: {stages.seconds[name]:.1f}s (total {time.time() - stages.started:.0f}s)",
                      flush=True)

        return _Stage()


# --------------------------------------------------------------------------------------------------------- main


def parse_plan(args) -> Plan:
    plan = SMOKE if args.smoke else GPU
    types = {f.name: f.type for f in fields(Plan)}
    changes = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise SystemExit(f"--set {item!r}: expected field=value with a field of: {', '.join(types)}")
        if name == "passkey_depths":
            changes[name] = tuple(float(v) for v in value.split(","))
        elif value.lower() == "none":
            changes[name] = None
        elif types[name] == "str":
            changes[name] = value
        elif "float" in str(types[name]):
            changes[name] = float(value)
        else:
            changes[name] = int(value)
    if args.steps is not None:
        changes["steps"] = args.steps
    if getattr(args, "budget_minutes", None) is not None:
        changes["budget_minutes"] = args.budget_minutes
    try:
        return replace(plan, **changes)
    except ValueError as err:
        raise SystemExit(f"--set: {err}") from None


def main(argv=None, started: float | None = None):
    """The program; `started` (time.time()) is when its budget began, by default this module's import (a caller that
    runs it in-process, benchmarks/device.py, passes the moment it hands over)."""
    started = STARTED if started is None else started
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the tiny CPU version (CI): every stage, in about a minute")
    p.add_argument("--rows", default=",".join(FIDELITY_ROWS))
    p.add_argument("--seeds", default="0,1", help="all of them for --key-rows, the first for the other rows")
    p.add_argument("--key-rows", default=",".join(KEY_ROWS))
    p.add_argument("--steps", type=int, default=None, help="extension steps of every row (default: fill the budget)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="the whole run, start-up included (the plan's budget_minutes: 9 on a GPU)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a Plan field, e.g. --set base_seconds=200 --set factor=8")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cuda | cpu")
    p.add_argument("--passkey-template", default=PASSKEY_TEMPLATE)
    p.add_argument("--work-dir", default="runs/fidelity_gpu")
    p.add_argument("--output", default=None,
                   help="JSON path, PNG beside it (default docs/benchmarks/fidelity_gpu.json; with --smoke a "
                   "temporary path: a CPU smoke run never writes into docs/)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base pretraining")
    args = p.parse_args(argv)

    plan = parse_plan(args)
    out = output_path(p, args.output, args.smoke, "fidelity_gpu.json")
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(FIDELITY_ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    key_rows = {r for r in args.key_rows.split(",") if r}

    import inspect

    import torch
    import transformers

    from longlora.evaluate.passkey import run_passkey
    from longlora.io import write_json

    if args.passkey_template != "paper" and "template" not in inspect.signature(run_passkey).parameters:
        p.error(f"--passkey-template {args.passkey_template}: this longlora's run_passkey has only the paper's prompt")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 evaluation: TF32 matrix products
        torch.backends.cudnn.allow_tf32 = True
    elif not args.smoke:
        print("note: no GPU; running the GPU plan on the CPU (use --set to scale it down)", flush=True)
    deadline = started + plan.budget_minutes * 60
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages(started)
    print(f"plan: {asdict(plan)}\ndevice: {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}", flush=True)

    with stages.run("corpus"):
        corpus = split_corpus(plan)
        tokenizer, stream, heldout = tokenize_corpus(corpus, plan)
        corpus_meta = dict(
            roots=[f"{label}: {root}" for label, root in source_roots()], files_found=corpus["files_found"],
            duplicates_skipped=corpus["duplicates_skipped"],
            train_files=len(corpus["train"]), heldout_files=len(corpus["heldout"]),
            train_mb=corpus["train_bytes"] / 2**20, heldout_mb=corpus["heldout_bytes"] / 2**20,
            train_tokens=len(stream), heldout_tokens=int(sum(len(d) for d in heldout)),
            heldout_docs_at_target=sum(len(d) >= plan.target for d in heldout),
        )
        del corpus
        print(f"corpus: {corpus_meta}", flush=True)

    base_dir = work / "base"
    with stages.run("base"):
        base = pretrain_base(plan, tokenizer, stream, heldout, base_dir, device, args.seed)

    def build_data(config, tokenizer):  # `run_training`'s data hook: the stream in memory
        return TokenBlocks(stream, config.context_length), None

    train_options = dict(per_device_train_batch_size=plan.row_batch, gradient_accumulation_steps=1,
                         learning_rate=plan.learning_rate, full_ft_learning_rate=plan.full_ft_learning_rate,
                         overwrite_output_dir=True, disable_tqdm=True, save_total_limit=1)
    runs = runs_of(rows, seeds, key_rows)
    trained_runs = [(r, s) for r, s in runs if ROWS[r][0] is not None]
    results, calibration = [], {}
    partial = out.with_suffix(".partial.json")

    def keep(result: dict) -> None:  # each row as it ends: a run stopped by a timeout still leaves its rows
        results.append(result)
        write_json(partial, dict(plan=asdict(plan), corpus=corpus_meta, base=base, calibration=calibration,
                                 stages_seconds=dict(stages.seconds), results=results))
    with stages.run("rows"):
        first_eval = None
        for row, seed in [(r, s) for r, s in runs if ROWS[r][0] is None]:  # PI only: evaluation alone, timed
            row_started = time.time()
            model, tok = load_row_model(None, base_dir, None, plan.factor, device=str(device))
            measured = evaluate(model, tok, heldout, None, plan, row, args.passkey_template)
            del model
            first_eval = time.time() - row_started
            keep(dict(row=row, seed=seed, paper=ROWS[row][1], **measured, train_loss=None, steps=0,
                      train_seconds=0.0, seconds=first_eval))
            print(f"{row:<16} seed {seed}: {_line(measured, plan)} in {first_eval:.1f}s", flush=True)

        steps = plan.steps
        if steps is None and trained_runs:
            steps, calibration = calibrate(plan, trained_runs, base_dir, build_data, train_options, work, deadline,
                                           first_eval, device)
        for row, seed in trained_runs:
            options, paper = ROWS[row]
            row_started = time.time()
            run_dir = work / f"{row}-seed{seed}"
            summary = train_row(options, base=base_dir, output_dir=run_dir, data="python sources (in memory)",
                                target=plan.target, steps=steps, seed=seed, build_data=build_data, **train_options)
            train_seconds = time.time() - row_started
            model, tok = load_row_model(options, base_dir, run_dir, plan.factor, device=str(device))
            measured = evaluate(model, tok, heldout, options, plan, row, args.passkey_template)
            del model
            keep(dict(row=row, seed=seed, paper=paper, **measured, train_loss=summary["last_loss"],
                      steps=summary["steps"], train_seconds=train_seconds, seconds=time.time() - row_started))
            print(f"{row:<16} seed {seed}: {_line(measured, plan)}; trained {summary['steps']} steps in "
                  f"{train_seconds:.1f}s, total {time.time() - row_started:.1f}s (run at {time.time() - started:.0f}s "
                  f"of {plan.budget_minutes * 60:.0f}s)", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    with stages.run("report"):
        report_started = time.time()
        lengths = [plan.base_length, plan.target]
        summary = summarize(results, lengths, extra=("passkey",))
        by_row = {s["row"]: s for s in summary}
        table = {"this run": claims(by_row, plan.target)}
        for label, mini in load_miniatures().items():
            table[label] = claims(mini, 1024)
        table["paper (7B, 32k)"] = paper_claims()
        print_claims(table)
        reading = readings(summary, plan.target)
        print("\n" + "\n".join(reading))
        stages.seconds["report"] = time.time() - report_started  # up to the writing; the printed one includes it
        meta = dict(
            plan=asdict(plan), smoke=args.smoke, device=str(device),
            device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads(),
            python=sys.version.split()[0], rows=rows, seeds=seeds, key_rows=sorted(key_rows), steps=steps,
            calibration=calibration, passkey_template=args.passkey_template, corpus=corpus_meta, base=base,
            lengths=lengths, flops_per_token_target=flops_per_token(plan, plan.target),
            stages_seconds=dict(stages.seconds), minutes=(time.time() - started) / 60,
        )
        write_json(out, dict(meta=meta, results=results, summary=summary, claims=table, readings=reading))
        plot(summary, plan, base, out.with_suffix(".png"))
        partial.unlink(missing_ok=True)
    print("\nstages: " + ", ".join(f"{k} {v:.1f}s" for k, v in stages.seconds.items())
          + f"; total {(time.time() - started) / 60:.2f} min (budget {plan.budget_minutes} min)")
    print(f"wrote {out} and {out.with_suffix('.png')}")



if __name__ == "__main__":
    main()
