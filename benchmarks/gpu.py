"""S2-Attn on one GPU: correctness of every backend, the attention op, and a whole 1.1B LoRA+ training step.

    python benchmarks/gpu.py                  # one H100/H200, bf16: about 4-6 minutes; docs/benchmarks/gpu.{json,png}
    python benchmarks/gpu.py --smoke          # the same code, tiny, on CPU, in seconds (CI); never into docs/

Three tables, printed and written to JSON (PNG beside it when matplotlib is installed):
(a) correctness of every S2 backend available on the device (sdpa, varlen, flash; cpu on CPU) against a float64
    dense reference (the S2 mask, then softmax), in bf16 and fp32: regular, ragged length, 9/3 heads, left and right
    padding, packed documents; output and gradients (max error / max reference value). Beside each bf16 error, full
    causal SDPA's own bf16 error on the same inputs: S2 should be as accurate as the kernel it is made of.
(b) the attention op, forward + backward, 32 heads, D = 128, G = L/4, 4k-128k: full causal SDPA, S2 with each
    backend, and "short" (S2's groups without the shift).
(c) a whole LoRA+ training step (forward + backward, gradient checkpointing, batch 1) of a 1.1B Llama-shaped model
    with random weights (hidden 2048, 22 layers, 32/4 heads, vocab 32000), 8k-64k: full (sdpa) vs S2 (backend
    auto), seconds, tokens/s, peak memory above the model, and the limit row: fit full's time as a*L + b*L^2
    (non-attention cost linear, attention quadratic); S2 at best costs a*L + b*L^2 * G/L.

Imports only torch, transformers, peft (and accelerate through them); matplotlib is optional. Exit status 1 if a
correctness row fails its bound (fp32: 1e-4; bf16: 3x full SDPA's own error, at least 2e-2).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
from _measure import full_attention, group_size_for, make_inputs, measure, output_path, save_figure, time_and_peak

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from longlora.attention import flash_available, resolve_backend, s2_attention, s2_dense_mask  # noqa: E402
from longlora.attention import token_layout  # noqa: E402
from longlora.io import write_json  # noqa: E402

FULL = dict(op_lengths=[4096, 8192, 16384, 32768, 65536, 131072], op_heads=32, op_kv_heads=32, op_head_dim=128,
            step_lengths=[8192, 16384, 32768, 65536], repeats=3, check_scale=1,
            model=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000))
SMOKE = dict(op_lengths=[256, 512], op_heads=4, op_kv_heads=4, op_head_dim=32, step_lengths=[128, 256], repeats=1,
             check_scale=16,
             model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256))


def backends_for(device: torch.device) -> list[str]:
    """Every S2 backend that can run on this device (the correctness table lists the others as n/a)."""
    if device.type == "cpu":
        return ["sdpa", "cpu"]
    out = ["sdpa"]
    probe = torch.zeros(1, 2, 8, 64, device=device, dtype=torch.bfloat16)
    if resolve_backend(probe, probe, probe, token_layout(1, 8, device), 4) == "varlen":
        out.append("varlen")
    if flash_available():
        out.append("flash")
    return out


# --- (a) correctness ---------------------------------------------------------------------------------------------


def check_cases(scale: int):
    """(name, batch, heads, kv_heads, length, group, real mask or None, position_ids or None); lengths / scale."""
    n = lambda x: max(8, x // scale)  # noqa: E731
    cases = [("regular", 2, 8, 2, n(1024), n(256)), ("ragged L", 1, 8, 2, n(1024) - n(24) + 1, n(256)),
             ("9/3 heads", 1, 9, 3, n(512), n(128))]
    out = [c + (None, None) for c in cases]
    length = n(512)
    for side in ("left", "right"):
        real = torch.ones(2, length, dtype=torch.bool)
        pad = max(1, length * 3 // 20)
        if side == "left":
            real[0, :pad] = False
        else:
            real[0, length - pad:] = False
        out.append((f"{side} padding", 2, 8, 2, length, n(128), real, None))
    docs = [n(768) * 2 // 5, n(768) // 4]
    docs.append(n(768) - sum(docs))
    pos = torch.cat([torch.arange(d) for d in docs])[None]
    out.append(("packed docs", 1, 8, 2, n(768), n(128), None, pos))
    return out


def dense_reference(q, k, v, mask):
    """Masked softmax attention in float64. q (B, Hq, L, D), k/v (B, Hk, L, D), mask (B, Hq, L, L) bool."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs @ v


def relative_errors(fn, q64, k64, v64, ref, ref_grads, keep, grad_out, dtype):
    """Max |error| / max |reference| of the output and of dq, dk, dv, for fn run in `dtype` on q/k/v."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q64, k64, v64))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    errs = [((out.double() - ref) * keep).abs().max() / (ref * keep).abs().max()]
    errs += [(g.double() - r).abs().max() / r.abs().max() for g, r in zip(grads, ref_grads)]
    return [float(e) for e in errs]


def with_reference(q64, k64, v64, mask, grad_out):
    ref = dense_reference(q64, k64, v64, mask)
    return ref.detach(), [g.detach() for g in torch.autograd.grad(ref, (q64, k64, v64), grad_out)]


def correctness(device, backends, scale):
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, b, hq, hk, length, group, real, pos in check_cases(scale):
        q64, k64, v64 = (torch.randn(b, length, h, 64, generator=g, dtype=torch.float64).to(device).transpose(1, 2)
                         .requires_grad_() for h in (hq, hk, hk))
        kw = dict(attention_mask=None if real is None else real.to(device),
                  position_ids=None if pos is None else pos.to(device))
        layout = token_layout(b, length, device, **kw)
        keep = (torch.ones(b, length, dtype=torch.bool) if real is None else real).to(device)[:, None, :, None]
        grad_out = torch.randn(b, hq, length, 64, generator=g, dtype=torch.float64).to(device) * keep
        mask = s2_dense_mask(length, hq, group, attention_mask=real, position_ids=pos).to(device)  # (B|1, H, L, L)
        ref, ref_grads = with_reference(q64, k64, v64, mask.expand(b, -1, -1, -1), grad_out)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril().expand(b, hq, -1, -1)
        full_ref, full_ref_grads = with_reference(q64, k64, v64, causal, grad_out)
        del mask, causal
        for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            # full causal SDPA's own error on the same inputs: the yardstick for S2's bf16 error
            full_err = max(relative_errors(full_attention, q64, k64, v64, full_ref, full_ref_grads, 1, grad_out,
                                           dtype))
            probe = torch.zeros(b, hq, length, 64, device=device, dtype=dtype)
            for backend in ["cpu", "sdpa", "varlen", "flash"]:
                row = dict(case=name, dtype=dtype_name, backend=backend, batch=b, heads=hq, kv_heads=hk,
                           length=length, group_size=group, full_sdpa_error=full_err)
                try:  # runs only where the path it names really runs (cpu falls back to sdpa with padding)
                    runs = backend in backends and resolve_backend(probe, probe[:, :hk], probe[:, :hk], layout,
                                                                   group, backend=backend) == backend
                except ValueError:  # e.g. varlen in fp32
                    runs = False
                if not runs:
                    rows.append(dict(row, status="n/a"))
                    continue
                fn = lambda q, k, v: s2_attention(q, k, v, group, backend=backend, **kw)  # noqa: E731
                try:
                    errs = relative_errors(fn, q64, k64, v64, ref, ref_grads, keep, grad_out, dtype)
                except Exception as err:  # noqa: BLE001  (a broken backend is a result: record it, go on)
                    rows.append(dict(row, status="ERROR", message=f"{type(err).__name__}: {err}"[:300]))
                    continue
                bound = 1e-4 if dtype == torch.float32 else max(3 * full_err, 2e-2)
                rows.append(dict(row, output_error=errs[0], dq_error=errs[1], dk_error=errs[2], dv_error=errs[3],
                                 error=max(errs), bound=bound, status="ok" if max(errs) <= bound else "FAIL"))
        del q64, k64, v64, ref, ref_grads, full_ref, full_ref_grads
        free(device)
    print("\n(a) correctness against a float64 dense reference (max error / max reference; output and dq/dk/dv)")
    print(f"{'case':>14} {'dtype':>5} {'backend':>7} {'out':>9} {'dq':>9} {'dk':>9} {'dv':>9} {'full SDPA':>9}  status")
    for r in rows:
        if r["status"] == "ERROR":
            print(f"{r['case']:>14} {r['dtype']:>5} {r['backend']:>7}  ERROR {r['message'][:100]}")
        elif r["status"] == "n/a":
            print(f"{r['case']:>14} {r['dtype']:>5} {r['backend']:>7} {'n/a on this device / dtype / layout':>39}")
        else:
            print(f"{r['case']:>14} {r['dtype']:>5} {r['backend']:>7} {r['output_error']:>9.2e} {r['dq_error']:>9.2e} "
                  f"{r['dk_error']:>9.2e} {r['dv_error']:>9.2e} {r['full_sdpa_error']:>9.2e}  {r['status']}")
    return rows


# --- (b) the attention op ----------------------------------------------------------------------------------------


def op_table(device, dtype, backends, cfg, repeats):
    rows = []
    print(f"\n(b) attention op fwd+bwd, {cfg['op_heads']}/{cfg['op_kv_heads']} heads, D={cfg['op_head_dim']}, "
          f"G = L/4, {str(dtype).removeprefix('torch.')}")
    print(f"{'L':>7} {'variant':>12} {'ms':>9} {'full/this':>9} {'peak MiB':>9}")
    for length in cfg["op_lengths"]:
        group = group_size_for(length)
        variants = [("full", full_attention)]
        variants += [(f"s2 {b}", lambda q, k, v, b=b: s2_attention(q, k, v, group, backend=b)) for b in backends]
        variants.append(("short", lambda q, k, v: s2_attention(q, k, v, group, shift=False)))
        q, k, v = make_inputs(length, cfg["op_heads"], cfg["op_kv_heads"], cfg["op_head_dim"], device, dtype)
        full_s = None
        for name, fn in variants:
            try:
                seconds, peak = measure(fn, q, k, v, repeats)
            except Exception as err:  # noqa: BLE001  (record the failure, measure the rest)
                rows.append(dict(length=length, group_size=group, variant=name, error=f"{type(err).__name__}: {err}"))
                print(f"{length:>7} {name:>12}  ERROR {rows[-1]['error'][:100]}", flush=True)
                q.grad = k.grad = v.grad = None
                free(device)
                continue
            full_s = full_s or seconds
            row = dict(length=length, group_size=group, variant=name, ms=seconds * 1e3, speedup=full_s / seconds,
                       peak_mib=peak / 2**20)
            rows.append(row)
            print(f"{length:>7} {name:>12} {row['ms']:>9.2f} {row['speedup']:>8.2f}x {row['peak_mib']:>9.1f}",
                  flush=True)
        del q, k, v
        free(device)
    return rows


# --- (c) the whole training step ---------------------------------------------------------------------------------


def build_model(cfg, device, dtype, max_length):
    from transformers import LlamaConfig, LlamaForCausalLM

    from longlora.adapters import apply_lora_plus

    config = LlamaConfig(**cfg["model"], max_position_embeddings=max_length, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 1.1B model is slow to initialise on CPU
        model = LlamaForCausalLM(config).to(dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora_plus(model)
    model.train()
    return model


def step_table(device, dtype, cfg, repeats):
    import longlora

    lengths = cfg["step_lengths"]
    model = build_model(cfg, device, dtype, max(lengths))
    params = sum(p.numel() for p in model.parameters())
    rows = []
    print(f"\n(c) LoRA+ training step (fwd+bwd, gradient checkpointing, batch 1), Llama-shaped, {params / 1e9:.2f}B "
          f"parameters, random weights, {str(dtype).removeprefix('torch.')}")
    for length in lengths:
        ids = torch.randint(0, cfg["model"]["vocab_size"], (1, length),
                            generator=torch.Generator().manual_seed(0)).to(device)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)

        for variant in ("full", "s2"):
            if variant == "s2":
                longlora.enable_s2_attention(model)
            else:
                longlora.disable_s2_attention(model)
            try:
                seconds, peak = time_and_peak(step, device, repeats)
            except Exception as err:  # noqa: BLE001  (record the failure, measure the rest)
                model.zero_grad(set_to_none=True)
                seconds, peak = float("nan"), float("nan")
                print(f"  {length:>7} {variant:>4} ERROR {type(err).__name__}: {str(err)[:100]}", flush=True)
            rows.append(dict(length=length, variant=variant, seconds=seconds, tokens_per_s=length / seconds,
                             peak_gib=peak / 2**30))
            print(f"  {length:>7} {variant:>4} {seconds:.3f} s", flush=True)
            free(device)
    longlora.disable_s2_attention(model)
    del model
    free(device)
    # the limit: full = a*L + b*L^2 (least squares); S2 at best a*L + b*L^2 * G/L
    full = {r["length"]: r["seconds"] for r in rows if r["variant"] == "full" and r["seconds"] == r["seconds"]}
    xs = sorted(full)
    if not xs:
        return rows, [], {}
    a, b = fit_linear_quadratic(xs, [full[x] for x in xs])
    print(f"{'L':>7} {'full s':>8} {'S2 s':>8} {'speed-up':>9} {'limit':>7} {'full tok/s':>11} {'S2 tok/s':>10} "
          f"{'full GiB':>9} {'S2 GiB':>8}")
    summary = []
    for length in xs:
        f, s = (next(r for r in rows if r["length"] == length and r["variant"] == v) for v in ("full", "s2"))
        ratio = group_size_for(length) / length
        limit = (a * length + b * length**2) / (a * length + b * length**2 * ratio)
        summary.append(dict(length=length, full_s=f["seconds"], s2_s=s["seconds"], speedup=f["seconds"] / s["seconds"],
                            fitted_limit=limit, full_tokens_per_s=f["tokens_per_s"], s2_tokens_per_s=s["tokens_per_s"],
                            full_peak_gib=f["peak_gib"], s2_peak_gib=s["peak_gib"]))
        r = summary[-1]
        print(f"{length:>7} {r['full_s']:>8.3f} {r['s2_s']:>8.3f} {r['speedup']:>8.2f}x {limit:>6.2f}x "
              f"{r['full_tokens_per_s']:>11.0f} {r['s2_tokens_per_s']:>10.0f} {r['full_peak_gib']:>9.2f} "
              f"{r['s2_peak_gib']:>8.2f}")
    return rows, summary, dict(a=a, b=b, parameters=params)


def fit_linear_quadratic(xs, ys):
    """Least-squares a, b >= 0 of y = a*x + b*x^2 (b = 0 from a single point)."""
    if len(xs) < 2:
        return ys[0] / xs[0], 0.0
    s11 = sum(x * x for x in xs)
    s12 = sum(x**3 for x in xs)
    s22 = sum(x**4 for x in xs)
    t1 = sum(x * y for x, y in zip(xs, ys))
    t2 = sum(x * x * y for x, y in zip(xs, ys))
    det = s11 * s22 - s12 * s12
    a, b = (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det
    if b < 0:  # no quadratic part visible: all linear
        return t1 / s11, 0.0
    if a < 0:
        return 0.0, t2 / s22
    return a, b


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def plot(op_rows, summary, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: no {path}")
        return False
    fig, (ax_op, ax_step) = plt.subplots(1, 2, figsize=(11, 4))
    op_rows = [r for r in op_rows if "error" not in r]
    for variant in dict.fromkeys(r["variant"] for r in op_rows if r["variant"] != "full"):
        rs = [r for r in op_rows if r["variant"] == variant]
        ax_op.plot([r["length"] for r in rs], [r["speedup"] for r in rs], "o-", label=variant)
    ax_op.axhline(1.0, color="gray", lw=0.8)
    ax_op.set_title("attention op fwd+bwd: speed-up over full SDPA")
    ls = [r["length"] for r in summary]
    ax_step.plot(ls, [r["speedup"] for r in summary], "o-", label="S2 over full (measured)")
    ax_step.plot(ls, [r["fitted_limit"] for r in summary], "x--", label="limit (attention FLOPs only)")
    ax_step.axhline(1.0, color="gray", lw=0.8)
    ax_step.set_title("whole LoRA+ training step: speed-up")
    for ax in (ax_op, ax_step):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (G = L/4)")
        ax.set_ylabel("speed-up (x)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (seconds): the same code, for CI")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    p.add_argument("--parts", default="check,op,step", help="any of check, op, step")
    p.add_argument("--op-lengths", default=None, help="comma-separated, overrides the default lengths")
    p.add_argument("--step-lengths", default=None, help="comma-separated, overrides the default lengths")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--output", default=None, help="JSON path, the PNG beside it (default docs/benchmarks/gpu.json; "
                   "with --smoke a temporary path: a CPU smoke run never writes into docs/)")
    args = p.parse_args(argv)
    out = output_path(p, args.output, args.smoke, "gpu.json")
    cfg = dict(SMOKE if args.smoke else FULL)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU (or --smoke for the tiny CPU run)")
    for key in ("op_lengths", "step_lengths"):
        if getattr(args, key):
            cfg[key] = [int(x) for x in getattr(args, key).split(",")]
    repeats = args.repeats or cfg["repeats"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parts = [x for x in args.parts.split(",") if x]
    backends = backends_for(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    import transformers

    meta = dict(device=name, torch=torch.__version__, transformers=transformers.__version__,
                cuda=torch.version.cuda, backends=backends, smoke=args.smoke, dtype=str(dtype), repeats=repeats)
    print(f"S2-Attn GPU benchmark on {name}, torch {torch.__version__}, backends: {', '.join(backends)}")
    start = time.perf_counter()
    result = dict(meta=meta)
    if "check" in parts:
        result["correctness"] = correctness(device, backends, cfg["check_scale"])
    if "op" in parts:
        result["op"] = op_table(device, dtype, backends, cfg, repeats)
    if "step" in parts:
        result["step_rows"], result["step"], result["step_fit"] = step_table(device, dtype, cfg, repeats)
    meta["seconds"] = time.perf_counter() - start
    write_json(out, result)
    drawn = plot(result.get("op", []), result.get("step", []), out.with_suffix(".png"),
                 f"S2-Attn on {name} ({str(dtype).removeprefix('torch.')})") if "op" in parts and "step" in parts \
        else False
    print(f"\nwrote {out}{' and ' + str(out.with_suffix('.png')) if drawn else ''} in {meta['seconds']:.0f} s")
    failed = [r for r in result.get("correctness", []) if r["status"] in ("FAIL", "ERROR")]
    failed += [r for r in result.get("op", []) if "error" in r]
    if failed:
        print(f"{len(failed)} row(s) FAILED or raised an error")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
