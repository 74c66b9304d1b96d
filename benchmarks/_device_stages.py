"""benchmarks/device.py's measuring stages: correctness, speed, memory (gpu.py's tables, memory.py's model, plan).

Each stage is `fn(ctx) -> dict` (ctx: device.py's Context: device, smoke, output_dir, work_dir, deadline); the dict
has a `status` ("ok", "not run: why") and, where the issue states figures, `figures`: one entry per figure with the
required and the measured value and `pass`. At --smoke sizes the figures' lengths are divided by SMOKE_SCALE (they
are checked, and mostly missed, on CPU: the point there is that the code runs).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import gpu
import torch
from _measure import ROOT, full_attention, group_size_for, make_inputs, src_env, timed_peak

from longlora.attention import resolve_backend, s2_attention, token_layout

SMOKE_SCALE = 64
"""--smoke lengths are the issue's lengths / 64 (8k -> 128)."""
OP_FIGURES = ((4096, 1.0), (8192, 2.5), (16384, 3.3), (32768, 3.7))
"""Attention op fwd+bwd, S2 (auto's backend) over full causal SDPA: at least this speed-up at this length."""
STEP_FIGURES = ((8192, 1.3), (32768, 1.65), (65536, 2.1))
"""Whole 1.1B LoRA+ training step, S2 over full attention."""


def scaled(length: int, smoke: bool) -> int:
    return length // SMOKE_SCALE if smoke else length


def figure(name: str, length: int, required: float, measured: float | None, at_least: bool = True) -> dict:
    ok = measured is not None and measured == measured and (measured >= required if at_least else
                                                            measured <= required)
    return dict(name=name, length=length, required=f"{'>=' if at_least else '<='} {required:g}", measured=measured,
                **{"pass": ok})


# --- correctness ---------------------------------------------------------------------------------------------------


def gpu_test_files() -> list[str]:
    """The test files that hold `@pytest.mark.gpu` tests (collecting only them saves the rest's import time)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def run_gpu_tests(timeout: float) -> dict:
    """`pytest -m gpu` in a subprocess: its counts, exit status and the tail of its output."""
    files = gpu_test_files()
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    try:
        done = subprocess.run(command, cwd=ROOT, env=src_env(), capture_output=True, text=True,
                              timeout=max(10.0, timeout))
    except subprocess.TimeoutExpired:
        return dict(command=" ".join(command), returncode=None, error=f"timed out after {timeout:.0f}s")
    text = done.stdout + done.stderr
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)}
    # 5: nothing collected (no gpu test in these files): not a failure of the device
    ok = done.returncode in (0, 5) and not counts.get("failed") and not counts.get("error", counts.get("errors"))
    return dict(command=" ".join(command), files=files, returncode=done.returncode, counts=counts, ok=ok,
                tail=text[-2000:])


SYNC_MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024)
"""Head dim 64, GQA: the shapes the varlen path serves."""


def _sync_checked(fn) -> dict:
    """fn() with host-device synchronisation raising (CUDA's sync debug mode "error"), set by fn where it wants it;
    {ok, message}."""
    try:
        fn()
        return dict(ok=True)
    except RuntimeError as err:
        return dict(ok=False, message=" ".join(str(err).split())[:500])
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def sync_debug_step(device, dtype, length: int) -> dict:
    """A model's forward + backward with S2 (the varlen path on CUDA), checked for host synchronisation with
    torch.cuda.set_sync_debug_mode("error"): in the forward inside the attention modules only (the mask and the loss
    around them are transformers'), in the backward as a whole. Two layouts: regular (no padding; the figure: no
    synchronisation at all) and left-padded (recorded: building a padded layout reads its lengths once per forward,
    a known synchronisation). The loss is the logits' mean, not the labelled loss (cross-entropy's ignore_index may
    synchronise: that would not be S2's)."""
    import longlora
    from longlora.integration import attention_modules

    model = gpu.build_model(dict(model=SYNC_MODEL), device, dtype, length)
    longlora.enable_s2_attention(model)
    ids = torch.randint(0, SYNC_MODEL["vocab_size"], (2, length), generator=torch.Generator().manual_seed(0))
    padded = torch.ones(2, length, dtype=torch.long)
    padded[0, : length // 5] = 0  # left padding: the ragged layout
    ids, padded = ids.to(device), padded.to(device)
    head_dim = SYNC_MODEL["hidden_size"] // SYNC_MODEL["num_attention_heads"]
    probe = torch.zeros(2, SYNC_MODEL["num_attention_heads"], length, head_dim, device=device, dtype=dtype)
    kv = probe[:, : SYNC_MODEL["num_key_value_heads"]]
    backend = resolve_backend(probe, kv, kv, token_layout(2, length, device), group_size_for(length))
    result = dict(length=length, batch=2, left_padding=length // 5, backend=backend, dtype=str(dtype))

    def forward(mask):
        return model(input_ids=ids, attention_mask=mask).logits.float().mean()

    if device.type != "cuda":
        forward(None).backward()
        result.update(mode="n/a on CPU (sync debug mode is CUDA's)", ok=True)
        del model
        return result
    modules = attention_modules(model)
    for label, mask in (("regular", None), ("padded", padded)):
        forward(mask).backward()  # warm-up: caches (cu_seqlens, kernels) may be filled with synchronising calls once
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        loss = {}
        hooks = [h for m in modules for h in (
            m.register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("error")),
            m.register_forward_hook(lambda *_: torch.cuda.set_sync_debug_mode("default"), always_call=True))]
        try:
            fwd = _sync_checked(lambda: loss.update(value=forward(mask)))  # noqa: B023  (called at once)
        finally:
            for h in hooks:
                h.remove()
        if "value" not in loss:
            loss["value"] = forward(mask)

        def backward():
            torch.cuda.set_sync_debug_mode("error")
            loss["value"].backward()  # noqa: B023  (called at once)

        result[label] = dict(forward=fwd, backward=_sync_checked(backward))
        model.zero_grad(set_to_none=True)
    result.update(mode="error", ok=result["regular"]["forward"]["ok"] and result["regular"]["backward"]["ok"])
    del model
    gpu.free(device)
    return result


def correctness(ctx) -> dict:
    device, dtype = ctx.device, torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    backends = gpu.backends_for(device)
    table = gpu.correctness(device, backends, (gpu.SMOKE if ctx.smoke else gpu.FULL)["check_scale"])
    failed = [r for r in table if r["status"] in ("FAIL", "ERROR")]
    sync = sync_debug_step(device, dtype, 64 if ctx.smoke else 2048)
    tests = run_gpu_tests(min(300.0, ctx.seconds_left() - 10))
    print(f"sync debug: backend {sync['backend']}, regular layout {'ok' if sync['ok'] else 'FAILED'}; "
          f"pytest -m gpu: {tests.get('counts')} (exit {tests['returncode']})", flush=True)
    figures = [figure("every backend within its bound", 0, 0, len(failed), at_least=False),
               figure("no host synchronisation (varlen forward + backward)", sync["length"], 1, int(sync["ok"])),
               figure("pytest -m gpu passes", 0, 1, int(bool(tests.get("ok"))))]
    return dict(status="ok", backends=backends, table=table, failed_rows=len(failed), sync_debug=sync,
                gpu_tests=tests, figures=figures)


# --- speed ---------------------------------------------------------------------------------------------------------


def profile_op(device, dtype, cfg: dict, length: int, backend: str) -> dict:
    """torch.profiler over one S2 op fwd+bwd (backend `backend`) at `length`: wall time, time in device kernels
    and the ops that took it, so a missed figure says where the time went (kernels, or launches and host work)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    q, k, v = make_inputs(length, cfg["op_heads"], cfg["op_kv_heads"], cfg["op_head_dim"], device, dtype)
    group = group_size_for(length)

    def step():
        s2_attention(q, k, v, group, backend=backend).float().sum().backward()
        q.grad = k.grad = v.grad = None

    out = {}
    for variant, fn in (("s2", step), ("full", lambda: full_attention(q, k, v).float().sum().backward())):
        fn()  # warm-up
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            started = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - started
        events = prof.key_averages()
        # the kernels' own rows only: a CPU op's row also counts the device time of the kernels it launched
        kernels_rows = [e for e in events if e.device_type == DeviceType.CUDA]
        kernels = sum(e.self_device_time_total for e in kernels_rows) / 1e3
        top = sorted(kernels_rows, key=lambda e: e.self_device_time_total, reverse=True)[:12]
        top_cpu = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: e.self_cpu_time_total,
                         reverse=True)[:8]
        out[variant] = dict(wall_ms=wall * 1e3, kernel_ms=kernels, kernel_fraction=kernels / (wall * 1e3),
                            launches=sum(e.count for e in kernels_rows),
                            top=[dict(name=e.key[:120], calls=e.count, device_ms=e.self_device_time_total / 1e3)
                                 for e in top],
                            top_cpu=[dict(name=e.key[:120], calls=e.count, cpu_ms=e.self_cpu_time_total / 1e3)
                                     for e in top_cpu])
        q.grad = k.grad = v.grad = None
    del q, k, v
    gpu.free(device)
    return dict(length=length, backend=backend, **out)


def auto_choice(device, dtype, cfg: dict, length: int) -> str:
    probe = torch.zeros(1, cfg["op_heads"], 8, cfg["op_head_dim"], device=device, dtype=dtype)
    return resolve_backend(probe, probe[:, : cfg["op_kv_heads"]], probe[:, : cfg["op_kv_heads"]],
                           token_layout(1, length, device), group_size_for(length))


def speed(ctx) -> dict:
    device, smoke = ctx.device, ctx.smoke
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = dict(gpu.SMOKE if smoke else gpu.FULL)
    if smoke:  # the figures' lengths, scaled
        cfg.update(op_lengths=[scaled(n, True) for n, _ in OP_FIGURES],
                   step_lengths=[scaled(n, True) for n, _ in STEP_FIGURES])
    backends = gpu.backends_for(device)
    auto = {n: auto_choice(device, dtype, cfg, n) for n in cfg["op_lengths"]}
    op = gpu.op_table(device, dtype, backends, cfg, cfg["repeats"])
    step_rows, step, fit = gpu.step_table(device, dtype, cfg, cfg["repeats"])
    figures = []
    for length, required in OP_FIGURES:
        n = scaled(length, smoke)
        row = next((r for r in op if r["length"] == n and r["variant"] == f"s2 {auto.get(n)}" and "error" not in r),
                   None)
        figures.append(figure(f"op speed-up at {length // 1024}k (s2 {auto.get(n)})", n, required,
                              row and row["speedup"]))
    by_length = {r["length"]: r for r in step}
    for length, required in STEP_FIGURES:
        n = scaled(length, smoke)
        figures.append(figure(f"step speed-up at {length // 1024}k", n, required,
                              by_length[n]["speedup"] if n in by_length else None))
    for r in step:
        figures.append(figure(f"step peak at {r['length']}: S2 / full", r["length"], 1.0,
                              r["s2_peak_gib"] / r["full_peak_gib"] if r["full_peak_gib"] else None, at_least=False))
    missed = [f["name"] for f in figures if not f["pass"]]
    result = dict(status="ok", backends=backends, auto=auto, op=op, step_rows=step_rows, step=step, step_fit=fit,
                  figures=figures)
    if missed:
        n = scaled(8192, smoke)
        print(f"missed {len(missed)} figure(s): profiling the op at {n}", flush=True)
        result["profile"] = profile_op(device, dtype, cfg, n, auto.get(n, "auto"))
    if op and step:
        gpu.plot(op, step, ctx.output_dir / "speed.png",
                 f"S2-Attn speed ({'smoke, ' if smoke else ''}{str(dtype).removeprefix('torch.')})")
    return result


# --- memory --------------------------------------------------------------------------------------------------------

MEMORY_MODELS = ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.2-1B")
SMOKE_MEMORY = dict(start=64, limit=128, layers=2)
"""Smoke: the smoke width (memory.SMOKE_WIDTH), 2 layers, 64 -> 128 tokens; the GPU run doubles from 32k up to
1M tokens or until a step does not fit."""
FULL_COMPARISON_MAX = 65536
"""S2 vs full attention is timed at the longest length both fit up to this one (64k): full attention's step at
256k+ would take minutes of the budget."""


def longest_fit(lengths: list[int], try_length) -> tuple[list[dict], int]:
    """Try each length in turn (doubling) until one does not fit: try_length(L) returns a row (dict with `fits`),
    or None when it was not tried (predicted not to fit, or no time left). Returns (rows, longest L that fit; 0)."""
    rows, longest = [], 0
    for length in lengths:
        row = try_length(length)
        if row is None:
            break
        rows.append(row)
        if not row["fits"]:
            break
        longest = length
    return rows, longest


def memory(ctx) -> dict:
    import memory as memory_benchmark
    from transformers import LlamaConfig

    import longlora
    from longlora.memory import apply_memory_plan
    from longlora.plan import KNOWN_SHAPES, GiB, ModelShape, longest_context, predict, step_tensors, usable_bytes

    device, smoke = ctx.device, ctx.smoke
    cuda = device.type == "cuda"
    dtype = "bf16" if cuda else "fp32"
    capacity = torch.cuda.get_device_properties(device).total_memory if cuda else None
    gpu_gib = capacity / GiB if cuda else 80.0
    settings = memory_benchmark.SETTINGS["defaults"]
    models = {f"smoke ({name.split('/')[-1]} stand-in)": (memory_benchmark.SMOKE_WIDTH, SMOKE_MEMORY["layers"])
              for name in MEMORY_MODELS} if smoke else {
        name: ({k: v for k, v in KNOWN_SHAPES[name].items() if k != "num_hidden_layers"},
               KNOWN_SHAPES[name]["num_hidden_layers"]) for name in MEMORY_MODELS}
    start, limit = (SMOKE_MEMORY["start"], SMOKE_MEMORY["limit"]) if smoke else (32768, 1 << 20)
    lengths = [start << i for i in range((limit // start).bit_length()) if start << i <= limit]
    results = []
    for name, (width, layers) in models.items():
        shape = ModelShape.from_config(LlamaConfig(num_hidden_layers=layers, **width), name=name)
        with torch.device(device):  # a random 8B model initialises in seconds on the GPU, minutes on the CPU
            model = memory_benchmark.build(width, layers, max(lengths), dtype)
        apply_memory_plan(model, **settings)
        last = {"seconds": 0.0, "warm": False}

        def measure(length: int, attention: str) -> dict:
            (longlora.enable_s2_attention if attention == "s2" else longlora.disable_s2_attention)(model)
            ids = torch.randint(0, width["vocab_size"], (1, length), generator=torch.Generator().manual_seed(0))
            ids = ids.to(device)

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                model.zero_grad(set_to_none=True)

            pred = predict(shape, length, dtype=dtype, prefetch=cuda, **settings)
            row = dict(length=length, attention=attention, plan_peak_gib=pred.peak / GiB,
                       plan_step_tensors_gib=step_tensors(pred) / GiB, plan_fits=pred.peak <= usable_bytes(gpu_gib))
            if not last["warm"]:  # the model's first step pays kernel loading and library set-up: untimed
                last["warm"] = True
                step()
            oom = None
            try:
                seconds, peak = timed_peak(step, device)
            except RuntimeError as err:  # torch.OutOfMemoryError, or a kernel's own "out of memory"
                if "out of memory" not in str(err).lower():
                    raise
                oom = " ".join(str(err).split())[:200]
            if oom is not None:  # freed outside the except: its traceback holds the failed step's tensors
                model.zero_grad(set_to_none=True)
                gpu.free(device)
                return dict(row, fits=False, error=f"out of memory: {oom}")
            total = torch.cuda.max_memory_allocated() if cuda else None
            gpu.free(device)
            last["seconds"] = seconds
            return dict(row, fits=True, seconds_per_step=seconds, peak_step_gib=peak / GiB,
                        peak_total_gib=total / GiB if total else None,
                        step_vs_plan=peak / step_tensors(pred) if step_tensors(pred) else None)

        def try_s2(length: int):
            pred = predict(shape, length, dtype=dtype, prefetch=cuda, **settings)
            if cuda and pred.peak > 1.2 * usable_bytes(gpu_gib):  # plan says far too big: not worth the time
                print(f"  {name} {length}: plan predicts {pred.peak / GiB:.0f} GiB, not tried", flush=True)
                return None
            if 4 * last["seconds"] > ctx.seconds_left() - 20:  # one step, up to 4x the last length's (attention)
                print(f"  {name} {length}: not tried, {ctx.seconds_left():.0f}s left", flush=True)
                return None
            row = measure(length, "s2")
            print(f"  {name} {length:>7} S2: {'fits' if row['fits'] else 'does not fit'}"
                  + (f", {row['seconds_per_step']:.2f} s/step, step peak {row['peak_step_gib']:.2f} GiB "
                     f"(plan {row['plan_step_tensors_gib']:.2f})" if row["fits"] else ""), flush=True)
            return row

        rows, longest = longest_fit(lengths, try_s2)
        comparison = None
        for length in sorted((r["length"] for r in rows if r["fits"] and r["length"] <= FULL_COMPARISON_MAX),
                             reverse=True):  # the longest both fit, up to FULL_COMPARISON_MAX
            s2_seconds = next(r["seconds_per_step"] for r in rows if r["length"] == length)
            # full attention costs up to (4 / 3) x L / G more in attention, G = L / 4: ~5x S2's step at most
            if 5 * s2_seconds > ctx.seconds_left() - 20:
                print(f"  {name} {length}: full attention not tried, {ctx.seconds_left():.0f}s left", flush=True)
                continue
            full = measure(length, "full")
            if full["fits"]:
                s2 = next(r for r in rows if r["length"] == length)
                comparison = dict(length=length, s2=s2, full=full,
                                  speedup=full["seconds_per_step"] / s2["seconds_per_step"],
                                  peak_ratio=s2["peak_step_gib"] / full["peak_step_gib"])
                break
        results.append(dict(model=name, layers=layers, rows=rows, longest=longest,
                            plan_longest=longest_context(shape, gpu_gib, dtype=dtype, **settings),
                            s2_vs_full=comparison, reached_limit=bool(rows) and rows[-1]["fits"]
                            and rows[-1]["length"] == lengths[-1]))
        del model
        gpu.free(device)
        print(f"{name}: longest {longest} (plan: {results[-1]['plan_longest']})" + (
            f"; at {comparison['length']} S2 {comparison['speedup']:.2f}x full's speed, "
            f"{comparison['peak_ratio']:.2f}x its peak" if comparison else ""), flush=True)
    return dict(status="ok", dtype=dtype, gpu_gib=gpu_gib, settings="defaults", lengths=lengths, models=results)
