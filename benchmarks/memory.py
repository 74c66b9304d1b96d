"""Memory of one long training step, measured and predicted: today's step vs each setting of longlora.memory.

    python benchmarks/memory.py                       # Llama-3.1-8B's width, 1-2 layers, L = 1k..8k (CPU, ~1 h)
    python benchmarks/memory.py --layers 1 --lengths 1024,2048 --settings today,defaults   # a quick look
    python benchmarks/memory.py --smoke --output /tmp/memory.json                           # tiny (the test suite)

(i) Measured: exact tensor bytes of one LoRA+ training step (forward + backward, gradient checkpointing, S2-Attn,
    batch 1, float32 on CPU) of a Llama at Llama-3.1-8B's width (hidden 4096, intermediate 14336, 32 query / 8
    key-value heads, vocabulary 128,256) with 1-2 decoder layers, random weights, the model set up as `longlora
    train` sets it up. Tensors are counted from their allocation until their storage is freed
    (_measure.PeakTensorMemory); the model's parameters are not counted (the optimizer state neither: no optimizer
    step), gradients are. Each step is cut into phases (forward, loss backward, layer backward, embedding backward)
    and the peak of each is reported beside `longlora plan`'s prediction for the same phase (longlora.plan).
(ii) Predicted: `longlora plan`'s table at full depth, Llama-3.1-8B and Llama-3.2-1B, LoRA+ (bf16 base) and QLoRA,
    contexts 32k..1M, on 24 / 80 / 141 GB: the peak per GPU by component and the longest context that fits.

Settings: today (tiled_loss false, tiled_mlp false), tiled_loss, tiled_mlp (both), offload (both + offloaded
checkpoints), defaults (tiled_loss, tiled_mlp auto). Writes JSON + PNG (docs/benchmarks/memory.{json,png} by default).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
from _measure import PeakTensorMemory, in_docs, save_figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SETTINGS = {
    "today": dict(tiled_loss=False, tiled_mlp=False, offload_checkpoints=False, lean_norms=False),
    "tiled_loss": dict(tiled_loss=True, tiled_mlp=False, offload_checkpoints=False),
    "tiled_mlp": dict(tiled_loss=True, tiled_mlp=True, offload_checkpoints=False),
    "offload": dict(tiled_loss=True, tiled_mlp=True, offload_checkpoints=True),
    "defaults": dict(tiled_loss=True, tiled_mlp="auto", offload_checkpoints=False),
}
LLAMA31_8B_WIDTH = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                        vocab_size=128256, rope_theta=500000.0)
SMOKE_WIDTH = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=2048)
PHASES = ("forward", "loss backward", "layer backward", "embedding backward")


def build(width: dict, layers: int, length: int, dtype: str):
    """A random Llama of `width` and `layers`, set up as `longlora train` sets it up (LoRA+, S2, checkpointing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import longlora
    from longlora.adapters import apply_lora_plus

    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=length, use_cache=False, **width)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora_plus(model)
    if dtype == "bf16":
        from longlora.adapters import keep_trainables_in_float32

        keep_trainables_in_float32(model, torch.bfloat16)
    longlora.enable_s2_attention(model)
    return model.train()


def measure_step(model, length: int, setting: str, dtype: str, **plan_options) -> dict:
    """Seconds and the tensor peak of each phase of one training step under `setting` (+ apply_memory_plan's
    keyword options, e.g. mlp_tile_tokens)."""
    from longlora.adapters import base_model
    from longlora.memory import apply_memory_plan, memory_plan_of, remove_memory_plan

    remove_memory_plan(model)
    apply_memory_plan(model, **SETTINGS[setting], **plan_options)
    plan = memory_plan_of(model)
    base = base_model(model)
    ids = torch.randint(0, base.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    offloaded = (lambda: plan._offloader.host_bytes) if plan._offloader is not None else None
    model.zero_grad(set_to_none=True)
    gc.collect()
    with PeakTensorMemory(offloaded=offloaded) as tracker:
        marks = [base.model.norm.register_full_backward_pre_hook(lambda *a: tracker.mark("loss backward")),
                 base.model.embed_tokens.register_full_backward_pre_hook(lambda *a: tracker.mark("layer backward"))]
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        tracker.mark("forward")
        loss.backward()
        tracker.mark("embedding backward")
        seconds = time.perf_counter() - started
        for handle in marks:
            handle.remove()
        del loss
    model.zero_grad(set_to_none=True)
    return dict(seconds=seconds, peak=tracker.peak, phases=dict(tracker.phases))


def predict(width: dict, layers: int, length: int, setting: str, dtype: str):
    from transformers import LlamaConfig

    from longlora import plan as memory_plan

    shape = memory_plan.ModelShape.from_config(LlamaConfig(num_hidden_layers=layers, **width))
    return memory_plan.predict(shape, length, dtype=dtype, prefetch=False, **SETTINGS[setting])


def measured_rows(width: dict, runs: list[tuple[int, str, list[int]]], dtype: str, label: str) -> list[dict]:
    """runs: (layers, setting, lengths). One model per depth (built for the longest length); one step per row."""
    from longlora.plan import step_tensors

    rows = []
    for layers in sorted({r[0] for r in runs}):
        todo = [(setting, length) for l, setting, lengths in runs if l == layers for length in lengths]
        model = build(width, layers, max(length for _, length in todo), dtype)
        for setting, length in todo:
            got = measure_step(model, length, setting, dtype)
            pred = predict(width, layers, length, setting, dtype)
            row = dict(model=label, layers=layers, length=length, setting=setting, dtype=dtype,
                       seconds=got["seconds"], measured=got["peak"], phases=got["phases"],
                       predicted=step_tensors(pred), predicted_phases=pred.phases,
                       per_token={k: v / length for k, v in pred.components.items()
                                  if k not in ("weights", "trainables + optimizer")})
            row["ratio"] = row["predicted"] / row["measured"]
            rows.append(row)
            print(f"{label:>10} {layers:>2} {length:>6} {setting:>10} {got['peak'] / 2**20:>10.1f} "
                  f"{row['predicted'] / 2**20:>10.1f} {row['ratio']:>6.3f} {got['seconds']:>7.1f}", flush=True)
            gc.collect()
        del model
        gc.collect()
    return rows


def plan_table(gpus=(24, 80, 141), contexts=(32768, 131072, 262144, 524288, 1048576)) -> list[dict]:
    """`longlora plan` at full depth: Llama-3.1-8B and Llama-3.2-1B, LoRA+ (bf16 base) and QLoRA."""
    from transformers import LlamaConfig

    from longlora.plan import KNOWN_SHAPES, PLAN_SETTINGS, GiB, ModelShape, longest_context, predict

    rows = []
    for name in ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.2-1B"):
        shape = ModelShape.from_config(LlamaConfig(**KNOWN_SHAPES[name]), name=name)
        for quantization in (None, "4bit"):
            for setting, options in PLAN_SETTINGS.items():
                row = dict(model=name, finetune="QLoRA" if quantization else "LoRA+ (bf16)", setting=setting,
                           peak_gib={str(c): predict(shape, c, quantization=quantization, **options).peak / GiB
                                     for c in contexts},
                           longest={str(g): longest_context(shape, g, quantization=quantization, **options)
                                    for g in gpus})
                rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 1, figsize=(8, 4.8))
    for (label, layers, setting) in sorted({(r["model"], r["layers"], r["setting"]) for r in rows}):
        rs = sorted((r for r in rows if (r["model"], r["layers"], r["setting"]) == (label, layers, setting)),
                    key=lambda r: r["length"])
        line, = ax.plot([r["length"] for r in rs], [r["measured"] / 2**20 for r in rs], "o-",
                        label=f"{label} {layers}L {setting}")
        ax.plot([r["length"] for r in rs], [r["predicted"] / 2**20 for r in rs], "x--", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("step tensor peak, MiB (o measured, x plan)")
    ax.set_title("one LoRA+ training step on CPU (fp32, S2, checkpointing)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="docs/benchmarks/memory.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds (never writes into docs/)")
    p.add_argument("--parts", default="issue,width,plan", help="issue (the issue's first row), width (8B width), "
                   "plan (full-depth table)")
    args = p.parse_args(argv)
    out = Path(args.output)
    if args.smoke and in_docs(out):
        p.error("--smoke writes a tiny run: pass --output outside docs/")
    parts = args.parts.split(",")
    print(f"{'model':>10} {'L':>2} {'tokens':>6} {'setting':>10} {'measured':>10} {'plan':>10} {'ratio':>6} "
          f"{'sec':>7}   (MiB; step tensors: no parameters, no optimizer state)")
    rows: list[dict] = []
    if args.smoke:
        rows += measured_rows(SMOKE_WIDTH, [(1, s, [256]) for s in SETTINGS] + [(2, "offload", [256])], "fp32",
                              "smoke")
    else:
        if "issue" in parts:  # the issue's first row: 128k vocabulary, hidden 512, 2 layers, L = 4096
            issue = dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8,
                         vocab_size=128256)
            rows += measured_rows(issue, [(2, "today", [4096]), (2, "defaults", [4096])], "fp32", "issue")
        if "width" in parts:
            runs = [(1, "today", [1024, 2048]), (1, "tiled_loss", [1024, 2048, 4096, 8192]),
                    (1, "tiled_mlp", [4096, 8192]), (1, "offload", [2048, 8192]),
                    (2, "tiled_loss", [4096]), (2, "tiled_mlp", [4096]), (2, "offload", [4096])]
            rows += measured_rows(LLAMA31_8B_WIDTH, runs, "fp32", "8B width")
    table = plan_table() if "plan" in parts else []
    for row in table:
        print(f"{row['model']:>26} {row['finetune']:>13} {row['setting']:>9} longest: "
              + "  ".join(f"{g} GiB {c // 1024}k" for g, c in row["longest"].items()))
    from longlora.io import write_json

    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), device="cpu",
                note="measured: exact tensor bytes of one step (no parameters / optimizer state); plan: "
                     "longlora.plan.step_tensors with prefetch=False (CPU: no prefetch)")
    write_json(out, dict(meta=meta, rows=rows, plan=table))
    if rows:
        plot(rows, out.with_suffix(".png"))
    worst = max((abs(r["ratio"] - 1) for r in rows), default=0.0)
    print(f"\nwrote {out}; plan vs measured: worst |ratio - 1| = {worst:.3f}")


if __name__ == "__main__":
    main()
